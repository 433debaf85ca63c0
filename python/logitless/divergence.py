"""``linear_divergence``: a student's divergence from a teacher's next-token distribution, without the logits.

Knowledge distillation (TRL's ``DistillationTrainer``, GKD) compares two models' distributions over the whole
vocabulary at every position; done naively it holds both ``[tokens, V]`` float32 logits and the student's gradient.
This op takes both models' hidden states and heads instead and works chunk by chunk over rows (docs/spec.md §1.7):

* for each chunk, both logits in float32 (the model's own epilogue, then the temperature), both log-softmaxes, the
  divergence per row, the student's entropy per row, and ``d divergence / d student logits``;
* that gradient's products with the student's head (``d hidden``) and hidden states (``d weight``) in the same
  pass, so backward only scales them: one GEMM per model for the logits, two for the gradients, none recomputed
  (TRL's kernel recomputes both models' logits in backward, and the JSD's in a second forward pass);
* masked positions are dropped before any GEMM.

``beta`` picks the divergence, as TRL does: 0 is the forward KL(teacher ‖ student), 1 the reverse KL(student ‖
teacher), anything between the generalized JSD ``β·KL(p_t ‖ m) + (1-β)·KL(p_s ‖ m)`` with the mixture
``m = (1-β)·p_s + β·p_t``. The teacher gets no gradient.

The chunks are torch ops on every device (the Rust kernel and the Triton kernels have no divergence row pass yet).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from logitless import _options, ops, torch_path
from logitless._options import Epilogue

__all__ = ["EPILOGUE_KEYS", "linear_divergence"]

EPILOGUE_KEYS = ("logits_bias", "logit_scale_multiply", "logit_scale_divide", "logit_softcapping")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Buffers per chunk row, in units of 4·V bytes: both models' float32 logits, both models' probabilities, the
# softcap's tanh, and the bf16 copy of the gradient for the GEMMs.
_TEMPS_PER_ROW = 6
# Every chunk streams both heads through its GEMMs, so chunks must not be short: at 2048×1024×128256 (bf16, student
# 1024 and teacher 2048 wide, reverse KL, this project's 2-core machine) 66 MiB chunks (18 rows) took 34 s a call,
# 512 MiB (about 160 rows) 6.0 s. LOGITLESS_CHUNK_MB overrides it.
_MIN_CHUNK_MB = 512


def linear_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    epilogue: Mapping[str, Any] | None = None,
    teacher_epilogue: Mapping[str, Any] | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The divergence of ``softmax(epilogue(hidden·weightᵀ + bias) / temperature)`` (the student) from the
    teacher's same distribution, summed over the positions ``mask`` keeps and divided by their count
    (``reduction="mean"``, or by ``num_items_in_batch`` when given) or not (``"sum"``).

    ``hidden`` ``[..., H]`` and ``teacher_hidden`` ``[..., H_t]`` share their leading shape; ``weight`` ``[V, H]`` and
    ``teacher_weight`` ``[V, H_t]`` their vocabulary. ``epilogue`` / ``teacher_epilogue``: each model's own
    logit epilogue (keys ``logits_bias``, ``logit_scale_multiply``, ``logit_scale_divide``, ``logit_softcapping``, as
    ``linear_cross_entropy`` takes them), applied before the temperature. ``beta``: see the module docstring (TRL's
    convention; its DistillationConfig default is 1.0, the reverse KL). ``return_entropy``: also each position's
    entropy of the student's distribution (zero where masked; no gradient).
    Gradients reach ``hidden``, ``weight`` and ``bias``; a teacher tensor that requires grad is refused.
    """
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    autocast = ops._autocast_on(device_type)
    if autocast:
        # Under autocast both models' heads (F.linear) run in the autocast dtype, whatever their parameters' dtype:
        # so do the op's GEMMs (its row pass stays float32), and autocast must not recast them again.
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias = (
            _autocast(t, device_type) for t in (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
        )
    call = _checked(hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias, epilogue, teacher_epilogue,
                    mask, beta, temperature, reduction, num_items_in_batch)  # fmt: skip
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        loss, entropy = _Divergence.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias,
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(), teacher_weight.detach(),
            teacher_bias.detach() if teacher_bias is not None else None, call, torch.is_grad_enabled(),
        )  # fmt: skip
    if return_entropy:
        return loss, entropy.reshape(hidden.shape[:-1])
    return loss


