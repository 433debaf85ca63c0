"""Bad input to linear_cross_entropy and to the kernel binding: clear Python errors, never a crash (spec §1.1)."""

from __future__ import annotations

import math

from typing import Any

import pytest
import torch

from logitless import _core
from logitless.ops import linear_cross_entropy

IMPLS = ["rust", "torch"]
N, H, V = 6, 8, 11


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, H, generator=g), torch.randn(V, H, generator=g), torch.randint(0, V, (N,), generator=g)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [V, V + 100, -1, -101])
def test_out_of_range_label_names_the_value(impl: str, bad: int) -> None:
    hidden, weight, labels = inputs()
    labels[3] = bad
    labels[5] = V + 7  # also bad, but after the first one
    with pytest.raises(ValueError, match=rf"^labels: target {bad} \(row 2 after shifting\) is outside \[0, {V}\)"):
        linear_cross_entropy(hidden, weight, labels, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_label_in_last_position_is_dropped_by_the_shift(impl: str) -> None:
    # As in stock: the first label is never a target after the shift, so an odd value there is harmless.
    hidden, weight, labels = inputs()
    labels[0] = V + 5
    assert torch.isfinite(linear_cross_entropy(hidden, weight, labels, impl=impl))
    with pytest.raises(ValueError, match=f"^labels: target {V + 5}"):
        linear_cross_entropy(hidden, weight, labels, shift=False, impl=impl)


class _Quantised(torch.Tensor):
    """A tensor subclass standing in for a quantised weight (torchao's, NF4)."""


CASES: list[tuple[str, type[Exception], str, dict[str, Any]]] = [
    ("hidden 1-d", ValueError, r"^hidden: expected \[B, T, H\] or \[N, H\]", {"hidden": torch.randn(H)}),
    ("hidden int", TypeError, "^hidden: expected float32", {"hidden": torch.ones(N, H, dtype=torch.int64)}),
    ("weight H", ValueError, rf"^weight: expected \[V, {H}\]", {"weight": torch.randn(V, H + 1)}),
    ("weight dtype", TypeError, "^weight: expected dtype torch.float32", {"weight": torch.randn(V, H).double()}),
    ("weight empty", ValueError, "^weight: expected at least one row", {"weight": torch.randn(0, H)}),
    ("weight device", ValueError, "^weight: expected device cpu", {"weight": torch.randn(V, H, device="meta")}),
    ("bias shape", ValueError, rf"^bias: expected shape \({V},\)", {"bias": torch.randn(V + 1)}),
    ("bias dtype", TypeError, "^bias: expected dtype", {"bias": torch.randn(V).half()}),
    ("labels shape", ValueError, r"^labels: expected shape \(6,\)", {"labels": torch.zeros(N + 1, dtype=torch.long)}),
    ("labels float", TypeError, "^labels: expected an integer dtype", {"labels": torch.zeros(N)}),
    ("labels None", ValueError, "^labels: expected a tensor", {"labels": None}),
    ("shift_labels shape", ValueError, "^shift_labels: expected shape", {"shift_labels": torch.zeros(2, 3).long()}),
    ("logits_bias shape", ValueError, "^logits_bias: expected", {"logits_bias": torch.randn(3)}),
    ("reduction", ValueError, "^reduction: expected one of", {"reduction": "avg"}),
    ("impl", ValueError, "^impl: expected one of", {"impl": "cuda"}),
    ("num_items sum", ValueError, "^num_items_in_batch: only meaningful", {"reduction": "sum", "num_items_in_batch": 3}),
    ("num_items shape", ValueError, "^num_items_in_batch: expected", {"num_items_in_batch": torch.ones(2)}),
    ("num_items type", TypeError, "^num_items_in_batch: expected", {"num_items_in_batch": "3"}),
    ("label_smoothing", ValueError, "^label_smoothing: expected", {"label_smoothing": 1.5}),
    ("z_loss", ValueError, "^z_loss: expected", {"z_loss": -1.0}),
    ("softcap type", TypeError, "^logit_softcapping: expected a number", {"logit_softcapping": "big"}),
    ("softcap inf", ValueError, "^logit_softcapping: expected a finite number", {"logit_softcapping": math.inf}),
    ("multiply nan", ValueError, "^logit_scale_multiply: expected a finite", {"logit_scale_multiply": math.nan}),
    ("divide tensor", ValueError, "^logit_scale_divide: expected a number", {"logit_scale_divide": torch.ones(2)}),
    ("z_loss nan", ValueError, "^z_loss: expected a finite number", {"z_loss": math.nan}),
    ("ignore_index float", TypeError, "^ignore_index: expected an int", {"ignore_index": -100.0}),
    ("hidden type", TypeError, "^hidden: expected a torch.Tensor, got list", {"hidden": [1.0]}),
    # A subclass's F.linear is its own kernel: its raw values are not the weight.
    ("weight subclass", TypeError, "^weight: expected a plain torch.Tensor or nn.Parameter, got the tensor subclass",
     {"weight": torch.randn(V, H).as_subclass(_Quantised)}),
    ("bias subclass", TypeError, "^bias: expected a plain torch.Tensor or nn.Parameter, got the tensor subclass",
     {"bias": torch.randn(V).as_subclass(_Quantised)}),
    # Constants that want a gradient would silently get none.
    ("multiply learned", TypeError, "^logit_scale_multiply: expected a number or a tensor that does not require grad",
     {"logit_scale_multiply": torch.tensor(2.0, requires_grad=True)}),
    ("softcap learned", TypeError, "^logit_softcapping: expected a number or a tensor that does not require grad",
     {"logit_softcapping": torch.nn.Parameter(torch.tensor(30.0))}),
    ("logits_bias learned", TypeError, r"^logits_bias: expected a tensor \(a buffer\) that does not require grad",
     {"logits_bias": torch.zeros(V, requires_grad=True)}),
]


@pytest.mark.parametrize(("case", "exc", "match", "override"), CASES, ids=[c[0] for c in CASES])
def test_bad_arguments(case: str, exc: type[Exception], match: str, override: dict[str, Any]) -> None:
    hidden, weight, labels = inputs()
    args: dict[str, Any] = {"hidden": hidden, "weight": weight, "labels": labels}
    args.update(override)
    with pytest.raises(exc, match=match):
        linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_constants_that_require_grad_are_taken_as_constants_without_grad_mode() -> None:
    hidden, weight, labels = inputs()
    scale = torch.tensor(2.0, requires_grad=True)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, logit_scale_multiply=scale)
        ref = linear_cross_entropy(hidden, weight, labels, logit_scale_multiply=2.0)
    assert torch.equal(loss, ref)


