"""PEFT's head wrappers, reduced exactly to the module or weight their forward uses.

Two PEFT features put a wrapper where ``lm_head`` was, and both leave the logits a plain ``F.linear``:

- ``modules_to_save=["lm_head"]`` (``ModulesToSaveWrapper``): the forward calls one module, the active adapter's
  trainable copy or, with adapters disabled, the original head;
- ``trainable_token_indices`` on a model with tied embeddings (``TrainableTokensWrapper`` around a
  ``TrainableTokensLayer``): the forward is ``F.linear(x, W)`` with ``W`` the base weight whose trainable rows are
  replaced by the adapter's deltas (``get_merged_weights``), or the base layer itself when disabled or merged.

A LoRA adapter on the head (``target_modules=[..., "lm_head"]``, PEFT's ``lora.Linear``) adds
``lora_B(lora_A(dropout(x))) * scaling`` per active adapter to the base layer's output: the route is the base layer
plus that low-rank term, ``a · bᵀ`` with ``a`` the adapters' ``scaling * lora_A(dropout(x))`` side by side (computed
here by calling those modules as PEFT's forward does) and ``b`` their ``lora_B`` weights, which the fused op adds to
its logits (``linear_cross_entropy(low_rank=...)``).

Which one runs is decided by a few lines of PEFT's code. Rather than trusting that those lines never change, the
route is taken only when the source of every method and property it depends on hashes to what was reviewed here
(``_REVIEWED``); other PEFT code, a subclass or an instance override keeps the stock path (``peft-unverified``).
Other adapter layers (LoRA's variants such as DoRA, a LoRA bias, the other tuners) are not reduced
(``peft-layer``, ``peft-lora-variant``).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from logitless._source import analysable_source

__all__ = ["Route", "route"]

_MODULES_TO_SAVE = ("peft.utils.other", "ModulesToSaveWrapper")
_TOKENS_WRAPPER = ("peft.utils.other", "TrainableTokensWrapper")
_TOKENS_LAYER = ("peft.tuners.trainable_tokens.layer", "TrainableTokensLayer")
_LORA_LINEAR = ("peft.tuners.lora.layer", "Linear")

# The members whose code decides what each class's forward calls.
_WRAPPER_MEMBERS = (
    "forward", "_forward_wrapped", "_forward_wrapped_passthrough", "disable_adapters", "active_adapters",
    "active_adapter",
)  # fmt: skip
_MEMBERS: dict[tuple[str, str], tuple[str, ...]] = {
    _MODULES_TO_SAVE: _WRAPPER_MEMBERS,
    _TOKENS_WRAPPER: _WRAPPER_MEMBERS,
    _TOKENS_LAYER: (
        "forward", "forward_adapters", "get_merged_weights", "_check_overlapping_tokens", "disable_adapters",
        "active_adapters", "active_adapter", "merged",
    ),
    _LORA_LINEAR: (
        "forward", "_check_forward_args", "_cast_input_dtype", "disable_adapters", "active_adapters", "active_adapter",
        "merged",
    ),
}  # fmt: skip

# sha256 of those members' sources (``_fingerprint``), as reviewed in peft 0.21.2. A PEFT release that changes any
# of them keeps the stock path until its code is read and its hash added here (tests/test_peft.py names it).
_REVIEWED: dict[tuple[str, str], frozenset[str]] = {
    _MODULES_TO_SAVE: frozenset({"37cc48da0e82145356fbd2276f05ac583ef5a53698f5bebc46961bb3d3a0ee9e"}),
    _TOKENS_WRAPPER: frozenset({"4fd66441b57d42a03755f5b749620b6c2d3cdd2170694f2053acdf49af0d6f58"}),
    _TOKENS_LAYER: frozenset({"2847650d6715c894f09b873ad2cc4ea0ee346c4203963ef8e6a9f32028fe0cc0"}),
    _LORA_LINEAR: frozenset({"c7c2320206f6d17fa28070215716c5bbdeecd4b88ac339a87207f38d1e5bca11"}),
}

# Keyed by the member objects themselves (as the composite-head steps are keyed by the forward function), so a
# method patched onto PEFT's class after a first call is hashed again rather than trusted from the cache.
_fingerprints: dict[tuple[Any, ...], str | None] = {}


@dataclass(frozen=True)
class Route:
    """What a PEFT wrapper's forward does with its input: call ``child``, or compute ``F.linear(x, weight())``
    with ``linear`` the layer whose (merged) weight that is."""

    child: nn.Module | None = None
    linear: nn.Linear | None = None
    weight: Callable[[], torch.Tensor] | None = None
    # With ``child``: a term the wrapper adds to the child's output, ``a · bᵀ`` from its input (``low_rank(x)``).
    low_rank: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


def _key(cls: type) -> tuple[str, str]:
    return (cls.__module__, cls.__qualname__)


def _fingerprint(cls: type) -> str | None:
    """The hash of the sources of ``cls``'s deciding members as ``cls`` resolves them, or None if one of them is
    not plain analysable code (a wrapped or closure function, a C function)."""
    names = _MEMBERS[_key(cls)]
    members = tuple(inspect.getattr_static(cls, name, None) for name in names)
    if members not in _fingerprints:
        digest = hashlib.sha256()
        for name, member in zip(names, members):
            function = member.fget if isinstance(member, property) else member
            source = analysable_source(function)
            if source is None:
                _fingerprints[members] = None
                break
            digest.update(f"{name}\0{source}\0".encode())
        else:
            _fingerprints[members] = digest.hexdigest()
    return _fingerprints[members]


def _verified(module: nn.Module, cls: type) -> bool:
    if any(name in module.__dict__ for name in _MEMBERS[_key(cls)]):
        return False
    fingerprint = _fingerprint(cls)
    return fingerprint is not None and fingerprint in _REVIEWED[_key(cls)]


def _tokens_layer(layer: Any) -> Route | str:
    active = layer.active_adapters
    base = layer.base_layer
    if layer.disable_adapters or not active:
        # A merged layer's forward unmerges here, writing the base weight: a side effect the fused path would skip.
        return "peft-merged" if layer.merged else Route(child=base)
    if layer.merged:
        return Route(child=base)
    # F.linear(x, W) reads the base layer's weight without calling it: it must be a bias-free nn.Linear (PEFT drops
    # a bias here; a tied head has none). explain_head also requires that nothing (hook, engine, layout) manages it.
    if type(base) is not nn.Linear or base.bias is not None:
        return "peft-tokens-layout"

    def weight() -> torch.Tensor:
        layer._check_overlapping_tokens(active)
        merged: torch.Tensor = layer.get_merged_weights(active)
        return merged

    return Route(linear=base, weight=weight)


def _lora_linear(layer: Any) -> Route | str:
    base = layer.base_layer
    if layer.disable_adapters:
        # As for the token layer: a merged layer's forward unmerges here.
        return "peft-merged" if layer.merged else Route(child=base)
    if layer.merged:
        return Route(child=base)
    names = [name for name in layer.active_adapters if name in layer.lora_A.keys()]
    if not names:
        return Route(child=base)
    for name in names:
        if name in layer.lora_variant:  # DoRA, aLoRA, ...: another forward
            return "peft-lora-variant"
        lora_b = layer.lora_B[name]
        # lora_B's weight is read, not called: it must be a bias-free nn.Linear (lora_bias=False) nothing manages.
        if type(lora_b) is not nn.Linear or lora_b.bias is not None:
            return "peft-lora-variant"
        if type(lora_b.weight) not in (torch.Tensor, nn.Parameter) or not _unmanaged(lora_b):
            return "peft-lora-layout"

    def low_rank(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = [], []
        for name in names:
            lora_a = layer.lora_A[name]
            x = layer._cast_input_dtype(x, lora_a.weight.dtype)
            # scaling · A(dropout(x)) against B: stock's B(A(dropout(x))) · scaling, the scaling moved before B.
            a.append(lora_a(layer.lora_dropout[name](x)) * layer.scaling[name])
            b.append(layer.lora_B[name].weight)
        return torch.cat(a, dim=-1), torch.cat(b, dim=1)

    return Route(child=base, low_rank=low_rank)


def _unmanaged(module: nn.Module) -> bool:
    from logitless._heads import _Way, _way_in

    return _way_in(module) == _Way()


def route(module: nn.Module, cls: type) -> Route | str | None:
    """What PEFT's wrapper ``module`` (of class ``cls``, FSDP's wrapping class removed) computes, a refusal
    reason, or None when ``module`` is not PEFT's."""
    if not cls.__module__.startswith("peft."):
        return None
    key = _key(cls)
    if key not in _MEMBERS:
        return "peft-layer"
    if not _verified(module, cls):
        return "peft-unverified"
    wrapper: Any = module
    if key == _MODULES_TO_SAVE:
        adapters = wrapper.active_adapters
        if wrapper.disable_adapters or any(a not in wrapper._adapters for a in adapters) or not adapters:
            return Route(child=wrapper.original_module)
        return Route(child=wrapper.modules_to_save[adapters[0]])
    if key == _TOKENS_WRAPPER:
        # Enabled or not, with adapters or without, this wrapper calls its token layer.
        return Route(child=wrapper.token_adapter)
    if key == _LORA_LINEAR:
        return _lora_linear(wrapper)
    return _tokens_layer(wrapper)
