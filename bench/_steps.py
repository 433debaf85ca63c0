"""What the whole-step benchmarks (hf_trainer.py, encoder_decoder.py, trl_sft.py, trl_dpo.py, trl_distill.py,
trl_gkd.py, trl_orpo.py, trl_tpo.py, trl_sdpo.py) build and measure in each child process, and how their parents run
and print the methods."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


def llama_shaped(vocab: int, width: int) -> Any:
    """The benchmarks' model config: Llama's layout (two layers, grouped-query attention) at a small width, so the
    head and its logits are most of the step."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip


def peer_models(args: Any, *, teacher_width: int | None = None) -> tuple[Any, Any]:
    """A peer benchmark child's models, after its threads are set and, when it measures logitless, ``install()``:
    the trained Llama-shaped model (seed 0, ``args.width``, ``args.dtype``) and, with ``teacher_width``, a frozen
    teacher of that width (seed 1) or None."""
    import torch

    torch.set_num_threads(args.threads)
    if args.method == "logitless":
        import logitless

        logitless.install()
    from transformers import LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_shaped(args.vocab, args.width)).to(dtype).train()
    if teacher_width is None:
        return model, None
    torch.manual_seed(1)
    teacher = LlamaForCausalLM(llama_shaped(args.vocab, teacher_width)).to(dtype).eval().requires_grad_(False)
    return model, teacher


def peer_log_probs(rows: Any, weight: Any, targets: Any, method: str) -> Any:
    """Each row's log-probability of its target under the head ``weight``, from a fused peer: ``trl kernel``
    (TRL's ``ChunkedLogProbFunction``), ``torch lce`` (``torch.nn.functional.linear_cross_entropy``,
    ``reduction="none"``) or ``cce`` (cut-cross-entropy's ``torch_compile`` implementation, the one that runs on
    CPU)."""
    if method == "trl kernel":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        return ChunkedLogProbFunction.apply(rows, weight, None, targets, 1.0, 32768, None, 1.0, ())[0]
    if method == "torch lce":
        import torch.nn.functional as F

        return -F.linear_cross_entropy(rows, weight, targets, reduction="none")
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        return -cce(rows, weight, targets, reduction="none", impl="torch_compile")
    raise ValueError(f"no fused peer named {method!r}")


def word_tokenizer() -> Any:
    """A tokenizer with the pad and eos tokens TRL's trainers ask for; the steps are handed token ids, not text."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(8)}, unk_token="t1")),
        pad_token="t0", eos_token="t2",
    )  # fmt: skip


def timed_steps(step: Callable[[], float]) -> dict[str, float]:
    """A warm-up ``step()``, then two timed ones: the last loss, seconds per step (their mean) and what the three
    added to the process's peak RSS, in MiB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    start = time.perf_counter()
    loss = [step() for _ in range(2)][-1]
    seconds = (time.perf_counter() - start) / 2
    added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"loss": loss, "seconds": seconds, "added_mib": added}


def timed_and_counted(step: Callable[[], float], mode: str) -> dict[str, float]:
    """``timed_steps``, and under logitless how many labelled forwards were fused (``fused``) of all (``forwards``),
    which ``print_stock_and_logitless`` prints."""
    result = timed_steps(step)
    if mode == "logitless":
        import logitless

        runtime = logitless.audit()["runtime"]
        result["fused"], result["forwards"] = runtime["fused"], runtime["fused"] + sum(runtime["stock"].values())
    return result


def stock_and_logitless_main(
    parser: Any, step: Callable[[Any], dict[str, float]], title: Callable[[Any], str], script: str
) -> None:
    """A wrapper-step benchmark's ``main``: ``parser`` (its own sizes) gains ``--threads`` and the children's
    ``--mode``; a child prints ``step(args)`` as JSON, the parent runs both modes (``stock_and_logitless``) and
    prints them under ``title(args)``."""
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=["stock", "logitless"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(step(args)))
        return
    print_stock_and_logitless(title(args), stock_and_logitless(script))


