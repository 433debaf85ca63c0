"""One training step of an encoder-decoder wrapper (TrOCR's shape: a ViT encoder, a TrOCR decoder with a 50265-token
vocabulary), stock against logitless, each in its own process.

```
python bench/encoder_decoder.py                  # batch 8, 256 target tokens, widths 256, float32, 1 thread
python bench/encoder_decoder.py --targets 512 --threads 2
```

The wrapper computes ``CrossEntropyLoss`` of its decoder's logits; under logitless it hands the labels to the decoder,
whose fused forward forms no logits (docs/spec.md §2). Reported per mode: the loss, the seconds of a step (mean of
two after one warm-up step) and the memory the steps added to the process's peak RSS. There are no peers here:
Liger, cut-cross-entropy and TRL's head patch decoder-only models.
"""

from __future__ import annotations

import argparse

from _steps import stock_and_logitless_main, timed_steps  # bench/ is on sys.path: these run as scripts


def _step(args: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.set_num_threads(args.threads)
    if args.mode == "logitless":
        import logitless

        logitless.install()
    from transformers import TrOCRConfig, ViTConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    encoder = ViTConfig(hidden_size=args.width, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * args.width, image_size=128, patch_size=16)
    decoder = TrOCRConfig(vocab_size=args.vocab, d_model=args.width, decoder_layers=2, decoder_attention_heads=4,
                          decoder_ffn_dim=2 * args.width)  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 2, 1
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config).train()
    pixels = torch.randn(args.batch, 3, 128, 128)
    labels = torch.randint(3, args.vocab, (args.batch, args.targets))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = model(pixel_values=pixels, labels=labels)
        out.loss.backward()
        return float(out.loss)

    return timed_steps(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--targets", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50265)
    parser.add_argument("--width", type=int, default=256)
    stock_and_logitless_main(
        parser,
        _step,
        lambda a: f"TrOCR-shaped step: batch {a.batch} x {a.targets} targets, vocab {a.vocab}, width {a.width}, "
        f"{a.threads} thread(s)",
        __file__,
    )


if __name__ == "__main__":
    main()
