"""The trainer integrations' run-time counts for ``logitless.audit()``: calls whose values logitless computed, and
those left to the trainer's own code, by reason (a fallback is never silent)."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["Calls"]


class Calls:
    """Thread-safe counts of one wrapped method's calls: ``fused``, and ``stock`` by reason."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fused = 0
        self._stock: dict[str, int] = {}

    def count(self, reason: str | None) -> None:
        """One call: fused (``None``) or left to the trainer's code for ``reason``."""
        with self._lock:
            if reason is None:
                self._fused += 1
            else:
                self._stock[reason] = self._stock.get(reason, 0) + 1

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {"fused": self._fused, "stock": dict(self._stock)}

    def reset(self) -> None:
        with self._lock:
            self._fused = 0
            self._stock.clear()
