"""``logitless.integrations._support``: log-probabilities over each position's top-k tokens and given ids, from a
head's input and parameters, against a float64 reference from the materialised logits (values, the ids chosen,
gradients), across chunk boundaries, every epilogue, bf16 inputs, skipped positions; and its materialised
fallback."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from logitless.integrations import _support
from logitless.integrations._support import Support, materialised_support, support_log_probs

B, T, H, V = 3, 5, 16, 97  # V not a multiple of anything the chunks use


def _reference_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, e: dict[str, Any]) -> torch.Tensor:
    """float64 logits after the epilogue and temperature, from the head's product as its dtype rounds it."""
    z = torch.nn.functional.linear(x, w, b).double()
    if e.get("logits_bias") is not None:
        z = z + e["logits_bias"].double()
    if e.get("logit_scale_multiply"):
        z = z * e["logit_scale_multiply"]
    if e.get("logit_scale_divide"):
        z = z / e["logit_scale_divide"]
    if e.get("logit_softcapping"):
        z = e["logit_softcapping"] * torch.tanh(z / e["logit_softcapping"])
    return z / e["temperature"]


def _problem(dtype: torch.dtype, bias: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, T, H, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    rows = torch.rand(B, T, generator=g) > 0.3
    rows[0, 0], rows[2, 4] = True, False
    ids = torch.randint(0, V, (B, T, 2), generator=g)
    ids[..., 1] = V - 1  # the last id
    return x, w, b, rows, ids


EPILOGUES = {
    "plain": {"logits_bias": None, "logit_scale_multiply": None, "logit_scale_divide": None,
              "logit_softcapping": None, "temperature": 1.0},
    "softcap-temperature": {"logits_bias": None, "logit_scale_multiply": None, "logit_scale_divide": None,
                            "logit_softcapping": 3.0, "temperature": 0.7},
    "scales-bias": {"logits_bias": torch.linspace(-0.5, 0.5, V), "logit_scale_multiply": 1.5,
                    "logit_scale_divide": 2.0, "logit_softcapping": None, "temperature": 1.3},
}  # fmt: skip


@pytest.mark.parametrize("epilogue", sorted(EPILOGUES))
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_top_k_and_given_ids_equal_float64(epilogue: str, chunk_rows: int, bias: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The top 7 ids of each kept position (descending) and two given ones; their log-probabilities and the
    gradients of a weighted sum of them."""
    monkeypatch.setattr(_support, "_CHUNK_BYTES", chunk_rows * V * 4 * 3)
    e = EPILOGUES[epilogue]
    x, w, b, rows, ids = _problem(torch.float32, bias)
    got = support_log_probs(x, w, b, e, Support(rows, 7, ids))
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    logp = torch.log_softmax(_reference_logits(*refs, e), dim=-1)
    want_ids = torch.cat([logp.topk(7, dim=-1).indices, ids], dim=-1)
    kept = rows.unsqueeze(-1)
    assert torch.equal(got["ids"], torch.where(kept, want_ids, 0))
    want = torch.where(kept, logp.gather(-1, want_ids), 0.0)
    torch.testing.assert_close(got["log_probs"].double(), want, rtol=1e-5, atol=1e-6)
    weights = torch.randn(got["log_probs"].shape, generator=torch.Generator().manual_seed(1))
    (got["log_probs"] * weights).sum().backward()
    (want * weights.double()).sum().backward()
    for mine, ref in zip((x, w, b), refs):
        if mine is not None:
            torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)
    assert bool((x.grad[~rows] == 0).all())  # a skipped position gets no gradient


def test_bf16_ranks_and_scores_the_rounded_logits_as_stock_does() -> None:
    """A bf16 head's logits are rounded to bf16 by its GEMM (as stock's are); the ranks, values and gradients are those
    of the rounded logits, in float32."""
    x, w, _, rows, ids = _problem(torch.bfloat16, bias=False)
    e = EPILOGUES["softcap-temperature"]
    got = support_log_probs(x, w, None, e, Support(rows, 5, ids))
    logp = torch.log_softmax(_reference_logits(x.detach(), w.detach(), None, e), dim=-1)
    want_ids = torch.cat([logp.topk(5, dim=-1).indices, ids], dim=-1)
    kept = rows.unsqueeze(-1)
    assert got["log_probs"].dtype == torch.float32
    assert torch.equal(got["ids"], torch.where(kept, want_ids, 0))
    torch.testing.assert_close(got["log_probs"].double(), torch.where(kept, logp.gather(-1, want_ids), 0.0),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    got["log_probs"].sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert bool(torch.isfinite(w.grad.float()).all()) and float(w.grad.float().abs().max()) > 0


def test_under_autocast_a_float32_head_runs_in_bf16_and_its_gradients_follow() -> None:
    """Under CPU autocast the head's GEMM runs in bf16, as stock's ``F.linear`` head does (the ids ranked on those
    logits); the backward (outside autocast) recomputes the logits with the float32 head, a rounding closer, and
    returns gradients in each input's dtype."""
    x, w, b, rows, ids = _problem(torch.float32, bias=True)
    e = EPILOGUES["plain"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = support_log_probs(x.bfloat16(), w, b, e, Support(rows, 4, ids))
    logp = torch.log_softmax(_reference_logits(x.detach().bfloat16(), w.detach().bfloat16(),
                                               b.detach().bfloat16(), e), dim=-1)  # fmt: skip
    want_ids = torch.cat([logp.topk(4, dim=-1).indices, ids], dim=-1)
    assert torch.equal(got["ids"], torch.where(rows.unsqueeze(-1), want_ids, 0))
    got["log_probs"].sum().backward()
    # The gradient at the float32 head's logits of the rows the head saw (bf16), with the ids the forward chose.
    refs = [t.detach().double().requires_grad_() for t in (x.bfloat16(), w, b)]
    want = torch.log_softmax(_reference_logits(*refs, e), dim=-1).gather(-1, want_ids)
    torch.where(rows.unsqueeze(-1), want, 0.0).sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32
    # The rows' gradient is in their dtype (bf16), the head's in float32.
    torch.testing.assert_close(x.grad.double(), refs[0].grad, rtol=1e-2, atol=1e-3)
    for mine, ref in zip((w, b), refs[1:]):
        torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_materialised_fallback_equals_the_fused_fields() -> None:
    x, w, b, rows, ids = _problem(torch.float32, bias=True)
    e = EPILOGUES["softcap-temperature"]
    with torch.no_grad():
        fused = support_log_probs(x, w, b, e, Support(rows, 6, ids))
        logits = e["logit_softcapping"] * torch.tanh(torch.nn.functional.linear(x, w, b) / e["logit_softcapping"])
        fallback = materialised_support(logits, Support(rows, 6, ids), e["temperature"])
    assert torch.equal(fused["ids"], fallback["ids"])
    torch.testing.assert_close(fused["log_probs"], fallback["log_probs"], rtol=1e-6, atol=1e-6)


def test_only_given_ids_and_no_gradient_outside_autograd() -> None:
    """A teacher's call: the ids it is given, under ``no_grad``, no graph."""
    x, w, b, rows, ids = _problem(torch.float32, bias=True)
    with torch.no_grad():
        got = support_log_probs(x, w, b, EPILOGUES["plain"], Support(rows, 0, ids))
    assert got["ids"].shape == (B, T, 2) and got["log_probs"].grad_fn is None
    logp = torch.log_softmax(_reference_logits(x.detach(), w.detach(), b.detach(), EPILOGUES["plain"]), dim=-1)
    torch.testing.assert_close(got["log_probs"].double(), torch.where(rows.unsqueeze(-1), logp.gather(-1, ids), 0.0),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_rows_of_another_shape_are_refused() -> None:
    x, w, b, rows, _ = _problem(torch.float32, bias=False)
    with pytest.raises(ValueError, match=r"support rows: expected shape \(3, 5\)"):
        support_log_probs(x, w, b, EPILOGUES["plain"], Support(rows[:, :-1], 3))
