"""The oldest torch and transformers logitless runs on, read from the installed distributions' metadata so that the
installer (started from the ``.pth`` hook with ``LOGITLESS=1``) imports neither.

The floors are the oldest releases tested: torch 2.6 (transformers 5's own floor; torch 2.4 cannot even register
the op, whose annotations are strings under ``from __future__ import annotations``) and transformers 4.56.
"""

from __future__ import annotations

import importlib.metadata
import re

__all__ = ["MIN_TORCH", "MIN_TRANSFORMERS", "installed", "parse", "require", "too_old", "unsupported"]

MIN_TORCH = (2, 6)
MIN_TRANSFORMERS = (4, 56)
_FLOORS = {"torch": MIN_TORCH, "transformers": MIN_TRANSFORMERS}


def parse(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string (``"2.6.0+cu124"``, ``"2.7.0a0+git1234"``), None if it has none."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def installed(package: str) -> str | None:
    """The installed version string of ``package``, None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def too_old(package: str, version: str | None = None) -> str | None:
    """Why ``package`` at ``version`` (default: the installed one) is below logitless's floor, or None when it is
    not (or is not installed: then nothing logitless patches can run either)."""
    found = installed(package) if version is None else version
    parsed = parse(found) if found is not None else None
    floor = _FLOORS[package]
    if parsed is None or parsed >= floor:
        return None
    return f"logitless supports {package} >= {'.'.join(map(str, floor))}; found {found}"


def unsupported() -> str | None:
    """Why the installed transformers or torch is below its floor, or None when neither is."""
    return too_old("transformers") or too_old("torch")


def require(package: str, version: str) -> None:
    """Raises ``ImportError`` naming the floor when ``package`` at ``version`` is below it."""
    reason = too_old(package, version)
    if reason is not None:
        raise ImportError(reason)
