"""Triton kernels for the elementwise work of the fused op on GPUs (``impl="triton"``).

The chunk loop, the GEMMs (torch, so cuBLAS) and both weight-gradient modes are ``torch_path.fused_lce``'s; this
module replaces its row pass (about ten float32 passes of torch ops over each chunk's logits) by one program per
row that reads the row twice and writes it once:

1. online max / Σexp over vocabulary blocks with every epilogue step applied on the fly (logits bias, scale
   multiply / divide, softcap, temperature), the target's logit, Σz (label smoothing) and the first argmax;
   the loss (label smoothing, z-loss) and log-sum-exp of the row;
2. (token statistics only) entropy and log Σp² against the known max;
3. the logits gradient ``s·(p·(1 + 2·z_loss·lse) - ε/V - (1-ε)·[j = t])`` through the epilogue's derivative,
   written over the logits in place, or (``grad_dtype``) rounded once into a bf16/f16 buffer for the GEMMs.

``slab_pass`` is step 3 alone on a vocabulary slab, from a row's saved log-sum-exp (the ``recompute`` mode).
A chunk of fewer rows than the GPU runs programs at once splits each row into parts (steps 1 and 3 per part, one
combining program per row between them). ``scale_`` is backward's in-place scaling of the saved gradients;
``rows`` forms the call's per-row inputs (target, gradient weight, the scored count, the chunks' scored-first
order) in one program, where torch ops take about fifteen launches.

Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, read by Triton
when the kernels are decorated, i.e. when this module is first imported): the tests use that. ``tanh`` is
``2·sigmoid(2x) - 1`` (the interpreter has no ``libdevice.tanh``); float64 inputs use the torch row pass.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from logitless import _options, torch_path
from logitless._options import LossOptions

__all__ = ["row_pass", "rows", "scale_", "shard_pass", "slab_pass"]

_BLOCK = 1024
# Explicit, so the result does not change with Triton's default (3.9 warns that it will flip in 3.10) and users see
# no warning from us; tests/_triton_aot.py compiles with the same options.
_COMPILE = {"enable_fp_fusion": True}
# What the kernels read in float32 (as torch's ``.to(torch.float32)`` does): anything else takes the torch ops.
_LOADED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _epilogue(y, cols, in_row, lb_ptr, k, cap, inv_t, HAS_LB: tl.constexpr, HAS_CAP: tl.constexpr):
    """Post-epilogue logits of a block, and ``tanh`` (softcap) for the derivative."""
    z = y
    if HAS_LB:
        z = z + tl.load(lb_ptr + cols, mask=in_row, other=0.0)
    z = z * k
    th = z * 0.0
    if HAS_CAP:
        th = _tanh(z / cap)
        z = th * cap
    z = z * inv_t
    return z, th


@triton.jit
def _gradient(z, th, cols, t, lse, s, k, inv_t, eps, z_loss, V, HAS_CAP: tl.constexpr):
    """``d(s·l)/dy`` of a block from its post-epilogue logits ``z``."""
    p = tl.exp(z - lse)
    g = s * (p * (1.0 + 2.0 * z_loss * lse) - eps / V)
    g = g - tl.where(cols == t, s * (1.0 - eps), 0.0)
    g = g * inv_t
    if HAS_CAP:
        g = g * (1.0 - th * th)
    return g * k


@triton.jit
def _block(base, w0, W, v_start, lb_ptr, k, cap, inv_t, HAS_LB: tl.constexpr, HAS_CAP: tl.constexpr,
           BLOCK: tl.constexpr):  # fmt: skip
    """Block ``w0`` of a row of ``W`` logits (vocabulary columns from ``v_start``): its offsets in the row, its
    columns, which are in the row, and its post-epilogue logits with ``tanh`` (softcap)."""
    local = w0 + tl.arange(0, BLOCK)
    in_row = local < W
    cols = v_start + local
    y = tl.load(base + local, mask=in_row, other=0.0)
    z, th = _epilogue(y, cols, in_row, lb_ptr, k, cap, inv_t, HAS_LB, HAS_CAP)
    return local, cols, in_row, z, th


@triton.jit
def _write_gradient(
    base, g_base, W, v_start, t, lse, s, lb_ptr, k, cap, inv_t, eps, z_loss, V,
    HAS_LB: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr, ALIASED: tl.constexpr,
):  # fmt: skip
    """A row's logits gradient from its log-sum-exp, over the float32 logits, or rounded once into the GEMMs'
    dtype (one fewer pass over the chunk). ``ALIASED``: that rounded gradient is written over the first half of the
    row's own float32 logits (``aliased_gradient``): block j's 2-byte values land on float32 elements [j/2, ...),
    which the program has read already; the barrier makes every thread's loads of a block precede any store of it,
    so no thread overwrites logits another has still to read."""
    for w0 in range(0, W, BLOCK):
        local, cols, in_row, z, th = _block(base, w0, W, v_start, lb_ptr, k, cap, inv_t, HAS_LB, HAS_CAP, BLOCK)
        g = _gradient(z, th, cols, t, lse, s, k, inv_t, eps, z_loss, V, HAS_CAP)
        if ALIASED:
            tl.debug_barrier()
        tl.store(g_base + local, g.to(g_base.dtype.element_ty), mask=in_row)


@triton.jit
def _loss(lse, z_t, z_sum, V, eps, z_loss):
    """A row's loss; the smoothing term only with smoothing (Σz is -inf where a logits bias masks columns)."""
    smooth = tl.where(eps != 0.0, eps * (lse - z_sum / V), 0.0)
    return (1.0 - eps) * (lse - z_t) + smooth + z_loss * lse * lse


