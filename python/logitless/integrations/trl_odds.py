"""TRL's ``ORPOTrainer`` and ``CPOTrainer`` with their log-probabilities from logitless's op, no logits formed.

Stock, both trainers' ``concatenated_forward`` runs the model on the chosen and rejected sequences stacked
(``[2B, T]``) for its logits (``[2B, T, V]``, in the model's dtype), then takes from them: each sequence's summed or
averaged log-probability of its labels (``get_batch_logps``), the cross-entropy of the chosen rows (ORPO: every
attended token, prompt included; CPO: the labels, unless ``cpo_alpha`` is 0), and the logits themselves, which
``get_batch_loss_metrics`` only reads for their mean (the ``logits/chosen`` and ``logits/rejected`` metrics). Under
``logitless.install()`` ``concatenated_forward`` is wrapped: the model's own forward runs with every position's next
token as its target, and its head's call returns the per-token log-probabilities and mean logits from the op
(``logitless.integrations.trl.per_token_fields``, the class's own epilogue); the same sums, averages and means are
taken from them, and each "logits" slot of the result holds the per-position mean logits, whose mean is the
metric's. The log-probabilities are float32 whatever the model's dtype (stock's are in the logits' dtype).

Only the releases whose ``concatenated_forward``, ``get_batch_logps`` and ``get_batch_loss_metrics`` this module
reproduces are wrapped (``known``: TRL 0.19 to 0.24 in ``trl.trainer``, 1.5 to 1.16 in ``trl.experimental``, by the
sha256 of their tokens); another release keeps TRL's code, with a warning. A call keeps TRL's path, counted by reason
in ``audit()["integrations"]["trl"]["orpo" | "cpo"]``, for an encoder-decoder model, a subclass's own
``get_batch_logps`` or ``get_batch_loss_metrics``, a model whose class does not run a rewritten forward, and the
other cases ``_plan`` names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from logitless.integrations import _model_forward
from logitless.integrations._calls import Calls
from logitless.integrations._digest import method_digest

__all__ = ["known", "report", "reset", "wrap_cpo_forward", "wrap_orpo_forward"]

_METHODS = ("concatenated_forward", "get_batch_logps", "get_batch_loss_metrics")


@dataclass(frozen=True)
class _Release:
    """What differs between the releases of a trainer's ``concatenated_forward`` this module reproduces."""

    padding: str  # the trainer attribute its input ids are padded with
    label_pad: bool  # the release reads ``label_pad_token_id`` (fused only when it is -100, the cross-entropy's)


# By trainer, the sha256 of the token streams of _METHODS (comments and blank lines aside) of each known release.
_KNOWN: dict[str, dict[tuple[str, str, str], _Release]] = {
    "ORPOTrainer": {
        # TRL 1.5.1 to 1.16.0 (trl.experimental.orpo)
        ("1f8c5d6c8a7463fb99c55bb9edbdcf3d9a6331f10d84d07ab1690a1c73f205d6",
         "6a5c25a1014a5dc837844e9751891c7f215756e1e19bd5fadbbc46ced5049888",
         "a51b4bc4a7fe4bc4020b292af7a936f3b3bd93a1afaabe4f2767e955212ffbb1"): _Release("padding_value", False),
        # TRL 0.19.1 to 0.24.0 (trl.trainer.orpo_trainer)
        ("57bf5900728a3c5bdb0c9784098e91b4a0591120640356de4aa6600a626f6c4d",
         "c7cab768c7c60de87765c754de419a2e1d92d097bf0777504e16b4fde1438b6d",
         "81f4e0acf51eab27b927fec7bc2feb371704b8b155276f2f558fe5ef244033c7"): _Release("padding_value", True),
    },
    "CPOTrainer": {
        ("45ff75504abbee11fe715e1596db8ac90220ed691396e1dce24dca1a6ba11d79",
         "06fc968791d429fafec921400edced016564e25a1efab2511c699454c39e13ab",
         "c70dd02572ffa6c39484d923a93654b6f2ba0e77880e3c6c37db8ddfecbb3288"): _Release("pad_token_id", False),
        ("c2b9a68f545bf181bed30cb98ffd8f566dcb129e979043a468127439f2368200",
         "0eb1a5f4dd8934dc84e466a9864d5d5b2ecfd65302e8516d521513aa1535e8f6",
         "73ca0ad0ce225e357cc546182a1815c3a7b13906eaa9f7315a18aec29b9c75c2"): _Release("padding_value", True),
    },
}  # fmt: skip

