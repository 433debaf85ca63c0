"""``hf_loss``: transformers' ``self.loss_function(logits, labels, vocab_size, **kwargs)`` convention onto the op.

Rewritten model forwards call this instead of ``self.lm_head`` + ``self.loss_function`` (docs/design.md, "Rewrite
contract"). It takes the head module rather than logits (an ``nn.Linear``, or a composite head that
``logitless._heads`` reduces to one; any other head raises ``TypeError``, never a guess), and mirrors ``ForCausalLMLoss``: ``num_items_in_batch``
(int or tensor on any device), a pre-shifted ``shift_labels``, ``ignore_index``; any other keyword is ignored, as
``ForCausalLMLoss`` ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from logitless import _state
from logitless._heads import HeadPlan, explain_head
from logitless.ops import linear_cross_entropy

__all__ = ["hf_loss"]


def hf_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor | None,
    vocab_size: int | None = None,
    *,
    logits_bias: torch.Tensor | None = None,
    logit_scale_multiply: float | None = None,
    logit_scale_divide: float | None = None,
    logit_softcapping: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    epilogue_module: torch.nn.Module | None = None,
    loss_function: Any = None,
    vocab_slice_end: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The causal-LM loss of ``epilogue(lm_head(hidden))`` against ``labels``, without the logits.

    ``loss_function``: the model's ``self.loss_function``, which the stock call would run (rewritten forwards pass
    it). transformers' ``ForCausalLMLoss`` or None: the causal loss above. ``ForMaskedLMLoss`` (T5Gemma's
    ``loss_type``): the same cross-entropy on the labels as given, unshifted (it ignores ``shift_labels``, as that
    loss does). Anything else raises ``TypeError``. TRL's per-token outputs (a capture) follow TRL's contract, shifted
    unless ``shift_labels`` is given, whatever the model's loss.
    Epilogue values of ``None`` mean "not set" (models read them from configs where they are often ``None``).
    ``epilogue_module``: a module the forward calls on the logits instead (``self.logit_softcap``), alone; its
    epilogue is read off it (``logitless._epilogue_modules``). ``vocab_slice_end``: the forward cuts a padded
    vocabulary back, ``logits[..., :vocab_slice_end]``, before any other epilogue step; the head's rows are cut
    the same way (Python's slice rules: ``None`` or an end past the vocabulary keeps every row).
    """
    del kwargs  # ForCausalLMLoss forwards extras to fixed_cross_entropy, which ignores them.
    loss_targets = _loss_targets(loss_function, labels, shift_labels)
    epilogue = _epilogue(epilogue_module, logits_bias, logit_scale_multiply, logit_scale_divide, logit_softcapping)
    plan = _fusable_head(lm_head)
    end = _checked_vocab(plan, vocab_slice_end, vocab_size)

    capture = _state.current_capture()
    if capture is not None and plan.shard is not None:
        raise TypeError(
            "lm_head: per-token outputs of a vocabulary-sharded (tensor-parallel) head are not computed fused; "
            "compute its logits instead"
        )
    if capture is not None and capture.divergence is not None:
        return _captured_divergence(hidden, plan, end, epilogue, capture)
    if capture is not None and capture.support is not None:
        return _captured_support(hidden, plan, end, epilogue, capture)
    if capture is not None and not capture.loss_and_stats:
        return _captured_per_token(hidden, plan, end, labels, shift_labels, ignore_index, num_items_in_batch,
                                   epilogue, capture)  # fmt: skip

    smoothing = _state.current_smoothing()

    def fused(x: torch.Tensor) -> torch.Tensor:
        # The weight is read here, after any offloading hook has brought it in (or FSDP2 has all-gathered it).
        weight, bias = _head_params(plan, end)
        epilogue_here = {**epilogue, "logits_bias": _on(epilogue["logits_bias"], x)}
        if plan.low_rank is not None:
            # (no head shard: explain_head takes a LoRA adapter's base layer only when nothing manages it)
            epilogue_here["low_rank"] = _low_rank(plan, x, end)
        if smoothing is not None:
            return _smoothed(x, weight, bias, plan, epilogue_here, smoothing, labels)
        if capture is not None:
            # The loss as below, and each position's entropy and top-1 from the same pass (no head shard here:
            # _runtime refuses a capture of a vocabulary-sharded head).
            loss, stats = linear_cross_entropy(
                x, weight, labels, bias=bias, shift_labels=loss_targets, ignore_index=ignore_index,
                num_items_in_batch=num_items_in_batch, return_token_stats=True, **epilogue_here,
            )  # fmt: skip
            targets = loss_targets if loss_targets is not None else _shifted(labels, ignore_index)
            capture.result = {
                "entropy": stats.entropy,
                "is_top1": stats.is_top1,
                "label_mask": targets.to(x.device) != ignore_index,
            }
            return loss
        if plan.shard is not None:
            from logitless.vocab_parallel import vocab_parallel_linear_cross_entropy

            return vocab_parallel_linear_cross_entropy(
                x, weight, labels, vocab_start=plan.shard.start, vocab_size=plan.shard.total, group=plan.shard.group,
                bias=bias, shift_labels=loss_targets, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                **epilogue_here,
            )  # fmt: skip
        return linear_cross_entropy(
            x, weight, labels, bias=bias, shift_labels=loss_targets, ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch, **epilogue_here,
        )  # fmt: skip

    loss = plan.apply(hidden, fused)
    if smoothing is not None:
        # Kept as the head's call returned it: engines (FSDP2, ZeRO-3) hook their backward gathers on that tensor.
        smoothing.loss = loss
        smoothing.fills += 1
        # A copy for the forward: it may add its own terms in place (Mixtral's `loss += aux`), which the Trainer's
        # smoothed loss does not have.
        return loss.clone()
    return loss


