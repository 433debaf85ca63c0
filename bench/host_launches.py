"""How many device launches one forward + backward of the op queues off CPU, counted on this CPU-only machine.

    python bench/host_launches.py

On a GPU a small call is host-bound (bench/results-cuda.md: at 2048×1024×32000 bf16 the device work is 0.9 ms,
the lone call's wall time 2.2 ms): every launch costs the host several microseconds of dispatch whatever the
kernel does. This script runs the op as it runs on a GPU (no host reads: targets checked and rows counted on the
device, ``impl="triton"`` through Triton's interpreter) on tiny CPU tensors and counts, per call kind, the torch
ops that would launch a kernel (top-level aten ops, view and allocation ops excluded, a conversion counted when it
copies), the Triton launches, and host reads (device syncs), next to stock's ``F.linear`` + ``ForCausalLMLoss``.
Counts only: timings here are CPU timings of numpy-interpreted kernels and mean nothing for a GPU. One CPU
artefact: CPU has no bf16 GEMM with a float32 result, so each chunk's GEMMs add four ``to`` conversions that CUDA's
mixed-precision GEMMs do not launch (``--ops`` lists them).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from collections.abc import Callable

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton decorates the kernels: before torch imports it

import torch  # noqa: E402

# Ops that queue no kernel: views, metadata, allocation without initialisation.
_NO_LAUNCH = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape",
    "_reshape_alias", "as_strided", "detach", "detach_", "alias", "lift_fresh", "t", "transpose", "permute", "expand",
    "select", "slice", "unsqueeze", "squeeze", "numpy_T", "unbind", "split", "result_type", "resolve_conj",
    "resolve_neg", "set_", "is_nonzero", "to", "_to_copy", "contiguous", "clone", "_has_compatible_shallow_copy_type",
}  # fmt: skip
_COPIES = {"to", "_to_copy", "contiguous", "clone", "reshape"}
_HOST_READS = {"item", "_local_scalar_dense", "is_nonzero"}
_INTERPRETER = "triton-interpreter"

# A call kind: fresh leaves (not counted), then the call on them (counted), and its backward (counted).
Step = tuple[Callable[[], tuple[torch.Tensor, ...]], Callable[..., torch.Tensor], Callable[[torch.Tensor], None]]


def _walk(event: torch.autograd.profiler_util.FunctionEvent) -> collections.abc.Iterator[str]:
    for child in event.cpu_children:
        yield child.name
        yield from _walk(child)


def _launches(prof: torch.profiler.profile) -> tuple[collections.Counter[str], int]:
    ops: collections.Counter[str] = collections.Counter()
    reads = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None and not nested:
            nested = parent.name.startswith("aten::") or parent.name == _INTERPRETER
            parent = parent.cpu_parent
        name = e.name[len("aten::") :]
        below = set(_walk(e))
        # (On CPU ``_assert_async`` reads its flag; on CUDA it is a kernel.)
        if name in _HOST_READS or ("aten::_local_scalar_dense" in below and name != "_assert_async"):
            reads += not nested
        if nested:
            continue
        if name in _COPIES:
            if "aten::copy_" in below:
                ops[name] += 1
        elif name not in _NO_LAUNCH:
            ops[name] += 1
    return ops, reads


class _TritonLaunches:
    """Counts launches of the interpreter's kernels (``kernel[grid](...)`` ends in ``InterpretedFunction.run``)."""

    def __init__(self) -> None:
        import triton.runtime.interpreter as interpreter

        self.count = 0
        self._cls = interpreter.InterpretedFunction
        self._run = self._cls.run
        counter = self

        def run(fn: object, *args: object, **kwargs: object) -> object:
            counter.count += 1
            # The interpreter copies the kernel's tensors to host buffers and back: not the launch's own ops.
            with torch.profiler.record_function(_INTERPRETER):
                return counter._run(fn, *args, **kwargs)

        self._cls.run = run  # type: ignore[method-assign]


class _ListReads:
    """Counts ``Tensor.tolist()`` calls: a host read (a device sync off CPU) that runs no aten op on CPU."""

    def __init__(self) -> None:
        self.count = 0
        real = torch.Tensor.tolist
        counter = self

        def tolist(t: torch.Tensor) -> object:
            counter.count += 1
            return real(t)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]


