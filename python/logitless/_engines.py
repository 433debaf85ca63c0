"""Heads that distributed engines manage, recognised exactly or not at all.

The fused loss reads ``lm_head.weight`` instead of calling the head, which is exactly what these engines hook:

* **FSDP2** (``fully_shard``, alone or as a group such as transformers' norm + head): the module's forward pre-hook
  all-gathers the parameters, casts the inputs (``MixedPrecisionPolicy``) and arranges the post-backward
  reduce-scatter; its forward hook reshards and arranges the pre-backward all-gather. A head carrying only these
  hooks is *entered* through ``nn.Module.__call__`` with the fused computation standing in for its forward, so every
  one of them runs as for a stock call (what ``register_fsdp_forward_method`` does for a named method).
* **DeepSpeed ZeRO-3**: the same shape of hooks (gather the partitioned parameters before the forward, release
  them after it, and autograd functions on the inputs and outputs for the backward fetch and release); the
  gradient reaches the partitioned parameter through its own accumulation hook, as for a stock call. Entered the
  same way, so a parameter is gathered only when DeepSpeed would gather it.
* **FSDP1** (``FullyShardedDataParallel``, accelerate's default FSDP): a head wrapped in its own unit is a wrapper
  module whose forward unshards the flat parameter, calls the wrapped module, reshards and registers the
  pre-backward unshard on the output. The wrapper is called as stock calls it, with the fused computation standing
  in for the wrapped module's forward. (A head inside another unit is a plain module whose parameters that unit's
  forward has unsharded.)
* **Tensor parallel** (torch's ``ColwiseParallel`` or transformers' ``colwise*`` styles, replicated input): the
  head's weight is a ``DTensor`` sharded over the vocabulary. Its hooks only re-lay-out the input and the logits,
  so the loss over the whole vocabulary is computed by ``logitless.vocab_parallel`` from the local shard.
* **FSDP2 over tensor parallel** (2-D: ``fully_shard`` on a data-parallel mesh of a head laid out colwise on a
  tensor-parallel one, as transformers' ``DistributedConfig(tp_size, fsdp_size)`` builds it): entered through
  FSDP's hooks with the layout's hooks left out; inside, the all-gathered weight is the tensor-parallel shard, and
  the loss is the vocabulary-parallel one.

Anything else on a head (another hook, another placement) is not recognised and keeps the stock path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "FsdpOverTensorParallel", "LayoutHooks", "VocabShard", "base_class", "call_inside", "call_through",
    "deepspeed_zero3_hooks", "fsdp1_wrapped", "fsdp_managed", "fsdp_over_tensor_parallel", "fsdp_state",
    "tensor_parallel_head",
]

# functools.wraps chains (FSDP's group hooks wrap the state's bound methods, dynamo's disable wraps again).
_MAX_WRAPS = 4
# What fully_shard's dynamic ``FSDP<cls>`` class defines itself: nothing that changes the forward.
_FSDP_CLASS_ATTRS = {"__module__", "__doc__", "__qualname__", "__deepcopy__"}


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows ``[start, start + rows)`` of a ``total``-row head, and the group holding the others."""

    group: Any  # torch.distributed.ProcessGroup
    start: int
    total: int


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def base_class(module: nn.Module) -> type:
    """The class the module had before ``fully_shard`` made it an ``FSDP<cls>`` (itself otherwise)."""
    cls = type(module)
    fsdp = _fsdp_module_type()
    if fsdp is not None and isinstance(module, fsdp):
        bases = cls.__bases__
        # transformers' PreTrainedModel.__init_subclass__ gives every subclass, FSDP's included, its config class.
        extra = {k: v for k, v in cls.__dict__.items() if k not in _FSDP_CLASS_ATTRS}
        inherited = len(bases) == 2 and all(
            k == "config_class" and v is getattr(bases[1], k, None) for k, v in extra.items()
        )
        if len(bases) == 2 and bases[0] is fsdp and inherited:
            return bases[1]
    return cls


