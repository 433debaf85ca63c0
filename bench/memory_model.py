"""The op's extra CUDA memory (and launches) at the GPU benchmark's shapes, predicted on a machine without a GPU.

    python bench/memory_model.py [--cases small,big,wide] [--ignored 0,0.5] [--modes accumulate,recompute]

Runs the op's forward (``impl="triton"``, bf16) on fake CUDA tensors (``FakeTensorMode``: shapes, dtypes and
devices, no memory, no arithmetic), so every CUDA decision of the code is taken as on a GPU (chunk rows, tile
alignment, split rows for a 132-multiprocessor H100 / H200, the recompute mode's fixed budget), with the Triton
launches and the one host read of the scored count stubbed. A dispatch mode follows every storage the call
allocates until its last tensor dies, and reports what ``bench/cuda_compare.py`` reports as *extra*: the peak of
live bytes above the inputs, minus the returned gradients. Backward adds nothing for ``mean`` / ``sum`` (the saved
gradients are scaled in place). The caching allocator's rounding is not modelled (it adds at most a few MiB here).
The same replay counts the forward's launches at those shapes: aten ops that launch a kernel on a GPU (views, bare
allocations and the host read excluded) and Triton kernels.

Checked against the H200 run of bench/results-cuda.md (the commit it measured): see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from logitless import ops
from logitless._options import LossOptions

# small and big: bench/cuda_compare.py's shapes; wide: an 8B-class model (hidden 4096) on 8192 tokens.
CASES = {"small": (2048, 1024, 32000), "big": (8192, 2048, 128256), "wide": (8192, 4096, 128256)}
H200_MULTIPROCESSORS = 132


# Ops that queue no kernel on a GPU: allocation without initialisation, metadata, the scored count's host read,
# a Python scalar wrapped as a CPU tensor.
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_local_scalar_dense",
              "set_", "lift_fresh", "detach", "alias", "device", "scalar_tensor"}  # fmt: skip


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated under it that some tensor still holds: now, and at the peak. Also the
    aten ops it sees that would launch a kernel on a GPU (views and bare allocations do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.launches = 0
        self._holders: dict[int, set[int]] = {}  # storage -> ids of the live tensors on it
        # Storages allocated before (the inputs, alive throughout): their views are not allocations.
        self._outside: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self._holders:
                self._outside.add(t.untyped_storage()._cdata)
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket.__name__ not in _NO_LAUNCH:
            self.launches += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._hold(t)
        return out

    def _hold(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._outside:
            return
        holders = self._holders.get(key)
        if holders is None:
            holders = self._holders[key] = set()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        if id(t) not in holders:
            holders.add(id(t))
            weakref.finalize(t, self._release, key, id(t), storage.nbytes())

    def _release(self, key: int, tensor: int, nbytes: int) -> None:
        holders = self._holders.get(key)
        if holders is None:
            return
        holders.discard(tensor)
        if not holders:
            del self._holders[key]
            self.live -= nbytes


class _NoLaunch:
    """A Triton kernel that is not run: its launches are counted."""

    count = 0

    def __getitem__(self, grid: object) -> Any:
        def launch(*args: object, **kwargs: object) -> None:
            _NoLaunch.count += 1

        return launch


@contextlib.contextmanager
def _as_on_an_h200(scored: int) -> Iterator[None]:
    """Triton launches, the multiprocessor count, the device context and the scored count's host read, stubbed."""
    from logitless import torch_path, triton_path

    class Count:
        def __init__(self, count: torch.Tensor) -> None:
            pass

        def value(self) -> int:
            return scored

    saved: list[tuple[object, str, object]] = []

    def stub(owner: object, name: str, value: object) -> None:
        saved.append((owner, name, getattr(owner, name, None)))
        setattr(owner, name, value)

    for kernel in ("_row_kernel", "_split_stats_kernel", "_split_combine_kernel", "_split_grad_kernel",
                   "_slab_kernel", "_scale_kernel", "_rows_kernel"):  # fmt: skip
        stub(triton_path, kernel, _NoLaunch())
    stub(triton_path, "_multiprocessors", lambda index: H200_MULTIPROCESSORS)
    stub(triton_path, "_on", lambda device: contextlib.nullcontext())
    stub(torch_path, "_PendingCount", Count)
    stub(torch.cuda, "is_current_stream_capturing", lambda: False)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def extra_mib(n: int, h_dim: int, v: int, ignored: float, mode: str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Predicted extra MiB of one forward (see the module docstring), ``LOGITLESS_WEIGHT_GRAD=mode``."""
    return predict(n, h_dim, v, ignored, mode, dtype)[0]


def predict(
    n: int, h_dim: int, v: int, ignored: float, mode: str, dtype: torch.dtype = torch.bfloat16
) -> tuple[float, int]:
    """Predicted extra MiB and launches (aten ops that launch a kernel, and Triton kernels) of one forward."""
    scored = n - int(n * ignored)
    options = LossOptions()
    before = os.environ.get("LOGITLESS_WEIGHT_GRAD")
    os.environ["LOGITLESS_WEIGHT_GRAD"] = mode
    try:
        return _predict(n, h_dim, v, scored, options, dtype)
    finally:
        if before is None:
            del os.environ["LOGITLESS_WEIGHT_GRAD"]
        else:
            os.environ["LOGITLESS_WEIGHT_GRAD"] = before


def _predict(n: int, h_dim: int, v: int, scored: int, options: LossOptions, dtype: torch.dtype) -> tuple[float, int]:
    with _as_on_an_h200(scored), FakeTensorMode():
        hidden = torch.empty(n, h_dim, dtype=dtype, device="cuda")
        weight = torch.empty(v, h_dim, dtype=dtype, device="cuda")
        targets = torch.empty(n, dtype=torch.int64, device="cuda")
        triton_before = _NoLaunch.count
        with _LiveBytes() as meter:
            out = ops._lce_op._init_fn(
                hidden, weight, None, targets, None, None, *options.scalars(), "mean", "triton", True, True, False,
                0.0, False,
            )  # fmt: skip
        returned = out[1].untyped_storage().nbytes() + out[2].untyped_storage().nbytes()
        del out
    return (meter.peak - returned) / 2**20, meter.launches + _NoLaunch.count - triton_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="small,big")
    parser.add_argument("--ignored", default="0,0.5")
    parser.add_argument("--modes", default="accumulate,recompute")
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--aliased", action="store_true",
                        help="with each row's rounded gradient over its own logits (triton_path._ALIAS_ON_CUDA)")
    args = parser.parse_args()
    from logitless import triton_path

    triton_path._ALIAS_ON_CUDA = args.aliased
    dtypes = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
    print("| N/H/V | dtype | ignored | mode | predicted extra (MiB) | f32 logits (MiB) | forward launches |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        n, h_dim, v = CASES[case]
        for dtype in args.dtypes.split(","):
            for ignored in (float(x) for x in args.ignored.split(",")):
                for mode in args.modes.split(","):
                    mib, launches = predict(n, h_dim, v, ignored, mode, dtypes[dtype])
                    print(f"| {n}/{h_dim}/{v} | {dtype} | {ignored:.0%} | {mode} | {mib:.0f} "
                          f"| {n * v * 4 / 2**20:.0f} | {launches} |")  # fmt: skip


if __name__ == "__main__":
    main()
