"""TRL's ``OnlineDPOTrainer`` (``trl.experimental.online_dpo`` from TRL 1.5, ``trl.trainer`` in 0.24) with its
completions' log-probabilities from logitless's op, no logits formed.

Stock, ``_forward`` runs the policy (and then the reference model, without gradients) on each prompt and its sampled
completion for the logits, ``[batch, prompt + completion, V]`` in the model's dtype, and takes the log-softmax of
the completion's positions for its tokens' log-probabilities. Under ``logitless.install()`` ``_forward`` is wrapped:
the model's own forward runs with the completion tokens as the targets of the positions that predict them, and its
head's call gives their log-probabilities from the op (``logitless.integrations.trl.per_token_fields``, the class's
own epilogue), float32 whatever the model's dtype. Generation, rewards and the loss stay TRL's.

Only the ``_forward`` these notes describe is wrapped (``known``: its tokens, comments aside: TRL 0.24 to 1.15 and
1.16); another release keeps TRL's code, with a warning. A call keeps TRL's path, counted by reason in
``audit()["integrations"]["trl"]["online_dpo"]``, with images, with an empty prompt (TRL then scores positions
that are not the completion's predictors), for a model whose class does not run a rewritten forward that reads its
labels for its loss alone, and when the head's fields do not cover the completion.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from logitless.integrations import _model_forward
from logitless.integrations._calls import Calls
from logitless.integrations._digest import method_digest

__all__ = ["known", "report", "reset", "wrap_forward"]

# sha256 of the token streams (comments and blank lines aside) of the _forward this module reproduces: TRL 0.24.0
# to 1.15.0 (text-only truncation always), and 1.16.0 (no truncation with images, which keep TRL's path here).
_KNOWN = {
    "26d71d17040954f88e599cadf115663b0844f505009832e0ea352da0b0432bf8",
    "56a6cfac2616d3fccc5e3f6b12cdf44d354e27067806a71d1bb9a7a5537f01b1",
}
_CALLS = Calls()
report, reset, _count = _CALLS.report, _CALLS.reset, _CALLS.count


def known(trainer_class: type) -> bool:
    """Whether ``trainer_class`` defines the ``_forward`` this module reproduces."""
    return method_digest(trainer_class, "_forward") in _KNOWN


def wrap_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    """``OnlineDPOTrainer._forward`` fused (installed only on a class ``known`` accepts)."""

    @functools.wraps(original)
    def _forward(self: Any, model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                 vision_inputs: Any = None) -> Any:  # fmt: skip
        call = (self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs)
        lm = _plan(self, model, vision_inputs)
        if isinstance(lm, str):
            _count(lm)
            return original(*call)
        # TRL's left truncation of the prompt (only with images does TRL 1.16 skip it; those keep TRL's path).
        cut = max(prompt_ids.size(1) + completion_ids.size(1) - self.max_length, 0)
        prompt_ids, prompt_mask = prompt_ids[:, cut:], prompt_mask[:, cut:]
        prompt_len = prompt_ids.size(1)
        if prompt_len == 0:
            _count("empty-prompt")  # TRL scores position t against completion token t then; not a causal target
            return original(*call)
        ids = torch.cat((prompt_ids, completion_ids), dim=1)
        mask = torch.cat((prompt_mask, completion_mask), dim=1)
        # Position t predicts token t + 1: the completion's tokens are the targets of positions prompt_len - 1 on
        # (every one of them, padding included, as TRL's log-softmax scores them all).
        end = prompt_len - 1 + completion_ids.size(1)
        shift_labels = torch.full_like(ids, -100)
        shift_labels[:, prompt_len - 1 : end] = completion_ids
        from logitless.integrations.trl import per_token_fields

        fields, _, fused = per_token_fields(lm, model, (ids,), {"attention_mask": mask}, None, shift_labels, None,
                                            1.0, False, frozenset({"log_probs"}))  # fmt: skip
        covered = fields["label_mask"]
        if covered.shape != ids.shape or not bool(covered[:, prompt_len - 1 : end].all()):
            _count("shift-labels-not-read")  # the forward's loss read other targets than these
            return original(*call)
        _count(None if fused else "materialised")
        return fields["log_probs"][:, prompt_len - 1 : end]

    _forward.__logitless_wrapped__ = original  # type: ignore[attr-defined]
    return _forward


def _plan(trainer: Any, model: Any, vision_inputs: Any) -> torch.nn.Module | str:
    """The model whose class runs the rewritten forward (under any DDP / PEFT wrapper), or why the call keeps TRL's
    path."""
    if not _model_forward.installed_and_idle():
        return "not-installed"
    if vision_inputs is not None:
        return "images"
    return _model_forward.rewritten_lm(trainer, model)  # type: ignore[no-any-return]
