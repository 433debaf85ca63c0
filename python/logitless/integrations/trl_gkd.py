"""TRL's ``GKDTrainer`` (``trl.experimental.gkd``, TRL 1.14 to 1.16) with its generalized JSD on
``logitless.linear_divergence``.

Stock, each step runs the student and the teacher for their logits (``[batch, seq, V]`` each, in the models'
dtype), then ``generalized_jsd_loss``: both log-softmaxes, their mixture and two KL terms, all ``[batch, seq, V]``,
masked where the shifted labels are ``-100`` and summed over the rest, divided by ``num_items_in_batch`` or their
count. Under ``logitless.install()`` ``GKDTrainer.compute_loss`` is wrapped: the teacher's forward runs first and its
head's call leaves its input, parameters and epilogue (``logitless.hf._captured_divergence``); the student's forward
then computes the divergence inside its head's call, so no logits are formed and every engine hook around the head
(ZeRO-3, FSDP2, offloading) runs as stock. Each model's epilogue is the one logitless's rewriter found in its class's
forward. The loss is the one ``generalized_jsd_loss`` returns; nothing else of the step changes (on-policy
generation, ``seq_kd``, the optimiser).

Only the ``compute_loss`` and ``generalized_jsd_loss`` these notes describe are wrapped (``known``: the tokens of
both, comments aside); another release's keep running as TRL wrote them, with a warning. A call keeps TRL's path,
counted by reason in ``audit()``, when it asks for the outputs (evaluation with ``compute_metrics`` reads the
student's logits; a loss-only evaluation step is fused), when a class does not run a rewritten forward that reads
its labels for its loss alone, when ``generalized_jsd_loss`` is overridden, and when a forward refuses the fusion at
run time (then the logits it returned, and the teacher's from a stock forward, go to TRL's own loss).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from logitless import _registry, _state
from logitless.integrations import _model_forward
from logitless.integrations._calls import Calls
from logitless.integrations._digest import method_digest

__all__ = ["known", "report", "reset", "wrap_compute_loss"]

# Steps whose loss logitless computed, and those it left to TRL's code (by reason).
_CALLS = Calls()
report, reset, _count = _CALLS.report, _CALLS.reset, _CALLS.count

# sha256 of the token streams (comments and blank lines aside) of the methods this module reproduces, by method:
# TRL 1.14.2, 1.15.0 and 1.16.0 have the same ones.
_KNOWN = {
    "compute_loss": {"48762386e9813981e0b38b3d12b57f8b69dfb48744428e5be21c713c814d880b"},
    "generalized_jsd_loss": {"4b073bda81525d1d8ee31ea7492788273442fd60243597610bc3d28982a333c7"},
}


def known(trainer_class: type) -> bool:
    """Whether ``trainer_class`` defines the ``compute_loss`` and ``generalized_jsd_loss`` this module reproduces."""
    return all(method_digest(trainer_class, name) in digests for name, digests in _KNOWN.items())


def wrap_compute_loss(original: Callable[..., Any]) -> Callable[..., Any]:
    """``GKDTrainer.compute_loss`` fused (installed only on a class ``known`` accepts)."""

    @functools.wraps(original)
    def compute_loss(self: Any, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:  # fmt: skip
        plan = _plan(self, model, inputs, return_outputs, _own_divergence(type(self), compute_loss))
        if isinstance(plan, str):
            _count(plan)
            return original(self, model, inputs, return_outputs, num_items_in_batch)
        loss = _fused_loss(self, model, inputs, num_items_in_batch, plan, original)
        empty_cache = original.__globals__.get("empty_cache")
        if callable(empty_cache):
            empty_cache()  # as TRL's step ends
        return loss

    compute_loss.__logitless_wrapped__ = original  # type: ignore[attr-defined]
    return compute_loss


def _own_divergence(cls: type, wrapper: Any) -> Any:
    """The ``generalized_jsd_loss`` of the class whose ``compute_loss`` is ``wrapper`` (TRL's, that ``known``
    checked): the one the fused loss reproduces."""
    for klass in cls.__mro__:
        if klass.__dict__.get("compute_loss") is wrapper:
            return getattr(klass, "generalized_jsd_loss", None)
    return None


@dataclass
class _Job:
    """What the student's head needs from the step (``_state.Capture.divergence``)."""

    beta: float
    temperature: float
    num_items_in_batch: Any
    # The positions whose next label is kept, ``[batch, seq]``: GKD's shift of the labels it passes, whatever each
    # forward's own loss does with them (BART's decoders, XLNet score them unshifted).
    mask: torch.Tensor
    teacher: Any = None


