"""Fused linear + cross-entropy on one CUDA device: logitless's torch path against stock transformers and its peers.

One process, methods run one after another on the same inputs: time of forward + backward (median of ``--reps``
after a warm-up, CUDA-synchronised) and peak CUDA memory above what the inputs and the returned gradients take
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``), as a share of the float32 logits stock
holds; loss and gradient errors against a float32 reference (row-chunked materialised logits).

    python bench/cuda_compare.py [--cases small,big] [--dtypes bf16,f32] [--ignored 0,0.5] [--out FILE]

Peers run when installed: cut-cross-entropy (``impl="cce"``, its Triton kernels), Liger-Kernel
(``LigerFusedLinearCrossEntropyLoss``), ``torch.nn.functional.linear_cross_entropy``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

CASES = {"small": (2048, 1024, 32000), "big": (8192, 2048, 128256)}
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
IGNORE = -100
Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def methods() -> dict[str, Fn]:
    from transformers.loss.loss_utils import ForCausalLMLoss

    from logitless import linear_cross_entropy

    def stock(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ForCausalLMLoss(torch.nn.functional.linear(h, w), None, w.shape[0], shift_labels=y)

    def ours(mode: str) -> Fn:
        def f(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            os.environ["LOGITLESS_WEIGHT_GRAD"] = mode
            return linear_cross_entropy(h, w, None, shift_labels=y)

        return f

    out: dict[str, Fn] = {
        "stock HF (materialised)": stock,
        "logitless (torch path)": ours("accumulate"),
        "logitless (torch path, recompute)": ours("recompute"),
    }
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        opts = torch.nn.LinearCrossEntropyOptions()

        def torch_lce(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear_cross_entropy(h, w, y, ignore_index=IGNORE, options=opts)

        out["torch F.linear_cross_entropy"] = torch_lce
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cut-cross-entropy (cce)"] = lambda h, w, y: cce(h, w, y, ignore_index=IGNORE, impl="cce")
    except ImportError:
        pass
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        out["Liger-Kernel fused linear CE"] = lambda h, w, y: liger(w, h, y)
    except ImportError:
        pass
    return out


def reference(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    h32, w32 = h.detach().float(), w.detach().float().clone().requires_grad_()
    count = max(int((y != IGNORE).sum()), 1)
    dh = torch.zeros_like(h32)
    loss = 0.0
    for s in range(0, h.shape[0], 1024):
        hc = h32[s : s + 1024].clone().requires_grad_()
        part = torch.nn.functional.cross_entropy(hc @ w32.T, y[s : s + 1024], ignore_index=IGNORE, reduction="sum")
        (part / count).backward()
        assert hc.grad is not None
        dh[s : s + 1024] = hc.grad
        loss += float(part.detach()) / count
    assert w32.grad is not None
    return loss, dh, w32.grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm().clamp_min(1e-30))


def run_case(n: int, hd: int, v: int, dtype: torch.dtype, ignored: float, reps: int) -> list[str]:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1234)
    hidden = torch.randn(n, hd, generator=g, device=dev, dtype=dtype)
    weight = torch.randn(v, hd, generator=g, device=dev, dtype=dtype).mul_(2.0 / hd**0.5)
    y = torch.randint(0, v, (n,), generator=g, device=dev)
    y[torch.rand(n, generator=g, device=dev) < ignored] = IGNORE
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, y)
    logits_mib = n * v * 4 / 2**20
    rows = []
    stock_time = None
    for name, fn in methods().items():
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        try:
            times = []
            for rep in range(reps + 1):
                h.grad = None
                w.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                loss = fn(h, w, y)
                loss.backward()
                torch.cuda.synchronize()
                if rep:
                    times.append(time.perf_counter() - t0)
            assert h.grad is not None and w.grad is not None
            grads = (h.grad.numel() + w.grad.numel()) * h.grad.element_size()
            extra = (torch.cuda.max_memory_allocated() - base - grads) / 2**20
            t = statistics.median(times)
            stock_time = stock_time or t
            loss_err = abs(float(loss.detach()) - ref_loss)
            rows.append(
                f"| {n}/{hd}/{v} | {str(dtype).removeprefix('torch.')} | {ignored:.0%} | {name} | {t * 1e3:.1f} "
                f"| {stock_time / t:.2f}× | {extra:.0f} | {extra / logits_mib:.1%} | {loss_err:.1e} "
                f"| {rel(h.grad, ref_dh):.1e} | {rel(w.grad, ref_dw):.1e} |"
            )
        except Exception as e:  # a peer that cannot run this case is reported, not fatal
            dt = str(dtype).removeprefix("torch.")
            rows.append(f"| {n}/{hd}/{v} | {dt} | {ignored:.0%} | {name} | failed: {type(e).__name__}: {e} |")
        print(rows[-1], flush=True)
        del h, w
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="small,big")
    p.add_argument("--dtypes", default="bf16,f32")
    p.add_argument("--ignored", default="0,0.5")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results-cuda.md"))
    args = p.parse_args()
    header = [
        f"# bench/cuda_compare.py on {torch.cuda.get_device_name()} (torch {torch.__version__})\n",
        "| N/H/V | dtype | ignored | method | ms | speed-up vs stock | extra (MiB) | extra / f32 logits "
        "| loss err | d_hidden err | d_weight err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for case in args.cases.split(","):
        for dt in args.dtypes.split(","):
            for ig in args.ignored.split(","):
                rows += run_case(*CASES[case], DTYPES[dt], float(ig), args.reps)
    args.out.write_text("\n".join(header + rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
