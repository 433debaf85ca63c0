"""linear_cross_entropy against stock transformers on materialised float64 logits (spec §1): options, dtypes, layouts.

Both implementations run every test: ``impl="rust"`` (the kernel; a kernel error fails the test) and
``impl="torch"`` (the chunked torch-ops path used off-CPU).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from ops_reference import TOLERANCES, assert_close, reference

from logitless import _rust, torch_path
from logitless._options import Epilogue, LossOptions
from logitless.ops import linear_cross_entropy

IMPLS = ["rust", "torch"]
# The torch path as it runs off CPU, here on CPU tensors: the op never reads a device value on the host (targets
# checked and rows counted on the device, ignored rows sorted behind the scored ones), as on a GPU.
_SYNC_FREE = pytest.param("torch", id="torch-sync-free", marks=pytest.mark.sync_free)
MODES = [*IMPLS, _SYNC_FREE]
# The Triton row kernels too, on CPU tensors under Triton's interpreter (tests/conftest.py turns it on without a GPU;
# with one, tests/test_cuda.py runs them compiled), and in the sync-free mode as well.
_INTERPRETER_OFF = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter is off")
_TRITON_ON_CPU = pytest.param("triton", marks=_INTERPRETER_OFF)
_TRITON_SYNC_FREE = pytest.param("triton", id="triton-sync-free", marks=[_INTERPRETER_OFF, pytest.mark.sync_free])
ALL_PATHS = [*MODES, _TRITON_ON_CPU, _TRITON_SYNC_FREE]
B, T, H, V = 2, 9, 16, 37


@pytest.fixture(autouse=True)
def _sync_free_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("sync_free") is not None:
        from logitless import ops

        monkeypatch.setattr(ops, "_host_reads_free", lambda device: False)


def make(
    dtype: torch.dtype = torch.float32,
    *,
    three_d: bool = True,
    with_bias: bool = False,
    ignore_frac: float = 0.25,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (B, T) if three_d else (B * T,)
    hidden = torch.randn(*shape, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=g).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return hidden, weight, bias, labels


def check(
    impl: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    grad_output: torch.Tensor | float = 1.0,
    **opts: Any,
) -> torch.Tensor:
    """Runs the op, backpropagates ``grad_output`` and compares loss and every gradient with the reference."""
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, impl=impl, **opts)
    ref = reference(hidden, weight, labels, bias=bias, grad_output=grad_output, **opts)
    expected_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype
    tol_loss, tol_grad = TOLERANCES[hidden.dtype]
    assert_close(loss, ref.loss, tol_loss, "loss")
    if loss.requires_grad:
        go = grad_output if isinstance(grad_output, torch.Tensor) else torch.tensor(float(grad_output))
        (loss * go.to(loss.dtype)).sum().backward()
    for name, t, r in (("hidden", hidden, ref.d_hidden), ("weight", weight, ref.d_weight), ("bias", bias, ref.d_bias)):
        if t is None:
            continue
        if r is None:
            assert t.grad is None, f"d_{name} computed though {name} does not require grad"
        else:
            assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape
            assert_close(t.grad, r, tol_grad, f"d_{name}")
    return loss


@pytest.mark.parametrize("impl", ALL_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("three_d", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_stock_loss(impl: str, dtype: torch.dtype, three_d: bool, with_bias: bool) -> None:
    hidden, weight, bias, labels = make(dtype, three_d=three_d, with_bias=with_bias)
    check(impl, hidden, weight, bias, labels)


OPTION_SETS: list[dict[str, Any]] = [
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"label_smoothing": 0.2, "z_loss": 1e-2},
    {"logit_scale_multiply": 0.625},
    {"logit_scale_divide": 1.6},
    {"logit_softcapping": 2.5},
    {"logits_bias": "random"},
    {"logits_bias": "random", "logit_scale_multiply": 1.5, "logit_scale_divide": 2.0, "logit_softcapping": 3.0},
    {"logit_scale_multiply": None, "logit_scale_divide": 0.0, "logit_softcapping": None},
    {"num_items_in_batch": 11},
    {"num_items_in_batch": "tensor"},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"shift": False},
    {"shift_labels": "given"},
    {"ignore_index": 3},
    {"reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcapping": 4.0},
    {"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-3, "logits_bias": "random", "logit_scale_divide": 3.0},
    {
        "num_items_in_batch": "tensor",
        "label_smoothing": 0.05,
        "z_loss": 1e-4,
        "logits_bias": "random",
        "logit_scale_multiply": 2.0,
        "logit_scale_divide": 1.25,
        "logit_softcapping": 5.0,
        "ignore_index": 0,
    },
]


def resolve(opts: dict[str, Any], labels: torch.Tensor) -> dict[str, Any]:
    out = dict(opts)
    g = torch.Generator().manual_seed(7)
    if out.get("logits_bias") == "random":
        out["logits_bias"] = torch.randn(V, generator=g)
    if out.get("num_items_in_batch") == "tensor":
        out["num_items_in_batch"] = torch.tensor(13)
    if out.get("shift_labels") == "given":
        out["shift_labels"] = torch.randint(0, V, labels.shape, generator=g)
        out["shift_labels"][..., ::3] = -100
    if "ignore_index" in out:
        labels[labels == -100] = out["ignore_index"]
    return out


@pytest.mark.parametrize("impl", ALL_PATHS)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options(impl: str, opts: dict[str, Any]) -> None:
    hidden, weight, bias, labels = make(torch.float32, with_bias=True)
    opts = resolve(opts, labels)
    grad_output = torch.rand(B, T) if opts.get("reduction") == "none" else 1.0
    check(impl, hidden, weight, bias, labels, grad_output=grad_output, **opts)


@pytest.mark.parametrize("impl", ALL_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_options_low_precision(impl: str, dtype: torch.dtype) -> None:
    hidden, weight, bias, labels = make(dtype, with_bias=True)
    opts = resolve(OPTION_SETS[-1], labels)
    check(impl, hidden, weight, bias, labels, **opts)


@pytest.mark.parametrize("impl", ALL_PATHS)
def test_grad_output_scales_gradients(impl: str) -> None:
    hidden, weight, bias, labels = make(with_bias=True)
    check(impl, hidden, weight, bias, labels, grad_output=-3.75)
    check(impl, hidden, weight, bias, labels, grad_output=torch.rand(B, T) - 0.5, reduction="none")


@pytest.mark.parametrize("impl", MODES)
def test_non_contiguous_and_transposed_inputs(impl: str) -> None:
    g = torch.Generator().manual_seed(3)
    # hidden laid out [T, B, H] and viewed as [B, T, H]: not reshape-able without a copy.
    hidden = torch.randn(T, B, H, generator=g).transpose(0, 1).requires_grad_()
    # weight as the transpose of an [H, V] tensor: column stride V, must be copied before the kernel.
    weight_t = torch.randn(H, V, generator=g).t().requires_grad_()
    labels = torch.randint(0, V, (T, B), generator=g).t()
    check(impl, hidden, weight_t, None, labels)
    # Row-strided views (every other row, or a column slice): usable in place.
    big = torch.randn(2 * B * T, H + 5, generator=g)
    hidden2 = big[::2, :H].detach().requires_grad_()
    weight2 = torch.randn(V, H + 3, generator=g)[:, 1 : H + 1].detach().requires_grad_()
    bias2 = torch.randn(2 * V, generator=g)[::2].detach().requires_grad_()
    labels2 = torch.randint(0, V, (B * T, 2), generator=g)[:, 1]
    assert not hidden2.is_contiguous() and not weight2.is_contiguous() and not labels2.is_contiguous()
    check(impl, hidden2, weight2, bias2, labels2)
    # Gradients through a non-leaf view land on the base tensor.
    base = torch.randn(B, H, T, generator=g, requires_grad=True)
    loss = linear_cross_entropy(base.transpose(1, 2), weight2.detach(), labels.reshape(B, T), impl=impl)
    loss.backward()
    ref = reference(base.detach().transpose(1, 2).requires_grad_(), weight2.detach(), labels.reshape(B, T))
    assert base.grad is not None
    assert_close(base.grad.transpose(1, 2), ref.d_hidden, 2e-5, "d_hidden through a view")


class Spy:
    """Records the keyword arguments of every call to an implementation, then forwards it."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.fn(*args, **kwargs)


def spy_on(monkeypatch: pytest.MonkeyPatch, impl: str) -> Spy:
    module = _rust if impl == "rust" else torch_path
    spy = Spy(module.fused_lce)
    monkeypatch.setattr(module, "fused_lce", spy)
    return spy