@dataclass(frozen=True)
class _Plan:
    student: dict[str, Any]  # keyword arguments of each model's forward
    teacher: dict[str, Any]


def _plan(trainer: Any, model: Any, inputs: Any, return_outputs: bool, jsd: Any) -> _Plan | str:
    """The forwards' arguments for a fused step, or why the step keeps TRL's path."""
    from logitless.integrations.hf_trainer import _compiled, _peft_base

    if not _model_forward.installed_and_idle():
        return "not-installed"
    if return_outputs:
        return "outputs-requested"  # prediction_step reads the student's logits
    if jsd is None or getattr(type(trainer), "generalized_jsd_loss", None) is not jsd:
        return "custom-divergence"
    batch = inputs if isinstance(inputs, Mapping) else {}
    if not all(isinstance(batch.get(k), torch.Tensor) for k in ("input_ids", "attention_mask", "labels")):
        return "no-labels"
    if _compiled(model) or getattr(getattr(trainer, "args", None), "torch_compile", False):
        return "compiled"
    teacher = getattr(trainer, "teacher_model", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(teacher, torch.nn.Module):
        return "no-teacher"
    forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    plans = []
    # Either model may be in eval mode (the teacher always is; the student in a loss-only evaluation step): nothing
    # reads their logits.
    for wrapped in (model, teacher):
        unwrapped = trainer.accelerator.unwrap_model(wrapped)
        peft = _peft_base(unwrapped)
        if peft is False:
            return "peft-prompt-learning"  # the wrapper adds to the labels
        lm = peft if peft is not None else unwrapped
        owner = next((cls for cls in type(lm).__mro__ if "forward" in cls.__dict__), None)
        if owner is None or not _registry.rewritten(owner):
            return "not-rewritten"
        elsewhere = _registry.labels_elsewhere(owner)
        if elsewhere is None or elsewhere["decoder_inputs"]:
            return "labels-read-elsewhere"
        # With labels, some forwards turn the cache off themselves (and warn): the stock call did not ask for one.
        plans.append({**forward, "use_cache": False} if elsewhere["disables_cache"] else dict(forward))
    return _Plan(student=plans[0], teacher=plans[1])


def _fused_loss(trainer: Any, model: Any, inputs: Any, num_items_in_batch: Any, plan: _Plan,
                original: Callable[..., Any]) -> Any:  # fmt: skip
    """The step's loss, as TRL 1.14-1.16's ``compute_loss`` computes it (temperature 1, its ``beta``), fused."""
    labels = inputs["labels"]
    mask = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)
    job = _Job(beta=float(trainer.beta), temperature=1.0, num_items_in_batch=num_items_in_batch, mask=mask)
    teacher_model = trainer.teacher_model
    teacher_model.eval()
    capture = _state.Capture(temperature=1.0, outputs=frozenset(), divergence=job)
    # The teacher first: the student's head needs its operands. Neither forward draws random numbers before the
    # student's (the teacher runs in eval mode), so dropout sees the stock sequence.
    with torch.no_grad(), _state.capturing(capture):
        teacher_model(**plan.teacher)
    if job.teacher is None:
        _count(f"teacher-{capture.refused or 'not-fused'}")
        return original(trainer, model, inputs, False, num_items_in_batch)
    capture = _state.Capture(temperature=1.0, outputs=frozenset(), divergence=job)
    with _state.capturing(capture):
        student_outputs = model(**plan.student)
    if capture.result is not None:
        _count(None)
        return capture.result["loss"]
    # The student's forward took its stock path (its reason counted with its class): TRL's loss of its logits
    # and of the teacher's, from a stock forward of the teacher.
    _count(f"student-{capture.refused or 'not-fused'}")
    with torch.no_grad():
        teacher_logits = teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return trainer.generalized_jsd_loss(
        student_logits=student_outputs.logits[:, :-1, :], teacher_logits=teacher_logits[:, :-1, :],
        labels=inputs["labels"][:, 1:], beta=trainer.beta, num_items_in_batch=num_items_in_batch,
    )  # fmt: skip
