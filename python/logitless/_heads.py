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

from logitless import _engines
from logitless._engines import VocabShard
from logitless._source import FUTURE_FLAGS, analysable_source

__all__ = [
    "HeadPlan", "accelerate_hook", "explain_head", "global_hooks", "local_hooks", "resolve_head",
]

# BERT nests two levels (cls → predictions → decoder); deeper chains are not something transformers builds.
_MAX_DEPTH = 4


@dataclass(frozen=True)
class _Step:
    prefix: FunctionType  # prefix(module, x) -> the argument the forward passes to module.<final>
    final: str


@dataclass(frozen=True)
class _Entry:
    """A module the plan enters instead of calling it: how (its accelerate hook, if any; ``engine_hooks`` when an
    engine's hooks (FSDP2, ZeRO-3) must run around it) and its prefix (None for the final ``nn.Linear``, whose call
    the fused loss replaces, and for a PEFT wrapper, which passes its input on unchanged)."""

    module: nn.Module
    hook: Any | None
    prefix: Callable[[torch.Tensor], torch.Tensor] | None
    engine_hooks: bool = False
    # An FSDP1 wrapper: called as is, the rest of the plan standing in for the wrapped module's forward.
    wraps: nn.Module | None = None
    # A tensor-parallel layout beside the engine's hooks (2-D parallelism), left out when entering.
    layout: _engines.LayoutHooks | None = None


@dataclass(frozen=True)
class HeadPlan:
    """``head(x) == linear(transform(x))``, with ``transform`` the identity for a plain ``nn.Linear`` head.

    Modules carrying accelerate's device-alignment hook are entered as accelerate's own forward wrapper would:
    ``pre_forward`` before the module's statements (loading offloaded weights, moving the input to the execution
    device), ``post_forward`` on the result (offloading again, moving the output back). Modules managed by FSDP2 or
    DeepSpeed ZeRO-3 are called through their own hooks (``logitless._engines``). ``shard`` is set when the final linear is split over
    the vocabulary (tensor parallel): the loss must then be the vocabulary-parallel one.
    """

    entries: tuple[_Entry, ...]
    linear: nn.Linear
    shard: VocabShard | None = None
    # Set when the forward computes F.linear(x, weight()) off ``linear``'s weight instead of calling it (PEFT's
    # trainable tokens: the base weight with the adapter's rows in place); there is then no bias.
    merged_weight: Callable[[], torch.Tensor] | None = None
    # Set when a wrapper adds a low-rank term to the linear's output (a LoRA adapter): ``(a, b)`` from the linear's
    # input, the op's ``low_rank`` (``logitless._peft``).
    low_rank: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def prefixes(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], ...]:
        return tuple(e.prefix for e in self.entries if e.prefix is not None)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's leading statements alone (no hooks)."""
        for prefix in self.prefixes:
            hidden = prefix(hidden)
        return hidden

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The linear's parameters as the fused loss takes them: a tensor-parallel ``DTensor``'s local part
        (differentiable back to the parameter). Read inside ``apply``'s callback, once hooks have run."""
        if self.merged_weight is not None:
            return self.merged_weight(), None
        weight, bias = self.linear.weight, self.linear.bias
        if self.shard is not None or _is_dtensor(weight):
            weight = weight.to_local()
            bias = bias.to_local() if bias is not None else None
        return weight, bias

    def apply(self, hidden: torch.Tensor, fused: Callable[[torch.Tensor], Any]) -> Any:
        """``fused(x)`` where ``x`` is what the final linear would receive, with every hook applied around it.

        ``fused`` must read the linear's parameters when called: an offloading hook materialises them only then,
        and FSDP2 / ZeRO-3 all-gather them only then."""
        return self._enter(0, hidden, fused)

    def _enter(self, i: int, hidden: torch.Tensor, fused: Callable[[torch.Tensor], Any]) -> Any:
        if i == len(self.entries):
            return fused(hidden)
        entry = self.entries[i]

        def rest(x: torch.Tensor) -> Any:
            if entry.prefix is not None:
                x = entry.prefix(x)
            return self._enter(i + 1, x, fused)

        if entry.wraps is not None:
            return _engines.call_inside(entry.module, entry.wraps, rest, hidden)
        if entry.engine_hooks:
            return _engines.call_through(entry.module, rest, hidden, entry.layout)
        if entry.hook is None:
            return rest(hidden)
        args, kwargs = entry.hook.pre_forward(entry.module, hidden)
        if kwargs or len(args) != 1:
            raise RuntimeError(f"accelerate pre_forward returned {len(args)} args and {sorted(kwargs)}")
        return entry.hook.post_forward(entry.module, rest(args[0]))


