"""TRL's DPOTrainer (the pinned release, whose trainers install a fused LM head): one training step on a
Llama-shaped model (Llama 3's 128256-token vocabulary), with LoRA (adapters on the attention, the head frozen, the
reference model the base one with the adapters disabled) and as a full fine-tune, each method in its own process.

```
python bench/trl_dpo.py                       # 2 pairs x 512 tokens, width 256, float32, 2 threads
python bench/trl_dpo.py --dtype bfloat16      # the model in bf16
python bench/trl_dpo.py --setups lora         # the LoRA rows only
```

Rows per setup: ``TRL fused head`` (TRL's own kernel, ``ChunkedLogProbFunction``) and ``logitless`` (its drop-in
under ``logitless.install()``). DPO differentiates each sequence's summed log-probs through a sigmoid, so the
upstream gradient differs from sequence to sequence: with a trained head logitless forms the gradients in a second
pass in backward; with a frozen head (LoRA) the hidden states' gradient is formed in the forward pass and scaled
row by row in backward. TRL >= 1.15's DPOTrainer has no materialised path of its own (it always installs its head);
the op-level ``materialised_tokens`` rows of bench/compare.py stand for it. Reported per row: the loss, seconds
per step (mean of two after a warm-up step) and what the steps added to the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from _steps import llama_shaped, timed_steps, word_tokenizer  # bench/ is on sys.path: these run as scripts

SETUPS = ("lora", "full")
METHODS = ("TRL fused head", "logitless")


def _step(args: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.set_num_threads(args.threads)
    if args.method == "logitless":
        import logitless

        logitless.install()
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    config = llama_shaped(args.vocab, args.width)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(config).to(dtype).train()
    ref_model, peft_config = None, None
    if args.setup == "lora":
        from peft import LoraConfig

        # Random B matrices (not zeros): the policy then differs from the reference and the loss from log 2.
        peft_config = LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0,
                                 init_lora_weights=False)  # fmt: skip
    else:
        torch.manual_seed(1)
        ref_model = LlamaForCausalLM(config).to(dtype).eval()
    tokenizer = word_tokenizer()
    rows = [{"prompt": "t3", "chosen": " t4", "rejected": " t5"}]
    training = DPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], bf16=False)
    torch.manual_seed(2)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=training, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(rows), peft_config=peft_config)  # fmt: skip
    pairs = 2 * args.pairs  # chosen rows, then rejected rows
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (pairs, args.tokens), generator=g)
    completion = torch.zeros_like(ids)
    completion[:, args.tokens // 4 :] = 1  # a prompt that is not scored
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
    model = trainer.model

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(inputs))
        loss.backward()
        return float(loss.detach())

    result = timed_steps(step)
    if args.method == "logitless":
        import logitless

        # Proof that the fused path ran: policy and reference forwards of the three steps.
        calls = logitless.audit()["integrations"]["trl"]["calls"]
        assert calls == {"fused": 6, "materialised": 0}, calls
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup is not None:
        print(json.dumps(_step(args)))
        return
    print(f"DPOTrainer training step: {args.pairs} pairs x {args.tokens} tokens, vocab {args.vocab}, width "
          f"{args.width}, {args.dtype}, {args.threads} thread(s)")  # fmt: skip
    for setup in args.setups:
        baseline: dict[str, float] | None = None
        for method in METHODS:
            command = [sys.executable, __file__, *sys.argv[1:], "--setup", setup, "--method", method]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            s = baseline = baseline or r
            print(f"  {setup:4} {method:14} loss {r['loss']:.6f}  {r['seconds']:.2f} s/step  peak RSS "
                  f"+{r['added_mib']:,.0f} MiB  (TRL / this: memory {s['added_mib'] / max(r['added_mib'], 1):.2f}x, "
                  f"speed {s['seconds'] / r['seconds']:.2f}x; loss rel diff "
                  f"{abs(s['loss'] - r['loss']) / max(abs(s['loss']), 1e-12):.1e})")


if __name__ == "__main__":
    main()
