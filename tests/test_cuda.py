"""The op on CUDA (``impl="auto"``: the Triton kernels when Triton imports, else the torch path), against the float64
CPU reference. Skipped where no CUDA device is present.

CI has no GPU. At the last device run all 42 tests of the time passed on an H200 (torch 2.11, Triton 3.6), the
Triton kernels chosen by ``auto`` included; Triton's interpreter (tests/test_triton.py) and
tests/test_triton_compile.py cover the kernels on CPU in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from ops_reference import TOLERANCES, assert_close, reference

from logitless.ops import linear_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

B, T, H, V = 3, 17, 64, 301
OPTIONS: dict[str, Any] = {
    "num_items_in_batch": 40,
    "label_smoothing": 0.05,
    "z_loss": 1e-4,
    "logit_scale_multiply": 2.0,
    "logit_scale_divide": 1.25,
    "logit_softcapping": 5.0,
}


# recompute on these small problems takes the shared gradient's three GEMMs (torch_path._plan); "recompute-slabs"
# runs its slab pass on them too, as it runs on large ones.
MODES = ["accumulate", "recompute", "recompute-slabs"]


def set_mode(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from logitless import torch_path

    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", mode.removesuffix("-slabs"))
    if mode.endswith("-slabs"):
        monkeypatch.setattr(torch_path, "_RECOMPUTE_SHARES_SMALL", False)


def make(dtype: torch.dtype, *, with_bias: bool, ignore_frac: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype) if with_bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore_frac] = -100
    return hidden, weight, bias, labels


def run_and_check(dtype: torch.dtype, *, with_bias: bool, grad_output: float = 1.0, **opts: Any) -> None:
    hidden, weight, bias, labels = make(dtype, with_bias=with_bias)
    logits_bias = torch.randn(V) if opts.pop("logits_bias", False) else None
    ref = reference(
        hidden.requires_grad_(),
        weight.requires_grad_(),
        labels,
        bias=bias.requires_grad_() if bias is not None else None,
        logits_bias=logits_bias,
        grad_output=grad_output,
        **opts,
    )
    dev = torch.device("cuda")
    h = hidden.detach().to(dev).requires_grad_()
    w = weight.detach().to(dev).requires_grad_()
    b = bias.detach().to(dev).requires_grad_() if bias is not None else None
    loss = linear_cross_entropy(
        h,
        w,
        labels.to(dev),
        bias=b,
        logits_bias=logits_bias.to(dev) if logits_bias is not None else None,
        **opts,
    )
    assert loss.device.type == "cuda"
    (loss * grad_output).backward()
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert_close(loss.cpu(), ref.loss, tol_loss, "loss")
    assert h.grad is not None and w.grad is not None
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close(h.grad.cpu(), ref.d_hidden, tol_grad, "d_hidden")
    assert_close(w.grad.cpu(), ref.d_weight, tol_grad, "d_weight")
    if b is not None:
        assert b.grad is not None
        assert_close(b.grad.cpu(), ref.d_bias, tol_grad, "d_bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_plain_loss_matches_reference_on_cuda(dtype: torch.dtype, with_bias: bool) -> None:
    run_and_check(dtype, with_bias=with_bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_mb", [None, "0.01"])
def test_every_option_on_cuda(
    dtype: torch.dtype, mode: str, chunk_mb: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_mode(mode, monkeypatch)
    if chunk_mb is not None:
        monkeypatch.setenv("LOGITLESS_CHUNK_MB", chunk_mb)
    run_and_check(dtype, with_bias=True, grad_output=0.5, logits_bias=True, **OPTIONS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_few_rows_split_into_parts_on_cuda(dtype: torch.dtype, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer rows than the GPU runs programs at once, a longer vocabulary: the Triton path splits each row's columns
    into parts (statistics, a combining program per row, the gradient per part). Every option, against float64."""
    from logitless import triton_path

    set_mode(mode, monkeypatch)
    monkeypatch.setattr(sys.modules[__name__], "V", 5000)
    assert triton_path._parts(B * T, 5000, torch.device("cuda")) > 1
    calls: list[int] = []
    real = triton_path._split_row_pass

    def counting(*args: Any) -> Any:
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(triton_path, "_split_row_pass", counting)
    run_and_check(dtype, with_bias=False, grad_output=0.5, logits_bias=True, **OPTIONS)
    assert calls


