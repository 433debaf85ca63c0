"""logitless: train causal language models without materialising the logits.

Importing this package is cheap: torch and transformers are imported only when an op runs or a model is patched,
so ``python -m logitless audit`` works without either. ``LOGITLESS=1`` in the environment installs the
transformers hook at import.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "linear_cross_entropy",
    "linear_divergence",
    "hf_loss",
    "rewrite_forward",
    "install",
    "uninstall",
    "audit",
    "patch",
    "register_canonical",
    "__version__",
]

# name -> module that defines it; resolved on first access so the package imports without torch.
_LAZY = {
    "linear_cross_entropy": "logitless.ops",
    "linear_divergence": "logitless.divergence",
    "hf_loss": "logitless.hf",
    "rewrite_forward": "logitless.rewrite",
    "install": "logitless.installer",
    "uninstall": "logitless.installer",
    "audit": "logitless.installer",
    "patch": "logitless.installer",
    "register_canonical": "logitless.installer",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from logitless._core import __version__

        return __version__
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'logitless' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if importlib.import_module("logitless._config").enabled():
    importlib.import_module("logitless.installer").install()