# Calls whose values logitless computed, and those left to TRL's code (by reason), by trainer.
_CALLS = {"orpo": Calls(), "cpo": Calls()}


def reset() -> None:
    for calls in _CALLS.values():
        calls.reset()


def report() -> dict[str, Any]:
    return {kind: calls.report() for kind, calls in _CALLS.items()}


def _count(kind: str, reason: str | None) -> None:
    _CALLS[kind].count(reason)


def _defined(trainer_class: type, name: str) -> Any:
    """``name`` as the nearest class of ``trainer_class``'s MRO defines it (a staticmethod object, not its function)."""
    return next((c.__dict__[name] for c in trainer_class.__mro__ if name in c.__dict__), None)


def _release(trainer_class: type) -> _Release | None:
    releases = _KNOWN.get(trainer_class.__name__, {})
    return releases.get(tuple(method_digest(trainer_class, name) for name in _METHODS))  # type: ignore[arg-type]


def known(trainer_class: type) -> bool:
    """Whether ``trainer_class`` defines the methods this module reproduces, as one release of TRL wrote them."""
    return _release(trainer_class) is not None


def wrap_orpo_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    """``ORPOTrainer.concatenated_forward`` fused (installed only on a class ``known`` accepts)."""
    return _wrap(original, "orpo")


def wrap_cpo_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    """``CPOTrainer.concatenated_forward`` fused (installed only on a class ``known`` accepts)."""
    return _wrap(original, "cpo")


