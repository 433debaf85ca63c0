"""A forward's source as the patcher and the head analysis read it: nothing here imports logitless or torch."""

from __future__ import annotations

import __future__
import hashlib
import inspect
import textwrap
from collections.abc import Callable
from types import FunctionType
from typing import Any

__all__ = ["FUTURE_FLAGS", "analysable_source", "forward_hash", "forward_source"]

# Every ``from __future__`` compiler flag: a recompiled forward keeps those of the code it replaces.
FUTURE_FLAGS = 0
for _feature in __future__.all_feature_names:
    FUTURE_FLAGS |= getattr(__future__, _feature).compiler_flag


def forward_source(forward: Callable[..., Any]) -> str:
    """The dedented source of a forward, decorators included (``inspect`` unwraps ``functools.wraps`` layers)."""
    return textwrap.dedent(inspect.getsource(forward))


def forward_hash(forward: Callable[..., Any]) -> str:
    """The tier-1 allowlist key: sha256 hex digest of ``forward_source(forward)`` encoded as UTF-8."""
    return hashlib.sha256(forward_source(forward).encode("utf-8")).hexdigest()


def analysable_source(forward: Any) -> str | None:
    """The dedented source of a class's ``forward`` when it is exactly what runs, else None."""
    # A wrapped forward (functools.wraps) runs code its source does not show; a closure cannot be recompiled.
    if not isinstance(forward, FunctionType) or hasattr(forward, "__wrapped__") or forward.__code__.co_freevars:
        return None
    try:
        return forward_source(forward)
    except (OSError, TypeError):
        return None
