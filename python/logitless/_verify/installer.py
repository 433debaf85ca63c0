"""How verify switches a model between stock and logitless: ``logitless.patch(model)`` patches the model's classes
(exactly what ``install()`` does to them, without re-walking every imported module per class),
``logitless.uninstall()`` restores them, and ``logitless.audit()`` says what the installer decided."""

from __future__ import annotations

from typing import Any

import torch


class Installer:
    """``mode="install"`` uses logitless' installer; ``mode="stock"`` leaves the model stock (harness self-test:
    every class must then compare equal, so it checks the harness, not logitless)."""

    def __init__(self, mode: str = "install") -> None:
        if mode not in ("install", "stock"):
            raise ValueError(f"mode must be 'install' or 'stock', got {mode!r}")
        self.mode = mode
        self._installed = False

    def apply(self, model: torch.nn.Module) -> dict[str, Any]:
        if self.mode == "stock":
            return {"status": "stock-only"}
        import logitless

        self._installed = True
        logitless.patch(model)
        cls = type(model)
        return find_entry(logitless.audit(), f"{cls.__module__}.{cls.__qualname__}")

    def restore(self) -> None:
        if self._installed:
            import logitless

            logitless.uninstall()
            self._installed = False


def find_entry(audit: dict[str, Any], key: str) -> dict[str, Any]:
    """The audit record deciding ``key``'s forward ("module.Class"), following ``inherited`` to the owner."""
    classes = audit.get("classes", {})
    seen: set[str] = set()
    while key in classes and key not in seen:
        seen.add(key)
        entry = dict(classes[key])
        if entry.get("status") != "inherited":
            if seen != {key}:
                entry["via"] = key
            return entry
        key = str(entry.get("from", ""))
    return {"status": "unseen", "reason": f"the installer's audit does not list {key}"}
