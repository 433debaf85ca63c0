"""A one-line text progress bar on stderr, as a transformers TrainerCallback."""

from __future__ import annotations

import sys
import time
from typing import Any

from transformers import TrainerCallback

_WIDTH = 24


class ProgressBar(TrainerCallback):
    """Draws ``label [#####.....] step/steps loss s/step``; also records step times and grad norms for the report."""

    def __init__(self, label: str, steps: int, losses: list[float]) -> None:
        self.label, self.steps, self.losses = label, steps, losses
        self.step_seconds: list[float] = []
        self.grad_norms: list[float] = []
        self._t0 = 0.0
        # Redraw in place on a terminal; one line per step in a log file.
        self._tty = sys.stderr.isatty()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._draw(0)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_seconds.append(time.perf_counter() - self._t0)
        self._draw(state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "grad_norm" in logs:
            self.grad_norms.append(float(logs["grad_norm"]))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _draw(self, step: int) -> None:
        filled = _WIDTH * step // max(self.steps, 1)
        bar = "#" * filled + "." * (_WIDTH - filled)
        loss = f"loss {self.losses[-1]:.4f}" if self.losses else ""
        pace = f"{self.step_seconds[-1]:.2f} s/step" if self.step_seconds else ""
        line = f"  {self.label:<9} [{bar}] {step:>4}/{self.steps}  {loss}  {pace}"
        if self._tty:
            sys.stderr.write("\r" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