def _count(step: Step, triton: _TritonLaunches, lists: _ListReads) -> list[object]:
    prepare, call, backward = step
    for _ in range(2):  # warm-up: lazy initialisation is not counted
        backward(call(*prepare()))
    row: list[object] = []
    leaves = prepare()
    list_reads = lists.count
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as fwd:
        before = triton.count
        loss = call(*leaves)
        fwd_triton = triton.count - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as bwd:
        before = triton.count
        backward(loss)
        bwd_triton = triton.count - before
    (f_ops, f_reads), (b_ops, b_reads) = _launches(fwd), _launches(bwd)
    reads = f_reads + b_reads + lists.count - list_reads
    row += [sum(f_ops.values()), fwd_triton, sum(b_ops.values()), bwd_triton, reads]
    row.append(sum(f_ops.values()) + fwd_triton + sum(b_ops.values()) + bwd_triton)
    row.append(", ".join(f"{k}×{v}" if v > 1 else k for k, v in (f_ops + b_ops).most_common()))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", action="store_true", help="list the counted torch ops of each call")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("host_launches.py counts on CPU through Triton's interpreter (TRITON_INTERPRET=1)")
    from transformers.loss.loss_utils import ForCausalLMLoss

    from logitless import linear_cross_entropy, ops, torch_path

    torch.manual_seed(0)
    ops._host_reads_free = lambda device: False  # as on a GPU: no host reads
    real = torch_path.fused_lce

    def as_on_a_gpu(*a: object, **kw: object) -> torch_path.Result:
        kw.setdefault("low_precision_grad", True)  # CUDA's default for bf16 inputs without a bias gradient
        return real(*a, **kw)  # type: ignore[arg-type]

    torch_path.fused_lce = as_on_a_gpu  # type: ignore[assignment]
    triton, lists = _TritonLaunches(), _ListReads()
    n, h_dim, v = 256, 64, 512
    hidden = torch.randn(n, h_dim, dtype=torch.bfloat16)
    weight = (torch.randn(v, h_dim) * 0.2).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,))
    half = targets.clone()
    half[::2] = -100
    upstream = torch.rand(n)

    def leaves() -> tuple[torch.Tensor, torch.Tensor]:
        os.environ["LOGITLESS_CHUNK_MB"] = "64"
        os.environ["LOGITLESS_WEIGHT_GRAD"] = "accumulate"
        return hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def per_token(loss: torch.Tensor) -> None:
        (loss * upstream).sum().backward()

    def sft_mean(loss: torch.Tensor) -> None:  # TRL's SFT loss: the per-token losses' mean over counted tokens
        (loss.sum() / n).backward()

    def stock(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ForCausalLMLoss(torch.nn.functional.linear(h, w), None, v, shift_labels=targets)

    def ours(y: torch.Tensor, chunks: int = 1, backward: Callable[[torch.Tensor], None] | None = None,
             weight_grad: str = "accumulate", **kw: object) -> Step:  # fmt: skip
        def prepare() -> tuple[torch.Tensor, torch.Tensor]:
            h, w = leaves()
            # Chunks of n / chunks rows (torch_path counts three float32 temporaries per logit off CUDA).
            os.environ["LOGITLESS_CHUNK_MB"] = str((n // chunks) * v * 12 / 2**20)
            os.environ["LOGITLESS_WEIGHT_GRAD"] = weight_grad
            return h, w

        def call(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return linear_cross_entropy(h, w, None, shift_labels=y, impl="triton", **kw)

        return prepare, call, backward or (per_token if kw.get("reduction") == "none" else torch.Tensor.backward)

    cases: dict[str, Step] = {
        "stock (F.linear + ForCausalLMLoss), mean": (leaves, stock, torch.Tensor.backward),
        "logitless mean, a one-chunk problem (two halves)": ours(targets),
        "logitless mean, 4 chunks, 50% ignored": ours(half, chunks=4),
        "logitless mean, recompute, 8 chunks": ours(targets, chunks=8, weight_grad="recompute"),
        "logitless mean, num_items_in_batch tensor": ours(targets, num_items_in_batch=torch.tensor(300)),
        "logitless per-token, SFT mean (expect_uniform_grad)": ours(
            targets, reduction="none", expect_uniform_grad=True, backward=sft_mean
        ),
        "logitless per-token, trained head (second pass)": ours(targets, reduction="none"),
    }
    header = ["call (bf16, one forward + backward)", "torch fwd", "Triton fwd", "torch bwd", "Triton bwd",
              "host reads", "launches"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    listing = []
    for name, step in cases.items():
        row = _count(step, triton, lists)
        print(f"| {name} | " + " | ".join(str(x) for x in row[:-1]) + " |")
        listing.append(f"{name}: {row[-1]}")
    os.environ.pop("LOGITLESS_CHUNK_MB", None)
    os.environ.pop("LOGITLESS_WEIGHT_GRAD", None)
    if args.ops:
        print("\n" + "\n".join(listing))


if __name__ == "__main__":
    main()
