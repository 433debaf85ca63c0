"""TRL's head output classes for when TRL (or that TRL version) does not have them: the fields of TRL's classes, as
transformers ModelOutputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

__all__ = ["ChunkedCELMHeadOutput", "FusedCausalLMOutput"]


@dataclass
class FusedCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class ChunkedCELMHeadOutput(CausalLMOutputWithPast):
    """SFTTrainer's chunked-loss output (TRL 1.5 to 1.14, ``_ChunkedCELMHeadOutput``)."""

    num_correct_tokens: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    num_valid_tokens: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