def _autocast(value: Any, device_type: str) -> Any:
    """A floating tensor in the autocast dtype (float64 kept, as autocast keeps it); anything else as given."""
    if not isinstance(value, torch.Tensor) or value.dtype not in _FLOAT_DTYPES or value.dtype == torch.float64:
        return value
    return value.to(torch.get_autocast_dtype(device_type))


@dataclass(frozen=True)
class _Call:
    beta: float
    student: Epilogue
    teacher: Epilogue
    rows: torch.Tensor | None  # the kept positions (flattened), None = all
    reduction: str
    num_items: torch.Tensor | None


def _checked(
    hidden: Any, weight: Any, teacher_hidden: Any, teacher_weight: Any, bias: Any, teacher_bias: Any,
    epilogue: Any, teacher_epilogue: Any, mask: Any, beta: Any, temperature: Any, reduction: Any, num_items: Any,
) -> _Call:  # fmt: skip
    """Validates the call (each error names the argument as the user wrote it)."""
    for name, value in (("hidden", hidden), ("weight", weight), ("teacher_hidden", teacher_hidden),
                        ("teacher_weight", teacher_weight)):  # fmt: skip
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(value).__name__}")
        if value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a float32/bfloat16/float16/float64 tensor, got {value.dtype}")
    if hidden.ndim < 1 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1] if hidden.ndim else 'H'}] (hidden is "
                         f"{tuple(hidden.shape)}), got {tuple(weight.shape)}")  # fmt: skip
    if teacher_hidden.ndim < 1 or teacher_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden: expected shape [{', '.join(map(str, hidden.shape[:-1]))}, H_t] (the "
                         f"positions of hidden), got {tuple(teacher_hidden.shape)}")  # fmt: skip
    vocab = weight.shape[0]
    if teacher_weight.ndim != 2 or teacher_weight.shape != (vocab, teacher_hidden.shape[-1]):
        raise ValueError(f"teacher_weight: expected shape [{vocab}, {teacher_hidden.shape[-1]}] (the student's "
                         f"vocabulary, the teacher's hidden size), got {tuple(teacher_weight.shape)}")  # fmt: skip
    for name, value, like, of in (("weight", weight, hidden, "hidden"),
                                  ("teacher_weight", teacher_weight, teacher_hidden, "teacher_hidden")):  # fmt: skip
        if value.dtype != like.dtype:
            raise TypeError(f"{name}: expected dtype {like.dtype} (the dtype of {of}), got {value.dtype}")
    device = hidden.device
    for name, value in (("weight", weight), ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if value.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of hidden), got {value.device}")
    for name, value, like in (("bias", bias, weight), ("teacher_bias", teacher_bias, teacher_weight)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.shape != (vocab,) or value.device != device:
            raise ValueError(f"{name}: expected None or a tensor of shape ({vocab},) on {device}, got "
                             f"{_describe(value)}")  # fmt: skip
        if value.dtype != like.dtype:
            raise TypeError(f"{name}: expected dtype {like.dtype} (its head's), got {value.dtype}")
    if torch.is_grad_enabled():
        for name, value in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                            ("teacher_bias", teacher_bias)):  # fmt: skip
            if value is not None and value.requires_grad:
                raise TypeError(f"{name}: expected a tensor that does not require grad; the teacher gets no "
                                "gradient (run it under torch.no_grad(), or .detach() it)")  # fmt: skip
    beta = _options._number(beta, "beta")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a value in [0, 1], got {beta}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    temperature_value = _options._temperature(temperature)
    student = _epilogue(epilogue, "epilogue", vocab, device, temperature_value)
    teacher = _epilogue(teacher_epilogue, "teacher_epilogue", vocab, device, temperature_value)
    return _Call(beta, student, teacher, _rows(mask, hidden), reduction, _num_items(num_items, reduction, device))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} on {value.device}"
    return type(value).__name__


