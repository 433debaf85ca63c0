"""Log-probabilities over a small per-position token support (each position's top-k tokens, and ids the caller
gives), from a head's input and parameters, chunk by chunk over rows: no ``[positions, V]`` logits kept.

TRL's top-k distillation losses (SDFT's default ``topk_logits`` mode) read a student's top-k log-probabilities with
gradients and a teacher's log-probabilities at those ids; the divergence over those few columns is theirs.
``support_log_probs`` is what a rewritten forward's head computes for them while a ``Support`` request is captured
(``logitless.hf``); ``materialised_support`` computes the same from a model's own logits (the fallback).

Precision follows the op's on CPU (docs/spec.md §1.3): the head's GEMM in the input dtype (bf16 logits rounded as
stock's head rounds them), the epilogue, temperature and softmax in float32. The gradient recomputes each chunk's
logits in backward (only rows with a non-zero upstream gradient): ``d logits = scatter(g) - (Σ g)·softmax``,
through the epilogue, then the two GEMMs in the input dtype, the weight's summed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from logitless.integrations._per_token import _epilogue

__all__ = ["Support", "materialised_support", "support_log_probs"]

# Scratch per chunk of rows: its float32 logits, log-softmax and gradient stay under this many bytes.
_CHUNK_BYTES = 256 << 20


@dataclass(frozen=True)
class Support:
    """Which log-probabilities a head's call computes: at the positions ``rows`` keeps (``[B, T]`` bool, the head's
    positions), each position's ``top_k`` most likely tokens (descending, as ``torch.topk`` orders them; 0: none),
    then the ids ``ids`` gives (``[B, T, e]``, or None)."""

    rows: torch.Tensor
    top_k: int = 0
    ids: torch.Tensor | None = None


def _rows_per_chunk(vocab: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, vocab * 4 * 3))


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, epilogue: dict[str, Any]) -> Any:
    """A chunk's logits as the model's head forms them (its dtype), then the epilogue and temperature in float32."""
    return _epilogue(torch.nn.functional.linear(x, weight, bias).float(), epilogue)


def support_log_probs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, epilogue: dict[str, Any], support: Support
) -> dict[str, torch.Tensor]:
    """``{"ids": [B, T, k + e] int64, "log_probs": [B, T, k + e] float32}`` (zeros where ``support.rows`` is False),
    ``log_probs`` differentiable with respect to ``x``, ``weight`` and ``bias``. ``epilogue``: ``_per_token``'s
    keys (``logits_bias``, the scales, the softcap, ``temperature``)."""
    if support.rows.shape != x.shape[:-1]:
        raise ValueError(f"support rows: expected shape {tuple(x.shape[:-1])} (the head's positions), got "
                         f"{tuple(support.rows.shape)}")  # fmt: skip
    index = support.rows.reshape(-1).nonzero().squeeze(1)
    rows = x.reshape(-1, x.shape[-1]).index_select(0, index)
    extra = support.ids.reshape(-1, support.ids.shape[-1]).index_select(0, index) if support.ids is not None else None
    width = support.top_k + (extra.shape[1] if extra is not None else 0)
    ids = torch.zeros(rows.shape[0], width, dtype=torch.long, device=x.device)
    picked = torch.zeros(rows.shape[0], width, dtype=torch.float32, device=x.device)
    step = _rows_per_chunk(weight.shape[0])
    with torch.no_grad():
        for start in range(0, rows.shape[0], step):
            z = _logits(rows[start : start + step], weight, bias, epilogue)
            # Ranked on the logits, as TRL ranks them (a log-softmax's rounding can tie distinct logits).
            parts = [z.topk(support.top_k, dim=-1).indices] if support.top_k else []
            logp = torch.log_softmax(z, dim=-1)
            if extra is not None:
                parts.append(extra[start : start + step].to(x.device))
            cols = torch.cat(parts, dim=1)
            ids[start : start + step] = cols
            picked[start : start + step] = logp.gather(1, cols)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, weight, bias)):
        picked = _Gathered.apply(picked, rows, weight, bias, ids, epilogue)
    full_ids = torch.zeros(support.rows.numel(), width, dtype=torch.long, device=x.device).index_copy(0, index, ids)
    full = torch.zeros(support.rows.numel(), width, dtype=torch.float32, device=x.device).index_copy(0, index, picked)
    shape = (*support.rows.shape, width)
    return {"ids": full_ids.reshape(shape), "log_probs": full.reshape(shape)}


class _Gathered(torch.autograd.Function):
    """The gathered log-probabilities (computed without a graph), given their exact gradient by recomputing each
    chunk's logits in backward."""

    @staticmethod
    def forward(ctx: Any, picked: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                ids: torch.Tensor, epilogue: dict[str, Any]) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(rows, weight, bias, ids)
        ctx.epilogue = epilogue
        return picked.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        rows, weight, bias, ids = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[1:4]
        if grad is None:
            return None, None, None, None, None, None
        live = (grad != 0).any(dim=1).nonzero().squeeze(1)
        gx = torch.zeros_like(rows) if need_x else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b and bias is not None else None
        step = _rows_per_chunk(weight.shape[0])
        for start in range(0, live.numel(), step):
            chunk = live[start : start + step]
            # In the head's dtype: rows from an autocast forward may be bf16 beside a float32 head (backward runs
            # outside autocast; these logits are then float32, a rounding closer than the forward's).
            x = rows.index_select(0, chunk).detach().to(weight.dtype)
            with torch.enable_grad():
                z = torch.nn.functional.linear(x, weight.detach(), bias.detach() if bias is not None else None)
                z32 = z.float().requires_grad_()
                picked = torch.log_softmax(_epilogue(z32, ctx.epilogue), dim=-1).gather(1, ids.index_select(0, chunk))
                (dz,) = torch.autograd.grad(picked, z32, grad.index_select(0, chunk).float())
            dz = dz.to(weight.dtype)
            if gx is not None:
                gx.index_copy_(0, chunk, (dz @ weight).to(gx.dtype))
            if gw is not None:
                gw += (dz.t() @ x).float()
            if gb is not None:
                gb += dz.float().sum(0)
        return (
            None,
            gx,
            gw.to(weight.dtype) if gw is not None else None,
            gb.to(bias.dtype) if gb is not None else None,
            None,
            None,
        )


def materialised_support(logits: torch.Tensor, support: Support, temperature: float) -> dict[str, torch.Tensor]:
    """The same fields, exactly, from a model's own (post-epilogue) logits ``[B, T, V]`` at the head's positions:
    the fallback, as memory-hungry as stock."""
    z = logits.float() / temperature
    parts = [z.topk(support.top_k, dim=-1).indices] if support.top_k else []
    logp = torch.log_softmax(z, dim=-1)
    if support.ids is not None:
        parts.append(support.ids.to(logits.device))
    ids = torch.cat(parts, dim=-1)
    kept = support.rows.to(logits.device).unsqueeze(-1)
    return {"ids": torch.where(kept, ids, 0), "log_probs": torch.where(kept, logp.gather(-1, ids), 0.0)}
