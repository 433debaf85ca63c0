"""Multimodal wrappers that compute the causal-LM loss of a ``*ForCausalLM`` they hold: transformers'
``Llama4ForConditionalGeneration`` calls ``self.language_model(..., **kwargs)`` without labels, takes
``logits = outputs[0]`` and computes ``self.loss_function(logits=logits, labels=labels, vocab_size=V, **kwargs)``.

Fused, the wrapper hands the labels to the language model, whose own rewritten forward computes that loss from its
hidden states (``DelegateTarget::CausalLm``), so no ``[tokens, 202048]`` logits are formed. It does so only when
the result is the stock one: both ``loss_function``s are transformers' causal-LM loss, the vocabulary sizes agree, the
language model runs unhooked and the outputs are a ``ModelOutput``; otherwise the stock statements run, counted.

Each check runs stock and logitless on identical tiny weights (``python -m logitless verify``'s builder: a shrunk
default config with a vision tower, every parameter perturbed) and one image per sequence.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import _tiny_lm as tiny
import logitless
from logitless._verify.compare import build
from logitless._verify.inputs import make_feeds

LLAMA4 = ("transformers.models.llama4.modeling_llama4", "Llama4ForConditionalGeneration")

pytestmark = pytest.mark.usefixtures("stock_world", "llama4_dict_outputs")


@pytest.fixture
def llama4_dict_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.24's wrapper builds its dict output with ``outputs.image_outputs``, a field its language
    model's output does not have, so every call with ``return_dict=True`` fails there, stock or not (5.23 and 5.25
    do not read it). The field as ``None`` on that output class, for stock and logitless runs alike."""
    import inspect

    from transformers.modeling_outputs import MoeCausalLMOutputWithPast
    from transformers.models.llama4 import modeling_llama4

    if "outputs.image_outputs" in inspect.getsource(modeling_llama4.Llama4ForConditionalGeneration.forward):
        monkeypatch.setattr(MoeCausalLMOutputWithPast, "image_outputs", None, raising=False)


def _model_and_batch() -> tuple[torch.nn.Module, dict[str, Any]]:
    model, config, override = build(*LLAMA4)
    feeds = make_feeds(model, config, override.inputs)
    assert "pixel_values" in feeds.base, feeds.description  # the image path runs, not only the text one
    return model, {**feeds.base, "labels": feeds.labels, "num_items_in_batch": feeds.num_items}


def _record(model: torch.nn.Module) -> dict[str, Any]:
    classes = logitless.audit()["classes"]
    return {
        which: classes[f"{type(m).__module__}.{type(m).__qualname__}"].get("runtime")
        for which, m in (("wrapper", model), ("language_model", model.language_model))
    }


def _fused_everywhere(n: int) -> dict[str, Any]:
    return {"wrapper": {"fused": n, "stock": {}}, "language_model": {"fused": n, "stock": {}}}


@pytest.mark.parametrize("num_items", [False, True], ids=["mean", "num_items_in_batch"])
def test_wrapper_hands_its_loss_to_the_language_model(num_items: bool) -> None:
    """The language model computes the loss fused (``num_items_in_batch`` reaching it through ``**kwargs`` as it
    reaches the wrapper's loss), the wrapper returns no logits; loss and every gradient equal stock's."""
    model, batch = _model_and_batch()
    if not num_items:
        del batch["num_items_in_batch"]
    stock = tiny.labelled_step(model, batch)
    logitless.install()
    fused = tiny.labelled_step(model, batch)
    assert stock[0].logits.shape[-1] == model.config.text_config.vocab_size
    assert fused[0].logits.shape[-1] == 0
    assert _record(model) == _fused_everywhere(1)
    tiny.assert_steps_equal(fused, stock)


def test_trainer_run_matches_stock(tmp_path: Any) -> None:
    """HF Trainer, four SGD steps: every step's loss and grad norm and the final weights equal stock's."""
    model, batch = _model_and_batch()
    del batch["num_items_in_batch"]
    rows = [{k: v[i] for k, v in batch.items() if isinstance(v, torch.Tensor)} for i in range(len(batch["labels"]))]
    examples = rows * 4

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        return {k: torch.stack([e[k] for e in items]) for k in items[0]}

    args = {"collator": collate, "steps": 4, "batch_size": 2, "extra_args": {"optim": "sgd"}}
    stock = tiny.train(model, examples, output_dir=str(tmp_path / "stock"), **args)
    logitless.install()
    fused = tiny.train(_model_and_batch()[0], examples, output_dir=str(tmp_path / "fused"), **args)
    assert _record(fused.model) == _fused_everywhere(4)
    tiny.assert_runs_match(stock, fused)


