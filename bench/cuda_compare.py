"""Fused linear + cross-entropy on one CUDA device: logitless's Triton and torch paths against stock transformers
and its peers, plus a correctness block, in one run sized for a lent device's 15-minute window (about 5 minutes).

One process, methods run one after another on the same inputs: time of forward + backward (median of ``--reps``
after a warm-up) two ways, and peak CUDA memory above what the inputs and the returned gradients take
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``), as a share of the float32 logits stock
holds; loss and gradient errors against a float32 reference (row-chunked materialised logits).

* wall: from an idle device to the end of backward (host clock, synchronised before and after): the host's
  Python and launch overhead included, as a lone call pays it;
* device: CUDA events around the call, queued behind a ~25 ms sleep kernel so that the host has launched
  everything before the device reaches the first event: the device's own time, as in a training step where the
  host runs ahead of the device.

    python bench/cuda_compare.py [--cases small,big] [--dtypes bf16,f32] [--ignored 0,0.5] [--out FILE]
    python bench/cuda_compare.py --out-dir "$OUT"      # on the lent device: Markdown + JSON there
    python bench/cuda_compare.py --dry-run             # CPU, Triton's interpreter, a tiny case: the script itself

Correctness first: about 40 cases (every epilogue, bf16 / f32, 0 / 50 % ignored, both weight-gradient modes)
against a float64 materialised reference on the device, each implementation's loss and gradient errors no worse
than stock's (1.5x plus a float32 ulp), Triton results bitwise equal across two runs, and (on CUDA) one chunk of
more than 2^31 logits elements.

Peers run when installed: cut-cross-entropy (``impl="cce"``, its Triton kernels), Liger-Kernel
(``LigerFusedLinearCrossEntropyLoss``), ``torch.nn.functional.linear_cross_entropy``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# wide: an 8B-class model (hidden 4096) on 8192 tokens, where the default mode keeps every chunk's bf16 gradient
# instead of a float32 accumulator (not in the default --cases).
CASES = {
    "small": (2048, 1024, 32000), "big": (8192, 2048, 128256), "wide": (8192, 4096, 128256), "tiny": (64, 64, 3000),
}  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
IGNORE = -100
Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def methods() -> dict[str, Fn]:
    from transformers.loss.loss_utils import ForCausalLMLoss

    from logitless import linear_cross_entropy

    def stock(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ForCausalLMLoss(torch.nn.functional.linear(h, w), None, w.shape[0], shift_labels=y)

    def ours(mode: str, impl: str = "torch", aliased: bool = False) -> Fn:
        def f(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            os.environ["LOGITLESS_WEIGHT_GRAD"] = mode
            _alias_on_cuda(aliased)
            return linear_cross_entropy(h, w, None, shift_labels=y, impl=impl)

        return f

    def sft_mean(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # TRL's SFT loss: per-token log-probs, then their mean (one upstream value per counted token: the hint).
        os.environ["LOGITLESS_WEIGHT_GRAD"] = "accumulate"
        _alias_on_cuda(False)
        rows = linear_cross_entropy(h, w, None, shift_labels=y, reduction="none", expect_uniform_grad=True)
        return rows.sum() / (y != IGNORE).sum().clamp(min=1)

    out: dict[str, Fn] = {
        "stock HF (materialised)": stock,
        "logitless (triton, accumulate)": ours("accumulate", "triton"),
        # The plan before the halves and the shared gradient buffer (one chunk in the rows' order; the float32
        # accumulator): the two measured side by side.
        "logitless (triton, accumulate, one chunk / float32 accumulator)": _FormerPlan(ours("accumulate", "triton")),
        # A host-bound call's answer: the step captured once and replayed (torch.compile's "reduce-overhead").
        "logitless (triton, accumulate, CUDA graph)": _Graphed(ours("accumulate", "triton")),
        "logitless (triton, recompute)": ours("recompute", "triton"),
        # Not the default on CUDA until checked there: the rounded gradient over its own float32 logits.
        "logitless (triton, accumulate, gradient over logits)": ours("accumulate", "triton", aliased=True),
        "logitless (triton, recompute, gradient over logits)": ours("recompute", "triton", aliased=True),
        "logitless (per-token, SFT mean)": sft_mean,
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


class _FormerPlan:
    """``fn`` with torch_path's plans as they were before a one-chunk problem ran in two halves and chunks shared one
    bf16 gradient buffer (a benchmark's A/B switch, not an option)."""

    def __init__(self, fn: Fn) -> None:
        self._fn = fn

    def __call__(self, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from logitless import torch_path

        real = torch_path._plan

        def former(*args: Any, **kwargs: Any) -> Any:
            plan = real(*args, **kwargs)
            if plan.halves:  # one chunk over every row, in their order, as before
                plan = real(*args, **{**kwargs, "skip_ignored": False})
            return dataclasses.replace(plan, shared_grad=False)

        torch_path._plan = former  # type: ignore[assignment]
        try:
            return self._fn(h, w, y)
        finally:
            torch_path._plan = real  # type: ignore[assignment]


class _Graphed:
    """``fn``'s forward + backward captured in a CUDA graph on its first call and replayed on every call with the
    same tensors (the benchmark passes the same ``h``, ``w``, ``y`` each time): a call's host work is one replay.
    The returned loss is the graph's static one as a fresh leaf, so the caller's ``backward()`` does nothing more;
    memory figures of this row count the graph's pool as already allocated."""

    def __init__(self, fn: Fn) -> None:
        self.fn = fn
        self.key: tuple[int, ...] = ()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, ...] = ()

    def __call__(self, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if h.device.type != "cuda":  # the dry run: no graphs on CPU
            return self.fn(h, w, y)
        if self.key != (id(h), id(w), id(y)):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    h.grad = w.grad = None
                    self.fn(h, w, y).backward()
            torch.cuda.current_stream().wait_stream(side)
            h.grad = w.grad = None
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                loss = self.fn(h, w, y)
                loss.backward()
            assert h.grad is not None and w.grad is not None
            self.static, self.key = (loss.detach(), h.grad, w.grad), (id(h), id(w), id(y))
        assert self.graph is not None
        self.graph.replay()
        h.grad, w.grad = self.static[1], self.static[2]
        return self.static[0].clone().requires_grad_()


def _alias_on_cuda(on: bool) -> None:
    """Whether the Triton kernels write a row's rounded gradient over its own float32 logits on CUDA
    (``triton_path._ALIAS_ON_CUDA``: off by default there until a run of this script has checked it)."""
    from logitless import triton_path

    triton_path._ALIAS_ON_CUDA = on


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


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _peak(dev: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0


def _allocated(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _device_time(fn: Fn, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, dev: torch.device) -> float:
    """Seconds of device time of one forward + backward, its launches queued behind a sleep kernel (0 off CUDA)."""
    if dev.type != "cuda":
        return 0.0
    h.grad = None
    w.grad = None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)  # ≈25 ms at ~2 GHz: the host queues the whole call meanwhile
    start.record()
    fn(h, w, y).backward()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def run_case(
    n: int, hd: int, v: int, dtype: torch.dtype, ignored: float, reps: int, dev: torch.device, records: list[dict]
) -> list[str]:
    g = torch.Generator(device=dev).manual_seed(1234)
    hidden = torch.randn(n, hd, generator=g, device=dev, dtype=dtype)
    weight = torch.randn(v, hd, generator=g, device=dev, dtype=dtype).mul_(2.0 / hd**0.5)
    y = torch.randint(0, v, (n,), generator=g, device=dev)
    y[torch.rand(n, generator=g, device=dev) < ignored] = IGNORE
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, y)
    logits_mib = n * v * 4 / 2**20
    rows = []
    stock: tuple[float, float] | None = None
    for name, fn in methods().items():
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        try:
            times, device_times = [], []
            for rep in range(reps + 1):
                h.grad = None
                w.grad = None
                _sync(dev)
                base = _allocated(dev)
                t0 = time.perf_counter()
                loss = fn(h, w, y)
                loss.backward()
                _sync(dev)
                if rep:
                    times.append(time.perf_counter() - t0)
                    device_times.append(_device_time(fn, h, w, y, dev))
            assert h.grad is not None and w.grad is not None
            grads = (h.grad.numel() + w.grad.numel()) * h.grad.element_size()
            extra = max(_peak(dev) - base - grads, 0) / 2**20
            t, td = statistics.median(times), statistics.median(device_times)
            stock = stock or (t, td)
            device_speedup = stock[1] / td if td else float("nan")
            loss_err = abs(float(loss.detach()) - ref_loss)
            records.append({"case": [n, hd, v], "dtype": str(dtype).removeprefix("torch."), "ignored": ignored,
                            "method": name, "ms": t * 1e3, "device_ms": td * 1e3, "extra_mib": extra,
                            "loss_err": loss_err, "d_hidden_err": rel(h.grad, ref_dh),
                            "d_weight_err": rel(w.grad, ref_dw)})  # fmt: skip
            rows.append(
                f"| {n}/{hd}/{v} | {str(dtype).removeprefix('torch.')} | {ignored:.0%} | {name} | {t * 1e3:.1f} "
                f"| {td * 1e3:.1f} | {stock[0] / t:.2f}× / {device_speedup:.2f}× | {extra:.0f} "
                f"| {extra / logits_mib:.1%} | {loss_err:.1e} | {rel(h.grad, ref_dh):.1e} | {rel(w.grad, ref_dw):.1e} |"
            )
        except Exception as e:  # a peer that cannot run this case is reported, not fatal
            dt = str(dtype).removeprefix("torch.")
            rows.append(f"| {n}/{hd}/{v} | {dt} | {ignored:.0%} | {name} | failed: {type(e).__name__}: {e} |")
        print(rows[-1], flush=True)
        del h, w
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


EPILOGUES = {
    "plain": {},
    "softcap": {"logit_softcapping": 3.0},
    "multiply": {"logit_scale_multiply": 2.0},
    "divide": {"logit_scale_divide": 0.5},
    "smoothing+z-loss": {"label_smoothing": 0.1, "z_loss": 1e-4},
    "all+logits bias": {"logit_softcapping": 3.0, "logit_scale_multiply": 1.5, "label_smoothing": 0.1,
                        "z_loss": 1e-4, "logits_bias": True},
}  # fmt: skip


def _reference64(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, kw: dict) -> tuple[torch.Tensor, ...]:
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z = h64 @ w64.T
    if kw.get("logits_bias") is not None:
        z = z + kw["logits_bias"].double()
    z = z * kw.get("logit_scale_multiply", 1.0) / kw.get("logit_scale_divide", 1.0)
    if "logit_softcapping" in kw:
        c = kw["logit_softcapping"]
        z = c * torch.tanh(z / c)
    keep = y != IGNORE
    logp = torch.log_softmax(z, -1)
    t = torch.where(keep, y, 0)
    eps, zl = kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
    per = -(1 - eps) * logp.gather(1, t[:, None])[:, 0] - eps * logp.mean(-1) + zl * torch.logsumexp(z, -1) ** 2
    loss = torch.where(keep, per, 0.0).sum() / keep.sum().clamp(min=1)
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


def _low_rank_rows(dev: torch.device, n: int, hd: int, v: int) -> list[str]:
    """A LoRA adapter on a frozen bf16 head (``low_rank``, r=16, a third of the targets ignored): loss, d_hidden and
    the factors' gradients against float64, as multiples of stock's (PEFT's forward: bf16 logits plus the float32
    adapter's term, upcast), for the Triton kernels and the torch path. Two rows."""
    from logitless import linear_cross_entropy

    g = torch.Generator(device=dev).manual_seed(13)
    h = torch.randn(n, hd, generator=g, device=dev).to(torch.bfloat16)
    w = (torch.randn(v, hd, generator=g, device=dev) * 2 / hd**0.5).to(torch.bfloat16)
    a = torch.randn(n, 16, generator=g, device=dev)
    b = torch.randn(v, 16, generator=g, device=dev) * 0.1
    y = torch.randint(0, v, (n,), generator=g, device=dev)
    y[::3] = IGNORE

    def run(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*leaves)
        return (loss.detach(), *torch.autograd.grad(loss, leaves))

    ref = run(lambda hh, aa, bb: torch.nn.functional.cross_entropy(
        hh @ w.double().T + aa @ bb.T, y, ignore_index=IGNORE), h.double(), a.double(), b.double())  # fmt: skip
    stock = run(lambda hh, aa, bb: torch.nn.functional.cross_entropy(
        (hh @ w.T).float() + aa @ bb.T, y, ignore_index=IGNORE), h, a, b)  # fmt: skip

    def errors(got: tuple[torch.Tensor, ...]) -> list[float]:
        return [float((x.double() - r).abs().max()) / max(float(r.abs().max()), 1e-30) for x, r in zip(got, ref)]

    base, out = errors(stock), []
    for impl in ("triton", "torch"):
        got = run(lambda hh, aa, bb, impl=impl: linear_cross_entropy(hh, w, None, shift_labels=y, impl=impl,
                                                                       low_rank=(aa, bb)), h, a, b)  # fmt: skip
        errs = errors(got)
        ok = all(e <= 1.5 * s + 2.0**-8 for e, s in zip(errs, base))
        r = [f"{e / max(s, 2.0**-8):.2f}" for e, s in zip(errs, base)]
        # The d_weight column holds the factors' (d_a / d_b): the head is frozen.
        out.append(f"| bf16 33% LoRA term (r=16) | {impl} | {r[0]} | {r[1]} | d_a {r[2]} / d_b {r[3]} | |"
                   + ("" if ok else " **FAIL**"))  # fmt: skip
    return out


def correctness(dev: torch.device, small: bool) -> list[str]:
    """Errors against float64, as multiples of stock's (materialised logits in the inputs' dtype, upcast)."""
    from logitless import linear_cross_entropy, torch_path

    n, hd, v = (32, 32, 1500) if small else (512, 256, 32000)
    rows = ["| case | impl | loss err / stock's | d_hidden err / stock's | d_weight err / stock's "
            "| repeatable (and aliased = separate) |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    failures = 0
    for dt_name, dtype in DTYPES.items():
        for ignored in (0.0, 0.5):
            for ep_name, spec in EPILOGUES.items():
                g = torch.Generator(device=dev).manual_seed(7)
                h = torch.randn(n, hd, generator=g, device=dev).to(dtype)
                w = (torch.randn(v, hd, generator=g, device=dev) * 2 / hd**0.5).to(dtype)
                y = torch.randint(0, v, (n,), generator=g, device=dev)
                y[torch.rand(n, generator=g, device=dev) < ignored] = IGNORE
                y[0] = v - 1
                kw = dict(spec)
                if kw.pop("logits_bias", False):
                    kw["logits_bias"] = torch.randn(v, generator=g, device=dev)
                ref = _reference64(h, w, y, kw)

                def errors(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[tuple[float, ...], tuple]:
                    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
                    loss = fn(hh, ww)
                    loss.backward()
                    got = (loss.detach(), hh.grad, ww.grad)
                    errs = tuple(float((a.double() - b).abs().max()) / max(float(b.abs().max()), 1e-30)
                                 for a, b in zip(got, ref))  # fmt: skip
                    return errs, got

                def stock(hh: torch.Tensor, ww: torch.Tensor) -> torch.Tensor:
                    z = hh @ ww.T
                    z = z.float()
                    if kw.get("logits_bias") is not None:
                        z = z + kw["logits_bias"]
                    z = z * kw.get("logit_scale_multiply", 1.0) / kw.get("logit_scale_divide", 1.0)
                    if "logit_softcapping" in kw:
                        z = kw["logit_softcapping"] * torch.tanh(z / kw["logit_softcapping"])
                    keep = y != IGNORE
                    logp = torch.log_softmax(z, -1)
                    t = torch.where(keep, y, 0)
                    eps, zl = kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0)
                    per = (-(1 - eps) * logp.gather(1, t[:, None])[:, 0] - eps * logp.mean(-1)
                           + zl * torch.logsumexp(z, -1) ** 2)  # fmt: skip
                    return torch.where(keep, per, 0.0).sum() / keep.sum().clamp(min=1)

                base, _ = errors(stock)
                floor = 2.0**-23 if dtype == torch.float32 else 2.0**-8
                separate: dict[str, tuple] = {}
                # recompute on these problems takes the shared gradient's three GEMMs; "recompute-slabs" runs the
                # slab pass that larger ones take.
                for impl, mode, aliased in (("triton", "accumulate", False), ("triton", "accumulate", True),
                                            ("triton", "recompute", False), ("triton", "recompute", True),
                                            ("triton", "recompute-slabs", False), ("triton", "recompute-slabs", True),
                                            ("torch", "accumulate", False)):  # fmt: skip
                    os.environ["LOGITLESS_WEIGHT_GRAD"] = mode.removesuffix("-slabs")
                    torch_path._RECOMPUTE_SHARES_SMALL = not mode.endswith("-slabs")
                    _alias_on_cuda(aliased)

                    def ours(hh: torch.Tensor, ww: torch.Tensor, impl: str = impl) -> torch.Tensor:
                        return linear_cross_entropy(hh, ww, None, shift_labels=y, impl=impl, **kw)

                    errs, got = errors(ours)
                    _, again = errors(ours)
                    same = all(torch.equal(a, b) for a, b in zip(got, again))
                    if impl == "triton" and not aliased:
                        separate[mode] = got
                    elif aliased:  # the gradient over its own logits: bit for bit the one in a buffer of its own
                        same = same and all(torch.equal(a, b) for a, b in zip(got, separate[mode]))
                    ratios = [e / max(b, floor) for e, b in zip(errs, base)]
                    ok = all(e <= 1.5 * b + floor for e, b in zip(errs, base)) and (same or impl == "torch")
                    failures += not ok
                    label = f"{impl} {mode}" + (" (gradient over logits)" if aliased else "")
                    rows.append(f"| {dt_name} {ignored:.0%} {ep_name} | {label} | "
                                + " | ".join(f"{r:.2f}" for r in ratios) + f" | {same} |" + ("" if ok else " **FAIL**"))  # fmt: skip
                _alias_on_cuda(False)
                torch_path._RECOMPUTE_SHARES_SMALL = True
    os.environ["LOGITLESS_WEIGHT_GRAD"] = "accumulate"
    rows += _low_rank_rows(dev, n, hd, v)
    failures += sum("**FAIL**" in r for r in rows[-2:])
    if dev.type == "cuda":
        # Enough rows for one program per row (the cases above split rows into parts): the row kernel's gradient
        # over its own logits, bit for bit the separate buffer's, every epilogue.
        g = torch.Generator(device=dev).manual_seed(11)
        h = torch.randn(4096, 256, generator=g, device=dev).to(torch.bfloat16)
        w = (torch.randn(32000, 256, generator=g, device=dev) * 0.15).to(torch.bfloat16)
        y = torch.randint(0, 32000, (4096,), generator=g, device=dev)
        y[::4] = IGNORE
        for ep_name, spec in EPILOGUES.items():
            kw = dict(spec)
            if kw.pop("logits_bias", False):
                kw["logits_bias"] = torch.randn(32000, generator=g, device=dev)
            got = []
            for aliased in (False, True):
                _alias_on_cuda(aliased)
                hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
                loss = linear_cross_entropy(hh, ww, None, shift_labels=y, impl="triton", **kw)
                loss.backward()
                got.append((loss.detach(), hh.grad, ww.grad))
            _alias_on_cuda(False)
            ok = all(torch.equal(a, b) for a, b in zip(*got))
            failures += not ok
            rows.append(f"| bf16 4096x32000 {ep_name}, one program per row | triton accumulate (gradient over logits) "
                        f"| | | | aliased = separate: {ok} |" + ("" if ok else " **FAIL**"))  # fmt: skip
        # One chunk of more than 2^31 float32 logits elements: 64-bit row offsets in the kernel.
        n2, v2 = 16640, 131072
        os.environ["LOGITLESS_CHUNK_MB"] = str(n2 * v2 * 3 * 4 // 2**20 + 1)
        h = torch.randn(n2, 64, device=dev, dtype=torch.bfloat16)
        w = torch.randn(v2, 64, device=dev, dtype=torch.bfloat16) * 0.25
        y = torch.randint(0, v2, (n2,), device=dev)
        y[-1] = v2 - 1
        got = float(linear_cross_entropy(h, w, None, shift_labels=y, impl="triton"))
        want = float(torch.nn.functional.cross_entropy((h[-4096:].float() @ w.float().T), y[-4096:]))
        head = float(torch.nn.functional.cross_entropy((h[:4096].float() @ w.float().T), y[:4096]))
        ok = abs(got - (want + head) / 2) < 0.05 * abs(got)
        failures += not ok
        rows.append(f"| bf16 {n2}x{v2} one chunk (>2^31 elements) | triton | loss {got:.4f} vs sampled {(want + head) / 2:.4f} | | | |"
                    + ("" if ok else " **FAIL**"))  # fmt: skip
        del os.environ["LOGITLESS_CHUNK_MB"]
    rows.append(f"\n{failures} failing case(s)")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="small,big")
    p.add_argument("--dtypes", default="bf16,f32")
    p.add_argument("--ignored", default="0,0.5")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results-cuda.md"))
    p.add_argument("--out-dir", type=Path, default=None, help="write results-cuda.md and results-cuda.json there")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, the tiny case, 1 rep")
    args = p.parse_args()
    if args.dry_run:
        # Read by Triton when the kernels are decorated: before logitless.triton_path is imported.
        os.environ["TRITON_INTERPRET"] = "1"
        args.cases, args.reps = "tiny", 1
        if args.out_dir is None:
            args.out_dir = Path("/tmp/logitless-cuda-dry-run")
    dev = torch.device("cpu" if args.dry_run else "cuda")
    import triton

    name = "CPU (Triton interpreter, dry run)" if args.dry_run else torch.cuda.get_device_name()
    header = [f"# bench/cuda_compare.py on {name} (torch {torch.__version__}, triton {triton.__version__})\n"]
    t0 = time.perf_counter()
    checks = correctness(dev, small=args.dry_run)
    header += ["## Correctness (errors vs float64, as multiples of stock's)\n", *checks, "",
               f"({time.perf_counter() - t0:.0f} s, JIT warm-up included)\n", "## Speed and memory\n"]  # fmt: skip
    header += [
        "| N/H/V | dtype | ignored | method | wall ms | device ms | speed-up vs stock (wall / device) | extra (MiB) "
        "| extra / f32 logits | loss err | d_hidden err | d_weight err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows: list[str] = []
    records: list[dict] = []
    for case in args.cases.split(","):
        for dt in args.dtypes.split(","):
            for ig in args.ignored.split(","):
                rows += run_case(*CASES[case], DTYPES[dt], float(ig), args.reps, dev, records)
    out = args.out
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = args.out_dir / "results-cuda.md"
        (args.out_dir / "results-cuda.json").write_text(json.dumps({"checks": checks, "rows": records}, indent=1))
    out.write_text("\n".join(header + rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