def _epilogue(
    given: Mapping[str, Any] | None, what: str, vocab: int, device: torch.device, temperature: float | None
) -> Epilogue:
    given = dict(given or {})
    unknown = sorted(set(given) - set(EPILOGUE_KEYS))
    if unknown:
        raise ValueError(f"{what}: expected keys among {EPILOGUE_KEYS}, got {unknown}")
    options = _options.parse(
        device=device, vocab=vocab, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
        logit_scale_multiply=given.get("logit_scale_multiply"), logit_scale_divide=given.get("logit_scale_divide"),
        logit_softcapping=given.get("logit_softcapping"), logits_bias=given.get("logits_bias"), impl="torch",
        temperature=temperature,
    )  # fmt: skip
    return options.epilogue


def _rows(mask: Any, hidden: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.shape != hidden.shape[:-1]:
        raise ValueError(f"mask: expected None or a tensor of shape {tuple(hidden.shape[:-1])} (the positions of "
                         f"hidden), got {_describe(mask)}")  # fmt: skip
    if mask.dtype.is_floating_point or mask.is_complex():
        raise TypeError(f"mask: expected a bool or integer tensor (nonzero = kept), got {mask.dtype}")
    # A host read of the kept count, as TRL's own compaction does: only the kept rows enter the GEMMs.
    return mask.reshape(-1).to(hidden.device).nonzero().squeeze(1)


def _num_items(value: Any, reduction: str, device: torch.device) -> torch.Tensor | None:
    if value is None:
        return None
    if reduction != "mean":
        raise ValueError('num_items_in_batch: expected None with reduction="sum" (it divides the mean)')
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"num_items_in_batch: expected a number, got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(()).to(device=device, dtype=torch.float64)
    return torch.tensor(_options._number(value, "num_items_in_batch"), dtype=torch.float64, device=device)


class _Divergence(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t_hidden: torch.Tensor,
        t_weight: torch.Tensor, t_bias: torch.Tensor | None, call: _Call, grad_enabled: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        # needs_input_grad says what requires grad even under no_grad (evaluation): no gradient is formed there.
        needs = [grad_enabled and need for need in ctx.needs_input_grad[:3]]
        wants = (needs[0], needs[1], bias is not None and needs[2])
        loss, entropy, grads = _forward(hidden, weight, bias, t_hidden, t_weight, t_bias, call, wants)
        ctx.grads = grads
        ctx.mark_non_differentiable(entropy)
        return loss, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: torch.Tensor | None, _grad_entropy: Any
    ) -> tuple[Any, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError("linear_divergence: double backward (create_graph=True) is not supported")
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("linear_divergence: backward ran twice; pass retain_graph=False or call the op again")
        if grad_loss is None:
            return (None,) * 8
        # The buffers are this call's own: scaled in place, then cast (no second float32 V×H copy).
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)).to(like) for g, like in grads]
        return (*scaled, None, None, None, None, None)


