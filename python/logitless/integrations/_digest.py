"""Which release of a TRL method is installed, by the sha256 of its source tokens: the integrations that reproduce a
TRL method's code (rather than calling it) wrap only the releases whose code they reproduce."""

from __future__ import annotations

import hashlib
import inspect
import io
import textwrap
import tokenize
from typing import Any

__all__ = ["digest", "method_digest", "source_digest"]


def digest(function: Any) -> str | None:
    """sha256 of ``function``'s source tokens, comments and blank lines aside (None: no source)."""
    try:
        return source_digest(inspect.getsource(function))
    except (OSError, TypeError):
        return None


def method_digest(trainer_class: type, name: str) -> str | None:
    """``digest`` of the method ``name`` as the nearest class of ``trainer_class``'s MRO defines it: a staticmethod's
    function, and under ``install()`` TRL's own function, not logitless's wrapper (None: no such method)."""
    method = next((c.__dict__[name] for c in trainer_class.__mro__ if name in c.__dict__), None)
    function = method.__func__ if isinstance(method, staticmethod) else method
    return digest(getattr(function, "__logitless_wrapped__", function)) if function is not None else None


def source_digest(source: str) -> str | None:
    """sha256 of a function's source tokens (its decorators included), comments and blank lines aside."""
    try:
        tokens = tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline)
        kept = [f"{t.type}:{t.string}" for t in tokens if t.type not in (tokenize.COMMENT, tokenize.NL)]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()
