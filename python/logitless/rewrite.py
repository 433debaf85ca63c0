"""``rewrite_forward(source)``: the Rust forward rewriter's Python face (no torch, no transformers)."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

from logitless import _core

__all__ = ["EpilogueStep", "Patched", "Refused", "rewrite_forward"]


class EpilogueStep(TypedDict):
    kind: Literal["vocab_slice", "logits_bias", "multiply", "divide", "softcap", "module"]
    expr: str


class Patched(TypedDict):
    status: Literal["patched"]
    source: str
    head: str
    hidden: str
    logits: str
    loss: str
    labels: str
    vocab: str | None
    epilogue: list[EpilogueStep]
    extra_loss_kwargs: dict[str, str]
    kwargs: str | None
    loss_form: Literal["loss_function", "cross_entropy"]
    fused_guards: list[str]
    line: int


class Refused(TypedDict):
    status: Literal["refused"]
    code: str
    reason: str
    line: int


def rewrite_forward(source: str) -> dict[str, Any]:
    """Rewrite one dedented ``def forward`` (decorators included) so its loss runs without logits.

    Returns a ``Patched`` dict (``source`` is the new function, calling ``__logitless__``) or a ``Refused`` one
    with a stable ``code``; see docs/design.md, "Rewrite contract".
    """
    return dict(_core.rewrite_forward(source))