def test_rust_impl_refuses_non_cpu_tensors() -> None:
    hidden = torch.randn(N, H, device="meta")
    weight = torch.randn(V, H, device="meta")
    with pytest.raises(ValueError, match='^impl="rust": expected CPU tensors'):
        linear_cross_entropy(hidden, weight, torch.zeros(N, dtype=torch.long, device="meta"), impl="rust")


def view(t: torch.Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...], str]:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."))


def call_core(**override: Any) -> tuple[float, int]:
    hidden, weight, labels = inputs()
    keep = [hidden, weight, labels]  # alive for the call: the binding borrows their memory
    args: dict[str, Any] = {
        "hidden": view(hidden),
        "weight": view(weight),
        "bias": None,
        "targets": view(labels),
        "ignore_index": -100,
        "label_smoothing": 0.0,
        "z_loss": 0.0,
    }
    for k, v in override.items():
        if isinstance(v, torch.Tensor):
            keep.append(v)
            v = view(v)
        args[k] = v
    out = _core.fused_linear_cross_entropy(
        args.pop("hidden"), args.pop("weight"), args.pop("bias"), args.pop("targets"), **args
    )
    del keep
    return out


BINDING_CASES: list[tuple[str, type[Exception], str, dict[str, Any]]] = [
    ("dtype name", TypeError, "^hidden: expected dtype", {"hidden": (0, (N, H), (H, 1), "complex64")}),
    ("ndim", ValueError, "^hidden: expected a 2-d tensor", {"hidden": (0, (N,), (1,), "float32")}),
    ("negative stride", ValueError, "^hidden: expected non-negative strides", {"hidden": (64, (N, H), (-H, 1), "float32")}),
    ("column stride", ValueError, "^weight: expected unit column stride", {"weight": torch.randn(H, V).t()}),
    ("misaligned", ValueError, "^hidden: data pointer 0x3 is null or not aligned", {"hidden": (3, (N, H), (H, 1), "float32")}),
    ("^hidden: data pointer 0x0 is null", ValueError, "^hidden: data pointer 0x0 is null", {"hidden": (0, (N, H), (H, 1), "float32")}),
    ("weight dtype", TypeError, "^weight: expected dtype float32", {"weight": torch.randn(V, H).double()}),
    ("weight cols", ValueError, "^weight: expected shape", {"weight": torch.randn(V, H + 1)}),
    ("targets dtype", TypeError, "^targets: expected dtype.*got int32", {"targets": torch.zeros(N, dtype=torch.int32)}),
    ("targets len", ValueError, "^targets: expected shape", {"targets": torch.zeros(N + 1, dtype=torch.long)}),
    ("d_hidden strided", ValueError, "^d_hidden: expected a contiguous", {"d_hidden": torch.zeros(N, 2 * H)[:, :H]}),
    ("d_weight shape", ValueError, "^d_weight: expected shape", {"d_weight": torch.zeros(V + 1, H)}),
    ("per_row dtype", TypeError, "^per_row_loss: expected dtype float64", {"per_row_loss": torch.zeros(N)}),
    ("both scales", ValueError, "^grad_scale and row_scale: expected at most one", {"grad_scale": 1.0, "row_scale": torch.ones(N)}),
    ("logits_bias len", ValueError, "^logits_bias: expected shape", {"logits_bias": torch.zeros(V - 1)}),
    ("bad target", ValueError, "^targets: .*target 99", {"targets": torch.tensor([0, 1, 99, 2, 3, 4])}),
    ("low_a alone", ValueError, "^low_a and low_b: expected both or neither", {"low_a": torch.zeros(N, 2)}),
    ("low_b rows", ValueError, r"^low_b: expected shape \[11, 2\]",
     {"low_a": torch.zeros(N, 2), "low_b": torch.zeros(V - 1, 2)}),
    ("low_a rank", ValueError, r"^low_a: expected shape \[6, 2\]",
     {"low_a": torch.zeros(N, 3), "low_b": torch.zeros(V, 2)}),
    ("low_b dtype", TypeError, "^low_b: expected dtype float32",
     {"low_a": torch.zeros(N, 2), "low_b": torch.zeros(V, 2, dtype=torch.float64)}),
    ("d_low_b shape", ValueError, r"^d_low_b: expected shape \[11, 2\]",
     {"low_a": torch.zeros(N, 2), "low_b": torch.zeros(V, 2), "d_low_b": torch.zeros(V, 3)}),
    ("d_low_a alone", ValueError, "^d_low_a: expected no gradient buffer", {"d_low_a": torch.zeros(N, 2)}),
    ("low rank beside d_weight", ValueError, "^low_rank: expected a frozen head",
     {"low_a": torch.zeros(N, 2), "low_b": torch.zeros(V, 2), "d_weight": torch.zeros(V, H)}),
    ("low rank, float64", ValueError, "^low_rank: its factors are f32",
     {"hidden": torch.zeros(N, H, dtype=torch.float64), "weight": torch.zeros(V, H, dtype=torch.float64),
      "low_a": torch.zeros(N, 2), "low_b": torch.zeros(V, 2)}),
]


