"""TRL's self-distillation trainers, ``SDPOTrainer`` and ``SDFTTrainer`` (``trl.experimental.sdpo`` / ``.sdft``,
TRL 1.14 to 1.16), with their completions' log-probabilities from logitless, no logits formed.

Stock, each loss step runs the student on its prompt and sampled completion, and the teacher (an EMA copy, the
initial weights, or the student itself) on a prompt with privileged context and the same completion, each for the
logits of the completion's predictors (``[batch, completion, V]`` in the model's dtype, divided by the temperature).
Two of its three ``distillation_mode``s read little of them:

* ``sampled_token`` (SDPO's default): each model's log-probability of the sampled tokens, for the reverse KL
  estimate ``(s - t).detach() · s``;
* ``topk_logits`` (SDFT's default): the student's top-k log-probabilities and the teacher's at the same ids, for
  TRL's divergence over those k tokens (renormalised, or with a tail bucket for the rest of the mass).

Then TRL's clipped importance ratio (the student's sampled-token log-probabilities against the rollout's) and a
per-sequence mean; SDPO's policy loss (``distillation_weight < 1``) reads the student's sampled-token
log-probabilities alone. Under ``logitless.install()`` ``compute_loss`` and ``_compute_rollout_logps`` are wrapped:
each model's own forward runs with the completion's positions as its targets, only where the loss reads them (the
completion mask, and the distillation mask for a teacher or a student that only distills), and its head's call gives
those values: the op's per-token log-probabilities (``logitless.integrations.trl.per_token_fields``) or the top-k
support's (``logitless.integrations._support``), with the class's own epilogue, float32 whatever the model's dtype
(stock's are in the logits' dtype). The divergence over the k tokens is TRL's own functions; the loss, its metrics,
generation, rewards and the teacher's synchronisation stay TRL's.

Only the releases whose methods this module reproduces are wrapped (``known``: the tokens of ``compute_loss``,
``_compute_teacher_student_logits``, ``_compute_self_distillation_loss``, SDPO's ``_compute_policy_loss``,
``_compute_rollout_logps``, ``_forward_logits`` and the two loss functions); another release keeps TRL's code, with a
warning. A call keeps TRL's path, counted by reason in ``audit()["integrations"]["trl"]["sdpo" | "sdft"]``: the
``full_logits`` mode (its divergence reads the whole distribution), a teacher server, a sampled-token
``distillation_alpha`` other than 1 or a top-k mode without ``distillation_topk`` (TRL raises its error), an empty
prompt or completion, and a model whose class does not run a rewritten forward that reads its labels for its loss
alone.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

from logitless.integrations import _model_forward
from logitless.integrations._calls import Calls
from logitless.integrations._digest import digest, method_digest

__all__ = ["known", "report", "reset", "wrap_compute_loss", "wrap_rollout_logps"]

_SHARED = {
    "_compute_self_distillation_loss": "82ba7a0b78aee09334546ff4573d7fafa788cd8ddbc84988cca092b8a241d7b4",
    "_compute_rollout_logps": "18e46736d96f896fd053fc863fc6f51d63c412887ffe255953b9b5dc7fb872f0",
    "_forward_logits": "11fc655d174d89ea8c1b1d4a69e7e551cc54737831ca4b3c75b7cf00a869c0e6",
}
# sha256 of the token streams (comments and blank lines aside) of the methods this module reproduces, by trainer:
# TRL 1.14.2, 1.15.0 and 1.16.0 have the same ones.
_KNOWN = {
    "SDPOTrainer": {
        **_SHARED,
        "compute_loss": "5cd9968622fa3e870d8018288d8cba2a898b71187ae73559c3f1f47cf66fe01f",
        "_compute_teacher_student_logits": "45d617cb13fd6e37a4209f892fcf120f0ad6908165c50358185b870af5829735",
        "_compute_policy_loss": "eb6a83979b2348fb5c37be6426276479f5a3f2081c0782c48f6bba7493aba83b",
    },
    "SDFTTrainer": {
        **_SHARED,
        "compute_loss": "269dc0ab4185d5f79238f54b6497637b09f20a6d0a5ae8b2e451b8d325462ec3",
        "_compute_teacher_student_logits": "fb3869bcd033a1f4ead142d8d28a09b7e3099361cabf8250cf2b2869a14d973c",
    },
}
# The loss module's functions the fused loss reproduces (the sampled-token and top-k losses) or calls (the clipping).
_FUNCTIONS = {
    "compute_sampled_token_self_distillation_loss": "9cb1fb526e94a13d08cc563c3e699a9e22f4f23eadb3e7e0c6e9de05ba35d842",
    "compute_topk_self_distillation_loss": "f4efaa507103c1472bcde55590dd7065c97436822594a447178c62c6d3ce3598",
    "apply_importance_sampling_clipping": "311c9639ced51bd60608cee1bb487e7a03ec80f50e49c92b0ac81784353d1cbc",
}
_CALLS = {"sdpo": Calls(), "sdft": Calls()}


def reset() -> None:
    for calls in _CALLS.values():
        calls.reset()


def report() -> dict[str, Any]:
    return {kind: calls.report() for kind, calls in _CALLS.items()}


def _trainer_kind(cls: type) -> str | None:
    """Which of the two trainers ``cls`` is (or derives from), by the name TRL gave it."""
    for klass in cls.__mro__:
        if klass.__name__ in _KNOWN:
            return klass.__name__
    return None


def known(trainer_class: type) -> bool:
    """Whether ``trainer_class`` defines the methods (and its module the loss functions) this module reproduces."""
    name = _trainer_kind(trainer_class)
    if name is None:
        return False
    if any(method_digest(trainer_class, m) != want for m, want in _KNOWN[name].items()):
        return False
    owner = next(c for c in trainer_class.__mro__ if c.__name__ == name)
    module = sys.modules.get(owner.__module__)
    return all(digest(getattr(module, f, None)) == want for f, want in _FUNCTIONS.items())


def _count(trainer: Any, reason: str | None) -> None:
    _CALLS["sdpo" if _trainer_kind(type(trainer)) == "SDPOTrainer" else "sdft"].count(reason)


def wrap_compute_loss(original: Callable[..., Any]) -> Callable[..., Any]:
    """``SDPOTrainer.compute_loss`` / ``SDFTTrainer.compute_loss`` fused (installed only on a class ``known``
    accepts)."""

    @functools.wraps(original)
    def compute_loss(self: Any, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:  # fmt: skip
        plan = _plan(self, model, inputs, return_outputs)
        if isinstance(plan, str):
            _count(self, plan)
            return original(self, model, inputs, return_outputs, num_items_in_batch)
        loss = _fused_loss(self, model, inputs, plan)
        if loss is None:
            _count(self, "shift-labels-not-read")  # a forward's loss read other targets than these
            return original(self, model, inputs, return_outputs, num_items_in_batch)
        _count(self, None if plan.fused else "materialised")
        accumulation_scale = self.current_gradient_accumulation_steps if self.model.training else 1.0
        return loss / accumulation_scale

    compute_loss.__logitless_wrapped__ = original  # type: ignore[attr-defined]
    return compute_loss


def wrap_rollout_logps(original: Callable[..., Any]) -> Callable[..., Any]:
    """``_compute_rollout_logps`` (the student's log-probabilities when a batch is sampled, for the importance
    ratios of the later steps that reuse it) fused."""

    @functools.wraps(original)
    def _compute_rollout_logps(self: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                               completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> Any:  # fmt: skip
        call = (self, prompt_ids, prompt_mask, completion_ids, completion_mask)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self.args.gradient_accumulation_steps % generate_every == 0:
            return original(*call)  # TRL computes nothing then
        lm = _student(self, self.model)
        if isinstance(lm, str) or prompt_ids.size(1) == 0 or completion_ids.size(1) == 0:
            _count(self, lm if isinstance(lm, str) else "empty-prompt-or-completion")
            return original(*call)
        plan = _Plan(lm, None)
        with torch.no_grad():
            logps = _completion_logps(plan, lm, self.model, torch.cat([prompt_ids, completion_ids], dim=1),
                                      torch.cat([prompt_mask, completion_mask], dim=1), completion_ids,
                                      completion_mask, self.temperature)  # fmt: skip
        if logps is None:
            _count(self, "shift-labels-not-read")
            return original(*call)
        _count(self, None if plan.fused else "materialised")
        return logps

    _compute_rollout_logps.__logitless_wrapped__ = original  # type: ignore[attr-defined]
    return _compute_rollout_logps


class _Plan:
    """The models whose classes run the rewritten forward (the teacher's None when the loss reads the student's
    alone); ``fused`` turns False when a forward took its stock path (exact values from its logits)."""

    def __init__(self, student: Any, teacher: Any) -> None:
        self.student = student
        self.teacher = teacher
        self.fused = True


def _student(trainer: Any, model: Any) -> Any:
    if not _model_forward.installed_and_idle():
        return "not-installed"
    return _model_forward.rewritten_lm(trainer, model)


def _distillation_weight(trainer: Any) -> float:
    # SDFT has no policy loss: it always distills.
    return float(getattr(trainer.args, "distillation_weight", 1.0))


def _plan(trainer: Any, model: Any, inputs: Any, return_outputs: bool) -> _Plan | str:
    """The models of a fused step, or why the step keeps TRL's path."""
    if return_outputs:
        return "outputs-requested"  # TRL raises its error
    if getattr(trainer, "use_teacher_server", False):
        return "teacher-server"  # the teacher's log-probabilities come from the server; only the student runs here
    if inputs["prompt_ids"].size(1) == 0 or inputs["completion_ids"].size(1) == 0:
        return "empty-prompt-or-completion"  # TRL's slices then do not pick the completion's predictors
    student = _student(trainer, model)
    if isinstance(student, str):
        return student
    if _distillation_weight(trainer) == 0.0:
        return _Plan(student, None)  # SDPO's policy loss alone
    mode = trainer.args.distillation_mode
    if mode not in ("sampled_token", "topk_logits"):
        return f"mode-{mode}"
    if mode == "sampled_token" and float(trainer.args.distillation_alpha) != 1.0:
        return "sampled-token-alpha"  # TRL raises its error (the sampled token's loss is the reverse KL's)
    if mode == "topk_logits" and trainer.args.distillation_topk is None:
        return "topk-unset"  # TRL raises its error
    if inputs["teacher_input_ids"].size(1) <= inputs["completion_ids"].size(1):
        return "empty-prompt-or-completion"
    teacher = _model_forward.rewritten_lm(trainer, trainer.teacher_model)
    if isinstance(teacher, str):
        return f"teacher-{teacher}"
    return _Plan(student, teacher)


