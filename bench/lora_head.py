"""One training step with a LoRA adapter on the head itself (PEFT ``target_modules=[..., "lm_head"]``), stock against
logitless, each in its own process.

```
python bench/lora_head.py                          # batch 4 x 512 tokens, vocab 128256, width 512, float32
python bench/lora_head.py --dtype bfloat16 --threads 2
```

The model is Llama-shaped (two layers) with LoRA r=16 on ``q_proj``, ``v_proj`` and ``lm_head`` (PEFT's default
float32 adapters; in bf16 the base model is bf16). Stock forms the logits and adds the adapter's ``B·A·x`` to them;
logitless fuses the loss with the adapter's low-rank term (docs/spec.md §1.1 ``low_rank``). Reported per mode: the
loss, the seconds of a step (mean of two after one warm-up step) and the memory the steps added to the process's peak
RSS. No peers: Liger, cut-cross-entropy, torch's ``linear_cross_entropy`` and TRL's fused head take a weight, not a
weight plus an adapter (TRL >= 1.15 refuses LoRA on the head).
"""

from __future__ import annotations

import argparse

# bench/ is on sys.path: these run as scripts
from _steps import llama_shaped, stock_and_logitless_main, timed_and_counted


def _step(args: argparse.Namespace) -> dict[str, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    if args.mode == "logitless":
        import logitless

        logitless.install()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    # Built in its dtype: a float32 model cast afterwards would set a peak RSS that no bf16 step reaches.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    base = LlamaForCausalLM(llama_shaped(args.vocab, args.width))
    torch.set_default_dtype(default)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0,
                      init_lora_weights="gaussian")  # fmt: skip
    model = get_peft_model(base, lora).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.tokens), generator=gen)
    labels = ids.clone()
    labels[:, : args.tokens // 4] = -100  # a prompt that is not scored

    def step() -> float:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels, use_cache=False)
        out.loss.backward()
        return float(out.loss)

    return timed_and_counted(step, args.mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    stock_and_logitless_main(
        parser,
        _step,
        lambda a: f"LoRA on the head: batch {a.batch} x {a.tokens} tokens, vocab {a.vocab}, width {a.width}, "
        f"{a.dtype}, {a.threads} thread(s)",
        __file__,
    )


if __name__ == "__main__":
    main()
