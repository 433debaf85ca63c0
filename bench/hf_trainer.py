"""HF Trainer steps on a Llama-shaped model (Llama 3's 128256-token vocabulary), stock against logitless and a
hand-written peer, each in its own process.

```
python bench/hf_trainer.py                       # both workloads: batch 2 x 512 tokens, width 256, float32, 2 threads
python bench/hf_trainer.py --workload evaluate --batch 4 --threads 1
```

Workloads:

- ``smoothing``: ``Trainer.compute_loss`` with ``label_smoothing_factor=0.1`` and its backward (a training step);
- ``evaluate``: ``Trainer.prediction_step(..., prediction_loss_only=True)`` in eval mode, what ``Trainer.evaluate``
  runs per batch without ``compute_metrics``.

Methods:

- ``stock``: transformers as is (label smoothing: the Trainer's ``LabelSmoother`` on the model's logits);
- ``logitless``: the same script under ``logitless.install()`` (the script asserts every step was fused);
- ``torch_lce``: what a user could write instead, a ``compute_loss`` that runs the backbone and
  ``torch.nn.functional.linear_cross_entropy`` (``label_smoothing=0.1`` for the first workload) on the shifted
  hidden states.

cut-cross-entropy and TRL's fused head have no label smoothing; Liger's fused loss has it (and transformers passes
``skip_logits`` to Liger's models in loss-only evaluation) but needs CUDA. Reported per method: the loss, seconds
per step (mean of two after a warm-up step) and what the steps added to the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from _steps import llama_shaped, timed_steps  # bench/ is on sys.path: these run as scripts

METHODS = ("stock", "logitless", "torch_lce")
WORKLOADS = {
    "smoothing": "Training step with label_smoothing_factor=0.1",
    "evaluate": "Loss-only evaluation step (prediction_loss_only=True)",
}
EPSILON = 0.1


def _torch_lce_loss(smoothing: float) -> Any:
    def compute_loss(model: Any, inputs: dict[str, Any], return_outputs: bool = False, **_: Any) -> Any:
        import torch

        labels = inputs["labels"]
        hidden = model.model(input_ids=inputs["input_ids"]).last_hidden_state
        loss = torch.nn.functional.linear_cross_entropy(
            hidden[:, :-1].reshape(-1, hidden.shape[-1]), model.lm_head.weight, labels[:, 1:].reshape(-1),
            ignore_index=-100, label_smoothing=smoothing,
        )  # fmt: skip
        return (loss, {}) if return_outputs else loss

    return compute_loss


def _step(args: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.set_num_threads(args.threads)
    if args.mode == "logitless":
        import logitless

        logitless.install()
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    config = llama_shaped(args.vocab, args.width)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    smoothing = EPSILON if args.workload == "smoothing" else 0.0
    training = TrainingArguments(output_dir="/tmp/logitless-bench-trainer", use_cpu=True, report_to=[],
                                 label_smoothing_factor=smoothing)  # fmt: skip
    trainer = Trainer(model=model, args=training)
    if args.mode == "torch_lce":
        trainer.compute_loss = _torch_lce_loss(smoothing)  # type: ignore[method-assign]
    ids = torch.randint(3, args.vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, : args.tokens // 4] = -100  # a prompt that is not trained on
    if args.workload == "evaluate":
        model.eval()

    def step() -> float:
        if args.workload == "evaluate":
            loss, _, _ = trainer.prediction_step(model, {"input_ids": ids, "labels": labels}, True)
            return float(loss)
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, {"input_ids": ids, "labels": labels})
        loss.backward()
        return float(loss.detach())

    result = timed_steps(step)
    if args.mode == "logitless":
        import logitless

        # Proof that the fused path ran: a run that silently fell back would measure stock twice.
        report = logitless.audit()
        assert report["runtime"] == {"fused": 3, "stock": {}}, report["runtime"]
        if args.workload == "smoothing":
            calls = report["integrations"]["hf_trainer"]["calls"]
            assert calls == {"fused": 3, "materialised": 0}, calls
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workload", choices=[*WORKLOADS, "both"], default="both")
    parser.add_argument("--mode", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(_step(args)))
        return
    for workload in WORKLOADS if args.workload == "both" else (args.workload,):
        rows = {}
        for mode in METHODS:
            # The last --workload given wins: this one.
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--workload", workload, "--mode", mode],
                                  capture_output=True, text=True, check=True)  # fmt: skip
            rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{WORKLOADS[workload]}: batch {args.batch} x {args.tokens} tokens, vocab {args.vocab}, "
              f"width {args.width}, float32, {args.threads} thread(s)")  # fmt: skip
        s = rows["stock"]
        for mode, r in rows.items():
            print(f"  {mode:9}  loss {r['loss']:.6f}  {r['seconds']:.2f} s/step  peak RSS +{r['added_mib']:,.0f} MiB"
                  f"  (stock / this: memory {s['added_mib'] / max(r['added_mib'], 1):.2f}x, "
                  f"speed {s['seconds'] / r['seconds']:.2f}x; loss rel diff "
                  f"{abs(s['loss'] - r['loss']) / s['loss']:.1e})")  # fmt: skip


if __name__ == "__main__":
    main()
