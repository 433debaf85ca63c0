"""``logitless.divergence.linear_divergence`` (spec §1.7) against a float64 materialised reference written here:
both models' full logits, their epilogues and the temperature, log-softmax, and the divergence TRL defines for each
``beta``; gradients by autograd through that computation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from logitless.divergence import linear_divergence
from ops_reference import divergence64, epilogue64

B, T, H, H_T, V = 2, 7, 12, 20, 53


def reference(
    hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
    beta: float, temperature: float = 1.0, bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
    epilogue: dict[str, Any] | None = None, teacher_epilogue: dict[str, Any] | None = None,
    mask: torch.Tensor | None = None, reduction: str = "mean", num_items_in_batch: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The loss and each position's student entropy, in float64, from the materialised logits."""

    def distribution(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, e: dict[str, Any] | None) -> Any:
        z = h.double() @ w.double().T
        if b is not None:
            z = z + b.double()
        return torch.log_softmax(epilogue64(z, **(e or {})) / temperature, dim=-1)

    log_s = distribution(hidden, weight, bias, epilogue)
    log_t = distribution(teacher_hidden, teacher_weight, teacher_bias, teacher_epilogue)
    per_position = divergence64(log_s, log_t, beta)
    kept = torch.ones(per_position.shape, dtype=torch.bool) if mask is None else mask.bool()
    total = per_position[kept].sum()
    entropy = torch.where(kept, -(log_s.exp() * log_s).sum(-1), 0.0)
    if reduction == "sum":
        return total, entropy
    denominator = num_items_in_batch if num_items_in_batch is not None else max(int(kept.sum()), 1)
    return total / denominator, entropy


def _inputs(dtype: torch.dtype = torch.float32, seed: int = 0, bias: bool = False) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(B, T, H, generator=g).to(dtype).requires_grad_(),
        "weight": (torch.randn(V, H, generator=g) * 0.6).to(dtype).requires_grad_(),
        "teacher_hidden": torch.randn(B, T, H_T, generator=g).to(dtype),
        "teacher_weight": (torch.randn(V, H_T, generator=g) * 0.5).to(dtype),
        "bias": (torch.randn(V, generator=g) * 0.3).to(dtype).requires_grad_() if bias else None,
    }


def _check(tensors: dict[str, Any], options: dict[str, Any], *, rtol: float = 2e-5, atol: float = 1e-6) -> None:
    loss, entropy = linear_divergence(**tensors, **options, return_entropy=True)
    wanted = [t for t in (tensors["hidden"], tensors["weight"], tensors["bias"]) if t is not None]
    got_grads = torch.autograd.grad(loss, wanted)
    leaves = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
              for k, v in tensors.items()}  # fmt: skip
    ref_loss, ref_entropy = reference(**leaves, **options)
    ref_wanted = [leaves[k] for k in ("hidden", "weight", "bias") if leaves[k] is not None]
    ref_grads = torch.autograd.grad(ref_loss, ref_wanted)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), rtol=rtol, atol=atol * 10)
    for got, want in zip(got_grads, ref_grads, strict=True):
        assert got.dtype == tensors["hidden"].dtype or got.shape == tensors["weight"].shape
        torch.testing.assert_close(got.double(), want, rtol=rtol * 10, atol=atol)


def _mask(seed: int = 1, fraction: float = 0.4) -> torch.Tensor:
    return torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > fraction


BETAS = [0.0, 1.0, 0.5, 0.1, 0.9]
EPILOGUES = {
    "plain": ({}, {}),
    "softcap student": ({"logit_softcapping": 2.5}, {}),
    "multiply / divide": ({"logit_scale_multiply": 1.7}, {"logit_scale_divide": 0.6}),
    "softcap both, scaled": ({"logit_scale_multiply": 0.8, "logit_softcapping": 3.0}, {"logit_softcapping": 1.5}),
    "logits bias": ({"logits_bias": torch.linspace(-1, 1, V)}, {"logits_bias": torch.linspace(0.5, -0.5, V)}),
}


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("epilogues", sorted(EPILOGUES))
def test_divergence_and_gradients_match_the_float64_reference(beta: float, epilogues: str) -> None:
    student, teacher = EPILOGUES[epilogues]
    _check(_inputs(), {"beta": beta, "temperature": 0.7, "epilogue": student, "teacher_epilogue": teacher,
                       "mask": _mask()})  # fmt: skip


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "num_items"])
def test_reductions_bias_and_no_mask(beta: float, reduction: str) -> None:
    options: dict[str, Any] = {"beta": beta, "reduction": "mean" if reduction == "num_items" else reduction}
    if reduction == "num_items":
        options["num_items_in_batch"] = 23.0
    _check(_inputs(bias=True), options)


