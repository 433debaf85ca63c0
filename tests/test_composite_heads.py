"""Composite heads: ``RobertaLMHead`` and BERT-style ``cls → predictions → decoder`` are fused on their
final ``nn.Linear`` after the head's own leading statements; anything that would make that split inexact keeps the
stock path. References are stock transformers on the same weights (float64 copies, computed before installing).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from transformers import RobertaConfig, RobertaForCausalLM, RoFormerConfig, RoFormerForCausalLM

import logitless
from logitless import _core
from logitless._heads import resolve_head

VOCAB = 96


def _roberta() -> torch.nn.Module:
    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return RobertaForCausalLM(config).train()  # no dropout: train mode is deterministic


def _roformer() -> torch.nn.Module:
    # embedding_size != hidden_size: the transform changes the width the decoder sees.
    config = RoFormerConfig(
        vocab_size=VOCAB, embedding_size=24, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=64, is_decoder=True, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return RoFormerForCausalLM(config).train()


BUILDERS: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {
    "roberta": (_roberta, "lm_head.decoder"),
    "roformer": (_roformer, "cls.predictions.decoder"),
}


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, -3:] = -100
    return {"input_ids": input_ids, "labels": labels}


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, Any]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out


@pytest.fixture(autouse=True)
def _uninstalled_after() -> Iterator[None]:
    logitless.uninstall()
    yield
    logitless.uninstall()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_composite_head_is_fused_and_matches_float64_stock(name: str) -> None:
    build, linear_path = BUILDERS[name]
    model = build()
    reference = copy.deepcopy(model).double()
    ref_loss, ref_grads, ref_out = _loss_and_grads(reference, _batch())  # stock: nothing installed yet
    assert ref_out.logits.shape[-1] == VOCAB

    logitless.install()
    record = logitless.audit()["classes"][f"{type(model).__module__}.{type(model).__name__}"]
    assert record["status"] == "patched", record
    loss, grads, out = _loss_and_grads(model, _batch())
    assert out.logits.shape[-1] == 0, "the fused path did not run"
    plan = resolve_head(model.get_submodule(linear_path.split(".")[0]))
    assert plan is not None and plan.linear is model.get_submodule(linear_path)
    # Stock computes the loss itself in float32 (`logits.float()`), even for a float64 model.
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=2e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n].double(), ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_hooked_composite_head_keeps_stock_path() -> None:
    model = _roformer()
    stock_loss, stock_grads, _ = _loss_and_grads(model, _batch())
    seen: list[int] = []
    model.cls.predictions.register_forward_hook(lambda module, args, output: seen.append(output.shape[-1]))
    logitless.install()
    loss, grads, out = _loss_and_grads(model, _batch())
    assert out.logits.shape[-1] == VOCAB and seen == [VOCAB], "a hooked head must be called, not bypassed"
    assert torch.equal(loss, stock_loss)
    assert all(torch.equal(grads[n], stock_grads[n]) for n in stock_grads)


class _BranchingHead(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.scale = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale:
            x = 0.5 * x
        return self.inner(x)


class _PostProcessingHead(_BranchingHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        return logits - 1.0


def test_heads_the_splitter_does_not_understand_are_not_fused() -> None:
    linear = torch.nn.Linear(8, 16)
    assert resolve_head(linear) is not None and resolve_head(linear).prefixes == ()  # type: ignore[union-attr]
    assert resolve_head(_BranchingHead(linear)) is None
    assert resolve_head(_PostProcessingHead(linear)) is None

    class _LinearSubclass(torch.nn.Linear):
        pass

    assert resolve_head(_LinearSubclass(8, 16)) is None
    model = _roberta()
    model.lm_head.forward = lambda x: model.lm_head.decoder(x)  # an instance-level forward runs other code
    assert resolve_head(model.lm_head) is None


def test_branching_head_in_a_model_keeps_stock_loss() -> None:
    model = _roberta()
    model.lm_head = _BranchingHead(model.lm_head)
    stock_loss, _, _ = _loss_and_grads(model, _batch())
    logitless.install()
    loss, _, out = _loss_and_grads(model, _batch())
    assert out.logits.shape[-1] == VOCAB
    assert torch.equal(loss, stock_loss)


def test_prefix_runs_the_heads_own_statements() -> None:
    model = _roformer()
    plan = resolve_head(model.cls)
    assert plan is not None and len(plan.prefixes) == 2  # cls → predictions, predictions → decoder
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = model.cls.predictions.transform(x)
        torch.testing.assert_close(plan.transform(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(plan.linear(plan.transform(x)), model.cls(x), rtol=0, atol=0)


def test_head_whose_prefix_cannot_be_defined_is_not_fused(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A default read from a module global that is gone by run time: defining the prefix raises NameError.
    (tmp_path / "head_with_missing_default.py").write_text(
        "from torch import nn\n"
        "_SCALE = 1.0\n"
        "class Head(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.decoder = nn.Linear(4, 8)\n"
        "    def forward(self, x, scale=_SCALE):\n"
        "        return self.decoder(x)\n"
        "del _SCALE\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("head_with_missing_default")
    head = module.Head()
    assert _core.split_head_forward(textwrap.dedent(inspect.getsource(module.Head.forward)))["status"] == "split"
    assert resolve_head(head) is None
