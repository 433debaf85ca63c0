"""The fused op written with torch ops, chunk by chunk over rows (used off-CPU and for ``impl="torch"``).

Same maths as the Rust kernel (docs/design.md, "Kernel contract"): for each chunk of rows the logits
``epilogue(h · Wᵀ + b)`` are formed in float32, the per-row loss and ``d loss / d logits`` are computed, and the
chunk's contribution to every requested gradient is accumulated; the chunk is then dropped. Scratch memory is bounded
by ``LOGITLESS_CHUNK_MB`` or, unset, by ``chunk_budget_bytes``'s rule (a sixteenth of the float32 logits, 64 to
512 MiB on this path).

Two modes:

* ``compact=True`` (CPU): ignored rows are dropped before any GEMM. Finding them needs their count on the host,
  which is free on CPU.
* ``compact=False`` (accelerators): the call never stalls the device. Rows are sorted on the device, scored ones
  first (by ``argsort``, or by a ``rows`` function with the rest of each row's inputs: ``triton_path.rows``), and
  chunks are masked; the first chunk's kernels are queued before the host reads (through a pinned
  copy and an event recorded ahead of them) how many rows are scored, and the chunks stop there, so ignored rows
  past the first chunk never enter a GEMM (where every row is scored, the sort kept the rows' own order, and the
  later chunks take slices of them, not gathers). While a CUDA graph is being captured (no host reads allowed)
  every row enters and ignored rows are masked. Out-of-range targets cannot raise a Python error without a sync;
  instead they are clamped, the loss becomes NaN and ``torch._assert_async`` fires a device-side assert (the
  behaviour of torch's own ``cross_entropy`` on CUDA).

The weight gradient (``accumulate``, the default) is the first chunk's product written into a float32 buffer
and every later chunk's added to it; a problem that fits one chunk writes it straight in the weight's dtype, with
no buffer. On CUDA a chunk that feeds that buffer holds at least 2048 rows (its read-modify-write per chunk). Off
CPU, a problem that fits one chunk runs as two halves of its sorted rows instead (the second only as far as the
scored rows go): ignored rows skipped, half the float32 logits; a float32 weight's gradient is summed over the
halves in its own dtype. Where the row pass writes the gradient in the GEMMs' dtype, the halves' gradients, and
any chunks' of a call with few rows for its hidden size (``_plan``), share one ``[N, V]`` buffer and the weight
gradient is one GEMM over it, instead of the float32 buffer.

``recompute`` (a bf16/f16 weight gradient without that buffer; four matmuls' worth) runs the chunks forward-only
(each row's loss and log-sum-exp), then a pass over vocabulary slabs recomputes each slab's logits over every row
of the chunks and forms the slab's weight gradient in one GEMM, ``d_hidden`` summed over the slabs in a float32
``[rows, H]`` buffer, and the bias gradient. Where that buffer would take over half the budget, the chunks form
``d_hidden`` (and the slabs the weight gradient only); where a slab over every row cannot fit (very many rows), the
slabs take the rows block by block. On CUDA it holds a fixed 192 MiB, its chunks' rows and slabs' columns whole
tensor-core tiles. Where the row pass writes the gradient in the GEMMs' dtype and every row's fits that budget beside
chunks of at least a tile of rows (a small problem), the chunks share it as above instead: three GEMMs, not four,
in the same budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from logitless import _config
from logitless._options import Epilogue, LossOptions

# Without LOGITLESS_CHUNK_MB the budget follows the problem (chunk_budget_bytes): a sixteenth of the float32 logits
# it stands in for, within these bounds.
_MIN_AUTO_CHUNK_MB = 4
_MAX_AUTO_CHUNK_MB = 512
_TORCH_PATH_MIN_CHUNK_MB = 64
_GPU_MIN_CHUNK_ROWS = 2048
# The recompute mode on CUDA holds no V×H buffer; its scratch stays within this fixed budget (chunks, then slabs).
_GPU_RECOMPUTE_BUDGET_MB = 192
# recompute on a problem whose every row's gradient fits its budget: the shared gradient's three GEMMs (``_plan``).
# Tests turn it off to run the slabs on small problems.
_RECOMPUTE_SHARES_SMALL = True
# Tensor-core GEMMs work in tiles of 128 rows / columns: a chunk's rows and a slab's columns are multiples of it
# (a 261-row chunk pays for 384; an odd slab width leaves the GEMMs' operands unaligned, on slow kernels).
_GPU_TILE = 128
_AUTO_FRACTION_OF_LOGITS = 16
# float32 temporaries alive per chunk row, in units of V: logits, probabilities / d_logits, and a low-precision
# copy of d_logits for the GEMMs.
_TEMPS_PER_ROW = 3


def chunk_budget_bytes(
    rows: int = 0,
    vocab: int = 0,
    hidden: int = 0,
    *,
    low_precision_weight_grad: bool = False,
    min_mb: int = _MIN_AUTO_CHUNK_MB,
) -> int:
    """The scratch budget of one call: ``LOGITLESS_CHUNK_MB`` (MiB) when set, read on every call so tests can change it.

    Otherwise 1/16 of the ``rows × vocab`` float32 logits, between 4 and 512 MiB, so scratch stays a small fixed
    fraction of what stock transformers would allocate. Every chunk re-reads the head and re-writes its whole V×H
    weight gradient, so long chunks matter on big problems (8192×2048×128256 in f32: 152 GFLOP/s with 32 MiB chunks,
    183 with 256 MiB). A bf16/f16 weight gradient is accumulated in a V×H float32 buffer the call holds anyway;
    there the budget is at least half that buffer (bf16 at 2048×1024×32000: 1.73 s with 16 MiB, 1.50 s with 64).
    """
    mb = _config.chunk_mb()
    if mb is None:
        if rows <= 0 or vocab <= 0:
            return 32 << 20
        budget = rows * vocab * 4 // _AUTO_FRACTION_OF_LOGITS
        if low_precision_weight_grad:
            budget = max(budget, vocab * hidden * 4 // 2)
        return min(max(budget, min_mb << 20), _MAX_AUTO_CHUNK_MB << 20)
    return int(mb * (1 << 20))


WEIGHT_GRAD_MODES = _config.WEIGHT_GRAD_MODES


def weight_grad_mode() -> str:
    """``LOGITLESS_WEIGHT_GRAD`` (read on every call): how a bf16/f16 weight gradient is formed.

    ``accumulate`` (default): in every chunk, into a V×H float32 buffer rounded once at the end; three matmuls' worth
    of work. ``recompute`` (Rust kernel): in a second pass over vocabulary slabs that recomputes their logits; four
    matmuls' worth, but no V×H float32 buffer, so all scratch stays inside the chunk budget (at 8192×2048×128256 the
    buffer alone is 1 GiB). Both paths honour it; float32 weights need no buffer and ignore it.
    """
    return _config.weight_grad()


@dataclass
class Result:
    loss_sum: torch.Tensor  # 0-d, float32 (float64 for float64 inputs)
    count: torch.Tensor  # 0-d int64: non-ignored rows
    per_row: torch.Tensor | None  # [N] loss per row (0 where ignored), when asked for
    d_hidden: torch.Tensor | None
    d_weight: torch.Tensor | None
    d_bias: torch.Tensor | None
    # [N, 4] float64 entropy, mean logit, log Σp², target-is-argmax (0 where ignored), when asked for
    token_stats: torch.Tensor | None = None
    # The low-rank term's gradients ([N, r] and [V, r], in the accumulation dtype), when it was given
    d_low_a: torch.Tensor | None = None
    d_low_b: torch.Tensor | None = None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` returned in the accumulation dtype."""
    if a.dtype == acc:
        return a @ b
    if a.device.type == "cuda":
        # fp32 output straight from the bf16/f16 GEMM: more accurate than stock, which rounds the logits.
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (RuntimeError, NotImplementedError):
            pass  # a GPU / build without the mixed-precision GEMM: round as below
    # No mixed-precision mm on this backend: round like stock's ``lm_head`` does, then upcast.
    return (a @ b).to(acc)


