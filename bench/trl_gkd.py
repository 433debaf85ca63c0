"""TRL's GKDTrainer (``trl.experimental.gkd``): one training step's loss and backward on a Llama-shaped student and a
twice-as-wide teacher (Llama 3's 128256-token vocabulary), each method in its own process.

```
python bench/trl_gkd.py                       # 4 x 512 tokens, student 512 / teacher 1024 wide, float32, 2 threads
python bench/trl_gkd.py --dtype bfloat16 --beta 0.5 --masked 0.5
```

Methods: ``stock`` (TRL's ``GKDTrainer.compute_loss``: both models' ``[batch, seq, V]`` logits, then
``generalized_jsd_loss`` on them), ``trl kernel`` (the step written by hand around TRL's own fused divergence, the
DistillationTrainer's ``_chunked_divergence_loss`` on both backbones' hidden states: what a GKD user could do
without logitless) and ``logitless`` (``GKDTrainer.compute_loss`` under ``logitless.install()``, no change to the
step). Reported per method: the loss, seconds per step (mean of two after a warm-up) and what the steps added to
the process's peak RSS. No other peers: Liger's fused linear JSD needs CUDA; cut-cross-entropy and torch's
``linear_cross_entropy`` compute a cross-entropy against labels, not a divergence from a teacher.
"""

from __future__ import annotations

import argparse
from typing import Any

# bench/ is on sys.path: these run as scripts
from _steps import peer_models, peers_main, timed_and_fused

METHODS = ("stock", "trl kernel", "logitless")


def _trainer(teacher: Any, beta: float) -> Any:
    """A GKDTrainer holding only what its ``compute_loss`` reads (its __init__ builds a whole Trainer)."""
    from types import SimpleNamespace

    from trl.experimental.gkd import GKDTrainer

    trainer = GKDTrainer.__new__(GKDTrainer)
    trainer.teacher_model, trainer.beta = teacher, beta
    trainer.args = SimpleNamespace(torch_compile=False)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    return trainer


def _trl_kernel_loss(student: Any, teacher: Any, inputs: dict[str, Any], beta: float) -> Any:
    """GKD's loss (positions whose next label is kept, mean over them) through TRL's fused divergence."""
    import torch
    import torch.nn.functional as F
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    hidden = student.model(input_ids=ids, attention_mask=attention).last_hidden_state
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=ids, attention_mask=attention).last_hidden_state
    kept = F.pad(inputs["labels"][:, 1:] != -100, (0, 1), value=False).long()
    return _chunked_divergence_loss(hidden, teacher_hidden, student.lm_head.weight, teacher.lm_head.weight, kept,
                                    beta)[0]  # fmt: skip


def _step(args: argparse.Namespace) -> dict[str, float]:
    import torch

    student, teacher = peer_models(args, teacher_width=args.teacher_width)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    prompt = int(args.seq * args.masked)
    labels[:, :prompt] = -100  # GKD's labels: the prompt's positions ignored
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    trainer = _trainer(teacher, args.beta)

    return timed_and_fused(student, args.method, "gkd", lambda: trainer.compute_loss(student, inputs),
                           lambda: _trl_kernel_loss(student, teacher, inputs, args.beta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--teacher-width", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--beta", type=float, default=0.5, help="GKD's: 0 forward KL, 1 reverse KL, 0.5 its default")
    parser.add_argument("--masked", type=float, default=0.0, help="fraction of each sequence that is prompt")
    peers_main(parser, METHODS, _step, _title, __file__)


def _title(args: argparse.Namespace) -> str:
    return (f"GKD step: {args.batch} x {args.seq} tokens ({args.masked:.0%} prompt), student {args.width} / teacher "
            f"{args.teacher_width} wide, vocab {args.vocab}, {args.dtype}, beta {args.beta}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