def _closure_var(fn: Any, name: str) -> Any:
    """The value ``fn`` closes over as ``name`` (None if it does not): read straight from its cells, since this
    runs on every labelled forward (``inspect.getclosurevars`` also resolves every global the code names)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or cells is None or name not in code.co_freevars:
        return None
    try:
        return cells[code.co_freevars.index(name)].cell_contents
    except ValueError:  # an empty cell
        return None


def _owner(hook: Any) -> Any:
    for _ in range(_MAX_WRAPS + 1):
        owner = getattr(hook, "__self__", None)
        if owner is not None:
            return owner
        hook = getattr(hook, "__wrapped__", None)
        if hook is None:
            return None
    return None


def _fsdp_state_and_others(module: nn.Module) -> tuple[Any, list[tuple[dict, Any]]] | None:
    """The module's FSDP2 state and its forward (pre-)hooks that are not that state's, as ``(dict, key)`` pairs;
    None when it is not a ``fully_shard``-ed module, has backward hooks, or FSDP casts its output."""
    fsdp = _fsdp_module_type()
    if fsdp is None or not isinstance(module, fsdp) or base_class(module) is type(module):
        return None
    try:
        state = module._get_fsdp_state()
    except (AttributeError, AssertionError):
        return None
    if module._backward_hooks or getattr(module, "_backward_pre_hooks", None):
        return None
    if getattr(getattr(state, "_mp_policy", None), "output_dtype", None) is not None:
        return None
    owned = 0
    others: list[tuple[dict, Any]] = []
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key, hook in hooks.items():
            if _owner(hook) is state:
                owned += 1
            else:
                others.append((hooks, key))
    return (state, others) if owned else None


def fsdp_state(module: nn.Module) -> Any | None:
    """The module's FSDP2 state when FSDP's own forward hooks are the only hooks on it, else None.

    Refused: backward hooks, any other forward hook, an instance ``forward``, and an ``output_dtype`` cast (FSDP would
    cast the loss where stock casts the logits)."""
    found = _fsdp_state_and_others(module)
    if found is None or found[1] or "forward" in module.__dict__:
        return None
    return found[0]


def _fsdp_params(state: Any) -> list[Any]:
    """Every ``FSDPParam`` of an FSDP2 state's parameter groups."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return [p for group in groups for p in getattr(group, "fsdp_params", ())]


def fsdp_managed(state: Any) -> tuple[frozenset[int], frozenset[int]]:
    """The ids of the sharded parameters an FSDP2 state all-gathers before its module's forward, split in two: those
    that are then plain tensors (inside that forward a sub-module sees them unsharded, so a ``DTensor`` weight seen
    before entering is FSDP's shard, not a tensor-parallel layout), and those that stay ``DTensor``s (FSDP over a
    tensor-parallel parameter: 2-D parallelism, which ``fsdp_over_tensor_parallel`` recognises on a head)."""
    params = _fsdp_params(state)
    plain = frozenset(id(p.sharded_param) for p in params if not getattr(p, "is_dtensor", True))
    return plain, frozenset(id(p.sharded_param) for p in params) - plain


_ZERO3_MODULE = "deepspeed.runtime.zero.parameter_offload"
_ZERO3_QUALNAME = "DeepSpeedZeRoOffload._register_deepspeed_module.<locals>."
_ZERO3_HOOKS = {
    "_pre_forward_module_hook",
    "_post_forward_module_hook",
    "_pre_backward_module_hook",
    "_post_backward_module_hook",
}


def _zero3_hook_name(hook: Any) -> str | None:
    for _ in range(_MAX_WRAPS + 1):
        if getattr(hook, "__module__", None) == _ZERO3_MODULE:
            qualname = getattr(hook, "__qualname__", "")
            name = qualname.removeprefix(_ZERO3_QUALNAME)
            return name if name != qualname and name in _ZERO3_HOOKS else None
        # functools.wraps wrappers expose __wrapped__; DeepSpeed's nvtx wrapper keeps the function as ``func``.
        inner = getattr(hook, "__wrapped__", None)
        if inner is None and getattr(hook, "__module__", None) == "deepspeed.utils.nvtx":
            inner = _closure_var(hook, "func")
        if inner is None:
            return None
        hook = inner
    return None


