"""Where one forward + backward's time goes on a CUDA device: per-kernel device time (torch.profiler) and the host
time of the call, for stock transformers' loss and logitless's modes, at bench/cuda_compare.py's shapes.

    python bench/cuda_profile.py [--cases small,big] [--ignored 0,0.5] [--rows 12]

Prints, per case and method: wall time of forward + backward (synchronised, median of 5), the host time until
forward and backward return (launch and Python overhead; the device may still be busy), the device's busy time
(sum of kernel times) and the top kernels by device time. ``--host`` instead: the device waits of a call (CUDA's
sync debug mode), the host time per aten op, and the Python functions by own time (cProfile). bench/cuda_compare.py
is the benchmark of record.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from cuda_compare import CASES, IGNORE

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def methods() -> dict[str, Fn]:
    from transformers.loss.loss_utils import ForCausalLMLoss

    from logitless import linear_cross_entropy

    def stock(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ForCausalLMLoss(torch.nn.functional.linear(h, w), None, w.shape[0], shift_labels=y)

    def ours(mode: str) -> Fn:
        def f(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            os.environ["LOGITLESS_WEIGHT_GRAD"] = mode
            return linear_cross_entropy(h, w, None, shift_labels=y, impl="triton")

        return f

    return {"stock": stock, "triton accumulate": ours("accumulate"), "triton recompute": ours("recompute")}


def _kernel_table(prof: torch.profiler.profile, reps: int, rows: int) -> tuple[float, list[str]]:
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    busy = sum(e.self_device_time_total for e in events) / reps / 1e3
    lines = [f"    {e.self_device_time_total / reps / 1e3:8.3f} ms  {e.count // reps:4d}x  {e.key[:110]}"
             for e in events[:rows]]  # fmt: skip
    return busy, lines


def profile(fn: Fn, h0: torch.Tensor, w0: torch.Tensor, y: torch.Tensor, rows: int) -> list[str]:
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()

    def step() -> tuple[float, float]:
        h.grad = w.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = fn(h, w, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        return t1 - t0, t2 - t1

    for _ in range(2):
        step()
    walls, hosts_f, hosts_b = [], [], []
    for _ in range(5):
        t0 = time.perf_counter()
        f, b = step()
        walls.append(time.perf_counter() - t0)
        hosts_f.append(f)
        hosts_b.append(b)
    reps = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
    busy, table = _kernel_table(prof, reps, rows)
    return [
        f"  wall {statistics.median(walls) * 1e3:.2f} ms | host: forward {statistics.median(hosts_f) * 1e3:.2f} ms, "
        f"backward {statistics.median(hosts_b) * 1e3:.2f} ms | device busy {busy:.2f} ms",
        *table,
    ]


def host_profile(fn: Fn, h0: torch.Tensor, w0: torch.Tensor, y: torch.Tensor, rows: int) -> list[str]:
    """The host's side of one forward + backward: every call that waits for the device (CUDA's sync debug mode,
    with the Python stack that made it), and the aten ops by host time (torch.profiler, CPU activity)."""
    import warnings

    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    for _ in range(3):
        h.grad = w.grad = None
        fn(h, w, y).backward()
    torch.cuda.synchronize()
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        h.grad = w.grad = None
        try:
            fn(h, w, y).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    waits = [f"{c.filename}:{c.lineno}: {str(c.message)[:100]}" for c in caught]
    lines += [f"    device waits: {len(waits)}", *("      " + s for s in waits)]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            h.grad = w.grad = None
            fn(h, w, y).backward()
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 5 / 1e3
    lines.append(f"    host time in aten / custom ops: {total:.2f} ms per call")
    lines += [f"    {e.self_cpu_time_total / 5 / 1e3:8.3f} ms  {e.count // 5:4d}x  {e.key[:90]}" for e in events[:rows]]
    return lines + python_profile(fn, h, w, y, rows, sync=torch.cuda.synchronize)


def python_profile(
    fn: Fn, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, rows: int, *, sync: Callable[[], None], reps: int = 20
) -> list[str]:
    """The Python functions a forward + backward spends its host time in (cProfile around the call only, the device
    idle when it starts), by own time: logitless's code, Triton's launcher, torch's wrappers, and the waits for the
    device (``synchronize``) among them."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    for _ in range(reps):
        h.grad = w.grad = None
        sync()
        prof.enable()
        fn(h, w, y).backward()
        prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in stats.values()) / reps
    top = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:rows]
    lines = [f"    host time under cProfile (its overhead included): {total * 1e3:.2f} ms per call; by own time:"]
    for (path, line, name), (_, calls, own, _, _) in top:
        where = f"{'/'.join(path.split(os.sep)[-2:])}:{line}({name})" if line else name
        lines.append(f"    {own / reps * 1e6:8.1f} us  {calls // reps:4d}x  {where[-100:]}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="small,big")
    p.add_argument("--ignored", default="0,0.5")
    p.add_argument("--rows", type=int, default=12, help="kernels listed per method")
    p.add_argument("--host", action="store_true",
                   help="instead: device waits, host time per aten op and the Python functions the host spends it in")
    args = p.parse_args()
    dev = torch.device("cuda")
    for case in args.cases.split(","):
        n, hd, v = CASES[case]
        for ignored in map(float, args.ignored.split(",")):
            g = torch.Generator(device=dev).manual_seed(1234)
            hidden = torch.randn(n, hd, generator=g, device=dev, dtype=torch.bfloat16)
            weight = torch.randn(v, hd, generator=g, device=dev, dtype=torch.bfloat16).mul_(2.0 / hd**0.5)
            y = torch.randint(0, v, (n,), generator=g, device=dev)
            y[torch.rand(n, generator=g, device=dev) < ignored] = IGNORE
            for name, fn in methods().items():
                print(f"{n}/{hd}/{v} bf16 {ignored:.0%} ignored, {name}", flush=True)
                run = host_profile if args.host else profile
                lines = run(fn, hidden, weight, y, args.rows)
                print("\n".join(lines), flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