@pytest.mark.parametrize("impl", MODES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight_computes_no_weight_gradient(impl: str, reduction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hidden, weight, bias, labels = make(with_bias=True)
    weight.requires_grad_(False)
    spy = spy_on(monkeypatch, impl)
    grad_output = torch.rand(B, T) if reduction == "none" else 1.0
    check(impl, hidden, weight, bias, labels, grad_output=grad_output, reduction=reduction)
    assert weight.grad is None and hidden.grad is not None and bias is not None and bias.grad is not None
    assert spy.calls, "the implementation was not called"
    assert all(not c["need_d_weight"] for c in spy.calls)
    assert any(c["need_d_hidden"] for c in spy.calls)


def test_frozen_weight_passes_no_weight_buffer_to_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from logitless import _core

    spy = Spy(_core.fused_linear_cross_entropy)
    monkeypatch.setattr(_core, "fused_linear_cross_entropy", spy)
    hidden, weight, _, labels = make()
    weight.requires_grad_(False)
    linear_cross_entropy(hidden, weight, labels, impl="rust").backward()
    assert len(spy.calls) == 1
    assert spy.calls[0]["d_weight"] is None and spy.calls[0]["d_hidden"] is not None


@pytest.mark.parametrize("impl", MODES)
def test_no_grad_computes_loss_only(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hidden, weight, bias, labels = make(with_bias=True)
    spy = spy_on(monkeypatch, impl)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, impl=impl)
    assert not loss.requires_grad
    assert_close(loss, reference(hidden, weight, labels, bias=bias).loss, 2e-5, "loss")
    (call,) = spy.calls
    assert not (call["need_d_hidden"] or call["need_d_weight"] or call["need_d_bias"])


@pytest.mark.parametrize("impl", ALL_PATHS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_gradient_accumulation_with_num_items(impl: str, as_tensor: bool) -> None:
    """Two micro-batches, each divided by the whole batch's target count, add up to the full batch's mean."""
    hidden, weight, bias, labels = make(with_bias=True)
    ref = reference(hidden, weight, labels, bias=bias)
    n_items = int((labels[:, 1:] != -100).sum())
    num_items = torch.tensor(n_items) if as_tensor else n_items
    total = 0.0
    for i in range(B):
        h = hidden[i : i + 1]
        loss = linear_cross_entropy(h, weight, labels[i : i + 1], bias=bias, num_items_in_batch=num_items, impl=impl)
        loss.backward()
        total += float(loss.detach())
    assert_close(torch.tensor(total), ref.loss, 2e-5, "accumulated loss")
    assert hidden.grad is not None and weight.grad is not None and bias is not None and bias.grad is not None
    assert_close(hidden.grad, ref.d_hidden, 2e-5, "d_hidden")
    assert_close(weight.grad, ref.d_weight, 2e-5, "d_weight")
    assert_close(bias.grad, ref.d_bias, 2e-5, "d_bias")


@pytest.mark.parametrize("impl", ALL_PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_gradients(impl: str, reduction: str) -> None:
    hidden, weight, bias, labels = make(with_bias=True)
    labels.fill_(-100)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction, impl=impl)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    for t in (hidden, weight, bias):
        assert t is not None and t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("impl", ALL_PATHS)
def test_small_chunk_budget_still_exact(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A budget below one row's logits forces one row per chunk (and many chunks).
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", "0.0001")
    hidden, weight, bias, labels = make(with_bias=True)
    check(impl, hidden, weight, bias, labels, label_smoothing=0.1, logit_softcapping=3.0)


@pytest.mark.parametrize("impl", ALL_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("budget_mb", ["0.001", None])
@pytest.mark.parametrize("ignore_frac", [0.25, 1.0])
def test_recomputed_weight_gradient_matches_reference(
    impl: str, dtype: torch.dtype, budget_mb: str | None, ignore_frac: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LOGITLESS_WEIGHT_GRAD=recompute forms d_weight in a second pass over vocabulary slabs (no V×H float32 buffer);
    # a tiny budget makes the slabs and row blocks a few rows each, so tails and many slabs are exercised.
    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", "recompute")
    if budget_mb is not None:
        monkeypatch.setenv("LOGITLESS_CHUNK_MB", budget_mb)
    hidden, weight, bias, labels = make(dtype, with_bias=True, ignore_frac=ignore_frac)
    opts = resolve(OPTION_SETS[-1], labels)
    check(impl, hidden, weight, bias, labels, grad_output=0.75, **opts)


@pytest.mark.parametrize("impl", IMPLS)
def test_unknown_weight_grad_mode_is_a_clear_error(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", "fast")
    hidden, weight, _, labels = make(torch.bfloat16)
    with pytest.raises(ValueError, match="LOGITLESS_WEIGHT_GRAD: expected one of accumulate, recompute"):
        linear_cross_entropy(hidden, weight, labels, impl=impl)


def test_default_chunk_budget_follows_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    from logitless.torch_path import chunk_budget_bytes

    monkeypatch.delenv("LOGITLESS_CHUNK_MB", raising=False)
    mib = 1 << 20
    assert chunk_budget_bytes(2048, 32000, 1024) == 2048 * 32000 * 4 // 16  # 1/16 of the f32 logits
    assert chunk_budget_bytes(8192, 128256, 2048) == 8192 * 128256 * 4 // 16
    assert chunk_budget_bytes(65536, 262144, 4096) == 512 * mib  # never above 512 MiB
    assert chunk_budget_bytes(16, 100, 8) == 4 * mib  # nor below 4 MiB
    # A bf16/f16 weight gradient is accumulated in a V×H float32 buffer: at least half of it.
    assert chunk_budget_bytes(2048, 32000, 1024, low_precision_weight_grad=True) == 32000 * 1024 * 4 // 2
    assert chunk_budget_bytes(8192, 128256, 2048, low_precision_weight_grad=True) == 128256 * 2048 * 4 // 2
    assert chunk_budget_bytes() == 32 * mib
    assert chunk_budget_bytes(2048, 32000, 1024, min_mb=64) == 64 * mib  # the torch path's floor
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", "2")
    assert chunk_budget_bytes(8192, 128256, 2048, low_precision_weight_grad=True) == 2 * mib


def test_rust_path_budget_has_a_floor_unless_low_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from logitless._rust import _budget

    monkeypatch.delenv("LOGITLESS_CHUNK_MB", raising=False)
    mib = 1 << 20

    def budget(n: int, h: int, v: int, low_memory: bool) -> int:
        return _budget(torch.empty(n, h, device="meta"), torch.empty(v, h, device="meta"), low_memory)

    # Short blocks re-read the head and re-add into the whole V×H weight gradient often: 64 MiB at least.
    assert budget(2048, 1024, 32000, False) == 64 * mib
    assert budget(8192, 2048, 128256, False) == 8192 * 128256 * 4 // 16
    # The recompute mode adds into nothing: the torch path's rule alone (1/16 of the f32 logits).
    assert budget(2048, 1024, 32000, True) == 2048 * 32000 * 4 // 16
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", "3")
    assert budget(2048, 1024, 32000, False) == 3 * mib


def test_the_rust_path_picks_its_budget_from_the_weight_gradient_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    # What fused_lce hands the kernel: the floor for float32 heads (trained or frozen) and for bf16 accumulating,
    # not for bf16 under LOGITLESS_WEIGHT_GRAD=recompute.
    from logitless import _core

    monkeypatch.delenv("LOGITLESS_CHUNK_MB", raising=False)
    seen: list[int] = []
    real = _core.fused_linear_cross_entropy

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(int(kwargs["chunk_budget_bytes"]))  # type: ignore[call-overload]
        return real(*args, **kwargs)

    monkeypatch.setattr(_core, "fused_linear_cross_entropy", spy)
    hidden, weight = torch.randn(64, 16), torch.randn(100, 16)
    labels = torch.randint(0, 100, (64,))
    cases = [(torch.float32, True, "accumulate"), (torch.float32, False, "accumulate"),
             (torch.bfloat16, True, "accumulate"), (torch.bfloat16, True, "recompute")]  # fmt: skip
    for dtype, train_head, mode in cases:
        monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", mode)
        x = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_(train_head)
        linear_cross_entropy(x, w, labels, impl="rust").backward()
    assert seen == [64 << 20, 64 << 20, 64 << 20, 4 << 20]


def test_backward_of_a_gradient_output_alone_is_none() -> None:
    # The op's gradient outputs are constants: a graph that reaches the op only through them gets no gradient
    # (and backward never materialises zero V×H "gradients" for them).
    hidden, weight, _, labels = make(three_d=False)
    out = torch.ops.logitless.linear_cross_entropy(
        hidden, weight, None, labels.reshape(-1), None, None, -100, 0.0, 0.0, 0.0, 0.0, 0.0, "sum", "auto",
        True, True, False,
    )  # fmt: skip
    out[2].sum().backward()
    assert hidden.grad is None and weight.grad is None


@pytest.mark.parametrize("impl", ALL_PATHS)
def test_retain_graph_backward_twice_accumulates(impl: str) -> None:
    hidden, weight, _, labels = make()
    loss = linear_cross_entropy(hidden, weight, labels, impl=impl)
    loss.backward(retain_graph=True)
    assert hidden.grad is not None
    first = hidden.grad.clone()
    loss.backward()
    assert_close(hidden.grad, 2 * first, 1e-6, "d_hidden after two backwards")


@pytest.mark.parametrize("impl", MODES)
def test_double_backward_raises(impl: str) -> None:
    hidden, weight, _, labels = make()
    loss = linear_cross_entropy(hidden, weight, labels, impl=impl)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


@pytest.mark.parametrize("impl", MODES)
def test_nan_in_hidden_gives_nan_loss(impl: str) -> None:
    hidden, weight, _, labels = make()
    labels[0, 3] = 5
    with torch.no_grad():
        hidden[0, 2, 1] = float("nan")
    loss = linear_cross_entropy(hidden, weight, labels, impl=impl)
    assert torch.isnan(loss)
    loss.backward()
    # As stock: the NaN row's gradient is NaN and spreads to the head's gradient; other rows stay finite.
    assert torch.isnan(hidden.grad[0, 2]).all() and torch.isnan(weight.grad).any()
    assert torch.isfinite(hidden.grad[0, :2]).all() and torch.isfinite(hidden.grad[1]).all()
    per_row = linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl)
    assert torch.isnan(per_row[0, 2]) and torch.isfinite(per_row[1]).all()


@pytest.mark.parametrize("impl", MODES)
def test_empty_inputs(impl: str) -> None:
    hidden = torch.randn(0, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long), impl=impl)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("impl", MODES)
def test_zero_width_hidden(impl: str) -> None:
    # H == 0: the logits are the bias alone.
    hidden0 = torch.randn(B, T, 0, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    _, _, _, labels = make()
    check(impl, hidden0, torch.randn(V, 0, requires_grad=True), bias, labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_gradcheck(impl: str) -> None:
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 5, 0], [2, -100, 4]])
    logits_bias = torch.randn(6, generator=g)

    def mean(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(
            h, w, labels, bias=b, impl=impl, label_smoothing=0.1, z_loss=0.01, logits_bias=logits_bias,
            logit_scale_multiply=1.5, logit_scale_divide=1.2, logit_softcapping=2.0,
        )  # fmt: skip

    def none(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(h, w, labels, bias=b, impl=impl, reduction="none", label_smoothing=0.1)

    assert torch.autograd.gradcheck(mean, (hidden, weight, bias))
    assert torch.autograd.gradcheck(none, (hidden, weight, bias))


def _sync_free(
    targets: torch.Tensor, *, skip_ignored: bool, budget_rows: int, dtype: torch.dtype = torch.float32,
    seed: int = 0, monkeypatch: pytest.MonkeyPatch | None = None, frozen_head: bool = False,
) -> tuple[torch_path.Result, Any, list[int]]:  # fmt: skip
    """The accelerator mode of the torch path (``compact=False``) run on CPU: result, float64 reference, and the
    number of rows each chunk sent through the GEMMs."""
    hidden, weight, bias, _ = make(dtype, with_bias=True, three_d=False, seed=seed)
    n = int((targets != -100).sum())
    entered: list[int] = []

    def counting_row_pass(y: torch.Tensor, *args: Any, **kw: Any) -> torch_path.RowPass:
        entered.append(y.shape[0])
        return torch_path.torch_row_pass(y, *args, **kw)

    assert bias is not None
    res = torch_path.fused_lce(
        hidden.detach(), weight.detach(), bias.detach(), targets,
        LossOptions(label_smoothing=0.1, z_loss=1e-3, epilogue=Epilogue(multiply=0.5, softcap=4.0)),
        grad_scale=torch.tensor(1.0 / max(n, 1)),
        row_scale=None, want_per_row=True, need_d_hidden=True, need_d_weight=not frozen_head,
        need_d_bias=not frozen_head,
        compact=False, budget_bytes=V * 4 * 3 * budget_rows, skip_ignored=skip_ignored, row_pass=counting_row_pass,
    )  # fmt: skip
    ref = reference(
        hidden, weight, targets, bias=bias, shift=False, label_smoothing=0.1, z_loss=1e-3,
        logit_scale_multiply=0.5, logit_softcapping=4.0, reduction="sum",
        grad_output=torch.tensor(1.0 / max(n, 1), dtype=torch.float64),
    )  # fmt: skip
    return res, ref, entered


@pytest.mark.parametrize("skip_ignored", [True, False])
@pytest.mark.parametrize("budget_rows", [5, 1000])
def test_torch_path_sync_free_mode_matches_reference(skip_ignored: bool, budget_rows: int) -> None:
    """Several chunks (5 rows each) or one; ignored rows sorted behind the scored ones (skip_ignored) or masked
    in place: loss, per-row losses and every gradient equal the float64 reference."""
    _, _, _, labels = make(three_d=False)
    targets = torch.full_like(labels, -100)
    targets[:-1] = labels[1:]
    n = int((targets != -100).sum())
    res, ref, _ = _sync_free(targets, skip_ignored=skip_ignored, budget_rows=budget_rows)
    assert int(res.count) == n
    assert_close(res.loss_sum / n, ref.loss / n, 2e-5, "loss")
    assert res.d_hidden is not None and res.d_weight is not None and res.d_bias is not None
    assert_close(res.d_hidden, ref.d_hidden, 2e-5, "d_hidden")
    assert_close(res.d_weight, ref.d_weight, 2e-5, "d_weight")
    assert_close(res.d_bias, ref.d_bias, 2e-5, "d_bias")
    hidden, weight, bias, _ = make(with_bias=True, three_d=False)
    per_row = reference(
        hidden, weight, targets, bias=bias, shift=False, label_smoothing=0.1, z_loss=1e-3,
        logit_scale_multiply=0.5, logit_softcapping=4.0, reduction="none",
    ).loss  # fmt: skip
    assert res.per_row is not None
    assert_close(res.per_row, per_row, 2e-5, "per-row loss")


def test_sync_free_mode_keeps_ignored_rows_out_of_the_gemms_after_the_first_chunk() -> None:
    """Two thirds of the rows ignored, scattered: the first chunk may hold some (it is queued before the host knows
    the count), every later one is all scored, and no chunk runs past the scored rows."""
    targets = torch.randint(0, V, (B * T,), generator=torch.Generator().manual_seed(3))
    targets[torch.arange(B * T) % 3 != 0] = -100
    n = int((targets != -100).sum())
    res, ref, entered = _sync_free(targets, skip_ignored=True, budget_rows=2)
    assert sum(entered) == n and all(rows == 2 for rows in entered[:-1])
    _, _, dense = _sync_free(targets, skip_ignored=False, budget_rows=2)
    assert sum(dense) == B * T
    assert_close(res.d_weight, ref.d_weight, 2e-5, "d_weight")
    assert_close(res.d_hidden, ref.d_hidden, 2e-5, "d_hidden")
    none, _, entered = _sync_free(torch.full((B * T,), -100), skip_ignored=True, budget_rows=2)
    assert entered == [2]  # one masked chunk, queued before the count was known
    assert float(none.loss_sum) == 0.0 and not none.d_weight.any() and not none.d_hidden.any()


@pytest.mark.parametrize("budget_rows", [1000, 5])
def test_weight_gradient_one_chunk_straight_into_its_dtype(budget_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 head: one chunk writes the weight gradient in bf16 with no float32 V×H buffer (nothing is accumulated);
    several write the first chunk's product and add the rest. Both against float64, at bf16's tolerance."""
    adds: list[int] = []
    real_add_mm = torch_path._add_mm
    monkeypatch.setattr(torch_path, "_add_mm", lambda out, *a: (adds.append(out.shape[0]), real_add_mm(out, *a)))
    _, _, _, labels = make(three_d=False)
    res, ref, entered = _sync_free(labels, skip_ignored=True, budget_rows=budget_rows, dtype=torch.bfloat16)
    assert res.d_weight is not None and res.d_weight.dtype == torch.bfloat16
    assert len(adds) == len(entered) - 1
    assert_close(res.d_weight, ref.d_weight, 3e-2, "d_weight")
    assert_close(res.loss_sum, ref.loss, 2e-2, "loss")


def _rows_fn(rows: str) -> Any:
    """The rows' targets and weights from torch ops, or from the Triton rows kernel (under the interpreter)."""
    if rows == "torch":
        return None
    from logitless import triton_path

    return triton_path.rows


_ROWS = ["torch", pytest.param("triton", marks=_INTERPRETER_OFF)]


@pytest.mark.parametrize("rows", _ROWS)
def test_torch_path_sync_free_mode_poisons_out_of_range_targets(rows: str) -> None:
    """Off-CPU an out-of-range target cannot raise without a sync: the loss turns NaN and a device assert fires
    (on CPU ``torch._assert_async`` raises at once)."""
    hidden, weight, _, labels = make(three_d=False)
    labels[4] = V + 2
    with pytest.raises(RuntimeError, match="outside"):
        torch_path.fused_lce(
            hidden.detach(), weight.detach(), None, labels, LossOptions(), grad_scale=None, row_scale=None,
            want_per_row=False,
            need_d_hidden=False, need_d_weight=False, need_d_bias=False, compact=False, rows=_rows_fn(rows),
        )  # fmt: skip


@pytest.mark.parametrize("rows", _ROWS)
@pytest.mark.parametrize("budget_rows", [100, 3])
def test_torch_path_sync_free_mode_nan_without_assert(
    rows: str, budget_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even where the device assert is not yet reported, the loss is NaN, never a finite number (one chunk, and
    sorted chunks)."""
    asserts: list[torch.Tensor] = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: asserts.append(cond))
    hidden, weight, _, labels = make(three_d=False)
    labels[4] = -7
    res = torch_path.fused_lce(
        hidden.detach(), weight.detach(), None, labels, LossOptions(), grad_scale=None, row_scale=None,
        want_per_row=True,
        need_d_hidden=False, need_d_weight=False, need_d_bias=False, compact=False, rows=_rows_fn(rows),
        budget_bytes=V * 4 * 3 * budget_rows,
    )  # fmt: skip
    assert len(asserts) == 1 and not bool(asserts[0])
    assert torch.isnan(res.loss_sum)
    assert res.per_row is not None and torch.isnan(res.per_row).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_runs_in_the_autocast_dtype_like_stock(impl: str) -> None:
    """fp32 parameters, bf16 hidden states under autocast: stock's lm_head computes in bf16 (no dtype error); so does
    the op, and the parameters' gradients land in fp32."""
    hidden, weight, bias, labels = make(torch.float32, with_bias=True)
    hidden = hidden.detach().bfloat16().requires_grad_()
    with pytest.raises(TypeError, match="weight: expected dtype torch.bfloat16"):
        linear_cross_entropy(hidden, weight, labels, bias=bias, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, impl=impl)
    loss.backward()
    rounded = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    ref = reference(rounded[0], rounded[1], labels, bias=rounded[2])
    tol_loss, tol_grad = TOLERANCES[torch.bfloat16]
    assert loss.dtype == torch.float32
    assert_close(loss, ref.loss, tol_loss, "loss")
    for t, r in zip((hidden, weight, bias), (ref.d_hidden, ref.d_weight, ref.d_bias)):
        assert t is not None and t.grad is not None and t.grad.dtype == t.dtype
        assert_close(t.grad, r, tol_grad, "grad under autocast")


@pytest.mark.parametrize("impl", MODES)
def test_backward_twice_after_unit_grad_never_gives_wrong_gradients(impl: str) -> None:
    """With grad_output == 1 the saved gradients are handed to autograd uncopied (no V×H copy of the head's
    gradient). A retained graph still gives the same gradients on a second backward; if .grad was edited in place in
    between (it may alias the saved gradient), autograd's version check raises instead of reusing the edit."""
    hidden, weight, _, labels = make()
    loss = linear_cross_entropy(hidden, weight, labels, impl=impl)
    loss.backward(retain_graph=True)
    assert weight.grad is not None
    first = weight.grad.clone()
    weight.grad = None
    loss.backward(retain_graph=True)
    assert_close(weight.grad, first, 1e-7, "d_weight on the second backward")
    assert_close(weight.grad, reference(hidden, weight, labels).d_weight, 2e-5, "d_weight vs reference")
    weight.grad.mul_(100.0)  # what a grad clip may do in place
    weight.grad = None
    if _host_reads_free():
        # The edited .grad aliases the saved gradient: autograd's version counter catches it.
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    else:  # off CPU a retained graph's gradients are scaled copies (grad_output is not read): the edit is not seen
        loss.backward()
        assert_close(weight.grad, first, 1e-7, "d_weight after an in-place edit of the previous one")


def _host_reads_free() -> bool:
    from logitless import ops

    return ops._host_reads_free(torch.device("cpu"))


def _stock_epilogue_loss(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, dt: torch.dtype,
                         *, ignore: int, reduction: str, eps: float, z: float, cap: float) -> torch.Tensor:  # fmt: skip
    """Stock's computation (``dt`` = the model dtype: logits from ``F.linear`` in it, then float32), or the float64
    reference (``dt`` = float64)."""
    logits = torch.nn.functional.linear(h.to(dt), w.to(dt), b.to(dt))
    acc = torch.float64 if dt == torch.float64 else torch.float32
    logits = logits.to(acc)
    logits = cap * torch.tanh(logits / cap)
    flat, target = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(flat, target, ignore_index=ignore, reduction="sum", label_smoothing=eps)
    lse = torch.logsumexp(flat[target != ignore], dim=1)
    loss = loss + z * (lse * lse).sum()
    return loss / (target != ignore).sum() if reduction == "mean" else loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("impl", MODES)
def test_low_precision_loss_is_at_least_as_accurate_as_stock(impl: str, reduction: str, dtype: torch.dtype) -> None:
    """Every epilogue term at once on a tiny vocabulary, against float64: no impl may lose more than stock does."""
    opts = {"ignore": -7, "reduction": reduction, "eps": 0.1, "z": 1e-4, "cap": 30.0}
    worse = []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(2, 16, 32, generator=g).to(dtype)
        w = torch.randn(8, 32, generator=g).to(dtype)
        b = torch.randn(8, generator=g).to(dtype)
        labels = torch.randint(0, 8, (2, 16), generator=g)
        labels[0, :4] = -7
        exact = float(_stock_epilogue_loss(h, w, b, labels, torch.float64, **opts))
        stock = float(_stock_epilogue_loss(h, w, b, labels, dtype, **opts))
        ours = float(linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, label_smoothing=0.1,
                                          ignore_index=-7, z_loss=1e-4, logit_softcapping=30.0, impl=impl))  # fmt: skip
        if abs(ours - exact) > abs(stock - exact) + 1e-6 * abs(exact):
            worse.append((seed, abs(ours - exact) / abs(exact), abs(stock - exact) / abs(exact)))
    assert not worse, f"(seed, our relative error, stock's): {worse}"


def _per_position_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, multiply: float,
                            softcap: float | None, temperature: float) -> dict[str, torch.Tensor]:  # fmt: skip
    """float64, materialised: log-prob of the shifted target and the distribution's statistics, per position."""
    z = hidden.double() @ weight.double().T * multiply
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    valid = targets != -100
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    zero = torch.zeros((), dtype=torch.float64)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return {
        "log_probs": torch.where(valid, picked, zero),
        "entropy": torch.where(valid, -(p * logp).sum(-1), zero),
        "mean_logits": torch.where(valid, z.mean(-1), zero),
        "log_sum_sq_probs": torch.where(valid, (2 * logp).logsumexp(-1), zero),
        "is_top1": valid & (z.argmax(-1) == targets),
        "valid": valid,
        # How far the target is from being (or from not being) the argmax: rounding may flip it only when tiny.
        "top_gap": (picked - torch.where(torch.nn.functional.one_hot(targets.clamp(min=0), z.shape[-1]).bool(),
                                         -torch.inf, logp).amax(-1)).abs(),  # fmt: skip
    }


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["no-softcap", "softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("impl", ALL_PATHS)
def test_temperature_log_probs_and_token_stats_match_float64(impl: str, dtype: torch.dtype,
                                                            softcap: float | None) -> None:  # fmt: skip
    """What TRL's trainers need from one pass: per-token log-probs at a temperature (with a gradient for any
    per-token upstream gradient) and the distribution's statistics."""
    hidden, weight, _, labels = make(dtype=dtype)
    temperature = 0.7
    ref_h = hidden.detach().double().requires_grad_()
    ref_w = weight.detach().double().requires_grad_()
    ref = _per_position_reference(ref_h, ref_w, labels, multiply=1.3, softcap=softcap, temperature=temperature)
    nll, stats = linear_cross_entropy(hidden, weight, labels, reduction="none", logit_scale_multiply=1.3,
                                      logit_softcapping=softcap, temperature=temperature, impl=impl,
                                      return_token_stats=True)  # fmt: skip
    # The torch path on CPU forms bf16 logits as stock does, so bf16 gets stock's tolerance (ops_reference).
    tol, grad_tol = TOLERANCES[dtype]
    assert_close(-nll, ref["log_probs"], tol, "log_probs")
    assert_close(stats.entropy, ref["entropy"], tol, "entropy")
    assert_close(stats.mean_logits, ref["mean_logits"], tol, "mean_logits")
    assert_close(stats.log_sum_sq_probs, ref["log_sum_sq_probs"], tol, "log_sum_sq_probs")
    assert stats.is_top1.dtype == torch.bool
    flipped = stats.is_top1 != ref["is_top1"]
    assert not flipped.any() or float(ref["top_gap"][flipped].max()) < 5 * tol, ref["top_gap"][flipped]
    if dtype == torch.float32:
        assert torch.equal(stats.is_top1, ref["is_top1"])
    assert not stats.entropy.requires_grad
    # Any per-token upstream gradient through the log-probs (what DPO / GRPO / KTO backpropagate).
    upstream = torch.randn(nll.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (-nll * upstream.to(nll.dtype)).sum().backward()
    (ref["log_probs"] * upstream).sum().backward()
    assert_close(hidden.grad, ref_h.grad, grad_tol, "d_hidden")
    assert_close(weight.grad, ref_w.grad, grad_tol, "d_weight")


@pytest.mark.parametrize("impl", IMPLS)
def test_token_stats_with_mean_reduction_and_bad_temperature(impl: str) -> None:
    hidden, weight, _, labels = make()
    loss, stats = linear_cross_entropy(hidden, weight, labels, impl=impl, return_token_stats=True)
    ref = _per_position_reference(hidden, weight, labels, multiply=1.0, softcap=None, temperature=1.0)
    assert_close(loss, -ref["log_probs"].sum() / ref["valid"].sum(), 2e-5, "loss")
    assert_close(stats.entropy, ref["entropy"], 2e-5, "entropy")
    assert stats.entropy.shape == labels.shape
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="^temperature: expected"):
            linear_cross_entropy(hidden, weight, labels, impl=impl, temperature=bad)


def test_torch_path_token_stats_equal_in_both_modes() -> None:
    """The sync-free mode (every row enters, ignored rows masked) gives the compacting mode's statistics: zeros on
    ignored rows, the same values elsewhere, across several chunks."""
    hidden, weight, _, labels = make(three_d=False)
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[1:]
    opts = LossOptions(epilogue=Epilogue(softcap=3.0, temperature=1.5))
    kw = {"grad_scale": None, "row_scale": None, "want_per_row": False, "need_d_hidden": False,
          "need_d_weight": False, "need_d_bias": False, "want_stats": True, "budget_bytes": V * 4 * 3 * 4}  # fmt: skip
    dense = torch_path.fused_lce(hidden.detach(), weight.detach(), None, targets, opts, compact=False, **kw)
    compact = torch_path.fused_lce(hidden.detach(), weight.detach(), None, targets, opts, compact=True, **kw)
    assert dense.token_stats is not None and compact.token_stats is not None
    torch.testing.assert_close(dense.token_stats, compact.token_stats, rtol=1e-6, atol=1e-7)
    assert (dense.token_stats[targets == -100] == 0).all()
    assert (dense.token_stats[targets != -100, 0] > 0).all()  # entropies of real rows


@pytest.mark.parametrize("skip_ignored", [True, False])
@pytest.mark.parametrize("budget_rows", [5, 1000])
def test_sync_free_mode_frozen_head_rows_and_hidden_gradient(skip_ignored: bool, budget_rows: int) -> None:
    """What a frozen head's reduction="none" asks of an accelerator: per-row losses and hidden's gradient of their
    sum in one pass, rows sorted (or masked) and scattered back, no weight or bias gradient formed."""
    _, _, _, labels = make(three_d=False)
    res, ref, _ = _sync_free(labels, skip_ignored=skip_ignored, budget_rows=budget_rows, frozen_head=True)
    assert res.d_weight is None and res.d_bias is None
    assert res.d_hidden is not None and res.per_row is not None
    assert_close(res.d_hidden, ref.d_hidden, 2e-5, "d_hidden")
    assert bool((res.per_row[labels == -100] == 0).all())
    n = int((labels != -100).sum())
    assert_close(res.per_row.sum() / n, ref.loss / n, 2e-5, "summed per-row loss")


@pytest.mark.parametrize("budget_rows", [1000, 5])
@pytest.mark.parametrize("skip_ignored", [True, False])
def test_recompute_in_sync_free_mode(budget_rows: int, skip_ignored: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``recompute`` after sorted (or masked) chunks: the slab pass takes every chunk's rows, masked ones with a
    zero weight, and gives the float64 reference's weight gradient at bf16's tolerance."""
    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", "recompute")
    _, _, _, labels = make(three_d=False, ignore_frac=0.5)
    res, ref, _ = _sync_free(labels, skip_ignored=skip_ignored, budget_rows=budget_rows, dtype=torch.bfloat16)
    assert res.d_weight is not None and res.d_weight.dtype == torch.bfloat16
    assert_close(res.d_weight, ref.d_weight, 3e-2, "d_weight")
    assert_close(res.d_hidden, ref.d_hidden, 3e-2, "d_hidden")


def _rounded_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on CUDA: the row and slab passes write the logits gradient in the inputs' dtype, rounded once."""
    real = torch_path.fused_lce
    monkeypatch.setattr(torch_path, "fused_lce", lambda *a, **kw: real(*a, **kw, low_precision_grad=True))


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, seen: Any) -> None:
    """Calls ``seen`` with the arguments of each call of ``module.name`` before the call itself."""
    real = getattr(module, name)

    def run(*args: Any, **kwargs: Any) -> Any:
        seen(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, run)


def _head_problem(
    n: int, v: int, dtype: torch.dtype, *, seed: int
) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """A generator (for the test's further draws), then ``n`` hidden rows and a ``v``-row head, both trained."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, H, generator=g) / H**0.5 * 3).to(dtype).requires_grad_()
    return g, hidden, weight


def _some_ignored_labels(g: torch.Generator, n: int, v: int, *, last_at: int) -> torch.Tensor:
    """About 30% ignored; row ``last_at`` scored against the last vocabulary entry."""
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    labels[last_at] = v - 1
    return labels


def _spied_passes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Every row and slab pass (the torch ones and Triton's) as it runs: (name, whether it forms a gradient)."""
    from logitless import triton_path

    passes: list[tuple[str, bool]] = []

    def seen(name: str) -> Any:
        return lambda *args, **kwargs: passes.append((name, kwargs.get("grad", True)))

    for module, prefix in ((torch_path, "torch_"), (triton_path, "")):
        for name in ("row_pass", "slab_pass"):
            _spy(monkeypatch, module, prefix + name, seen(name))
    return passes


@pytest.mark.parametrize("impl", [_SYNC_FREE, "torch", _TRITON_ON_CPU, _TRITON_SYNC_FREE])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounded", [False, True])
def test_recompute_slabs_form_every_gradient(
    impl: str, dtype: torch.dtype, rounded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``recompute`` where a slab over every row fits the budget: the row pass forms no gradient (it gives the
    loss and each row's log-sum-exp) and the slabs give d_weight, d_hidden (summed over slabs in float32) and
    d_bias. Several slabs, an epilogue, a trained bias (``rounded``: a gradient written in the inputs' dtype, as
    on CUDA, with no trained bias), against float64."""
    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", "recompute")
    # 24 rows, H=16: 1536 bytes of float32 d_hidden, then 144 bytes per column (96 where the rounded gradient is
    # written over its logits, as the interpreter's kernels do): 267 (400) of the 1200 columns a slab.
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", str(40_000 / 2**20))
    g, hidden, weight = _head_problem(24, 1200, dtype, seed=5)
    v = weight.shape[0]
    bias = None if rounded else torch.randn(v, generator=g).to(dtype).requires_grad_()
    labels = _some_ignored_labels(g, 24, v, last_at=3)
    passes = _spied_passes(monkeypatch)
    if rounded:
        _rounded_gradients(monkeypatch)
    opts = {"logit_softcapping": 2.5, "label_smoothing": 0.1, "z_loss": 1e-3,
            "logits_bias": torch.randn(v, generator=g), "shift": False}  # fmt: skip
    check(impl, hidden, weight, bias, labels, grad_output=0.75, **opts)
    rows = [grad for name, grad in passes if "row" in name]
    slabs = [name for name, _ in passes if "slab" in name]
    assert rows and not any(rows), passes
    assert len(slabs) >= 2, passes  # wider over the scored rows alone


@pytest.mark.parametrize("impl", [_SYNC_FREE, _TRITON_SYNC_FREE])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("budget", [80_000, 56_000])
def test_recompute_shares_every_rows_gradient_where_it_fits_the_budget(
    impl: str, dtype: torch.dtype, budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``recompute`` with the gradient written in the inputs' dtype (as on CUDA) where every row's gradient fits
    its budget beside chunks of float32 logits: the chunks write their gradients into one ``[N, V]`` buffer and the
    weight gradient is one GEMM over it (three GEMMs, no slab pass), exact against float64. Where it does not fit
    (56 000 bytes under the 57 600 of the 24×1200 gradient), the slabs as before."""
    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", "recompute")
    # 24×1200 gradient: 57 600 bytes; 80 000 leaves 22 400 for chunks of 4 rows of 4800 bytes of float32 logits.
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", str(budget / 2**20))
    g, hidden, weight = _head_problem(24, 1200, dtype, seed=8)
    labels = _some_ignored_labels(g, 24, 1200, last_at=5)
    passes = _spied_passes(monkeypatch)
    _rounded_gradients(monkeypatch)
    check(impl, hidden, weight, None, labels, grad_output=0.75, logit_softcapping=2.5, label_smoothing=0.1,
          shift=False)  # fmt: skip
    rows = [grad for name, grad in passes if "row" in name]
    slabs = [name for name, _ in passes if "slab" in name]
    if budget == 80_000:
        assert len(rows) >= 4 and all(rows) and not slabs, passes  # every chunk forms its gradient; no slab
    else:
        assert slabs and not any(rows), passes


@pytest.mark.parametrize("impl", [_SYNC_FREE, _TRITON_SYNC_FREE])
@pytest.mark.parametrize("ignored", ["none", "half", "most", "all"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_chunk_problem_runs_in_two_halves(
    impl: str, ignored: str, reduction: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off CPU, a problem that fits one chunk runs as two halves of its rows sorted scored-first, the second only as
    far as the scored rows go: with half the rows ignored or more, only the first half enters the GEMMs. With the
    gradient rounded as the row pass writes it (bf16 on CUDA) the weight gradient is one GEMM over every row's
    gradient; a float32 weight's is summed over the halves. Per-row losses land in their rows (and a per-token
    upstream gradient takes the second pass, in halves too). Against float64, with an epilogue and smoothing."""
    from logitless import triton_path

    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", "accumulate")
    if dtype == torch.bfloat16:
        _rounded_gradients(monkeypatch)
    entered: list[int] = []
    for module, name in ((torch_path, "torch_row_pass"), (triton_path, "row_pass")):
        _spy(monkeypatch, module, name, lambda y, *a, **kw: entered.append(y.shape[0]))
    hidden, weight, _, labels = make(dtype, three_d=False, ignore_frac=0.0, seed=4)
    n = labels.shape[0]
    if ignored in ("half", "most"):  # every other row, two in three
        labels[torch.arange(n) % {"half": 2, "most": 3}[ignored] != 0] = -100
    labels[0] = V - 1
    if ignored == "all":
        labels[:] = -100
    upstream = torch.rand(n, generator=torch.Generator().manual_seed(2)) - 0.5 if reduction == "none" else 0.75
    check(impl, hidden, weight, None, labels, grad_output=upstream, shift=False, logit_softcapping=2.5,
          label_smoothing=0.1, reduction=reduction)  # fmt: skip
    halves = [n // 2, n // 2] if ignored == "none" else [n // 2]
    # reduction="none" with a trained head: a loss-only forward (one chunk: no weight gradient to hold), then the
    # second pass with the upstream gradient, in halves.
    assert entered == ([n] if reduction == "none" else []) + halves, entered


@pytest.mark.parametrize("impl", [_SYNC_FREE, _TRITON_SYNC_FREE])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.4])
def test_chunks_share_one_gradient_buffer(impl: str, ignore_frac: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several chunks whose gradient the row pass writes in the GEMMs' dtype, few rows for the hidden size (N <=
    2·H + chunk rows): every chunk writes into one [N, V] buffer and the weight gradient is one GEMM over it, with no
    float32 V×H buffer summed chunk by chunk. Against float64, ignored rows sorted out after the first chunk."""
    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", "accumulate")
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", str(4 * V * 12 / 2**20))  # 4 rows a chunk
    _rounded_gradients(monkeypatch)
    summed: list[int] = []
    real_add = torch_path._add_mm
    monkeypatch.setattr(torch_path, "_add_mm", lambda *a: summed.append(1) or real_add(*a))
    hidden, weight, _, labels = make(torch.bfloat16, three_d=False, ignore_frac=ignore_frac, seed=6)
    check(impl, hidden, weight, None, labels, grad_output=0.75, shift=False, logit_scale_multiply=1.5, z_loss=1e-3)
    assert not summed


def _count_second_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time ``reduction="none"``'s backward runs its second fused pass."""
    from logitless import ops

    second_passes: list[int] = []
    real = ops._rows_backward
    monkeypatch.setattr(ops, "_rows_backward", lambda *a: second_passes.append(1) or real(*a))
    return second_passes


@pytest.mark.parametrize("impl", [*MODES, _TRITON_ON_CPU, _TRITON_SYNC_FREE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upstream", ["mean", "mean-ignored-rows-differ", "per-token", "all-ignored"])
def test_expect_uniform_grad(impl: str, dtype: torch.dtype, upstream: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``expect_uniform_grad`` (reduction="none", CPU): the gradients of the per-position losses' sum are formed in
    the forward pass and scaled in backward when the upstream gradient is one value at every counted position
    (values at ignored positions do not matter); any other upstream gradient takes the second pass. Exact both
    ways against float64, with the epilogue and label smoothing on."""
    second_passes = _count_second_passes(monkeypatch)
    hidden, weight, bias, labels = make(dtype, with_bias=True, seed=7)
    if upstream == "all-ignored":
        labels = torch.full_like(labels, -100)
    counted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:] != -100
    if upstream == "per-token":
        grad_output = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) - 0.5
    else:
        grad_output = torch.full((B, T), -1.0 / max(int(counted.sum()), 1))
        if upstream == "mean-ignored-rows-differ":
            grad_output = torch.where(counted, grad_output, torch.full_like(grad_output, 7.0))
    opts = {"label_smoothing": 0.1, "logit_softcapping": 4.0, "reduction": "none"}
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, impl=impl, expect_uniform_grad=True, **opts)
    ref = reference(hidden, weight, labels, bias=bias, grad_output=grad_output, **opts)
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert_close(loss, ref.loss, tol_loss, "loss")
    loss.backward(grad_output)
    assert second_passes == ([1] if upstream == "per-token" else [])
    for t, expected, name in ((hidden, ref.d_hidden, "hidden"), (weight, ref.d_weight, "weight"),
                              (bias, ref.d_bias, "bias")):  # fmt: skip
        assert t is not None and t.grad is not None and expected is not None
        assert_close(t.grad, expected, tol_grad, f"d_{name}")


@pytest.mark.parametrize("impl", [*MODES, _TRITON_SYNC_FREE])
def test_expect_uniform_grad_with_a_nan_upstream_value(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN at one counted position is not one value everywhere: the second pass runs and the NaNs land where
    the float64 reference's do (that row of d_hidden, all of d_weight); the other rows of d_hidden are exact."""
    second_passes = _count_second_passes(monkeypatch)
    hidden, weight, _, labels = make(seed=7)
    counted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:] != -100
    grad_output = torch.full((B, T), 1.0 / int(counted.sum()))
    row = tuple(int(i) for i in counted.nonzero()[1])
    grad_output[row] = float("nan")
    loss = linear_cross_entropy(hidden, weight, labels, impl=impl, reduction="none", expect_uniform_grad=True)
    loss.backward(grad_output)
    assert second_passes == [1]
    ref = reference(hidden, weight, labels, grad_output=grad_output, reduction="none")
    assert hidden.grad is not None and weight.grad is not None and ref.d_hidden is not None
    assert torch.equal(torch.isnan(hidden.grad), torch.isnan(ref.d_hidden)) and torch.isnan(hidden.grad[row]).all()
    assert torch.isnan(weight.grad).all() and torch.isnan(ref.d_weight).all()
    others = ~torch.isnan(ref.d_hidden)
    assert_close(hidden.grad[others], ref.d_hidden[others], TOLERANCES[torch.float32][1], "other rows of d_hidden")


def test_expect_uniform_grad_needs_per_position_losses() -> None:
    hidden, weight, _, labels = make()
    with pytest.raises(ValueError, match='expect_uniform_grad: only meaningful with reduction="none"'):
        linear_cross_entropy(hidden, weight, labels, expect_uniform_grad=True)


@pytest.mark.parametrize("impl", MODES)
def test_expect_uniform_grad_retain_graph(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gradients formed in the forward pass serve the first backward only (scaled in place, no V×H copy); a
    second backward of a retained graph runs the second pass, and both give the float64 reference's gradients."""
    second_passes = _count_second_passes(monkeypatch)
    hidden, weight, _, labels = make(seed=3)
    counted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:] != -100
    grad_output = torch.full((B, T), 0.5 / int(counted.sum()))
    loss = linear_cross_entropy(hidden, weight, labels, impl=impl, reduction="none", expect_uniform_grad=True)
    ref = reference(hidden, weight, labels, grad_output=grad_output, reduction="none")
    tol_grad = TOLERANCES[torch.float32][1]
    for call in range(2):
        hidden.grad = weight.grad = None
        loss.backward(grad_output, retain_graph=True)
        assert second_passes == [1] * call
        assert hidden.grad is not None and weight.grad is not None
        assert ref.d_hidden is not None and ref.d_weight is not None
        assert_close(hidden.grad, ref.d_hidden, tol_grad, f"d_hidden, backward {call + 1}")
        assert_close(weight.grad, ref.d_weight, tol_grad, f"d_weight, backward {call + 1}")


@pytest.mark.parametrize("impl", IMPLS)
def test_expect_uniform_grad_with_a_frozen_head(impl: str) -> None:
    """LoRA on the backbone, the head frozen: only the hidden states' gradient is formed ahead and scaled."""
    hidden, weight, _, labels = make(seed=4)
    weight.requires_grad_(False)
    counted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:] != -100
    grad_output = torch.full((B, T), -1.0 / int(counted.sum()))
    loss = linear_cross_entropy(hidden, weight, labels, impl=impl, reduction="none", expect_uniform_grad=True)
    loss.backward(grad_output)
    ref = reference(hidden, weight, labels, grad_output=grad_output, reduction="none")
    assert weight.grad is None and hidden.grad is not None and ref.d_hidden is not None
    assert_close(hidden.grad, ref.d_hidden, TOLERANCES[torch.float32][1], "d_hidden")


@pytest.mark.parametrize("impl", [*MODES, _TRITON_ON_CPU, _TRITON_SYNC_FREE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upstream", ["per-token", "uniform", "sparse"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_frozen_head_per_token_gradient_in_one_pass(
    impl: str, dtype: torch.dtype, upstream: str, with_bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen head (LoRA on the backbone, head and bias frozen) with reduction="none": hidden's row gradients are
    formed in the forward pass and backward scales them row by row, for any per-position upstream gradient (DPO's
    and GRPO's differ per token), without a hint and without the second pass; exact against float64 with the
    epilogue, temperature, label smoothing and z-loss on."""
    second_passes = _count_second_passes(monkeypatch)
    hidden, weight, bias, labels = make(dtype, with_bias=with_bias, seed=11)
    weight.requires_grad_(False)
    if bias is not None:
        bias.requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    grad_output = {
        "per-token": torch.rand(B, T, generator=gen) * 2 - 1,
        "uniform": torch.full((B, T), 0.25),
        "sparse": torch.where(torch.rand(B, T, generator=gen) < 0.5, 0.0, 3.0),
    }[upstream]
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_scale_multiply": 0.5, "reduction": "none"}
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, impl=impl, temperature=0.7, **opts)
    ref = reference(hidden, weight, labels, bias=bias, grad_output=grad_output, logit_scale_divide=0.7, **opts)
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert_close(loss, ref.loss, tol_loss, "loss")
    loss.backward(grad_output)
    assert second_passes == []
    assert weight.grad is None and (bias is None or bias.grad is None)
    assert hidden.grad is not None and hidden.grad.dtype == dtype and ref.d_hidden is not None
    assert_close(hidden.grad, ref.d_hidden, tol_grad, "d_hidden")


@pytest.mark.parametrize("impl", MODES)
def test_frozen_head_retain_graph_and_no_gradient(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row gradients formed ahead serve the first backward; a retained graph's second backward runs the second
    pass, and both equal the float64 reference. Nothing is formed ahead when no input needs a gradient."""
    from logitless import ops

    second_passes = _count_second_passes(monkeypatch)
    formed: list[tuple[str, bool]] = []
    real_op = ops._call_op

    def spy(*args: Any) -> Any:
        formed.append((args[12], args[14]))  # the op's reduction and need_d_hidden
        return real_op(*args)

    monkeypatch.setattr(ops, "_call_op", spy)
    hidden, weight, _, labels = make(seed=5)
    weight.requires_grad_(False)
    grad_output = torch.rand(B, T, generator=torch.Generator().manual_seed(3))
    loss = linear_cross_entropy(hidden, weight, labels, impl=impl, reduction="none")
    ref = reference(hidden, weight, labels, grad_output=grad_output, reduction="none")
    assert ref.d_hidden is not None
    for call in range(2):
        hidden.grad = None
        loss.backward(grad_output, retain_graph=True)
        assert second_passes == [1] * call
        assert hidden.grad is not None
        assert_close(hidden.grad, ref.d_hidden, TOLERANCES[torch.float32][1], f"d_hidden, backward {call + 1}")
    with torch.no_grad():
        linear_cross_entropy(hidden, weight, labels, impl=impl, reduction="none")
    assert formed == [("none+sum-grad", True), ("none", False)]


@pytest.mark.parametrize("mode", ["accumulate", "recompute"])
@pytest.mark.parametrize("budget", [28_800, 40_000])  # recompute's slabs: blocks of rows, or all rows per slab
def test_one_chunk_and_one_slab_of_scratch_at_a_time(mode: str, budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunk and slab loops drop each chunk's logits gradient and each slab's logits before the next is formed,
    so scratch is one chunk's or one slab's (an H200 measured 354 MiB for a 192 MiB recompute budget at
    8192x2048x128256 while two slabs lived at once). Also exact against float64."""
    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", mode)
    n, v = 24, 600
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, H, generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, H, generator=g) * 0.5).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    earlier: list[weakref.ref] = []
    alive: list[int] = []

    def watched(real: Any) -> Any:
        def run(y: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            alive.append(sum(ref() is not None for ref in earlier))
            out = real(y, *args, **kwargs)
            made = (y, out.grad if isinstance(out, torch_path.RowPass) else out)
            earlier.extend(weakref.ref(t) for t in made if t is not None)  # a forward-only row pass makes no grad
            return out

        return run

    count = int((targets != -100).sum())
    res = torch_path.fused_lce(
        hidden, weight, None, targets, LossOptions(), grad_scale=torch.tensor(1.0 / count), row_scale=None,
        want_per_row=False, need_d_hidden=True, need_d_weight=True, need_d_bias=False, compact=False,
        budget_bytes=budget, row_pass=watched(torch_path.torch_row_pass),
        slab_pass=watched(torch_path.torch_slab_pass),
    )  # fmt: skip
    assert len(alive) >= 4 and not any(alive), alive
    ref = reference(hidden.requires_grad_(), weight.requires_grad_(), targets, shift=False)
    _, tol_grad = TOLERANCES[torch.bfloat16]
    assert_close(res.d_weight, ref.d_weight, tol_grad, "d_weight")
    assert_close(res.d_hidden, ref.d_hidden, tol_grad, "d_hidden")


class _Passthrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: under it the op must run as the registered custom op."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case", ["mean", "sum-bf16", "none-per-token", "none-frozen-head", "none-uniform-hint", "retain-graph"]
)
def test_eager_path_equals_the_custom_op(impl: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In plain eager mode the op runs through a light autograd Function (less host time per call); under a dispatch
    mode it runs as the registered custom op. Both give the same loss and gradients, bit for bit."""
    from logitless import ops

    eager: list[int] = []
    real_apply = ops._EagerOp.apply
    monkeypatch.setattr(ops._EagerOp, "apply", lambda *a: eager.append(1) or real_apply(*a))
    dtype = torch.bfloat16 if case == "sum-bf16" else torch.float32
    reduction = case.split("-")[0] if case != "retain-graph" else "mean"

    def run() -> list[torch.Tensor]:
        hidden, weight, _, labels = make(dtype, seed=11)
        if case == "none-frozen-head":
            weight.requires_grad_(False)
        loss = linear_cross_entropy(hidden, weight, labels, impl=impl, reduction=reduction, label_smoothing=0.1,
                                    expect_uniform_grad=case == "none-uniform-hint")  # fmt: skip
        upstream = torch.full_like(loss, 0.25) if case == "none-uniform-hint" else torch.rand_like(loss) + 0.5
        loss.backward(upstream, retain_graph=case == "retain-graph")
        grads = [hidden.grad.clone()] + ([weight.grad.clone()] if weight.grad is not None else [])
        if case == "retain-graph":
            hidden.grad = weight.grad = None
            loss.backward(upstream)
            grads += [hidden.grad, weight.grad]
        return [loss.detach(), *grads]

    torch.manual_seed(0)
    plain = run()
    assert eager, "plain eager mode did not take the light path"
    eager.clear()
    torch.manual_seed(0)
    with _Passthrough():
        through_op = run()
    assert not eager, "under a dispatch mode the op must run as the custom op"
    assert len(plain) == len(through_op)
    for a, b in zip(plain, through_op):
        assert torch.equal(a, b)


@pytest.mark.parametrize("skip_ignored", [True, False])
def test_sync_free_mode_ignores_the_upstream_gradient_at_ignored_rows(skip_ignored: bool) -> None:
    """Per-row weights (the per-token second pass) that are NaN or inf where the target is ignored leave the
    gradients as stock's cross-entropy leaves them: those rows add nothing (a masked row's weight is 0, not 0·NaN)."""
    hidden, weight, _, labels = make(three_d=False, seed=4)
    targets = labels.clone()
    targets[::3] = -100
    g = torch.rand(targets.shape[0], generator=torch.Generator().manual_seed(5)) + 0.5
    poisoned = torch.where(targets == -100, float("nan"), g)
    poisoned[0] = float("inf")
    res = torch_path.fused_lce(
        hidden.detach(), weight.detach(), None, targets, LossOptions(label_smoothing=0.1), grad_scale=None,
        row_scale=poisoned, want_per_row=True, need_d_hidden=True, need_d_weight=True, need_d_bias=False,
        compact=False, budget_bytes=V * 4 * 3 * 5, skip_ignored=skip_ignored,
    )  # fmt: skip
    ref = reference(hidden, weight, targets, shift=False, label_smoothing=0.1, reduction="none",
                    grad_output=torch.where(targets == -100, 0.0, g).double())  # fmt: skip
    assert_close(res.d_hidden, ref.d_hidden, 2e-5, "d_hidden")
    assert_close(res.d_weight, ref.d_weight, 2e-5, "d_weight")


@pytest.mark.sync_free
@pytest.mark.parametrize("impl", ["torch", _TRITON_ON_CPU])
def test_sync_free_mode_poisons_what_the_cpu_rejects(impl: str) -> None:
    """Without host reads a bad ``num_items_in_batch`` cannot raise: with targets counted, the loss and the head's
    gradient are NaN (stock gives inf or NaN); without any, loss 0 and zero gradients whatever the divisor. An
    out-of-range target fires the device-side assert (raised at once on CPU)."""
    for bad in (0, -3, float("nan")):
        hidden, weight, bias, labels = make(with_bias=True)
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, num_items_in_batch=torch.tensor(bad), impl=impl)
        assert torch.isnan(loss)
        loss.backward()
        assert weight.grad is not None and torch.isnan(weight.grad).all()
        labels.fill_(-100)
        weight.grad = None
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, num_items_in_batch=bad, impl=impl)
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert weight.grad is not None and not weight.grad.any()
    hidden, weight, bias, labels = make(with_bias=True)
    labels[0, 3] = V
    with pytest.raises(RuntimeError, match="outside"):
        linear_cross_entropy(hidden, weight, labels, bias=bias, impl=impl)


def _host_reads(fn: Any) -> list[str]:
    """The torch ops under ``fn`` that read a tensor's value on the host (a device sync off CPU). On CPU
    ``_assert_async`` reads its flag; on a GPU it is a kernel, so it is left out."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    reads = []
    for e in prof.events():
        if e.name == "aten::_local_scalar_dense":
            parent, where = e.cpu_parent, []
            while parent is not None:
                where.append(parent.name)
                parent = parent.cpu_parent
            if "aten::_assert_async" not in where:
                reads.append(" < ".join([e.name, *where]))
    return reads


@pytest.mark.sync_free
@pytest.mark.parametrize("impl", ["torch", _TRITON_ON_CPU])
@pytest.mark.parametrize("call", ["mean", "sum", "num_items", "frozen-head-per-token"])
def test_sync_free_mode_never_reads_the_device_in_one_chunk(impl: str, call: str) -> None:
    """Off CPU a call whose rows fit one chunk queues its work without waiting for the device, forward and
    backward (several chunks read the scored count once, behind the first chunk's work)."""
    hidden, weight, bias, labels = make(torch.bfloat16)
    weight.requires_grad_(call != "frozen-head-per-token")
    kw: dict[str, Any] = {"reduction": "sum"} if call == "sum" else {}
    if call == "num_items":
        kw["num_items_in_batch"] = torch.tensor(11)
    if call == "frozen-head-per-token":
        kw["reduction"] = "none"
    losses: list[torch.Tensor] = []
    assert _host_reads(lambda: losses.append(linear_cross_entropy(hidden, weight, labels, impl=impl, **kw))) == []
    upstream = torch.rand(B, T) if call == "frozen-head-per-token" else torch.tensor(0.5)
    assert _host_reads(lambda: (losses[0] * upstream).sum().backward()) == []
    ref = reference(hidden, weight, labels, grad_output=upstream.to(torch.float64), **kw)
    tol_loss, tol_grad = TOLERANCES[torch.bfloat16]
    assert_close(losses[0], ref.loss, tol_loss, "loss")
    assert_close(hidden.grad, ref.d_hidden, tol_grad, "d_hidden")


# --- a low-rank term (a LoRA adapter on a frozen head) ------------------------------------------------------------

LOW_RANK_PATHS = [pytest.param("auto"), pytest.param("rust"), pytest.param("torch"), _SYNC_FREE, _TRITON_ON_CPU,
                  _TRITON_SYNC_FREE]  # fmt: skip
# Each path with each dtype, but the Rust kernel's factors are float32: not float64 inputs (a refusal, tested below).
LOW_RANK_CASES = [
    pytest.param(path.values[0], dtype, marks=path.marks, id=f"{path.id or path.values[0]}-{str(dtype)[6:]}")
    for path in LOW_RANK_PATHS
    for dtype in (torch.float32, torch.bfloat16, torch.float64)
    if not (path.values[0] == "rust" and dtype == torch.float64)
]
RANK = 3


def _low_rank_problem(dtype: torch.dtype, *, with_bias: bool = False, factor_dtype: torch.dtype = torch.float32,
                      ignore_frac: float = 0.25, seed: int = 0) -> tuple[Any, ...]:  # fmt: skip
    """A frozen head (and bias) with the adapter's factors trained: ``a`` [B, T, r], ``b`` [V, r]."""
    hidden, weight, bias, labels = make(dtype, with_bias=with_bias, ignore_frac=ignore_frac, seed=seed)
    weight.requires_grad_(False)
    if bias is not None:
        bias.requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.randn(B, T, RANK, generator=g).to(factor_dtype).requires_grad_()
    b = torch.randn(V, RANK, generator=g).to(factor_dtype).requires_grad_()
    return hidden, weight, bias, labels, a, b


@pytest.mark.parametrize(("impl", "dtype"), LOW_RANK_CASES)
@pytest.mark.parametrize("options", [{}, {"num_items_in_batch": 11}, {"reduction": "sum", "label_smoothing": 0.1,
                                     "z_loss": 1e-3, "logit_scale_multiply": 1.5, "logit_scale_divide": 0.8,
                                     "logit_softcapping": 3.0}], ids=["mean", "num-items", "sum-every-epilogue"])
@pytest.mark.parametrize("chunk_mb", [None, "0.001"], ids=["one-chunk", "many-chunks"])
def test_low_rank_term_against_float64(
    impl: str, dtype: torch.dtype, options: dict[str, Any], chunk_mb: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    if chunk_mb is not None:
        monkeypatch.setenv("LOGITLESS_CHUNK_MB", chunk_mb)
    hidden, weight, bias, labels, a, b = _low_rank_problem(dtype, with_bias=True)
    logits_bias = torch.randn(V, generator=torch.Generator().manual_seed(3))
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, impl=impl, low_rank=(a, b),
                                logits_bias=logits_bias, **options)  # fmt: skip
    (loss * 1.75).backward()
    ref = reference(hidden, weight, labels, bias=bias, low_rank=(a, b), logits_bias=logits_bias, grad_output=1.75,
                    **options)  # fmt: skip
    # The plain mean's reference is transformers' own loss, which computes in float32 whatever its logits' dtype.
    plain = dtype == torch.float64 and options.get("reduction") != "sum"
    tol_loss, tol_grad = TOLERANCES[torch.float32 if plain else dtype]
    assert ref.d_low is not None
    assert_close(loss, ref.loss, tol_loss, "loss")
    assert_close(hidden.grad, ref.d_hidden, tol_grad, "d_hidden")
    # The factors' gradients come back in their own dtype (float32 here).
    tol_factor = max(tol_grad, TOLERANCES[a.dtype][1])
    assert_close(a.grad, ref.d_low[0], tol_factor, "d_a")
    assert_close(b.grad, ref.d_low[1], tol_factor, "d_b")
    assert a.grad.dtype == a.dtype and b.grad.dtype == b.dtype
    assert weight.grad is None and bias.grad is None


@pytest.mark.parametrize("impl", LOW_RANK_PATHS)
def test_low_rank_factors_alone_in_bf16_with_ignored_chunks(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the factors train (a frozen input), in bf16 as PEFT keeps them without autocast; most rows ignored, so
    whole chunks hold none."""
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", "0.001")
    hidden, weight, _, labels, a, b = _low_rank_problem(torch.bfloat16, factor_dtype=torch.bfloat16, ignore_frac=0.7)
    hidden.requires_grad_(False)
    linear_cross_entropy(hidden, weight, labels, impl=impl, low_rank=(a, b)).backward()
    ref = reference(hidden, weight, labels, low_rank=(a, b))
    assert ref.d_low is not None
    _, tol_grad = TOLERANCES[torch.bfloat16]
    assert_close(a.grad, ref.d_low[0], tol_grad, "d_a")
    assert_close(b.grad, ref.d_low[1], tol_grad, "d_b")


def test_low_rank_token_stats_are_those_of_the_summed_logits() -> None:
    hidden, weight, _, labels, a, b = _low_rank_problem(torch.float32)
    _, stats = linear_cross_entropy(hidden, weight, labels, low_rank=(a, b), return_token_stats=True)
    logits = hidden.double() @ weight.double().T + a.double() @ b.double().T
    p = torch.softmax(logits, dim=-1)
    entropy = -(p * torch.log(p)).sum(-1)
    scored = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:] != -100
    assert_close(stats.entropy[scored], entropy[scored], 1e-5, "entropy")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ("trained-head", ValueError, "frozen head"),
        ("trained-bias", ValueError, "frozen head"),
        ("none", ValueError, 'reduction "mean" or "sum"'),
        ("rust-float64", ValueError, 'impl="rust" takes float32 factors'),
        ("a-shape", ValueError, r"low_rank\[0\]: expected \(2, 9, 3\)"),
        ("b-shape", ValueError, r"low_rank\[1\]: expected \[37, r\]"),
        ("int", TypeError, r"low_rank\[1\]: expected float32"),
        ("single", TypeError, "a pair of tensors"),
    ],
)
def test_low_rank_bad_inputs_name_what_was_expected(change: str, error: type, match: str) -> None:
    dtype = torch.float64 if change == "rust-float64" else torch.float32
    hidden, weight, bias, labels, a, b = _low_rank_problem(dtype, with_bias=True)
    kw: dict[str, Any] = {"bias": bias, "low_rank": (a, b)}
    if change == "trained-head":
        weight.requires_grad_(True)
    if change == "trained-bias":
        bias.requires_grad_(True)
    if change == "none":
        kw["reduction"] = "none"
    if change == "rust-float64":
        kw["impl"] = "rust"
    if change == "a-shape":
        kw["low_rank"] = (a[:, :, :2], b)
    if change == "b-shape":
        kw["low_rank"] = (a, b[:5])
    if change == "int":
        kw["low_rank"] = (a, b.detach().long())
    if change == "single":
        kw["low_rank"] = a
    with pytest.raises(error, match=match):
        linear_cross_entropy(hidden, weight, labels, **kw)
