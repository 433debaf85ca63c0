"""The fused loss of a head split over the vocabulary (tensor parallel): each rank holds rows
``[start, start + V_local)`` of the head and the same hidden states; no rank forms more than a chunk of its own
shard's logits.

Per chunk of rows, one pass over the local shard, with the chunk's logits held throughout:

1. the row max, all-reduced (MAX) over the group: the global max;
2. ``Σ exp(z - max)`` (the logits become ``exp(z - max)`` in place), the target's logit (on the rank that owns it)
   and, with label smoothing, ``Σ z``: one SUM all-reduce of the three gives every rank the chunk's global
   log-sum-exp and the loss of each row;
3. ``d loss / d logits`` from the kept exponentials over the global sum; ``d_weight`` (and ``d_bias``) stay local,
   each rank's ``d_hidden`` is its shard's part, summed over the group (float32) once after the last chunk.

Three matmuls' worth of work, as the single-device op (the normaliser a chunk needs is complete after its two small
all-reduces), so every rank must run the same chunks: their size comes from the vocabulary and the group size, not
the rank's own shard. Same maths and epilogue as the torch path (``torch_path``), whose helpers it uses; the loss
is identical on every rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from logitless import _options, ops, torch_path
from logitless._options import LossOptions

__all__ = ["vocab_parallel_linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum")
_IMPLS = ("auto", "torch", "triton")


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    vocab_start: int,
    vocab_size: int,
    group: dist.ProcessGroup | None = None,
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
    impl: str = "auto",
) -> torch.Tensor:
    """``logitless.linear_cross_entropy`` over a ``vocab_size``-row head of which this rank holds ``weight`` (rows
    ``[vocab_start, vocab_start + weight.shape[0])``, ``bias`` likewise); every rank of ``group`` calls it with the
    same ``hidden`` and labels. Labels are global token ids; ``logits_bias`` covers the whole vocabulary.

    Returns the same loss on every rank. Gradients: ``weight`` / ``bias`` receive their shard's gradient, ``hidden``
    the full gradient (summed over the group), as a replicated input of a colwise-parallel ``nn.Linear`` does.
    ``impl``: ``"auto"`` (the Triton kernels on CUDA when Triton imports, torch ops otherwise), ``"torch"`` or
    ``"triton"``; there is no Rust kernel for a vocabulary shard.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS} (vocab parallel), got {impl!r}")
    hidden, weight, bias = ops._checked_tensors(hidden, weight, bias, rows="V_local")
    local = weight.shape[0]
    if not (0 <= vocab_start and vocab_start + local <= vocab_size):
        raise ValueError(
            f"vocab_start: expected the shard [{vocab_start}, {vocab_start + local}) inside [0, {vocab_size})"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS} (vocab parallel), got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError('num_items_in_batch: only meaningful with reduction="mean" (sum / num_items_in_batch)')
    options = _options.parse(
        device=hidden.device,
        vocab=vocab_size,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_scale_multiply=logit_scale_multiply,
        logit_scale_divide=logit_scale_divide,
        logit_softcapping=logit_softcapping,
        logits_bias=logits_bias,
        impl=impl,
    )
    if options.impl == "rust":  # "auto" on CPU
        options = dataclasses.replace(options, impl="torch")
    targets = ops._targets(hidden, labels, shift, shift_labels, options.ignore_index, hidden.device)
    rows = math.prod(hidden.shape[:-1])
    shard = _Shard(group=group, start=vocab_start, total=vocab_size)
    loss: torch.Tensor = _VocabParallel.apply(
        hidden.reshape(rows, hidden.shape[-1]),
        weight,
        bias,
        targets.reshape(rows),
        ops._num_items(num_items_in_batch, hidden),
        options,
        shard,
        reduction,
    )
    return loss


@dataclass(frozen=True)
class _Shard:
    group: dist.ProcessGroup | None
    start: int
    total: int


@dataclass
class _Chunk:
    h: torch.Tensor
    t: torch.Tensor  # global targets (0 where masked)
    mask: torch.Tensor | None  # None when ignored rows were dropped (CPU)
    rows: torch_path.RowChunk  # where they are in the call


def _compact(device: torch.device) -> bool:
    """Drop ignored rows with a host-side index (free on CPU), or sort them behind the scored ones on the device."""
    return device.type == "cpu"


def _chunks(hidden: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, rows_per_chunk: int) -> Iterator[_Chunk]:
    """The scored rows in chunks as ``torch_path.fused_lce`` takes them (``torch_path.RowChunks``), the same on every
    rank (their labels are)."""
    for c in torch_path.RowChunks(valid, rows_per_chunk, compact=_compact(hidden.device)):
        t = c.take(targets)
        if c.mask is not None:
            t = torch.where(c.mask, t, 0)
        yield _Chunk(c.take(hidden), t, c.mask, c)