def _completion_logps(plan: _Plan, lm: Any, forward: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      completion_ids: torch.Tensor, keep: torch.Tensor, temperature: float) -> torch.Tensor | None:
    """Each completion token's log-probability (``[batch, completion]``, zero where ``keep`` is 0) under ``lm``, the
    model (one of ``plan``'s) that ``forward`` runs, as TRL's ``selective_log_softmax`` of its temperature-scaled
    logits gives it; None when the head's fields do not cover those positions."""
    from logitless.integrations.trl import per_token_fields

    width, length = input_ids.size(1), completion_ids.size(1)
    # Position p predicts token p + 1: the completion's tokens are the targets of the last `length` positions but one.
    start = width - length - 1
    kept = keep != 0
    shift_labels = torch.full_like(input_ids, -100)
    shift_labels[:, start : width - 1] = torch.where(kept, completion_ids, -100)
    fields, _, fused = per_token_fields(lm, forward, (), {"input_ids": input_ids, "attention_mask": attention_mask},
                                        None, shift_labels, None, temperature, False,
                                        frozenset({"log_probs"}))  # fmt: skip
    covered = fields["label_mask"]
    if covered.shape != input_ids.shape or not bool((covered[:, start : width - 1] == kept).all()):
        return None
    plan.fused = plan.fused and fused
    return fields["log_probs"][:, start : width - 1]