def test_eval_mode_returns_stock_logits_and_loss() -> None:
    model, batch = _model_and_batch()
    model.eval()
    with torch.no_grad():
        stock = model(**batch)
        logitless.install()
        ours = model(**batch)
    assert torch.equal(ours.logits, stock.logits) and torch.equal(ours.loss, stock.loss)
    assert _record(model)["wrapper"] == {"fused": 0, "stock": {"eval-mode": 1}}


def _custom_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs: Any) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab_size), labels.reshape(-1)) * 2.0


@pytest.mark.parametrize(
    "case",
    ["wrapper-loss", "language-model-loss", "hooked-language-model", "tuple-outputs", "vocabulary",
     "language-model-vocabulary"],
)
def test_stock_path_when_the_language_model_would_not_compute_the_wrappers_loss(case: str) -> None:
    """A user's loss function on the wrapper (the language model would compute the causal loss instead) or on the
    language model (it would compute that instead of the wrapper's causal loss), a hook on the language model (it
    would see no logits), tuple outputs (they would carry its loss first), and a wrapper vocabulary size that is
    not the language model's head size (stock's loss reshapes by the wrapper's) or is, but the language model's own
    loss would be given another: stock path, counted, equal to stock."""
    model, batch = _model_and_batch()
    if case == "wrapper-loss":
        model.loss_function = _custom_loss
    elif case == "language-model-loss":
        model.language_model.loss_function = _custom_loss
    elif case == "hooked-language-model":
        model.language_model.register_forward_hook(lambda module, args, out: None)
    elif case == "tuple-outputs":
        # On the config: a ``return_dict=False`` argument is taken by the decorator, which makes the tuple from
        # the forward's dict output itself (the fused path's, empty logits included).
        model.config.return_dict = False
    else:
        # The two configs are one object in the built model: one of them changed, the other left at the head's size.
        from copy import deepcopy

        model.language_model.config = deepcopy(model.language_model.config)
        changed = model.config.text_config if case == "vocabulary" else model.language_model.config
        changed.vocab_size -= 1
    stock_error: Exception | None = None
    try:
        stock: Any = tiny.labelled_step(model, batch)
    except Exception as exc:  # noqa: BLE001 - whatever stock raises, the path taken here must raise too
        stock_error = exc
    logitless.install()
    if stock_error is not None:
        # Stock reshapes the logits to a vocabulary they do not have (and transformers 5.24's tuple outputs fail
        # in its own output capturing): the stock path taken here fails the same way.
        assert case in ("vocabulary", "tuple-outputs"), stock_error
        with pytest.raises(type(stock_error)):
            tiny.labelled_step(model, batch)
    else:
        ours = tiny.labelled_step(model, batch)
        logits = ours[0][1] if case == "tuple-outputs" else ours[0].logits
        assert logits.shape[-1] == model.language_model.lm_head.out_features
        tiny.assert_steps_equal(ours, stock)
    reason = {"wrapper-loss": "delegate-not-exact", "language-model-loss": "delegate-not-exact",
              "hooked-language-model": "delegate-hooked", "tuple-outputs": "delegate-tuple-outputs",
              "vocabulary": "delegate-not-exact", "language-model-vocabulary": "delegate-not-exact"}[case]  # fmt: skip
    assert _record(model)["wrapper"] == {"fused": 0, "stock": {reason: 1}}


def test_audit_reports_the_delegation() -> None:
    logitless.install()
    model, _ = _model_and_batch()
    cls = type(model)
    entry = logitless.audit()["classes"][f"{cls.__module__}.{cls.__qualname__}"]
    assert entry["status"] == "patched" and entry["loss_form"] == "delegated", entry
    sub = type(model.language_model)
    assert logitless.audit()["classes"][f"{sub.__module__}.{sub.__qualname__}"]["delegate_target"] == "causal_lm"


def test_a_sub_model_takes_only_the_loss_kind_its_rewrite_computes() -> None:
    """A decoder whose loss is ``CrossEntropyLoss()`` of its logits (TrOCR's) is no causal-LM target, and Llama 4's
    language model (the causal loss, which shifts) is no cross-entropy target."""
    from logitless import _runtime

    logitless.install()
    llama4, _ = _model_and_batch()
    trocr = build("transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder",
                  "VisionEncoderDecoderModel")[0]  # fmt: skip
    decoder_vocab = trocr.decoder.get_output_embeddings().out_features
    lm_vocab = llama4.language_model.lm_head.out_features
    assert _runtime.delegable(trocr, trocr.decoder, decoder_vocab, True)
    assert _runtime.delegable(llama4, llama4.language_model, lm_vocab, True, kind="causal_lm")
    assert not _runtime.delegable(trocr, trocr.decoder, decoder_vocab, True, kind="causal_lm")
    assert not _runtime.delegable(llama4, llama4.language_model, lm_vocab, True)
