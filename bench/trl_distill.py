"""TRL's DistillationTrainer divergence (``_chunked_divergence_loss``): materialised, TRL's own kernel and logitless,
each in its own process, on one forward + backward of the loss as the trainer calls it.

```
python bench/trl_distill.py                                   # 2048 tokens, student 1024 / teacher 2048 wide, V 128256
python bench/trl_distill.py --dtype bfloat16 --beta 0.5 --masked 0.5
```

Methods: ``materialised`` (both models' ``[tokens, V]`` logits, upcast to float32 as stock transformers does, the
divergence by autograd: what distillation costs without a fused loss), ``trl`` (TRL >= 1.16's own
``_chunked_divergence_loss``: ``ChunkedDivergenceFunction``, 4096 x 32768 float32 tiles, the logits recomputed in
backward) and ``logitless`` (``logitless.integrations.trl_distillation.chunked_divergence_loss``, the same
arguments). Reported per method: the loss, seconds per call (mean of two after a warm-up) and the memory the calls
added to the process's peak RSS. No other peers: Liger's fused linear JSD needs CUDA, cut-cross-entropy and torch's
``linear_cross_entropy`` compute a cross-entropy against labels, not a divergence from a teacher.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

# bench/ is on sys.path: these run as scripts
from _steps import each_method_in_its_process, print_against_logitless, timed_steps

METHODS = ("materialised", "trl", "logitless")


def _materialised(h_s: Any, h_t: Any, w_s: Any, w_t: Any, mask: Any, beta: float, temperature: float) -> Any:
    import torch

    log_s = torch.log_softmax((h_s @ w_s.T).float() / temperature, -1)
    with torch.no_grad():
        log_t = torch.log_softmax((h_t @ w_t.T).float() / temperature, -1)
    if beta == 0.0:
        per = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif beta == 1.0:
        per = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        log_m = torch.logaddexp(log_s + math.log(1 - beta), log_t + math.log(beta))
        per = beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)
    kept = mask.bool()
    return per[kept].sum() / kept.sum().clamp(min=1)


def _child(args: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    n = args.tokens

    def randn(*shape: int, scale: float) -> Any:
        # Drawn in place in the benchmark's dtype: no temporary sets a peak RSS before the steps are measured.
        return torch.randn(*shape, generator=g, dtype=dtype).mul_(scale)

    h_s = randn(1, n, args.width, scale=0.5).requires_grad_()
    w_s = randn(args.vocab, args.width, scale=args.width**-0.5).requires_grad_()
    h_t = randn(1, n, args.teacher_width, scale=0.5)
    w_t = randn(args.vocab, args.teacher_width, scale=args.teacher_width**-0.5)
    mask = (torch.rand(1, n, generator=g) >= args.masked).long()
    if args.mode == "materialised":

        def loss() -> Any:
            return _materialised(h_s, h_t, w_s, w_t, mask, args.beta, args.temperature)

    else:
        if args.mode == "trl":
            from trl.trainer.distillation_trainer import _chunked_divergence_loss as divergence
        else:
            from logitless.integrations.trl_distillation import chunked_divergence_loss as divergence

        def loss() -> Any:
            return divergence(h_s, h_t, w_s, w_t, mask, args.beta, temperature=args.temperature)[0]

    def step() -> float:
        h_s.grad = w_s.grad = None
        value = loss()
        value.backward()
        return float(value.detach())

    return timed_steps(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--teacher-width", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--beta", type=float, default=1.0, help="TRL's: 0 forward KL, 1 reverse KL (its default)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--masked", type=float, default=0.0, help="fraction of positions outside the completion")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--mode", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(_child(args)))
        return
    rows = each_method_in_its_process(__file__, args.methods.split(","), "--mode")
    print(f"distillation divergence: {args.tokens} tokens ({args.masked:.0%} masked), student {args.width} / teacher "
          f"{args.teacher_width} wide, vocab {args.vocab}, {args.dtype}, beta {args.beta}, {args.threads} thread(s)")
    print_against_logitless(rows, "")

if __name__ == "__main__":
    main()