def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t_hidden: torch.Tensor,
    t_weight: torch.Tensor, t_bias: torch.Tensor | None, call: _Call, wants: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor | None, torch.dtype]]]:  # fmt: skip
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = torch.float64 if torch.float64 in (hidden.dtype, t_hidden.dtype) else torch.float32
    rows = call.rows
    kept = n if rows is None else rows.numel()
    entropy = torch.zeros(n, dtype=acc, device=hidden.device)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    want_dx, want_dw, want_db = wants
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if want_dx else None
    d_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if want_db else None
    if call.reduction == "sum":
        scale: torch.Tensor | float = 1.0
    elif call.num_items is not None:
        scale = 1.0 / call.num_items.to(acc)
    else:
        scale = 1.0 / max(kept, 1)
    budget = torch_path.chunk_budget_bytes(kept, vocab, hidden.shape[1], min_mb=_MIN_CHUNK_MB)
    step = max(1, min(kept, budget // (_TEMPS_PER_ROW * vocab * 4)))
    space = _Workspace(step, vocab, acc, hidden.device)
    weight_grad = _WeightGrad(weight, hidden.shape[1], step, kept, acc) if want_dw else None
    w_t, tw_t = weight.T, t_weight.T
    for start in range(0, kept, step):
        index = None if rows is None else rows[start : start + step]
        x = hidden[start : start + step] if index is None else hidden.index_select(0, index)
        xt = t_hidden[start : start + step] if index is None else t_hidden.index_select(0, index)
        m = x.shape[0]
        zs = space.logits(space.student[:m], x, w_t, bias)
        capped = _epilogue_in_place(zs, call.student, space.capped[:m] if call.student.softcap else None)
        zt = space.logits(space.teacher[:m], xt, tw_t, t_bias)
        _epilogue_in_place(zt, call.teacher, None)
        divergence, ent, g = _row_pass(zs, zt, call.beta, space.scratch(m))
        total += divergence.sum()
        _put(entropy, start, index, ent)
        if not (want_dx or want_dw or want_db):
            continue
        g *= scale
        torch_path._epilogue_backward(g, capped, call.student)
        g_lp = space.low(g, weight.dtype)
        if want_dx:
            _put(d_hidden, start, index, torch_path._mm(g_lp, weight, acc))
        if weight_grad is not None:
            weight_grad.add(g_lp, x)
        if want_db:
            d_bias += g.sum(0)
    d_weight = weight_grad.result() if weight_grad is not None else None
    grads = [(d_hidden, hidden.dtype), (d_weight, weight.dtype), (d_bias, bias.dtype if bias is not None else acc)]
    return total * scale, entropy, grads


class _Workspace:
    """One call's chunk buffers, allocated once: float32 ``[rows, V]`` temporaries allocated and freed chunk by chunk
    page-fault their memory in every chunk (2048×1024×128256 bf16, this project's machine: the row pass took 12.4 s
    that way)."""

    def __init__(self, rows: int, vocab: int, acc: torch.dtype, device: torch.device) -> None:
        def buffer() -> torch.Tensor:
            return torch.empty(rows, vocab, dtype=acc, device=device)

        self.student, self.teacher = buffer(), buffer()
        self._scratch = [buffer(), buffer()]
        self._acc, self._device, self._shape = acc, device, (rows, vocab)
        self._low: dict[torch.dtype, torch.Tensor] = {}
        self._capped: torch.Tensor | None = None

    @property
    def capped(self) -> torch.Tensor:
        if self._capped is None:
            self._capped = torch.empty(self._shape, dtype=self._acc, device=self._device)
        return self._capped

    def scratch(self, m: int) -> list[torch.Tensor]:
        return [b[:m] for b in self._scratch]

    def _low_buffer(self, dtype: torch.dtype, m: int) -> torch.Tensor:
        if dtype not in self._low:
            self._low[dtype] = torch.empty(self._shape, dtype=dtype, device=self._device)
        return self._low[dtype][:m]

    def low(self, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``g`` in the head's dtype for the gradient GEMMs (itself where that is the accumulation dtype)."""
        return g if dtype == g.dtype else self._low_buffer(dtype, g.shape[0]).copy_(g)

    def logits(self, out: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x·Wᵀ + b`` into ``out`` (float32): straight from the GEMM where the inputs are, in the head's dtype
        then widened on CPU (rounded as stock's head rounds them), from a bf16 GEMM with float32 output on CUDA."""
        if x.dtype == out.dtype:
            torch.mm(x, w_t, out=out)
        elif out.device.type == "cuda":
            try:
                torch.mm(x, w_t, out_dtype=out.dtype, out=out)
            except (RuntimeError, NotImplementedError, TypeError):
                out.copy_(x @ w_t)
        else:
            out.copy_(torch.mm(x, w_t, out=self._low_buffer(x.dtype, x.shape[0])))
        if bias is not None:
            out += bias.to(out.dtype)
        return out


class _WeightGrad:
    """``d_weight = Σ gᵀ·x`` over the chunks without re-adding into a V×H buffer per chunk: the chunks' ``g`` (in
    the head's dtype, as the GEMMs take it) and ``x`` rows are gathered into blocks of V×H×4 bytes (2·H rows of a
    bf16 head, H of a float32 one) and each block is one GEMM. Exact float32 accumulation inside the GEMM for
    float32 heads and on CUDA (bf16 GEMM, float32 output, added into a float32 buffer). A bf16/f16 head on CPU, where
    torch has no bf16 GEMM with a float32 output and its float32 GEMM is 4x slower, takes the bf16 GEMM's product,
    rounded once per block as stock's gradient is rounded once; a second block's product is summed in float32.
    (At 2048×1024×128256 bf16 re-adding per 102-row chunk took 0.35 s a chunk, 7 s in all.)"""

    def __init__(self, weight: torch.Tensor, dim: int, step: int, rows: int, acc: torch.dtype) -> None:
        block = max(step, min(rows, (dim * 4) // weight.element_size()))
        self._g = torch.empty(block, weight.shape[0], dtype=weight.dtype, device=weight.device)
        self._x = torch.empty(block, dim, dtype=weight.dtype, device=weight.device)
        self._filled = 0
        self._acc = acc
        self._exact = weight.dtype == acc or weight.device.type == "cuda"
        self._sum: torch.Tensor | None = None  # float32 (exact mode, or a second bf16 block)
        self._product: torch.Tensor | None = None  # the last bf16 block's product (CPU)

    def add(self, g: torch.Tensor, x: torch.Tensor) -> None:
        start = 0
        while start < g.shape[0]:
            take = min(g.shape[0] - start, self._g.shape[0] - self._filled)
            self._g[self._filled : self._filled + take].copy_(g[start : start + take])
            self._x[self._filled : self._filled + take].copy_(x[start : start + take])
            self._filled += take
            start += take
            if self._filled == self._g.shape[0]:
                self._flush()

    def _flush(self) -> None:
        if self._filled == 0:
            return
        g, x = self._g[: self._filled], self._x[: self._filled]
        self._filled = 0
        if self._exact:
            if self._sum is None:
                self._sum = torch.zeros(g.shape[1], x.shape[1], dtype=self._acc, device=g.device)
            torch_path._add_mm(self._sum, g if g.dtype == self._acc else None, g, x)
            return
        if self._product is not None:
            # A second block: the sum goes to float32.
            self._sum = self._product.to(self._acc) if self._sum is None else self._sum.add_(self._product)
        else:
            self._product = torch.empty(g.shape[1], x.shape[1], dtype=g.dtype, device=g.device)
        torch.mm(g.T, x, out=self._product)

    def result(self) -> torch.Tensor:
        self._flush()
        if self._exact or self._product is None:
            # (no rows at all: the gradient is zero)
            return self._sum if self._sum is not None else torch.zeros(self._g.shape[1], self._x.shape[1],
                                                                       dtype=self._acc, device=self._g.device)
        return self._product if self._sum is None else self._sum.add_(self._product)


def _epilogue_in_place(z: torch.Tensor, epilogue: Epilogue, capped: torch.Tensor | None) -> torch.Tensor | None:
    """The epilogue (spec §1.2) and the temperature on ``z``, in place; where softcapped and ``capped`` is given,
    ``tanh(z / c)`` is left in it for the gradient (the teacher needs none)."""
    if epilogue.logits_bias is not None:
        z += epilogue.logits_bias.to(z.dtype)
    if epilogue.multiply is not None:
        z *= epilogue.multiply
    if epilogue.divide is not None:
        z /= epilogue.divide
    if epilogue.softcap is not None:
        if capped is not None:
            torch.div(z, epilogue.softcap, out=capped).tanh_()
            torch.mul(capped, epilogue.softcap, out=z)
        else:
            z.div_(epilogue.softcap).tanh_().mul_(epilogue.softcap)
    if epilogue.temperature is not None:
        z /= epilogue.temperature
    return capped if epilogue.softcap is not None else None


def _put(out: torch.Tensor, start: int, index: torch.Tensor | None, value: torch.Tensor) -> None:
    """A chunk's rows into ``out``: rows ``start:`` of it, or the kept rows ``index``."""
    if index is None:
        out[start : start + value.shape[0]].copy_(value)
    else:
        out.index_copy_(0, index, value)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_j a_ij·b_ij`` per row, with no ``[rows, V]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _normalise_(z: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``z`` shifted by its row maximum in place and the probabilities into ``probs``; returns each row's sum of
    ``exp`` (``log p = z - log total``)."""
    z -= z.amax(dim=1, keepdim=True)
    total = torch.exp(z, out=probs).sum(dim=1, keepdim=True)
    probs /= total
    return total


def _row_pass(
    zs: torch.Tensor, zt: torch.Tensor, beta: float, scratch: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the divergence, the student's entropy, and ``d divergence / d zs`` (in one of the buffers); ``zs``
    and ``zt`` are consumed.

    Everything is formed from ``d = log p_s - log p_t`` elementwise: a divergence is a small difference of terms the
    size of an entropy, and each model's log-sum-exp, rounded to float32 at its own size (2.4e-7 at log V = 5.5),
    would otherwise enter it as a per-row offset (a 1e-5 relative error on a 0.02 KL). The two log-sum-exps enter
    only as the log of their ratio."""
    ps, pt = scratch
    total_s = _normalise_(zs, ps)
    total_t = _normalise_(zt, pt)
    entropy = total_s.log().view(-1) - _rowdot(ps, zs)
    d = zs.sub_(zt).sub_(torch.log(total_s / total_t))
    if beta == 0.0:
        # KL(p_t ‖ p_s); its gradient is p_s - p_t.
        return -_rowdot(pt, d), entropy, ps.sub_(pt)
    if beta == 1.0:
        # KL(p_s ‖ p_t); its gradient is p_s·(log p_s - log p_t - KL).
        divergence = _rowdot(ps, d)
        return divergence, entropy, d.sub_(divergence.unsqueeze(1)).mul_(ps)
    # With m = β·p_t + (1-β)·p_s: log(p_t/m) = -log(β + (1-β)·e^d), as a logaddexp (finite wherever d is, however
    # small both probabilities are), and log(p_s/m) = d + log(p_t/m).
    log_beta = torch.full((), math.log(beta), dtype=zt.dtype, device=zt.device)
    teacher_gap = torch.logaddexp(torch.add(d, math.log1p(-beta), out=zt), log_beta, out=zt).neg_()
    kl_teacher = _rowdot(pt, teacher_gap)
    student_gap = d.add_(teacher_gap)
    kl_student = _rowdot(ps, student_gap)
    divergence = beta * kl_teacher + (1.0 - beta) * kl_student
    # d/dz_s of (1-β)·KL(p_s ‖ m) + β·KL(p_t ‖ m), with ∂m/∂z_s folded in:
    # (1-β)·p_s·(log p_s - log m - KL(p_s ‖ m)).
    return divergence, entropy, student_gap.sub_(kl_student.unsqueeze(1)).mul_(ps).mul_(1.0 - beta)
