"""TRL before 1.15: its SFTTrainer's chunked LM head, and the logits its ``nll`` metrics read.

TRL 1.15 gave its trainers ``add_fused_lm_head`` (logitless.integrations.trl). Before it, ``SFTTrainer`` did one of
two things with a labelled batch, and neither let logitless help:

- ``loss_type="chunked_nll"`` (TRL 1.5 to 1.14; the default from 1.9): ``_patch_chunked_ce_lm_head(model,
  chunk_size, is_vlm)`` replaces ``model.forward`` on the instance with TRL's chunked cross-entropy, which calls the
  backbone itself and guesses the logit epilogue from config attribute names (a multiplier and a softcap only), so
  the class's forward, rewritten or not, never runs. ``patch_chunked_ce_lm_head`` here has the same signature and
  output contract (``loss``, ``num_correct_tokens``, ``entropy_sum``, ``num_valid_tokens``, ``aux_loss``, no logits)
  but runs the class's own forward: its fused loss is the model's own loss, and the statistics come from the same
  pass of the op with the class's real epilogue (or exactly from the logits of a forward that keeps its stock path).
- ``loss_type="nll"`` (every TRL from 0.x to 1.14): ``compute_loss`` calls ``Trainer.compute_loss`` and then reads
  ``outputs.logits`` for its entropy and token-accuracy metrics. The fused forward returned empty logits there and
  the first step failed. ``legacy_compute_loss`` runs that ``compute_loss`` under ``_state.keeping_logits()``: the
  loss stays fused (no float32 copy of the logits, no logits gradient) and the forward also returns the logits,
  formed once, for the metrics.
"""

from __future__ import annotations

import functools
import inspect
import threading
import types
from collections.abc import Callable
from typing import Any

import torch

from logitless import _state
from logitless.integrations import _model_forward
from logitless.integrations._per_token import materialised_per_token

__all__ = ["CALLS", "legacy_compute_loss", "patch_chunked_ce_lm_head", "report", "reset"]

# chunked: labelled forwards of the chunked head, by how the statistics were formed; logits_for_metrics:
# SFTTrainer.compute_loss calls that kept the logits for TRL's metrics. Reported by logitless.audit().
CALLS: dict[str, Any] = {"chunked": {"fused": 0, "materialised": 0}, "logits_for_metrics": 0}
_LOCK = threading.Lock()
_STATS = frozenset({"entropy", "is_top1"})


def reset() -> None:
    with _LOCK:
        CALLS["chunked"] = {"fused": 0, "materialised": 0}
        CALLS["logits_for_metrics"] = 0


def report() -> dict[str, Any]:
    with _LOCK:
        return {"chunked": dict(CALLS["chunked"]), "logits_for_metrics": CALLS["logits_for_metrics"]}


def legacy_compute_loss(original: Callable[..., Any]) -> Callable[..., Any]:
    """TRL < 1.15 ``SFTTrainer.compute_loss``, with the logits kept for the metrics it computes from them."""

    @functools.wraps(original)
    def compute_loss(self: Any, *args: Any, **kwargs: Any) -> Any:
        options = getattr(self, "args", None)
        # Liger's head returns no logits and TRL reads none then; the chunked head returns its own statistics.
        if getattr(options, "use_liger_kernel", False) or getattr(options, "loss_type", None) == "chunked_nll":
            return original(self, *args, **kwargs)
        with _LOCK:
            CALLS["logits_for_metrics"] += 1
        with _state.keeping_logits():
            return original(self, *args, **kwargs)

    return compute_loss


def _output_class() -> Any:
    # TRL's own output class where its SFT module has one (its compute_loss reads the fields by name), else a twin.
    import sys

    cls = getattr(sys.modules.get("trl.trainer.sft_trainer"), "_ChunkedCELMHeadOutput", None)
    if cls is None:
        from logitless.integrations._output import ChunkedCELMHeadOutput

        cls = ChunkedCELMHeadOutput
    return cls


def patch_chunked_ce_lm_head(model: torch.nn.Module, chunk_size: int, is_vlm: bool = False) -> None:
    """Give ``model`` TRL's chunked-loss forward contract (TRL 1.5 to 1.14): with ``labels`` (or ``shift_labels``)
    the forward returns the model's own loss, computed fused, with ``num_correct_tokens``, ``entropy_sum`` and
    ``num_valid_tokens`` over the counted targets and ``logits=None``; without them it is the original forward.
    ``chunk_size`` and ``is_vlm`` are accepted for TRL's call and unused: the op sizes its own chunks, and the class's
    own forward finds its backbone."""
    del chunk_size, is_vlm
    original_forward = _model_forward.original_forward(model)
    text_config = _model_forward.text_config(model)

    def _chunked_forward(
        self: Any,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        shift_labels: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        if labels is None and shift_labels is None:
            if output_router_logits is not None:
                kwargs["output_router_logits"] = output_router_logits
            return original_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if output_router_logits is None:
            output_router_logits = getattr(text_config, "output_router_logits", False)
        kwargs.pop("use_cache", None)
        call = dict(kwargs, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        # The model's loss branch needs a labels tensor to run; pre-shifted labels replace its shift.
        call["labels"] = labels if labels is not None else torch.full_like(shift_labels, -100)
        if shift_labels is not None:
            call["shift_labels"] = shift_labels
        if num_items_in_batch is not None:
            call["num_items_in_batch"] = num_items_in_batch
        if output_router_logits:
            call["output_router_logits"] = True
        capture = _state.current_capture()
        if _state.current_smoothing() is not None or (capture is not None and capture.divergence is not None):
            # HF Trainer's label smoothing (logitless.integrations.hf_trainer), or a GKD step (SFTTrainer, which
            # GKDTrainer is, gave its model this head; logitless.integrations.trl_gkd), handed this forward its
            # labels: what they compute is computed there, from this call as from the class's own forward.
            return original_forward(**call)
        return _chunked_outputs(self, original_forward, call, shift_labels)

    # TRL keeps the original signature: generate() validates its model kwargs against it.
    _chunked_forward.__signature__ = inspect.signature(type(model).forward)  # type: ignore[attr-defined]
    model.forward = types.MethodType(_chunked_forward, model)


def _chunked_outputs(model: Any, forward: Any, call: dict[str, Any], shift_labels: torch.Tensor | None) -> Any:
    capture = _state.Capture(temperature=1.0, outputs=_STATS, loss_and_stats=True)
    with _state.capturing(capture):
        out = forward(**call)
    fields = capture.result
    with _LOCK:
        CALLS["chunked"]["fused" if fields is not None else "materialised"] += 1
    if fields is None:
        # No fused branch (refused class, hooked head, ...): exact statistics from the logits the forward returned;
        # the loss is the one it computed from them.
        if capture.refused is None:
            _state.record(model, "trl-materialised")
        with torch.no_grad():
            fields = materialised_per_token(out.logits, call["labels"], shift_labels=shift_labels, ignore_index=-100,
                                            temperature=1.0, outputs=_STATS)  # fmt: skip
    mask = fields["label_mask"]
    return _output_class()(
        loss=out.loss,
        logits=None,
        hidden_states=getattr(out, "hidden_states", None),
        past_key_values=None,
        attentions=None,
        num_correct_tokens=(fields["is_top1"] & mask).sum().float(),
        entropy_sum=(fields["entropy"].detach().float() * mask).sum(),
        num_valid_tokens=mask.sum(),
        aux_loss=getattr(out, "aux_loss", None),
    )
