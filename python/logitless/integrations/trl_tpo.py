"""TRL's ``TPOTrainer`` (``trl.experimental.tpo``, TRL 1.5 to 1.16) with its step's log-probabilities and metrics
from logitless's op, no logits formed.

Stock, ``_compute_loss`` runs the model on the chosen, rejected and (when ``tpo_alpha`` is not 0) gold reference
sequences stacked (``[3B, T]``) for their logits (``[3B, T, V]`` in the model's dtype) and takes from them: each
sequence's summed (or, for ``ipo`` / ``tpo-l``, length-averaged) completion log-probability for the preference loss,
the gold rows' cross-entropy for the NLL term, and four metrics: the completion tokens' mean entropy, the chosen and
rejected rows' mean logit, and the chosen rows' top-1 accuracy. Under ``logitless.install()`` ``_compute_loss`` is
wrapped: the model's own forward runs with each completion token as the target of the position that predicts it, and
its head's call gives those positions' log-probabilities, entropy, mean logit and top-1 from the op
(``logitless.integrations.trl.per_token_fields``, the class's own epilogue); the loss and every metric are formed
from them as that release forms them from the logits. The log-probabilities are float32 whatever the model's dtype.

Only the releases whose ``_compute_loss`` this module reproduces are wrapped (``known``: by the sha256 of its
tokens); another release keeps TRL's code, with a warning. A call keeps TRL's path, counted by reason in
``audit()["integrations"]["trl"]["tpo"]``, when it must return the model's outputs (evaluation's predictions read
their logits), for a model whose class does not run a rewritten forward that reads its labels for its loss alone,
and when the head's fields do not cover the completion.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from logitless.integrations import _model_forward
from logitless.integrations._calls import Calls
from logitless.integrations._digest import digest, method_digest

__all__ = ["known", "report", "reset", "wrap_compute_loss"]

# sha256 of the token streams (comments and blank lines aside) of the _compute_loss this module reproduces, and
# whether that release divides its token count by the tensor-parallel size: TRL 1.5.1 (no), 1.14.2 to 1.16.0 (yes).
_KNOWN = {
    "cf31b1d8fb7437ffd076ad60f65a82dd528b143bd1c1f7a7a3b13e1c4c4c981b": False,
    "b6e83490127e74e0be7ddb14abca0798e2e9a190f57c850984885620a7ee0cd1": True,
}
_CALLS = Calls()
report, reset, _count = _CALLS.report, _CALLS.reset, _CALLS.count
_FIELDS = frozenset({"log_probs", "entropy", "mean_logits", "is_top1"})

_FIELDS = frozenset({"log_probs", "entropy", "mean_logits", "is_top1"})


def known(trainer_class: type) -> bool:
    """Whether ``trainer_class`` defines the ``_compute_loss`` this module reproduces."""
    return method_digest(trainer_class, "_compute_loss") in _KNOWN


def wrap_compute_loss(original: Callable[..., Any]) -> Callable[..., Any]:
    """``TPOTrainer._compute_loss`` fused (installed only on a class ``known`` accepts)."""
    divides_by_tp = _KNOWN[digest(original)]  # type: ignore[index]

    @functools.wraps(original)
    def _compute_loss(self: Any, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        lm = _plan(self, model, return_outputs)
        if isinstance(lm, str):
            _count(lm)
            return original(self, model, inputs, return_outputs)
        loss, reason = _fused(self, model, lm, inputs, divides_by_tp)
        _count(reason)
        return original(self, model, inputs, return_outputs) if loss is None else loss

    _compute_loss.__logitless_wrapped__ = original  # type: ignore[attr-defined]
    return _compute_loss


def _plan(trainer: Any, model: Any, return_outputs: bool) -> torch.nn.Module | str:
    """The model whose class runs the rewritten forward (under any DDP / PEFT wrapper), or why the call keeps TRL's
    path."""
    if not _model_forward.installed_and_idle():
        return "not-installed"
    if return_outputs:
        return "return-outputs"  # the caller reads the outputs' logits (evaluation's predictions)
    return _model_forward.rewritten_lm(trainer, model)  # type: ignore[no-any-return]


def _fused(trainer: Any, model: Any, lm: torch.nn.Module, inputs: dict[str, Any],
           divides_by_tp: bool) -> tuple[torch.Tensor | None, str | None]:  # fmt: skip
    """The step's loss, its metrics logged as those releases log them, from one forward; ``(None, reason)`` when the
    call keeps TRL's path, ``(loss, "materialised")`` when the forward kept its stock path at run time (a hooked head)
    and its logits gave exact values."""
    from logitless.integrations.trl import per_token_fields

    mode = "train" if trainer.model.training else "eval"
    n_branches = 3 if trainer.tpo_alpha != 0.0 else 2
    kwargs = {k: v for k, v in inputs.items() if k != "completion_mask"}
    ids = inputs["input_ids"]
    shift_mask = inputs["completion_mask"][..., 1:]
    scored = shift_mask != 0
    # Position t predicts token t + 1: the completion's tokens are the targets, every other position is ignored.
    target = torch.where(scored, ids[..., 1:], -100)
    shift_labels = F.pad(target, (0, 1), value=-100)
    labels = F.pad(target, (1, 0), value=-100)
    fields, _, fused = per_token_fields(lm, model, (), kwargs, labels, shift_labels, None, 1.0, False, _FIELDS)
    covered = fields["label_mask"]
    if covered.shape != ids.shape or not bool((covered[..., :-1] == scored).all()):
        return None, "shift-labels-not-read"  # the forward's loss read other targets than these
    log_probs = fields["log_probs"][..., :-1]
    if trainer.loss_type in ("ipo", "tpo-l"):
        logps = log_probs.sum(dim=1) / shift_mask.sum(dim=1).clamp(min=1)
    else:
        logps = log_probs.sum(dim=1)
    chosen_logps, rejected_logps = logps.chunk(n_branches, dim=0)[:2]
    loss = _preference_loss(trainer, chosen_logps - rejected_logps).mean()
    if n_branches == 3:
        gold = scored.chunk(3, dim=0)[2]
        # The cross-entropy's mean over the gold completion tokens (NaN where there are none, as stock's).
        loss = loss + trainer.tpo_alpha * -(log_probs.chunk(3, dim=0)[2][gold].sum() / gold.sum())
    _log(trainer, mode, inputs, fields, scored, n_branches, chosen_logps, rejected_logps, divides_by_tp)
    return loss, None if fused else "materialised"


def _preference_loss(trainer: Any, delta: torch.Tensor) -> torch.Tensor:
    beta, smoothing = trainer.beta, trainer.label_smoothing
    if trainer.loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta) * (1 - smoothing) - F.logsigmoid(-beta * delta) * smoothing
    if trainer.loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if trainer.loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if trainer.loss_type == "tpo-l":
        shifted = delta - trainer.tpo_l_gamma / beta
        return -F.logsigmoid(beta * shifted) * (1 - smoothing) - F.logsigmoid(-beta * shifted) * smoothing
    raise ValueError(f"Unknown loss type: {trainer.loss_type}. Should be one of ['sigmoid', 'hinge', 'ipo', 'tpo-l']")


def _log(trainer: Any, mode: str, inputs: dict[str, Any], fields: dict[str, Any], scored: torch.Tensor,
         n_branches: int, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
         divides_by_tp: bool) -> None:  # fmt: skip
    """The metrics that release logs, from the head's fields at the completion positions."""
    metrics, accelerator = trainer._metrics[mode], trainer.accelerator
    entropy = fields["entropy"].detach()[..., :-1][scored].mean()
    metrics["entropy"].append(accelerator.gather_for_metrics(entropy).mean().item())
    if mode == "train":
        tokens = accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        trainer._total_train_tokens += tokens // trainer._tp_size if divides_by_tp else tokens
    metrics["num_tokens"] = [trainer._total_train_tokens]

    means = fields["mean_logits"].detach()[..., :-1].chunk(n_branches, dim=0)
    masks = scored.chunk(n_branches, dim=0)
    for side, mean, mask in (("chosen", means[0], masks[0]), ("rejected", means[1], masks[1])):
        total = accelerator.gather_for_metrics(mean[mask].sum()).sum().item()
        count = accelerator.gather_for_metrics(mask.sum()).sum().item()
        metrics[f"logits/{side}"].append(total / count if count > 0 else 0.0)

    top1 = fields["is_top1"][..., :-1].chunk(n_branches, dim=0)[0] & masks[0]
    correct = accelerator.gather_for_metrics(top1.sum())
    total = accelerator.gather_for_metrics(masks[0].sum()).sum()
    metrics["mean_token_accuracy"].append((correct.sum() / total).item() if total > 0 else 0.0)

    chosen_rewards = trainer.beta * chosen_logps.detach()
    rejected_rewards = trainer.beta * rejected_logps.detach()
    metrics["rewards/chosen"].append(accelerator.gather(chosen_rewards).mean().item())
    metrics["rewards/rejected"].append(accelerator.gather(rejected_rewards).mean().item())
    metrics["rewards/accuracies"].append(accelerator.gather((chosen_rewards > rejected_rewards).float()).mean().item())
    metrics["rewards/margins"].append(accelerator.gather(chosen_rewards - rejected_rewards).mean().item())
    metrics["logps/chosen"].append(accelerator.gather(chosen_logps).mean().item())
    metrics["logps/rejected"].append(accelerator.gather(rejected_logps).mean().item())