def _support(plan: _Plan, lm: Any, forward: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int,
             keep: torch.Tensor, temperature: float, top_k: int, ids: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The log-probabilities over each completion position's ``top_k`` most likely tokens, then ``ids``
    (``[batch, completion, e]``), under ``lm``, the model (one of ``plan``'s) that ``forward`` runs: ``{"ids",
    "log_probs"}``, ``[batch, completion, top_k + e]``, zero where ``keep`` is 0 (``logitless.integrations._support``);
    None when the head computed neither them nor the logits."""
    from logitless import _state
    from logitless.integrations._support import Support, materialised_support

    width = input_ids.size(1)
    start = width - length - 1  # position p predicts token p + 1
    rows = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    rows[:, start : width - 1] = keep != 0
    full_ids = torch.zeros((*input_ids.shape, ids.size(-1)), dtype=torch.long, device=input_ids.device)
    full_ids[:, start : width - 1] = ids
    support = Support(rows, top_k, full_ids)
    capture = _state.Capture(temperature=temperature, outputs=frozenset(), support=support)
    # Labels the loss branch runs on (the forward's own loss is not read).
    labels = torch.full_like(input_ids, -100)
    with _state.capturing(capture):
        out = forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
    fields = capture.result
    if fields is None:
        logits = getattr(out, "logits", None)
        if logits is None or tuple(logits.shape[:-1]) != tuple(rows.shape):
            return None
        # The forward took its stock path (counted with its reason): exact values from its logits.
        if capture.refused is None:
            _state.record(lm, "trl-materialised")
        fields = materialised_support(logits, support, temperature)
        plan.fused = False
    return {name: value[:, start : width - 1] for name, value in fields.items()}


def _loss_mask(trainer: Any, inputs: Any) -> torch.Tensor:
    """The positions the distillation loss counts, as each trainer's ``_compute_teacher_student_logits`` forms
    them."""
    completion_mask = inputs["completion_mask"]
    if _trainer_kind(type(trainer)) == "SDFTTrainer":
        # SDFT skips the first completion tokens (teacher-prompt artifacts).
        if trainer.num_loss_tokens_to_skip > 0:
            positions = torch.arange(completion_mask.size(1), device=completion_mask.device).unsqueeze(0)
            return completion_mask * (positions >= trainer.num_loss_tokens_to_skip).long()
        return completion_mask
    self_distillation_mask = inputs.get("self_distillation_mask")
    if self_distillation_mask is None:
        return completion_mask
    return completion_mask * self_distillation_mask.unsqueeze(1)


def _fused_loss(trainer: Any, model: Any, inputs: Any, plan: _Plan) -> torch.Tensor | None:
    """The step's loss as TRL's ``compute_loss`` computes it (before its division by the accumulation steps), from
    the completions' log-probabilities; None when a forward's fields do not cover them."""
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    weight = _distillation_weight(trainer)
    loss_mask = _loss_mask(trainer, inputs)
    # The student's tokens that the loss reads: the policy loss reads every completion token, the distillation
    # loss only those it counts.
    student_keep = completion_mask if weight < 1.0 else loss_mask
    student_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    student_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    top_k = 0
    if plan.teacher is not None and trainer.args.distillation_mode == "topk_logits":
        top_k = int(trainer.args.distillation_topk)
    student_topk = None
    if top_k:
        # Each position's top-k (with gradients), and the sampled token's (the policy loss, the importance ratio).
        fields = _support(plan, plan.student, model, student_ids, student_mask, completion_ids.size(1), student_keep,
                          trainer.temperature, top_k, completion_ids.unsqueeze(-1))  # fmt: skip
        if fields is None:
            return None
        student = fields["log_probs"][..., top_k]
        student_topk, topk_ids = fields["log_probs"][..., :top_k], fields["ids"][..., :top_k]
    else:
        student = _completion_logps(plan, plan.student, model, student_ids, student_mask, completion_ids, student_keep,
                                    trainer.temperature)  # fmt: skip
        if student is None:
            return None
    if plan.teacher is None:
        return _policy_loss(trainer, inputs, student)
    # The teacher after the student, as TRL runs them (a live teacher in training mode draws dropout's numbers).
    with torch.no_grad(), trainer._get_teacher_context_for_self_distillation():
        if top_k:
            fields = _support(plan, plan.teacher, trainer.teacher_model, inputs["teacher_input_ids"],
                              inputs["teacher_attention_mask"], completion_ids.size(1), loss_mask,
                              trainer.temperature, 0, topk_ids)  # fmt: skip
            teacher = fields["log_probs"] if fields is not None else None
        else:
            teacher = _completion_logps(plan, plan.teacher, trainer.teacher_model, inputs["teacher_input_ids"],
                                        inputs["teacher_attention_mask"], completion_ids, loss_mask,
                                        trainer.temperature)  # fmt: skip
    if teacher is None:
        return None
    per_token_loss = (
        _topk_divergence(trainer, student_topk, teacher) if student_topk is not None
        else (student - teacher).detach() * student
    )  # fmt: skip
    if weight == 1.0:
        return _distillation_loss(trainer, model, inputs, student, per_token_loss, loss_mask)
    policy = _policy_loss(trainer, inputs, student)
    distillation = _distillation_loss(trainer, model, inputs, student, per_token_loss, loss_mask)
    return (1 - weight) * policy + weight * distillation


def _topk_divergence(trainer: Any, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``compute_topk_self_distillation_loss`` from the student's top-k log-probabilities and the teacher's at the
    same ids: TRL's tail bucket or renormalisation, then its divergence (its own functions, on ``[batch,
    completion, k]``)."""
    module = sys.modules[_owner_module(trainer)]
    if trainer.args.distillation_add_tail:
        student, teacher = module.add_tail_bucket(student), module.add_tail_bucket(teacher)
    else:
        student = student - torch.logsumexp(student, dim=-1, keepdim=True)
        teacher = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
    return module.compute_divergence(student, teacher, trainer.args.distillation_alpha)  # type: ignore[no-any-return]


def _distillation_loss(trainer: Any, model: Any, inputs: Any, student: torch.Tensor, per_token_loss: torch.Tensor,
                       loss_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``_compute_self_distillation_loss`` from the student's log-probabilities of the sampled tokens and the mode's
    per-token loss."""
    mode = "train" if model.training else "eval"
    if loss_mask.sum() == 0:
        trainer._log_self_distillation_metric(mode, 0.0)
        return student.sum() * 0.0  # attached to the student's graph: backward gives zero gradients
    old_per_token_logps = inputs.get("old_per_token_logps")
    if trainer.args.distillation_is_clip is not None and old_per_token_logps is not None:
        clipping = sys.modules[_owner_module(trainer)].apply_importance_sampling_clipping
        per_token_loss = clipping(per_token_loss, student, old_per_token_logps, trainer.args.distillation_is_clip)
    counted = per_token_loss * loss_mask
    loss = (counted.sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean()
    mean_distill_loss = counted.sum() / loss_mask.sum().clamp(min=1.0)
    trainer._log_self_distillation_metric(mode, trainer.accelerator.gather(mean_distill_loss).mean().item())
    return loss


def _policy_loss(trainer: Any, inputs: Any, per_token_logps: torch.Tensor) -> torch.Tensor:
    """SDPO's ``_compute_policy_loss`` (a GRPO-style clipped objective), from the log-probabilities."""
    completion_mask = inputs["completion_mask"]
    old_per_token_logps = inputs.get("old_per_token_logps")
    old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    if trainer.importance_sampling_level == "sequence":
        log_ratio = (log_ratio * completion_mask).sum(-1, keepdim=True) / completion_mask.sum(
            -1, keepdim=True
        ).clamp(min=1.0)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    counted = per_token_loss * completion_mask
    if trainer.loss_type == "grpo":
        loss = (counted.sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
    elif trainer.loss_type in ("bnpo", "dapo"):
        loss = counted.sum() / completion_mask.sum().clamp(min=1.0)
    elif trainer.loss_type == "dr_grpo":
        loss = counted.sum() / (per_token_loss.size(0) * trainer.max_completion_length)
    else:
        raise ValueError(f"Unsupported loss_type: {trainer.loss_type}")
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode]["self_distillation/policy_loss"].append(
        trainer.accelerator.gather(loss.detach()).mean().item()
    )
    return loss


def _owner_module(trainer: Any) -> str:
    """The module of the TRL class ``trainer`` is (or derives from): where its loss functions live."""
    name = _trainer_kind(type(trainer))
    return next(c for c in type(trainer).__mro__ if c.__name__ == name).__module__
