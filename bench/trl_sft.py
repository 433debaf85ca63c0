"""TRL's SFTTrainer: one training step on a Llama-shaped model (Llama 3's 128256-token vocabulary) per TRL release
and method, each in its own process; releases before the pinned one run from their source first on PYTHONPATH
(``make test`` unpacks them into ``.trl-legacy/``).

```
python bench/trl_sft.py                       # batch 2 x 512 tokens, width 256, float32, 2 threads
python bench/trl_sft.py --dtype bfloat16      # the model in bf16 (its logits too, as stock forms them)
python bench/trl_sft.py --releases 1.16.0     # one release
```

Rows:

- TRL 0.24 (``loss_type="nll"``, every TRL from 0.x to 1.8 by default): ``stock`` (the logits materialised, the
  loss and the metrics from them) and ``logitless`` (the loss fused; the logits formed once for TRL's metrics, no
  float32 copy and no logits gradient). Before logitless kept those logits this step failed.
- TRL 1.14 (``loss_type="chunked_nll"``, the default from 1.9 to 1.14): ``stock nll`` (the materialised loss),
  ``TRL chunked`` (TRL's own chunked head, which logitless left in place before) and ``logitless`` (logitless's
  drop-in for it: the fused loss and the metrics from one pass).
- TRL 1.16 (pinned; its fused LM head, ``add_fused_lm_head``): ``TRL fused head`` (TRL's own kernel) and
  ``logitless`` (the drop-in: per-token log-probs whose gradient is formed in the forward pass when the trainer's
  upstream gradient is one value over the counted tokens, as SFT's mean is, and checked in backward).

cut-cross-entropy and ``torch.nn.functional.linear_cross_entropy`` are in bench/compare.py (the op alone) and
bench/hf_trainer.py; neither plugs into SFTTrainer. Reported per row: the loss, seconds per step (mean of two after a
warm-up step) and what the steps added to the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _steps import llama_shaped, timed_steps, word_tokenizer  # bench/ is on sys.path: these run as scripts

ROOT = Path(__file__).resolve().parent.parent
PINNED = "1.16.0"
# (TRL release, row name, install logitless, SFTConfig loss_type)
ROWS = (
    ("0.24.0", "stock", False, "nll"),
    ("0.24.0", "logitless", True, "nll"),
    ("1.14.2", "stock nll", False, "nll"),
    ("1.14.2", "TRL chunked", False, "chunked_nll"),
    ("1.14.2", "logitless", True, "chunked_nll"),
    (PINNED, "TRL fused head", False, "nll"),
    (PINNED, "logitless", True, "nll"),
)


def _step(args: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.set_num_threads(args.threads)
    if args.logitless:
        import logitless

        logitless.install()
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    import trl
    from trl import SFTConfig, SFTTrainer

    assert trl.__version__ == args.trl, (trl.__version__, args.trl)

    config = llama_shaped(args.vocab, args.width)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype)).train()
    tokenizer = word_tokenizer()
    extra = {} if args.loss_type == "nll" and args.trl.startswith("0.") else {"loss_type": args.loss_type}
    training = SFTConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], bf16=False,
                         dataset_kwargs={"skip_prepare_dataset": True}, **extra)  # fmt: skip
    trainer = SFTTrainer(model=model, args=training, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"input_ids": [3, 4, 5]}]))  # fmt: skip
    ids = torch.randint(3, args.vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, : args.tokens // 4] = -100  # a prompt that is not trained on

    def step() -> float:
        model.zero_grad(set_to_none=True)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return float(loss.detach())

    result = timed_steps(step)
    if args.logitless:
        import logitless

        # Proof that the fused path ran: a run that silently fell back would measure stock twice.
        report = logitless.audit()
        assert report["runtime"] == {"fused": 3, "stock": {}}, report["runtime"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--releases", nargs="+", default=sorted({r[0] for r in ROWS}))
    parser.add_argument("--trl", help=argparse.SUPPRESS)
    parser.add_argument("--loss-type", help=argparse.SUPPRESS)
    parser.add_argument("--logitless", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl is not None:
        print(json.dumps(_step(args)))
        return
    print(f"SFTTrainer training step: batch {args.batch} x {args.tokens} tokens, vocab {args.vocab}, width "
          f"{args.width}, {args.dtype}, {args.threads} thread(s)")  # fmt: skip
    baseline: dict[str, Any] = {}
    for version, name, install, loss_type in ROWS:
        if version not in args.releases:
            continue
        env = dict(os.environ)
        if version != PINNED:
            source = ROOT / ".trl-legacy" / f"trl-{version}"
            if not (source / "trl").is_dir():
                raise SystemExit(f"{source} is missing: `make .trl-legacy/.fetched` unpacks TRL {version}")
            env["PYTHONPATH"] = str(source)
        command = [sys.executable, __file__, *sys.argv[1:], "--trl", version, "--loss-type", loss_type]
        done = subprocess.run(command + (["--logitless"] if install else []), env=env, capture_output=True,
                              text=True, check=True)  # fmt: skip
        r = json.loads(done.stdout.strip().splitlines()[-1])
        s = baseline.setdefault(version, r)  # each release's first row is its stock materialised loss
        print(f"  TRL {version} {name:12} loss {r['loss']:.6f}  {r['seconds']:.2f} s/step  peak RSS "
              f"+{r['added_mib']:,.0f} MiB  (stock / this: memory {s['added_mib'] / max(r['added_mib'], 1):.2f}x, "
              f"speed {s['seconds'] / r['seconds']:.2f}x; loss rel diff {abs(s['loss'] - r['loss']) / s['loss']:.1e})")


if __name__ == "__main__":
    main()
