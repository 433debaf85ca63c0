"""The DistillationTrainer drop-in on one class: its divergence against a float64 reference from the logits the
model's own forward returns (stock, no labels), with a teacher that is the same model with a perturbed head."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

# Statuses, in the report's column order.
CLASS = "class-epilogue"  # the class's own epilogue resolved; the divergence equals the reference
CORRECTED = "corrected"  # the same, where TRL's config guess would differ from what the forward does
GUESS = "trl-guess"  # not resolved: TRL's guess is used (as TRL would), and it equals the reference
GUESS_WRONG = "trl-guess-wrong"  # not resolved, and TRL's guess (logitless then uses it) is not what the forward does
NA = "n/a"
MISMATCH = "MISMATCH"
STATUSES = [CLASS, CORRECTED, GUESS, GUESS_WRONG, NA, MISMATCH]

_BETA, _TEMPERATURE = 0.5, 0.8


def trl_guess(config: Any) -> tuple[float, float | None]:
    """The scale and softcap TRL 1.16's ``DistillationTrainer._compute_loss`` reads from a config (its names, in its
    order), to report where that differs from the class's forward."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None) if scale is None else scale
    scaling = getattr(text, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if getattr(text, "model_type", None) == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else scale), getattr(text, "final_logit_softcapping", None)


def _forward(model: torch.nn.Module, feed: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """What TRL's ``DistillationTrainer._get_last_hidden_state`` hands the divergence (``model.base_model``'s last
    hidden state) and the logits of the model's own no-labels forward, dropout drawn alike."""
    torch.manual_seed(1234)
    with torch.no_grad():
        hidden = model.base_model(**feed).last_hidden_state
    torch.manual_seed(1234)
    with torch.no_grad():
        logits = model(**feed).logits
    return hidden, logits


def jsd64(logits_s: torch.Tensor, logits_t: torch.Tensor, mask: torch.Tensor, beta: float, temperature: float) -> float:
    """The generalized JSD (``0 < beta < 1``) of the two logits' distributions at ``temperature``, in float64, summed
    over the positions ``mask`` keeps and divided by their count."""
    log_s = torch.log_softmax(logits_s.double() / temperature, -1)
    log_t = torch.log_softmax(logits_t.double() / temperature, -1)
    log_m = torch.logaddexp(log_s + math.log(1 - beta), log_t + math.log(beta))
    per = beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)
    return float(per[mask].sum() / mask.sum())


def perturbed_teacher(model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A teacher for ``model``: a copy (or ``rebuild()``'s identical model where a copy cannot be made) whose output
    embeddings are perturbed by their own standard deviation."""
    try:
        teacher = copy.deepcopy(model)
    except RuntimeError:  # non-leaf tensors held by the model (RecurrentGemma's)
        teacher = rebuild()
    with torch.no_grad():
        t_head = teacher.get_output_embeddings().weight
        t_head.add_(torch.randn(t_head.shape, generator=torch.Generator().manual_seed(7)) * t_head.std())
    return teacher


def check(model: torch.nn.Module, base_feed: dict[str, Any], rebuild: Callable[[], torch.nn.Module]) -> dict[str, Any]:
    """The drop-in as DistillationTrainer calls it (inside its wrapped ``_compute_loss``, on the backbone's hidden
    states, TRL's guessed scale and softcap passed), student ``model`` and a teacher with a perturbed head (a copy,
    or ``rebuild()``'s identical model where a copy cannot be made), against the reference."""
    from logitless.integrations import trl_distillation as drop_in

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return {"status": NA, "reason": f"output embeddings are a {type(head).__name__}, not an nn.Linear"}
    teacher = perturbed_teacher(model, rebuild)
    try:
        h_s, logits_s = _forward(model, base_feed)
        h_t, logits_t = _forward(teacher, base_feed)
    except Exception as exc:  # noqa: BLE001 - reported per class
        return {"status": NA, "reason": f"backbone or no-labels forward: {type(exc).__name__}: {exc}"[:300]}
    if h_s.shape[:-1] != logits_s.shape[:-1] or h_s.ndim != 3:
        return {"status": NA, "reason": "the backbone's hidden states do not line up with the logits"}
    mask = torch.rand(h_s.shape[:-1], generator=torch.Generator().manual_seed(3)) < 0.7
    mask[0, 0] = True
    reference = jsd64(logits_s, logits_t, mask, _BETA, _TEMPERATURE)
    found = drop_in.class_epilogue(model)
    guess_s, guess_t = trl_guess(model.config), trl_guess(teacher.config)
    try:
        with drop_in._running(model, teacher), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the unchecked-epilogue warning: reported here instead
            loss, _, _ = drop_in.chunked_divergence_loss(
                h_s, h_t, head.weight, teacher.get_output_embeddings().weight, mask.long(), _BETA,
                student_lm_head_bias=head.bias, teacher_lm_head_bias=teacher.get_output_embeddings().bias,
                student_logit_scale=guess_s[0], teacher_logit_scale=guess_t[0],
                student_final_logit_softcapping=guess_s[1], teacher_final_logit_softcapping=guess_t[1],
                temperature=_TEMPERATURE,
            )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - reported per class
        if isinstance(found, str):
            # TRL's guess on TRL's inputs: a head whose weight does not take the backbone's hidden states (ELECTRA's
            # projection) fails in TRL's own kernel alike.
            return {"status": NA, "reason": f"{found}; TRL's inputs fail: {type(exc).__name__}: {exc}"[:300]}
        return {"status": MISMATCH, "reason": f"drop-in failed: {type(exc).__name__}: {exc}"[:300]}
    got = float(loss)
    rel = abs(got - reference) / max(abs(reference), 1e-12)
    equal = rel <= 1e-5 or abs(got - reference) <= 1e-8
    if isinstance(found, str):
        return {"status": GUESS if equal else GUESS_WRONG, "loss_rel": rel, "reason": found}
    if not equal:
        return {"status": MISMATCH, "loss_rel": rel,
                "reason": f"{got!r} != reference {reference!r} with {drop_in.described(found)}"}  # fmt: skip
    guessed = {"logit_scale_multiply": guess_s[0], "logit_softcapping": guess_s[1]}
    end = found.get("vocab_slice_end")
    cut = end is not None and end < head.weight.shape[0]
    differs = cut or drop_in._differs({k: v for k, v in found.items() if k != "vocab_slice_end"}, guessed)
    return {"status": CORRECTED if differs else CLASS, "loss_rel": rel,
            "reason": f"TRL's guess {guessed}, the forward's {drop_in.described(found)}" if differs else ""}
