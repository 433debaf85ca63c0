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


@pytest.mark.parametrize("aliased", [False, True])
@pytest.mark.parametrize("case", ["small", "big", "wide"])
@pytest.mark.parametrize("ignored", [0.0, 0.5])
def test_recompute_mode_holds_its_budget_on_a_gpu(
    case: str, ignored: float, aliased: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LOGITLESS_WEIGHT_GRAD=recompute`` on CUDA: no V×H float32 buffer, one chunk's and then one slab's scratch at
    a time (at the small shape every row's bf16 gradient and one chunk's logits instead, the shared gradient's plan),
    within its fixed 192 MiB budget plus the sorted rows' hidden copy (none where every row is scored): at
    most the 256 MiB the GPU issue asks, at 2048×1024×32000 and 8192×2048×128256 bf16 (the default mode there: +192
    MiB and +2.0 GiB), and at an 8B-class model's 8192 tokens (8192×4096×128256). With each slab's gradient written
    over its own logits (``aliased``) the slabs are wider, in the same budget."""
    monkeypatch.delenv("LOGITLESS_CHUNK_MB", raising=False)
    from logitless import triton_path

    monkeypatch.setattr(triton_path, "_ALIAS_ON_CUDA", aliased)
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


@pytest.mark.parametrize(
    ("case", "mode", "kw", "rows", "halves", "slab_major"),
    [
        ("small", "accumulate", {}, 1024, True, False),  # one chunk's problem: two halves sharing a bf16 gradient
        ("small", "accumulate", {"need_d_bias": True}, 2048, False, False),  # a float32 gradient: one chunk
        ("small", "accumulate", {"skip_ignored": False}, 2048, False, False),  # a CUDA graph being captured
        ("small", "accumulate", {"compact": True}, 2048, False, False),  # rows counted on the host
        ("big", "accumulate", {}, 2048, False, False),  # the float32 accumulator's 2048-row floor
        # Every row's bf16 gradient (125 MiB) fits recompute's 192 MiB beside 512-row chunks of float32 logits:
        # the chunks share it and the weight gradient is one GEMM over it (three GEMMs, not the slabs' four).
        ("small", "recompute", {}, 512, False, False),
        ("small", "recompute", {"compact": True}, 1536, False, True),  # forward-only chunks, every gradient by slabs
        ("big", "recompute", {}, 384, False, True),
        # An 8B-class model's 8192 tokens: every chunk's bf16 gradient in one buffer (2 GiB) beats the float32
        # accumulator (2 GiB) plus a chunk's rounded gradient; recompute's d_hidden accumulator would take 128 of
        # its 192 MiB, so the chunks form d_hidden there.
        ("wide", "accumulate", {}, 2048, False, False),
        ("wide", "recompute", {}, 256, False, False),
    ],
)
def test_the_plans_a_gpu_gets(
    case: str, mode: str, kw: dict, rows: int, halves: bool, slab_major: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunking a CUDA call of the GPU benchmark's shapes takes (bf16, Triton row pass), planned here without
    one: rows per chunk, the halves of a one-chunk problem, recompute's forward-only chunks."""
    from logitless import torch_path

    monkeypatch.delenv("LOGITLESS_CHUNK_MB", raising=False)
    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", mode)
    n, h_dim, v = _model().CASES[case]
    need_d_bias = kw.get("need_d_bias", False)
    plan = torch_path._plan(
        n, v, h_dim, dtype=torch.bfloat16, weight_dtype=torch.bfloat16, device=torch.device("cuda"),
        need=(True, True, need_d_bias), low_precision_grad=None, budget_bytes=None, kernels=True,
        compact=kw.get("compact", False), skip_ignored=kw.get("skip_ignored", True),
    )  # fmt: skip
    assert (plan.rows_per_chunk, plan.halves, plan.slab_major) == (rows, halves, slab_major)
    shared = (case, mode, kw) in (("wide", "accumulate", {}), ("small", "recompute", {}))
    assert plan.shared_grad == (halves or shared)
    assert plan.recompute == (mode == "recompute" and not plan.shared_grad)
    assert plan.row_grad == (not slab_major)