def _shard_logits(
    c: _Chunk, weight: torch.Tensor, bias: torch.Tensor | None, options: LossOptions, cols: slice, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    z = torch_path._logits(c.h, weight, bias, acc)
    return torch_path._epilogue_forward(z, options.epilogue, acc, cols)


class _VocabParallel(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        num_items: torch.Tensor | None,
        options: LossOptions,
        shard: _Shard,
        reduction: str,
    ) -> torch.Tensor:
        n, h_dim = hidden.shape
        local = weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        dev = hidden.device
        eps, zl, ignore = options.label_smoothing, options.z_loss, options.ignore_index
        cols = slice(shard.start, shard.start + local)
        valid = targets != ignore
        count_host = None
        if dev.type == "cpu":
            count_host = ops._check_targets_cpu(targets, shard.total, ignore)
        else:
            bad = (valid & ((targets < 0) | (targets >= shard.total))).any()
            torch._assert_async(~bad, "logitless: a target is outside [0, vocab) and is not ignore_index")
        # Every rank must run the same chunks (each chunk is a pair of collectives): size them from a shard width
        # all ranks compute alike, not from this rank's own (an uneven split differs by a row).
        width = max(1, -(-shard.total // dist.get_world_size(shard.group)))
        budget = torch_path.chunk_budget_bytes(n, width, h_dim, low_precision_weight_grad=weight.dtype != acc)
        rows_per_chunk = max(1, budget // (width * 3 * torch.finfo(acc).bits // 8))

        count = valid.sum()
        if reduction == "mean":
            if num_items is not None:
                normaliser = ops._checked_num_items(num_items.to(dev, acc), count_host, targets, ignore)
            else:
                normaliser = count.clamp(min=1).to(acc)
        else:
            normaliser = torch.ones((), dtype=acc, device=dev)
        scale = normaliser.reciprocal()

        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        d_hidden = torch.zeros(n, h_dim, dtype=acc, device=dev) if need_dh else None
        d_weight = torch.zeros(local, h_dim, dtype=acc, device=dev) if need_dw else None
        d_bias = torch.zeros(local, dtype=acc, device=dev) if need_db else None
        loss_sum = torch.zeros((), dtype=acc, device=dev)
        kernels = options.impl == "triton" and acc == torch.float32 and local > 0
        if kernels:
            from logitless import triton_path  # imports triton: only when its kernels are wanted
        # With the kernels on CUDA the gradient is written straight in the GEMMs' dtype (as in torch_path).
        low_precision_grad = kernels and dev.type == "cuda" and hidden.dtype != acc and not need_db
        for c in _chunks(hidden, targets, valid, rows_per_chunk):
            rows = c.h.shape[0]
            mine = (c.t >= cols.start) & (c.t < cols.stop)
            z = capped = None
            stats = torch.zeros(3, rows, dtype=acc, device=dev)  # Σ exp(z - max), the target's logit, Σ z
            if kernels:
                # One read of the shard's logits for its log-sum-exp, target logit and Σz; the two all-reduces
                # combine the shards' log-sum-exps (MAX, then SUM of exp(lse - max)).
                z = torch_path._logits(c.h, weight, bias, acc)
                lse_local, stats[1], stats[2] = triton_path.shard_pass(
                    z, torch.where(mine, c.t - cols.start, -1), options, v0=cols.start
                )
                row_max = lse_local.clone()
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=shard.group)
                stats[0] = torch.exp(lse_local - row_max)
            else:
                if local:
                    z, capped = _shard_logits(c, weight, bias, options, cols, acc)
                    row_max = z.max(dim=1).values
                else:
                    row_max = torch.full((rows,), -math.inf, dtype=acc, device=dev)
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=shard.group)
                if z is not None:
                    col = (c.t - cols.start).clamp(0, local - 1).unsqueeze(1)
                    stats[1] = torch.where(mine, z.gather(1, col).squeeze(1), 0.0)
                    if eps:
                        stats[2] = z.sum(dim=1)
                    z.sub_(row_max.unsqueeze(1)).exp_()  # kept: over the global Σ it is the gradient's p
                    stats[0] = z.sum(dim=1)
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=shard.group)
            lse = row_max + stats[0].log()
            loss_rows = (1.0 - eps) * (lse - stats[1]) + zl * lse * lse
            if eps:
                loss_rows = loss_rows + eps * (lse - stats[2] / shard.total)
            if c.mask is not None:
                loss_rows = torch.where(c.mask, loss_rows, 0.0)
            loss_sum += loss_rows.sum()
            if z is None or not (need_dh or need_dw or need_db):
                continue
            s = scale.expand(rows) if c.mask is None else scale * c.mask
            g: torch.Tensor | None
            if kernels:
                g = triton_path.slab_pass(
                    z, c.t, lse, s, options, v0=cols.start, vocab=shard.total,
                    grad_dtype=hidden.dtype if low_precision_grad else None,
                )  # fmt: skip
            else:
                g = z.mul_(stats[0].reciprocal().unsqueeze(1))
                if zl:
                    g *= (1.0 + 2.0 * zl * lse).unsqueeze(1)
                if eps:
                    g -= eps / shard.total
                g.scatter_add_(1, col, torch.where(mine, eps - 1.0, 0.0).to(acc).unsqueeze(1))
                g *= s.unsqueeze(1)
                torch_path._epilogue_backward(g, capped, options.epilogue)
            if g.dtype == acc:
                g_lp = g.to(hidden.dtype)
            else:  # rounded by the kernel already
                g_lp, g = g, None
            if d_hidden is not None:
                c.rows.put(d_hidden, torch_path._mm(g_lp, weight, acc))
            if d_weight is not None:
                torch_path._add_mm(d_weight, g, g_lp, c.h)
            if d_bias is not None:
                assert g is not None
                d_bias += g.sum(dim=0)
        if d_hidden is not None:
            # Each shard contributes its part of d_hidden; summed in float32, as every rank needs all of it.
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=shard.group)
        loss = torch.where(count == 0, 0.0, loss_sum / normaliser).to(acc)
        ctx.save_for_backward(
            d_hidden.to(hidden.dtype) if d_hidden is not None else None,
            d_weight.to(weight.dtype) if d_weight is not None else None,
            d_bias.to(bias.dtype) if d_bias is not None and bias is not None else None,
        )
        return loss

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        d_hidden, d_weight, d_bias = ctx.saved_tensors

        def scaled(g: torch.Tensor | None) -> torch.Tensor | None:
            return None if g is None else g * grad_loss

        return scaled(d_hidden), scaled(d_weight), scaled(d_bias), None, None, None, None, None