@triton.jit
def _stats_step(m, sum_exp, z_sum, z_t, z, cols, in_row, t, block_max):
    """A row's running max, Σexp(z - max), Σz and target logit after one more block (``z`` is -inf outside the
    row); a block of -inf logits (a logits bias that masks columns) leaves the first two as they were, not NaN."""
    m_new = tl.maximum(m, block_max)
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    sum_exp = sum_exp * tl.exp(m - safe) + tl.sum(tl.exp(z - safe), axis=0)
    z_sum += tl.sum(tl.where(in_row, z, 0.0), axis=0)
    z_t += tl.sum(tl.where(cols == t, z, 0.0), axis=0)
    return m_new, sum_exp, z_sum, z_t


@triton.jit
def _row_kernel(
    y_ptr, stride, t_ptr, s_ptr, lb_ptr, loss_ptr, lse_ptr, stats_ptr, g_ptr, g_stride, parts_ptr,
    V, k, cap, inv_t, eps, z_loss,
    HAS_LB: tl.constexpr, HAS_CAP: tl.constexpr, GRAD: tl.constexpr, STATS: tl.constexpr, PARTS: tl.constexpr,
    BLOCK: tl.constexpr, ALIASED: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = y_ptr + row * stride
    t = tl.load(t_ptr + row)
    m = float("-inf")
    sum_exp = 0.0
    z_sum = 0.0
    z_t = 0.0
    top = 0
    for v0 in range(0, V, BLOCK):
        _, cols, in_row, z, _ = _block(base, v0, V, 0, lb_ptr, k, cap, inv_t, HAS_LB, HAS_CAP, BLOCK)
        z = tl.where(in_row, z, float("-inf"))
        block_max = tl.max(z, axis=0)
        # Ties go to the lowest index: a later block must be strictly greater.
        top = tl.where(block_max > m, v0 + tl.argmax(z, axis=0), top)
        m, sum_exp, z_sum, z_t = _stats_step(m, sum_exp, z_sum, z_t, z, cols, in_row, t, block_max)
    lse = m + tl.log(sum_exp)
    loss = _loss(lse, z_t, z_sum, V, eps, z_loss)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if PARTS:  # a vocabulary shard's share of the row, for the vocabulary-parallel loss
        tl.store(parts_ptr + row * 2, z_t)
        tl.store(parts_ptr + row * 2 + 1, z_sum)
    if STATS:
        weighted = 0.0
        sum_sq = 0.0
        for v0 in range(0, V, BLOCK):
            _, _, in_row, z, _ = _block(base, v0, V, 0, lb_ptr, k, cap, inv_t, HAS_LB, HAS_CAP, BLOCK)
            d = tl.where(in_row, z - m, 0.0)
            e = tl.where(in_row, tl.exp(d), 0.0)
            weighted += tl.sum(e * d, axis=0)
            sum_sq += tl.sum(e * e, axis=0)
        log_sum = tl.log(sum_exp)
        tl.store(stats_ptr + row * 4, log_sum - weighted / sum_exp)
        tl.store(stats_ptr + row * 4 + 1, z_sum / V)
        tl.store(stats_ptr + row * 4 + 2, tl.log(sum_sq) - 2.0 * log_sum)
        tl.store(stats_ptr + row * 4 + 3, tl.where(top == t, 1.0, 0.0))
    if GRAD:
        s = tl.load(s_ptr + row)
        _write_gradient(base, g_ptr + row * g_stride, V, 0, t, lse, s, lb_ptr, k, cap, inv_t, eps, z_loss, V,
                        HAS_LB, HAS_CAP, BLOCK, ALIASED)  # fmt: skip


@triton.jit
def _slab_kernel(
    y_ptr, stride, t_ptr, s_ptr, lse_ptr, lb_ptr, g_ptr, g_stride,
    W, v_start, V, k, cap, inv_t, eps, z_loss,
    HAS_LB: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr, ALIASED: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    _write_gradient(
        y_ptr + row * stride, g_ptr + row * g_stride, W, v_start, tl.load(t_ptr + row), tl.load(lse_ptr + row),
        tl.load(s_ptr + row), lb_ptr, k, cap, inv_t, eps, z_loss, V, HAS_LB, HAS_CAP, BLOCK, ALIASED,
    )  # fmt: skip


@triton.jit
def _scale_range(x_ptr, n, s, BLOCK: tl.constexpr):
    # A bounded grid strides its blocks over the tensor: the launch stays a few thousand programs long.
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside)
        tl.store(x_ptr + offs, (x.to(tl.float32) * s).to(x_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _scale_kernel(a_ptr, na, b_ptr, nb, c_ptr, nc, s_ptr, BLOCK: tl.constexpr):
    # Up to three tensors in one launch (backward's gradients; an unused slot has n = 0). The factor is read on the
    # device: when it is 1 (a plain ``loss.backward()``) nothing is read or written.
    s = tl.load(s_ptr)
    if s != 1.0:
        _scale_range(a_ptr, na, s, BLOCK)
        _scale_range(b_ptr, nb, s, BLOCK)
        _scale_range(c_ptr, nc, s, BLOCK)


_SCALE_BLOCK = 1024
_SCALE_MAX_PROGRAMS = 4096
_SCALE_SLOTS = 3


def scale_(xs: Sequence[torch.Tensor], factor: torch.Tensor) -> bool:
    """``x *= factor`` in place for each contiguous bf16 / f16 / float32 ``x`` of ``xs``, in one launch per three,
    for a 0-d float32 ``factor`` on their device, the product formed in float32 as torch's ``x * factor`` forms
    it; free when ``factor`` is 1. False (nothing done) where it does not apply to all of them or the kernel fails:
    the caller multiplies with torch."""
    xs = [x for x in xs if x.numel()]
    ok = factor.dtype == torch.float32 and factor.numel() == 1 and not _broken and all(
        type(x) is torch.Tensor  # a tensor subclass (DTensor) holds no plain memory to launch on
        and x.dtype in _LOADED_DTYPES
        and x.device == factor.device
        and x.is_contiguous()
        for x in xs
    )  # fmt: skip
    if not ok:
        return False
    try:
        for first in range(0, len(xs), _SCALE_SLOTS):
            group = xs[first : first + _SCALE_SLOTS]
            slots = [(x, x.numel()) for x in group] + [(group[0], 0)] * (_SCALE_SLOTS - len(group))
            programs = min(triton.cdiv(max(x.numel() for x in group), _SCALE_BLOCK), _SCALE_MAX_PROGRAMS)
            with _on(factor.device):
                _scale_kernel[(programs,)](
                    *(arg for slot in slots for arg in slot), factor, BLOCK=_SCALE_BLOCK, **_COMPILE
                )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - a compile / launch failure of this kernel, not of the maths
        _fallback(error)
        return False
    return True


@triton.jit
def _split_stats_kernel(
    y_ptr, stride, t_ptr, lb_ptr, parts_ptr, V, span, k, cap, inv_t,
    HAS_LB: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Part ``program_id(1)`` of a row (``span`` columns): its max, Σexp(z - max), Σz and the target's logit."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    c0 = part * span
    width = tl.minimum(span, V - c0)
    base = y_ptr + row * stride + c0
    t = tl.load(t_ptr + row)
    m = float("-inf")
    sum_exp = 0.0
    z_sum = 0.0
    z_t = 0.0
    for w0 in range(0, width, BLOCK):
        _, cols, in_row, z, _ = _block(base, w0, width, c0, lb_ptr, k, cap, inv_t, HAS_LB, HAS_CAP, BLOCK)
        z = tl.where(in_row, z, float("-inf"))
        m, sum_exp, z_sum, z_t = _stats_step(m, sum_exp, z_sum, z_t, z, cols, in_row, t, tl.max(z, axis=0))
    out = parts_ptr + (row * tl.num_programs(1) + part) * 4
    tl.store(out, m)
    tl.store(out + 1, sum_exp)
    tl.store(out + 2, z_sum)
    tl.store(out + 3, z_t)


@triton.jit
def _split_combine_kernel(parts_ptr, loss_ptr, lse_ptr, parts, V, eps, z_loss, PARTS: tl.constexpr):
    """A row's log-sum-exp and loss from its parts (``PARTS``: a power of two at least ``parts``)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, PARTS)
    used = offs < parts
    base = parts_ptr + (row * parts + offs) * 4
    m = tl.load(base, mask=used, other=float("-inf"))
    top = tl.max(m, axis=0)
    safe = tl.where(top == float("-inf"), 0.0, top)
    sum_exp = tl.sum(tl.load(base + 1, mask=used, other=0.0) * tl.exp(m - safe), axis=0)
    z_sum = tl.sum(tl.load(base + 2, mask=used, other=0.0), axis=0)
    z_t = tl.sum(tl.load(base + 3, mask=used, other=0.0), axis=0)
    lse = top + tl.log(sum_exp)
    tl.store(loss_ptr + row, _loss(lse, z_t, z_sum, V, eps, z_loss))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _split_grad_kernel(
    y_ptr, stride, t_ptr, s_ptr, lse_ptr, lb_ptr, g_ptr, g_stride, V, span, k, cap, inv_t, eps, z_loss,
    HAS_LB: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * span
    _write_gradient(
        y_ptr + row * stride + c0, g_ptr + row * g_stride + c0, tl.minimum(span, V - c0), c0, tl.load(t_ptr + row),
        tl.load(lse_ptr + row), tl.load(s_ptr + row), lb_ptr, k, cap, inv_t, eps, z_loss, V, HAS_LB, HAS_CAP, BLOCK,
        False,  # parts of a row run in parallel: part p's stores would land on logits part p / 2 is reading
    )  # fmt: skip


# A chunk of few rows and a long vocabulary (the recompute mode's 384-row chunks at V = 128256) would be a few
# hundred programs looping over whole rows: a few per multiprocessor, a fraction of the memory bandwidth. A chunk
# with fewer rows than half the programs wanted (this many per multiprocessor) has its rows split into parts of
# whole blocks, enough for all of them (a 1024-row chunk on 132 multiprocessors is not split: 7.8 programs each).
_PROGRAMS_PER_SM = 8
_MAX_PARTS = 64
# Under the interpreter (tests) there is no multiprocessor count: the programs wanted, 0 for no split.
_INTERPRETED_PROGRAMS = 0


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _parts(rows: int, v: int, device: torch.device) -> int:
    """How many parts each row's columns are split into (1: one program per row)."""
    if device.type == "cuda":
        wanted = _PROGRAMS_PER_SM * _multiprocessors(device.index if device.index is not None else 0)
    else:
        wanted = _INTERPRETED_PROGRAMS
    if 2 * rows >= wanted:  # at least half the programs wanted: a split's extra launches and reads buy little
        return 1
    return max(1, min(triton.cdiv(wanted, max(rows, 1)), triton.cdiv(v, _BLOCK), _MAX_PARTS))


def _split_row_pass(
    y: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, options: LossOptions, g: torch.Tensor | None,
    lb: torch.Tensor, parts: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``row_pass`` for rows split into ``parts``: statistics per part, one combining program per row, then the
    gradient per part (three launches instead of one). Returns (loss, lse)."""
    rows, v = y.shape
    k, cap, inv_t, has_lb, has_cap = _constants(options)
    span = triton.cdiv(triton.cdiv(v, parts), _BLOCK) * _BLOCK
    parts = triton.cdiv(v, span)
    stats = torch.empty(rows, parts, 4, dtype=torch.float32, device=y.device)
    loss = torch.empty(rows, dtype=torch.float32, device=y.device)
    lse = torch.empty_like(loss)
    _split_stats_kernel[(rows, parts)](
        y, y.stride(0), t, lb, stats, v, span, k, cap, inv_t, HAS_LB=has_lb, HAS_CAP=has_cap, BLOCK=_BLOCK,
        **_COMPILE,
    )  # fmt: skip
    _split_combine_kernel[(rows,)](
        stats, loss, lse, parts, v, options.label_smoothing, options.z_loss, PARTS=triton.next_power_of_2(parts),
        **_COMPILE,
    )  # fmt: skip
    if g is not None:
        _split_grad_kernel[(rows, parts)](
            y, y.stride(0), t, scale, lse, lb, g, g.stride(0), v, span, k, cap, inv_t, options.label_smoothing,
            options.z_loss, HAS_LB=has_lb, HAS_CAP=has_cap, BLOCK=_BLOCK, **_COMPILE,
        )  # fmt: skip
    return loss, lse


def _on(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Triton launches on the *current* CUDA device and its stream: a head on another GPU than the current one (a
    model split over GPUs with ``device_map="auto"``) must be launched from its own device's context, or the kernel
    runs on the wrong device, unordered with the torch ops around it."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _constants(options: LossOptions) -> tuple[float, float, float, bool, bool]:
    e = options.epilogue
    k = (e.multiply or 1.0) / (e.divide or 1.0)
    return k, e.softcap or 1.0, 1.0 / (e.temperature or 1.0), e.logits_bias is not None, e.softcap is not None


_broken: list[BaseException] = []


def _fallback(error: BaseException) -> None:
    """A kernel that does not compile on this GPU / Triton: the torch row pass from then on, said once. Under the
    interpreter (tests) a failure is an error: a test must never pass on the fallback."""
    if _options.triton_interpreted():
        raise error
    if not _broken:
        warnings.warn(
            f"logitless: the Triton row kernel failed ({type(error).__name__}: {error}); using the torch path",
            RuntimeWarning,
            stacklevel=3,
        )
    _broken.append(error)


# A row's bf16 / f16 gradient fits in the first half of its own float32 logits (2·W of 4·W bytes): written there,
# a chunk needs no second buffer (a third of its scratch: 501 of 1503 MiB per 2048-row chunk at V = 128256). Exact
# under the interpreter, where a program runs its blocks in order; on a GPU it rests on the barrier in
# _write_gradient, so it stays off there until a device run (bench/cuda_compare.py: aliased gradients bitwise equal
# to separate ones, tests/test_cuda.py) has checked it on real hardware.
_ALIAS_ON_CUDA = False


def _aliasing_on(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and _ALIAS_ON_CUDA)  # CPU: the interpreter


def gradient_over_logits(device: torch.device) -> bool:
    """Whether the passes on ``device`` write a rounded gradient over its own float32 logits (``aliased_gradient``).
    Not once the kernels have fallen back to torch ops, which write it apart."""
    return not _broken and _aliasing_on(device)


def aliased_gradient(y: torch.Tensor, grad_dtype: torch.dtype | None) -> torch.Tensor | None:
    """The view of the float32 ``y``'s storage that its rows' rounded gradient is written into (``y``'s shape, row
    stride twice its width; the GEMMs read it as it is), or None where the gradient needs a buffer of its own."""
    if grad_dtype not in (torch.bfloat16, torch.float16) or y.dtype != torch.float32 or not y.is_contiguous():
        return None
    if not _aliasing_on(y.device):
        return None
    return y.view(grad_dtype)[:, : y.shape[1]]


@triton.jit
def _rows_kernel(
    t_ptr, w_ptr, w_stride, valid_ptr, order_ptr, t_out_ptr, s_out_ptr, count_ptr, ok_ptr, N, V, ignore,
    WEIGHTED: tl.constexpr, MEAN: tl.constexpr, SORT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program, two sweeps over the targets: the scored count first (the mean's 1/count and the ignored rows'
    # place after the scored ones need it), then each row's outputs written at its place in the order.
    count = 0
    bad = 0
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        t = tl.load(t_ptr + offs, mask=offs < N, other=ignore)
        valid = t != ignore
        count += tl.sum(valid.to(tl.int32), axis=0)
        bad += tl.sum((valid & ((t < 0) | (t >= V))).to(tl.int32), axis=0)
    # As torch's valid / count.clamp(min=1): the reciprocal of the float count, correctly rounded.
    inv = tl.math.div_rn(1.0, tl.maximum(count, 1).to(tl.float32))
    seen = 0
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < N
        t = tl.load(t_ptr + offs, mask=inside, other=ignore)
        valid = t != ignore
        t_row = tl.where(valid, tl.minimum(tl.maximum(t, 0), tl.maximum(V - 1, 0)), 0)
        if WEIGHTED:
            s = tl.where(valid, tl.load(w_ptr + offs * w_stride, mask=inside, other=0.0).to(tl.float32), 0.0)
        elif MEAN:
            s = tl.where(valid, inv, 0.0)
        else:
            s = tl.where(valid, 1.0, 0.0)
        pos = offs
        if SORT:
            # Scored rows first, each group in the rows' own order (argsort's stable partition): a scored row's
            # place is the scored rows before it, an ignored row's the count plus the ignored rows before it.
            flag = valid.to(tl.int32)
            before = seen + tl.cumsum(flag, axis=0) - flag
            pos = tl.where(valid, before, count + offs - before)
            seen += tl.sum(flag, axis=0)
            tl.store(order_ptr + pos, offs.to(tl.int64), mask=inside)
        tl.store(valid_ptr + pos, valid, mask=inside)
        tl.store(t_out_ptr + pos, t_row, mask=inside)
        tl.store(s_out_ptr + pos, s, mask=inside)
    tl.store(count_ptr, count.to(tl.int64))
    tl.store(ok_ptr, bad == 0)


_ROWS_BLOCK = 1024
# A single program: eight warps (four targets a thread) keep more loads in flight, at 77 registers (146 at four).
_ROWS_COMPILE = {**_COMPILE, "num_warps": 8}


def rows(
    targets: torch.Tensor, v: int, ignore_index: int, acc: torch.dtype, *, mean_over_count: bool,
    weights: torch.Tensor | None, sort: bool,
) -> torch_path.Rows | None:  # fmt: skip
    """``torch_path._rows`` off CPU in one launch instead of about fifteen (the targets' checks, the gradient
    weights, and with ``sort`` the scored-first order and the rows arranged in it): every output in the order's
    arrangement. None where the torch ops must do it (float64, no rows, a ``weights`` that is not float32 / bf16 /
    f16, a kernel that does not compile here)."""
    n = targets.shape[0]
    usable = weights is None or (weights.dtype in _LOADED_DTYPES and weights.dim() <= 1)
    if acc != torch.float32 or _broken or n == 0 or not usable:
        return None
    dev = targets.device
    t = targets.contiguous()
    valid = torch.empty(n, dtype=torch.bool, device=dev)
    order = torch.empty(n, dtype=torch.int64, device=dev) if sort else t
    t_rows = torch.empty(n, dtype=torch.int64, device=dev)
    s_all = torch.empty(n, dtype=acc, device=dev)
    count = torch.empty((), dtype=torch.int64, device=dev)
    in_range = torch.empty((), dtype=torch.bool, device=dev)
    w = weights.contiguous() if weights is not None else s_all  # (not read unless weighted)
    w_stride = 1 if weights is not None and weights.dim() == 1 else 0
    try:
        with _on(dev):
            _rows_kernel[(1,)](
                t, w, w_stride, valid, order, t_rows, s_all, count, in_range, n, v, ignore_index,
                WEIGHTED=weights is not None and not mean_over_count, MEAN=mean_over_count, SORT=sort,
                BLOCK=_ROWS_BLOCK, **_ROWS_COMPILE,
            )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - a compile / launch failure of this kernel, not of the maths
        _fallback(error)
        return None
    torch._assert_async(in_range, torch_path.OUT_OF_RANGE)
    return torch_path.Rows(valid, count, t_rows, s_all, in_range, order if sort else None)


def _gradient_buffer(
    y: torch.Tensor, grad_dtype: torch.dtype | None, *, split: bool, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool]:
    """Where a pass writes the logits gradient, and whether over its own logits' first halves: into ``out`` where
    the caller gives one (the chunks' shared buffer), over the float32 logits (unrounded), over the first half of
    each row's logits (rounded, ``aliased_gradient``; never for rows split into parts), or into a buffer of the
    GEMMs' dtype."""
    if out is not None:
        return out, False
    if grad_dtype in (None, torch.float32):
        return y, False
    aliased = None if split else aliased_gradient(y, grad_dtype)
    if aliased is not None:
        return aliased, True
    return torch.empty(y.shape, dtype=grad_dtype, device=y.device), False


def row_pass(
    y: torch.Tensor, t: torch.Tensor, s_rows: torch.Tensor, options: LossOptions, *, vocab: int, want_stats: bool,
    grad: bool, grad_dtype: torch.dtype | None = None, grad_out: torch.Tensor | None = None,
) -> torch_path.RowPass:  # fmt: skip
    """``torch_path.torch_row_pass`` as one Triton program per row (float32 logits ``y``, contiguous rows)."""
    if y.dtype != torch.float32 or _broken or y.shape[0] == 0:
        return torch_path.torch_row_pass(
            y, t, s_rows, options, vocab=vocab, want_stats=want_stats, grad=grad, grad_dtype=grad_dtype,
            grad_out=grad_out,
        )  # fmt: skip
    rows, v = y.shape
    y = y.contiguous()
    k, cap, inv_t, has_lb, has_cap = _constants(options)
    loss = torch.empty(rows, dtype=torch.float32, device=y.device)
    lse = torch.empty_like(loss)
    stats = torch.empty(rows, torch_path.TOKEN_STATS, dtype=torch.float32, device=y.device) if want_stats else loss
    lb = options.epilogue.logits_bias if has_lb else y
    scale = s_rows.to(torch.float32).contiguous()
    parts = 1 if want_stats else _parts(rows, v, y.device)
    g, aliased = _gradient_buffer(y, grad_dtype, split=parts > 1, out=grad_out) if grad else (y, False)
    try:
        with _on(y.device):
            if parts > 1:
                loss, lse = _split_row_pass(y, t.contiguous(), scale, options, g if grad else None, lb, parts)
                return torch_path.RowPass(loss=loss, lse=lse, stats=None, grad=g if grad else None)
            _row_kernel[(rows,)](
                y, y.stride(0), t.contiguous(), scale, lb, loss, lse, stats, g, g.stride(0), loss,
                v, k, cap, inv_t, options.label_smoothing, options.z_loss,
                HAS_LB=has_lb, HAS_CAP=has_cap, GRAD=grad, STATS=want_stats, PARTS=False, BLOCK=_BLOCK,
                ALIASED=aliased, **_COMPILE,
            )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - a compile / launch failure of this kernel, not of the maths
        _fallback(error)
        return torch_path.torch_row_pass(
            y, t, s_rows, options, vocab=vocab, want_stats=want_stats, grad=grad, grad_dtype=grad_dtype,
            grad_out=grad_out,
        )  # fmt: skip
    return torch_path.RowPass(
        loss=loss, lse=lse, stats=stats.to(torch.float64) if want_stats else None, grad=g if grad else None
    )


def slab_pass(
    y: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, s_rows: torch.Tensor, options: LossOptions, *, v0: int,
    vocab: int, grad_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """``torch_path.torch_slab_pass`` as one Triton program per row."""
    if y.dtype != torch.float32 or _broken or y.shape[0] == 0:
        return torch_path.torch_slab_pass(y, t, lse, s_rows, options, v0=v0, vocab=vocab, grad_dtype=grad_dtype)
    rows, width = y.shape
    y = y.contiguous()
    k, cap, inv_t, has_lb, has_cap = _constants(options)
    lb = options.epilogue.logits_bias if has_lb else y
    g, aliased = _gradient_buffer(y, grad_dtype, split=False)
    scale, row_lse = s_rows.to(torch.float32).contiguous(), lse.to(torch.float32).contiguous()
    try:
        with _on(y.device):
            _slab_kernel[(rows,)](
                y, y.stride(0), t.contiguous(), scale, row_lse,
                lb, g, g.stride(0), width, v0, vocab, k, cap, inv_t, options.label_smoothing, options.z_loss,
                HAS_LB=has_lb, HAS_CAP=has_cap, BLOCK=_BLOCK, ALIASED=aliased, **_COMPILE,
            )  # fmt: skip
    except Exception as error:  # noqa: BLE001
        _fallback(error)
        return torch_path.torch_slab_pass(y, t, lse, s_rows, options, v0=v0, vocab=vocab, grad_dtype=grad_dtype)
    return g


def shard_pass(
    y: torch.Tensor, t_local: torch.Tensor, options: LossOptions, *, v0: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A vocabulary shard's share of each row (``vocab_parallel``): over the post-epilogue logits of the columns
    ``[v0, v0 + y.shape[1])``, their log-sum-exp, the target's logit (0 where ``t_local`` is outside the shard) and
    their sum. Reads ``y`` once and leaves it as it was."""
    if _broken:
        return torch_shard_pass(y, t_local, options, v0=v0)
    rows, width = y.shape
    y = y.contiguous()
    k, cap, inv_t, has_lb, has_cap = _constants(options)
    loss, lse = torch.empty(2, rows, dtype=torch.float32, device=y.device)  # this shard's own loss: unused
    parts = torch.empty(rows, 2, dtype=torch.float32, device=y.device)
    lb = options.epilogue.logits_bias[v0 : v0 + width] if has_lb else y
    try:
        with _on(y.device):
            _row_kernel[(rows,)](
                y, y.stride(0), t_local.contiguous(), lse, lb, loss, lse, lse, y, y.stride(0), parts,
                width, k, cap, inv_t, 0.0, 0.0,
                HAS_LB=has_lb, HAS_CAP=has_cap, GRAD=False, STATS=False, PARTS=True, BLOCK=_BLOCK, ALIASED=False,
                **_COMPILE,
            )  # fmt: skip
    except Exception as error:  # noqa: BLE001
        _fallback(error)
        return torch_shard_pass(y, t_local, options, v0=v0)
    return lse, parts[:, 0], parts[:, 1]


def torch_shard_pass(
    y: torch.Tensor, t_local: torch.Tensor, options: LossOptions, *, v0: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``shard_pass`` in torch ops, for a GPU where the kernel does not compile (``y`` is left as it was)."""
    z, _ = torch_path._epilogue_forward(y.clone(), options.epilogue, y.dtype, slice(v0, v0 + y.shape[1]))
    mine = t_local >= 0
    z_t = z.gather(1, t_local.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.logsumexp(z, dim=1), torch.where(mine, z_t, 0.0), z.sum(dim=1)
