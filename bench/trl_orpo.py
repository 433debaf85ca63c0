"""TRL's ORPOTrainer (``trl.experimental.orpo``): one training step's loss and backward on a Llama-shaped model
(Llama 3's 128256-token vocabulary), each method in its own process.

```
python bench/trl_orpo.py                      # 2 pairs x 512 tokens (a quarter prompt), width 512, float32, 2 threads
python bench/trl_orpo.py --dtype bfloat16
```

Methods: ``stock`` (TRL's ``get_batch_loss_metrics``: the chosen and rejected rows' ``[2B, T, V]`` logits, then each
sequence's mean log-probability, the chosen rows' cross-entropy and the odds-ratio loss), three by-hand steps that
run the backbone and compute the per-token log-probabilities of its hidden states with a fused peer, then the same
loss: ``trl kernel`` (TRL's ``ChunkedLogProbFunction``, its fused LM head kernel), ``torch lce``
(``torch.nn.functional.linear_cross_entropy``, ``reduction="none"``) and ``cce`` (cut-cross-entropy's
``torch_compile`` implementation, the one that runs on CPU), and ``logitless`` (``get_batch_loss_metrics`` under
``logitless.install()``, no change to the step; it also forms the logits metrics). Reported per method: the loss,
seconds per step (mean of two after a warm-up) and what the steps added to the process's peak RSS. Liger's fused
ORPO loss needs CUDA: see its published figures.
"""

from __future__ import annotations

import argparse
from typing import Any

# bench/ is on sys.path: these run as scripts
from _steps import peer_log_probs, peer_models, peers_main, timed_and_fused

METHODS = ("stock", "trl kernel", "torch lce", "cce", "logitless")


def _trainer(beta: float) -> Any:
    """An ORPOTrainer holding only what its ``get_batch_loss_metrics`` reads (its __init__ builds a whole Trainer)."""
    from types import SimpleNamespace

    import torch
    from trl.experimental.orpo import ORPOTrainer

    trainer = ORPOTrainer.__new__(ORPOTrainer)
    trainer.is_encoder_decoder, trainer.padding_value, trainer.aux_loss_enabled, trainer.beta = False, 0, False, beta
    trainer.args = SimpleNamespace(torch_compile=False)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m, device=torch.device("cpu"),
                                          gather_for_metrics=lambda t: t)  # fmt: skip
    return trainer


def _by_hand(model: Any, trainer: Any, batch: dict[str, Any], method: str) -> Any:
    """ORPO's loss from the backbone's hidden states and a peer's per-token log-probabilities (the targets: each
    position's next token, scored where it is attended; the sequence means over the labelled ones)."""
    import torch

    stacked = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=0, device="cpu")
    ids, attention, labels = (stacked[f"concatenated_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    n = batch["chosen_labels"].shape[0]
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
    scored, kept = attention[:, 1:] == 1, labels[:, 1:] != -100
    rows, targets, weight = hidden[scored], ids[:, 1:][scored], model.lm_head.weight
    picked = peer_log_probs(rows, weight, targets, method)
    log_probs = torch.zeros(scored.shape, dtype=picked.dtype).masked_scatter(scored, picked)
    logps = (log_probs * kept).sum(-1) / kept.sum(-1)
    nll = -log_probs[:n][scored[:n]].mean()
    losses = trainer.odds_ratio_loss(logps[:n], logps[n:])[0]
    return nll - losses.mean()


def _step(args: argparse.Namespace) -> dict[str, float]:
    import torch

    model, _ = peer_models(args)
    g = torch.Generator().manual_seed(2)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(3, args.vocab, (args.pairs, args.seq), generator=g)
        labels = ids.clone()
        labels[:, : args.seq // 4] = -100  # the prompt
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": torch.ones_like(ids),
                      f"{side}_labels": labels})  # fmt: skip
    trainer = _trainer(args.beta)

    return timed_and_fused(model, args.method, "orpo", lambda: trainer.get_batch_loss_metrics(model, batch)[0],
                           lambda: _by_hand(model, trainer, batch, args.method))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--beta", type=float, default=0.1, help="ORPO's lambda (ORPOConfig.beta)")
    peers_main(parser, METHODS, _step, _title, __file__)


def _title(args: argparse.Namespace) -> str:
    return (f"ORPO step: {args.pairs} pairs x {args.seq} tokens (a quarter prompt), width {args.width}, vocab "
            f"{args.vocab}, {args.dtype}, beta {args.beta}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
