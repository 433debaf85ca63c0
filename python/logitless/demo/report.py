"""Turning two runs' results into the comparison, the printed report and the PNG."""

from __future__ import annotations

from typing import Any

# float32 losses from the same init and data: the fused op sums in a different order than stock, and Adam carries
# that rounding forward, so steps differ by up to ~1e-7 relative (measured); 1e-4 still catches any real mismatch.
LOSS_RTOL = 1e-4
MIB = 1024 * 1024


def compare(stock: dict[str, Any], fused: dict[str, Any]) -> dict[str, Any]:
    errors = [f"{r.get('mode')} run failed" for r in (stock, fused) if "error" in r]
    if errors:
        return {"ok": False, "reason": "; ".join(errors)}
    a, b = stock["losses"], fused["losses"]
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)]
    max_rel = max(rel) if rel else float("nan")
    norms = zip(stock.get("grad_norms", []), fused.get("grad_norms", []))
    grad_rel = max((abs(x - y) / max(abs(x), 1e-12) for x, y in norms), default=float("nan"))
    stock_growth = stock["peak_rss_bytes"] - stock["rss_after_model_bytes"]
    fused_growth = fused["peak_rss_bytes"] - fused["rss_after_model_bytes"]
    entry = (fused.get("audit") or {}).get("model_entry") or {}
    runtime = entry.get("runtime") or {}
    # Patched is not enough: every training forward must have taken the fused path (audit()'s run-time counts).
    fused_every_step = entry.get("status") == "patched" and runtime.get("fused", 0) > 0 and not runtime.get("stock")
    ok = fused_every_step and len(a) == len(b) and max_rel <= LOSS_RTOL
    out: dict[str, Any] = {
        "ok": ok,
        "loss_max_rel_diff": max_rel,
        "loss_rtol": LOSS_RTOL,
        "loss_rel_diff": rel,
        "grad_norm_max_rel_diff": grad_rel,
        "peak_rss_ratio": stock["peak_rss_bytes"] / fused["peak_rss_bytes"],
        "training_growth_ratio": stock_growth / max(fused_growth, 1),
        "tokens_per_second_ratio": fused["tokens_per_second"] / max(stock["tokens_per_second"], 1e-12),
    }
    if entry.get("status") != "patched":
        why = f"{entry.get('status', 'not seen')}: {entry.get('reason') or entry.get('error') or 'no reason given'}"
        out["reason"] = f"logitless did not patch {fused['model_class']} ({why}), so its run was stock too"
    elif not fused_every_step:
        out["reason"] = f"{fused['model_class']} was patched but its forwards ran stock: {runtime.get('stock') or {}}"
    elif not ok:
        out["reason"] = f"losses differ by {max_rel:.2e} relative (tolerance {LOSS_RTOL:.0e})"
    return out


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def print_report(summary: dict[str, Any]) -> None:
    runs, cmp = summary["runs"], summary["comparison"]
    stock, fused = runs["stock"], runs["logitless"]
    print()
    for run in (stock, fused):
        if "error" in run:
            print(f"{run['mode']} run FAILED:\n{run['error']}")
    ok_runs = [r for r in (stock, fused) if "error" not in r]
    if len(ok_runs) == 2:
        print(f"{'step':>4}  {'stock loss':>12}  {'logitless loss':>14}  {'rel diff':>9}")
        for i, (x, y, d) in enumerate(zip(stock["losses"], fused["losses"], cmp["loss_rel_diff"]), start=1):
            print(f"{i:>4}  {x:>12.6f}  {y:>14.6f}  {d:>9.1e}")
    elif ok_runs:
        print(f"{'step':>4}  {ok_runs[0]['mode'] + ' loss':>14}")
        for i, x in enumerate(ok_runs[0]["losses"], start=1):
            print(f"{i:>4}  {x:>14.6f}")
    print()
    for run in ok_runs:
        growth = run["peak_rss_bytes"] - run["rss_after_model_bytes"]
        logits = run["logits_elements_per_step"]
        print(
            f"{run['mode']:<9}  peak RSS {_mib(run['peak_rss_bytes']):>10}  (after model build "
            f"{_mib(run['rss_after_model_bytes'])}, training added {_mib(growth)})  "
            f"{run['tokens_per_second']:,.0f} tokens/s  {run['train_seconds']:.1f} s training ({run['train_cpu_seconds']:.0f} s CPU)  "
            f"logits tensor returned: {logits:,} elements"
        )
    if len(ok_runs) == 2:
        print(
            f"\npeak memory: stock / logitless = {cmp['peak_rss_ratio']:.2f}x "
            f"(memory added by training: {cmp['training_growth_ratio']:.2f}x)\n"
            f"speed: logitless / stock = {cmp['tokens_per_second_ratio']:.2f}x tokens/s\n"
            f"losses: max relative difference {cmp['loss_max_rel_diff']:.1e} "
            f"({'within' if cmp['loss_max_rel_diff'] <= cmp['loss_rtol'] else 'OUTSIDE'} {cmp['loss_rtol']:.0e}); "
            f"gradient norms: {cmp['grad_norm_max_rel_diff']:.1e}"
        )
    audit = fused.get("audit")
    if audit:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(audit["counts"].items())) or "nothing seen"
        entry = audit.get("model_entry") or {}
        epilogue = " ".join(f"{e.get('kind')}({e.get('expr')})" for e in entry.get("epilogue") or [])
        parts = [f"{key} {entry[key]}" for key in ("tier", "head", "code") if entry.get(key)]
        detail = ", ".join(parts + ([f"epilogue {epilogue}"] if epilogue else []))
        status = entry.get("status", "not seen by the installer")
        runtime = entry.get("runtime") or {}
        stock = ", ".join(f"{n} {reason}" for reason, n in sorted((runtime.get("stock") or {}).items())) or "none"
        print(f"audit (logitless.audit()): {counts} classes; {audit['model_class']}: {status}"
              + (f" ({detail})" if detail else "")
              + f"; forwards with labels: {runtime.get('fused', 0)} fused, stock: {stock}")
    if not cmp.get("ok"):
        print(f"RESULT: FAILED - {cmp.get('reason')}")
    print(f"wall time (both runs, tokenizer, report): {summary['wall_seconds']:.0f} s")


