"""One training run of the demo, in its own process so its peak memory is its own.

``python -m logitless.demo.worker CONFIG.json RESULT.json``: the parent writes the config, this process trains and
writes the result (or ``{"error": traceback}``). Progress goes to stderr.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
import traceback
from array import array
from typing import Any


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _audit_summary(model_class: str) -> dict[str, Any]:
    """The installer's counts by status, and its entry for the class being trained (keyed by qualified name)."""
    import logitless

    report = logitless.audit()
    classes: dict[str, Any] = report.get("classes", {})
    this = next((dict(v, name=k) for k, v in classes.items() if k.rsplit(".", 1)[-1] == model_class), None)
    return {"counts": dict(report.get("counts", {})), "model_class": model_class, "model_entry": this}


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    mode = cfg["mode"]
    if mode == "logitless":
        import logitless

        # Installed before the model is built, as a user would: the import hook patches the modeling module.
        logitless.install()
    import torch
    import transformers

    from logitless.demo.models import build_model
    from logitless.demo.progress import ProgressBar

    transformers.logging.set_verbosity_error()
    ids = array("i")
    with open(cfg["ids_path"], "rb") as f:
        ids.frombytes(f.read())
    seq_len, batch, steps = cfg["seq_len"], cfg["batch_size"], cfg["steps"]
    n_items = steps * batch
    # The default run needs more tokens than the corpus has: repeat it, and cut consecutive windows.
    stream = torch.tensor(ids, dtype=torch.long)
    reps = -(-(n_items * seq_len) // len(stream))
    stream = stream.repeat(reps)
    windows = [stream[i * seq_len : (i + 1) * seq_len].clone() for i in range(n_items)]
    dataset = [{"input_ids": w, "labels": w} for w in windows]

    model = build_model(cfg["model"], cfg["vocab"], seq_len, cfg["seed"])
    n_params = sum(p.numel() for p in model.parameters())
    rss_after_model = _rss_bytes()

    losses: list[float] = []
    logits_numel: list[int] = []

    class RecordingTrainer(transformers.Trainer):
        """Keeps each step's exact loss (the Trainer's log rounds to 4 digits) and the logits size returned."""

        def compute_loss(
            self,
            model: torch.nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: torch.Tensor | int | None = None,
        ) -> Any:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            losses.append(float(loss.detach()))
            logits_numel.append(int(outputs.logits.numel()))
            # Dropping our reference now so the stock logits are freed when the Trainer would free them.
            if return_outputs:
                return loss, outputs
            del outputs
            return loss

    bar = ProgressBar(mode, steps, losses)
    with tempfile.TemporaryDirectory(prefix="logitless-demo-") as out_dir:
        args = transformers.TrainingArguments(
            output_dir=out_dir,
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=cfg["lr"],
            lr_scheduler_type="constant",
            weight_decay=0.0,
            optim="adamw_torch",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            seed=cfg["seed"],
            dataloader_num_workers=0,
        )
        trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset, callbacks=[bar])
        # With tqdm off the Trainer prints every log dict to stdout; the bar and the final report say it better.
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        cpu_start, start = _cpu_seconds(), time.perf_counter()
        trainer.train()
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start

    result: dict[str, Any] = {
        "mode": mode,
        "losses": losses,
        "grad_norms": bar.grad_norms,
        "step_seconds": bar.step_seconds,
        "train_seconds": wall,
        # CPU time as well: on a shared machine wall-clock figures mostly measure the neighbours.
        "train_cpu_seconds": cpu,
        "tokens": n_items * seq_len,
        "tokens_per_second": n_items * seq_len / sum(bar.step_seconds) if bar.step_seconds else 0.0,
        "peak_rss_bytes": _peak_rss_bytes(),
        "rss_after_model_bytes": rss_after_model,
        "logits_elements_per_step": logits_numel[0] if logits_numel else None,
        "parameters": n_params,
        "torch_threads": torch.get_num_threads(),
        "model_class": type(model).__name__,
    }
    if mode == "logitless":
        result["audit"] = _audit_summary(type(model).__name__)
    return result


def main(argv: list[str]) -> int:
    config_path, result_path = argv
    with open(config_path) as f:
        cfg = json.load(f)
    try:
        result = train(cfg)
        code = 0
    except Exception:  # noqa: BLE001 — the parent reports any failure of a run, whatever it is
        result = {"mode": cfg.get("mode"), "error": traceback.format_exc()}
        code = 1
    with open(result_path, "w") as f:
        json.dump(result, f)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
