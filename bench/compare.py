"""Fused linear + cross-entropy on CPU: logitless against stock transformers and its peers, in one table.

Every (case, method) runs in its own subprocess, so each peak RSS (``ru_maxrss`` of that child) belongs to one method
alone. Each child builds the same seeded inputs, warms the method up on a tiny problem (and with ``--warmup N`` on
N untimed full-size calls), times forward + backward (median of ``--reps``), then compares its loss and gradients
with a float32 reference (row-chunked materialised logits, computed once per case in another child). "extra" is the
peak RSS above the child's RSS just before the timed runs, minus the gradient outputs every method must return
(d_hidden and d_weight in the input dtype): the scratch memory.

    python bench/compare.py                 # both cases, bf16 + f32, 0% and 50% ignored, plus the memory plot
    python bench/compare.py --quick         # a toy case only (N=512, H=256, V=8000)
    python bench/compare.py --cases small --dtypes bf16 --methods stock,logitless_rust

Writes the table to bench/results.md and peak memory against N to bench/memory.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CASES = {"quick": (512, 256, 8000), "small": (2048, 1024, 32000), "big": (8192, 2048, 128256)}
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
METHODS = [
    "stock",
    "logitless_rust",
    "logitless_rust_recompute",
    "logitless_torch",
    "torch_lce",
    "cce_torch_compile",
    "trl_chunked_logprob",
    "logitless_tokens",
    "logitless_tokens_mean",
    "trl_tokens",
    "materialised_tokens",
    "logitless_tokens_frozen",
    "trl_tokens_frozen",
    "materialised_tokens_frozen",
]
# Per-token rows (what TRL's trainers ask of a fused head): log-probs at temperature 0.7 with entropy and top-1,
# forward + backward with a random per-token upstream gradient through the log-probs. Their loss is
# -Σ u_i·log p_i / count, not the cross-entropy, so they have no error columns against the reference. The "_frozen"
# rows run the same call with the head frozen (LoRA: only the hidden states get a gradient).
FROZEN_SUFFIX = "_frozen"
TOKEN_METHODS = {"logitless_tokens", "logitless_tokens_mean", "trl_tokens", "materialised_tokens",
                 "logitless_tokens_frozen", "trl_tokens_frozen", "materialised_tokens_frozen"}  # fmt: skip
TEMPERATURE = 0.7
LABELS = {
    "stock": "stock HF (materialised)",
    "logitless_rust": "logitless (Rust)",
    "logitless_rust_recompute": "logitless (Rust, LOGITLESS_WEIGHT_GRAD=recompute)",
    "logitless_torch": "logitless (torch path)",
    "torch_lce": "torch F.linear_cross_entropy",
    "cce_torch_compile": "cut-cross-entropy torch_compile",
    "trl_chunked_logprob": "TRL ChunkedLogProbFunction",
    "logitless_tokens": "per-token: logitless (Rust)",
    "logitless_tokens_mean": "per-token, SFT's mean (u_i = 1): logitless (Rust), expect_uniform_grad",
    "trl_tokens": "per-token: TRL ChunkedLogProbFunction",
    "materialised_tokens": "per-token: materialised log_softmax + gather",
    "logitless_tokens_frozen": "per-token, frozen head: logitless (Rust)",
    "trl_tokens_frozen": "per-token, frozen head: TRL ChunkedLogProbFunction",
    "materialised_tokens_frozen": "per-token, frozen head: materialised log_softmax + gather",
}
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------------------------------


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, ignored: float) -> tuple[torch.Tensor, ...]:
    # Drawn directly in the target dtype and scaled in place: no float32 temporaries raise the RSS high-water mark
    # before the measured run starts.
    g = torch.Generator().manual_seed(1234)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    # Logits with a standard deviation of about 2, like a trained head's.
    weight = torch.randn(v, h, generator=g, dtype=dtype).mul_(2.0 / h**0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = IGNORE_INDEX
    return hidden, weight, targets


def method_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of (hidden [N,H], weight [V,H], already-shifted targets [N]) as each method computes it."""
    if name == "stock":
        from transformers.loss.loss_utils import ForCausalLMLoss

        def stock(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = torch.nn.functional.linear(hidden, weight)
            return ForCausalLMLoss(logits, None, weight.shape[0], shift_labels=targets)

        return stock
    if name in ("logitless_rust", "logitless_rust_recompute", "logitless_torch"):
        from logitless import linear_cross_entropy

        impl = "torch" if name == "logitless_torch" else "rust"
        # Read on every call: the child runs one method, so setting it here affects only this one.
        os.environ["LOGITLESS_WEIGHT_GRAD"] = "recompute" if name.endswith("_recompute") else "accumulate"

        def ours(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return linear_cross_entropy(hidden, weight, None, shift_labels=targets, impl=impl)

        return ours
    if name == "torch_lce":
        options = torch.nn.LinearCrossEntropyOptions()

        def torch_lce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear_cross_entropy(
                hidden, weight, targets, ignore_index=IGNORE_INDEX, options=options
            )

        return torch_lce
    if name == "cce_torch_compile":
        from cut_cross_entropy import linear_cross_entropy as cce

        def cce_fn(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return cce(hidden, weight, targets, ignore_index=IGNORE_INDEX, impl="torch_compile")

        return cce_fn
    if name == "trl_chunked_logprob":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        def trl_fn(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            # TRL scores target log-probabilities; the loss is their negated mean over the valid positions (the
            # way TRL's own trainer calls it: valid rows only, vocab tiles of 32768).
            mask = targets != IGNORE_INDEX
            logprobs = ChunkedLogProbFunction.apply(hidden[mask], weight, None, targets[mask], 1.0, 32768, None, 1.0, ())
            return -logprobs[0].sum() / mask.sum().clamp(min=1)

        return trl_fn
    if name in TOKEN_METHODS:
        return token_method_fn(name)
    raise SystemExit(f"unknown method {name!r}; expected one of {METHODS}")


def _upstream(targets: torch.Tensor) -> torch.Tensor:
    """The per-token upstream gradient (an advantage, a DPO weight): fixed random values in [0.5, 1.5]."""
    return torch.rand(targets.shape, generator=torch.Generator().manual_seed(7)) + 0.5


def token_method_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``-Σ u_i·log p(t_i) / count`` at temperature 0.7, with the entropy and top-1 flags formed too."""
    if name == "logitless_tokens":
        from logitless import linear_cross_entropy

        def ours(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            nll, stats = linear_cross_entropy(hidden, weight, None, shift_labels=targets, reduction="none",
                                              temperature=TEMPERATURE, return_token_stats=True)  # fmt: skip
            del stats  # formed in the same pass: its cost is in the time
            return (nll * _upstream(targets)).sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)

        return ours
    if name == "logitless_tokens_mean":
        from logitless import linear_cross_entropy

        # What TRL >= 1.15's SFTTrainer backpropagates: the mean of -log p over the counted tokens.
        def mean(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            nll, stats = linear_cross_entropy(hidden, weight, None, shift_labels=targets, reduction="none",
                                              temperature=TEMPERATURE, return_token_stats=True,
                                              expect_uniform_grad=True)  # fmt: skip
            del stats
            return nll.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)

        return mean
    if name == "trl_tokens":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        def trl_tokens(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            mask = targets != IGNORE_INDEX
            logprobs, *_ = ChunkedLogProbFunction.apply(hidden[mask], weight, None, targets[mask], TEMPERATURE,
                                                        32768, None, 1.0, ("entropy", "is_top1"))  # fmt: skip
            return -(logprobs * _upstream(targets)[mask]).sum() / mask.sum().clamp(min=1)

        return trl_tokens

    def materialised(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mask = targets != IGNORE_INDEX
        logp = torch.log_softmax(torch.nn.functional.linear(hidden, weight).float() / TEMPERATURE, dim=-1)
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
            top1 = logp.argmax(-1) == targets
        del entropy, top1
        return -(picked * _upstream(targets) * mask).sum() / mask.sum().clamp(min=1)

    return materialised


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_reference(n: int, h: int, v: int, dtype: torch.dtype, ignored: float, out: Path) -> None:
    """float32 loss and gradients from the same (rounded) inputs, with materialised logits in row chunks."""
    hidden, weight, targets = make_inputs(n, h, v, dtype, ignored)
    h32, w32 = hidden.float(), weight.float().requires_grad_()
    count = max(int((targets != IGNORE_INDEX).sum()), 1)
    d_hidden = torch.zeros(n, h)
    loss = 0.0
    for start in range(0, n, 256):
        hc = h32[start : start + 256].clone().requires_grad_()
        part = torch.nn.functional.cross_entropy(
            hc @ w32.T, targets[start : start + 256], ignore_index=IGNORE_INDEX, reduction="sum"
        ) / count
        part.backward()
        assert hc.grad is not None
        d_hidden[start : start + 256] = hc.grad
        loss += float(part)
    assert w32.grad is not None
    torch.save({"loss": loss, "d_hidden": d_hidden, "d_weight": w32.grad}, out)


def run_child(args: argparse.Namespace) -> None:
    dtype = DTYPES[args.dtype]
    frozen = args.method.endswith(FROZEN_SUFFIX)
    fn = method_fn(args.method.removesuffix(FROZEN_SUFFIX))
    hidden, weight, targets = make_inputs(args.n, args.h, args.v, dtype, args.ignored)
    hidden.requires_grad_()
    weight.requires_grad_(not frozen)
    # One tiny call first: lazy initialisation (thread pools, compilation, kernels) is neither timed nor counted.
    th, tw, tt = make_inputs(64, 32, 96, dtype, 0.0)
    fn(th.requires_grad_(), tw.requires_grad_(not frozen), tt).backward()
    del th, tw, tt
    baseline = rss_mib()
    times = []
    for rep in range(args.warmup + args.reps):
        hidden.grad = None
        weight.grad = None
        t0 = time.perf_counter()
        loss = fn(hidden, weight, targets)
        loss.backward()
        elapsed = time.perf_counter() - t0
        if rep >= args.warmup:
            times.append(elapsed)
    peak = max(maxrss_mib(), baseline)
    assert hidden.grad is not None and (weight.grad is None) == frozen
    grad_mib = (hidden.numel() + (0 if frozen else weight.numel())) * hidden.grad.element_size() / 2**20
    result = {
        "time_s": statistics.median(times),
        "times_s": times,
        "peak_mib": peak,
        "baseline_mib": baseline,
        "extra_mib": peak - baseline - grad_mib,
        "loss": float(loss.detach()),
    }
    if args.reference and args.method not in TOKEN_METHODS:
        ref = torch.load(args.reference, mmap=True)

        def rel(a: torch.Tensor, e: torch.Tensor) -> float:
            return float((a.float() - e).abs().max() / e.abs().max().clamp(min=1e-30))

        result["loss_err"] = abs(result["loss"] - ref["loss"])
        result["d_hidden_err"] = rel(hidden.grad, ref["d_hidden"])
        result["d_weight_err"] = rel(weight.grad, ref["d_weight"])
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------------------


def spawn(argv: list[str], timeout: float) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f}s: {' '.join(argv)}", file=sys.stderr)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    if proc.returncode == 0:
        return {}
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
    print(f"  failed ({proc.returncode}): {' '.join(argv)}\n{tail}", file=sys.stderr)
    return None


def fmt_err(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the quick case (N=512, H=256, V=8000)")
    p.add_argument("--cases", default="small,big", help=f"comma list of {list(CASES)}")
    p.add_argument("--dtypes", default="bf16,f32", help=f"comma list of {list(DTYPES)}")
    p.add_argument("--ignored", default="0,0.5", help="comma list of ignored-target fractions")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3 quick, 2 small, 1 big)")
    p.add_argument("--plot-methods", help="methods in the memory plot",
                   default="stock,logitless_rust,logitless_rust_recompute,logitless_torch,cce_torch_compile")
    p.add_argument("--plot-ns", default="512,1024,2048,4096", help="N values of the memory plot ('' to skip)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    p.add_argument("--rows-json", default=None,
                   help="keep every measured row in this JSON file; rows already in it are reused, not re-run "
                        "(the big case takes long: measure it in several sittings)")  # fmt: skip
    p.add_argument("--out", default=str(HERE / "results.md"))
    p.add_argument("--plot", default=str(HERE / "memory.png"))
    # child mode
    p.add_argument("--child", choices=["method", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--h", type=int, help=argparse.SUPPRESS)
    p.add_argument("--v", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--ignored-frac", dest="ignored_frac", type=float, help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed full-size calls before the timed ones (first-call costs such as mapping fresh "
                   "memory pages then count for no method)")  # fmt: skip
    args = p.parse_args()

    if args.child == "reference":
        run_reference(args.n, args.h, args.v, DTYPES[args.dtype], args.ignored_frac, Path(args.reference))
        return
    if args.child == "method":
        args.ignored = args.ignored_frac
        run_child(args)
        return

    cases = ["quick"] if args.quick else args.cases.split(",")
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; expected one of {METHODS}")
    rows = []
    saved: dict[str, dict | None] = {}
    if args.rows_json and Path(args.rows_json).is_file():
        saved = json.loads(Path(args.rows_json).read_text())

    def save(key: str, res: dict | None) -> None:
        if args.rows_json and res is not None:
            saved[key] = res
            Path(args.rows_json).write_text(json.dumps(saved, indent=1))

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            n, h, v = CASES[case]
            reps = args.reps if args.reps is not None else {"quick": 3, "small": 2, "big": 1}[case]
            for dname in args.dtypes.split(","):
                for ignored in (float(x) for x in args.ignored.split(",")):
                    ref = Path(tmp) / f"ref-{case}-{dname}-{ignored}.pt"
                    common = ["--n", str(n), "--h", str(h), "--v", str(v), "--dtype", dname,
                              "--ignored-frac", str(ignored)]  # fmt: skip
                    keys = {m: f"{case}/{dname}/{ignored}/{m}" for m in methods}
                    if any(saved.get(k) is None for k in keys.values()):
                        print(f"case N={n} H={h} V={v} {dname} ignored={ignored:.0%}: reference", flush=True)
                        if spawn(["--child", "reference", *common, "--reference", str(ref)], args.timeout) is None:
                            continue
                    logits_mib = n * v * 4 / 2**20
                    stock_res = None
                    for m in methods:
                        res = saved.get(keys[m])
                        if res is None:
                            print(f"  {m}", flush=True)
                            res = spawn(["--child", "method", "--method", m, *common, "--reference", str(ref),
                                         "--reps", str(reps), "--warmup", str(args.warmup)],
                                        args.timeout)  # fmt: skip
                            save(keys[m], res)
                        else:
                            print(f"  {m}: reused from {args.rows_json}", flush=True)
                        if m == "stock":
                            stock_res = res
                        rows.append((case, n, h, v, dname, ignored, m, res, stock_res, logits_mib))
                    ref.unlink(missing_ok=True)
        plot_points = plot_memory(args, args.plot_methods.split(",")) if args.plot_ns else {}

    table = render(rows)
    print(table)
    Path(args.out).write_text(
        "# bench/compare.py results\n\n"
        f"torch {torch.__version__}; {os.cpu_count()} CPU cores; command: `python bench/compare.py "
        f"{shlex.join(sys.argv[1:])}`\n\n" + table + "\n" + render_plot_table(plot_points)
    )
    print(f"wrote {args.out}" + (f" and {args.plot}" if plot_points else ""))


def render(rows: list) -> str:
    head = ("| N / H / V | dtype | ignored | method | time (s) | speed-up vs stock | peak RSS (MiB) | extra (MiB) "
            "| extra / f32 logits | loss err | d_hidden err | d_weight err |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for case, n, h, v, dname, ignored, m, res, stock_res, logits_mib in rows:
        prefix = f"| {n} / {h} / {v} | {dname} | {ignored:.0%} | {LABELS[m]} "
        if not res:
            lines.append(prefix + "| failed |" + " |" * 7)
            continue
        speed = f"{stock_res['time_s'] / res['time_s']:.2f}×" if stock_res else "—"
        lines.append(
            prefix + f"| {res['time_s']:.3f} | {speed} | {res['peak_mib']:.0f} | {res['extra_mib']:.0f} "
            f"| {res['extra_mib'] / logits_mib:.1%} | {fmt_err(res.get('loss_err'))} "
            f"| {fmt_err(res.get('d_hidden_err'))} | {fmt_err(res.get('d_weight_err'))} |"
        )
    return "\n".join(lines) + "\n"


def plot_memory(args: argparse.Namespace, methods: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Scratch memory against N at the small case's H and V (bf16), one child per point."""
    _, h, v = CASES["quick" if args.quick else "small"]
    ns = [int(x) for x in args.plot_ns.split(",")]
    if args.quick:
        ns = [n // 4 for n in ns]
    points: dict[str, list[tuple[int, float]]] = {}
    for m in methods:
        for n in ns:
            print(f"memory plot: {m} N={n}", flush=True)
            res = spawn(["--child", "method", "--method", m, "--n", str(n), "--h", str(h), "--v", str(v),
                         "--dtype", "bf16", "--ignored-frac", "0", "--reps", "1"],
                        args.timeout)  # fmt: skip
            if res:
                points.setdefault(m, []).append((n, res["extra_mib"]))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return points
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, pts in points.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS[m])
    ax.plot(ns, [n * v * 4 / 2**20 for n in ns], "k--", linewidth=1, label="size of f32 logits")
    ax.set_xlabel("N (tokens)")
    ax.set_ylabel("peak RSS above inputs and gradients (MiB)")
    ax.set_title(f"Scratch memory of forward+backward, bf16, H={h}, V={v}, CPU")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    return points


def render_plot_table(points: dict[str, list[tuple[int, float]]]) -> str:
    if not points:
        return ""
    ns = sorted({n for pts in points.values() for n, _ in pts})
    lines = ["## Scratch memory (MiB) against N (bf16; bench/memory.png)\n",
             "| method | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]  # fmt: skip
    for m, pts in points.items():
        got = dict(pts)
        lines.append(f"| {LABELS[m]} | " + " | ".join(f"{got[n]:.0f}" if n in got else "—" for n in ns) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
