"""``python -m logitless verify``: every causal LM in the installed transformers, stock against logitless, on
identical tiny random weights. See docs/coverage.md for the last committed result.

Exit status: 0 when there is no MISMATCH and every ``--min-verified`` floor is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import pathlib
import sys
import time
from importlib import metadata
from typing import Any

from logitless._verify import report
from logitless._verify.discover import CAUSAL, CONDITIONAL, Candidate, discover


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=pathlib.Path, help="write every class's result as JSON here")
    parser.add_argument("--markdown", type=pathlib.Path, help="write the coverage table (docs/coverage.md) here")
    parser.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="class name or glob (repeatable); default: every candidate class")
    parser.add_argument("--kind", choices=[CAUSAL, CONDITIONAL], help="only this kind of class")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds per class before it is abandoned (the slowest take ~60 s on a busy machine)")
    parser.add_argument("--min-verified", type=int, nargs=2, default=None, metavar=("CAUSAL", "CONDITIONAL"),
                        help="fail unless at least this many classes of each kind are verified")
    parser.add_argument("--min-total", type=int, default=None, metavar="N",
                        help="fail unless at least N classes (both kinds together) are verified")
    parser.add_argument("--stock-only", action="store_true",
                        help="harness self-test: compare stock with stock (no logitless); every class must match")
    parser.add_argument("--quiet", action="store_true", help="no per-class progress lines")


add_arguments = add_verify_arguments


def select(candidates: list[Candidate], only: list[str], kind: str | None) -> list[Candidate]:
    chosen = [c for c in candidates if kind is None or c.kind == kind]
    if only:
        chosen = [c for c in chosen if any(fnmatch.fnmatchcase(c.cls, pat) for pat in only)]
    return chosen


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def run_verify(args: argparse.Namespace) -> int:
    from logitless import _versions
    from logitless._verify.pool import run_all

    unsupported = _versions.unsupported()
    if unsupported is not None:
        # Every class would fail in the harness and read as "not-built".
        print(f"verify: {unsupported}", file=sys.stderr)
        return 2
    candidates = select(discover(), args.only, args.kind)
    if not candidates:
        print("verify: no class matches", file=sys.stderr)
        return 1
    # Slowest-first would need history; interleaving kinds keeps both workers busy on mixed sizes instead.
    started = time.perf_counter()
    done = 0

    def progress(result: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        if not args.quiet:
            print(f"[{done}/{len(candidates)}] {result['status']:9} {result['class']}  "
                  f"{result.get('reason', '')[:140]}", flush=True)

    results = run_all(candidates, workers=args.workers, timeout=args.timeout,
                      mode="stock" if args.stock_only else "install", on_result=progress)
    seconds = time.perf_counter() - started
    meta = {"transformers": _version("transformers"), "torch": _version("torch"), "seconds": seconds,
            "workers": args.workers, "mode": "stock-only" if args.stock_only else "install"}
    counts = report.summary(results)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "summary": counts, "trl": report.trl_summary(results),
                                         "distillation": report.distill_summary(results),
                                         "gkd": report.gkd_summary(results), "odds": report.odds_summary(results),
                                         "results": results},
                                        indent=1) + "\n")  # fmt: skip
    if args.markdown:
        args.markdown.write_text(report.markdown(results, meta))
    for kind, c in counts.items():
        print(f"{kind}: " + ", ".join(f"{s} {c[s]}" for s in report.STATUSES) + f" (of {c['total']})")
    trl = report.trl_summary(results)
    print("TRL drop-in: " + ", ".join(f"{s} {trl[s]}" for s in report.TRL_STATUSES))
    divergence = report.distill_summary(results)
    print("DistillationTrainer drop-in: " + ", ".join(f"{s} {divergence[s]}" for s in report.DISTILL_STATUSES))
    steps = report.gkd_summary(results)
    print("GKDTrainer step: " + ", ".join(f"{s} {steps[s]}" for s in report.GKD_STATUSES))
    calls = report.odds_summary(results)
    print("ORPO / CPO / Online DPO calls: " + ", ".join(f"{s} {calls[s]}" for s in report.ODDS_STATUSES))
    print(f"verify: {seconds:.0f} s")
    failed = False
    for r in results:
        if r["status"] == "MISMATCH":
            failed = True
            print(f"MISMATCH {r['class']}: {r['reason']}", file=sys.stderr)
        if (r.get("trl") or {}).get("status") == "MISMATCH":
            failed = True
            print(f"TRL drop-in MISMATCH {r['class']}: {r['trl']['reason']}", file=sys.stderr)
        if (r.get("distill") or {}).get("status") == "MISMATCH":
            failed = True
            print(f"DistillationTrainer drop-in MISMATCH {r['class']}: {r['distill']['reason']}", file=sys.stderr)
        if (r.get("gkd") or {}).get("status") == "MISMATCH":
            failed = True
            print(f"GKDTrainer step MISMATCH {r['class']}: {r['gkd']['reason']}", file=sys.stderr)
        if (r.get("odds") or {}).get("status") == "MISMATCH":
            failed = True
            print(f"ORPO / CPO / Online DPO MISMATCH {r['class']}: {r['odds']['reason']}", file=sys.stderr)
    if args.min_verified:
        for kind, floor in zip((CAUSAL, CONDITIONAL), args.min_verified):
            if counts[kind]["verified"] < floor:
                failed = True
                print(f"verify: {kind} verified {counts[kind]['verified']} < required {floor}", file=sys.stderr)
    total = sum(c["verified"] for c in counts.values())
    if args.min_total is not None and total < args.min_total:
        failed = True
        print(f"verify: verified {total} < required {args.min_total}", file=sys.stderr)
    return 1 if failed else 0


run = run_verify