@pytest.mark.parametrize(("case", "exc", "match", "override"), BINDING_CASES, ids=[c[0] for c in BINDING_CASES])
def test_binding_validates_everything(case: str, exc: type[Exception], match: str, override: dict[str, Any]) -> None:
    with pytest.raises(exc, match=match):
        call_core(**override)


def test_binding_errors_are_value_and_type_error_subclasses() -> None:
    assert issubclass(_core.LogitlessError, ValueError)
    assert issubclass(_core.LogitlessTypeError, TypeError)


def test_binding_refuses_a_low_rank_gradient_over_its_factor() -> None:
    hidden, weight, labels = inputs()
    a, b = torch.zeros(N, 2), torch.zeros(V, 2)
    with pytest.raises(ValueError, match="^d_low_a: output buffer overlaps low_a"):
        _core.fused_linear_cross_entropy(
            view(hidden), view(weight), None, view(labels), ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
            low_a=view(a), low_b=view(b), d_low_a=view(a),
        )  # fmt: skip


def test_binding_refuses_output_overlapping_an_input() -> None:
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="^d_hidden: output buffer overlaps hidden"):
        _core.fused_linear_cross_entropy(
            view(hidden), view(weight), None, view(labels), ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
            d_hidden=view(hidden),
        )  # fmt: skip


VOCAB_PARALLEL_ERRORS = [
    ({"impl": "rust"}, ValueError, r"^impl: expected one of \('auto', 'torch', 'triton'\)"),
    ({"impl": "fast"}, ValueError, r"^impl: expected one of"),
    ({"vocab_start": 5}, ValueError, r"^vocab_start: expected the shard \[5, 16\) inside \[0, 11\)"),
    ({"vocab_start": -1}, ValueError, r"^vocab_start: expected the shard"),
    ({"reduction": "none"}, ValueError, r"^reduction: expected one of \('mean', 'sum'\)"),
    ({"reduction": "sum", "num_items_in_batch": 3}, ValueError, r"^num_items_in_batch: only meaningful"),
    ({"label_smoothing": 2.0}, ValueError, r"^label_smoothing: expected a value in \[0, 1\]"),
    ({"hidden": torch.randn(N, H + 1)}, ValueError,
     r"^weight: expected \[V_local, 9\] \(hidden size 9\), got \(11, 8\)"),  # fmt: skip
]


@pytest.mark.parametrize(("change", "error", "message"), VOCAB_PARALLEL_ERRORS)
def test_vocab_parallel_op_rejects_bad_arguments_before_any_collective(
    change: dict[str, Any], error: type[Exception], message: str
) -> None:
    """No process group exists here: each error is raised before the op would communicate."""
    from logitless.vocab_parallel import vocab_parallel_linear_cross_entropy

    hidden, weight, labels = inputs()
    kwargs: dict[str, Any] = {"hidden": hidden, "weight": weight, "labels": labels, "vocab_start": 0,
                              "vocab_size": V, **change}  # fmt: skip
    with pytest.raises(error, match=message):
        vocab_parallel_linear_cross_entropy(**kwargs)