def deepspeed_zero3_hooks(module: nn.Module) -> bool:
    """True when the module's hooks are exactly the four ZeRO-3 registers on every module it manages."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    names = [_zero3_hook_name(h) for h in hooks]
    if sorted(n or "" for n in names) != sorted(_ZERO3_HOOKS):
        return False
    return not (module._backward_hooks or getattr(module, "_backward_pre_hooks", None) or "forward" in module.__dict__)


@dataclass(frozen=True)
class LayoutHooks:
    """A tensor-parallel layout on a module that FSDP2 also manages: the hooks that re-lay-out its input and
    logits (torch's ``ColwiseParallel``, as ``(hook dict, key)`` pairs), skipped when the fused loss stands in for
    its forward, which is computed from the local vocabulary shard instead. transformers' colwise ``tp_forward`` is
    an instance ``forward``, which ``call_through`` always stands in for: no hooks then."""

    hooks: tuple[tuple[dict, Any], ...] = ()


def call_through(module: nn.Module, forward: Any, x: torch.Tensor, layout: LayoutHooks | None = None) -> Any:
    """``module(x)`` with every hook the module has, but ``forward`` computing in place of its forward; with a
    ``layout``, its layout hooks (and instance forward) are left out of that one call and put back after it."""
    saved_forward = module.__dict__.get("forward")
    saved_dicts = [(d, list(d.items())) for d in {id(d): d for d, _ in layout.hooks}.values()] if layout else []
    for d, key in layout.hooks if layout else ():
        del d[key]
    module.__dict__["forward"] = forward
    try:
        return module(x)
    finally:
        if saved_forward is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = saved_forward
        for d, items in saved_dicts:
            # Rebuilt in the saved order: hooks run in insertion order.
            d.clear()
            d.update(items)


def fsdp1_wrapped(module: nn.Module) -> nn.Module | None:
    """The module an FSDP1 ``FullyShardedDataParallel`` wrapper holds, when ``module`` is exactly such a wrapper
    with no hooks or instance ``forward`` of its own, else None."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    if type(module) is not FullyShardedDataParallel or "forward" in module.__dict__:
        return None
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return None
    if getattr(module, "_backward_pre_hooks", None):
        return None
    inner = module._modules.get("_fsdp_wrapped_module")
    return inner if isinstance(inner, nn.Module) else None


def call_inside(wrapper: nn.Module, inner: nn.Module, forward: Any, x: torch.Tensor) -> Any:
    """``wrapper(x)`` as stock calls it (FSDP1's unshard, reshard and backward hooks), with ``forward`` computing in
    place of the wrapped module ``inner``'s forward."""
    inner.__dict__["forward"] = forward
    try:
        return wrapper(x)
    finally:
        del inner.__dict__["forward"]


# ---------------------------------------------------------------------------------------------------------------
# Tensor parallel
# ---------------------------------------------------------------------------------------------------------------


def _replicate(placement: Any) -> bool:
    from torch.distributed.tensor import Replicate

    return isinstance(placement, Replicate)


def _is_vocab_shard(placement: Any) -> bool:
    from torch.distributed.tensor import Shard

    return isinstance(placement, Shard) and placement.dim == 0


def _torch_colwise_hooks(module: nn.Module) -> bool:
    """The two hooks of ``parallelize_module(..., ColwiseParallel(input_layouts=Replicate()))``, and nothing else."""
    return _torch_colwise_pair(list(module._forward_pre_hooks.values()), list(module._forward_hooks.values()))


def _torch_colwise_pair(pre: list[Any], post: list[Any]) -> bool:
    if len(pre) != 1 or len(post) != 1:
        return False
    fns = []
    for hook, name in ((pre[0], "input_fn"), (post[0], "output_fn")):
        if getattr(hook, "__module__", None) != "torch.distributed.tensor._api":
            return False
        fn = _closure_var(hook, name)
        if not isinstance(fn, functools.partial):
            return False
        fns.append(fn)
    inp, out = fns
    if getattr(inp.func, "__qualname__", "") != "ColwiseParallel._prepare_input_fn":
        return False
    if getattr(out.func, "__qualname__", "") != "ColwiseParallel._prepare_output_fn":
        return False
    layouts = inp.args[0] if inp.args else None
    return isinstance(layouts, tuple) and len(layouts) == 1 and _replicate(layouts[0])


def _transformers_colwise_forward(module: nn.Module) -> bool:
    """transformers' ``ColwiseParallel.install_forward`` (input replicated), wrapping the class's own forward."""
    forward = module.__dict__.get("forward")
    if getattr(forward, "__name__", None) != "tp_forward" or not str(getattr(forward, "__module__", "")).startswith(
        "transformers."
    ):
        return False
    style, original = _closure_var(forward, "self"), _closure_var(forward, "original_forward")
    if type(style).__name__ != "ColwiseParallel" or not type(style).__module__.startswith("transformers."):
        return False
    if not _replicate(getattr(style, "input_layouts", None)):
        return False
    if getattr(module, "_hf_quantized_needs_local_tp", False):  # a quantised local kernel, not a plain F.linear
        return False
    bound_self = getattr(original, "__self__", None)
    return bound_self is module and getattr(original, "__func__", None) is type(module).forward


def tensor_parallel_head(module: nn.Module) -> VocabShard | str | None:
    """For an ``nn.Linear`` whose weight is a ``DTensor``: its vocabulary shard (``Shard(0)`` on a 1-D mesh under a
    recognised colwise style), ``"local"`` for a replicated weight with no hooks, or None (not understood)."""
    from torch.distributed.tensor import DTensor

    weight = module.weight
    if not isinstance(weight, DTensor) or weight.device_mesh.ndim != 1 or len(weight.placements) != 1:
        return None
    bias = module.bias
    if bias is not None and (not isinstance(bias, DTensor) or bias.placements != weight.placements):
        return None
    if module._backward_hooks or getattr(module, "_backward_pre_hooks", None):
        return None
    placement = weight.placements[0]
    hooked = bool(module._forward_pre_hooks or module._forward_hooks or "forward" in module.__dict__)
    if _replicate(placement):
        return None if hooked else "local"
    if not _is_vocab_shard(placement):
        return None
    if not (_torch_colwise_hooks(module) or (not module._forward_pre_hooks and not module._forward_hooks
                                             and _transformers_colwise_forward(module))):  # fmt: skip
        return None
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # a private helper: without it the shard's offset is unknown, so the stock path runs
        return None
    mesh = weight.device_mesh
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
    return VocabShard(group=mesh.get_group(), start=int(offset[0]), total=int(weight.shape[0]))


def _vocab_shard_of(mesh: Any, placements: Any, shape: Any) -> VocabShard | None:
    """This rank's rows of a weight laid out as ``placements`` on ``mesh``: sharded over the vocabulary (dim 0) on
    exactly one mesh dimension, replicated on every other; None for any other layout."""
    from torch.distributed.tensor import Shard

    placements = tuple(placements)
    sharded = [i for i, p in enumerate(placements) if type(p) is Shard and p.dim == 0]
    if len(sharded) != 1 or not all(_replicate(p) for i, p in enumerate(placements) if i != sharded[0]):
        return None
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # a private helper: without it the shard's offset is unknown, so the stock path runs
        return None
    _, offset = compute_local_shape_and_global_offset(tuple(shape), mesh, placements)
    return VocabShard(group=mesh.get_group(sharded[0]), start=int(offset[0]), total=int(shape[0]))


def _fsdp_param(state: Any, tensor: Any) -> Any | None:
    """The state's ``FSDPParam`` whose sharded or (while all-gathered) unsharded parameter is ``tensor``."""
    for param in _fsdp_params(state):
        if param.sharded_param is tensor or getattr(param, "_unsharded_param", None) is tensor:
            return param
    return None


def _unsharded_layout(state: Any, tensor: Any) -> tuple[Any, Any] | None:
    """``(mesh, placements)`` of an FSDP2-managed tensor-parallel parameter once all-gathered over the data-parallel
    dimension: its tensor-parallel layout, which FSDP keeps (``_unsharded_dtensor_spec``; ``_tp_spec`` in older
    torch releases). None when FSDP does not manage it as a ``DTensor``."""
    param = _fsdp_param(state, tensor)
    if param is None or not getattr(param, "is_dtensor", False):
        return None
    spec = getattr(param, "_unsharded_dtensor_spec", None) or getattr(param, "_tp_spec", None)
    if spec is None:
        return None
    return spec.mesh, spec.placements


@dataclass(frozen=True)
class FsdpOverTensorParallel:
    """A head FSDP2 shards over the data-parallel dimension whose weight is also split over the vocabulary on a
    tensor-parallel dimension (2-D parallelism): entered through FSDP's hooks, its layout hooks left out."""

    shard: VocabShard
    layout: LayoutHooks


def fsdp_over_tensor_parallel(module: nn.Module) -> FsdpOverTensorParallel | None:
    """For a ``fully_shard``-ed ``nn.Linear`` whose hooks are FSDP's plus exactly one recognised colwise layout
    (torch's ``ColwiseParallel`` hooks, or transformers' colwise ``tp_forward`` as transformers'
    ``DistributedConfig(tp_size=..., fsdp_size=...)`` builds it), with a weight (and bias) that FSDP all-gathers
    into a vocabulary shard: the shard and the layout to skip; else None."""
    found = _fsdp_state_and_others(module)
    if found is None:
        return None
    state, others = found
    if others:
        pre = [d[k] for d, k in others if d is module._forward_pre_hooks]
        post = [d[k] for d, k in others if d is module._forward_hooks]
        if "forward" in module.__dict__ or not _torch_colwise_pair(pre, post):
            return None
        layout = LayoutHooks(hooks=tuple(others))
    elif _transformers_colwise_forward(module):
        layout = LayoutHooks()
    else:
        return None
    weight_layout = _unsharded_layout(state, module.weight)
    if weight_layout is None:
        return None
    bias = module.bias
    if bias is not None and _unsharded_layout(state, bias) != weight_layout:
        return None
    shard = _vocab_shard_of(*weight_layout, module.weight.shape)
    return None if shard is None else FsdpOverTensorParallel(shard=shard, layout=layout)
