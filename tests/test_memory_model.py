"""The extra CUDA memory of the op's GPU modes, from bench/memory_model.py (fake CUDA tensors, no GPU needed).

The model follows every storage the forward allocates on fake CUDA tensors, with the code's CUDA decisions taken
as on an H100 / H200; it matched the H200's measured figures of the default mode to 1 MiB (bench/README.md)."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode


def _model() -> ModuleType:
    pytest.importorskip("triton")  # the modelled path is impl="triton" (its kernels stubbed)
    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "memory_model.py"
    spec = importlib.util.spec_from_file_location("memory_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_meter_follows_storages_until_their_last_tensor_dies() -> None:
    model = _model()
    with FakeTensorMode():
        outside = torch.empty(1 << 20, device="cuda")  # 4 MiB before the meter: its views are not allocations
        with model._LiveBytes() as meter:
            a = torch.empty(1 << 20, device="cuda")
            view = a[: 1 << 10]
            b = outside[:10] * 2.0  # 40 bytes
            del a  # the view keeps the storage
            c = torch.empty(1 << 19, device="cuda")  # 2 MiB more: peak 6 MiB + 40 bytes
            del view, c
            d = torch.empty(1 << 20, device="cuda")  # 4 MiB after both died: the peak stays
        assert meter.peak == (6 << 20) + 40
        assert meter.live == (4 << 20) + 40
        del b, d


@pytest.mark.parametrize("case", ["small", "big"])
@pytest.mark.parametrize("ignored", [0.0, 0.5])
def test_recompute_mode_holds_its_budget_on_a_gpu(case: str, ignored: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """``LOGITLESS_WEIGHT_GRAD=recompute`` on CUDA: no V×H float32 buffer, one chunk's and then one slab's scratch at
    a time, within its fixed 192 MiB budget plus the sorted rows' hidden copy: at most the 256 MiB the GPU issue
    asks, at 2048×1024×32000 and 8192×2048×128256 bf16 (the default mode there: +192 MiB and +2.0 GiB)."""
    monkeypatch.delenv("LOGITLESS_CHUNK_MB", raising=False)
    model = _model()
    n, h_dim, v = model.CASES[case]
    recompute = model.extra_mib(n, h_dim, v, ignored, "recompute")
    assert recompute <= 256
    assert model.extra_mib(n, h_dim, v, ignored, "accumulate") > recompute  # the model sees the default's scratch


@pytest.mark.parametrize("ignored", [0.0, 0.5])
def test_a_one_chunk_problem_in_halves_holds_half_its_logits(ignored: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default mode at 2048×1024×32000 bf16 fits one chunk; it runs as two halves whose gradients share one
    bf16 buffer: half the float32 logits (125 MiB) and every row's gradient (125 MiB) at once, not all the logits
    and a gradient buffer (the H200 measured +314 MiB for the single chunk)."""
    monkeypatch.delenv("LOGITLESS_CHUNK_MB", raising=False)
    model = _model()
    n, h_dim, v = model.CASES["small"]
    assert model.extra_mib(n, h_dim, v, ignored, "accumulate") <= (n * v * 4) / 2**20 * 0.8
