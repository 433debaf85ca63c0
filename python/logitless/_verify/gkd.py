"""TRL's GKDTrainer step under logitless on one class: its loss against a float64 reference from the logits the
model's own forward returns (stock, no labels), with a teacher that is the same model with a perturbed head."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from logitless._verify import distill

# Statuses, in the report's column order.
FUSED = "fused"  # the step ran fused and its loss equals the reference
STOCK = "trl-path"  # the step kept TRL's code (the reason says why) and its loss equals the reference
NA = "n/a"
MISMATCH = "MISMATCH"
STATUSES = [FUSED, STOCK, NA, MISMATCH]

_BETA = 0.5


def _trainer(teacher: torch.nn.Module) -> Any:
    """A GKDTrainer with only what its ``compute_loss`` reads (its __init__ builds a whole Trainer), that method as
    ``install()`` wraps it (verify patches the model alone, not TRL)."""
    from trl.experimental.gkd import GKDTrainer

    from logitless.integrations import trl_gkd

    original = GKDTrainer.__dict__["compute_loss"]
    original = getattr(original, "__logitless_wrapped__", original)

    class Wrapped(GKDTrainer):
        compute_loss = trl_gkd.wrap_compute_loss(original)

    trainer = Wrapped.__new__(Wrapped)
    trainer.teacher_model, trainer.beta = teacher, _BETA
    trainer.args = SimpleNamespace(torch_compile=False)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    return trainer


def _logits(model: torch.nn.Module, feed: dict[str, Any]) -> torch.Tensor:
    torch.manual_seed(1234)  # dropout drawn alike in both forwards of a model
    with torch.no_grad():
        return model(**feed).logits


def check(model: torch.nn.Module, base_feed: dict[str, Any], labels: torch.Tensor,
          rebuild: Callable[[], torch.nn.Module]) -> dict[str, Any]:  # fmt: skip
    """GKD's ``compute_loss`` (wrapped by ``install()``) with student ``model`` and a teacher with a perturbed head
    (a copy, or ``rebuild()``'s identical model where a copy cannot be made), against the reference."""
    try:
        from trl.experimental.gkd import gkd_trainer
    except ImportError:
        return {"status": NA, "reason": "this TRL has no trl.experimental.gkd"}
    from logitless.integrations import trl_gkd

    if not trl_gkd.known(gkd_trainer.GKDTrainer):
        return {"status": NA, "reason": "another TRL release's GKDTrainer (logitless leaves it to TRL)"}
    if not isinstance(base_feed.get("input_ids"), torch.Tensor):
        return {"status": NA, "reason": "the class takes no input_ids (GKD's step passes input_ids and attention_mask)"}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return {"status": NA, "reason": f"output embeddings are a {type(head).__name__}, with no weight to perturb"}
    teacher = distill.perturbed_teacher(model, rebuild)
    feed = {"input_ids": base_feed["input_ids"],
            "attention_mask": base_feed.get("attention_mask", torch.ones_like(base_feed["input_ids"]))}  # fmt: skip
    try:
        logits_s, logits_t = _logits(model, feed), _logits(teacher.eval(), feed)
    except Exception as exc:  # noqa: BLE001 - reported per class
        # GKD's step passes input_ids and attention_mask only: a class that needs more fails under stock TRL too.
        return {"status": NA, "reason": f"forward of input_ids and attention_mask: {type(exc).__name__}: {exc}"[:300]}
    if logits_s.shape[:2] != labels.shape or logits_t.shape != logits_s.shape:
        return {"status": NA, "reason": "the logits do not line up with the labels"}
    kept = labels[:, 1:] != -100
    reference = distill.jsd64(logits_s[:, :-1], logits_t[:, :-1], kept, _BETA, 1.0)
    before = trl_gkd.report()
    torch.manual_seed(1234)
    try:
        with torch.no_grad():
            loss = _trainer(teacher).compute_loss(model, {**feed, "labels": labels})
    except Exception as exc:  # noqa: BLE001 - reported per class
        return {"status": MISMATCH, "reason": f"GKD's step failed where stock ran: {type(exc).__name__}: {exc}"[:300]}
    after = trl_gkd.report()
    fused = after["fused"] > before["fused"]
    reason = "" if fused else ", ".join(k for k, v in after["stock"].items() if v > before["stock"].get(k, 0))
    got = float(loss)
    rel = abs(got - reference) / max(abs(reference), 1e-12)
    # TRL's own code computes the JSD in float32 from log-softmaxes of size ~log V: absolute errors near 1e-7.
    rtol, atol = (1e-5, 1e-8) if fused else (1e-4, 1e-6)
    if rel <= rtol or abs(got - reference) <= atol:
        return {"status": FUSED if fused else STOCK, "loss_rel": rel, "reason": reason}
    return {"status": MISMATCH, "loss_rel": rel, "reason": f"{got!r} != reference {reference!r} ({reason or 'fused'})"}