@pytest.mark.parametrize("mode", MODES)
# One program per row (2048-row chunks: a problem that fits one chunk runs as two halves sharing a gradient
# buffer, never over its logits), and rows split into parts.
@pytest.mark.parametrize("rows", [4096, 64])
def test_gradient_over_its_own_logits_on_cuda(mode: str, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``triton_path._ALIAS_ON_CUDA``: each row's bf16 gradient written over the first half of its own float32 logits
    (a barrier per block in the kernel) gives bit for bit what a separate buffer gives, every option on, and the
    float64 reference's values. Off by default on CUDA until this passes on a device."""
    from logitless import triton_path

    set_mode(mode, monkeypatch)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(rows, 256, generator=g).to(torch.bfloat16)
    weight = (torch.randn(32000, 256, generator=g) * 0.15).to(torch.bfloat16)
    labels = torch.randint(0, 32000, (rows,), generator=g)
    labels[::3] = -100
    results = []
    for aliased in (False, True):
        monkeypatch.setattr(triton_path, "_ALIAS_ON_CUDA", aliased)
        h = hidden.cuda().requires_grad_()
        w = weight.cuda().requires_grad_()
        loss = linear_cross_entropy(h, w, labels.cuda(), shift=False, **OPTIONS)
        (loss * 0.5).backward()
        results.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ref = reference(hidden.requires_grad_(), weight.requires_grad_(), labels, shift=False, grad_output=0.5, **OPTIONS)
    _, tol_grad = TOLERANCES[torch.bfloat16]
    assert_close(results[1][2].cpu(), ref.d_weight, tol_grad, "d_weight")
    assert_close(results[1][1].cpu(), ref.d_hidden, tol_grad, "d_hidden")


@pytest.mark.parametrize("call", ["mean", "num-items-int", "sum", "frozen-head-per-token"])
def test_a_step_captured_in_a_cuda_graph(call: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward captured in a CUDA graph (what ``torch.compile(mode="reduce-overhead")`` does to a
    host-bound step): nothing is read on the host while capturing (ignored rows masked, not skipped; an int
    ``num_items_in_batch`` filled on the device, not copied from the host), and replays give the float64
    reference's loss and gradients, several chunks."""
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", "0.02")
    hidden, weight, _, labels = make(torch.bfloat16, with_bias=False)
    h = hidden.cuda().requires_grad_()
    w = weight.cuda().requires_grad_(call != "frozen-head-per-token")
    y = labels.cuda()
    kw: dict[str, Any] = {"label_smoothing": 0.05, "logit_softcapping": 5.0}
    kw.update({"num-items-int": {"num_items_in_batch": 40}, "sum": {"reduction": "sum"},
               "frozen-head-per-token": {"reduction": "none"}}.get(call, {}))  # fmt: skip
    upstream = torch.rand(B, T, generator=torch.Generator().manual_seed(2))
    up = upstream.cuda()

    def step() -> torch.Tensor:
        loss = linear_cross_entropy(h, w, y, **kw)
        (loss * up).sum().backward() if loss.dim() else loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernels compiled, caches filled) off the capturing stream
        for _ in range(2):
            h.grad = w.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    h.grad = w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    ref = reference(
        hidden.requires_grad_(), weight.requires_grad_(call != "frozen-head-per-token"), labels,
        grad_output=upstream.double() if call == "frozen-head-per-token" else 1.0, **kw,
    )  # fmt: skip
    tol_loss, tol_grad = TOLERANCES[torch.bfloat16]
    assert_close(loss.detach().cpu(), ref.loss, tol_loss, "loss")
    assert_close(h.grad.cpu(), ref.d_hidden, tol_grad, "d_hidden")
    if w.requires_grad:
        assert_close(w.grad.cpu(), ref.d_weight, tol_grad, "d_weight")


@pytest.mark.parametrize("factor", [1.0, 0.25])
def test_backward_scales_saved_gradients_in_place_on_cuda(factor: float) -> None:
    """The upstream gradient scales the forward's gradients in place on the device (no host read of it), equal to
    torch's product; a second backward of a retained graph sees the saved gradients intact."""
    hidden, weight, _, labels = make(torch.bfloat16, with_bias=False)
    h = hidden.cuda().requires_grad_()
    w = weight.cuda().requires_grad_()
    loss = linear_cross_entropy(h, w, labels.cuda())
    (loss * factor).backward(retain_graph=True)
    first = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    (loss * factor).backward()
    assert torch.equal(h.grad, first[0]) and torch.equal(w.grad, first[1])
    ref = reference(hidden.requires_grad_(), weight.requires_grad_(), labels, grad_output=factor)
    _, tol_grad = TOLERANCES[torch.bfloat16]
    assert_close(w.grad.cpu(), ref.d_weight, tol_grad, "d_weight")
    assert_close(h.grad.cpu(), ref.d_hidden, tol_grad, "d_hidden")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("mode", MODES)
def test_head_on_another_gpu_than_the_current_one(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model split over GPUs (``device_map="auto"``): the head on cuda:1 while cuda:0 is current. Kernels and the
    scored-row count's copy must run on cuda:1's stream; several chunks, ignored rows skipped after the first."""
    set_mode(mode, monkeypatch)
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", "0.01")
    hidden, weight, _, labels = make(torch.bfloat16, with_bias=False)
    ref = reference(hidden.requires_grad_(), weight.requires_grad_(), labels, grad_output=0.5, **OPTIONS)
    torch.cuda.set_device(0)
    h = hidden.detach().to("cuda:1").requires_grad_()
    w = weight.detach().to("cuda:1").requires_grad_()
    loss = linear_cross_entropy(h, w, labels.to("cuda:1"), **OPTIONS)
    (loss * 0.5).backward()
    tol_loss, tol_grad = TOLERANCES[torch.bfloat16]
    assert_close(loss.detach().cpu(), ref.loss, tol_loss, "loss")
    assert_close(h.grad.cpu(), ref.d_hidden, tol_grad, "d_hidden")
    assert_close(w.grad.cpu(), ref.d_weight, tol_grad, "d_weight")


def _rows_entering(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by each chunk's row count as the Triton row pass receives the chunk's logits."""
    from logitless import triton_path

    entered: list[int] = []
    real = triton_path.row_pass
    monkeypatch.setattr(triton_path, "row_pass", lambda y, *a, **kw: entered.append(y.shape[0]) or real(y, *a, **kw))
    return entered


def _check_wide_rows(n: int, h_dim: int, v: int, dtype: torch.dtype, ignored: float, seed: int = 3) -> None:
    """``n`` rows of width ``h_dim`` over ``v`` columns, every option on, a fraction of rows ignored, on CUDA against
    the float64 reference (mean over the scored rows, upstream gradient 0.5)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h_dim, generator=g).to(dtype)
    weight = (torch.randn(v, h_dim, generator=g) / h_dim**0.5 * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[: int(n * ignored)]] = -100
    opts = {k: x for k, x in OPTIONS.items() if k != "num_items_in_batch"}
    ref = reference(hidden.requires_grad_(), weight.requires_grad_(), labels, shift=False, grad_output=0.5, **opts)
    h = hidden.detach().cuda().requires_grad_()
    w = weight.detach().cuda().requires_grad_()
    loss = linear_cross_entropy(h, w, labels.cuda(), shift=False, **opts)
    (loss * 0.5).backward()
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert_close(loss.detach().cpu(), ref.loss, tol_loss, "loss")
    assert h.grad is not None and w.grad is not None
    assert_close(h.grad.cpu(), ref.d_hidden, tol_grad, "d_hidden")
    assert_close(w.grad.cpu(), ref.d_weight, tol_grad, "d_weight")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ignored", [0.0, 0.6])
def test_one_chunk_problem_in_halves_on_cuda(
    dtype: torch.dtype, ignored: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1024 rows fit one chunk: they run as two halves of 512 sorted rows, and with over half of them ignored only
    the first half enters the GEMMs (bf16: both halves' gradients in one buffer, the weight gradient one GEMM)."""
    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", "accumulate")
    monkeypatch.delenv("LOGITLESS_CHUNK_MB", raising=False)
    entered = _rows_entering(monkeypatch)
    _check_wide_rows(1024, 128, 4000, dtype, ignored)
    assert entered == ([512, 512] if ignored == 0.0 else [512]), entered


@pytest.mark.parametrize("ignored", [0.0, 0.4])
def test_chunks_share_one_gradient_buffer_on_cuda(ignored: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """256-row chunks of 1024 rows 512 wide (N <= 2·H + chunk rows): every chunk's bf16 gradient in one buffer and
    the weight gradient one GEMM over it, no float32 buffer summed chunk by chunk."""
    from logitless import torch_path

    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", "accumulate")
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", str(256 * 4000 * 6 / 2**20))
    summed: list[int] = []
    real_add = torch_path._add_mm
    monkeypatch.setattr(torch_path, "_add_mm", lambda *a: summed.append(1) or real_add(*a))
    entered = _rows_entering(monkeypatch)
    _check_wide_rows(1024, 512, 4000, torch.bfloat16, ignored)
    assert not summed
    assert entered[0] == 256 and sum(entered) == 1024 - int(1024 * ignored), entered  # no chunk past the scored


@pytest.mark.parametrize("n", [1, 2048, 100_003])
@pytest.mark.parametrize("weights", ["mean", "rows", "none"])
def test_rows_kernel_on_cuda(n: int, weights: str) -> None:
    """The compiled rows kernel against the torch ops it replaces (computed on the CPU): the scored-first order
    equal to argsort's stable one, the targets and counts equal, and the gradient weights bit for bit (the mean's
    1/count a correctly rounded division, not the GPU's approximate one)."""
    from logitless import torch_path, triton_path

    g = torch.Generator().manual_seed(n)
    v = 1000
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.37] = -100
    w = torch.randn(n, generator=g).to(torch.bfloat16) if weights == "rows" else None
    got = triton_path.rows(targets.cuda(), v, -100, torch.float32, mean_over_count=weights == "mean",
                           weights=w.cuda() if w is not None else None, sort=True)  # fmt: skip
    assert got is not None and not triton_path._broken
    want = torch_path._rows(targets, v, -100, torch.float32, compact=False, mean_over_count=weights == "mean",
                            weights=w)  # fmt: skip
    order = torch.argsort(want.valid.to(torch.uint8), descending=True, stable=True)
    assert got.order is not None and torch.equal(got.order.cpu(), order)
    assert int(got.count) == int(want.count) and bool(got.in_range)
    for field in ("valid", "t", "s"):
        assert torch.equal(getattr(got, field).cpu(), getattr(want, field)[order]), field


def test_all_ignored_batch_is_zero_on_cuda() -> None:
    hidden, weight, _, labels = make(torch.bfloat16, with_bias=False, ignore_frac=1.1)
    h = hidden.cuda().requires_grad_()
    w = weight.cuda().requires_grad_()
    loss = linear_cross_entropy(h, w, labels.cuda())
    loss.backward()
    assert float(loss) == 0.0
    assert h.grad is not None and w.grad is not None
    assert not h.grad.any() and not w.grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_per_token_gradient_on_cuda(dtype: torch.dtype) -> None:
    """reduction="none" with a frozen head: hidden's row gradients formed in the forward pass (sorted chunks on the
    device), scaled in backward by a per-token upstream gradient."""
    hidden, weight, _, labels = make(dtype, with_bias=False)
    grad_output = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) - 0.5
    opts: dict[str, Any] = {"label_smoothing": 0.05, "logit_softcapping": 5.0, "reduction": "none"}
    ref = reference(hidden.requires_grad_(), weight, labels, grad_output=grad_output, **opts)
    h = hidden.detach().cuda().requires_grad_()
    loss = linear_cross_entropy(h, weight.cuda(), labels.cuda(), **opts)
    loss.backward(grad_output.cuda())
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert_close(loss.cpu(), ref.loss, tol_loss, "loss")
    assert h.grad is not None and ref.d_hidden is not None
    assert_close(h.grad.cpu(), ref.d_hidden, tol_grad, "d_hidden")


@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_term_on_cuda(impl: str, dtype: torch.dtype) -> None:
    """A LoRA adapter on a frozen head (``low_rank``): the loss, hidden's gradient and both factors' gradients."""
    hidden, weight, bias, labels = make(dtype, with_bias=True)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(B, T, 8, generator=g), torch.randn(V, 8, generator=g) * 0.3
    opts: dict[str, Any] = {"label_smoothing": 0.05, "logit_softcapping": 5.0, "num_items_in_batch": 40}
    ref = reference(hidden.requires_grad_(), weight, labels, bias=bias, low_rank=(a, b), **opts)
    h, a_cuda, b_cuda = (t.detach().cuda().requires_grad_() for t in (hidden, a, b))
    loss = linear_cross_entropy(h, weight.cuda(), labels.cuda(), bias=bias.cuda(), low_rank=(a_cuda, b_cuda),
                                impl=impl, **opts)  # fmt: skip
    loss.backward()
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert ref.d_hidden is not None and ref.d_low is not None
    assert_close(loss.cpu(), ref.loss, tol_loss, "loss")
    assert_close(h.grad.cpu(), ref.d_hidden, tol_grad, "d_hidden")
    assert_close(a_cuda.grad.cpu(), ref.d_low[0], tol_grad, "d_a")
    assert_close(b_cuda.grad.cpu(), ref.d_low[1], tol_grad, "d_b")


@pytest.mark.parametrize("upstream", ["mean", "per-token"])
def test_expect_uniform_grad_on_cuda(upstream: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """TRL's SFT mean loss on a GPU: with ``expect_uniform_grad`` and a trained head the gradients are formed in the
    forward pass and scaled in backward when the upstream gradient is one value at every counted position (read on
    the host once); a per-token upstream gradient takes the second pass. Both against float64."""
    from logitless import ops

    second_passes: list[int] = []
    real = ops._rows_backward
    monkeypatch.setattr(ops, "_rows_backward", lambda *a: second_passes.append(1) or real(*a))
    hidden, weight, _, labels = make(torch.bfloat16, with_bias=False)
    counted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:] != -100
    if upstream == "mean":
        grad_output = torch.full((B, T), 1.0 / int(counted.sum()))
    else:
        grad_output = torch.rand(B, T, generator=torch.Generator().manual_seed(2)) - 0.5
    opts: dict[str, Any] = {"logit_softcapping": 5.0, "label_smoothing": 0.05, "reduction": "none"}
    ref = reference(hidden.requires_grad_(), weight.requires_grad_(), labels, grad_output=grad_output, **opts)
    h = hidden.detach().cuda().requires_grad_()
    w = weight.detach().cuda().requires_grad_()
    loss = linear_cross_entropy(h, w, labels.cuda(), expect_uniform_grad=True, **opts)
    loss.backward(grad_output.cuda())
    assert len(second_passes) == (0 if upstream == "mean" else 1)
    tol_loss, tol_grad = TOLERANCES[torch.bfloat16]
    assert_close(loss.detach().cpu(), ref.loss, tol_loss, "loss")
    assert_close(h.grad.cpu(), ref.d_hidden, tol_grad, "d_hidden")
    assert_close(w.grad.cpu(), ref.d_weight, tol_grad, "d_weight")


def test_torch_compile_fullgraph_on_cuda() -> None:
    hidden, weight, _, labels = make(torch.bfloat16, with_bias=False)
    ref = reference(hidden.requires_grad_(), weight.requires_grad_(), labels)
    h = hidden.detach().cuda().requires_grad_()
    w = weight.detach().cuda().requires_grad_()

    @torch.compile(fullgraph=True)
    def step(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(h, w, y) * 2.0

    loss = step(h, w, labels.cuda())
    loss.backward()
    tol_loss, tol_grad = TOLERANCES[torch.bfloat16]
    assert_close(loss.cpu() / 2.0, ref.loss, tol_loss, "loss")
    assert w.grad is not None
    assert_close(w.grad.cpu() / 2.0, ref.d_weight, tol_grad, "d_weight")


def test_out_of_range_label_fails_loudly_on_cuda() -> None:
    # A device-side assert poisons the CUDA context, so this runs in a child process: it must not exit cleanly with
    # a finite loss.
    code = textwrap.dedent(
        """
        import torch
        from logitless.ops import linear_cross_entropy
        h = torch.randn(4, 8, device="cuda", requires_grad=True)
        w = torch.randn(10, 8, device="cuda", requires_grad=True)
        y = torch.tensor([1, 2, 99, 3], device="cuda")
        loss = linear_cross_entropy(h, w, y, shift=False)
        value = float(loss)
        print("LOSS", value)
        raise SystemExit(0 if value != value else 3)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 3, f"an out-of-range label gave a finite loss: {out}"
    # Exit 0 means the loss was NaN; otherwise it must be the device-side assert, not some other failure.
    assert proc.returncode == 0 or "assert" in out.lower(), out


@pytest.fixture(scope="module")
def vocab_parallel_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """tests/_dist_worker.py's vocabulary-parallel cases on CUDA: 2 gloo ranks sharing the one GPU (gloo stages CUDA
    tensors through the host, so one device is enough), including the Triton kernels."""
    import socket
    from pathlib import Path

    import _dist_worker as worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("vp-cuda")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(worker.__file__)), str(out), "vocab-parallel-op-cuda"],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [torch.load(out / f"rank{r}.pt")["vocab-parallel-op-cuda"] for r in range(2)]


def _vocab_parallel_cases() -> list[str]:
    import _dist_worker as worker

    return list(worker.vp_cases("cuda"))


@pytest.mark.parametrize("case", _vocab_parallel_cases())
def test_vocab_parallel_op_on_cuda(vocab_parallel_ranks: list[dict[str, Any]], case: str) -> None:
    import _dist_worker as worker

    worker.check_vocab_parallel_case([vocab_parallel_ranks[r][case] for r in range(2)], case, "cuda")
