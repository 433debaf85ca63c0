"""Per-token outputs of a causal LM head, as TRL's fused head returns them, computed by logitless's op.

``fused_per_token`` is what a rewritten forward's ``hf_loss`` runs while ``logitless.integrations.trl`` captures
(the class's own epilogue, no logits); ``materialised_per_token`` computes the same fields exactly from a model's
own logits, for classes the rewriter refused or heads it cannot fuse. Both return
``{"log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"}`` shaped like TRL's
(``[B, T-1]``, or ``[B, T]`` with pre-shifted labels), zeros / False where the label is ignored, and ``None`` for a
field not asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from logitless.ops import linear_cross_entropy

__all__ = ["STATS_FIELDS", "fused_per_token", "materialised_per_token"]

STATS_FIELDS = ("entropy", "mean_logits", "log_sum_sq_probs", "is_top1")
# Rows of the entropy gradient's recompute per chunk: its float32 logits stay under this many bytes.
_ENTROPY_CHUNK_BYTES = 64 << 20


def _targets(labels: torch.Tensor, shift_labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _trim(t: torch.Tensor | None, shifted: bool) -> torch.Tensor | None:
    # Without pre-shifted labels the last position has no next token: TRL's fields are [B, T-1].
    return t[..., :-1] if t is not None and shifted else t


def fused_per_token(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    shift_labels: torch.Tensor | None,
    ignore_index: int,
    logits_bias: torch.Tensor | None,
    logit_scale_multiply: float | None,
    logit_scale_divide: float | None,
    logit_softcapping: float | None,
    temperature: float,
    outputs: frozenset[str],
    uniform_grad: bool = False,
) -> dict[str, Any]:
    """The fields from one pass of the op over ``x`` (the hidden states the head's linear layer would receive) and
    that layer's ``weight`` / ``bias``. ``uniform_grad``: the caller expects ``log_probs`` to be differentiated with
    one value at every counted position (the op's ``expect_uniform_grad``)."""
    epilogue = {
        "logits_bias": logits_bias,
        "logit_scale_multiply": logit_scale_multiply,
        "logit_scale_divide": logit_scale_divide,
        "logit_softcapping": logit_softcapping,
        "temperature": temperature,
    }
    want_stats = any(f in outputs for f in STATS_FIELDS)
    result = linear_cross_entropy(x, weight, labels, bias=bias, shift_labels=shift_labels,
                                  ignore_index=ignore_index, reduction="none", return_token_stats=want_stats,
                                  expect_uniform_grad=uniform_grad, **epilogue)  # fmt: skip
    nll, stats = result if want_stats else (result, None)
    mask = _targets(labels, shift_labels, ignore_index).to(x.device) != ignore_index
    fields: dict[str, Any] = {"log_probs": -nll, "label_mask": mask}
    for name in STATS_FIELDS:
        fields[name] = getattr(stats, name) if stats is not None and name in outputs else None
    differentiable = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if fields["entropy"] is not None and torch.is_grad_enabled() and differentiable:
        fields["entropy"] = _EntropyWithGradient.apply(fields["entropy"], x, weight, bias, mask, epilogue)
    shifted = shift_labels is None
    return {k: _trim(v, shifted) for k, v in fields.items()}


def _epilogue(z: torch.Tensor, e: dict[str, Any]) -> torch.Tensor:
    """The op's epilogue order (docs/spec.md §1.2) on float32 logits, differentiably."""
    if e["logits_bias"] is not None:
        z = z + e["logits_bias"].float()
    if e["logit_scale_multiply"]:
        z = z * float(e["logit_scale_multiply"])
    if e["logit_scale_divide"]:
        z = z / float(e["logit_scale_divide"])
    if e["logit_softcapping"]:
        c = float(e["logit_softcapping"])
        z = c * torch.tanh(z / c)
    if e["temperature"] and e["temperature"] != 1.0:
        z = z / float(e["temperature"])
    return z


class _EntropyWithGradient(torch.autograd.Function):
    """The kernel's entropy (no gradient of its own), given the exact gradient of ``Σ g_i·H_i`` by recomputing
    each chunk of rows' logits under autograd in backward (GRPO's entropy bonus differentiates it). Only the
    rows with a non-zero upstream gradient are recomputed; the head is upcast to float32 once per backward."""

    @staticmethod
    def forward(ctx: Any, entropy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                mask: torch.Tensor, epilogue: dict[str, Any]) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(x, weight, bias, mask)
        ctx.epilogue = epilogue
        return entropy.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, mask = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[1:4]
        if grad is None:
            return None, None, None, None, None, None
        rows_x = x.reshape(-1, x.shape[-1])
        g = (grad * mask).reshape(-1)
        idx = (g != 0).nonzero().squeeze(1)
        w32 = weight.detach().float().requires_grad_(need_w)
        b32 = bias.detach().float().requires_grad_(need_b) if bias is not None else None
        gx = torch.zeros_like(rows_x) if need_x else None
        gw = torch.zeros_like(w32) if need_w else None
        gb = torch.zeros_like(b32) if need_b and b32 is not None else None
        step = max(1, _ENTROPY_CHUNK_BYTES // max(1, weight.shape[0] * 4 * 3))
        for start in range(0, idx.numel(), step):
            rows = idx[start : start + step]
            xc = rows_x.index_select(0, rows).detach().float().requires_grad_(need_x)
            with torch.enable_grad():
                logp = torch.log_softmax(_epilogue(torch.nn.functional.linear(xc, w32, b32), ctx.epilogue), dim=-1)
                entropy = -(logp.exp() * logp).sum(-1)
                wanted = [t for t, need in ((xc, need_x), (w32, need_w), (b32, need_b)) if need and t is not None]
                got = iter(torch.autograd.grad(entropy, wanted, g.index_select(0, rows).float()))
            if need_x:
                gx.index_copy_(0, rows, next(got).to(gx.dtype))
            if need_w:
                gw += next(got)
            if gb is not None:
                gb += next(got)
        return (
            None,
            gx.reshape(x.shape) if gx is not None else None,
            gw.to(weight.dtype) if gw is not None else None,
            gb.to(bias.dtype) if gb is not None else None,
            None,
            None,
        )


def materialised_per_token(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift_labels: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    outputs: frozenset[str],
) -> dict[str, Any]:
    """The same fields, exactly, from the model's own (post-epilogue) logits: the fallback, as memory-hungry as
    stock."""
    targets = _targets(labels, shift_labels, ignore_index).to(logits.device)
    z = logits.float() / temperature
    if shift_labels is None:
        z, targets = z[..., :-1, :], targets[..., :-1]
    mask = targets != ignore_index
    logp = torch.log_softmax(z, dim=-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    fields: dict[str, Any] = {"log_probs": torch.where(mask, picked, zero), "label_mask": mask}
    compute = {
        "entropy": lambda: -(logp.exp() * logp).sum(-1),
        "mean_logits": lambda: z.detach().mean(-1),
        "log_sum_sq_probs": lambda: (2.0 * logp.detach()).logsumexp(-1),
        "is_top1": lambda: z.detach().argmax(-1) == targets,
    }
    for name in STATS_FIELDS:
        if name not in outputs:
            fields[name] = None
        elif name == "is_top1":
            fields[name] = compute[name]() & mask
        else:
            fields[name] = torch.where(mask, compute[name](), zero)
    return fields
