"""The state rewritten forwards and the integrations share at run time: the installer's switches, the per-class
counts ``audit()`` reports, and the per-call contexts the integrations set around a forward (a per-token capture,
HF Trainer's label smoothing, a loss-only evaluation, kept logits, a uniform upstream gradient).

It imports nothing of logitless: everything above it (the ``__logitless__`` facade in ``_runtime``, the HF
adapter, the installer, the integrations) reads and sets it here.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "Capture",
    "Smoothing",
    "capturing",
    "current_capture",
    "current_smoothing",
    "enabled",
    "expecting_uniform_grad",
    "fuse_eval",
    "keeping_logits",
    "loss_only",
    "mode_reason",
    "record",
    "reset_counts",
    "return_logits",
    "runtime_counts",
    "set_enabled",
    "set_fuse_eval",
    "set_return_logits",
    "smoothing",
    "stock_loss",
    "uniform_grad_expected",
]

# Flipped by logitless.installer: a forward that outlives uninstall() (e.g. a bound method someone kept) must fall
# back to the stock statements rather than keep fusing.
_enabled = False
# Set by install() from its arguments or, when they are not given, from the environment (logitless._config).
_return_logits = False
_fuse_eval = False
# transformers' loss functions by loss type (LOSS_MAPPING), resolved on the first fused forward:
# `LOGITLESS=1 python -m logitless audit` installs the hook but must not import torch or transformers.
_stock_losses: dict[str, Any] = {}

_counts_lock = threading.Lock()
# "module.Class" -> {"fused": n, "stock": {reason: n}}
_counts: dict[str, dict[str, Any]] = {}


def set_enabled(value: bool) -> None:
    global _enabled
    _enabled = bool(value)


def set_return_logits(value: bool) -> None:
    global _return_logits
    _return_logits = bool(value)


def set_fuse_eval(value: bool) -> None:
    global _fuse_eval
    _fuse_eval = bool(value)


def enabled() -> bool:
    """Whether logitless is installed (a rewritten forward that outlives ``uninstall()`` runs its stock path)."""
    return _enabled


def fuse_eval() -> bool:
    return _fuse_eval


def stock_loss(loss_type: str) -> Any:
    """transformers' loss function for ``loss_type`` (``"ForCausalLM"``, ``"ForMaskedLM"``)."""
    loss = _stock_losses.get(loss_type)
    if loss is None:
        from transformers.loss import loss_utils

        loss = _stock_losses[loss_type] = getattr(loss_utils, f"{loss_type}Loss")
    return loss


def record(model: Any, reason: str | None) -> None:
    """Counts one labelled forward of ``model``'s class: fused (``None``) or stock with ``reason``."""
    cls = type(model)
    key = f"{cls.__module__}.{cls.__qualname__}"
    with _counts_lock:
        entry = _counts.setdefault(key, {"fused": 0, "stock": {}})
        if reason is None:
            entry["fused"] += 1
        else:
            entry["stock"][reason] = entry["stock"].get(reason, 0) + 1


def runtime_counts() -> dict[str, dict[str, Any]]:
    """A copy of the per-class counts of labelled forwards: fused, and stock by reason."""
    with _counts_lock:
        return {key: {"fused": v["fused"], "stock": dict(v["stock"])} for key, v in _counts.items()}


def reset_counts() -> None:
    with _counts_lock:
        _counts.clear()


@dataclass
class Capture:
    """A forward run for its per-token outputs (logitless.integrations.trl): the rewritten forward's ``hf_loss``
    computes them with the class's own epilogue and leaves them here; eval mode does not matter (reference models
    run in it) and no logits are formed."""

    temperature: float
    outputs: frozenset[str]
    fp32_head: bool = False
    # The forward's own loss (the fused loss op) with the statistics of each position beside it, instead of the
    # per-token log-probabilities: TRL's chunked SFT head before 1.15 (logitless.integrations.trl_legacy). ``result``
    # then holds ``entropy``, ``is_top1`` and ``label_mask``.
    loss_and_stats: bool = False
    # The caller expects the log-probabilities to be differentiated with one value at every counted position (TRL's
    # SFT mean): the op forms that gradient in the forward pass and checks the guess in backward.
    uniform_grad: bool = False
    # A distillation step (logitless.integrations.trl_gkd): the head's call computes nothing of its own. A teacher's
    # forward (``divergence.teacher`` None) leaves its head's operands there; a student's then computes the
    # divergence from them, ``result["loss"]``.
    divergence: Any = None
    # Log-probabilities over a per-position token support (logitless.integrations._support.Support: top-k ids, given
    # ids): the head's call computes them into ``result`` (``ids``, ``log_probs``) instead of the per-token fields.
    support: Any = None
    # The caller's labels and pre-shifted labels (TRL's contract: the next token's, or ``shift_labels`` as given):
    # the per-token outputs score these, not what the forward hands its own loss, which may read them otherwise
    # (BART's decoders and XLNet score their labels unshifted, and take no ``shift_labels``).
    labels: Any = None
    shift_labels: Any = None
    result: dict[str, Any] | None = None
    # Set when a rewritten forward's labels branch took its stock path (the reason, already counted by fusable).
    refused: str | None = None


