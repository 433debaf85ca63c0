"""What TRL's head functions replace and read on a model: the forward they wrap, the config they read from."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["installed_and_idle", "original_forward", "rewritten_lm", "takes_shift_labels", "text_config"]


def original_forward(model: Any) -> Callable[..., Any]:
    """The forward a head drop-in wraps: an instance forward (accelerate's hooks, another wrapper) as it is, else the
    class's forward looked up on every call, so ``install()`` after the drop-in still rewires it."""
    if "forward" in model.__dict__:
        return model.forward  # type: ignore[no-any-return]

    def forward(*args: Any, **kwargs: Any) -> Any:
        return type(model).forward(model, *args, **kwargs)

    return forward


def text_config(model: Any) -> Any:
    """The language model's config (a VLM's ``text_config``), where TRL reads the MoE router settings."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def takes_shift_labels(forward: Any) -> bool:
    """Whether ``forward`` can be called with ``shift_labels`` (a parameter of that name, or ``**kwargs``)."""
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "shift_labels" for p in parameters)


def installed_and_idle() -> bool:
    """Whether logitless is installed and no other integration is computing the current call (a head's capture,
    HF Trainer's label smoothing): what a trainer integration needs before it computes a call itself."""
    from logitless import _state

    return _state.enabled() and _state.current_capture() is None and _state.current_smoothing() is None


def rewritten_lm(trainer: Any, model: Any) -> Any:
    """The language model under ``model``'s DDP / ZeRO / PEFT wrappers whose class runs logitless's rewritten
    forward, reading its labels for its loss alone and taking ``shift_labels``: what a trainer integration hands its
    targets to. Otherwise the reason (a string) the trainer's own code runs instead."""
    import torch

    from logitless import _registry
    from logitless.integrations.hf_trainer import _compiled, _peft_base

    if not isinstance(model, torch.nn.Module) or _compiled(model) or getattr(trainer.args, "torch_compile", False):
        return "compiled"
    unwrapped = trainer.accelerator.unwrap_model(model)
    peft = _peft_base(unwrapped)
    if peft is False:
        return "peft-prompt-learning"  # the wrapper adds to the labels
    lm = peft if peft is not None else unwrapped
    cls = next((c for c in type(lm).__mro__ if "forward" in c.__dict__), None)
    if cls is None or not _registry.rewritten(cls):
        return "not-rewritten"
    elsewhere = _registry.labels_elsewhere(cls)
    if elsewhere is None or elsewhere["decoder_inputs"]:
        return "labels-read-elsewhere"
    if not takes_shift_labels(cls.forward):
        return "no-shift-labels"
    return lm
