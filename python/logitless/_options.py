"""The op's options as one typed object, validated once and carried from ``linear_cross_entropy`` to the kernel call.

The custom ops' schemas can only take primitives, so ``LossOptions`` crosses them as ``logits_bias`` plus
``scalars()`` (in the schema's order) and is rebuilt on the other side with ``from_op``; everything else passes
the object itself. Adding an option means: a field here, its check in ``parse``, its use in the two
implementations, and (if the schema must carry it) one slot in ``scalars``/``from_op`` and the op signatures.
"""

from __future__ import annotations

import functools
import math
import os
import operator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Epilogue", "LossOptions", "parse"]

IMPLS = ("auto", "rust", "torch", "triton")


@dataclass(frozen=True)
class Epilogue:
    """What is done to the logits between the head and the loss; ``None`` = not set."""

    logits_bias: torch.Tensor | None = None
    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None
    # Divides the logits after every other step (a sampling temperature); None = 1.
    temperature: float | None = None


@dataclass(frozen=True)
class LossOptions:
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    epilogue: Epilogue = field(default_factory=Epilogue)
    # "rust" or "torch" once resolved for the call's device.
    impl: str = "torch"

    def scalars(self) -> tuple[int, float, float, float, float, float]:
        """``ignore_index, label_smoothing, z_loss, multiply, divide, softcap`` as the custom ops take them
        (0.0 = an epilogue step not set)."""
        e = self.epilogue
        return (
            self.ignore_index,
            self.label_smoothing,
            self.z_loss,
            e.multiply or 0.0,
            e.divide or 0.0,
            e.softcap or 0.0,
        )

    @classmethod
    def from_op(
        cls,
        logits_bias: torch.Tensor | None,
        ignore_index: int,
        label_smoothing: float,
        z_loss: float,
        multiply: float,
        divide: float,
        softcap: float,
        impl: str,
        temperature: float = 0.0,
    ) -> LossOptions:
        epilogue = Epilogue(logits_bias, multiply or None, divide or None, softcap or None, temperature or None)
        return cls(ignore_index, label_smoothing, z_loss, epilogue, impl)


@functools.cache
def triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    # Triton's own switch, not a LOGITLESS_* setting: it decides how the kernels run, so it is read as Triton does.
    return os.environ.get("TRITON_INTERPRET") == "1"


def _no_gradient_wanted(value: torch.Tensor, what: str, expected: str = "a number or a tensor") -> None:
    """Epilogue and loss constants enter the op as constants: a tensor that wants a gradient would silently get
    none, so it is refused."""
    if value.requires_grad and torch.is_grad_enabled():
        raise TypeError(
            f"{what}: expected {expected} that does not require grad; the op computes no gradient for "
            "it (pass a float, or .detach() it)"
        )


def _number(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor):
        _no_gradient_wanted(value, what)
        if value.numel() != 1:
            raise ValueError(f"{what}: expected a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected a number, got bool")
    try:
        number = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what}: expected a number, got {type(value).__name__}") from e
    if not math.isfinite(number):
        raise ValueError(f"{what}: expected a finite number, got {number}")
    return number


def _epilogue_value(value: Any, what: str) -> float | None:
    """An epilogue constant: ``None`` or 0 = not set (models read them from configs where they are often None)."""
    if value is None:
        return None
    return _number(value, what) or None


def _temperature(value: Any) -> float | None:
    if value is None:
        return None
    t = _number(value, "temperature")
    if not t > 0.0:
        raise ValueError(f"temperature: expected a value > 0, got {t}")
    return None if t == 1.0 else t


def parse(
    *,
    device: torch.device,
    vocab: int,
    ignore_index: Any,
    label_smoothing: Any,
    z_loss: Any,
    logit_scale_multiply: Any,
    logit_scale_divide: Any,
    logit_softcapping: Any,
    logits_bias: torch.Tensor | None,
    impl: str,
    temperature: Any = None,
) -> LossOptions:
    """Validates the user's arguments (errors name them as the user wrote them) and resolves ``impl="auto"``."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "rust" if device.type == "cpu" else ("triton" if device.type == "cuda" and triton_usable() else "torch")
    if impl == "rust" and device.type != "cpu":
        raise ValueError(f'impl="rust": expected CPU tensors, got device {device}; use impl="torch" or "auto"')
    if impl == "triton":
        if not triton_usable():
            raise ValueError('impl="triton": expected an importable triton package; use impl="torch" or "auto"')
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f'impl="triton": expected CUDA tensors, got device {device} (CPU tensors only under Triton\'s '
                'interpreter, TRITON_INTERPRET=1, for tests)'
            )
    try:
        if isinstance(ignore_index, bool):
            raise TypeError
        ignore = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}") from None
    smoothing = _number(label_smoothing, "label_smoothing")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {smoothing}")
    z = _number(z_loss, "z_loss")
    if not z >= 0.0:
        raise ValueError(f"z_loss: expected a value >= 0, got {z}")
    if logits_bias is not None:
        if not isinstance(logits_bias, torch.Tensor):
            raise TypeError(f"logits_bias: expected a tensor, got {type(logits_bias).__name__}")
        if logits_bias.shape != (vocab,) or not logits_bias.is_floating_point():
            raise ValueError(f"logits_bias: expected a float tensor of shape ({vocab},), got {tuple(logits_bias.shape)}")
        if logits_bias.device != device:
            raise ValueError(f"logits_bias: expected device {device} (the device of hidden), got {logits_bias.device}")
        # The logits bias receives no gradient (a buffer in the models that have one).
        _no_gradient_wanted(logits_bias, "logits_bias", expected="a tensor (a buffer)")
        logits_bias = logits_bias.detach().to(torch.float32).contiguous()
    epilogue = Epilogue(
        logits_bias=logits_bias,
        multiply=_epilogue_value(logit_scale_multiply, "logit_scale_multiply"),
        divide=_epilogue_value(logit_scale_divide, "logit_scale_divide"),
        softcap=_epilogue_value(logit_softcapping, "logit_softcapping"),
        temperature=_temperature(temperature),
    )
    return LossOptions(ignore, smoothing, z, epilogue, impl)
