"""The object rewritten forwards see as ``__logitless__`` (contract: docs/design.md, "Rewrite contract").

Every decision a rewritten forward makes at run time goes through this module, so that the generated code stays a
plain branch and the policy (when to fuse, whether to keep logits) lives in one reviewed place. Each decision is
counted per model class, with the reason when the stock path is taken, so that ``audit()`` can tell "patched but
never fused" from "fused".
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
    "fusable",
    "hf_loss",
    "loss_only",
    "no_logits",
    "record",
    "return_logits",
    "runtime_counts",
    "reset_counts",
    "set_enabled",
    "set_fuse_eval",
    "set_return_logits",
    "smoothing",
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


def _mode_reason(model: Any) -> str | None:
    """The installer's state and the model's mode: what every fused path (own loss or a delegated one) needs."""
    capture = _capture.get()
    if not _enabled and capture is None:
        return "uninstalled"
    if not getattr(model, "training", True) and not (_fuse_eval or capture is not None or _loss_only.get()):
        # Trainer.evaluate / predict and compute_metrics read the logits: eval mode keeps the stock forward.
        return "eval-mode"
    return None


def _stock_reason(model: Any, head: Any, epilogue_modules: tuple[Any, ...], vocab_sliced: bool = False) -> str | None:
    capture = _capture.get()
    reason = _mode_reason(model)
    if reason is not None:
        return reason
    try:
        loss_function = model.loss_function
    except AttributeError:
        return "no-loss-function"
    if loss_function is not stock_loss("ForCausalLM") and not (
        loss_function is stock_loss("ForMaskedLM") and _passes_loss_function(model)
    ):
        return "custom-loss"
    from logitless._heads import explain_head

    plan = explain_head(head)
    if isinstance(plan, str):
        return plan
    if capture is not None and plan.shard is not None:
        return "tensor-parallel-per-token"
    if vocab_sliced and plan.shard is not None:
        # The forward cuts the vocabulary back: the shards would need cutting too.
        return "tensor-parallel-layout"
    if epilogue_modules:
        from logitless._epilogue_modules import epilogue_keywords

        for module in epilogue_modules:
            keywords = epilogue_keywords(module)
            if isinstance(keywords, str):
                return keywords
    return None


def _passes_loss_function(model: Any) -> bool:
    """Whether the forward asking hands ``hf_loss`` its ``loss_function``: the rewriter's always do; a hand-written
    tier-1 forward (``register_canonical``) in ``model``'s classes may not, and ``hf_loss`` would then compute the
    causal loss."""
    from logitless import installer

    return not any(installer.runs_canonical(cls) for cls in type(model).__mro__)


def fusable(
    model: Any, head: Any, *epilogue_modules: Any, logits_terms_off: bool = True, vocab_sliced: bool = False
) -> bool:
    """True when the fused loss computes exactly what ``model.loss_function`` would on ``head``'s logits.

    ``PreTrainedModel.loss_function`` is a property: a user-assigned loss is stored in ``_loss_function`` and
    returned as is, otherwise ``LOSS_MAPPING[loss_type]`` is returned. Only the stock causal-LM loss object itself
    is fused, or ``ForMaskedLMLoss`` in a forward the rewriter made (it passes ``hf_loss`` the loss function);
    anything else (a custom loss, a wrapped loss, another loss type) keeps the original statements. The head must
    reduce exactly to an ``nn.Linear`` (``logitless._heads.explain_head``): hooked, wrapped or subclassed heads are
    never reduced to their ``.weight``. An epilogue module called on the logits after the head
    (``epilogue_modules``) must be one whose effect the fused op reproduces (``logitless._epilogue_modules``). In
    eval mode the stock path runs (real logits) unless
    ``install(fuse_eval=True)``. ``logits_terms_off``: the guards of the forward's auxiliary loss terms that read
    the logits (a z-loss) are all off; when one is on, the stock statements compute the loss (``logits-term``).
    ``vocab_sliced``: the forward cuts a padded vocabulary back (``logits[..., :end]``), which a vocabulary-sharded
    head does not fuse.
    Every answer is counted for ``audit()``, with its reason when False.
    """
    reason = _stock_reason(model, head, epilogue_modules, vocab_sliced)
    if reason is None and not logits_terms_off:
        reason = "logits-term"
    record(model, reason)
    capture = _capture.get()
    if capture is not None and reason is not None:
        capture.refused = reason
    return reason is None


def delegable(model: Any, sub: Any, vocab_size: Any, as_dict: Any = True) -> bool:
    """True when an encoder-decoder wrapper may hand its loss to its decoder ``sub``: given the labels, the decoder
    computes exactly the wrapper's ``CrossEntropyLoss()`` of its logits (its own fused forward then forms none).

    That holds when ``sub`` runs, unchanged, a forward of a class logitless rewrote whose loss is that and whose
    labels are read nowhere else (``Rewrite::delegate_target``), with no hooks but the engines' (another hook would
    see outputs without logits). ``vocab_size``: what the wrapper reshapes the logits to, which must be the
    decoder's output size (else stock raises, and so does the stock path taken here). ``as_dict``: the wrapper's
    ``return_dict``; its tuple outputs would carry the decoder's loss as an extra first element, so they keep the
    stock path. Counted for ``audit()`` on the wrapper's class; the decoder counts its own forward as usual.
    """
    reason = _delegation_reason(model, sub)
    if reason is None:
        head = sub.get_output_embeddings() if hasattr(sub, "get_output_embeddings") else None
        if getattr(head, "out_features", None) != vocab_size:
            reason = "delegate-not-exact"
        elif not as_dict:
            reason = "delegate-tuple-outputs"
    record(model, reason)
    return reason is None


def _delegation_reason(model: Any, sub: Any) -> str | None:
    reason = _mode_reason(model)
    if reason is not None:
        return reason
    import torch

    from logitless import installer
    from logitless._heads import _way_in

    if not isinstance(sub, torch.nn.Module):
        return "delegate-not-exact"
    # The decoder is called as stock calls it, so its hooks all run; only hooks that may observe or change what it
    # returns (the logits it no longer forms) are a problem. Engines' hooks (FSDP2, ZeRO-3, accelerate's device
    # alignment) only gather, move and free parameters; an instance forward other than accelerate's is refused too.
    way = _way_in(sub)
    if way.refusal is not None or way.shard is not None:
        return "delegate-hooked"
    owner = next((cls for cls in type(sub).__mro__ if "forward" in cls.__dict__), None)
    if owner is None or not installer.is_delegate_target(owner):
        return "delegate-not-exact"
    return None


def mask_shifted_labels(labels: torch.Tensor, mask: torch.Tensor | None, crop: str) -> torch.Tensor:
    """The labels of a masked causal shift (Qwen2-Audio, Granite Speech): stock keeps the shifted positions where
    ``mask[..., 1:]`` (``crop="skip-first"``) or the mask's last ``T - 1`` columns (``"last"``) are non-zero, which is
    the causal loss on these labels with the others ignored (-100). No mask: the labels unchanged."""
    if mask is None:
        return labels
    shifted = mask[..., 1:] if crop == "skip-first" else mask[:, -(labels.shape[-1] - 1) :]
    if shifted.shape != labels[..., 1:].shape:
        # Stock's boolean selection fails the same way.
        raise IndexError(
            f"attention_mask: expected the shifted mask to have the shifted labels' shape "
            f"{tuple(labels[..., 1:].shape)}, got {tuple(shifted.shape)}"
        )
    masked = labels.clone()
    masked[..., 1:] = labels[..., 1:].masked_fill(shifted.to(labels.device) == 0, -100)
    return masked


def no_logits(hidden: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """The empty stand-in for the logits the fused path never computes: ``[*hidden.shape[:-1], 0]``."""
    del head  # part of the contract so a future head-dependent dtype can be honoured without a rewrite change
    return hidden.new_empty((*hidden.shape[:-1], 0))


def return_logits() -> bool:
    """``install(return_logits=True)`` (or ``LOGITLESS_RETURN_LOGITS=1`` when not given), or inside
    ``keeping_logits()``: also compute the logits. Never while capturing per-token outputs (their caller wants no
    logits)."""
    return (_return_logits or _keep_logits.get()) and _capture.get() is None


def __getattr__(name: str) -> Any:
    # hf_loss is re-exported lazily so that patching a modeling module does not import the op (and _core's
    # kernel) until a fused forward actually runs.
    if name == "hf_loss":
        from logitless.hf import hf_loss

        globals()["hf_loss"] = hf_loss
        return hf_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
