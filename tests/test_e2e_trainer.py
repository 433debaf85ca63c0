"""End to end: HF Trainer with and without logitless, from identical seeds, on tiny random models.

The reference is always stock transformers in the same process with logitless uninstalled; every fused run also
checks that the fused loss was really called, so a run that matches because nothing was patched fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import logitless
from logitless import _core
import _tiny_lm as tiny

pytestmark = [
    pytest.mark.skipif(
        not hasattr(_core, "rewrite_forward"), reason="logitless._core.rewrite_forward is not built (tier-2 rewriter)"
    ),
    pytest.mark.usefixtures("stock_world"),
]


def _assert_patched(name: str) -> None:
    cls = tiny.model_class(name)
    record = logitless.audit()["classes"].get(f"{cls.__module__}.{cls.__qualname__}")
    assert record is not None and record["status"] == "patched", record


def _stock_and_fused(
    name: str, examples: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **train_kwargs: object
) -> tuple[tiny.RunResult, tiny.RunResult, int]:
    stock = tiny.train(tiny.build(name), examples, output_dir=str(tmp_path / "stock"), **train_kwargs)
    logitless.install()
    _assert_patched(name)
    counter = tiny.fused_forward_counter(monkeypatch)
    fused = tiny.train(tiny.build(name), examples, output_dir=str(tmp_path / "fused"), **train_kwargs)
    logitless.uninstall()
    return stock, fused, counter.calls


@pytest.mark.parametrize("name", tiny.MODEL_NAMES)
def test_trainer_steps_match_stock(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stock, fused, calls = _stock_and_fused(name, tiny.random_examples(40), tmp_path, monkeypatch)
    assert calls == 10
    tiny.assert_runs_match(stock, fused)


@pytest.mark.parametrize("name", tiny.MODEL_NAMES)
def test_grad_accumulation_with_padding_matches_stock(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Variable lengths + right padding: micro-batches hold different numbers of targets, so the loss is exact only
    # if num_items_in_batch reaches the fused loss as the sum-divisor.
    examples = tiny.random_examples(80, padded=True)
    stock, fused, calls = _stock_and_fused(name, examples, tmp_path, monkeypatch, batch_size=2, grad_accum=4)
    assert calls == 40
    tiny.assert_runs_match(stock, fused)


def test_gradient_checkpointing_matches_stock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = {"activation_checkpointing": True}  # transformers 5.24 renamed gradient_checkpointing
    stock, fused, calls = _stock_and_fused("llama", tiny.random_examples(40), tmp_path, monkeypatch, extra_args=extra)
    assert calls == 10
    tiny.assert_runs_match(stock, fused)


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)  # LoRA A matrices are random: same seed in both runs
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def test_lora_matches_stock_and_head_gets_no_grad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = tiny.random_examples(40)
    stock = tiny.train(_lora(tiny.build("llama")), examples, output_dir=str(tmp_path / "stock"))
    logitless.install()
    counter = tiny.fused_forward_counter(monkeypatch)
    fused = tiny.train(_lora(tiny.build("llama")), examples, output_dir=str(tmp_path / "fused"))
    assert counter.calls == 10
    tiny.assert_runs_match(stock, fused)

    # Frozen head: the fused backward must not produce (or need) a weight gradient.
    head = fused.model.get_base_model().lm_head
    assert type(head) is torch.nn.Linear and not head.weight.requires_grad
    batch = tiny.collate(examples[:2])
    loss = fused.model(**batch).loss
    loss.backward()
    assert head.weight.grad is None
    assert counter.calls == 11


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_generate_identical(name: str) -> None:
    model = tiny.build(name).eval()
    prompt = torch.randint(1, tiny.VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(prompt)}
    stock = model.generate(prompt, **kwargs)
    logitless.install()
    _assert_patched(name)
    fused = model.generate(prompt, **kwargs)
    assert torch.equal(stock, fused)
    # The patched class really is in use: with labels, in train mode, logits come back empty.
    assert model.train()(input_ids=prompt, labels=prompt).logits.shape[-1] == 0


def test_torch_compile_of_patched_model_matches_stock() -> None:
    # aot_eager traces the rewritten forward and the fused op's fake/autograd registrations without a C++ toolchain.
    model, batch = tiny.build("llama"), tiny.collate(tiny.random_examples(3, padded=True, seed=5))
    ref = model(**batch).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    logitless.install()
    _assert_patched("llama")
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(**batch)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    assert out.logits.shape[-1] == 0
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", tiny.MODEL_NAMES)
def test_bfloat16_loss_within_bf16_rounding(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stock rounds the logits to bf16 before the loss; the fused loss is computed from fp32 logits (spec §1.2), so
    # the two agree to bf16 rounding, not bit for bit.
    model, batch = tiny.build(name).to(torch.bfloat16), tiny.collate(tiny.random_examples(4, padded=True, seed=5))
    stock = model(**batch).loss
    logitless.install()
    counter = tiny.fused_forward_counter(monkeypatch)
    fused = model(**batch)
    assert counter.calls == 1 and fused.logits.shape[-1] == 0
    fused.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(fused.loss.float(), stock.float(), rtol=2**-7, atol=0)
