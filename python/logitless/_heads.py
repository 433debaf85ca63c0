"""Composite heads: ``head(x)`` reduced to ``linear(prefix(x))`` exactly, or not at all.

``RobertaLMHead`` (dense → gelu → norm → ``decoder``) and BERT's ``cls`` (→ ``predictions`` → transform →
``decoder``) end their forward with one call of a sub-module. The Rust splitter (``_core.split_head_forward``) turns
the head's own forward into a function that runs the same statements and returns the final call's argument, so
fusing the loss on the final ``nn.Linear`` after that prefix computes what ``head(x)`` and the stock loss compute.
Nothing is re-implemented here; any head whose class or instance does not fit keeps the stock path.
"""

from __future__ import annotations

import functools
import linecache
from collections.abc import Callable
from dataclasses import dataclass
from types import FunctionType
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

from logitless._patching import FUTURE_FLAGS, forward_source

__all__ = ["HeadPlan", "resolve_head"]

# BERT nests two levels (cls → predictions → decoder); deeper chains are not something transformers builds.
_MAX_DEPTH = 4


@dataclass(frozen=True)
class _Step:
    prefix: FunctionType  # prefix(module, x) -> the argument the forward passes to module.<final>
    final: str


@dataclass(frozen=True)
class HeadPlan:
    """``head(x) == linear(transform(x))``, with ``transform`` the identity for a plain ``nn.Linear`` head."""

    prefixes: tuple[Callable[[torch.Tensor], torch.Tensor], ...]
    linear: nn.Linear

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        for prefix in self.prefixes:
            hidden = prefix(hidden)
        return hidden


# Keyed by the class's forward function: a class whose forward is replaced later is analysed again.
_steps: dict[Any, _Step | None] = {}


def _build_step(forward: Any) -> _Step | None:
    from logitless import _core

    # A wrapped forward (functools.wraps) runs code its source does not show; a closure cannot be recompiled.
    if not isinstance(forward, FunctionType) or hasattr(forward, "__wrapped__") or forward.__code__.co_freevars:
        return None
    try:
        source = forward_source(forward)
    except (OSError, TypeError):
        return None
    split = _core.split_head_forward(source)
    if split["status"] != "split":
        return None
    text: str = split["prefix_source"]
    filename = f"<logitless head prefix {forward.__module__}.{forward.__qualname__}>"
    try:
        code = compile(text, filename, "exec", flags=forward.__code__.co_flags & FUTURE_FLAGS, dont_inherit=True)
    except SyntaxError:
        return None
    namespace: dict[str, Any] = {}
    try:
        # The head's own statements, in the head's own module globals. Defining the function evaluates its
        # defaults and (without postponed evaluation) its annotations, which can name something absent at run time.
        exec(code, forward.__globals__, namespace)
    except Exception:
        return None
    prefix = next((v for v in namespace.values() if isinstance(v, FunctionType)), None)
    if prefix is None:
        return None
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    return _Step(prefix=prefix, final=split["final"])


def _step_for(cls: type) -> _Step | None:
    forward = getattr(cls, "forward", None)
    if forward not in _steps:
        _steps[forward] = _build_step(forward)
    return _steps[forward]


def _bypass_changes_behaviour(module: nn.Module) -> bool:
    """Whether calling the prefix / the fused linear instead of ``module(...)`` would skip something."""
    return (
        type(module).__call__ is not nn.Module.__call__
        or "forward" in module.__dict__
        or bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
        or bool(getattr(module, "_backward_pre_hooks", None))
        or bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)
        or bool(_module._global_backward_hooks or getattr(_module, "_global_backward_pre_hooks", None))
    )


def resolve_head(head: Any) -> HeadPlan | None:
    """The exact ``linear(transform(x))`` form of ``head(x)``, or None when it cannot be shown to be exact.

    A plain ``nn.Linear`` (exactly that type: subclasses and PEFT/quantised wrappers may compute something else)
    is its own plan. A composite head must be a chain of modules whose forwards the splitter understands, called
    through ``nn.Module.__call__`` with no hooks, ending in an ``nn.Linear``.
    """
    if type(head) is nn.Linear:
        return HeadPlan(prefixes=(), linear=head)
    if not isinstance(head, nn.Module):
        return None
    prefixes: list[Callable[[torch.Tensor], torch.Tensor]] = []
    module: nn.Module = head
    for _ in range(_MAX_DEPTH):
        if _bypass_changes_behaviour(module):
            return None
        step = _step_for(type(module))
        if step is None:
            return None
        child = module._modules.get(step.final)
        if child is None or getattr(module, step.final, None) is not child:
            return None
        prefixes.append(functools.partial(step.prefix, module))
        if type(child) is nn.Linear:
            if _bypass_changes_behaviour(child):
                return None
            return HeadPlan(prefixes=tuple(prefixes), linear=child)
        module = child
    return None