def _plain_parameters(linear: nn.Module) -> bool:
    """Whether ``F.linear`` on the linear's weight and bias is torch's own matmul. A tensor subclass (a quantised
    weight: torchao's ``Int8Tensor``, an NF4 tensor) dispatches it to its own kernel, whose dequantisation and
    rounding the fused op cannot reproduce (and its raw values are not the weight). ``DTensor`` parameters are the
    engines' and tensor parallelism's, handled by their own rules."""
    for t in (linear.weight, getattr(linear, "bias", None)):
        if t is not None and type(t) not in (torch.Tensor, nn.Parameter) and not _is_dtensor(t):
            return False
    return True


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


# Keyed by the class's forward function: a class whose forward is replaced later is analysed again.
_steps: dict[Any, _Step | None] = {}


def _build_step(forward: Any) -> _Step | None:
    from logitless import _core

    source = analysable_source(forward)
    if source is None:
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


def global_hooks() -> bool:
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or getattr(_module, "_global_backward_pre_hooks", None)
    )


def local_hooks(module: nn.Module) -> bool:
    """Whether torch hooks (forward, forward-pre, backward, backward-pre) are registered on the module itself."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


def accelerate_hook(module: nn.Module) -> Any | None:
    """The module's accelerate hook when it is one whose effect is understood exactly, else None.

    ``accelerate.hooks.add_hook_to_module`` keeps the class forward as ``_old_forward`` and sets an instance
    ``forward`` that runs ``pre_forward`` / ``_old_forward`` / ``post_forward``. Only ``AlignDevicesHook`` (alone or
    in a ``SequentialHook`` of them) is understood: it loads offloaded weights, moves inputs to the execution
    device, and afterwards offloads again and moves the output back. Any other hook may change the values.
    """
    hook = module.__dict__.get("_hf_hook")
    old_forward = module.__dict__.get("_old_forward")
    forward = module.__dict__.get("forward")
    if hook is None or old_forward is None or forward is None:
        return None
    try:
        from accelerate.hooks import AlignDevicesHook, SequentialHook
    except ImportError:
        return None
    parts = hook.hooks if type(hook) is SequentialHook else (hook,)
    if not parts or any(type(part) is not AlignDevicesHook for part in parts):
        return None
    if getattr(hook, "no_grad", False) or any(getattr(part, "no_grad", False) for part in parts):
        return None
    # The wrapped forward must be the class's own, bound to this module; the instance forward accelerate's wrapper.
    if getattr(old_forward, "__func__", None) is not type(module).forward or old_forward.__self__ is not module:
        return None
    wrapper = getattr(forward, "func", None)
    if getattr(wrapper, "__module__", None) != "accelerate.hooks" or getattr(forward, "args", None) != (module,):
        return None
    return hook


@dataclass(frozen=True)
class _Way:
    """How a module can be entered without calling it: the refusal, or the hook / engine to honour."""

    refusal: str | None = None
    hook: Any | None = None
    engine_hooks: bool = False
    shard: VocabShard | str | None = None
    fsdp_unsharded: frozenset[int] = frozenset()  # parameters FSDP2 all-gathers on entering the module
    layout: _engines.LayoutHooks | None = None  # a tensor-parallel layout to leave out when entering (2-D)


def _way_in(module: nn.Module, unsharded: frozenset[int] = frozenset()) -> _Way:
    """Why calling the prefix / the fused linear instead of ``module(...)`` would skip something (``refusal``), or
    what the caller must apply instead: accelerate's alignment hook, FSDP2's hooks, or a tensor-parallel shard.
    ``unsharded``: parameters an FSDP2 unit entered above will have all-gathered by the time this module runs."""
    if type(module).__call__ is not nn.Module.__call__:
        return _Way("custom-call")
    if global_hooks():
        return _Way("global-module-hooks")
    state = _engines.fsdp_state(module)
    if state is not None:
        plain, still_dtensor = _engines.fsdp_managed(state)
        if isinstance(module, nn.Linear) and id(module.weight) in still_dtensor:
            return _Way("tensor-parallel-layout")
        return _Way(engine_hooks=True, fsdp_unsharded=plain)
    if _engines.base_class(module) is nn.Linear:
        over_tp = _engines.fsdp_over_tensor_parallel(module)
        if over_tp is not None:
            return _Way(engine_hooks=True, shard=over_tp.shard, layout=over_tp.layout)
    if _engines.deepspeed_zero3_hooks(module):
        return _Way(engine_hooks=True)
    if type(module) is nn.Linear and _is_dtensor(module.weight) and id(module.weight) not in unsharded:
        shard = _engines.tensor_parallel_head(module)
        return _Way("tensor-parallel-layout") if shard is None else _Way(shard=shard)
    if local_hooks(module):
        return _Way("hooked-head")
    if "forward" in module.__dict__:
        hook = accelerate_hook(module)
        if hook is None:
            return _Way("hooked-head" if "_hf_hook" in module.__dict__ else "instance-forward")
        return _Way(hook=hook)
    return _Way()


def explain_head(head: Any) -> HeadPlan | str:
    """The exact ``linear(transform(x))`` form of ``head(x)``, or the reason (a short code) there is none.

    A plain ``nn.Linear`` (exactly that type: subclasses and PEFT/quantised wrappers may compute something else)
    is its own plan. A composite head must be a chain of modules whose forwards the splitter understands, ending
    in an ``nn.Linear``. PEFT's ``modules_to_save`` and trainable-tokens wrappers are followed to the module or
    merged weight their forward uses (``logitless._peft``); an FSDP1 wrapper to the module it wraps, which the
    wrapper's own call then runs (``_engines.call_inside``). Every module entered is called through
    ``nn.Module.__call__`` with no hooks (local or global) and no instance ``forward``, except accelerate's
    device-alignment hook, which the plan applies.
    """
    if not isinstance(head, nn.Module):
        return "not-a-module"
    entries: list[_Entry] = []
    module: nn.Module = head
    unsharded: frozenset[int] = frozenset()
    low_rank = None
    for _ in range(_MAX_DEPTH + 1):
        way = _way_in(module, unsharded)
        if way.refusal is not None:
            return way.refusal
        if low_rank is not None and (way != _Way() or _engines.base_class(module) is not nn.Linear):
            # The low-rank term is formed from the linear's input: nothing may stand between the adapter and it.
            return "peft-lora-layout"
        unsharded |= way.fsdp_unsharded
        cls = _engines.base_class(module)
        if cls is nn.Linear:
            if not _plain_parameters(module):
                return "weight-subclass"
            entries.append(_Entry(module, way.hook, None, way.engine_hooks, layout=way.layout))
            shard = way.shard if isinstance(way.shard, _engines.VocabShard) else None
            return HeadPlan(  # type: ignore[arg-type]
                entries=tuple(entries), linear=module, shard=shard, low_rank=low_rank
            )
        if way.shard is not None:
            return "tensor-parallel-layout"
        inner = _engines.fsdp1_wrapped(module)
        if inner is not None:
            entries.append(_Entry(module, None, None, wraps=inner))
            module = inner
            continue
        from logitless import _peft

        peft = _peft.route(module, cls)
        if isinstance(peft, str):
            return peft
        if peft is not None:
            entries.append(_Entry(module, way.hook, None, way.engine_hooks))
            if peft.child is None:
                # The base layer is read, not called: no hook, engine or layout may be managing its weight.
                linear: Any = peft.linear
                if _way_in(linear, unsharded) != _Way():
                    return "peft-tokens-layout"
                if not _plain_parameters(linear):
                    return "weight-subclass"
                return HeadPlan(entries=tuple(entries), linear=linear, merged_weight=peft.weight)
            module, low_rank = peft.child, peft.low_rank
            continue
        step = _step_for(cls)
        if step is None:
            return "linear-subclass" if isinstance(module, nn.Linear) else "wrapped-head"
        child = module._modules.get(step.final)
        if child is None or getattr(module, step.final, None) is not child:
            return "wrapped-head"
        entries.append(_Entry(module, way.hook, functools.partial(step.prefix, module), way.engine_hooks))
        module = child
    return "wrapped-head"


def resolve_head(head: Any) -> HeadPlan | None:
    """``explain_head`` without the reason."""
    plan = explain_head(head)
    return plan if isinstance(plan, HeadPlan) else None
