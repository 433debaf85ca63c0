"""Which model classes logitless patched, and how: written by the installer, read at run time.

The ``__logitless__`` facade (``_runtime``) asks it whether a decoder runs a rewrite its wrapper may hand the loss
to, and whether a class runs a hand-written tier-1 forward; HF Trainer's integration asks what a rewritten forward
does with its labels. Imports nothing of logitless.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LOCK", "Patch", "delegate_target", "labels_elsewhere", "patched", "records", "rewritten",
           "runs_canonical"]  # fmt: skip


@dataclass
class Patch:
    original: Callable[..., Any]
    forward: Callable[..., Any]
    filename: str | None = None
    added_globals: list[str] = field(default_factory=list)
    # The rewriter's `labels_elsewhere` (None: the labels are read beside the loss in a way it did not list).
    labels_elsewhere: dict[str, bool] | None = None


# Re-entrant: the installer holds it while the import hook it installed calls back into it.
LOCK = threading.RLock()
# Each patched class's forward, and audit()'s record of every class seen ("module.Class" -> its status).
patched: dict[type, Patch] = {}
records: dict[str, dict[str, Any]] = {}


def delegate_target(cls: type) -> tuple[str, str | None] | None:
    """What ``cls``'s forward computes given labels, when it runs our rewrite and a wrapper may hand it the labels
    instead of computing that loss on its logits (``_runtime.delegable``): ``("cross_entropy", None)`` for
    ``CrossEntropyLoss()`` of its logits, ``("causal_lm", path)`` for ``self.loss_function`` of its logits with the
    ``**kwargs`` it was given and the vocabulary size at ``path`` (``self.config.vocab_size``); None otherwise."""
    with LOCK:
        patch = patched.get(cls)
        record = records.get(f"{cls.__module__}.{cls.__qualname__}", {})
        kind = record.get("delegate_target")
        if patch is None or cls.__dict__.get("forward") is not patch.forward or kind is None:
            return None
        return kind, record.get("delegate_vocab")


def rewritten(cls: type) -> bool:
    """Whether ``cls`` runs the forward logitless's rewriter made for it (tier 2)."""
    with LOCK:
        patch = patched.get(cls)
        return patch is not None and patch.filename is not None and cls.__dict__.get("forward") is patch.forward


def runs_canonical(cls: type) -> bool:
    """Whether ``cls`` runs a hand-written tier-1 forward (``register_canonical``)."""
    with LOCK:
        patch = patched.get(cls)
        return patch is not None and patch.filename is None and cls.__dict__.get("forward") is patch.forward


def labels_elsewhere(cls: type) -> dict[str, bool] | None:
    """For a class running our rewrite, what its forward does with the labels besides the loss
    (``{"decoder_inputs", "disables_cache"}``, the Rust ``LabelsElsewhere``); ``None`` when that is unknown or
    more (logitless.integrations.hf_trainer hands labels only to forwards where they change nothing else)."""
    with LOCK:
        patch = patched.get(cls)
        if patch is None or cls.__dict__.get("forward") is not patch.forward or patch.labels_elsewhere is None:
            return None
        return dict(patch.labels_elsewhere)
