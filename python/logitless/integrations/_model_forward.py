"""What TRL's head functions replace and read on a model: the forward they wrap, the config they read from."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["original_forward", "takes_shift_labels", "text_config"]


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