def _epilogue_forward(
    z: torch.Tensor, epilogue: Epilogue, acc: torch.dtype, cols: slice = slice(None)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The epilogue (spec §1.2) on logits of the vocabulary columns ``cols``, in place where it can be; also
    ``tanh(z / c)`` when softcapping, which the backward needs."""
    if epilogue.logits_bias is not None:
        z += epilogue.logits_bias[cols].to(acc)
    if epilogue.multiply is not None:
        z *= epilogue.multiply
    if epilogue.divide is not None:
        z /= epilogue.divide
    capped = None
    if epilogue.softcap is not None:
        capped = torch.tanh(z / epilogue.softcap)
        z = capped * epilogue.softcap
    if epilogue.temperature is not None:
        z = z / epilogue.temperature
    return z, capped


def _softmax_part(
    z: torch.Tensor, lse: torch.Tensor, *, z_loss: float, label_smoothing: float, vocab: int
) -> torch.Tensor:
    """``p·(1 + 2·z_loss·lse) - ε/V`` in z's storage: ``d l / d z`` without the one-hot term ``-(1-ε)·[j = t]``."""
    g = z.sub_(lse.unsqueeze(1)).exp_()
    if z_loss:
        g *= (1.0 + 2.0 * z_loss * lse).unsqueeze(1)
    if label_smoothing:
        g -= label_smoothing / vocab
    return g


def _epilogue_backward(g: torch.Tensor, capped: torch.Tensor | None, epilogue: Epilogue) -> None:
    """``g`` from ``d l / d epilogue(y)`` to ``d l / d y``, in place, last step first."""
    if epilogue.temperature is not None:
        g /= epilogue.temperature
    if capped is not None:
        g *= 1.0 - capped * capped
    if epilogue.divide is not None:
        g /= epilogue.divide
    if epilogue.multiply is not None:
        g *= epilogue.multiply


def _add_mm(out: torch.Tensor, g: torch.Tensor | None, g_lp: torch.Tensor, h: torch.Tensor) -> None:
    """``out += gᵀ·h`` in place, ``out`` in the accumulation dtype: never a [V, H] temporary per chunk. ``g`` is
    None where only its rounded copy ``g_lp`` was made."""
    if h.dtype == out.dtype or h.device.type != "cuda":
        g = g if g is not None else g_lp.to(out.dtype)
        # The chunk's h is small to upcast; g stays unrounded.
        out.addmm_(g.T, h.to(out.dtype))
        return
    try:
        # bf16/f16 GEMM accumulating in float32 straight into the buffer (cuBLAS beta = 1).
        torch.addmm(out, g_lp.T, h, out_dtype=out.dtype, out=out)
    except (RuntimeError, NotImplementedError, TypeError):
        out += _mm(g_lp.T, h, out.dtype)


def _weight_grad_of(
    g: torch.Tensor | None, g_lp: torch.Tensor, h: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``gᵀ·h`` of one chunk as a new ``dtype`` tensor, or written into ``out`` (of that dtype; straight from the
    GEMM where its dtype is the operands'), accumulated as ``_add_mm`` does (float32 inside the GEMM; unrounded
    ``g`` off CUDA, where there is one)."""
    if h.device.type == "cuda" and h.dtype == g_lp.dtype and (g is None or h.dtype != g.dtype):
        if dtype == h.dtype:
            return torch.mm(g_lp.T, h, out=out) if out is not None else g_lp.T @ h
        product = _mm(g_lp.T, h, dtype)
    else:
        g = g if g is not None else g_lp.to(_acc_dtype(h.dtype))
        if out is not None and g.dtype == h.dtype == dtype:
            return torch.mm(g.T, h, out=out)
        product = (g.T @ h.to(g.dtype)).to(dtype)
    return out.copy_(product) if out is not None else product


class _PendingCount:
    """The number of scored rows on its way to the host behind the work already queued: reading it after the first
    chunk's kernels are launched waits for the count, not for them."""

    def __init__(self, count: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        self._count = count
        if count.device.type == "cuda":
            self._count = torch.empty((), dtype=count.dtype, pin_memory=True)
            self._count.copy_(count, non_blocking=True)
            self._event = torch.cuda.Event()
            # On the copy's stream, which is the count's device's, not the current device's (a head on another GPU).
            self._event.record(torch.cuda.current_stream(count.device))

    def value(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return int(self._count)


@dataclass
class RowChunk:
    """Rows ``[start, stop)`` of a call's order: ``idx`` (None: the rows themselves), ``mask`` the scored ones
    (None: all are)."""

    start: int
    stop: int
    idx: torch.Tensor | None
    mask: torch.Tensor | None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, self.idx) if self.idx is not None else x[self.start : self.stop]

    def put(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """Writes the chunk's rows ``x`` into their places in ``out``."""
        if self.idx is not None:
            out.index_copy_(0, self.idx, x)
        else:
            out[self.start : self.stop] = x

    def put_product(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """Writes ``a @ b`` (the chunk's rows) into their places in ``out``; straight into a slice, with no copy."""
        if self.idx is not None:
            out.index_copy_(0, self.idx, a @ b)
        else:
            torch.mm(a, b, out=out[self.start : self.stop])


class RowChunks:
    """The rows of one call in chunks of ``rows_per_chunk``, ignored ones kept out of them (module docstring):

    * ``compact`` (CPU): only the scored rows, found on the host;
    * otherwise, with ``skip_ignored`` (default: unless a CUDA graph is being captured): sorted scored-first on the
      device and masked; the first chunk is handed out before the host knows how many rows are scored, and
      ``total()`` (or the next chunk) reads that count once the caller has queued the first chunk's work;
    * otherwise every row, masked.

    The chunks depend on ``valid`` alone, so ranks with the same labels get the same chunks (``count``: its sum,
    where the caller has it already; ``order``: the sorted order, where the caller found it with ``sorts``, and
    ``valid`` then given in it)."""

    def __init__(
        self, valid: torch.Tensor, rows_per_chunk: int, *, compact: bool, skip_ignored: bool | None = None,
        count: torch.Tensor | None = None, order: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        self._valid, self._per_chunk, self._compact = valid, rows_per_chunk, compact
        self._order: torch.Tensor | None = None
        self._all_scored = False
        self._pending: _PendingCount | None = None
        self._valid_arranged: torch.Tensor | None = None if order is None else valid
        n = valid.shape[0]
        if compact:
            self._order = valid.nonzero().squeeze(1)
            self._total = int(self._order.numel())
            if self._total == n:  # every row scored: slices of the rows themselves, not gathers
                self._order, self._all_scored = None, True
            return
        self._total = n
        if RowChunks.sorts(n, rows_per_chunk, compact=compact, device=valid.device, skip_ignored=skip_ignored):
            # Scored rows first, each group in the rows' own order (a stable sort keeps equal keys' order).
            self._order = order if order is not None else torch.argsort(valid.to(torch.uint8), descending=True,
                                                                        stable=True)  # fmt: skip
            self._pending = _PendingCount(valid.sum() if count is None else count)

    @staticmethod
    def sorts(n: int, rows_per_chunk: int, *, compact: bool, device: torch.device, skip_ignored: bool | None) -> bool:
        """Whether the chunks of ``n`` rows take them sorted scored-first (the order found on the device)."""
        if skip_ignored is None:
            skip_ignored = not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
        return not compact and skip_ignored and n > rows_per_chunk

    @property
    def in_order(self) -> bool:
        """Whether the chunks are slices of the rows in their own order, covering every row (asked before the
        first chunk: later, a sort that turned out to be the identity reads as in order too)."""
        return self._order is None

    def arrange(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s rows in the chunks' order, gathered once for the call (a chunk's are then the slice
        ``[start, stop)``, not a gather per chunk); ``x`` itself where the chunks keep the rows' own order."""
        return x if self._order is None else x.index_select(0, self._order)

    def _arranged_valid(self) -> torch.Tensor:
        if self._valid_arranged is None:
            self._valid_arranged = self.arrange(self._valid)
        return self._valid_arranged

    def first(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """``x``'s rows ``[0, stop)`` of the chunks' order (a slice where that is the rows' own order)."""
        return x[:stop] if self._order is None else x.index_select(0, self._order[:stop])

    def scored(self, stop: int) -> torch.Tensor | None:
        """Which rows ``[0, stop)`` of the chunks' order are scored (None: all are)."""
        return None if self._compact or self._all_scored else self._arranged_valid()[:stop]

    def place(self, out: torch.Tensor, x: torch.Tensor, stop: int) -> None:
        """Writes ``x``, the rows ``[0, stop)`` of the chunks' order, into their places in ``out`` (in its dtype)."""
        if self._order is None:
            out[:stop] = x
        else:
            out.index_copy_(0, self._order[:stop], x.to(out.dtype))

    def total(self) -> int:
        """How many rows of the order the chunks cover (reading it settles the scored count)."""
        if self._pending is not None:
            count = self._pending.value()
            self._total = max(min(self._total, self._per_chunk), count)
            self._pending = None
            if count == self._valid.shape[0]:
                # Every row is scored, so the stable sort left them in their own order: from here on the chunks
                # and the call's rows are slices and in-place writes, not gathers and scatters (nor their copies:
                # recompute's slabs read ``hidden`` itself).
                self._order, self._all_scored = None, True
        return self._total

    def __iter__(self) -> Iterator[RowChunk]:
        stop = 0
        valid = None if self._compact else self._arranged_valid()
        # The first chunk's bounds come from the provisional total: the count is read only after it is handed out.
        while stop < (self._total if stop == 0 else self.total()):
            start, stop = stop, min(self._total, stop + self._per_chunk)
            idx = self._order[start:stop] if self._order is not None else None
            yield RowChunk(start, stop, idx, None if valid is None or self._all_scored else valid[start:stop])


def _logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype,
    low: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """``h · Wᵀ + b`` in the accumulation dtype, plus ``a · bᵀ`` for a low-rank term ``low = (a, b)`` (in acc).

    Where the product must be rounded to the inputs' dtype (no mixed-precision GEMM on the device), the bias goes
    inside the GEMM, exactly as stock's ``F.linear`` does: one rounding of ``h · Wᵀ + b``, the same logits as
    stock, rather than a rounded product plus an exact bias (a different rounding: 1.4x stock's mean loss error
    over 20 random bf16 problems with a bias, V=8)."""
    if bias is not None and h.dtype != acc and h.device.type != "cuda":
        z = torch.addmm(bias, h, weight.T).to(acc)
    else:
        z = _mm(h, weight.T, acc)
        if bias is not None:
            z += bias.to(acc)
    if low is not None:
        z.addmm_(low[0], low[1].T)
    return z


@dataclass(frozen=True)
class _Plan:
    """How one call of ``fused_lce`` runs."""

    budget: int  # scratch bytes
    rows_per_chunk: int
    low_precision_grad: bool  # the row / slab pass writes the logits gradient in the inputs' dtype
    accumulate: bool  # the weight gradient summed over chunks (the default mode)
    recompute: bool  # the weight gradient formed over vocabulary slabs (LOGITLESS_WEIGHT_GRAD=recompute)
    slab_major: bool  # recompute: every gradient formed by the slabs, the chunks forward-only
    row_grad: bool  # the chunks form the logits gradient
    skip_ignored: bool  # (compact=False) ignored rows sorted behind the scored ones, kept out after the first chunk
    halves: bool  # a one-chunk problem run as two halves of its sorted rows
    shared_grad: bool  # every chunk's gradient in one [N, V] buffer, the weight gradient one GEMM over it
    slab_grad_bytes: int  # recompute: a slab's gradient bytes per element beside its float32 logits


def _plan(
    n: int, v: int, h_dim: int, *, dtype: torch.dtype, weight_dtype: torch.dtype, device: torch.device,
    need: tuple[bool, bool, bool], low_precision_grad: bool | None, budget_bytes: int | None, kernels: bool,
    compact: bool, skip_ignored: bool | None, grad_over_logits: bool = False,
) -> _Plan:  # fmt: skip
    """The chunks, modes and buffers of a call (``fused_lce``'s arguments; ``kernels``: the Triton row pass on
    CUDA). Depends on shapes, dtypes, the device and the environment only, never on values."""
    need_d_hidden, need_d_weight, need_d_bias = need
    acc = _acc_dtype(dtype)
    gpu = device.type == "cuda"
    # A low-precision weight gradient summed over chunks in its own dtype would lose bits at every chunk: it is
    # accumulated in float32, or (recompute) formed slab by slab in a later pass.
    low_precision_dw = need_d_weight and weight_dtype != acc
    recompute = low_precision_dw and weight_grad_mode() == "recompute"
    accumulate = need_d_weight and not recompute
    if low_precision_grad is None:
        # On CUDA the GEMMs take the bf16/f16 gradient only (mixed-precision GEMMs), so the row pass can round it
        # once as it writes it; the bias gradient is summed from the unrounded one.
        low_precision_grad = gpu and dtype != acc and not need_d_bias
    # Scratch per logit: the float32 logits, plus the gradient's rounded copy where the row kernel writes one;
    # the torch row pass holds up to three float32 temporaries.
    acc_bytes = torch.finfo(acc).bits // 8
    elem_bytes = acc_bytes * _TEMPS_PER_ROW
    if kernels:
        elem_bytes = acc_bytes + (torch.finfo(dtype).bits // 8 if low_precision_grad else 0)
    if budget_bytes is None:
        # The float32 weight-gradient buffer (held anyway) sets a floor; the recompute mode holds none.
        # Short chunks cost this path a round of kernel launches each: never below 64 MiB by default.
        budget_bytes = chunk_budget_bytes(
            n, v, h_dim, low_precision_weight_grad=low_precision_dw and not recompute, min_mb=_TORCH_PATH_MIN_CHUNK_MB
        )
        if gpu and _config.chunk_mb() is None:
            if accumulate:
                # Every chunk reads and writes the whole V×H float32 weight gradient (8·V·H bytes) against
                # 6·rows·V·H flops of GEMMs: on an H100-class GPU (≈600 TFLOP/s, ≈3.3 TB/s) that traffic costs
                # ≈240/rows of the GEMM time, so a chunk holds at least _GPU_MIN_CHUNK_ROWS rows (≈12%).
                budget_bytes = max(budget_bytes, min(n, _GPU_MIN_CHUNK_ROWS) * v * elem_bytes)
            elif recompute:
                budget_bytes = _GPU_RECOMPUTE_BUDGET_MB << 20
    # recompute forms every gradient in its slab pass when a slab over all rows fits the budget: the row pass is
    # then forward-only (logits, loss, log-sum-exp), and its chunks need no room for a gradient. Not where the
    # float32 d_hidden accumulator would take over half the budget (8192 tokens of a 4096-wide model: 128 of 192
    # MiB), leaving slabs so thin that there are more of them than chunks saved (497 launches against 441).
    hidden_acc = n * h_dim * acc_bytes if need_d_hidden else 0
    # A slab's rounded gradient written over its own float32 logits takes no bytes of its own.
    slab_grad_bytes = 0 if grad_over_logits and low_precision_grad else torch.finfo(dtype).bits // 8
    slab_major = (
        recompute
        and 2 * hidden_acc <= budget_bytes
        and _slab_columns(n, v, h_dim, budget_bytes, acc=acc, grad_bytes=slab_grad_bytes, with_hidden=need_d_hidden,
                          gpu=gpu)
        >= min(v, _MIN_SLAB_COLUMNS)
    )  # fmt: skip
    # Within recompute's budget, where every row's gradient in the GEMMs' dtype fits beside chunks of at least a
    # tile of rows (a small problem: 2048 rows at V = 32000), those chunks share it and the weight gradient is one
    # GEMM over it, as a slab's is over its columns: three GEMMs in the same budget, not four.
    shared_rows = 0
    if recompute and _RECOMPUTE_SHARES_SMALL and low_precision_grad and not compact:
        # The chunks then hold their float32 logits only where the row kernel writes each gradient into the shared
        # buffer; the torch row pass's temporaries otherwise.
        per_logit = acc_bytes if kernels else elem_bytes
        shared_rows = (budget_bytes - n * v * (torch.finfo(dtype).bits // 8)) // max(1, v * per_logit)
        if shared_rows >= min(n, _GPU_TILE if gpu else 1):
            recompute = slab_major = False
            accumulate = True
        else:
            shared_rows = 0
    row_grad = any(need) and not slab_major
    if kernels and not row_grad:
        elem_bytes = acc_bytes
    rows_per_chunk = max(1, shared_rows or budget_bytes // max(1, v * elem_bytes))
    if gpu and rows_per_chunk > _GPU_TILE:
        rows_per_chunk -= rows_per_chunk % _GPU_TILE
    if skip_ignored is None:
        skip_ignored = not (gpu and torch.cuda.is_current_stream_capturing())
    # Where the row pass writes the gradient in the GEMMs' dtype, every row's can land in one [N, V] buffer of it and
    # the weight gradient be one GEMM over them at the end, instead of a float32 V×H buffer that every chunk reads
    # and writes: N·V·2 bytes against V·H·4 plus a chunk's rounded gradient (rows·V·2), so when N <= 2·H + rows
    # (a 4096-wide model's 8192 tokens; not 8192 tokens of a 2048-wide one).
    shared_grad = accumulate and low_precision_grad and weight_dtype != acc and not compact
    # A problem that fits one chunk runs as two halves of its rows sorted scored-first, the second only as far as the
    # scored rows go: ignored rows enter no GEMM, and the float32 logits are half as large. A float32 weight's
    # gradient is its own float32 sum of the halves.
    halves = (
        accumulate and (shared_grad or weight_dtype == acc) and not compact and skip_ignored and rows_per_chunk >= n
    )
    if halves:
        half = -(-n // 2)
        if gpu:
            half = -(-half // _GPU_TILE) * _GPU_TILE
        halves = half < n
        rows_per_chunk = half if halves else rows_per_chunk
    shared_grad = shared_grad and (shared_rows > 0 or halves or rows_per_chunk < n <= 2 * h_dim + rows_per_chunk)
    return _Plan(
        budget=budget_bytes, rows_per_chunk=rows_per_chunk, low_precision_grad=low_precision_grad,
        accumulate=accumulate, recompute=recompute, slab_major=slab_major, row_grad=row_grad,
        skip_ignored=skip_ignored, halves=halves, shared_grad=shared_grad, slab_grad_bytes=slab_grad_bytes,
    )  # fmt: skip


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
    compact: bool,
    budget_bytes: int | None = None,
    want_stats: bool = False,
    skip_ignored: bool | None = None,
    low_precision_grad: bool | None = None,
    row_pass: RowPassFn | None = None,
    slab_pass: SlabPassFn | None = None,
    rows: RowsFn | None = None,
    grad_over_logits: bool = False,
    mean_over_count: bool = False,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
    need_low_rank: bool = False,
) -> Result:
    """Loss and requested gradients of ``Σ_i s_i · l_i`` for ``hidden`` [N, H], ``weight`` [V, H], ``targets`` [N].

    ``s_i`` is ``grad_scale`` (0-d tensor), ``row_scale[i]`` ([N]), or with ``mean_over_count`` 1 / max(count, 1)
    for the count of scored rows this pass finds (the mean; ``loss_sum`` stays the sum). Targets must already be
    validated when ``compact`` is True; otherwise out-of-range ones poison the loss (see the module docstring).
    ``row_pass`` / ``slab_pass`` do the elementwise work between the GEMMs (torch ops by default; ``triton_path``
    has kernels) and ``rows`` forms ``Rows`` off ``compact`` (None from it, or no ``rows``: torch ops);
    ``grad_over_logits``: the slab pass writes a rounded gradient over its own float32 logits (no buffer of its
    own, so wider slabs fit the budget).
    ``skip_ignored`` (``compact=False`` only; default: unless a CUDA graph is being captured) keeps ignored rows
    out of every chunk after the first without a device stall (module docstring). ``low_precision_grad``
    (default: on CUDA, for bf16/f16 inputs without a bias gradient) has the row pass write the logits gradient
    straight in the inputs' dtype, the only one the GEMMs read.
    ``low_rank=(a, b)`` ([N, r], [V, r], both in the accumulation dtype) adds ``a · bᵀ`` to the logits (a LoRA
    adapter on a frozen head, so no weight gradient may be asked for); with ``need_low_rank`` both its gradients are
    formed from the float32 logits gradient (``Result.d_low_a`` / ``d_low_b``).
    """
    if low_rank is not None and need_d_weight:
        raise ValueError("low_rank: the weight must be frozen (no weight gradient beside the low-rank term)")
    row_pass = row_pass or torch_row_pass
    slab_pass = slab_pass or torch_slab_pass
    n, h_dim = hidden.shape
    v = weight.shape[0]
    ignore_index = options.ignore_index
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    need_low_rank = need_low_rank and low_rank is not None
    if need_low_rank:
        # The low-rank gradients are formed from the float32 logits gradient, as stock's float32 adapter reads it.
        low_precision_grad = False
    plan = _plan(
        n, v, h_dim, dtype=hidden.dtype, weight_dtype=weight.dtype, device=dev,
        need=(need_d_hidden or need_low_rank, need_d_weight, need_d_bias), low_precision_grad=low_precision_grad,
        budget_bytes=budget_bytes, kernels=dev.type == "cuda" and row_pass is not torch_row_pass, compact=compact,
        skip_ignored=skip_ignored, grad_over_logits=grad_over_logits,
    )  # fmt: skip

    # Every launch below costs a GPU's host a few microseconds, which a small call waits for
    # (bench/host_launches.py counts them): the targets' checks take few ops (one kernel with ``rows``) and chunks
    # write in place.
    weights = row_scale if row_scale is not None else grad_scale
    sort = RowChunks.sorts(n, plan.rows_per_chunk, compact=compact, device=dev, skip_ignored=plan.skip_ignored)
    found = None if rows is None or compact else rows(
        targets, v, ignore_index, acc, mean_over_count=mean_over_count, weights=weights, sort=sort
    )  # fmt: skip
    valid, count, t_rows, s_all, in_range, order = found or _rows(
        targets, v, ignore_index, acc, compact=compact, mean_over_count=mean_over_count, weights=weights
    )  # fmt: skip
    chunks = RowChunks(valid, plan.rows_per_chunk, compact=compact, skip_ignored=plan.skip_ignored, count=count,
                       order=order)  # fmt: skip

    # In the rows' own order the chunks cover every row and write their slices: no zero fill.
    new = torch.empty if chunks.in_order else torch.zeros
    per_row = new(n, dtype=acc, device=dev) if want_per_row else None
    stats = new(n, TOKEN_STATS, dtype=torch.float64, device=dev) if want_stats else None
    d_hidden = new(hidden.shape, dtype=hidden.dtype, device=dev) if need_d_hidden else None
    d_weight_acc: torch.Tensor | None = None
    d_weight: torch.Tensor | None = None
    d_bias_acc = torch.zeros(v, dtype=acc, device=dev) if need_d_bias else None
    d_low_a = new(n, low_rank[0].shape[1], dtype=acc, device=dev) if need_low_rank and low_rank else None
    d_low_b: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None

    if order is None:  # else arranged with the order
        t_rows, s_all = chunks.arrange(t_rows), chunks.arrange(s_all)
    # The slabs (or the shared gradient's one weight-gradient GEMM) take every row of the chunks: gathered once, in
    # the chunks' order, and the chunks take slices.
    g_rows = torch.empty(n, v, dtype=hidden.dtype, device=dev) if plan.shared_grad else None
    h_rows = chunks.arrange(hidden) if plan.slab_major or g_rows is not None else None
    losses: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    done: list[RowChunk] = []
    for c in chunks:
        h = h_rows[c.start : c.stop] if h_rows is not None else c.take(hidden)
        t, s_rows = t_rows[c.start : c.stop], s_all[c.start : c.stop]
        low = (c.take(low_rank[0]), low_rank[1]) if low_rank is not None else None
        # (passed, not kept: a forward-only row pass keeps none of the logits, which the next chunk's then replace)
        rp = row_pass(_logits(h, weight, bias, acc, low), t, s_rows, options, vocab=v, want_stats=stats is not None,
                      grad=plan.row_grad, grad_dtype=hidden.dtype if plan.low_precision_grad else None,
                      grad_out=g_rows[c.start : c.stop] if g_rows is not None else None)  # fmt: skip
        last = c.stop >= chunks.total()  # the first chunk's kernels are queued: reading the count costs no stall
        losses.append(rp.loss)
        done.append(c)
        if stats is not None:
            assert rp.stats is not None
            c.put(stats, rp.stats if c.mask is None else rp.stats * c.mask.unsqueeze(1))
        if plan.recompute:
            lses.append(rp.lse)
        if not plan.row_grad:
            continue
        assert rp.grad is not None

        g: torch.Tensor | None = rp.grad
        if rp.grad.dtype == acc:
            g_lp = rp.grad.to(hidden.dtype)
        else:  # rounded by the row pass already
            g_lp, g = rp.grad, None
        if d_hidden is not None:
            c.put_product(d_hidden, g_lp, weight)
        if plan.accumulate and g_rows is None:
            if d_weight_acc is not None:
                _add_mm(d_weight_acc, g, g_lp, h)
            elif last:
                d_weight = _weight_grad_of(g, g_lp, h, weight.dtype)  # the only chunk: no float32 buffer
            else:
                d_weight_acc = _weight_grad_of(g, g_lp, h, acc)  # the first chunk, written, not added to zeros
        if d_bias_acc is not None:
            assert g is not None
            d_bias_acc += g.sum(dim=0)
        if d_low_a is not None and low is not None:
            assert g is not None
            a, b = low
            c.put_product(d_low_a, g, b)
            d_low_b = g.T @ a if d_low_b is None else d_low_b.addmm_(g.T, a)
        # Dropped before the next chunk's logits are allocated: two chunks' gradients never live at once.
        rp = g = g_lp = low = None  # type: ignore[assignment]

    covered = done[-1].stop if done else 0
    if losses:
        # Masked, summed and placed once for the call, not per chunk.
        loss_rows = _joined(losses)
        scored = chunks.scored(covered)
        if scored is not None:
            loss_rows = torch.where(scored, loss_rows, 0.0)
        loss_sum = loss_rows.sum()
        if per_row is not None:
            chunks.place(per_row, loss_rows, covered)
    if d_weight_acc is not None:
        d_weight = d_weight_acc.to(weight.dtype)
    elif g_rows is not None and h_rows is not None:
        d_weight = _weight_grad_of(None, g_rows[:covered], h_rows[:covered], weight.dtype)
    elif plan.accumulate and d_weight is None:  # no scored row
        d_weight = torch.zeros_like(weight)
    if plan.recompute:
        saved = _Saved(chunks, done, t_rows[:covered], _joined(lses) if lses else t_rows[:0].to(acc), s_all[:covered],
                       h_rows[:covered] if h_rows is not None else None)  # fmt: skip
        d_weight, d_hidden_rows = _grads_by_slabs(
            hidden, weight, bias, saved, options=options, budget=plan.budget, grad_bytes=plan.slab_grad_bytes,
            acc=acc, slab_pass=slab_pass, low_precision_grad=plan.low_precision_grad,
            with_hidden=plan.slab_major and need_d_hidden, d_bias=d_bias_acc if plan.slab_major else None,
        )  # fmt: skip
        if d_hidden_rows is not None and d_hidden is not None:
            chunks.place(d_hidden, d_hidden_rows, covered)
    if loss_sum is None:  # no chunk: no scored row
        loss_sum = torch.zeros((), dtype=acc, device=dev)
    if in_range is not None:
        loss_sum = torch.where(in_range, loss_sum, torch.nan)
        if per_row is not None:
            per_row = torch.where(in_range, per_row, torch.nan)
        if stats is not None:
            stats = torch.where(in_range, stats, torch.nan)
    return Result(
        loss_sum=loss_sum,
        count=count,
        per_row=per_row,
        token_stats=stats,
        d_hidden=d_hidden,
        d_weight=d_weight,
        d_bias=d_bias_acc.to(bias.dtype) if d_bias_acc is not None and bias is not None else None,
        d_low_a=d_low_a,
        d_low_b=(d_low_b if d_low_b is not None else low_rank[1].new_zeros(low_rank[1].shape))
        if d_low_a is not None and low_rank is not None else None,
    )


OUT_OF_RANGE = "logitless: a target is outside [0, vocab) and is not ignore_index"


class Rows(NamedTuple):
    """Each row's validity, their count, target (the column it reads), gradient weight ``s_i`` (0 where the target
    is ignored, whatever the upstream value there) and whether every target is in range (None: checked on the
    host), arranged in ``order`` (the scored-first order of the chunks, found with them) or in the rows' own."""

    valid: torch.Tensor
    count: torch.Tensor
    t: torch.Tensor
    s: torch.Tensor
    in_range: torch.Tensor | None
    order: torch.Tensor | None = None


RowsFn = Callable[..., Rows | None]


def _rows(
    targets: torch.Tensor, v: int, ignore_index: int, acc: torch.dtype, *, compact: bool, mean_over_count: bool,
    weights: torch.Tensor | None,
) -> Rows:  # fmt: skip
    """``Rows`` for the whole call at once, in the rows' own order (a chunk only takes its rows). Off ``compact``
    (targets not checked on the host) whether every target is in range is asserted on the device: ignored targets
    read column 0 and out-of-range ones are clamped (the caller poisons the loss). ``triton_path.rows`` is the same
    in one launch, and arranges them."""
    valid = targets != ignore_index
    count = valid.sum()
    in_range = None
    t_rows = targets
    if not compact:
        t_valid = torch.where(valid, targets, 0)
        t_rows = t_valid.clamp(0, max(v - 1, 0))
        in_range = (t_rows == t_valid).all()
        torch._assert_async(in_range, OUT_OF_RANGE)
    if mean_over_count:
        s_all = valid.to(acc) / count.clamp(min=1)  # 1/count as the reciprocal of the float count, to the bit
    else:
        s_all = torch.where(valid, weights.to(acc) if weights is not None else 1.0, 0.0).to(acc)
    return Rows(valid, count, t_rows, s_all, in_range)


TOKEN_STATS = 4


def _token_stats(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Entropy, mean logit, log Σp² and "target is the argmax" (ties: lowest index, as ``argmax``) of each row of
    post-epilogue logits ``z``, as float64 ``[rows, 4]``. Entropy is ``lse - Σ p·z`` taken relative to the row max
    (no digits lost to the cancellation on peaked rows)."""
    top = z.max(dim=1, keepdim=True).values
    shifted = z - top
    weights = shifted.exp()
    total = weights.sum(dim=1)
    entropy = total.log() - (weights * shifted).sum(dim=1) / total
    log_sum_sq = torch.logsumexp(2.0 * shifted, dim=1) - 2.0 * total.log()
    top1 = z.argmax(dim=1) == t
    out = torch.stack([entropy, z.mean(dim=1), log_sum_sq, top1.to(z.dtype)], dim=1).to(torch.float64)
    return out


@dataclass(frozen=True)
class _Saved:
    """What recompute's slab pass needs of the row pass: its chunks (consecutive, in the chunks' order) and, for
    their rows in that order, each target, log-sum-exp and gradient weight ``s_i`` (0 for masked rows), and
    (slab-major) the hidden states."""

    order: RowChunks
    chunks: list[RowChunk]
    t: torch.Tensor
    lse: torch.Tensor
    scale: torch.Tensor
    h: torch.Tensor | None


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class RowPass:
    """What the elementwise work of one chunk gives: each row's loss and log-sum-exp (post-epilogue), its token
    statistics when asked, and ``d(Σ s_i l_i) / d y`` written over the pre-epilogue logits ``y`` when asked."""

    loss: torch.Tensor
    lse: torch.Tensor
    stats: torch.Tensor | None
    grad: torch.Tensor | None


RowPassFn = Callable[..., RowPass]
SlabPassFn = Callable[..., torch.Tensor]


def torch_row_pass(
    y: torch.Tensor, t: torch.Tensor, s_rows: torch.Tensor, options: LossOptions, *, vocab: int, want_stats: bool,
    grad: bool, grad_dtype: torch.dtype | None = None, grad_out: torch.Tensor | None = None,
) -> RowPass:  # fmt: skip
    """The row pass in torch ops (about ten float32 passes over the chunk's logits); the gradient in ``grad_dtype``
    when given, written into ``grad_out`` (of that dtype) when given."""
    label_smoothing, z_loss, epilogue = options.label_smoothing, options.z_loss, options.epilogue
    z, capped = _epilogue_forward(y, epilogue, y.dtype)
    lse = torch.logsumexp(z, dim=1)
    z_t = z.gather(1, t.unsqueeze(1)).squeeze(1)
    loss = (1.0 - label_smoothing) * (lse - z_t)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - z.mean(dim=1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    stats = _token_stats(z, t) if want_stats else None
    if not grad:
        return RowPass(loss, lse, stats, None)
    g = _softmax_part(z, lse, z_loss=z_loss, label_smoothing=label_smoothing, vocab=vocab)
    g.scatter_add_(1, t.unsqueeze(1), torch.full_like(z_t, label_smoothing - 1.0).unsqueeze(1))
    g *= s_rows.unsqueeze(1)
    _epilogue_backward(g, capped, epilogue)
    if grad_out is not None:
        return RowPass(loss, lse, stats, grad_out.copy_(g))
    return RowPass(loss, lse, stats, g if grad_dtype is None else g.to(grad_dtype))


def torch_slab_pass(
    y: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, s_rows: torch.Tensor, options: LossOptions, *, v0: int,
    vocab: int, grad_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """``d(Σ s_i l_i) / d y`` on the columns ``[v0, v0 + y.shape[1])`` of rows whose log-sum-exp is known, over
    ``y``'s storage."""
    v1 = v0 + y.shape[1]
    z, capped = _epilogue_forward(y, options.epilogue, y.dtype, slice(v0, v1))
    g = _softmax_part(z, lse, z_loss=options.z_loss, label_smoothing=options.label_smoothing, vocab=vocab)
    inside = (t >= v0) & (t < v1)
    col = (t - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
    g.scatter_add_(1, col, torch.where(inside, options.label_smoothing - 1.0, 0.0).to(g.dtype).unsqueeze(1))
    g *= s_rows.unsqueeze(1)
    _epilogue_backward(g, capped, options.epilogue)
    return g if grad_dtype is None else g.to(grad_dtype)


# Below this many columns a slab over every scored row is too thin a GEMM: blocks of rows instead.
_MIN_SLAB_COLUMNS = 256


def _slab_columns(
    rows: int, v: int, h_dim: int, budget: int, *, acc: torch.dtype, grad_bytes: int, with_hidden: bool, gpu: bool
) -> int:
    """How many columns a slab over ``rows`` rows takes within ``budget``: per element its float32 logits and
    ``grad_bytes`` of their rounded gradient, after the float32 ``d_hidden`` accumulator when the slab pass forms
    ``d_hidden``. On CUDA the slabs are whole tiles, as even as that allows (32000 columns in 3 slabs: 10752 each
    and 10496, not two of 15616 and a thin 768)."""
    acc_bytes = torch.finfo(acc).bits // 8
    free = budget - (rows * h_dim * acc_bytes if with_hidden else 0)
    slab = min(v, max(0, free) // max(1, rows * (acc_bytes + grad_bytes)))
    if gpu and _GPU_TILE < slab < v:
        slab -= slab % _GPU_TILE
        even = -(-v // -(-v // slab))
        slab = min(slab, -(-even // _GPU_TILE) * _GPU_TILE)
    return slab


def _grads_by_slabs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    saved: _Saved,
    *,
    options: LossOptions,
    budget: int,
    grad_bytes: int,
    acc: torch.dtype,
    slab_pass: SlabPassFn,
    low_precision_grad: bool = False,
    with_hidden: bool = False,
    d_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``LOGITLESS_WEIGHT_GRAD=recompute``: the weight gradient slab by slab of W's rows, recomputing the logits on
    the slab from each row's saved log-sum-exp, so no V×H float32 buffer is held (four matmuls' worth).

    Where the budget holds a slab at least _MIN_SLAB_COLUMNS wide over every scored row, each slab's gradient is
    one GEMM over all of them (float32 accumulation inside it), written once in the weight's dtype; there the
    slabs can also give ``d_hidden`` (``with_hidden``: returned for the saved rows in their chunks' order, summed
    over slabs in float32 and rounded once by the caller) and ``d_bias`` (written into its slices), so the row
    pass before them forms no gradient. Otherwise the chunks' rows are taken block by block, summed in a float32
    buffer of the slab (the row pass formed the other gradients). ``low_precision_grad``: the slab pass writes the
    gradient straight in the GEMMs' dtype (CUDA, as the row pass does); ``grad_bytes``: what it takes per element
    beside the float32 logits (``_Plan.slab_grad_bytes``)."""
    v, h_dim = weight.shape
    out = torch.empty(v, h_dim, dtype=weight.dtype, device=weight.device)
    rows = saved.t.shape[0]
    if not rows:
        return out.zero_(), None
    gpu = weight.device.type == "cuda"
    slab = _slab_columns(rows, v, h_dim, budget, acc=acc, grad_bytes=grad_bytes, with_hidden=with_hidden, gpu=gpu)
    grad_dtype = hidden.dtype if low_precision_grad else None
    if slab >= min(v, _MIN_SLAB_COLUMNS):
        h = saved.h if saved.h is not None else saved.order.first(hidden, rows)
        t, lse, scale = saved.t, saved.lse, saved.scale
        d_hidden: torch.Tensor | None = None
        for v0 in range(0, v, slab):
            v1 = min(v, v0 + slab)
            w = weight[v0:v1]
            y = _logits(h, w, bias[v0:v1] if bias is not None else None, acc)
            g = slab_pass(y, t, lse, scale, options, v0=v0, vocab=v, grad_dtype=grad_dtype)
            # The unrounded gradient where the slab pass kept one, and the rounded one the GEMMs take.
            g_full, g_lp = (g, g.to(hidden.dtype)) if g.dtype == acc else (None, g)
            _weight_grad_of(g_full, g_lp, h, weight.dtype, out=out[v0:v1])
            if with_hidden:  # d_hidden += g·w: gᵀ·h's helpers on the transposes
                g_t = None if g_full is None else g_full.T
                if d_hidden is None:  # the first slab's product, written, not added to zeros
                    d_hidden = _weight_grad_of(g_t, g_lp.T, w, acc)
                else:
                    _add_mm(d_hidden, g_t, g_lp.T, w)
            if d_bias is not None:
                assert g_full is not None, "a bias gradient is summed from the unrounded gradient"
                d_bias[v0:v1] = g_full.sum(dim=0)
            # Dropped before the next slab's logits are allocated: one slab's scratch at a time.
            y = g = g_full = g_lp = g_t = None  # type: ignore[assignment]
        return out, d_hidden
    assert not with_hidden and d_bias is None, "blocks of rows form the weight gradient only"
    # Half the budget for the slab's float32 gradient, the rest for a chunk's logits on it (as in the main pass).
    slab = max(1, min(v, budget // 2 // max(1, h_dim * 4)))
    for v0 in range(0, v, slab):
        v1 = min(v, v0 + slab)
        acc_w = torch.zeros(v1 - v0, h_dim, dtype=acc, device=weight.device)
        for c in saved.chunks:
            h = c.take(hidden)
            y = _logits(h, weight[v0:v1], bias[v0:v1] if bias is not None else None, acc)
            rows_c = slice(c.start, c.stop)  # the chunks are consecutive from the first row of their order
            g = slab_pass(y, saved.t[rows_c], saved.lse[rows_c], saved.scale[rows_c], options, v0=v0, vocab=v)
            _add_mm(acc_w, g, g.to(hidden.dtype), h)
            y = g = None  # type: ignore[assignment]
        out[v0:v1] = acc_w.to(weight.dtype)
        acc_w = None  # type: ignore[assignment]
    return out, None
