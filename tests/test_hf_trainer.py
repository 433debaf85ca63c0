"""HF Trainer under logitless: its label smoothing (``label_smoothing_factor``) fused where the model's forward reads
its labels for the loss only, stock elsewhere, and always the loss stock's ``LabelSmoother`` computes; loss-only
evaluation (``Trainer.evaluate`` without ``compute_metrics``) fused, evaluation with metrics on real logits.

References: stock Trainer runs on identical weights with logitless uninstalled (every step's loss and grad norm, the
final weights), and a float64 materialised computation of the smoothed loss written here from its definition.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import _tiny_lm as tiny
import logitless
from logitless import _core
from logitless.integrations import hf_trainer
from logitless._verify.compare import build
from transformers.models.bart.modeling_bart import shift_tokens_right

pytestmark = [
    pytest.mark.skipif(not hasattr(_core, "rewrite_forward"), reason="the tier-2 rewriter is not built"),
    pytest.mark.usefixtures("stock_world"),
]

EPS = 0.1
STEPS = 4


def _args(**extra: Any) -> dict[str, Any]:
    return {"label_smoothing_factor": EPS, "optim": "sgd", **extra}


def _stock_and_fused(
    make: Any, examples: list, tmp_path: Path, **train_kwargs: Any
) -> tuple[tiny.RunResult, tiny.RunResult, dict[str, int]]:
    stock = tiny.train(make(), examples, output_dir=str(tmp_path / "stock"), **train_kwargs)
    logitless.install()
    fused = tiny.train(make(), examples, output_dir=str(tmp_path / "fused"), **train_kwargs)
    report = logitless.audit()["integrations"]["hf_trainer"]
    calls = dict(report["calls"])
    assert report["stock"] == {}, report  # every smoothed call was taken over
    logitless.uninstall()
    return stock, fused, calls


def _batch_encoding(batch: list[dict[str, list[int]]]) -> transformers.BatchEncoding:
    # What tokenizer-padding collators (DataCollatorWithPadding, DataCollatorForSeq2Seq) return: a UserDict.
    return transformers.BatchEncoding(tiny.collate(batch))


@pytest.mark.parametrize("name", ["llama", "gemma3", "cohere", "gpt2"])
def test_causal_trainer_run_matches_stock(name: str, tmp_path: Path) -> None:
    # Padded rows of different lengths and gradient accumulation: the Trainer divides by num_items_in_batch.
    examples = tiny.random_examples(40, padded=True)
    kwargs = {"steps": STEPS, "batch_size": 2, "grad_accum": 2, "extra_args": _args()}
    if name in ("llama", "gpt2"):
        kwargs["collator"] = _batch_encoding
    stock, fused, calls = _stock_and_fused(lambda: tiny.build(name), examples, tmp_path, **kwargs)
    assert calls == {"fused": STEPS * 2, "materialised": 0}
    tiny.assert_runs_match(stock, fused)


def _smoothed_reference(model: torch.nn.Module, batch: dict[str, torch.Tensor], shift: bool) -> float:
    """``(1-ε)·nll + ε·mean_j(-log p_j)`` summed over the targets, over their count, from float64 logits."""
    model = model.double()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits.double()
    labels = batch["labels"]
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logp = torch.log_softmax(logits, dim=-1)
    keep = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    uniform = -logp.mean(dim=-1)
    per_token = (1 - EPS) * nll + EPS * uniform
    return float(per_token[keep].sum() / keep.sum())


def _one_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], tmp_path: Path) -> float:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], label_smoothing_factor=EPS
    )
    trainer = transformers.Trainer(model=model, args=args)
    model.train()
    return float(trainer.compute_loss(model, dict(batch)).detach())


@pytest.mark.parametrize("name", ["gemma3", "granite"])
def test_fused_loss_against_float64(name: str, tmp_path: Path) -> None:
    batch = tiny.collate(tiny.random_examples(3, padded=True))
    want = _smoothed_reference(tiny.build(name), batch, shift=True)
    logitless.install()
    got = _one_loss(tiny.build(name), batch, tmp_path)
    assert hf_trainer.CALLS == {"fused": 1, "materialised": 0}
    assert math.isclose(got, want, rel_tol=2e-6), (got, want)


# Encoder-decoders: the labels also build the decoder inputs when the batch has none (then stock is kept).
SEQ2SEQ = {
    "bart": ("transformers.models.bart.modeling_bart", "BartForConditionalGeneration"),
    "t5": ("transformers.models.t5.modeling_t5", "T5ForConditionalGeneration"),
    # audio in; its labels are also checked against the decoder's positions (a raise)
    "whisper": ("transformers.models.whisper.modeling_whisper", "WhisperForConditionalGeneration"),
}


def _seq2seq_examples(model: torch.nn.Module, n: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(5)
    vocab = int(model.get_output_embeddings().out_features)
    examples = []
    for _ in range(n):
        length = int(torch.randint(4, 11, (1,), generator=g))
        labels = torch.randint(3, vocab, (length,), generator=g).tolist()
        if "input_features" in inspect.signature(model.forward).parameters:  # log-mel frames
            config = model.config
            features = torch.randn(config.num_mel_bins, 2 * config.max_source_positions, generator=g)
            examples.append({"input_features": features, "labels": labels})
        else:
            examples.append({"input_ids": torch.randint(3, vocab, (12,), generator=g).tolist(), "labels": labels})
    return examples


def _seq2seq_collator(model: torch.nn.Module, decoder_inputs: bool) -> Any:
    def collate(batch: list[dict[str, Any]]) -> transformers.BatchEncoding:
        width = max(len(e["labels"]) for e in batch)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, e in enumerate(batch):
            labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
        out: dict[str, torch.Tensor] = {"labels": labels}
        if "input_features" in batch[0]:
            out["input_features"] = torch.stack([e["input_features"] for e in batch])
        else:
            out["input_ids"] = torch.tensor([e["input_ids"] for e in batch])
        if decoder_inputs:  # what DataCollatorForSeq2Seq(model=...) adds: the labels shifted right
            config = model.config
            out["decoder_input_ids"] = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
        return transformers.BatchEncoding(out)  # as DataCollatorForSeq2Seq returns it

    return collate


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_seq2seq_trainer_run_matches_stock(name: str, tmp_path: Path) -> None:
    make = lambda: build(*SEQ2SEQ[name])[0]  # noqa: E731
    model = make()
    kwargs = {
        "steps": STEPS,
        "batch_size": 2,
        "collator": _seq2seq_collator(model, decoder_inputs=True),
        "extra_args": _args(),
    }
    stock, fused, calls = _stock_and_fused(make, _seq2seq_examples(model, STEPS * 2), tmp_path, **kwargs)
    assert calls == {"fused": STEPS, "materialised": 0}
    tiny.assert_runs_match(stock, fused)


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_seq2seq_without_decoder_inputs_fails_as_stock(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without labels and without decoder inputs, stock BART decodes its shifted input_ids (whose logits do not fit
    # the labels) and stock T5 has no decoder inputs: both raise. Given the labels, the forward would build the
    # decoder inputs from them and succeed; logitless must not hand them over.
    def error(model: torch.nn.Module) -> BaseException:
        batch = _seq2seq_collator(model, decoder_inputs=False)(_seq2seq_examples(model, 2))
        with pytest.raises((RuntimeError, ValueError)) as info:
            _one_loss(model, batch, tmp_path)
        return info.value

    want = error(build(*SEQ2SEQ[name])[0])
    logitless.install()
    counter = tiny.fused_forward_counter(monkeypatch)
    got = error(build(*SEQ2SEQ[name])[0])
    assert (type(got), str(got)) == (type(want), str(want))
    assert counter.calls == 0 and hf_trainer.CALLS == {"fused": 0, "materialised": 0}
    assert hf_trainer.STOCK == {"no-decoder-inputs": 1}


def test_moe_aux_loss_left_out_as_stock_does(tmp_path: Path) -> None:
    # Given labels, Mixtral adds its router aux loss to its own loss; the Trainer's smoothed loss has none.
    config = transformers.MixtralConfig(
        vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.5, pad_token_id=0,
    )  # fmt: skip

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return transformers.MixtralForCausalLM(config).float()

    examples = tiny.random_examples(16)
    kwargs = {"steps": STEPS, "batch_size": 4, "extra_args": _args()}
    stock, fused, calls = _stock_and_fused(make, examples, tmp_path, **kwargs)
    assert calls == {"fused": STEPS, "materialised": 0}
    tiny.assert_runs_match(stock, fused)


def test_lora_trainer_run_matches_stock(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    def make() -> torch.nn.Module:
        model = tiny.build("llama")
        torch.manual_seed(7)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    kwargs = {"steps": STEPS, "batch_size": 4, "extra_args": _args()}
    stock, fused, calls = _stock_and_fused(make, tiny.random_examples(16), tmp_path, **kwargs)
    assert calls == {"fused": STEPS, "materialised": 0}
    tiny.assert_runs_match(stock, fused)


def test_stock_path_taken_inside_the_forward_smooths_its_logits(tmp_path: Path) -> None:
    # A hook on the head: the rewritten forward takes its stock path (hooked-head); the Trainer's own smoother
    # then smooths the logits it returned.
    def make() -> torch.nn.Module:
        model = tiny.build("llama")
        model.lm_head.register_forward_hook(lambda module, args, out: out)
        return model

    kwargs = {"steps": STEPS, "batch_size": 4, "extra_args": _args()}
    stock, fused, calls = _stock_and_fused(make, tiny.random_examples(16), tmp_path, **kwargs)
    assert calls == {"fused": 0, "materialised": STEPS}
    tiny.assert_runs_match(stock, fused)


def test_stock_path_with_tuple_outputs(tmp_path: Path) -> None:
    # return_dict=False: given labels, the model's own loss comes first in the tuple, before the logits.
    batch = {**tiny.collate(tiny.random_examples(3, padded=True)), "return_dict": False}

    def make() -> torch.nn.Module:
        model = tiny.build("llama")
        model.lm_head.register_forward_hook(lambda module, args, out: out)
        return model

    want = _one_loss(make(), batch, tmp_path)
    logitless.install()
    got = _one_loss(make(), batch, tmp_path)
    assert hf_trainer.CALLS == {"fused": 0, "materialised": 1}
    assert got == pytest.approx(want, rel=1e-6)


class _HalfSmoother(transformers.trainer_pt_utils.LabelSmoother):
    def __call__(self, model_output: Any, labels: Any, shift_labels: bool = False, **kwargs: Any) -> Any:
        return 0.5 * super().__call__(model_output, labels, shift_labels=shift_labels, **kwargs)


@pytest.mark.parametrize("case", ["custom-smoother", "compute-loss-func", "eval-mode", "labels-read-elsewhere"])
def test_other_setups_keep_the_stock_path(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = tiny.collate(tiny.random_examples(3, padded=True))

    def loss_of(model: torch.nn.Module) -> float:
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to=[], label_smoothing_factor=EPS
        )
        trainer = transformers.Trainer(model=model, args=args)
        if case == "custom-smoother":
            trainer.label_smoother = _HalfSmoother(epsilon=EPS)
        if case == "compute-loss-func":
            trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: outputs.logits.float().mean()
        model.train(case != "eval-mode")
        return float(trainer.compute_loss(model, dict(batch)).detach())

    want = loss_of(tiny.build("llama"))
    logitless.install()
    if case == "labels-read-elsewhere":
        from logitless import _registry

        # As if Llama's forward also read its labels outside the loss (the rewriter then reports None).
        monkeypatch.setattr(_registry, "labels_elsewhere", lambda cls: None)
    counter = tiny.fused_forward_counter(monkeypatch)
    got = loss_of(tiny.build("llama"))
    assert counter.calls == 0  # the model was called without labels, as stock calls it
    assert hf_trainer.CALLS == {"fused": 0, "materialised": 0}
    # Counted with its reason, so the stock path is never silent (audit()["integrations"]["hf_trainer"]["stock"]).
    assert logitless.audit()["integrations"]["hf_trainer"]["stock"] == {case: 1}
    assert got == pytest.approx(want, rel=1e-6)


def test_uninstall_restores_what_install_wrapped() -> None:
    wrapped = [(transformers.Trainer, "compute_loss"), (transformers.Trainer, "prediction_step"),
               (transformers.Seq2SeqTrainer, "prediction_step")]  # fmt: skip
    try:
        from trl.trainer.sft_trainer import SFTTrainer

        wrapped.append((SFTTrainer, "compute_loss"))
    except ImportError:  # pragma: no cover - TRL is in the dev requirements
        pass
    originals = [cls.__dict__[name] for cls, name in wrapped]
    logitless.install()
    assert all(cls.__dict__[name] is not f for (cls, name), f in zip(wrapped, originals))
    assert logitless.audit()["integrations"]["hf_trainer"]["patched"]
    logitless.uninstall()
    assert all(cls.__dict__[name] is f for (cls, name), f in zip(wrapped, originals))


class _LogitsReadingTrainer(transformers.Trainer):
    """A compute_loss override that reads the logits (a metric of its own in eval)."""

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        self.widths = [*getattr(self, "widths", []), int(outputs.logits.shape[-1])]
        return (loss, outputs) if return_outputs else loss


def _evaluate(
    make: Any, tmp_path: Path, *, metrics: bool, smoothing: float = 0.0, cls: type = transformers.Trainer
) -> tuple[dict[str, float], list]:
    """``Trainer.evaluate`` on padded batches; also the widths of the logits the model returned."""
    model = make()
    widths: list[int] = []
    model.register_forward_hook(lambda module, args, out: widths.append(int(out.logits.shape[-1])))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=4,
        label_smoothing_factor=smoothing,
    )  # fmt: skip

    def accuracy(pred: Any) -> dict[str, float]:
        return {"top1": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = cls(
        model=model, args=args, eval_dataset=tiny.random_examples(12, padded=True), data_collator=tiny.collate,
        compute_metrics=accuracy if metrics else None,
    )  # fmt: skip
    return trainer.evaluate(), widths


@pytest.mark.parametrize("smoothing", [0.0, EPS], ids=["plain", "label-smoothing"])
def test_loss_only_evaluation_is_fused(smoothing: float, tmp_path: Path) -> None:
    # Trainer.evaluate without compute_metrics keeps the loss only: fused in eval mode, no logits formed.
    make = lambda: tiny.build("gemma3")  # noqa: E731
    want, stock_widths = _evaluate(make, tmp_path, metrics=False, smoothing=smoothing)
    logitless.install()
    got, widths = _evaluate(make, tmp_path, metrics=False, smoothing=smoothing)
    assert stock_widths == [tiny.VOCAB] * 3 and widths == [0] * 3
    assert logitless.audit()["runtime"] == {"fused": 3, "stock": {}}
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("case", ["compute-metrics", "compute-loss-override"])
def test_evaluation_that_may_read_the_logits_keeps_them(case: str, tmp_path: Path) -> None:
    # compute_metrics reads the logits; so may a compute_loss override (here: it records their width).
    make = lambda: tiny.build("llama")  # noqa: E731
    kwargs: dict[str, Any] = {"metrics": True} if case == "compute-metrics" else {
        "metrics": False, "cls": _LogitsReadingTrainer}
    want, _ = _evaluate(make, tmp_path, **kwargs)
    logitless.install()
    got, widths = _evaluate(make, tmp_path, **kwargs)
    assert widths == [tiny.VOCAB] * 3
    assert logitless.audit()["runtime"] == {"fused": 0, "stock": {"eval-mode": 3}}
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
    if case == "compute-metrics":
        assert got["eval_top1"] == want["eval_top1"]


def _generating_evaluation(tmp_path: Path, smoothing: float) -> tuple[dict[str, float], list[int]]:
    """``Seq2SeqTrainer.evaluate`` with ``predict_with_generate`` and a metric on the generated tokens; also the
    logits widths of the labelled forwards (``generate``'s own forwards carry no labels)."""
    model = build(*SEQ2SEQ["bart"])[0]
    widths: list[int] = []

    def seen(module: Any, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        if kwargs.get("labels") is not None:
            widths.append(int(out.logits.shape[-1]))

    model.register_forward_hook(seen, with_kwargs=True)
    args = transformers.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=2, predict_with_generate=True,
        generation_max_length=6, label_smoothing_factor=smoothing,
    )  # fmt: skip

    def first_token(pred: Any) -> dict[str, float]:
        return {"first": float((pred.predictions[:, 1] == pred.label_ids[:, 0]).mean())}

    trainer = transformers.Seq2SeqTrainer(
        model=model, args=args, eval_dataset=_seq2seq_examples(model, 4),
        data_collator=_seq2seq_collator(model, decoder_inputs=True), compute_metrics=first_token,
    )  # fmt: skip
    return trainer.evaluate(), widths


@pytest.mark.parametrize("smoothing", [0.0, EPS], ids=["plain", "label-smoothing"])
def test_generating_evaluation_fuses_the_loss_forward(smoothing: float, tmp_path: Path) -> None:
    # Predictions are generated tokens: the labelled forward only gives the loss (smoothed from its logits when
    # there is a label smoother), so it is fused.
    want, stock_widths = _generating_evaluation(tmp_path, smoothing)
    logitless.install()
    got, widths = _generating_evaluation(tmp_path, smoothing)
    assert stock_widths == [stock_widths[0]] * 2 and stock_widths[0] > 0 and widths == [0] * 2
    assert logitless.audit()["runtime"] == {"fused": 2, "stock": {}}
    assert hf_trainer.CALLS == {"fused": 2 if smoothing else 0, "materialised": 0}
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
    assert got["eval_first"] == want["eval_first"]
