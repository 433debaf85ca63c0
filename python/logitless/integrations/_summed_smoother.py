"""The label smoother ``logitless.integrations.hf_trainer`` puts in the Trainer for one fused ``compute_loss`` call.

Imports torch (the integration module itself must not: ``install()`` runs in processes that never import it).
"""

from __future__ import annotations

from typing import Any

import torch

from logitless import _state

__all__ = ["SummedSmoother"]


class SummedSmoother:
    """Stands in for the Trainer's ``LabelSmoother`` during one fused call: the forward left the smoothed loss
    summed; this divides it as ``LabelSmoother`` divides (``num_items_in_batch`` when the Trainer passes it, else the
    count of targets), or, when the forward took its stock path, smooths its logits with the stock smoother.
    ``calls``: the integration's counters."""

    def __init__(self, stock: Any, state: _state.Smoothing, calls: dict[str, int]) -> None:
        self.stock = stock
        self.state = state
        self.calls = calls
        self.epsilon = stock.epsilon
        self.ignore_index = stock.ignore_index

    def __call__(
        self, model_output: Any, labels: torch.Tensor, shift_labels: bool = False, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        state = self.state
        kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        if state.fills == 0:
            self.calls["materialised"] += 1
            if not isinstance(model_output, dict):
                model_output = model_output[1:]  # tuple outputs: the model's own loss came first, given labels
            return self.stock(model_output, labels, shift_labels=shift_labels, **kwargs)
        if state.fills != 1 or bool(shift_labels) != state.shift or labels is not state.labels or state.loss is None:
            # Only a Trainer whose compute_loss differs from the one the integration mirrors gets here.
            raise RuntimeError(
                "logitless: HF Trainer's label smoothing was fused for a different call "
                f"(forwards filled {state.fills}, shift {state.shift} vs {bool(shift_labels)}); "
                "run without logitless (LOGITLESS=0) and report this"
            )
        self.calls["fused"] += 1
        loss = _on_the_outputs_graph(state.loss, model_output)
        if num_items_in_batch is None:
            targets = labels[..., 1:] if shift_labels else labels
            denominator: Any = (targets != state.ignore_index).sum().to(loss.device)
        elif isinstance(num_items_in_batch, torch.Tensor):
            denominator = num_items_in_batch.to(loss.device)
        else:
            denominator = num_items_in_batch
        return loss / denominator


class _Through(torch.autograd.Function):
    """Forward: ``value``. Backward: the gradient to ``value``, zeros to ``passed``."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, passed: torch.Tensor) -> torch.Tensor:
        ctx.passed = (passed.shape, passed.dtype, passed.device)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.passed
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def _on_the_outputs_graph(loss: torch.Tensor, model_output: Any) -> torch.Tensor:
    """``loss`` with the model's returned loss on its graph (as a zero-gradient input): engines hook the outputs of
    the model's call, and FSDP1's root starts its backward (the state every unit's backward asserts) in such a
    hook, which a backward from ``loss`` alone, the head's own output, would never reach."""
    returned = model_output.get("loss") if isinstance(model_output, dict) else model_output[0]
    if not isinstance(returned, torch.Tensor) or not returned.requires_grad or returned is loss:
        return loss
    return _Through.apply(loss, returned)