def stock_and_logitless(script: str) -> dict[str, dict[str, float]]:
    """``timed_steps``'s figures of ``script`` (this command line plus ``--mode stock`` / ``--mode logitless``),
    each mode in its own process so that neither's peak RSS holds the other's."""
    rows = {}
    for mode in ("stock", "logitless"):
        done = subprocess.run([sys.executable, script, *sys.argv[1:], "--mode", mode], capture_output=True,
                              text=True, check=True)  # fmt: skip
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def print_stock_and_logitless(title: str, rows: dict[str, dict[str, float]]) -> None:
    """The two modes' rows and their ratios."""
    print(title)
    for mode, r in rows.items():
        print(f"  {mode:9}  loss {r['loss']:.6f}  {r['seconds']:.2f} s/step  peak RSS +{r['added_mib']:,.0f} MiB")
    s, f = rows["stock"], rows["logitless"]
    if "fused" in f:
        print(f"  logitless: {f['fused']:.0f} of {f['forwards']:.0f} labelled forwards fused")
    print(f"  memory added: stock / logitless = {s['added_mib'] / f['added_mib']:.2f}x; "
          f"speed: {s['seconds'] / f['seconds']:.2f}x; loss rel diff {abs(s['loss'] - f['loss']) / s['loss']:.1e}")


def each_method_in_its_process(script: str, methods: list[str], flag: str) -> dict[str, dict[str, Any]]:
    """``script``'s figures per method (this command line plus ``flag method``, the child printing JSON last), each
    in its own process so that no method's peak RSS holds another's; a failed child's row is its error's last
    line."""
    rows: dict[str, dict[str, Any]] = {}
    for method in methods:
        done = subprocess.run([sys.executable, script, *sys.argv[1:], flag, method], capture_output=True, text=True)
        if done.returncode != 0:
            rows[method] = {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
            continue
        rows[method] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def print_against_logitless(rows: dict[str, dict[str, Any]], per: str) -> None:
    """One line per method (loss, seconds ``per`` call or step, peak RSS added), each peer's with logitless's
    speed-up and memory ratio."""
    ours = rows.get("logitless", {})
    width = max(map(len, rows)) + 1
    for method, r in rows.items():
        if "error" in r:
            print(f"  {method:{width}} failed: {r['error']}")
            continue
        line = (f"  {method:{width}} loss {r['loss']:.6f}  {r['seconds']:.2f} s{per}  "
                f"peak RSS +{r['added_mib']:,.0f} MiB")
        if method != "logitless" and "seconds" in ours:
            line += (f"  (logitless {r['seconds'] / ours['seconds']:.2f}x faster, "
                     f"{r['added_mib'] / max(ours['added_mib'], 1):.1f}x less memory)")  # fmt: skip
        print(line)


def timed_and_fused(model: Any, method: str, trainer: str, trls: Callable[[], Any],
                    by_hand: Callable[[], Any]) -> dict[str, float]:  # fmt: skip
    """``timed_steps`` of a training step of ``model`` (its gradients cleared, the loss, its backward): the loss from
    ``trls()`` (TRL's code: ``stock``, or ``logitless`` under ``install()``), else from ``by_hand()`` (a peer); and for
    logitless how many calls TRL's ``trainer`` integration fused (``fused``), which ``peers_main`` prints."""

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = trls() if method in ("stock", "logitless") else by_hand()
        loss.backward()
        return float(loss.detach())

    result = timed_steps(step)
    if method == "logitless":
        import logitless

        result["fused"] = logitless.audit()["integrations"]["trl"][trainer]["fused"]
    return result


def peers_main(parser: Any, methods: tuple[str, ...], step: Callable[[Any], dict[str, float]],
               title: Callable[[Any], str], script: str) -> None:  # fmt: skip
    """A trainer-step benchmark's ``main`` against its peers: ``parser`` (its own sizes) gains ``--threads``,
    ``--methods`` and the children's ``--method``; a child prints ``step(args)`` as JSON, the parent runs each method
    in its own process (``each_method_in_its_process``) and prints them under ``title(args)``."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(methods))
    parser.add_argument("--method", choices=methods, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method is not None:
        print(json.dumps(step(args)))
        return
    rows = each_method_in_its_process(script, args.methods.split(","), "--method")
    print(title(args))
    print_against_logitless(rows, "/step")
    if "fused" in rows.get("logitless", {}):
        print(f"  logitless: {rows['logitless']['fused']} of 3 steps fused")
