"""Python side of the Rust kernel binding: lays tensors out the way ``_core.fused_linear_cross_entropy`` takes them.

Tensors cross zero-copy as ``(data_ptr, shape, strides, dtype-name)``; the caller keeps them alive for the call.
Matrices may have any row stride but need unit column stride (a tensor without one is copied here). Output buffers
are allocated here, contiguous and uninitialised, and every element is written by the kernel.
"""

from __future__ import annotations

import torch

from logitless import _config, _core
from logitless._options import LossOptions
from logitless.torch_path import TOKEN_STATS, Result, weight_grad_mode

TensorView = tuple[int, tuple[int, ...], tuple[int, ...], str]


def _view(t: torch.Tensor) -> TensorView:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."))


def _unit_columns(m: torch.Tensor) -> torch.Tensor:
    """``m`` itself when its rows are unit-stride and do not overlap, else a contiguous copy."""
    rows, cols = m.shape
    if (cols <= 1 or m.stride(1) == 1) and (rows <= 1 or m.stride(0) >= cols):
        return m
    return m.contiguous()


# Every row block re-reads the head for its two GEMMs and, with a weight gradient, re-adds into the whole V×H weight
# gradient (or its float32 / split accumulator), so blocks must not be short. At 2048×1024×32000 (1/16 of the logits
# is 15.6 MiB there) with 16 -> 64 MiB: f32 2.32 -> 1.72 s (stock 1.85 s), f32 frozen head 1.46 -> 1.10 s, bf16
# frozen head 0.45 -> 0.36 s; bf16 accumulating 1.21-1.25 s with 31 MiB and 1.13 s with 62 MiB. At 8192×2048×128256
# (bf16), 36.5 s with 250 MiB and 37.1 s with 501 MiB: the 1/16 rule takes over there. A bf16/f16 weight gradient
# in `recompute` mode (the low-memory one, which adds into nothing) keeps the torch path's rule alone.
_MIN_CHUNK_MB = 64


def _budget(hidden: torch.Tensor, weight: torch.Tensor, low_memory: bool) -> int:
    # LOGITLESS_CHUNK_MB bounds both paths; unset, the torch path's rule (torch_path.chunk_budget_bytes) with the
    # kernel's own floor unless the caller chose the low-memory weight gradient.
    from logitless.torch_path import chunk_budget_bytes

    rows, dim = hidden.shape
    if low_memory:
        return chunk_budget_bytes(rows, weight.shape[0], dim)
    return chunk_budget_bytes(rows, weight.shape[0], dim, min_mb=_MIN_CHUNK_MB)


def fused_lce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    options: LossOptions,
    *,
    grad_scale: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    want_per_row: bool,
    need_d_hidden: bool,
    need_d_weight: bool,
    need_d_bias: bool,
    want_stats: bool = False,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
    need_low_rank: bool = False,
) -> Result:
    """Same contract as ``torch_path.fused_lce`` (CPU tensors; targets already validated; a ``low_rank`` term in
    float32, for float32 / bfloat16 / float16 inputs)."""
    hidden = _unit_columns(hidden)
    weight = _unit_columns(weight)
    bias = bias.contiguous() if bias is not None else None
    targets = targets.contiguous()
    n = hidden.shape[0]
    # The kernel writes every element of its outputs (zeros where nothing contributes), and mapping fresh pages
    # is cheaper when its own first write does it (with huge pages) than in a torch.zeros fill.
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype) if need_d_hidden else None
    d_weight = torch.empty(weight.shape, dtype=weight.dtype) if need_d_weight else None
    d_bias = torch.empty(weight.shape[0], dtype=hidden.dtype) if need_d_bias and bias is not None else None
    per_row = torch.empty(n, dtype=torch.float64) if want_per_row else None
    token_stats = torch.empty(n, TOKEN_STATS, dtype=torch.float64) if want_stats else None
    mode = weight_grad_mode()
    low_memory = d_weight is not None and weight.dtype in (torch.bfloat16, torch.float16) and mode == "recompute"
    epilogue = options.epilogue
    logits_bias = epilogue.logits_bias.contiguous() if epilogue.logits_bias is not None else None
    row_scale = row_scale.to(torch.float32).contiguous() if row_scale is not None else None
    low_a = low_b = d_low_a = d_low_b = None
    if low_rank is not None:
        low_a, low_b = (_unit_columns(t) for t in low_rank)
        if need_low_rank:
            d_low_a = torch.empty(low_a.shape, dtype=torch.float32)
            d_low_b = torch.empty(low_b.shape, dtype=torch.float32)

    loss_sum, count = _core.fused_linear_cross_entropy(
        _view(hidden),
        _view(weight),
        _view(bias) if bias is not None else None,
        _view(targets),
        ignore_index=options.ignore_index,
        label_smoothing=options.label_smoothing,
        z_loss=options.z_loss,
        logits_bias=_view(logits_bias) if logits_bias is not None else None,
        scale_multiply=epilogue.multiply,
        scale_divide=epilogue.divide,
        softcap=epilogue.softcap,
        temperature=epilogue.temperature,
        grad_scale=float(grad_scale) if grad_scale is not None else None,
        row_scale=_view(row_scale) if row_scale is not None else None,
        per_row_loss=_view(per_row) if per_row is not None else None,
        token_stats=_view(token_stats) if token_stats is not None else None,
        d_hidden=_view(d_hidden) if d_hidden is not None else None,
        d_weight=_view(d_weight) if d_weight is not None else None,
        d_bias=_view(d_bias) if d_bias is not None else None,
        chunk_budget_bytes=_budget(hidden, weight, low_memory),
        weight_grad=mode,
        # torch's intra-op thread count, which users and launchers set (torch.set_num_threads, OMP_NUM_THREADS).
        num_threads=torch.get_num_threads(),
        kernel_isa=_config.kernel_isa(),
        profile=_config.kernel_profile(),
        low_a=_view(low_a) if low_a is not None else None,
        low_b=_view(low_b) if low_b is not None else None,
        d_low_a=_view(d_low_a) if d_low_a is not None else None,
        d_low_b=_view(d_low_b) if d_low_b is not None else None,
    )
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return Result(
        loss_sum=torch.tensor(loss_sum, dtype=acc),
        count=torch.tensor(count, dtype=torch.int64),
        per_row=per_row.to(acc) if per_row is not None else None,
        token_stats=token_stats,
        d_hidden=d_hidden,
        d_weight=d_weight,
        d_bias=d_bias,
        d_low_a=d_low_a,
        d_low_b=d_low_b,
    )
