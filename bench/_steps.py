"""What the whole-step benchmarks (hf_trainer.py, encoder_decoder.py, trl_sft.py) measure in each child process."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable


def timed_steps(step: Callable[[], float]) -> dict[str, float]:
    """A warm-up ``step()``, then two timed ones: the last loss, seconds per step (their mean) and what the three
    added to the process's peak RSS, in MiB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    start = time.perf_counter()
    loss = [step() for _ in range(2)][-1]
    seconds = (time.perf_counter() - start) / 2
    added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"loss": loss, "seconds": seconds, "added_mib": added}
