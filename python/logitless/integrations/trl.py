"""A drop-in for TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, TRL >= 1.15).

TRL's SFT, DPO, GRPO, RLOO and KTO trainers call ``add_fused_lm_head(model, temperature, cast_lm_head_to_fp32,
outputs)``, which replaces ``model.forward`` on the instance: ``model(**inputs, fused_lm_head=True)`` then returns
per-token log-probabilities (and optionally entropy, log Σp², mean logit, top-1) without the logits. TRL guesses
each model's logit epilogue from config attribute names; this drop-in has the same signature and output contract
but runs the class's own forward, so the epilogue is the one logitless's rewriter found in that class's source
(``hf_loss`` computes the fields with the op while the forward runs; docs/design.md). A class the rewriter
refused, or whose head cannot be fused exactly, gets exact values from its own materialised logits, and
``logitless.audit()`` counts which (run-time reason ``trl-materialised``).
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

from logitless import _registry, _state
from logitless.integrations import _model_forward
from logitless.integrations._per_token import STATS_FIELDS, materialised_per_token

__all__ = ["CALLS", "OUTPUT_FIELDS", "add_fused_lm_head", "per_token_fields"]

OUTPUT_FIELDS = ("log_probs", *STATS_FIELDS)
# Forwards with fused_lm_head=True, by how their fields were computed (reported by logitless.audit()).
CALLS = {"fused": 0, "materialised": 0}


def _output_class() -> Any:
    # TRL's own output class when TRL is there (trainers may isinstance-check it), else a ModelOutput twin.
    try:
        from trl.trainer.utils import FusedCausalLMOutput

        return FusedCausalLMOutput
    except ImportError:
        from logitless.integrations._output import FusedCausalLMOutput

        return FusedCausalLMOutput


def add_fused_lm_head(
    model: Any,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """Give ``model`` a fused LM head: ``model(..., labels=labels, fused_lm_head=True)`` returns a
    ``FusedCausalLMOutput`` (loss, per-token log_probs and the ``outputs`` asked for, label_mask, aux_loss) computed
    without the ``[batch, seq, vocab]`` logits. Without ``fused_lm_head`` the forward is the original one, so
    ``generate()`` is unchanged. Same signature and contract as TRL's; add the head before wrapping with PEFT.
    """
    unknown = sorted(set(outputs) - set(OUTPUT_FIELDS))
    if unknown:
        raise ValueError(f"outputs: expected a subset of {OUTPUT_FIELDS}, got unknown field(s) {unknown}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature: expected a value > 0, got {temperature}")
    wanted = frozenset(outputs) | {"log_probs"}
    original_forward = _model_forward.original_forward(model)
    text_config = _model_forward.text_config(model)

    # Keep the original signature: generate() validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def _fused_forward(
        self: Any, *args: Any, fused_lm_head: bool = False, labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None, num_items_in_batch: Any = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):  # fmt: skip
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True: expected labels (or shift_labels)")
        return _fused_outputs(self, original_forward, text_config, args, kwargs, labels, shift_labels,
                              num_items_in_batch, float(temperature), cast_lm_head_to_fp32, wanted)  # fmt: skip

    model.forward = types.MethodType(_fused_forward, model)


def per_token_fields(
    model: Any,
    forward: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None,
    num_items_in_batch: Any,
    temperature: float,
    cast_lm_head_to_fp32: bool,
    wanted: frozenset[str],
) -> tuple[dict[str, Any], Any, bool]:
    """Run ``forward(*args, **kwargs)`` (``model``'s, or a wrapper's around it) with the labels and return the
    per-token fields ``wanted`` (``_per_token``'s dict), the forward's output and whether the op computed them
    (``False``: exactly, from the logits of a forward that kept its stock path)."""
    kwargs["use_cache"] = False
    # MoE router logits: the model's own forward asks for them when its config does (TRL's head, which calls the
    # backbone itself, has to force it); forcing it here would also hit models whose aux-loss code is broken.
    if labels is None:
        # Only pre-shifted labels: the model's loss branch still needs a labels tensor to run.
        labels = torch.full_like(shift_labels, -100)
    call = dict(kwargs, labels=labels)
    if shift_labels is not None:
        call["shift_labels"] = shift_labels
    if num_items_in_batch is not None:
        call["num_items_in_batch"] = num_items_in_batch
    # The head's fields score these targets (TRL's contract) where the class reads its labels for its loss alone,
    # however that loss reads them (BART's decoders and XLNet: unshifted); where they also feed the decoder's
    # inputs (an encoder-decoder), the loss's own targets are the next tokens.
    owner = next((cls for cls in type(model).__mro__ if "forward" in cls.__dict__), None)
    elsewhere = _registry.labels_elsewhere(owner) if owner is not None else None
    own = elsewhere is not None and not elsewhere["decoder_inputs"]
    capture = _state.Capture(temperature=temperature, outputs=wanted, fp32_head=cast_lm_head_to_fp32,
                               uniform_grad=_state.uniform_grad_expected(), labels=labels if own else None,
                               shift_labels=shift_labels if own else None)  # fmt: skip
    with _state.capturing(capture):
        out = forward(*args, **call)
    fields = capture.result
    if fields is not None:
        return fields, out, True
    # The class's forward has no fused branch (refused, not installed) or took its stock path: exact values from the
    # logits it returned. A stock path taken by a rewritten forward was counted with its reason.
    if capture.refused is None:
        _state.record(model, "trl-materialised")
    if elsewhere is not None and elsewhere["decoder_inputs"] and shift_labels is None:
        shift_labels = labels  # each decoder position's label is its next token, as the fused branch scores it
    fields = materialised_per_token(out.logits, labels, shift_labels=shift_labels, ignore_index=-100,
                                    temperature=temperature, outputs=wanted)  # fmt: skip
    return fields, out, False


def _fused_outputs(
    model: Any,
    forward: Any,
    text_config: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None,
    num_items_in_batch: Any,
    temperature: float,
    cast_lm_head_to_fp32: bool,
    wanted: frozenset[str],
) -> Any:
    fields, out, fused = per_token_fields(model, forward, args, kwargs, labels, shift_labels, num_items_in_batch,
                                          temperature, cast_lm_head_to_fp32, wanted)  # fmt: skip
    CALLS["fused" if fused else "materialised"] += 1
    mask = fields["label_mask"]
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -fields["log_probs"].sum() / denominator
    aux_loss = getattr(out, "aux_loss", None)
    if aux_loss is not None:
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
    return _output_class()(
        loss=loss,
        log_probs=fields["log_probs"],
        entropy=fields["entropy"],
        log_sum_sq_probs=fields["log_sum_sq_probs"],
        mean_logits=fields["mean_logits"],
        is_top1=fields["is_top1"],
        label_mask=mask,
        aux_loss=aux_loss,
    )
