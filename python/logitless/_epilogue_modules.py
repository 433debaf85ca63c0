"""Epilogue modules: a sub-module called on the logits after the head (``logits = self.logit_softcap(logits)``).

The rewriter cannot know which class that attribute will hold, so the fused path is taken only when, at run time,
the module's class forward is an epilogue the Rust analyser understands (``_core.analyse_epilogue_module``: bias,
multiply, divide, softcap over its one input, with constants that are attributes of the module or numbers) and the
module is called as a plain module would be. Its constants are read off the instance on every call, so a changed
attribute is honoured; a constant that is a tensor requiring grad keeps the stock path (the fused op would not
give it a gradient).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from logitless import _engines
from logitless._heads import accelerate_hook, global_hooks, local_hooks
from logitless._source import analysable_source

__all__ = ["epilogue_keywords"]

# The op keyword of each step kind the analyser returns.
_KEYWORDS = {
    "logits_bias": "logits_bias",
    "multiply": "logit_scale_multiply",
    "divide": "logit_scale_divide",
    "softcap": "logit_softcapping",
}

# Keyed by the class's forward function, as the composite-head steps are: a forward replaced later is analysed again.
_analysed: dict[Any, list[dict[str, Any]] | None] = {}


def _steps_for(cls: type) -> list[dict[str, Any]] | None:
    forward = getattr(cls, "forward", None)
    if forward not in _analysed:
        from logitless import _core

        source = analysable_source(forward)
        result = _core.analyse_epilogue_module(source) if source is not None else None
        _analysed[forward] = result["steps"] if result is not None and result["status"] == "understood" else None
    return _analysed[forward]


def _hooks_are_harmless(module: nn.Module) -> bool:
    """Hooks that only move or gather the module's own tensors change nothing when it has none: DeepSpeed ZeRO-3's
    (it hooks every module) and accelerate's device alignment."""
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return False
    if _engines.deepspeed_zero3_hooks(module):
        return True
    return accelerate_hook(module) is not None and not local_hooks(module)


def _call_reason(module: nn.Module) -> str | None:
    """Why reading ``module``'s constants instead of calling it could skip something, or None."""
    if type(module).__call__ is not nn.Module.__call__:
        return "epilogue-custom-call"
    if global_hooks():
        return "global-module-hooks"
    hooked = local_hooks(module) or "forward" in module.__dict__
    if hooked and not _hooks_are_harmless(module):
        return "hooked-epilogue"
    return None


def _value(module: nn.Module, step: dict[str, Any]) -> Any:
    if "number" in step:
        return step["number"]
    value: Any = module
    for name in step["attribute"]:
        value = getattr(value, name)
    return value


def epilogue_keywords(module: Any) -> dict[str, Any] | str:
    """The op keywords that compute ``module(logits)``'s effect on the loss, or the reason (a short code) there
    are none."""
    if not isinstance(module, nn.Module):
        return "epilogue-not-a-module"
    reason = _call_reason(module)
    if reason is not None:
        return reason
    steps = _steps_for(_engines.base_class(module))
    if steps is None:
        return "epilogue-not-understood"
    keywords: dict[str, Any] = {}
    for step in steps:
        try:
            value = _value(module, step)
        except AttributeError:
            return "epilogue-value-missing"
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return "epilogue-parameter"
        keywords[_KEYWORDS[step["kind"]]] = value
    return keywords