def _loss_targets(loss_function: Any, labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> Any:
    """The targets of the model's own loss: transformers' ``ForCausalLMLoss`` (or None) takes ``shift_labels``
    (None: the labels, shifted); ``ForMaskedLMLoss`` scores ``logits.view(-1, V)`` against ``labels.view(-1)``.
    Any other loss raises ``TypeError``."""
    if loss_function is None or loss_function is _state.stock_loss("ForCausalLM"):
        return shift_labels
    if loss_function is not _state.stock_loss("ForMaskedLM"):
        raise TypeError(
            f"loss_function: expected transformers' ForCausalLMLoss or ForMaskedLMLoss, got "
            f"{getattr(loss_function, '__qualname__', type(loss_function).__name__)}: compute its logits and "
            "call it instead"
        )
    return labels


def _epilogue(
    module: torch.nn.Module | None, logits_bias: torch.Tensor | None, multiply: float | None,
    divide: float | None, softcap: float | None,
) -> dict[str, Any]:  # fmt: skip
    """The op's epilogue keywords: as given, or read off the epilogue module the forward calls on the logits
    (``logitless._epilogue_modules``), which comes alone."""
    if module is not None:
        from logitless._epilogue_modules import epilogue_keywords

        if any(v is not None for v in (logits_bias, multiply, divide, softcap)):
            raise ValueError("epilogue_module: expected no other epilogue keyword beside it")
        resolved = epilogue_keywords(module)
        if isinstance(resolved, str):
            raise TypeError(
                f"epilogue_module: cannot fuse a {type(module).__module__}.{type(module).__qualname__} exactly "
                f"({resolved}): expected a module whose forward is a bias / multiply / divide / softcap of its "
                "input with constant attributes, called without hooks"
            )
        logits_bias = resolved.get("logits_bias")
        multiply = resolved.get("logit_scale_multiply")
        divide = resolved.get("logit_scale_divide")
        softcap = resolved.get("logit_softcapping")
    return {
        "logits_bias": _vocab_vector(logits_bias),
        "logit_scale_multiply": multiply,
        "logit_scale_divide": divide,
        "logit_softcapping": softcap,
    }


def _fusable_head(lm_head: torch.nn.Module) -> HeadPlan:
    plan = explain_head(lm_head)
    if not isinstance(plan, HeadPlan):
        # Reading .weight off a hooked, wrapped (PEFT, quantised) or subclassed head would drop what its call adds.
        raise TypeError(
            f"lm_head: cannot fuse a {type(lm_head).__module__}.{type(lm_head).__qualname__} exactly ({plan}): "
            "expected an nn.Linear, or a composite head ending in one, called without hooks other than "
            "accelerate's device alignment; compute its logits and the stock loss instead"
        )
    return plan


def _checked_vocab(plan: HeadPlan, vocab_slice_end: Any, vocab_size: int | None) -> int | None:
    """The end the forward cuts the vocabulary at (None: none), checked against the head and ``vocab_size``."""
    vocab = plan.shard.total if plan.shard is not None else plan.linear.out_features
    end = _slice_end(vocab_slice_end)
    if end is not None:
        kept = len(range(vocab)[:end])
        if plan.shard is not None and kept != vocab:
            raise TypeError(
                "vocab_slice_end: a vocabulary-sharded (tensor-parallel) head is not cut back fused; compute its "
                "logits instead"
            )
        vocab = kept
    if vocab_size is not None and int(vocab_size) != vocab:
        raise ValueError(
            f"vocab_size: expected the head's output size {vocab}, got {vocab_size} "
            "(the stock loss would reshape the logits to a different vocabulary)"
        )
    return end


def _captured_per_token(
    hidden: torch.Tensor, plan: HeadPlan, end: int | None, labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None, ignore_index: int, num_items_in_batch: int | torch.Tensor | None,
    epilogue: dict[str, Any], capture: _state.Capture,
) -> torch.Tensor:  # fmt: skip
    """Per-token outputs for logitless.integrations.trl, with this class's own epilogue, left in ``capture``; the
    forward's loss is their mean negative log-probability. They score the caller's targets (``capture.labels`` /
    ``shift_labels``) where those line up with the head's positions, else the ones this forward's loss was given."""
    caller = capture.shift_labels if capture.shift_labels is not None else capture.labels
    if caller is not None and tuple(caller.shape) == tuple(hidden.shape[:-1]):
        labels, shift_labels = capture.labels, capture.shift_labels

    def per_token(x: torch.Tensor) -> dict[str, Any]:
        from logitless.integrations._per_token import fused_per_token

        weight, bias = _head_params(plan, end)
        if capture.fp32_head:
            # TRL's cast_lm_head_to_fp32: the head in float32 (gradients flow back through the casts).
            x, weight = x.float(), weight.float()
            bias = bias.float() if bias is not None else None
        return fused_per_token(
            x, weight, bias, labels, shift_labels=shift_labels, ignore_index=ignore_index,
            **{**epilogue, "logits_bias": _on(epilogue["logits_bias"], x)}, temperature=capture.temperature,
            outputs=capture.outputs, uniform_grad=capture.uniform_grad,
        )  # fmt: skip

    # The fields are what the head's call returns, so the engines' output hooks hold them: TRL differentiates
    # them, not this forward's loss, and ZeRO-3 gathers the weight again for their backward only through a hook
    # on what the call returned (a backward from fields kept aside read the released weight).
    capture.result = plan.apply(hidden, per_token)
    nll = -capture.result["log_probs"]
    count = capture.result["label_mask"].sum().clamp(min=1)
    return nll.sum() / (count if num_items_in_batch is None else num_items_in_batch)


def _captured_support(
    hidden: torch.Tensor, plan: HeadPlan, end: int | None, epilogue: dict[str, Any], capture: _state.Capture
) -> torch.Tensor:
    """Log-probabilities over the token support ``capture.support`` names (TRL's top-k distillation modes,
    logitless.integrations._support), with this class's own epilogue, left in ``capture.result``; the forward's
    own loss is zero."""
    support = capture.support
    if tuple(hidden.shape[:-1]) != tuple(support.rows.shape):
        # The head sees other positions than the inputs' (a forward that adds or drops some): not fused.
        capture.refused = "head-positions-not-the-inputs"
        return hidden.new_zeros(())

    def fields(x: torch.Tensor) -> dict[str, torch.Tensor]:
        from logitless.integrations._support import support_log_probs

        weight, bias = _head_params(plan, end)
        return support_log_probs(x, weight, bias, {**epilogue, "logits_bias": _on(epilogue["logits_bias"], x),
                                                   "temperature": capture.temperature}, support)  # fmt: skip

    # What the head's call returns, so the engines' output hooks hold it (as the per-token fields).
    capture.result = plan.apply(hidden, fields)
    return hidden.new_zeros(())


def _captured_divergence(
    hidden: torch.Tensor, plan: HeadPlan, end: int | None, epilogue: dict[str, Any], capture: _state.Capture
) -> torch.Tensor:
    """A distillation step's head (logitless.integrations.trl_gkd): a teacher's leaves its operands in
    ``capture.divergence``; a student's computes the divergence from them over the positions ``divergence.mask``
    keeps (the trainer's, whatever the forward's own loss does with the labels) into ``capture.result["loss"]``."""
    job = capture.divergence

    def teacher(x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1] != job.mask.shape:
            # The head sees other positions than the inputs' (a forward that adds or drops some): not fused.
            capture.refused = "head-positions-not-the-inputs"
            return x.new_zeros(())
        weight, bias = _head_params(plan, end)
        # An engine or an offloading hook releases the head's parameters when its call returns: keep a copy then.
        held = any(e.engine_hooks or e.wraps is not None or e.hook is not None for e in plan.entries)
        keep = (lambda t: t.detach().clone()) if held else (lambda t: t.detach())
        job.teacher = _Operands(x.detach(), keep(weight), keep(bias) if bias is not None else None,
                                {**epilogue, "logits_bias": _on(epilogue["logits_bias"], x)})  # fmt: skip
        return x.new_zeros(())

    def student(x: torch.Tensor) -> torch.Tensor:
        from logitless.divergence import linear_divergence

        weight, bias = _head_params(plan, end)
        held = job.teacher
        return linear_divergence(
            x, weight, held.hidden, held.weight, beta=job.beta, temperature=job.temperature, bias=bias,
            teacher_bias=held.bias, epilogue={**epilogue, "logits_bias": _on(epilogue["logits_bias"], x)},
            teacher_epilogue=held.epilogue, mask=job.mask.to(x.device), num_items_in_batch=job.num_items_in_batch,
        )  # fmt: skip

    # The student's loss is what the head's call returns, so the engines' output hooks hold it (ZeRO-3 reduces the
    # head's gradient through them).
    out = plan.apply(hidden, teacher if job.teacher is None else student)
    if job.teacher is not None:
        capture.result = {"loss": out}
    # A copy for the forward, which may add its own terms in place (Mixtral's ``loss += aux``).
    return out.clone()


@dataclass(frozen=True)
class _Operands:
    """A teacher head's input, parameters and epilogue, as a distillation step's student reads them."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    epilogue: dict[str, Any]


def _smoothed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: HeadPlan,
    epilogue: dict[str, Any],
    smoothing: _state.Smoothing,
    labels: torch.Tensor | None,
) -> torch.Tensor:
    """HF Trainer's ``LabelSmoother`` loss of these logits, summed (the Trainer divides it): its labels, shift and
    ``ignore_index``, not the model's (logitless.integrations.hf_trainer). ``hf_loss`` leaves it in ``smoothing``."""
    options = {
        "shift": smoothing.shift,
        "ignore_index": smoothing.ignore_index,
        "label_smoothing": smoothing.epsilon,
        "reduction": "sum",
        **epilogue,
    }
    if smoothing.labels is None:
        # The integration takes the labels from the model's call before this runs; a forward reached otherwise
        # (labels passed positionally) smooths what it was given.
        smoothing.labels = labels
    if smoothing.labels is None:
        raise RuntimeError("logitless: label smoothing without labels (an internal error; please report it)")
    labels = smoothing.labels.to(x.device)
    if plan.shard is not None:
        from logitless.vocab_parallel import vocab_parallel_linear_cross_entropy

        loss = vocab_parallel_linear_cross_entropy(
            x, weight, labels, vocab_start=plan.shard.start, vocab_size=plan.shard.total, group=plan.shard.group,
            bias=bias, **options,
        )  # fmt: skip
    else:
        loss = linear_cross_entropy(x, weight, labels, bias=bias, **options)
    return loss


def _slice_end(end: Any) -> int | None:
    if end is None:
        return None
    if isinstance(end, bool) or not hasattr(end, "__index__"):
        raise TypeError(f"vocab_slice_end: expected an int or None, got {type(end).__name__}")
    return end.__index__()


def _head_params(plan: HeadPlan, end: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias, cut to the first ``end`` rows as the forward cuts the logits' columns (a view:
    the gradient reaches the kept rows only, as stock's slice backward gives the others zeros)."""
    weight, bias = plan.weight_and_bias()
    if end is None:
        return weight, bias
    return weight[:end], bias[:end] if bias is not None else None


def _low_rank(plan: HeadPlan, x: torch.Tensor, end: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's low-rank term off the linear's input, its ``b`` cut as the head's rows are (``_head_params``)."""
    assert plan.low_rank is not None
    a, b = plan.low_rank(x)
    return (a, b) if end is None else (a, b[:end])


def _shifted(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The targets of the causal shift, aligned with the positions: ``labels[..., 1:]`` and ``ignore_index`` last."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _vocab_vector(bias: torch.Tensor | None) -> torch.Tensor | None:
    """Stock adds the logits bias by broadcasting, so a ``(1, V)`` buffer (BART's ``final_logits_bias``) is the
    ``(V,)`` vector the op takes. Any other shape is passed on for the op to refuse."""
    if isinstance(bias, torch.Tensor) and bias.ndim > 1 and all(d == 1 for d in bias.shape[:-1]):
        return bias.reshape(bias.shape[-1])
    return bias


def _on(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The logits bias on the device the head computes on, as stock's ``bias.to(lm_logits.device)``."""
    return bias.to(x.device) if bias is not None else None
