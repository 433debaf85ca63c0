"""TRL's SDPOTrainer (``trl.experimental.sdpo``, its default sampled-token self-distillation): one training step's
loss and backward on a Llama-shaped model (Llama 3's 128256-token vocabulary) and its EMA teacher, each method in
its own process.

```
python bench/trl_sdpo.py                     # 4 completions of 384 tokens after 128-token prompts (the teacher's
                                             # 64 tokens longer), width 512, float32, 2 threads
python bench/trl_sdpo.py --dtype bfloat16
python bench/trl_sdpo.py --distillation-mode topk_logits --methods stock,logitless   # SDFT's default objective
```

Methods: ``stock`` (TRL's ``compute_loss``: the student's ``[B, C, V]`` logits with gradients, the teacher's without,
each token's log-probability from them, the clipped reverse-KL estimate), three by-hand steps that run both
backbones and compute the completion tokens' log-probabilities from their hidden states with a fused peer, then the
same loss: ``trl kernel`` (TRL's ``ChunkedLogProbFunction``, its fused LM head kernel), ``torch lce``
(``torch.nn.functional.linear_cross_entropy``, ``reduction="none"``) and ``cce`` (cut-cross-entropy's
``torch_compile`` implementation, the one that runs on CPU), and ``logitless`` (``compute_loss`` under
``logitless.install()``, no change to the step). A quarter of the samples have no successful peer (SDPO's
distillation mask 0): stock and the by-hand peers score them anyway, logitless skips them. Reported per method: the
loss, seconds per step (mean of two after a warm-up) and what the steps added to the process's peak RSS. Liger has
no self-distillation loss. ``--distillation-mode topk_logits`` (SDFT's default, here with SDFT's JSD at 0.5 over the
student's top 100 tokens) has no fused peer: the peers compute one token's log-probability per position, not a
position's top-k.
"""

from __future__ import annotations

import argparse
from typing import Any

# bench/ is on sys.path: these run as scripts
from _steps import peer_log_probs, peer_models, peers_main, timed_and_fused

METHODS = ("stock", "trl kernel", "torch lce", "cce", "logitless")


def _trainer(model: Any, teacher: Any, mode: str, top_k: int) -> Any:
    """An SDPOTrainer holding only what its ``compute_loss`` reads (its __init__ builds a whole Trainer), with
    SDPOConfig's defaults."""
    import inspect
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.experimental.sdpo import SDPOTrainer

    trainer = SDPOTrainer.__new__(SDPOTrainer)
    trainer.model, trainer.teacher_model, trainer.use_teacher_server = model, teacher, False
    trainer.temperature, trainer.current_gradient_accumulation_steps, trainer._name = 1.0, 1, "SDPO"
    trainer.model_kwarg_keys = inspect.signature(model.forward).parameters.keys()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    topk = mode == "topk_logits"
    trainer.args = SimpleNamespace(torch_compile=False, distillation_weight=1.0, distillation_mode=mode,
                                   distillation_alpha=0.5 if topk else 1.0, distillation_is_clip=2.0,
                                   teacher_model_kind="ema", distillation_topk=top_k, distillation_add_tail=False)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m, gather=lambda t: t)
    return trainer


def _log_probs(model: Any, ids: Any, completion: Any, method: str) -> Any:
    """The completion tokens' log-probabilities (``[B, C]``) under ``model``, from its backbone's hidden states and a
    peer's fused head."""
    length = completion.size(1)
    hidden = model.model(input_ids=ids).last_hidden_state[:, -length - 1 : -1]
    rows, targets, weight = hidden.reshape(-1, hidden.size(-1)), completion.reshape(-1), model.lm_head.weight
    return peer_log_probs(rows, weight, targets, method).reshape(completion.shape)


def _by_hand(model: Any, teacher: Any, inputs: dict[str, Any], method: str) -> Any:
    """SDPO's sampled-token loss (TRL's clipping and per-sequence mean) from a peer's log-probabilities."""
    import torch

    completion = inputs["completion_ids"]
    student = _log_probs(model, torch.cat([inputs["prompt_ids"], completion], 1), completion, method)
    with torch.no_grad():
        reference = _log_probs(teacher, inputs["teacher_input_ids"], completion, method)
    per_token = (student - reference).detach() * student
    ratio = torch.exp((student - inputs["old_per_token_logps"]).detach().clamp(-20.0, 20.0)).clamp(max=2.0)
    mask = inputs["completion_mask"] * inputs["self_distillation_mask"].unsqueeze(1)
    return ((per_token * ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _step(args: argparse.Namespace) -> dict[str, float]:
    import torch

    model, teacher = peer_models(args, teacher_width=args.width)
    g = torch.Generator().manual_seed(2)
    prompt_len, completion_len = args.seq // 4, args.seq - args.seq // 4
    prompt = torch.randint(3, args.vocab, (args.samples, prompt_len), generator=g)
    completion = torch.randint(3, args.vocab, (args.samples, completion_len), generator=g)
    context = torch.randint(3, args.vocab, (args.samples, args.context), generator=g)
    teacher_ids = torch.cat([context, prompt, completion], 1)
    distilled = torch.ones(args.samples)
    distilled[: args.samples // 4] = 0  # samples whose group had no success: no teacher
    inputs = {
        "prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
        "completion_mask": torch.ones_like(completion), "teacher_input_ids": teacher_ids,
        "teacher_attention_mask": torch.ones_like(teacher_ids), "self_distillation_mask": distilled,
        "old_per_token_logps": torch.full(completion.shape, -11.5),
    }  # fmt: skip
    trainer = _trainer(model, teacher, args.distillation_mode, args.topk)
    if args.distillation_mode == "topk_logits" and args.method not in ("stock", "logitless"):
        raise SystemExit(f"{args.method}: no top-k support (one token's log-probability per position)")

    return timed_and_fused(model, args.method, "sdpo", lambda: trainer.compute_loss(model, inputs),
                           lambda: _by_hand(model, teacher, inputs, args.method))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--context", type=int, default=64, help="the teacher's extra prompt tokens")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--distillation-mode", choices=["sampled_token", "topk_logits"], default="sampled_token")
    parser.add_argument("--topk", type=int, default=100, help="distillation_topk (topk_logits)")
    peers_main(parser, METHODS, _step, _title, __file__)


def _title(args: argparse.Namespace) -> str:
    objective = ("sampled-token reverse KL" if args.distillation_mode == "sampled_token"
                 else f"JSD 0.5 over the student's top {args.topk}")  # fmt: skip
    return (f"SDPO step ({objective}, EMA teacher): {args.samples} samples x {args.seq} tokens (a "
            f"quarter prompt; the teacher's {args.context} longer), a quarter without a teacher, width {args.width}, "
            f"vocab {args.vocab}, {args.dtype}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
