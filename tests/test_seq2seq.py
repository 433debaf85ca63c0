"""Encoder-decoder models (BART's family, Marian, T5's, Whisper) fused exactly: their forwards compute
``CrossEntropyLoss(...)(lm_logits.view(-1, V), labels.view(-1))`` on decoder labels, which the rewriter fuses as the
op with ``shift_labels=labels`` (no shift). HF Trainer runs on tiny random models, stock against
``logitless.install()`` on identical weights: every step's loss and grad norm and the final weights equal.

The models are built as ``python -m logitless verify`` builds them (shrunk default configs, every parameter and every
per-vocabulary buffer perturbed, so BART's ``final_logits_bias``, a ``(1, V)`` buffer, is not zero).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import _tiny_lm as tiny
import logitless
from logitless._verify.compare import build

MODELS = {
    # (1, V) logits bias added after the head
    "bart": ("transformers.models.bart.modeling_bart", "BartForConditionalGeneration"),
    # Named MarianMTModel, not *ForConditionalGeneration (the installer's class_kind takes it); (1, V) bias,
    # vocabulary from config.decoder_vocab_size
    "marian": ("transformers.models.marian.modeling_marian", "MarianMTModel"),
    # CrossEntropyLoss(ignore_index=-100), vocabulary read off the logits, decoder outputs scaled before the head
    "t5": ("transformers.models.t5.modeling_t5", "T5ForConditionalGeneration"),
    # audio features in, a head named proj_out, labels.reshape(-1)
    "whisper": ("transformers.models.whisper.modeling_whisper", "WhisperForConditionalGeneration"),
}
STEPS, BATCH = 4, 2


pytestmark = pytest.mark.usefixtures("stock_world")


def _model(name: str) -> torch.nn.Module:
    return build(*MODELS[name])[0]


def _examples(name: str, model: torch.nn.Module) -> list[dict[str, Any]]:
    """Source sequences (token ids, or log-mel frames for Whisper) and target sequences of varying length."""
    g = torch.Generator().manual_seed(3)
    vocab = int(model.get_output_embeddings().out_features)
    examples = []
    for _ in range(STEPS * BATCH):
        target = torch.randint(3, vocab, (int(torch.randint(4, 11, (1,), generator=g)),), generator=g).tolist()
        if name == "whisper":
            config = model.config
            source: Any = torch.randn(config.num_mel_bins, 2 * config.max_source_positions, generator=g)
        else:
            source = torch.randint(3, vocab, (12,), generator=g).tolist()
        key = "input_features" if name == "whisper" else "input_ids"  # Trainer drops columns forward does not take
        examples.append({key: source, "labels": target})
    return examples


def _collator(name: str) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["labels"]) for e in batch)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)  # padded targets are ignored
        for row, e in enumerate(batch):
            labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
        if name == "whisper":
            return {"input_features": torch.stack([e["input_features"] for e in batch]), "labels": labels}
        return {"input_ids": torch.tensor([e["input_ids"] for e in batch]), "labels": labels}

    return collate


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trainer_run_matches_stock(name: str, tmp_path: Any) -> None:
    examples = _examples(name, _model(name))
    # SGD: Adam's first steps move every weight by about the learning rate whatever its gradient's size, which
    # turns a rounding-level difference in a near-zero gradient into a visible weight difference.
    args = {"collator": _collator(name), "steps": STEPS, "batch_size": BATCH, "extra_args": {"optim": "sgd"}}
    stock = tiny.train(_model(name), examples, output_dir=str(tmp_path / "stock"), **args)
    logitless.install()
    fused = tiny.train(_model(name), examples, output_dir=str(tmp_path / "fused"), **args)
    runtime = logitless.audit()["runtime"]
    assert runtime == {"fused": STEPS, "stock": {}}, runtime
    tiny.assert_runs_match(stock, fused)


def test_fused_forward_returns_no_logits_and_the_stock_loss() -> None:
    """One forward with labels: empty logits, the loss stock computes from its logits, BART's bias included."""
    model = _model("bart")
    batch = _collator("bart")(_examples("bart", model)[:2])
    stock = model(**batch)
    logitless.install()
    fused = model(**batch)
    assert fused.logits.shape[-1] == 0 and stock.logits.shape[-1] == model.config.vocab_size
    assert float(model.final_logits_bias.abs().max()) > 0.1
    assert torch.allclose(fused.loss, stock.loss, rtol=1e-6, atol=0)
