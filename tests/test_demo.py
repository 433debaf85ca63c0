"""Smoke test of ``python -m logitless demo`` at a tiny size, plus its torch-free pieces."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from logitless.demo.corpus import SEPARATOR, corpus_files, tokenize_corpus

VOCAB, SEQ, STEPS = 1024, 64, 2


def test_corpus_ships_and_tokenizes_within_vocab() -> None:
    assert len(corpus_files()) >= 3
    first, second = tokenize_corpus(VOCAB), tokenize_corpus(VOCAB)
    assert first.tokenizer_ids <= VOCAB
    assert 0 <= min(first.ids) and max(first.ids) < first.tokenizer_ids
    # Both runs get ids from one tokenisation, but a rerun of the demo must see the same data too.
    assert first.ids == second.ids
    assert first.n_documents == len(corpus_files()) and SEPARATOR not in "".join(p.read_text() for p in corpus_files())


def test_vocab_too_small_for_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 257"):
        tokenize_corpus(200)


def test_importing_the_demo_does_not_import_torch() -> None:
    code = "import sys, logitless.demo; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tiny_demo_stock_and_logitless_agree(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "demo.json", tmp_path / "demo.png"
    cmd = [sys.executable, "-m", "logitless", "demo", "--steps", str(STEPS), "--seq-len", str(SEQ),
           "--vocab", str(VOCAB), "--json", str(out_json), "--out", str(out_png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out_json.exists(), proc.stdout + proc.stderr
    summary = json.loads(out_json.read_text())
    stock, fused, cmp = summary["runs"]["stock"], summary["runs"]["logitless"], summary["comparison"]
    assert "error" not in stock, stock.get("error")
    assert "error" not in fused, fused.get("error")
    assert proc.returncode == 0, cmp.get("reason") or proc.stdout[-2000:]

    for run in (stock, fused):
        assert len(run["losses"]) == STEPS and all(math.isfinite(x) for x in run["losses"])
        assert run["tokens"] == STEPS * SEQ and run["tokens_per_second"] > 0
        assert run["peak_rss_bytes"] >= run["rss_after_model_bytes"] > 0
    # A random-init model starts near uniform over the vocabulary.
    assert abs(stock["losses"][0] - math.log(VOCAB)) < 0.5
    # Same seed, same data: the fused loss matches stock step for step.
    assert stock["losses"] == pytest.approx(fused["losses"], rel=1e-4)
    assert cmp["ok"] and cmp["loss_max_rel_diff"] <= 1e-4
    # Stock hands back [batch, seq, vocab] logits; the patched forward never builds them.
    assert stock["logits_elements_per_step"] == SEQ * VOCAB
    assert fused["logits_elements_per_step"] == 0
    assert fused["audit"]["model_entry"]["status"] == "patched"
    # Every training step's forward took the fused path (one forward per step here), none fell back.
    assert fused["audit"]["model_entry"]["runtime"] == {"fused": len(fused["losses"]), "stock": {}}

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for needle in ("stock / logitless", "tokens/s", "audit", "tokenizer: byte-level BPE"):
        assert needle in proc.stdout