def write_plot(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and no GUI toolkit imported
    import matplotlib.pyplot as plt

    runs = [summary["runs"][m] for m in ("stock", "logitless") if "error" not in summary["runs"][m]]
    colours = {"stock": "tab:red", "logitless": "tab:blue"}
    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for run in runs:
        steps = range(1, len(run["losses"]) + 1)
        style = "-" if run["mode"] == "stock" else "--"
        ax_loss.plot(steps, run["losses"], style, marker="o", ms=3, color=colours[run["mode"]], label=run["mode"])
    ax_loss.set_xlabel("step")
    ax_loss.xaxis.get_major_locator().set_params(integer=True)
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("loss per step (same seed)")
    ax_loss.legend()
    names = [r["mode"] for r in runs]
    base = [r["rss_after_model_bytes"] / MIB for r in runs]
    growth = [(r["peak_rss_bytes"] - r["rss_after_model_bytes"]) / MIB for r in runs]
    ax_mem.bar(names, base, color="lightgrey", label="after model build")
    ax_mem.bar(names, growth, bottom=base, color=[colours[n] for n in names], label="added by training")
    for i, (b, g) in enumerate(zip(base, growth)):
        ax_mem.text(i, b + g, f"{b + g:,.0f} MiB", ha="center", va="bottom")
    ax_mem.set_ylabel("peak RSS (MiB)")
    # Headroom so the value labels and the legend sit above the bars.
    ax_mem.set_ylim(0, max(b + g for b, g in zip(base, growth)) * 1.3)
    ratio = summary["comparison"].get("peak_rss_ratio")
    ax_mem.set_title("peak memory of each run" + (f": stock / logitless {ratio:.2f}x" if ratio else ""))
    ax_mem.legend(loc="upper center", ncol=2, fontsize="small")
    cfg = summary["config"]
    fig.suptitle(
        f"{cfg['model']}, vocab {cfg['vocab']}, {cfg['batch_size']}x{cfg['seq_len']} tokens/step, {cfg['steps']} steps"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
