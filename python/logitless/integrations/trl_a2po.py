"""TRL's ``A2POTrainer`` (``trl.experimental.a2po``, TRL 1.14 to 1.16) with its completions' log-probabilities from
logitless's op, no logits formed.

Stock, ``_get_sequence_logps`` runs the policy (in the loss, with gradients) or the reference model (when a batch is
prepared, without) on each prompt and its sampled completion for the logits of the completion's predictors
(``[batch, completion + 1, V]`` in the model's dtype, ``[batch, prompt + completion, V]`` for a model without
``logits_to_keep``) and sums the log-softmax of the completion's tokens over its mask. Under ``logitless.install()``
the method is wrapped: the model's own forward runs with the completion tokens as the targets of the positions that
predict them, and its head's call gives their log-probabilities from the op
(``logitless.integrations.trl.per_token_fields``, the class's own epilogue), float32 whatever the model's dtype.
Generation, rewards, the value estimates and the loss stay TRL's.

Only the ``_get_sequence_logps`` these notes describe is wrapped (``known``: by the sha256 of its tokens); another
release keeps TRL's code, with a warning. A call keeps TRL's path, counted by reason in
``audit()["integrations"]["trl"]["a2po"]``, with an empty prompt or completion (TRL's slices then do not line up),
for a model whose class does not run a rewritten forward that reads its labels for its loss alone, and when the
head's fields do not cover the completion.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from logitless.integrations import _model_forward
from logitless.integrations._calls import Calls
from logitless.integrations._digest import method_digest

__all__ = ["known", "report", "reset", "wrap_sequence_logps"]

# sha256 of the token stream (comments and blank lines aside) of the _get_sequence_logps this module reproduces:
# TRL 1.14.2 to 1.16.0.
_KNOWN = {"96e34514b1eefce9ddf705a2c359c44b2f4076f3d200972d9451f8d11e8b589f"}
_CALLS = Calls()
report, reset, _count = _CALLS.report, _CALLS.reset, _CALLS.count



def known(trainer_class: type) -> bool:
    """Whether ``trainer_class`` defines the ``_get_sequence_logps`` this module reproduces."""
    return method_digest(trainer_class, "_get_sequence_logps") in _KNOWN


def wrap_sequence_logps(original: Callable[..., Any]) -> Callable[..., Any]:
    """``A2POTrainer._get_sequence_logps`` fused (installed only on a class ``known`` accepts)."""

    @functools.wraps(original)
    def _get_sequence_logps(self: Any, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            logits_to_keep: int) -> torch.Tensor:  # fmt: skip
        call = (self, model, input_ids, attention_mask, logits_to_keep)
        lm = _plan(self, model)
        if isinstance(lm, str):
            _count(lm)
            return original(*call)
        length = input_ids.size(1)
        prompt_len = length - logits_to_keep
        if prompt_len <= 0 or logits_to_keep <= 0:
            # TRL's slices score other positions then (or every one): not the completion's causal targets.
            _count("empty-prompt" if prompt_len <= 0 else "empty-completion")
            return original(*call)
        # Position t predicts token t + 1: the completion's tokens are the targets of positions prompt_len - 1 on.
        shift_labels = torch.full_like(input_ids, -100)
        shift_labels[:, prompt_len - 1 : length - 1] = input_ids[:, prompt_len:]
        from logitless.integrations.trl import per_token_fields

        fields, _, fused = per_token_fields(lm, model, (input_ids,), {"attention_mask": attention_mask}, None,
                                            shift_labels, None, 1.0, False, frozenset({"log_probs"}))  # fmt: skip
        covered = fields["label_mask"]
        if covered.shape != input_ids.shape or not bool(covered[:, prompt_len - 1 : length - 1].all()):
            _count("shift-labels-not-read")  # the forward's loss read other targets than these
            return original(*call)
        _count(None if fused else "materialised")
        log_probs = fields["log_probs"][:, prompt_len - 1 : length - 1]
        return (log_probs * attention_mask[:, -logits_to_keep:]).sum(dim=1)

    _get_sequence_logps.__logitless_wrapped__ = original  # type: ignore[attr-defined]
    return _get_sequence_logps


def _plan(trainer: Any, model: Any) -> torch.nn.Module | str:
    """The model whose class runs the rewritten forward (under any DDP / PEFT wrapper), or why the call keeps TRL's
    path."""
    if not _model_forward.installed_and_idle():
        return "not-installed"
    return _model_forward.rewritten_lm(trainer, model)  # type: ignore[no-any-return]
