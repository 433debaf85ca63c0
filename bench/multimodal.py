"""One training step of Llama 4's multimodal wrapper (``Llama4ForConditionalGeneration``: a vision tower, its
projector and a ``Llama4ForCausalLM`` with Llama 4's 202,048-token vocabulary), stock against logitless, each in its
own process.

```
python bench/multimodal.py                       # batch 2 x 1024 tokens (an image of 16 tokens each), width 256
python bench/multimodal.py --tokens 2048 --threads 2
```

The wrapper computes ``self.loss_function`` of its language model's logits; under logitless it hands the labels to
the language model, whose fused forward forms no logits (docs/spec.md §2). Reported per mode: the loss, the seconds of
a step (mean of two after one warm-up step) and the memory the steps added to the process's peak RSS. There are no
peers here: Liger, cut-cross-entropy and TRL's head replace a causal LM's own forward or head, not this wrapper's.

transformers 5.24's wrapper reads ``outputs.image_outputs``, which its language model's output does not have, on
every dict output; for that release both processes give the field the value ``None`` on that output class (5.23
and 5.25 do not read it).
"""

from __future__ import annotations

import argparse
import inspect

from _steps import stock_and_logitless_main, timed_and_counted  # bench/ is on sys.path: these run as scripts


def _model(args: argparse.Namespace) -> tuple[object, int, int]:
    """The wrapper (float32, train mode), its image token and the number of tokens one image becomes."""
    import torch
    from transformers import Llama4Config
    from transformers.models.llama4 import modeling_llama4

    w = args.width
    text = dict(vocab_size=args.vocab, hidden_size=w, intermediate_size=2 * w, intermediate_size_mlp=2 * w,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=w // 4,
                num_local_experts=4, interleave_moe_layer_step=2, pad_token_id=0)  # fmt: skip
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                  image_size=64, patch_size=8, vision_output_dim=w, projector_input_dim=w,
                  projector_output_dim=w, pixel_shuffle_ratio=0.5)  # fmt: skip
    config = Llama4Config(text_config=text, vision_config=vision, image_token_index=args.vocab - 1)
    if "outputs.image_outputs" in inspect.getsource(modeling_llama4.Llama4ForConditionalGeneration.forward):
        from transformers.modeling_outputs import MoeCausalLMOutputWithPast

        MoeCausalLMOutputWithPast.image_outputs = None  # type: ignore[attr-defined]
    torch.manual_seed(0)
    model = modeling_llama4.Llama4ForConditionalGeneration(config).train()
    per_image = (64 // 8) ** 2 // 4  # patches, then the pixel shuffle's 0.5 ratio on each side
    return model, args.vocab - 1, per_image


def _step(args: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.set_num_threads(args.threads)
    if args.mode == "logitless":
        import logitless

        logitless.install()
    model, image_token, per_image = _model(args)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab - 1, (args.batch, args.tokens), generator=gen)
    ids[:, 1 : 1 + per_image] = image_token
    labels = ids.clone()
    labels[:, : 1 + per_image] = -100  # the prompt and the image are not scored
    pixels = torch.randn(args.batch, 3, 64, 64, generator=gen)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        out = model(input_ids=ids, pixel_values=pixels, labels=labels, use_cache=False)
        out.loss.backward()
        return float(out.loss)

    # Each step counts the wrapper's forward and its language model's: both must say fused.
    return timed_and_counted(step, args.mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=202048)
    parser.add_argument("--width", type=int, default=256)
    stock_and_logitless_main(
        parser,
        _step,
        lambda a: f"Llama 4 multimodal step: batch {a.batch} x {a.tokens} tokens (one image each), vocab {a.vocab}, "
        f"width {a.width}, {a.threads} thread(s)",
        __file__,
    )


if __name__ == "__main__":
    main()
