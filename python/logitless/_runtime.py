"""The object rewritten forwards see as ``__logitless__`` (contract: docs/design.md, "Rewrite contract").

Every decision a rewritten forward makes at run time goes through this module, so that the generated code stays a
plain branch and the policy (when to fuse, whether to keep logits) lives in one reviewed place.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["fusable", "hf_loss", "no_logits", "return_logits", "set_enabled", "set_return_logits"]

_TRUTHY = {"1", "true", "yes", "on"}

# Flipped by logitless.installer: a forward that outlives uninstall() (e.g. a bound method someone kept) must fall
# back to the stock statements rather than keep fusing.
_enabled = False
_return_logits = os.environ.get("LOGITLESS_RETURN_LOGITS", "").strip().lower() in _TRUTHY
# transformers' ForCausalLMLoss, resolved on the first fused forward: `LOGITLESS=1 python -m logitless audit`
# installs the hook but must not import torch or transformers.
_stock_loss: Any = None


def set_enabled(value: bool) -> None:
    global _enabled
    _enabled = bool(value)


def set_return_logits(value: bool) -> None:
    global _return_logits
    _return_logits = bool(value)


def _stock_causal_loss() -> Any:
    global _stock_loss
    if _stock_loss is None:
        from transformers.loss.loss_utils import ForCausalLMLoss

        _stock_loss = ForCausalLMLoss
    return _stock_loss


def fusable(model: Any, head: Any) -> bool:
    """True when the fused loss computes exactly what ``model.loss_function`` would.

    ``PreTrainedModel.loss_function`` is a property: a user-assigned loss is stored in ``_loss_function`` and
    returned as is, otherwise ``LOSS_MAPPING[loss_type]`` is returned. Only the stock causal-LM loss object itself
    is fused; anything else (a custom loss, a wrapped loss, another loss type) keeps the original statements.
    The head must be exactly ``nn.Linear`` (subclasses and PEFT/quantised wrappers may change what ``head(x)``
    computes, so they are never reduced to ``x @ head.weight.T + head.bias``), or a composite head that
    ``logitless._heads`` reduces exactly to an ``nn.Linear`` after the head's own leading statements.
    """
    if not _enabled:
        return False
    from logitless._heads import resolve_head

    if resolve_head(head) is None:
        return False
    try:
        loss_function = model.loss_function
    except AttributeError:
        return False
    return loss_function is _stock_causal_loss()


def no_logits(hidden: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """The empty stand-in for the logits the fused path never computes: ``[*hidden.shape[:-1], 0]``."""
    del head  # part of the contract so a future head-dependent dtype can be honoured without a rewrite change
    return hidden.new_empty((*hidden.shape[:-1], 0))


def return_logits() -> bool:
    """``install(return_logits=True)`` / ``LOGITLESS_RETURN_LOGITS=1``: also compute the real logits."""
    return _return_logits


def __getattr__(name: str) -> Any:
    # hf_loss is re-exported lazily so that patching a modeling module does not import the op (and _core's
    # kernel) until a fused forward actually runs.
    if name == "hf_loss":
        from logitless.hf import hf_loss

        globals()["hf_loss"] = hf_loss
        return hf_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
