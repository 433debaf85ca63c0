"""The object rewritten forwards see as ``__logitless__`` (contract: docs/design.md, "Rewrite contract").

Every decision a rewritten forward makes at run time goes through this module (``_patching._RUNTIME_API``), so
that the generated code stays a plain branch and the policy (when to fuse, whether to keep logits) lives in one
reviewed place. Each decision is counted per model class (``_state.record``), with the reason when the stock path
is taken, so that ``audit()`` can tell "patched but never fused" from "fused". The state those decisions read
lives in ``_state``; the heads, epilogue modules, the patched classes' registry and the HF adapter are imported
only when a forward first asks, so that patching a modeling module imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from logitless import _state
from logitless._state import record, return_logits, stock_loss

if TYPE_CHECKING:
    import torch

__all__ = ["delegable", "fusable", "hf_loss", "mask_shifted_labels", "no_logits", "return_logits"]


def _stock_reason(model: Any, head: Any, epilogue_modules: tuple[Any, ...], vocab_sliced: bool = False) -> str | None:
    capture = _state.current_capture()
    reason = _state.mode_reason(model)
    if reason is not None:
        return reason
    try:
        loss_function = model.loss_function
    except AttributeError:
        return "no-loss-function"
    if loss_function is not stock_loss("ForCausalLM") and not (
        loss_function is stock_loss("ForMaskedLM") and _passes_loss_function(model)
    ):
        return "custom-loss"
    from logitless._heads import explain_head

    plan = explain_head(head)
    if isinstance(plan, str):
        return plan
    if capture is not None and plan.shard is not None:
        return "tensor-parallel-per-token"
    if plan.low_rank is not None:
        if capture is not None and not capture.loss_and_stats:
            return "peft-lora-per-token"
        if plan.linear.weight.requires_grad or (plan.linear.bias is not None and plan.linear.bias.requires_grad):
            # The op adds a low-rank term beside a frozen head only.
            return "peft-lora-trained-head"
    if vocab_sliced and plan.shard is not None:
        # The forward cuts the vocabulary back: the shards would need cutting too.
        return "tensor-parallel-layout"
    if epilogue_modules:
        from logitless._epilogue_modules import epilogue_keywords

        for module in epilogue_modules:
            keywords = epilogue_keywords(module)
            if isinstance(keywords, str):
                return keywords
    return None


def _passes_loss_function(model: Any) -> bool:
    """Whether the forward asking hands ``hf_loss`` its ``loss_function``: the rewriter's always do; a hand-written
    tier-1 forward (``register_canonical``) in ``model``'s classes may not, and ``hf_loss`` would then compute the
    causal loss."""
    from logitless import _registry

    return not any(_registry.runs_canonical(cls) for cls in type(model).__mro__)


def fusable(
    model: Any, head: Any, *epilogue_modules: Any, logits_terms_off: bool = True, vocab_sliced: bool = False
) -> bool:
    """True when the fused loss computes exactly what ``model.loss_function`` would on ``head``'s logits.

    ``PreTrainedModel.loss_function`` is a property: a user-assigned loss is stored in ``_loss_function`` and
    returned as is, otherwise ``LOSS_MAPPING[loss_type]`` is returned. Only the stock causal-LM loss object itself
    is fused, or ``ForMaskedLMLoss`` in a forward the rewriter made (it passes ``hf_loss`` the loss function);
    anything else (a custom loss, a wrapped loss, another loss type) keeps the original statements. The head must
    reduce exactly to an ``nn.Linear`` (``logitless._heads.explain_head``): hooked, wrapped or subclassed heads are
    never reduced to their ``.weight``. An epilogue module called on the logits after the head
    (``epilogue_modules``) must be one whose effect the fused op reproduces (``logitless._epilogue_modules``). In
    eval mode the stock path runs (real logits) unless
    ``install(fuse_eval=True)``. ``logits_terms_off``: the guards of the forward's auxiliary loss terms that read
    the logits (a z-loss) are all off; when one is on, the stock statements compute the loss (``logits-term``).
    ``vocab_sliced``: the forward cuts a padded vocabulary back (``logits[..., :end]``), which a vocabulary-sharded
    head does not fuse.
    Every answer is counted for ``audit()``, with its reason when False.
    """
    reason = _stock_reason(model, head, epilogue_modules, vocab_sliced)
    if reason is None and not logits_terms_off:
        reason = "logits-term"
    record(model, reason)
    capture = _state.current_capture()
    if capture is not None and reason is not None:
        capture.refused = reason
    return reason is None


def delegable(model: Any, sub: Any, vocab_size: Any, as_dict: Any = True, kind: str = "cross_entropy") -> bool:
    """True when a wrapper may hand its loss to its sub-model ``sub``: given the labels, ``sub`` computes exactly
    the wrapper's loss of its logits (its own fused forward then forms none). ``kind`` is that loss:
    ``"cross_entropy"``, an encoder-decoder's ``CrossEntropyLoss()`` of the decoder's logits, or ``"causal_lm"``, a
    multimodal wrapper's ``self.loss_function`` of its language model's logits with the ``**kwargs`` it also passes
    that model.

    That holds when ``sub`` runs, unchanged, a forward of a class logitless rewrote whose loss, given labels, is that
    kind and whose labels are read nowhere else (``Rewrite::delegate_target``), with no hooks but the engines'
    (another hook would see outputs without logits). ``vocab_size``: what the wrapper's loss reshapes the logits to,
    which must be the sub-model's output size (else stock raises, and so does the stock path taken here). For
    ``"causal_lm"`` the two models' ``loss_function`` must both be transformers' causal-LM loss (a user's loss on
    either would make the two differ) and the vocabulary size the sub-model's own loss reads must be ``vocab_size``
    too. ``as_dict``: the wrapper's ``return_dict``; its tuple outputs would carry the sub-model's loss as an extra
    first element, so they keep the stock path. Counted for ``audit()`` on the wrapper's class; the sub-model counts
    its own forward as usual.
    """
    reason = _delegation_reason(model, sub, vocab_size, kind)
    if reason is None and not as_dict:
        reason = "delegate-tuple-outputs"
    record(model, reason)
    capture = _state.current_capture()
    if capture is not None and reason is not None:
        capture.refused = reason  # counted here: TRL's integration does not count the wrapper again
    return reason is None


def _delegation_reason(model: Any, sub: Any, vocab_size: Any, kind: str) -> str | None:
    reason = _state.mode_reason(model)
    if reason is not None:
        return reason
    import torch

    from logitless import _registry
    from logitless._heads import _way_in

    if not isinstance(sub, torch.nn.Module):
        return "delegate-not-exact"
    # The sub-model is called as stock calls it, so its hooks all run; only hooks that may observe or change what it
    # returns (the logits it no longer forms) are a problem. Engines' hooks (FSDP2, ZeRO-3, accelerate's device
    # alignment) only gather, move and free parameters; an instance forward other than accelerate's is refused too.
    way = _way_in(sub)
    if way.refusal is not None or way.shard is not None:
        return "delegate-hooked"
    owner = next((cls for cls in type(sub).__mro__ if "forward" in cls.__dict__), None)
    target = _registry.delegate_target(owner) if owner is not None else None
    if target is None or target[0] != kind:
        return "delegate-not-exact"
    head = sub.get_output_embeddings() if hasattr(sub, "get_output_embeddings") else None
    if getattr(head, "out_features", None) != vocab_size:
        return "delegate-not-exact"
    if kind == "causal_lm":
        causal = stock_loss("ForCausalLM")
        if _loss_function(model) is not causal or _loss_function(sub) is not causal:
            return "delegate-not-exact"
        if target[1] is None or _self_path(sub, target[1]) != vocab_size:
            return "delegate-not-exact"
    return None


def _loss_function(model: Any) -> Any:
    try:
        return model.loss_function
    except AttributeError:
        return None


def _self_path(obj: Any, path: str) -> Any:
    """The value of ``self.a.b`` (``path``) on ``obj``, or None where an attribute is missing."""
    for name in path.removeprefix("self.").split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def mask_shifted_labels(labels: torch.Tensor, mask: torch.Tensor | None, crop: str) -> torch.Tensor:
    """The labels of a masked causal shift (Qwen2-Audio, Granite Speech): stock keeps the shifted positions where
    ``mask[..., 1:]`` (``crop="skip-first"``) or the mask's last ``T - 1`` columns (``"last"``) are non-zero, which is
    the causal loss on these labels with the others ignored (-100). No mask: the labels unchanged."""
    if mask is None:
        return labels
    shifted = mask[..., 1:] if crop == "skip-first" else mask[:, -(labels.shape[-1] - 1) :]
    if shifted.shape != labels[..., 1:].shape:
        # Stock's boolean selection fails the same way.
        raise IndexError(
            f"attention_mask: expected the shifted mask to have the shifted labels' shape "
            f"{tuple(labels[..., 1:].shape)}, got {tuple(shifted.shape)}"
        )
    masked = labels.clone()
    masked[..., 1:] = labels[..., 1:].masked_fill(shifted.to(labels.device) == 0, -100)
    return masked


def no_logits(hidden: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """The empty stand-in for the logits the fused path never computes: ``[*hidden.shape[:-1], 0]``."""
    del head  # part of the contract so a future head-dependent dtype can be honoured without a rewrite change
    return hidden.new_empty((*hidden.shape[:-1], 0))


def __getattr__(name: str) -> Any:
    # hf_loss is re-exported lazily so that patching a modeling module does not import the op (and _core's
    # kernel) until a fused forward actually runs.
    if name == "hf_loss":
        from logitless.hf import hf_loss

        globals()["hf_loss"] = hf_loss
        return hf_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
