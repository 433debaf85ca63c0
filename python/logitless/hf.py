"""``hf_loss``: transformers' ``self.loss_function(logits, labels, vocab_size, **kwargs)`` convention onto the op.

Rewritten model forwards call this instead of ``self.lm_head`` + ``self.loss_function`` (docs/design.md, "Rewrite
contract"). It takes the head module rather than logits (an ``nn.Linear``, or a composite head that
``logitless._heads`` reduces to one), and mirrors ``ForCausalLMLoss``: ``num_items_in_batch``
(int or tensor on any device), a pre-shifted ``shift_labels``, ``ignore_index``; any other keyword is ignored, as
``ForCausalLMLoss`` ignores it.
"""

from __future__ import annotations

from typing import Any

import torch

from logitless._heads import resolve_head
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
    **kwargs: Any,
) -> torch.Tensor:
    """The causal-LM loss of ``epilogue(lm_head(hidden))`` against ``labels``, without the logits.

    Epilogue values of ``None`` mean "not set" (models read them from configs where they are often ``None``).
    """
    del kwargs  # ForCausalLMLoss forwards extras to fixed_cross_entropy, which ignores them.
    if not isinstance(lm_head, torch.nn.Linear):
        # A composite head (RobertaLMHead, BERT's cls): its leading statements run as written, the loss is fused
        # on its final nn.Linear.
        plan = resolve_head(lm_head)
        if plan is not None:
            hidden = plan.transform(hidden)
            lm_head = plan.linear
    weight = getattr(lm_head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"lm_head: expected a linear layer with a .weight tensor, got {type(lm_head).__name__}")
    bias = getattr(lm_head, "bias", None)
    if vocab_size is not None and int(vocab_size) != weight.shape[0]:
        raise ValueError(
            f"vocab_size: expected the head's output size {weight.shape[0]}, got {vocab_size} "
            "(the stock loss would reshape the logits to a different vocabulary)"
        )
    return linear_cross_entropy(
        hidden,
        weight,
        labels,
        bias=bias,
        shift_labels=shift_labels,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        logits_bias=logits_bias,
        logit_scale_multiply=logit_scale_multiply,
        logit_scale_divide=logit_scale_divide,
        logit_softcapping=logit_softcapping,
    )
