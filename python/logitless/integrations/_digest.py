"""Which release of a TRL method is installed, by the sha256 of its source tokens: the integrations that reproduce a
TRL method's code (rather than calling it) wrap only the releases whose code they reproduce."""

from __future__ import annotations

import hashlib
import inspect
import io
import textwrap
import tokenize
from typing import Any

__all__ = ["digest", "source_digest"]


def digest(function: Any) -> str | None:
    """sha256 of ``function``'s source tokens, comments and blank lines aside (None: no source)."""
    try:
        return source_digest(inspect.getsource(function))
    except (OSError, TypeError):
        return None


def source_digest(source: str) -> str | None:
    """sha256 of a function's source tokens (its decorators included), comments and blank lines aside."""
    try:
        tokens = tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline)
        kept = [f"{t.type}:{t.string}" for t in tokens if t.type not in (tokenize.COMMENT, tokenize.NL)]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()