def _wrap(original: Callable[..., Any], kind: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def concatenated_forward(self: Any, model: Any, batch: Any) -> Any:
        owner = next((c for c in type(self).__mro__ if c.__dict__.get("concatenated_forward") is concatenated_forward),
                     None)  # fmt: skip
        plan = _plan(self, model, owner) if owner is not None else "unknown-release"
        if isinstance(plan, str):
            _count(kind, plan)
            return original(self, model, batch)
        result, reason = _fused(self, model, batch, plan, kind)
        _count(kind, reason)
        return original(self, model, batch) if result is None else result

    concatenated_forward.__logitless_wrapped__ = original  # type: ignore[attr-defined]
    return concatenated_forward


@dataclass(frozen=True)
class _Plan:
    release: _Release
    lm: torch.nn.Module  # the model whose class runs the rewritten forward (under any DDP / PEFT wrapper)


def _plan(trainer: Any, model: Any, owner: type) -> _Plan | str:
    """What a fused call needs, or why the call keeps TRL's path."""
    if not _model_forward.installed_and_idle():
        return "not-installed"
    release = _release(owner)
    if release is None:
        return "unknown-release"  # a subclass replaced TRL's class's methods after install
    for name in ("get_batch_logps", "get_batch_loss_metrics"):
        if _defined(type(trainer), name) is not _defined(owner, name):
            return f"custom-{name.replace('_', '-')}"
    if getattr(trainer, "is_encoder_decoder", True):
        return "encoder-decoder"
    if release.label_pad and getattr(trainer, "label_pad_token_id", None) != -100:
        return "label-pad-token-id"  # that release's cross-entropy still ignores -100 alone
    lm = _model_forward.rewritten_lm(trainer, model)
    if isinstance(lm, str):
        return lm
    return _Plan(release=release, lm=lm)


def _fused(
    trainer: Any, model: Any, batch: Any, plan: _Plan, kind: str
) -> tuple[tuple[Any, ...] | None, str | None]:
    """``concatenated_forward``'s result as those releases compute it (decoder-only), from one forward, and why it
    was not fused: ``(None, reason)`` when the call keeps TRL's path; ``(result, "materialised")`` when the forward
    kept its stock path at run time (a hooked head, a loss of the user's), whose logits then gave exact values."""
    from logitless.integrations.trl import per_token_fields

    stacked = trainer.concatenated_inputs(batch, is_encoder_decoder=False,
                                          padding_value=getattr(trainer, plan.release.padding),
                                          device=trainer.accelerator.device)  # fmt: skip
    n_chosen = batch["chosen_labels"].shape[0]
    ids = stacked["concatenated_input_ids"]
    attention = stacked["concatenated_attention_mask"]
    labels = stacked["concatenated_labels"].to(ids.device)
    # Position t of a row predicts its token t + 1: ``kept`` positions count in the log-probabilities.
    kept = labels[:, 1:] != -100
    if kind == "orpo":
        # ORPO's chosen cross-entropy scores every attended next token, from the input ids.
        scored = attention[:, 1:] == 1
        # One pass gives one target per position: where both read one, the label must be the input token (it is in
        # the data TRL's collator builds; a collator of the user's might differ).
        if not bool(((labels[:, 1:] == ids[:, 1:]) | ~(kept & scored)).all()):
            return None, "labels-differ-from-input-ids"
        target = torch.where(kept, labels[:, 1:], torch.where(scored, ids[:, 1:], 0))
    else:
        scored = kept
        target = torch.where(kept, labels[:, 1:], 0)
    # Every position gets a target (0 where nothing reads it, as get_batch_logps's dummy) so that every position's
    # mean logit is computed: the metrics average all of them, padding included. The last has no next token; CPO's
    # metric reads it, so the targets go as shift_labels, and as labels too (the forward shifts them) for a forward
    # that does not hand shift_labels to its loss.
    shift_labels = torch.nn.functional.pad(target, (0, 1), value=0)
    kwargs: dict[str, Any] = {"attention_mask": attention}
    if trainer.aux_loss_enabled:
        kwargs["output_router_logits"] = True
    wanted = frozenset({"log_probs", "mean_logits"})
    labels_in = torch.nn.functional.pad(target, (1, 0), value=-100)
    fields, outputs, fused = per_token_fields(plan.lm, model, (ids,), kwargs, labels_in, shift_labels, None, 1.0,
                                              False, wanted)  # fmt: skip
    # Every target counts: a shorter or holed mask means the forward's loss read other labels than these.
    positions = target.shape[-1]
    if fields["label_mask"].shape[-1] < positions + (kind == "cpo") or not bool(fields["label_mask"].all()):
        return None, "shift-labels-not-read"
    log_probs = fields["log_probs"][:, :positions]
    mean_logits = fields["mean_logits"].detach()

    summed = (log_probs * kept).sum(-1)
    average = kind == "orpo" or trainer.loss_type in ("ipo", "simpo")
    all_logps = summed / kept.sum(-1) if average else summed
    if kind == "cpo" and trainer.cpo_alpha == 0:
        nll_loss = torch.tensor(0.0).to(trainer.accelerator.device)
    else:
        chosen = scored[:n_chosen]
        nll_loss = -(log_probs[:n_chosen] * chosen).sum() / chosen.sum()
    # ORPO's logits metrics read positions 0 to T-2, CPO's every position.
    means = mean_logits[:, :positions] if kind == "orpo" else mean_logits
    result = (all_logps[:n_chosen], all_logps[n_chosen:], means[:n_chosen], means[n_chosen:], nll_loss)
    if trainer.aux_loss_enabled:
        result = (*result, outputs.aux_loss)
    return result, None if fused else "materialised"
