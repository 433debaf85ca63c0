"""A small pool of long-lived worker processes with a per-class deadline.

Workers import torch and transformers once and then run classes one by one; a class that hangs past its deadline
or kills its worker (segfault, OOM) is recorded as not-built and the worker is replaced, so one broken class never
stops the run. Workers are spawned (not forked) so the parent never needs torch.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable

from logitless._verify.discover import Candidate


def _worker(conn: Connection, mode: str, threads: int) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    from logitless._verify.compare import run_case
    from logitless._verify.installer import Installer

    installer = Installer(mode)
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(run_case(task["module"], task["cls"], task["kind"], installer))


class _Slot:
    def __init__(self, ctx: Any, mode: str, threads: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, mode, threads), daemon=True)
        self.proc.start()
        child.close()
        self.task: Candidate | None = None
        self.deadline = 0.0
        self.fresh = True

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def run_all(
    candidates: Iterable[Candidate],
    *,
    workers: int,
    timeout: float,
    mode: str,
    on_result: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    pending = deque(candidates)
    slots = [_Slot(ctx, mode, threads) for _ in range(max(1, min(workers, len(pending) or 1)))]
    results: list[dict[str, Any]] = []

    def finish(slot: _Slot, result: dict[str, Any]) -> None:
        slot.task = None
        results.append(result)
        on_result(result)

    def replace(slot: _Slot) -> _Slot:
        slot.stop()
        fresh = _Slot(ctx, mode, threads)
        slots[slots.index(slot)] = fresh
        return fresh

    try:
        while pending or any(s.task for s in slots):
            for slot in slots:
                if slot.task is None and pending:
                    slot.task = pending.popleft()
                    # The first class a worker runs also pays for importing torch and transformers.
                    slot.deadline = time.monotonic() + timeout + (60 if slot.fresh else 0)
                    slot.fresh = False
                    slot.conn.send(slot.task.to_dict())
            busy = [s for s in slots if s.task is not None]
            now = time.monotonic()
            ready = wait([s.conn for s in busy], timeout=max(0.05, min(s.deadline for s in busy) - now))
            for slot in busy:
                task = slot.task
                assert task is not None
                if slot.conn in ready:
                    try:
                        finish(slot, slot.conn.recv())
                    except (EOFError, OSError):
                        code = slot.proc.exitcode
                        replace(slot)
                        finish(slot, _abandoned(task, f"worker died (exit code {code})"))
                elif time.monotonic() > slot.deadline:
                    replace(slot)
                    finish(slot, _abandoned(task, f"timed out after {timeout:.0f}s"))
    finally:
        for slot in slots:
            try:
                slot.conn.send(None)
            except (OSError, ValueError):
                pass
            slot.stop()
    return results


def _abandoned(task: Candidate, reason: str) -> dict[str, Any]:
    return {"class": task.cls, "module": task.module, "kind": task.kind, "status": "not-built", "reason": reason}
