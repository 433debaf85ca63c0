"""The inputs every class is run on: token ids that avoid special tokens, labels with ignored positions, and a
``num_items_in_batch`` as a gradient-accumulating trainer would pass it (the count over two micro-batches)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from logitless._verify import tiny

BATCH = 2
SEQ = 12
IGNORE = -100


@dataclass
class Feeds:
    base: dict[str, Any]
    labels: torch.Tensor
    num_items: torch.Tensor
    description: str = "text"
    extra: dict[str, Any] = field(default_factory=dict)


def text_vocab(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
    if not vocab:
        raise NotImplementedError("config has no vocab_size")
    # Targets past a padded vocabulary's real end are cut off the logits (Inkling): not valid labels.
    unpadded = getattr(text, "unpadded_vocab_size", None)
    return min(int(vocab), int(unpadded)) if isinstance(unpadded, int) and unpadded > 0 else int(vocab)


def make_feeds(
    model: torch.nn.Module, config: Any, add_inputs: Callable[[Any, Any, Feeds], None] | None = None
) -> Feeds:
    """The token ids, labels and ``num_items_in_batch`` of one case; ``add_inputs`` (a model's ``Override.inputs``)
    adds what its forward needs beside them, else images where the model takes them."""
    vocab = min(text_vocab(config), tiny.SPECIAL_BASE)
    avoid = tiny.special_ids(config.to_dict())
    allowed = torch.tensor([i for i in range(3, vocab) if i not in avoid])
    gen = torch.Generator().manual_seed(0)
    ids = allowed[torch.randint(len(allowed), (BATCH, SEQ), generator=gen)]
    labels = ids.clone()
    # A prompt-masked first row and scattered ignored targets in the second.
    labels[0, :4] = IGNORE
    labels[1, torch.tensor([2, 5, 6])] = IGNORE
    valid = int((labels[:, 1:] != IGNORE).sum())
    feeds = Feeds(
        base={"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False},
        labels=labels,
        # As a trainer with two accumulation steps passes it: the count over both micro-batches.
        num_items=torch.tensor(2 * valid + 1),
    )
    if "mm_token_type_ids" in _forward_params(model):
        # Which positions are image tokens (none, in text); some models require it in training (Molmo2).
        feeds.base["mm_token_type_ids"] = torch.zeros_like(ids)
    if add_inputs is not None:
        add_inputs(model, config, feeds)
    elif "pixel_values" in _forward_params(model) and image_token(config) is not None:
        try:
            feeds.description = add_image(model, config, feeds)
        except NotImplementedError as exc:
            # Text only still checks the loss path (the vision tower is simply not run); say so in the report.
            feeds.description = f"text only ({exc})"
    return feeds


_FEATURES = re.compile(r"features:?\s*(\d+)")
IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index", "image_token")


def image_token(config: Any) -> int | None:
    for key in IMAGE_TOKEN_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _forward_params(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(type(model).forward).parameters)


def pixels(model: torch.nn.Module, config: Any, shape_kind: str) -> dict[str, torch.Tensor]:
    vision = getattr(config, "vision_config", None)
    gen = torch.Generator().manual_seed(2)
    if shape_kind == "grid":
        # Qwen-VL style: flattened patches plus the (t, h, w) patch grid of each image.
        patch = getattr(vision, "patch_size", 14)
        temporal = getattr(vision, "temporal_patch_size", 2) or 1
        channels = getattr(vision, "in_channels", None) or getattr(vision, "num_channels", 3)
        grid = [1, 4, 4]
        pixel_values = torch.randn(BATCH * 16, channels * temporal * patch * patch, generator=gen)
        return {"pixel_values": pixel_values, "image_grid_thw": torch.tensor([grid] * BATCH)}
    size = getattr(vision, "image_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    channels = getattr(vision, "num_channels", 3) or 3
    shape = (BATCH, channels, size, size) if shape_kind == "image" else (BATCH, 1, channels, size, size)
    return {"pixel_values": torch.randn(*shape, generator=gen)}


def add_image(model: torch.nn.Module, config: Any, feeds: Feeds) -> str:
    """Put one small image per sequence into ``feeds`` (pixel values and the right number of image tokens).

    The number of image tokens a model expects depends on its vision tower and projector; rather than modelling
    each one, a first forward with one token per image reads the count from the model's own mismatch error.
    Returns a description, or raises ``NotImplementedError`` when no image layout works.
    """
    token = image_token(config)
    params = _forward_params(model)
    if token is None or "pixel_values" not in params or getattr(config, "vision_config", None) is None:
        raise NotImplementedError("no image token, pixel_values argument or vision config")
    kinds = ["grid"] if "image_grid_thw" in params else ["image", "images"]
    # image_sizes: LLaVA-NeXT needs it; plain LLaVA accepts it but then takes a Pixtral-only path.
    layouts = [(k, s) for k in kinds for s in ((False, True) if "image_sizes" in params else (False,))]
    last = ""
    for kind, sizes in layouts:
        layout = pixels(model, config, kind)
        if sizes:
            side = layout["pixel_values"].shape[-1]
            layout["image_sizes"] = torch.tensor([[side, side]] * BATCH)
        counts = [1]
        tried: set[int] = set()
        while counts:
            count = counts.pop(0)
            if count in tried or count > 512:
                continue
            tried.add(count)
            trial = _with_image_tokens(feeds, token, count, layout, params, config)
            try:
                with torch.no_grad():
                    model(**trial.base)
            except Exception as exc:  # noqa: BLE001 - the message carries the expected count
                last = f"{type(exc).__name__}: {exc}"[:200]
                match = _FEATURES.search(str(exc))
                if match is None:
                    continue
                # Models report features either as a token count or as a numel (tokens x hidden size).
                features = int(match.group(1))
                hidden = getattr(config.get_text_config(), "hidden_size", 0) or 1
                counts = sorted({*counts, features // BATCH, features // (BATCH * hidden)} - {0})
                continue
            feeds.base, feeds.labels, feeds.num_items = trial.base, trial.labels, trial.num_items
            shape = tuple(layout["pixel_values"].shape)
            return f"text + {BATCH} images ({count} image tokens each, pixel_values {shape})"
    raise NotImplementedError(f"image input: {last}")


def _with_image_tokens(feeds: Feeds, token: int, count: int, layout: dict[str, torch.Tensor], params: set[str],
                       config: Any) -> Feeds:
    ids = feeds.base["input_ids"]
    image = torch.full((ids.shape[0], count), token, dtype=ids.dtype)
    new_ids = torch.cat([ids[:, :1], image, ids[:, 1:]], dim=1)
    # Image positions are never targets (as in every VLM training recipe).
    labels = torch.cat([feeds.labels[:, :1], torch.full_like(image, IGNORE), feeds.labels[:, 1:]], dim=1)
    base = {**feeds.base, "input_ids": new_ids, "attention_mask": torch.ones_like(new_ids), **layout}
    if "token_type_ids" in params:
        if getattr(config, "model_type", "") == "paligemma":
            # PaliGemma: 0 = prefix (image and prompt, attended bidirectionally), 1 = suffix (the targets).
            types = torch.ones_like(new_ids)
            types[:, : count + 2] = 0
        else:
            types = (new_ids == token).long()
        base["token_type_ids"] = types
    if "mm_token_type_ids" in params:
        base["mm_token_type_ids"] = (new_ids == token).long()
    valid = int((labels[:, 1:] != IGNORE).sum())
    return Feeds(base=base, labels=labels, num_items=torch.tensor(2 * valid + 1))