def test_float64_inputs_are_exact() -> None:
    _check(_inputs(torch.float64), {"beta": 0.3, "temperature": 1.3, "mask": _mask()}, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_close_to_the_reference_of_the_rounded_inputs(dtype: torch.dtype, masked: bool) -> None:
    # The logits are formed as stock's head forms them (rounded to the input dtype on CPU): bf16-level agreement.
    _check(_inputs(dtype), {"beta": 0.5, "mask": _mask() if masked else None}, rtol=3e-2, atol=3e-3)


def test_under_autocast_the_heads_run_in_the_autocast_dtype() -> None:
    """As stock's ``F.linear`` heads do under autocast (mixed-precision training, float32 parameters): the result is
    the op's on the inputs rounded to bfloat16, and the float32 parameters get float32 gradients through the casts."""
    tensors, options = _inputs(), {"beta": 0.5, "temperature": 0.8, "mask": _mask(),
                                   "epilogue": {"logit_softcapping": 2.5}}  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_divergence(**tensors, **options)
    d_hidden, d_weight = torch.autograd.grad(loss, [tensors["hidden"], tensors["weight"]])
    assert loss.dtype == d_hidden.dtype == d_weight.dtype == torch.float32
    rounded = {k: v.detach().bfloat16().requires_grad_(v.requires_grad) if v is not None else None
               for k, v in tensors.items()}  # fmt: skip
    want = linear_divergence(**rounded, **options)
    want_hidden, want_weight = torch.autograd.grad(want, [rounded["hidden"], rounded["weight"]])
    assert loss.item() == want.item()
    torch.testing.assert_close(d_hidden, want_hidden.float(), rtol=0, atol=0)
    torch.testing.assert_close(d_weight, want_weight.float(), rtol=0, atol=0)
    ref, _ = reference(**{k: v.detach() if v is not None else None for k, v in rounded.items()}, **options)
    assert math.isclose(loss.item(), ref.item(), rel_tol=3e-3)  # bf16 logits, as stock's bf16 head gives


@pytest.mark.parametrize("chunk_mb", ["0.0005", "0.002"])
def test_chunk_boundaries_do_not_change_the_result(chunk_mb: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.0005 MiB holds one row of the five float32 temporaries at V=53 per chunk; 0.002 a few: many chunks, a
    # ragged last one, kept rows scattered across them.
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", chunk_mb)
    monkeypatch.setattr("logitless.divergence._MIN_CHUNK_MB", 0)
    _check(_inputs(bias=True), {"beta": 0.5, "mask": _mask(3), "epilogue": {"logit_softcapping": 2.0}})
    _check(_inputs(), {"beta": 0.0})
    # bf16 on CPU: the 14 rows fill two weight-gradient blocks of H = 12 rows, two bf16 products summed in float32.
    _check(_inputs(torch.bfloat16), {"beta": 1.0}, rtol=3e-2, atol=3e-3)


def test_fully_masked_gives_zero_loss_and_zero_gradients() -> None:
    tensors = _inputs(bias=True)
    loss, entropy = linear_divergence(**tensors, mask=torch.zeros(B, T, dtype=torch.bool), return_entropy=True)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not entropy.any()
    for name in ("hidden", "weight", "bias"):
        assert not tensors[name].grad.any(), name


def test_frozen_student_head_takes_only_the_hidden_gradient() -> None:
    tensors = _inputs()
    tensors["weight"].requires_grad_(False)
    loss = linear_divergence(**tensors, beta=0.5, mask=_mask())
    (d_hidden,) = torch.autograd.grad(loss, [tensors["hidden"]])
    leaves = {k: v.detach().double() if v is not None else None for k, v in tensors.items()}
    leaves["hidden"].requires_grad_()
    ref, _ = reference(**leaves, beta=0.5, mask=_mask())
    torch.testing.assert_close(d_hidden.double(), torch.autograd.grad(ref, [leaves["hidden"]])[0], rtol=2e-4, atol=1e-6)


def test_identical_models_have_zero_divergence() -> None:
    tensors = _inputs()
    same = {**tensors, "teacher_hidden": tensors["hidden"].detach(), "teacher_weight": tensors["weight"].detach()}
    for beta in BETAS:
        assert abs(float(linear_divergence(**same, beta=beta).detach())) < 1e-6


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_small_divergence_keeps_float32_precision(beta: float) -> None:
    """A student near its teacher over a wide vocabulary: the divergence (~0.02) is a small difference of terms the
    size of the entropy (~8), so each row's float32 log-sum-exp must not enter it as an offset (that alone gave
    relative errors of 1e-5 and more)."""
    g = torch.Generator().manual_seed(7)
    vocab, width = 8192, 48
    teacher_hidden = torch.randn(64, width, generator=g)
    teacher_weight = torch.randn(vocab, width, generator=g) * 0.4
    hidden = (teacher_hidden + 0.05 * torch.randn(64, width, generator=g)).requires_grad_()
    weight = (teacher_weight + 0.02 * torch.randn(vocab, width, generator=g)).requires_grad_()
    loss = linear_divergence(hidden, weight, teacher_hidden, teacher_weight, beta=beta)
    leaves = {"hidden": hidden.detach().double(), "weight": weight.detach().double(),
              "teacher_hidden": teacher_hidden.double(), "teacher_weight": teacher_weight.double()}  # fmt: skip
    ref, _ = reference(**leaves, beta=beta)
    assert 1e-4 < float(ref) < 5e-2
    assert abs(float(loss.detach()) - float(ref)) <= 1e-6 * float(ref)


def _bad(**change: Any) -> dict[str, Any]:
    tensors = _inputs()
    tensors.update(change)
    return tensors


ERRORS: list[tuple[str, type[Exception], str, dict[str, Any], dict[str, Any]]] = [
    ("hidden int", TypeError, "^hidden: expected a float32", {"hidden": torch.ones(B, T, H, dtype=torch.long)}, {}),
    ("weight H", ValueError, rf"^weight: expected shape \[V, {H}\]", {"weight": torch.randn(V, H + 1)}, {}),
    ("teacher positions", ValueError, "^teacher_hidden: expected shape", {"teacher_hidden": torch.randn(B, T + 1, H_T)},
     {}),
    ("teacher vocab", ValueError, rf"^teacher_weight: expected shape \[{V}, {H_T}\]",
     {"teacher_weight": torch.randn(V + 1, H_T)}, {}),
    ("teacher device", ValueError, "^teacher_weight: expected device cpu",
     {"teacher_weight": torch.randn(V, H_T, device="meta")}, {}),
    ("bias shape", ValueError, rf"^bias: expected None or a tensor of shape \({V},\)", {"bias": torch.randn(V + 1)},
     {}),
    ("bias dtype", TypeError, "^bias: expected dtype torch.float32", {"bias": torch.randn(V).double()}, {}),
    ("weight dtype", TypeError, r"^weight: expected dtype torch.float32 \(the dtype of hidden\)",
     {"weight": torch.randn(V, H).bfloat16()}, {}),
    ("teacher weight dtype", TypeError,
     r"^teacher_weight: expected dtype torch.float32 \(the dtype of teacher_hidden\)",
     {"teacher_weight": torch.randn(V, H_T).double()}, {}),
    ("teacher wants grad", TypeError, "^teacher_hidden: expected a tensor that does not require grad",
     {"teacher_hidden": torch.randn(B, T, H_T, requires_grad=True)}, {}),
    ("beta", ValueError, r"^beta: expected a value in \[0, 1\]", {}, {"beta": 1.5}),
    ("temperature", ValueError, "^temperature: expected a value > 0", {}, {"temperature": 0.0}),
    ("reduction", ValueError, "^reduction: expected 'mean' or 'sum'", {}, {"reduction": "none"}),
    ("num_items with sum", ValueError, "^num_items_in_batch: expected None", {},
     {"reduction": "sum", "num_items_in_batch": 3}),
    ("mask shape", ValueError, r"^mask: expected None or a tensor of shape \(2, 7\)", {},
     {"mask": torch.ones(B, T + 1)}),
    ("mask float", TypeError, "^mask: expected a bool or integer tensor", {}, {"mask": torch.ones(B, T)}),
    ("epilogue key", ValueError, "^epilogue: expected keys among", {}, {"epilogue": {"softcap": 2.0}}),
    ("epilogue value", ValueError, "^logit_softcapping: expected a finite number", {},
     {"teacher_epilogue": {"logit_softcapping": math.inf}}),
    ("logits bias shape", ValueError, rf"^logits_bias: expected a float tensor of shape \({V},\)", {},
     {"epilogue": {"logits_bias": torch.zeros(V - 1)}}),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_input_raises_a_clear_error(case: tuple[str, type[Exception], str, dict[str, Any], dict[str, Any]]) -> None:
    _, kind, message, change, options = case
    with pytest.raises(kind, match=message):
        linear_divergence(**_bad(**change), **options)


def test_backward_twice_and_double_backward_raise() -> None:
    tensors = _inputs()
    loss = linear_divergence(**tensors, beta=0.5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    loss = linear_divergence(**tensors, beta=0.5)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, [tensors["hidden"]], create_graph=True)


def test_no_gradient_is_formed_under_no_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    # Evaluation calls the op under torch.no_grad() with a trainable student: the loss only, no gradient GEMMs.
    from logitless import divergence, torch_path

    products: list[int] = []
    real = torch_path._mm
    monkeypatch.setattr(divergence.torch_path, "_mm", lambda *a: products.append(1) or real(*a))
    tensors = _inputs()
    linear_divergence(**tensors, beta=0.5)
    assert len(products) == 1  # the control: float32 logits are plain matmuls, d_hidden is this product
    with torch.no_grad():
        loss = linear_divergence(**tensors, beta=0.5)
    assert len(products) == 1  # no d_hidden product under no_grad
    ref, _ = reference(**{k: v.detach() if v is not None else None for k, v in tensors.items()}, beta=0.5)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
