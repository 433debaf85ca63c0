"""Float64 references for the fused op's tests: the logits are materialised, the loss is stock transformers'.

Nothing here imports logitless: the references are independent of the code under test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss


@dataclass
class Ref:
    loss: torch.Tensor
    d_hidden: torch.Tensor | None
    d_weight: torch.Tensor | None
    d_bias: torch.Tensor | None
    d_low: tuple[torch.Tensor, torch.Tensor] | None = None  # the low-rank factors' gradients


def epilogue64(
    logits: torch.Tensor,
    *,
    logits_bias: torch.Tensor | None = None,
    logit_scale_multiply: float | None = None,
    logit_scale_divide: float | None = None,
    logit_softcapping: float | None = None,
) -> torch.Tensor:
    """What models write between lm_head and the loss (spec §1.2), in the order the spec fixes."""
    if logits_bias is not None:
        logits = logits + logits_bias.double()
    if logit_scale_multiply:
        logits = logits * logit_scale_multiply
    if logit_scale_divide:
        logits = logits / logit_scale_divide
    if logit_softcapping:
        logits = logit_softcapping * torch.tanh(logits / logit_softcapping)
    return logits


def divergence64(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Each position's divergence of the student's log-distribution ``log_s`` from the teacher's ``log_t`` (float64,
    over the last dimension) as TRL defines it: ``beta`` 0 the forward KL(t ‖ s), 1 the reverse KL(s ‖ t), between
    the generalized JSD against the mixture ``(1-β)·p_s + β·p_t``."""
    p_s, p_t = log_s.exp(), log_t.exp()
    if beta == 0.0:
        return (p_t * (log_t - log_s)).sum(-1)
    if beta == 1.0:
        return (p_s * (log_s - log_t)).sum(-1)
    log_m = torch.logaddexp(log_s + math.log(1 - beta), log_t + math.log(beta))
    return beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)


def shifted(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """HF's causal shift, written out: position t is scored against labels[..., t+1]; the last is ignored."""
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out


def reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    shift: bool = True,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale_multiply: float | None = None,
    logit_scale_divide: float | None = None,
    logit_softcapping: float | None = None,
    logits_bias: torch.Tensor | None = None,
    grad_output: torch.Tensor | float = 1.0,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Ref:
    """Loss and the gradients of ``sum(loss * grad_output)`` w.r.t. float64 copies of the inputs that require grad."""
    h = hidden.detach().double().requires_grad_(hidden.requires_grad)
    w = weight.detach().double().requires_grad_(weight.requires_grad)
    b = bias.detach().double().requires_grad_(bias.requires_grad) if bias is not None else None
    linear = F.linear(h, w, b)
    low = None
    if low_rank is not None:  # a LoRA adapter's term, x·Wᵀ + b + a·Bᵀ
        low = tuple(t.detach().double().requires_grad_(True) for t in low_rank)
        linear = linear + low[0] @ low[1].T
    logits = epilogue64(
        linear,
        logits_bias=logits_bias,
        logit_scale_multiply=logit_scale_multiply,
        logit_scale_divide=logit_scale_divide,
        logit_softcapping=logit_softcapping,
    )
    vocab = weight.shape[0]
    if shift_labels is not None:
        targets = shift_labels
    elif shift:
        targets = shifted(labels, ignore_index)
    else:
        targets = labels
    plain = reduction == "mean" and not label_smoothing and not z_loss
    if plain:
        # The stock loss itself, on float64 logits (it would return NaN for an all-ignored batch; spec says 0).
        if bool((targets != ignore_index).any()) or num_items_in_batch is not None:
            if shift_labels is None and not shift:
                loss = ForCausalLMLoss(
                    logits, None, vocab, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                    shift_labels=targets,
                )  # fmt: skip
            else:
                loss = ForCausalLMLoss(
                    logits, labels, vocab, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                    shift_labels=shift_labels,
                )  # fmt: skip
        else:
            loss = logits.sum() * 0.0
    else:
        # The per-token formula, written out (spec §1.1): (1-ε)·nll + ε·mean_j(-log p_j) + z·lse².
        z = logits.reshape(-1, vocab)
        t = targets.reshape(-1)
        keep = t != ignore_index
        safe_t = torch.where(keep, t, 0)
        logp = torch.log_softmax(z, dim=-1)
        lse = torch.logsumexp(z, dim=-1)
        nll = -logp.gather(1, safe_t[:, None])[:, 0]
        smooth = -logp.mean(dim=-1)
        per = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse * lse
        per = torch.where(keep, per, torch.zeros_like(per))
        if reduction == "none":
            loss = per.reshape(targets.shape)
        elif reduction == "sum":
            loss = per.sum()
        elif num_items_in_batch is not None:
            n = num_items_in_batch
            loss = per.sum() / (n.double() if isinstance(n, torch.Tensor) else float(n))
        else:
            loss = per.sum() / keep.sum().clamp(min=1)
    go = grad_output if isinstance(grad_output, torch.Tensor) else torch.tensor(float(grad_output))
    leaves = [x for x in (h, w, b, *(low or ())) if x is not None and x.requires_grad]
    grads = torch.autograd.grad((loss * go.double()).sum(), leaves, allow_unused=True) if leaves else []
    it = iter(grads)
    return Ref(
        loss=loss.detach(),
        d_hidden=next(it) if h.requires_grad else None,
        d_weight=next(it) if w.requires_grad else None,
        d_bias=next(it) if b is not None and b.requires_grad else None,
        d_low=(next(it), next(it)) if low is not None else None,
    )


# Tolerances for comparing against the float64 reference, by input dtype: (loss, gradient) as fractions of the
# reference's scale. bf16/f16 inputs have their logits and gradients rounded to 8 / 11 mantissa bits.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (3e-3, 4e-3),
    torch.bfloat16: (2e-2, 3e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Elementwise |a - e| <= tol · max|e| (tol when e is all zero)."""
    a = actual.detach().double()
    e = expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = float(e.abs().max()) if e.numel() else 1.0
    scale = scale if scale > 0 else 1.0
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol * scale:.3g}"