_capture: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("logitless_capture", default=None)


@contextlib.contextmanager
def _holding(var: contextvars.ContextVar[Any], value: Any) -> Iterator[Any]:
    """``var`` set to ``value`` for the block (the per-call states rewritten forwards read)."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def capturing(capture: Capture) -> contextlib.AbstractContextManager[Capture]:
    return _holding(_capture, capture)


def current_capture() -> Capture | None:
    return _capture.get()


@dataclass
class Smoothing:
    """A forward run for HF Trainer's label smoothing (logitless.integrations.hf_trainer): the Trainer calls the
    model without labels and smooths the loss of the logits it returns; the integration hands the forward the
    labels, and the rewritten forward's ``hf_loss`` computes that smoothed loss instead of the model's own (whatever
    its shift, labels masking or ``ignore_index``), summed, and leaves it here. ``shift``: the Trainer's own choice
    (a causal-LM class name: logits ``[..., :-1]`` against labels ``[..., 1:]``)."""

    # None until the forward's own call supplies them (Seq2SeqTrainer's evaluation passes the labels itself).
    labels: torch.Tensor | None
    epsilon: float
    ignore_index: int
    shift: bool
    loss: torch.Tensor | None = None
    # How many fused forwards filled it: anything but one makes ``loss`` not the Trainer's.
    fills: int = 0


_smoothing: contextvars.ContextVar[Smoothing | None] = contextvars.ContextVar("logitless_smoothing", default=None)


def smoothing(state: Smoothing) -> contextlib.AbstractContextManager[Smoothing]:
    return _holding(_smoothing, state)


def current_smoothing() -> Smoothing | None:
    return _smoothing.get()


# Set while HF Trainer computes an evaluation loss whose logits it then drops (logitless.integrations.hf_trainer).
_loss_only: contextvars.ContextVar[bool] = contextvars.ContextVar("logitless_loss_only", default=False)


# Set while TRL's SFTTrainer (>= 1.15) computes its nll loss, the mean of the fused head's -log_probs: the per-token
# gradient it sends back is one value over the counted tokens (logitless.integrations.hf_trainer).
_uniform_grad: contextvars.ContextVar[bool] = contextvars.ContextVar("logitless_uniform_grad", default=False)


def expecting_uniform_grad() -> contextlib.AbstractContextManager[bool]:
    """Per-token outputs captured in this block are expected to get one upstream gradient value per counted token."""
    return _holding(_uniform_grad, True)


def uniform_grad_expected() -> bool:
    return _uniform_grad.get()


# Set while TRL's SFTTrainer before 1.15 computes a loss whose caller then reads the logits for its metrics
# (logitless.integrations.trl_legacy): fused forwards also return the real logits there.
_keep_logits: contextvars.ContextVar[bool] = contextvars.ContextVar("logitless_keep_logits", default=False)


def keeping_logits() -> contextlib.AbstractContextManager[bool]:
    """Fused forwards in this block also form the logits their caller reads (the loss stays fused)."""
    return _holding(_keep_logits, True)


def loss_only() -> contextlib.AbstractContextManager[bool]:
    """Forwards in eval mode are fused here: their caller keeps the loss and drops the logits."""
    return _holding(_loss_only, True)


def mode_reason(model: Any) -> str | None:
    """The installer's state and the model's mode: what every fused path (own loss or a delegated one) needs."""
    capture = _capture.get()
    if not _enabled and capture is None:
        return "uninstalled"
    if not getattr(model, "training", True) and not (_fuse_eval or capture is not None or _loss_only.get()):
        # Trainer.evaluate / predict and compute_metrics read the logits: eval mode keeps the stock forward.
        return "eval-mode"
    return None


def return_logits() -> bool:
    """``install(return_logits=True)`` (or ``LOGITLESS_RETURN_LOGITS=1`` when not given), or inside
    ``keeping_logits()``: also compute the logits. Never while capturing per-token outputs (their caller wants no
    logits)."""
    return (_return_logits or _keep_logits.get()) and _capture.get() is None
