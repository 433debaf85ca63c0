"""Every ``LOGITLESS_*`` environment variable, read and validated here and nowhere else.

Each reader is called where the value is needed (the op reads its knobs on every call, so tests and long-lived
processes can change them); an invalid value raises ``ValueError`` naming the variable and what it accepts, rather
than being ignored. This module imports neither torch nor the extension: the startup hook and
``python -m logitless audit`` read ``LOGITLESS`` without them.

| variable | accepted | meaning |
| --- | --- | --- |
| ``LOGITLESS`` | 1/true/yes/on, 0/false/no/off, empty | install the transformers hook at interpreter start |
| ``LOGITLESS_RETURN_LOGITS`` | boolean | default of ``install(return_logits=...)`` |
| ``LOGITLESS_FUSE_EVAL`` | boolean | default of ``install(fuse_eval=...)`` |
| ``LOGITLESS_CHUNK_MB`` | a positive number | scratch budget of one op call, MiB |
| ``LOGITLESS_WEIGHT_GRAD`` | accumulate / recompute | how a bf16/f16 weight gradient is formed |
| ``LOGITLESS_KERNEL_ISA`` | portable / avx2 / avx512 / avx512bf16 / amx | cap on the Rust kernel's instruction set |
| ``LOGITLESS_KERNEL_PROFILE`` | boolean | the Rust kernel prints seconds per phase to stderr |
"""

from __future__ import annotations

import os

__all__ = [
    "KERNEL_ISAS",
    "WEIGHT_GRAD_MODES",
    "chunk_mb",
    "enabled",
    "flag",
    "fuse_eval",
    "kernel_isa",
    "kernel_profile",
    "return_logits",
    "weight_grad",
]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
WEIGHT_GRAD_MODES = ("accumulate", "recompute")
KERNEL_ISAS = ("portable", "avx2", "avx512", "avx512bf16", "amx")


def _raw(name: str) -> str:
    return os.environ.get(name, "").strip()


def flag(name: str) -> bool:
    """A boolean variable: unset or empty is False."""
    value = _raw(name).lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}: expected one of 1/true/yes/on or 0/false/no/off, got {_raw(name)!r}")


def _choice(name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    value = _raw(name).lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {_raw(name)!r}")
    return value


def enabled() -> bool:
    return flag("LOGITLESS")


def return_logits() -> bool:
    return flag("LOGITLESS_RETURN_LOGITS")


def fuse_eval() -> bool:
    return flag("LOGITLESS_FUSE_EVAL")


def chunk_mb() -> float | None:
    """``LOGITLESS_CHUNK_MB`` in MiB, or None when unset (the op then sizes its chunks to the problem)."""
    raw = _raw("LOGITLESS_CHUNK_MB")
    if not raw:
        return None
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not (mb > 0 and mb != float("inf")):
        raise ValueError(f"LOGITLESS_CHUNK_MB: expected a positive number of MiB, got {raw!r}")
    return mb


def weight_grad() -> str:
    value = _choice("LOGITLESS_WEIGHT_GRAD", WEIGHT_GRAD_MODES, "accumulate")
    assert value is not None
    return value


def kernel_isa() -> str | None:
    """The instruction-set cap for the Rust kernel, or None for the best the CPU has."""
    return _choice("LOGITLESS_KERNEL_ISA", KERNEL_ISAS, None)


def kernel_profile() -> bool:
    return flag("LOGITLESS_KERNEL_PROFILE")
