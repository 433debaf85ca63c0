"""``python -m logitless demo``: train a small Llama stock, then with logitless, and compare.

Both runs use the same seed, data and hyper-parameters, each in its own subprocess so each peak memory figure is that
run's own. Importing this package is cheap; torch is imported only in the worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from logitless.demo.corpus import tokenize_corpus
from logitless.demo.models import FAMILIES
from logitless.demo.report import compare, print_report, write_plot

__all__ = ["add_demo_arguments", "run_demo"]

DEFAULT_VOCAB = 128256  # Llama 3's
MODES = ("stock", "logitless")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help=f"vocabulary size (default {DEFAULT_VOCAB})")
    parser.add_argument("--model", choices=FAMILIES, default="llama", help="architecture (default llama)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, constant (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for init and data order, shared by both runs")
    parser.add_argument("--out", default="logitless-demo.png", help="PNG to write (default ./logitless-demo.png)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write every figure as JSON to FILE")


def _run_worker(cfg: dict[str, Any], workdir: str) -> dict[str, Any]:
    config_path = os.path.join(workdir, f"{cfg['mode']}-config.json")
    result_path = os.path.join(workdir, f"{cfg['mode']}-result.json")
    with open(config_path, "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ)
    # The stock run must be stock even if the user exported LOGITLESS=1; the logitless run installs explicitly.
    # Likewise the logitless run must not be asked to keep real logits: that would hide the memory it saves.
    for name in ("LOGITLESS", "LOGITLESS_RETURN_LOGITS"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "logitless.demo.worker", config_path, result_path], env=env)
    try:
        with open(result_path) as f:
            result: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        result = {"mode": cfg["mode"], "error": f"worker exited with status {proc.returncode} and wrote no result"}
    return result


def run_demo(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.seq_len < 2 or args.batch_size < 1:
        print("error: --steps and --batch-size must be >= 1 and --seq-len >= 2", file=sys.stderr)
        return 2
    started, load = time.perf_counter(), os.getloadavg()[0]
    corpus = tokenize_corpus(args.vocab)
    print(
        f"logitless demo: {args.model}, vocab {args.vocab}, {args.steps} steps x {args.batch_size} x {args.seq_len} "
        f"tokens, seed {args.seed}\n"
        f"corpus: {corpus.n_documents} public-domain texts shipped in the package, {corpus.n_bytes / 1024:.0f} KiB, "
        f"{len(corpus.ids)} tokens\ntokenizer: {corpus.description}\n"
        f"machine: {os.cpu_count()} CPUs, load average {load:.1f} at start (timings are wall-clock)",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="logitless-demo-") as workdir:
        ids_path = os.path.join(workdir, "ids.bin")
        with open(ids_path, "wb") as f:
            corpus.ids.tofile(f)
        for mode in MODES:
            cfg = {
                "mode": mode,
                "model": args.model,
                "vocab": args.vocab,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "lr": args.lr,
                "seed": args.seed,
                "ids_path": ids_path,
            }
            print(f"\n{mode} run (own process):", flush=True)
            results[mode] = _run_worker(cfg, workdir)
    comparison = compare(results["stock"], results["logitless"])
    summary = {
        "config": {k: getattr(args, k) for k in ("model", "vocab", "seq_len", "batch_size", "steps", "lr", "seed")},
        "corpus": {"bytes": corpus.n_bytes, "tokens": len(corpus.ids), "tokenizer": corpus.description},
        "runs": results,
        "comparison": comparison,
        "wall_seconds": time.perf_counter() - started,
        "load_average_at_start": load,
    }
    print_report(summary)
    if "error" not in results["stock"] or "error" not in results["logitless"]:
        write_plot(summary, args.out)
        print(f"plot: {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"json: {args.json}")
    return 0 if comparison.get("ok") else 1


# The dispatcher's generic names, for callers that do not use the per-command ones.
add_arguments = add_demo_arguments
run = run_demo
