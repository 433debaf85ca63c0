"""``linear_cross_entropy``: the fused op as PyTorch sees it (docs/spec.md §1).

Layers, outermost first:

* ``linear_cross_entropy``: validates, shifts the labels, flattens to ``[N, H]`` and picks the implementation.
* ``logitless::linear_cross_entropy`` (a ``torch.library`` custom op with a fake implementation and a registered
  autograd formula, so a caller compiles with ``torch.compile(fullgraph=True)``). The forward computes the loss and,
  when they are needed, the gradients already scaled by ``1/normaliser``; backward only multiplies them by
  ``grad_output``. For ``reduction="none"`` the forward computes losses only, and backward re-runs the fused pass
  with the incoming per-row gradient as row weights (``logitless::linear_cross_entropy_rows_backward``), unless
  the forward could form them ahead (``_ROWS_AHEAD``: a frozen head, or ``expect_uniform_grad`` on CPU / CUDA).
  In plain eager mode (``_call_op``) the same forward and backward run through ``_EagerOp``, a light autograd
  Function: the custom op's dispatch is host time a small call waits for.
* the Rust kernel (``_rust.fused_lce`` → ``_core.fused_linear_cross_entropy``, CPU) or ``torch_path.fused_lce``
  (any device), both taking the call's ``_options.LossOptions``; the ops' schemas carry it as primitives
  (``LossOptions.scalars`` / ``LossOptions.from_op``).

Double backward (``create_graph=True``) raises: the saved gradients are constants to autograd, so a second-order
derivative would silently be wrong.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple, Optional

import torch

from logitless import _options, _versions, torch_path
from logitless._options import LossOptions

__all__ = ["TokenStats", "linear_cross_entropy"]

# An older torch fails registering the custom ops below with a message about their annotations; say what is wrong.
_versions.require("torch", torch.__version__)


class TokenStats(NamedTuple):
    """Per-position statistics of ``softmax(epilogue(logits))``, shaped like the per-position loss."""

    entropy: torch.Tensor
    mean_logits: torch.Tensor
    log_sum_sq_probs: torch.Tensor
    is_top1: torch.Tensor

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
# The op's reduction for ``"none"`` when backward can reuse the gradients of the per-row losses' sum, formed in the
# same pass: with a frozen head (only ``hidden`` needs a gradient; row i of it depends on loss i alone, so any
# upstream gradient scales it row by row), or with ``expect_uniform_grad`` on CPU (one value over the counted rows,
# checked in backward).
_ROWS_AHEAD = "none+sum-grad"
_EMPTY_GRAD = (0,)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    # A fact about the build, constant for a compiled graph (dynamo cannot trace the C call itself in every torch).
    return torch.amp.is_autocast_available(device_type)


def _autocast_on(device_type: str) -> bool:
    # torch raises for device types without autocast (e.g. "meta") rather than answering False.
    return _autocast_available(device_type) and torch.is_autocast_enabled(device_type)


# ---------------------------------------------------------------------------------------------------------------
# Public entry point: validation and shaping
# ---------------------------------------------------------------------------------------------------------------


def linear_cross_entropy(
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
    impl: str = "auto",
    temperature: float | None = None,
    return_token_stats: bool = False,
    expect_uniform_grad: bool = False,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """``ForCausalLMLoss(epilogue(F.linear(hidden, weight, bias)), labels, V, ...)`` without materialising logits.

    ``hidden`` is ``[B, T, H]`` or ``[N, H]`` with ``labels`` of shape ``hidden.shape[:-1]``. With ``shift=True``
    position ``t`` is scored against ``labels[..., t+1]`` (the last position is ignored), exactly as transformers'
    ``ForCausalLMLoss``; ``shift_labels`` (already shifted) replaces that. ``reduction="mean"`` divides the summed
    loss by the number of non-ignored targets, or by ``num_items_in_batch`` when given; ``"none"`` returns the
    per-position losses with shape ``hidden.shape[:-1]`` (0 where ignored). The loss is float32 (float64 for float64
    inputs). A batch whose targets are all ignored has loss 0 and zero gradients.

    ``temperature`` divides the logits after every other epilogue step (a sampling temperature: the per-token
    ``-loss`` with ``reduction="none"`` is then the target's log-probability at that temperature).
    ``return_token_stats=True`` also returns ``TokenStats`` of each position's distribution, computed in the same
    pass and without gradient: entropy, mean logit, log Σp², and whether the target is the argmax (ties go to the
    lowest index), each shaped like the per-position loss, 0 / False where the target is ignored.

    ``expect_uniform_grad=True`` (with ``reduction="none"``): a hint that the per-position losses will be
    differentiated with one value at every counted position (a sum or mean taken later, as TRL's SFT loss is). On
    CPU and CUDA the gradients are then formed in this pass, as for ``"sum"``, and backward scales them when the
    upstream gradient is one value over the counted positions; otherwise it runs the second pass as without the hint
    (exact either way; the hint costs that pass's worth of work when wrong). On CUDA backward reads that answer on
    the host, one device sync; while a CUDA graph is captured the hint is ignored. Ignored elsewhere. With a frozen
    head (only ``hidden`` needs a gradient) no hint is needed: its row gradients are formed in this pass on any
    device and backward scales them by any per-position upstream gradient.

    ``low_rank=(a, b)`` adds ``a @ b.T`` to the logits before the epilogue: a LoRA adapter on a frozen head, with
    ``a = scaling * lora_A(dropout(hidden))`` (``[..., r]``, hidden's leading shape) and ``b = lora_B.weight``
    (``[V, r]``). Both get gradients; the product is formed in float32 (float64 for float64 inputs) whatever their
    dtype. The weight and bias must not need a gradient, and ``reduction`` must be ``"mean"`` or ``"sum"``. Every
    implementation takes it (float64 inputs: not the Rust kernel, whose factors are float32; ``impl="auto"`` then
    takes the torch path).
    """
    hidden, weight, bias = _checked_tensors(hidden, weight, bias, rows="V")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight: expected at least one row (the vocabulary is empty)")
    device = hidden.device
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if expect_uniform_grad and reduction != "none":
        raise ValueError('expect_uniform_grad: only meaningful with reduction="none" (per-position losses)')
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError('num_items_in_batch: only meaningful with reduction="mean" (sum / num_items_in_batch)')
    grad_on = torch.is_grad_enabled()
    low_a, low_b = _checked_low_rank(low_rank, hidden, weight, bias, reduction, grad_on)
    if low_a is not None and impl == "auto" and hidden.dtype == torch.float64 and device.type == "cpu":
        impl = "torch"  # the Rust kernel's low-rank factors are float32
    options = _options.parse(
        device=device,
        vocab=vocab,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_scale_multiply=logit_scale_multiply,
        logit_scale_divide=logit_scale_divide,
        logit_softcapping=logit_softcapping,
        logits_bias=logits_bias,
        impl=impl,
        temperature=temperature,
    )

    if low_a is not None and options.impl == "rust" and hidden.dtype == torch.float64:
        raise ValueError('low_rank: impl="rust" takes float32 factors, not float64 inputs; use impl="torch"')
    targets = _targets(hidden, labels, shift, shift_labels, options.ignore_index, device)
    num_items = _num_items(num_items_in_batch, hidden)

    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad

    lead_shape = hidden.shape[:-1]
    rows = math.prod(lead_shape)  # not reshape(-1, H): ambiguous when H == 0
    if reduction == "none" and not torch.compiler.is_compiling():
        # A frozen head's row gradients are scaled in backward on any device; the uniform value is checked in
        # backward with one host read (free on CPU, a device sync on CUDA, none while a CUDA graph is captured).
        frozen_head = need_dh and not need_dw and not need_db
        if frozen_head or (expect_uniform_grad and _host_read_allowed(device)):
            reduction = _ROWS_AHEAD
    loss, _, _, _, stats, _, _ = _call_op(
        hidden.reshape(rows, hidden.shape[-1]),
        weight,
        bias,
        targets.reshape(rows),
        options.epilogue.logits_bias,
        num_items,
        *options.scalars(),
        reduction,
        options.impl,
        need_dh,
        need_dw,
        need_db,
        options.epilogue.temperature or 0.0,
        return_token_stats,
        low_a,
        low_b,
        grad_on and low_a is not None and (low_a.requires_grad or low_b.requires_grad),  # type: ignore[union-attr]
    )
    if reduction in ("none", _ROWS_AHEAD):
        loss = loss.reshape(lead_shape)
    if not return_token_stats:
        return loss
    stats = stats.detach().reshape(*lead_shape, torch_path.TOKEN_STATS)
    token_stats = TokenStats(
        entropy=stats[..., 0].to(loss.dtype),
        mean_logits=stats[..., 1].to(loss.dtype),
        log_sum_sq_probs=stats[..., 2].to(loss.dtype),
        is_top1=stats[..., 3] != 0,
    )
    return loss, token_stats


def _checked_tensors(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, rows: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Types, shapes, dtypes and devices of the op's tensors (``rows`` names the weight's first dimension in the
    messages), cast to the autocast dtype when autocast is on, as stock's ``F.linear`` would be."""
    for what, value in (("hidden", hidden), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(value).__name__}")
    if not torch.compiler.is_compiling():  # tracing hands every tensor in as a fake or functional subclass
        for what, value in (("weight", weight), ("bias", bias)):
            if value is not None and type(value) not in (torch.Tensor, torch.nn.Parameter):
                # A quantised weight (torchao, NF4) runs F.linear through its own kernel; its raw values are not
                # the weight, so computing with them would give a silently different loss.
                raise TypeError(
                    f"{what}: expected a plain torch.Tensor or nn.Parameter, got the tensor subclass "
                    f"{type(value).__module__}.{type(value).__qualname__} (F.linear on it runs the subclass's own "
                    "kernel); pass a dequantised tensor, or compute its logits and the stock loss"
                )
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden: expected float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected [{rows}, {hidden.shape[-1]}] (hidden size {hidden.shape[-1]}), got {tuple(weight.shape)}"
        )
    if _autocast_on(hidden.device.type) and hidden.dtype != torch.float64:
        # Under autocast, stock's lm_head (F.linear) runs in the autocast dtype whatever the parameters' dtype;
        # do the same so mixed-precision training (fp32 master weights) behaves as stock.
        amp = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(amp), weight.to(amp)
        bias = bias.to(amp) if bias is not None else None
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (the dtype of hidden), got {weight.dtype}")
    device = hidden.device
    if weight.device != device:
        raise ValueError(f"weight: expected device {device} (the device of hidden), got {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: expected dtype {hidden.dtype} (the dtype of hidden), got {bias.dtype}")
        if bias.device != device:
            raise ValueError(f"bias: expected device {device} (the device of hidden), got {bias.device}")
    return hidden, weight, bias


def _checked_low_rank(
    low_rank: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reduction: str,
    grad_on: bool,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:  # fmt: skip
    """``low_rank``'s two factors, checked and in the accumulation dtype (exact casts, differentiable), or Nones."""
    if low_rank is None:
        return None, None
    if not isinstance(low_rank, (tuple, list)) or len(low_rank) != 2:
        raise TypeError(f"low_rank: expected a pair of tensors (a, b), got {type(low_rank).__name__}")
    a, b = low_rank
    for what, value in (("low_rank[0]", a), ("low_rank[1]", b)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{what}: expected float32, bfloat16, float16 or float64, got {value.dtype}")
        if value.device != hidden.device:
            raise ValueError(f"{what}: expected device {hidden.device} (the device of hidden), got {value.device}")
    lead = tuple(hidden.shape[:-1])
    if b.dim() != 2 or b.shape[0] != weight.shape[0]:
        raise ValueError(f"low_rank[1]: expected [{weight.shape[0]}, r] (the head's rows), got {tuple(b.shape)}")
    if tuple(a.shape) != (*lead, b.shape[1]):
        raise ValueError(f"low_rank[0]: expected {(*lead, b.shape[1])} (hidden's leading dims, rank {b.shape[1]}), "
                         f"got {tuple(a.shape)}")  # fmt: skip
    if grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError(
            "low_rank: expected a frozen head (weight and bias with requires_grad=False), as under a LoRA adapter; "
            "a trained head beside the low-rank term is not fused"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f'low_rank: expected reduction "mean" or "sum", got {reduction!r}')
    acc = _acc_dtype(hidden.dtype)
    return a.reshape(-1, b.shape[1]).to(acc), b.to(acc)


def _targets(
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    shift: bool,
    shift_labels: torch.Tensor | None,
    ignore_index: int,
    device: torch.device,
) -> torch.Tensor:
    """The (shifted) int64 target of every row, on ``device``, shaped ``hidden.shape[:-1]``."""
    expected = tuple(hidden.shape[:-1])
    if shift_labels is not None:
        what, source = "shift_labels", shift_labels
    elif labels is not None:
        what, source = "labels", labels
    else:
        raise ValueError("labels: expected a tensor (or shift_labels), got None")
    if not isinstance(source, torch.Tensor):
        raise TypeError(f"{what}: expected an integer torch.Tensor, got {type(source).__name__}")
    if source.is_floating_point() or source.is_complex() or source.dtype == torch.bool:
        raise TypeError(f"{what}: expected an integer dtype (int64), got {source.dtype}")
    if tuple(source.shape) != expected:
        raise ValueError(f"{what}: expected shape {expected} (hidden's leading dims), got {tuple(source.shape)}")
    # Like transformers' ForCausalLMLoss, labels follow the logits' device.
    targets = source.to(device=device, dtype=torch.int64)
    if shift_labels is None and shift:
        targets = torch.nn.functional.pad(targets, (0, 1), value=ignore_index)[..., 1:]
    return targets


def _num_items(num_items_in_batch: int | torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``num_items_in_batch`` as a 0-d tensor; a Python number is made on ``like``'s device in its accumulation
    dtype by a fill, not copied from the host (a copy from pageable host memory is not allowed while a CUDA graph is
    captured), and divides in that dtype as stock's ``loss / num_items_in_batch`` does."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch: expected an int or a 0-d tensor, got shape {tuple(num_items_in_batch.shape)}"
            )
        return num_items_in_batch.detach().reshape(())
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(f"num_items_in_batch: expected an int or a 0-d tensor, got {type(num_items_in_batch).__name__}")
    return torch.full((), float(num_items_in_batch), dtype=_acc_dtype(like.dtype), device=like.device)


# ---------------------------------------------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------------------------------------------


def _host_reads_free(device: torch.device) -> bool:
    """Whether the op may read values of ``device`` on the host at no cost (CPU): it then validates targets and counts
    rows there. Elsewhere it never waits for the device; the tests switch this off to run that code on CPU."""
    return device.type == "cpu"


def _check_targets_cpu(targets: torch.Tensor, vocab: int, ignore_index: int) -> int:
    """Raises ValueError naming the first target outside [0, vocab) that is not ignore_index; returns the count."""
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        value = int(targets[row])
        raise ValueError(
            f"labels: target {value} (row {row} after shifting) is outside [0, {vocab}) "
            f"and is not ignore_index ({ignore_index})"
        )
    return int(valid.sum())


def _run(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    options: LossOptions,
    *,
    grad_scale: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    want_per_row: bool,
    need: tuple[bool, bool, bool],
    want_stats: bool = False,
    mean_over_count: bool = False,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
    need_low_rank: bool = False,
) -> torch_path.Result:
    """One fused pass through the chosen implementation (``mean_over_count``: the torch path's, off CPU)."""
    # The op's inputs are already in their final dtype; autocast must not recast the torch path's matmuls.
    device_type = hidden.device.type
    guard = torch.autocast(device_type, enabled=False) if _autocast_on(device_type) else contextlib.nullcontext()
    with guard:
        if options.impl == "rust":
            from logitless import _rust  # imports the extension: only when the Rust kernel is wanted

            fused_lce = _rust.fused_lce
        elif options.impl == "triton":
            from logitless import triton_path  # imports triton: only when its kernels are wanted

            fused_lce = functools.partial(
                torch_path.fused_lce,
                compact=_host_reads_free(hidden.device),
                row_pass=triton_path.row_pass,
                slab_pass=triton_path.slab_pass,
                rows=triton_path.rows,
                grad_over_logits=triton_path.gradient_over_logits(hidden.device),
            )
        else:
            fused_lce = functools.partial(torch_path.fused_lce, compact=_host_reads_free(hidden.device))
        return fused_lce(
            hidden,
            weight,
            bias,
            targets,
            options,
            grad_scale=grad_scale,
            row_scale=row_scale,
            want_per_row=want_per_row,
            need_d_hidden=need[0],
            need_d_weight=need[1],
            need_d_bias=need[2],
            want_stats=want_stats,
            **({"mean_over_count": True} if mean_over_count else {}),
            **({"low_rank": low_rank, "need_low_rank": need_low_rank} if low_rank is not None else {}),
        )


@torch.library.custom_op("logitless::linear_cross_entropy", mutates_args=())
def _lce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses the annotation
    targets: torch.Tensor,
    logits_bias: Optional[torch.Tensor],  # noqa: UP045
    num_items: Optional[torch.Tensor],  # noqa: UP045
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    multiply: float,
    divide: float,
    softcap: float,
    reduction: str,
    impl: str,
    need_d_hidden: bool,
    need_d_weight: bool,
    need_d_bias: bool,
    temperature: float = 0.0,
    want_stats: bool = False,
    low_a: Optional[torch.Tensor] = None,  # noqa: UP045
    low_b: Optional[torch.Tensor] = None,  # noqa: UP045
    need_low_rank: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d_hidden, d_weight, d_bias, token_stats, d_low_a, d_low_b); the gradients are those of the returned
    loss, empty when not needed; token_stats is float64 [N, 4] (entropy, mean logit, log Σp², target is argmax) when
    ``want_stats``. ``low_a`` / ``low_b``: the low-rank term (``linear_cross_entropy``'s ``low_rank``, flattened and
    in the accumulation dtype)."""
    options = LossOptions.from_op(
        logits_bias, ignore_index, label_smoothing, z_loss, multiply, divide, softcap, impl, temperature
    )
    acc = _acc_dtype(hidden.dtype)
    device = hidden.device
    count_host = None
    if _host_reads_free(device):
        count_host = _check_targets_cpu(targets, weight.shape[0], ignore_index)
    per_row = reduction in ("none", _ROWS_AHEAD)
    need = (need_d_hidden, need_d_weight, need_d_bias) if reduction != "none" else (False, False, False)

    # The normaliser, as a device tensor so that the accelerator path never syncs; off CPU a mean over the scored
    # rows is formed by the torch path from the count it finds anyway.
    mean_over_count = reduction == "mean" and num_items is None and count_host is None
    normaliser = grad_scale = None
    if reduction == "mean" and not mean_over_count:
        if num_items is not None:
            normaliser = num_items.to(device=device, dtype=acc)
            normaliser = _checked_num_items(normaliser, count_host, targets, ignore_index)
        else:
            normaliser = torch.tensor(float(max(count_host or 0, 1)), dtype=acc, device=device)
        grad_scale = normaliser.reciprocal()
    # (else each row's gradient weight is 1: no grad_scale)

    low_rank = (low_a, low_b) if low_a is not None and low_b is not None else None
    res = _run(hidden, weight, bias, targets, options, grad_scale=grad_scale, row_scale=None, want_per_row=per_row,
               need=need, want_stats=want_stats, mean_over_count=mean_over_count, low_rank=low_rank,
               need_low_rank=need_low_rank and reduction != "none")  # fmt: skip
    if per_row:
        assert res.per_row is not None
        loss = res.per_row.to(acc)
    elif mean_over_count:
        loss = res.loss_sum.to(acc) / res.count.clamp(min=1)  # 0 without a scored row (its sum is 0)
    elif normaliser is not None:
        # A window without targets (num_items_in_batch = 0) has loss 0, not 0/0 (the all-ignored rule).
        loss = torch.where(res.count == 0, 0.0, res.loss_sum.to(acc) / normaliser).to(acc)
    else:
        loss = res.loss_sum.to(acc)
    return (
        loss,
        res.d_hidden if res.d_hidden is not None else hidden.new_empty(_EMPTY_GRAD),
        res.d_weight if res.d_weight is not None else weight.new_empty(_EMPTY_GRAD),
        res.d_bias if res.d_bias is not None else hidden.new_empty(_EMPTY_GRAD),
        res.token_stats if res.token_stats is not None else hidden.new_empty(_EMPTY_GRAD, dtype=torch.float64),
        res.d_low_a if res.d_low_a is not None else hidden.new_empty(_EMPTY_GRAD, dtype=acc),
        res.d_low_b if res.d_low_b is not None else hidden.new_empty(_EMPTY_GRAD, dtype=acc),
    )


def _checked_num_items(
    normaliser: torch.Tensor, count_host: int | None, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """``num_items_in_batch`` as the divisor of the summed loss; 0 is allowed only when no target counts.

    With no valid target the loss and gradients are 0 whatever the divisor (stock would give 0/0 = NaN). On CPU a
    divisor that is not a positive finite count while targets count raises; elsewhere, without a host sync, the
    loss and the gradients become NaN (stock gives inf or NaN), so the step is visibly bad.
    """
    if count_host is not None:
        value = float(normaliser)
        if count_host == 0:
            return torch.ones_like(normaliser)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(
                f"num_items_in_batch: expected a positive number of target tokens (the summed loss is divided by "
                f"it), got {value:g} with {count_host} target(s) not equal to ignore_index"
            )
        return normaliser
    valid = (targets != ignore_index).any()
    ok = (normaliser > 0) & torch.isfinite(normaliser)
    # Row gradients are scaled by 1/normaliser: 1 (times zero rows) without targets, NaN for a bad divisor.
    return torch.where(valid, torch.where(ok, normaliser, torch.nan), 1.0)


@_lce_op.register_fake
def _lce_fake(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    logits_bias: torch.Tensor | None,
    num_items: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    multiply: float,
    divide: float,
    softcap: float,
    reduction: str,
    impl: str,
    need_d_hidden: bool,
    need_d_weight: bool,
    need_d_bias: bool,
    temperature: float = 0.0,
    want_stats: bool = False,
    low_a: torch.Tensor | None = None,
    low_b: torch.Tensor | None = None,
    need_low_rank: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = _acc_dtype(hidden.dtype)
    per_row = reduction in ("none", _ROWS_AHEAD)
    loss = hidden.new_empty((hidden.shape[0],) if per_row else (), dtype=acc)
    grads = reduction != "none"
    low = grads and need_low_rank and low_a is not None and low_b is not None
    return (
        loss,
        hidden.new_empty(hidden.shape if grads and need_d_hidden else _EMPTY_GRAD),
        weight.new_empty(weight.shape if grads and need_d_weight else _EMPTY_GRAD),
        hidden.new_empty((weight.shape[0],) if grads and need_d_bias and bias is not None else _EMPTY_GRAD),
        hidden.new_empty((hidden.shape[0], torch_path.TOKEN_STATS) if want_stats else _EMPTY_GRAD, dtype=torch.float64),
        hidden.new_empty(low_a.shape if low and low_a is not None else _EMPTY_GRAD, dtype=acc),
        hidden.new_empty(low_b.shape if low and low_b is not None else _EMPTY_GRAD, dtype=acc),
    )


@torch.library.custom_op("logitless::linear_cross_entropy_rows_backward", mutates_args=())
def _rows_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045
    targets: torch.Tensor,
    logits_bias: Optional[torch.Tensor],  # noqa: UP045
    grad_rows: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    multiply: float,
    divide: float,
    softcap: float,
    impl: str,
    need_d_hidden: bool,
    need_d_weight: bool,
    need_d_bias: bool,
    temperature: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``Σ_i grad_rows[i] · l_i`` (reduction="none"): a second fused pass, no logits were kept."""
    options = LossOptions.from_op(
        logits_bias, ignore_index, label_smoothing, z_loss, multiply, divide, softcap, impl, temperature
    )
    res = _run(hidden, weight, bias, targets, options, grad_scale=None,
               row_scale=grad_rows.to(torch.float32).contiguous(), want_per_row=False,
               need=(need_d_hidden, need_d_weight, need_d_bias))  # fmt: skip
    return (
        res.d_hidden if res.d_hidden is not None else hidden.new_empty(_EMPTY_GRAD),
        res.d_weight if res.d_weight is not None else weight.new_empty(_EMPTY_GRAD),
        res.d_bias if res.d_bias is not None else hidden.new_empty(_EMPTY_GRAD),
    )


@_rows_backward_op.register_fake
def _rows_backward_fake(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    logits_bias: torch.Tensor | None,
    grad_rows: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    multiply: float,
    divide: float,
    softcap: float,
    impl: str,
    need_d_hidden: bool,
    need_d_weight: bool,
    need_d_bias: bool,
    temperature: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        hidden.new_empty(hidden.shape if need_d_hidden else _EMPTY_GRAD),
        weight.new_empty(weight.shape if need_d_weight else _EMPTY_GRAD),
        hidden.new_empty((weight.shape[0],) if need_d_bias and bias is not None else _EMPTY_GRAD),
    )


# ---------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------

# Positions of the custom op's arguments (its schema above).
_N_INPUTS = 22
_HIDDEN, _WEIGHT, _BIAS = 0, 1, 2
_LOW_A, _LOW_B = 19, 20


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    (hidden, weight, bias, targets, logits_bias, _num_items, ignore_index, label_smoothing, z_loss, multiply,
     divide, softcap, reduction, impl, need_dh, need_dw, need_db, temperature, _want_stats, _low_a, _low_b,
     need_low_rank) = inputs  # fmt: skip
    ctx.reduction = reduction
    ctx.need = (need_dh, need_dw, need_db)
    ctx.need_low_rank = need_low_rank
    # The gradient outputs are never differentiated; materialised zero "gradients" for them would cost a V×H
    # temporary in every backward (125 MiB for a 32000×1024 float32 head).
    ctx.set_materialize_grads(False)
    if reduction in ("none", _ROWS_AHEAD):
        ctx.save_for_backward(hidden, weight, bias, targets, logits_bias)
        ctx.options = LossOptions.from_op(
            None, ignore_index, label_smoothing, z_loss, multiply, divide, softcap, impl, temperature
        )
        # The sum's gradients, for the first backward only: it scales them in place (no V×H copy) and a later one
        # (retain_graph) runs the second pass. Detached aliases: the op's outputs on their own node would be a cycle.
        ctx.precomputed = None
        if reduction == _ROWS_AHEAD:
            _, d_hidden, d_weight, d_bias, _stats, _, _ = output
            ctx.precomputed = (d_hidden.detach(), d_weight.detach(), d_bias.detach())
    else:
        _, d_hidden, d_weight, d_bias, _stats, d_low_a, d_low_b = output
        ctx.save_for_backward(d_hidden, d_weight, d_bias, d_low_a, d_low_b)
        ctx.impl = impl


def _rows_backward(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The second pass of ``reduction="none"``'s backward (a function of its own so tests can count its calls):
    its custom op, or in plain eager mode the op's body (``_plain_eager``)."""
    if _plain_eager(args[:_ROWS_TENSOR_INPUTS]):
        return _rows_backward_op._init_fn(*args)
    return torch.ops.logitless.linear_cross_entropy_rows_backward(*args)


def _uniform_factor(grad_rows: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """The one value ``grad_rows`` takes at every counted row (0 when none counts), or None (``expect_uniform_grad``).
    Found on the device and read on the host once: free on CPU, one device sync on CUDA (which then has finished the
    forward; the second pass it saves is a GEMM over every row). None outside CPU and CUDA, while tracing, and while
    a CUDA graph is captured (no host read there)."""
    if torch.compiler.is_compiling() or type(grad_rows) is not torch.Tensor or not _host_read_allowed(grad_rows.device):
        return None
    flat = grad_rows.reshape(-1)
    if flat.numel() == 0:
        return grad_rows.new_zeros(())
    counted = targets.reshape(-1).to(flat.device) != ignore_index
    low = torch.where(counted, flat, math.inf).amin()
    high = torch.where(counted, flat, -math.inf).amax()
    low_value, high_value = torch.stack((low, high)).tolist()  # the one host read
    if low_value == math.inf and high_value == -math.inf:  # no counted row
        return grad_rows.new_zeros(())
    return low if low_value == high_value else None  # (a NaN is never equal: the second pass, exact)


def _host_read_allowed(device: torch.device) -> bool:
    """Whether the op may read a device value on the host: always on CPU; on CUDA (a sync) outside graph capture."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def _is_one(grad: torch.Tensor) -> bool:
    """grad == 1, asked only where the answer is free: on CPU, outside tracing (no device sync, no graph break)."""
    traced = torch.compiler.is_compiling() or type(grad) is not torch.Tensor  # fake / functional tensors
    return not traced and _host_reads_free(grad.device) and float(grad) == 1.0


def _scaled_in_place(grads: tuple[torch.Tensor, ...], grad_loss: torch.Tensor, impl: str) -> bool:
    """The saved gradients times ``grad_loss``, in place (``_scale_saved_``), where the graph is freed after this
    backward: with ``retain_graph`` a later backward reads the saved gradients again. False where it does not apply
    (the caller scales)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None or keep_graph():
        return False
    return _scale_saved_(grads, grad_loss, impl)


def _scale_saved_(grads: tuple[torch.Tensor, ...], factor: torch.Tensor, impl: str) -> bool:
    """``grads`` times ``factor`` in place by the Triton kernel that reads the factor on the device and does nothing
    when it is 1: no device sync to learn it, and no second V×H head gradient (on a GPU ``d * g`` holds both and
    spends a pass over them, 1.1 ms of a 24.6 ms call at 8192×2048×128256 bf16 on an H200). For ``impl="triton"``
    outside tracing; False, nothing done, where it does not apply."""
    if impl != "triton" or torch.compiler.is_compiling() or type(factor) is not torch.Tensor:
        return False
    if factor.device.type == "cpu" and not _options.triton_interpreted():
        return False  # on CPU the factor is read on the host for free (_is_one)
    factor = factor.detach().reshape(())
    if factor.dtype != torch.float32:  # float64 inputs: their gradients are scaled by torch
        return False
    from logitless import triton_path

    if not triton_path.scale_(grads, factor):  # where it does not take them: torch's product, in place too
        for g in grads:
            g.mul_(factor)
    return True


def _backward(
    ctx: torch.autograd.function.FunctionCtx,
    grad_loss: torch.Tensor | None,
    *_unused: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "logitless.linear_cross_entropy does not support double backward (create_graph=True): its gradients "
            "are computed in the forward pass and are constants to autograd"
        )
    grads: list[torch.Tensor | None] = [None] * _N_INPUTS
    if grad_loss is None:  # the loss itself was not differentiated (only a gradient output was)
        return tuple(grads)
    if ctx.reduction in ("none", _ROWS_AHEAD):
        hidden, weight, bias, targets, logits_bias = ctx.saved_tensors
        options: LossOptions = ctx.options
        precomputed, ctx.precomputed = ctx.precomputed, None
        rows_only = ctx.need == (True, False, False)
        uniform = precomputed is not None and not rows_only
        factor = _uniform_factor(grad_loss, targets, options.ignore_index) if uniform else None
        if precomputed is not None and rows_only:
            # Only hidden's gradient: row i of ∇Σ_i g_i·l_i is g_i times row i of ∇Σ_i l_i (l_i reads row i alone).
            # In place, in hidden's dtype (the product formed in float32, as the uniform scaling below).
            d_hidden, d_weight, d_bias = precomputed[0].mul_(grad_loss.reshape(-1, 1)), None, None
        elif precomputed is not None and factor is not None:
            # Σ_i g·∇l_i = g·∇Σ_i l_i: the sum's gradients from the forward pass, scaled (ignored rows add nothing).
            if not _is_one(factor) and not _scale_saved_(precomputed, factor, options.impl):
                for t in precomputed:
                    t.mul_(factor)
            d_hidden, d_weight, d_bias = precomputed
        else:
            d_hidden, d_weight, d_bias = _rows_backward(
                hidden, weight, bias, targets, logits_bias, grad_loss, *options.scalars(), options.impl, *ctx.need,
                options.epilogue.temperature or 0.0,
            )  # fmt: skip
    else:
        d_hidden, d_weight, d_bias, d_low_a, d_low_b = ctx.saved_tensors
        saved = (d_hidden, d_weight, d_bias, d_low_a, d_low_b)
        if not _scaled_in_place(saved, grad_loss, ctx.impl) and not _is_one(grad_loss):
            # A 0-d float32 factor keeps each gradient's dtype; the product is formed in float32 (torch's opmath).
            d_hidden, d_weight, d_bias, d_low_a, d_low_b = (g * grad_loss for g in saved)
        # else: the saved gradients (scaled in place, or grad_output is 1) are handed over as they are. Without
        # retain_graph autograd adopts them as .grad (no copy of the V×H head gradient); with it, autograd copies
        # them, so the saved ones stay intact.
        if ctx.need_low_rank:
            grads[_LOW_A], grads[_LOW_B] = d_low_a, d_low_b
    for pos, needed, grad in zip((_HIDDEN, _WEIGHT, _BIAS), ctx.need, (d_hidden, d_weight, d_bias)):
        if needed:
            grads[pos] = grad
    return tuple(grads)


_lce_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerOp(torch.autograd.Function):
    """The custom op's forward and backward (``_lce_op``'s body, ``_setup_context``, ``_backward``) as a plain
    autograd Function. In eager mode on plain tensors the custom op's dispatch costs more host time than it buys (on
    CPU a tiny call's forward took 0.55 ms through it, 0.25 through this, the body alone 0.20), and on a GPU that
    host time is what a small call waits for. ``_call_op`` picks it only where nothing could see the difference."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        output = _lce_op._init_fn(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return _backward(ctx, *grads)


def _call_op(*inputs: Any) -> tuple[torch.Tensor, ...]:
    """``logitless::linear_cross_entropy`` on ``inputs``: the registered custom op wherever something may look at
    it as one op (``torch.compile`` and other tracing, torch-function or dispatch modes such as FakeTensorMode or a
    FLOP counter, functorch transforms, tensor subclasses such as DTensor), else ``_EagerOp``, which runs the same
    code with less host overhead."""
    if _plain_eager(inputs[:_TENSOR_INPUTS] + inputs[_LOW_A : _LOW_B + 1]):
        return _EagerOp.apply(*inputs)
    return torch.ops.logitless.linear_cross_entropy(*inputs)


def _plain_eager(tensors: tuple[Any, ...]) -> bool:
    """Nothing traces, intercepts or transforms the call and its tensors are plain: the ops' bodies may run as
    Python functions."""
    return (
        not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._are_functorch_transforms_active()
        and all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
    )


# The ops' tensor arguments (their schemas above): hidden, weight, bias, targets, logits_bias, num_items; and
# hidden, weight, bias, targets, logits_bias, grad_rows.
_TENSOR_INPUTS = 6
_ROWS_TENSOR_INPUTS = 6
