"""Encoder-decoder models (BART's family, Marian, T5's, Whisper) fused exactly: their forwards compute
``CrossEntropyLoss(...)(lm_logits.view(-1, V), labels.view(-1))`` on decoder labels, which the rewriter fuses as the
op with ``shift_labels=labels`` (no shift); T5Gemma's ``self.loss_function`` is ``ForMaskedLMLoss``, the same on
unshifted labels. The encoder-decoder wrappers (``VisionEncoderDecoderModel``: TrOCR,
Donut; ``EncoderDecoderModel``) compute that loss on their decoder's logits; fused, they hand the labels to a
decoder whose own loss is exactly that (TrOCR's, BART's), and keep the stock path otherwise. HF Trainer runs on tiny random models, stock against
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
    # ViT encoder, TrOCR decoder (as verify builds it): the loss is handed to the decoder
    "trocr": ("transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder", "VisionEncoderDecoderModel"),
    # BERT encoder, BART decoder (BartForCausalLM)
    "bert2bart": ("transformers.models.encoder_decoder.modeling_encoder_decoder", "EncoderDecoderModel"),
    # self.loss_function is ForMaskedLMLoss (loss_type set in __init__): unshifted labels; a softcap, a composite
    # head (T5GemmaLMHead.out_proj), Gemma's 256k-token vocabulary in the real checkpoints
    "t5gemma": ("transformers.models.t5gemma.modeling_t5gemma", "T5GemmaForConditionalGeneration"),
}
WRAPPERS = ("trocr", "bert2bart")
STEPS, BATCH = 4, 2
_SOURCE = {"whisper": "input_features", "trocr": "pixel_values"}


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
        elif name == "trocr":
            source = torch.randn(3, model.config.encoder.image_size, model.config.encoder.image_size, generator=g)
        else:
            source = torch.randint(3, vocab, (12,), generator=g).tolist()
        key = _SOURCE.get(name, "input_ids")  # Trainer drops columns forward does not take
        examples.append({key: source, "labels": target})
    return examples


def _collator(name: str) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["labels"]) for e in batch)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)  # padded targets are ignored
        for row, e in enumerate(batch):
            labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
        if name in _SOURCE:
            key = _SOURCE[name]
            return {key: torch.stack([e[key] for e in batch]), "labels": labels}
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
    # A wrapper's forward and its decoder's each count as fused.
    runtime = logitless.audit()["runtime"]
    assert runtime == {"fused": STEPS * (2 if name in WRAPPERS else 1), "stock": {}}, runtime
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


def _wrapper_record(model: torch.nn.Module) -> dict[str, Any]:
    cls = type(model)
    return logitless.audit()["classes"][f"{cls.__module__}.{cls.__qualname__}"]["runtime"]


def test_wrapper_hands_its_loss_to_the_decoder() -> None:
    """TrOCR: the wrapper's decoder computes the loss fused and returns no logits; equal to stock."""
    model = _model("trocr")
    batch = _collator("trocr")(_examples("trocr", model)[:2])
    stock = tiny.labelled_step(model, batch)
    logitless.install()
    fused = tiny.labelled_step(model, batch)
    assert fused[0].logits.shape[-1] == 0 and stock[0].logits.shape[-1] == model.decoder.config.vocab_size
    assert _wrapper_record(model) == {"fused": 1, "stock": {}}
    tiny.assert_steps_equal(fused, stock)


def test_wrapper_in_eval_mode_returns_stock_logits_and_loss() -> None:
    model = _model("trocr").eval()
    batch = _collator("trocr")(_examples("trocr", model)[:2])
    with torch.no_grad():
        stock = model(**batch)
        logitless.install()
        ours = model(**batch)
    assert torch.equal(ours.logits, stock.logits) and torch.equal(ours.loss, stock.loss)
    assert _wrapper_record(model) == {"fused": 0, "stock": {"eval-mode": 1}}


@pytest.mark.parametrize("case", ["bert2bert", "hooked-decoder", "tuple-outputs"])
def test_wrapper_keeps_the_stock_path_when_the_decoder_cannot_take_the_loss(case: str) -> None:
    """A decoder whose loss is not the wrapper's (BERT's shifts the labels), a hooked decoder (its hook would see
    the empty logits), and tuple outputs (they would carry the decoder's loss): stock, counted, equal to stock."""
    if case == "bert2bert":
        from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

        small = dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        config = EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(**small), BertConfig(**small))
        config.decoder_start_token_id, config.pad_token_id = 2, 0
        torch.manual_seed(0)
        model: torch.nn.Module = EncoderDecoderModel(config).train()
        batch = {"input_ids": torch.randint(3, 128, (2, 9)), "labels": torch.randint(3, 128, (2, 6))}
    else:
        model = _model("trocr")
        batch = _collator("trocr")(_examples("trocr", model)[:2])
        if case == "hooked-decoder":
            model.decoder.register_forward_hook(lambda module, args, out: None)
        else:
            batch["return_dict"] = False  # type: ignore[assignment]
    stock = tiny.labelled_step(model, batch)
    logitless.install()
    ours = tiny.labelled_step(model, batch)
    reason = {"bert2bert": "delegate-not-exact", "hooked-decoder": "delegate-hooked",
              "tuple-outputs": "delegate-tuple-outputs"}[case]  # fmt: skip
    assert _wrapper_record(model) == {"fused": 0, "stock": {reason: 1}}
    logits = ours[0].logits if case != "tuple-outputs" else ours[0][1]
    assert logits.shape[-1] == model.decoder.config.vocab_size
    tiny.assert_steps_equal(ours, stock)


def test_wrapper_vocabulary_not_the_decoders_fails_as_stock_does() -> None:
    """The wrapper reshapes the logits to its config's vocabulary: when that is not the decoder's output size stock
    raises, and the fused path must not compute a loss instead."""
    model = _model("trocr")
    batch = _collator("trocr")(_examples("trocr", model)[:2])
    model.decoder.config.vocab_size += 1
    with pytest.raises(RuntimeError):
        model(**batch)
    logitless.install()
    with pytest.raises(RuntimeError):
        model(**batch)
    assert _wrapper_record(model) == {"fused": 0, "stock": {"delegate-not-exact": 1}}
