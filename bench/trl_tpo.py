"""TRL's TPOTrainer (``trl.experimental.tpo``): one training step's loss and backward on a Llama-shaped model
(Llama 3's 128256-token vocabulary), each method in its own process.

```
python bench/trl_tpo.py                      # 2 triples x 512 tokens (a quarter prompt), width 512, float32, 2 threads
python bench/trl_tpo.py --dtype bfloat16
```

Methods: ``stock`` (TRL's ``_compute_loss``: the chosen, rejected and gold rows' ``[3B, T, V]`` logits, then each
completion's summed log-probability, the sigmoid preference loss, the gold rows' cross-entropy and the entropy /
mean-logit / top-1 metrics), three by-hand steps that run the backbone and compute the completion tokens'
log-probabilities from its hidden states with a fused peer, then the same loss (no metrics: they do less than
stock): ``trl kernel`` (TRL's ``ChunkedLogProbFunction``, its fused LM head kernel), ``torch lce``
(``torch.nn.functional.linear_cross_entropy``, ``reduction="none"``) and ``cce`` (cut-cross-entropy's
``torch_compile`` implementation, the one that runs on CPU), and ``logitless`` (``_compute_loss`` under
``logitless.install()``, no change to the step, metrics included). Reported per method: the loss, seconds per step
(mean of two after a warm-up) and what the steps added to the process's peak RSS. Liger has no TPO loss.
"""

from __future__ import annotations

import argparse
from typing import Any

# bench/ is on sys.path: these run as scripts
from _steps import peer_log_probs, peer_models, peers_main, timed_and_fused

METHODS = ("stock", "trl kernel", "torch lce", "cce", "logitless")


def _trainer(model: Any, beta: float, alpha: float) -> Any:
    """A TPOTrainer holding only what its ``_compute_loss`` reads (its __init__ builds a whole Trainer)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.experimental.tpo import TPOTrainer

    trainer = TPOTrainer.__new__(TPOTrainer)
    trainer.model, trainer.beta, trainer.tpo_alpha, trainer.loss_type, trainer.label_smoothing = model, beta, alpha, \
        "sigmoid", 0.0
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    trainer.args = SimpleNamespace(torch_compile=False)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m, gather_for_metrics=lambda t: t,
                                          gather=lambda t: t)  # fmt: skip
    return trainer


def _by_hand(model: Any, trainer: Any, inputs: dict[str, Any], method: str) -> Any:
    """TPO's loss from the backbone's hidden states and a peer's log-probabilities of the completion tokens."""
    import torch
    import torch.nn.functional as F

    ids = inputs["input_ids"]
    hidden = model.model(input_ids=ids, attention_mask=inputs["attention_mask"]).last_hidden_state[:, :-1]
    scored = inputs["completion_mask"][:, 1:] == 1
    rows, targets, weight = hidden[scored], ids[:, 1:][scored], model.lm_head.weight
    picked = peer_log_probs(rows, weight, targets, method)
    log_probs = torch.zeros(scored.shape, dtype=picked.dtype).masked_scatter(scored, picked)
    chosen, rejected, _ = log_probs.sum(-1).chunk(3)
    loss = -F.logsigmoid(trainer.beta * (chosen - rejected)).mean()
    gold = scored.chunk(3)[2]
    return loss + trainer.tpo_alpha * -log_probs.chunk(3)[2][gold].mean()


def _step(args: argparse.Namespace) -> dict[str, float]:
    import torch

    model, _ = peer_models(args)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, args.vocab, (args.triples, args.seq // 4), generator=g)
    # Chosen, rejected and gold completions after the same prompt, stacked as TRL's collator stacks them.
    completions = torch.randint(3, args.vocab, (3 * args.triples, args.seq - args.seq // 4), generator=g)
    ids = torch.cat([prompt.repeat(3, 1), completions], dim=1)
    completion_mask = torch.ones_like(ids)
    completion_mask[:, : args.seq // 4] = 0
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion_mask}
    trainer = _trainer(model, args.beta, args.alpha)

    return timed_and_fused(model, args.method, "tpo", lambda: trainer._compute_loss(model, inputs, False),
                           lambda: _by_hand(model, trainer, inputs, args.method))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triples", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--beta", type=float, default=0.01, help="TPOConfig.beta")
    parser.add_argument("--alpha", type=float, default=1.0, help="TPOConfig.tpo_alpha (the gold rows' NLL weight)")
    peers_main(parser, METHODS, _step, _title, __file__)


def _title(args: argparse.Namespace) -> str:
    return (f"TPO step: {args.triples} triples x {args.seq} tokens (a quarter prompt), width {args.width}, vocab "
            f"{args.vocab}, {args.dtype}, beta {args.beta}, tpo_alpha {args.alpha}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
