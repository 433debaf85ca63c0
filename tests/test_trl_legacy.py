"""TRL before 1.15 (logitless.integrations.trl_legacy): SFTTrainer's chunked head (TRL 1.5 to 1.14) replaced by
logitless's, and its ``nll`` metrics given the logits they read (every TRL from 0.x to 1.14).

Two halves. The drop-in itself, here with the pinned TRL, against a float64 materialised reference written here:
the model's loss, its gradients and the statistics TRL logs. Then SFTTrainer of older TRL releases (their source,
unpacked by ``make test`` into ``.trl-legacy/``, first on PYTHONPATH of a child process) under ``logitless.install()``
against stock runs on identical weights: before this, the first training step failed (``nll``: the metrics read
empty logits) or logitless computed nothing (``chunked_nll``: TRL's head replaced the forward).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import _tiny_lm as tiny
import logitless
from logitless import _core, _state
from logitless.integrations import trl_legacy

pytestmark = [
    pytest.mark.skipif(not hasattr(_core, "rewrite_forward"), reason="the tier-2 rewriter is not built"),
    pytest.mark.usefixtures("stock_world"),
]

ROOT = Path(__file__).resolve().parent.parent
LEGACY = ROOT / ".trl-legacy"
FAMILIES = ["llama", "gemma3", "cohere", "granite", "gpt2"]  # plain, softcap, multiply, divide, GPT2LMHeadModel


def _batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tiny.VOCAB, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 9:] = -100  # padding
    return ids, labels


def _reference(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, num_items: int | None) -> dict:
    """float64: the loss of the model's own logits (the stock forward without labels), its gradients, and TRL's
    statistics (targets already aligned with the positions)."""
    model = model.double()
    logits = model(input_ids=ids).logits.double()
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = -(picked * mask).sum() / (mask.sum() if num_items is None else num_items)
    loss.backward()
    with torch.no_grad():
        entropy = (-(logp.exp() * logp).sum(-1) * mask).sum()
        correct = ((logits.argmax(-1) == targets) & mask).sum()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.item(), "entropy": entropy.item(), "correct": int(correct), "valid": int(mask.sum()),
            "grads": grads}  # fmt: skip


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["mean", "num_items", "shift_labels"])
def test_chunked_head_against_float64(family: str, variant: str) -> None:
    ids, labels = _batch()
    num_items = 40 if variant == "num_items" else None
    logitless.install()
    model = tiny.build(family).eval()  # GPT-2's dropout off (the chunked head runs in eval too, as TRL's does)
    trl_legacy.patch_chunked_ce_lm_head(model, chunk_size=256)
    call: dict[str, Any] = {"input_ids": ids}
    if variant == "shift_labels":
        call["shift_labels"] = _shifted(labels)
    else:
        call["labels"] = labels
    if num_items is not None:
        call["num_items_in_batch"] = num_items
    out = model(**call)
    out.loss.backward()
    assert out.logits is None
    assert trl_legacy.report()["chunked"] == {"fused": 1, "materialised": 0}
    ref = _reference(tiny.build(family).eval(), ids, _shifted(labels), num_items)
    assert math.isclose(out.loss.item(), ref["loss"], rel_tol=2e-6), (out.loss.item(), ref["loss"])
    assert int(out.num_valid_tokens) == ref["valid"]
    assert int(out.num_correct_tokens) == ref["correct"]
    assert math.isclose(out.entropy_sum.item(), ref["entropy"], rel_tol=2e-6)
    for name, p in model.named_parameters():
        if name in ref["grads"]:
            expected = ref["grads"][name].float()
            torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-5 * expected.abs().max().item() + 1e-9,
                                       msg=name)  # fmt: skip


def test_chunked_head_of_a_hooked_head_is_exact_from_the_logits() -> None:
    """A head the op cannot fuse exactly (a forward hook that changes its output): the forward keeps its stock path
    and the statistics come from the logits it returned, hook included."""
    ids, labels = _batch()
    logitless.install()
    model = tiny.build("llama")
    model.lm_head.register_forward_hook(lambda module, args, output: output * 0.5)
    trl_legacy.patch_chunked_ce_lm_head(model, chunk_size=256)
    out = model(input_ids=ids, labels=labels)
    assert trl_legacy.report()["chunked"] == {"fused": 0, "materialised": 1}
    assert logitless.audit()["runtime"]["stock"] == {"hooked-head": 1}
    reference = tiny.build("llama").double()
    reference.lm_head.register_forward_hook(lambda module, args, output: output * 0.5)
    ref = _reference(reference, ids, _shifted(labels), None)
    assert math.isclose(out.loss.item(), ref["loss"], rel_tol=2e-6)
    assert int(out.num_correct_tokens) == ref["correct"]
    assert math.isclose(out.entropy_sum.item(), ref["entropy"], rel_tol=2e-6)


def test_chunked_head_without_labels_is_the_original_forward() -> None:
    ids, _ = _batch()
    logitless.install()
    model = tiny.build("gemma3")
    expected = model(input_ids=ids).logits
    trl_legacy.patch_chunked_ce_lm_head(model, chunk_size=256)
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert trl_legacy.report()["chunked"] == {"fused": 0, "materialised": 0}


def test_keeping_logits_returns_stock_logits_beside_the_fused_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """What TRL < 1.15's ``nll`` metrics read: the real logits, while the loss is still the fused one."""
    ids, labels = _batch()
    stock = tiny.build("gemma3")(input_ids=ids, labels=labels)
    logitless.install()
    counter = tiny.fused_forward_counter(monkeypatch)
    model = tiny.build("gemma3")
    assert model(input_ids=ids, labels=labels).logits.shape[-1] == 0
    with _state.keeping_logits():
        out = model(input_ids=ids, labels=labels)
    assert counter.calls == 2
    torch.testing.assert_close(out.logits, stock.logits, rtol=0, atol=0)
    assert math.isclose(out.loss.item(), stock.loss.item(), rel_tol=1e-6)


# --- SFTTrainer of older TRL releases, in child processes ---------------------------------------------------------


def _legacy(version: str, scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    source = LEGACY / f"trl-{version}"
    if not (source / "trl").is_dir():
        pytest.fail(f"TRL {version}'s source is missing from {LEGACY}: `make test` unpacks it (make .trl-legacy/.fetched)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(source), str(ROOT / "tests")]))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "_trl_legacy_worker.py"), json.dumps(scenarios)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["trl"] == version
    return report["results"]


def _assert_logs_match(ours: list[dict[str, float]], stock: list[dict[str, float]]) -> None:
    assert len(ours) == len(stock) == 3
    for step, (a, b) in enumerate(zip(ours, stock, strict=True)):
        assert a.keys() == b.keys(), (a, b)
        for key in a:
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), f"step {step} {key}: {a[key]} vs {b[key]}"


def _legacy_counts(result: dict[str, Any]) -> dict[str, Any]:
    assert result["restored"], "uninstall() left logitless's functions in TRL"
    return result["trl"]["legacy"]


@pytest.mark.parametrize("version", ["0.19.1", "0.24.0"])
def test_sft_nll_of_trl_0x_runs_fused_with_its_metrics(version: str) -> None:
    """TRL 0.x's SFTTrainer (``nll``) reads the logits for its token accuracy (and entropy): they are kept, the
    loss fused; every logged value equals stock's. Label smoothing goes through Trainer.compute_loss, fused too."""
    results = _legacy(version, [{"family": "gemma3"}, {"family": "llama", "config": {"label_smoothing_factor": 0.1}}])
    for result in results:
        _assert_logs_match(result["logitless"], result["stock"])
        assert _legacy_counts(result)["logits_for_metrics"] == 3
        assert result["runtime"]["fused"] == 3 and result["runtime"]["stock"] == {}


def test_sft_of_trl_1_5_chunked_and_nll() -> None:
    """TRL 1.5: ``nll`` is the default (logits kept for the metrics); ``chunked_nll`` is logitless's drop-in, equal
    to stock's ``nll`` run (the model's own loss) where TRL's head misses Granite's logit divisor."""
    nll, chunked = _legacy("1.5.1", [
        {"family": "cohere"},
        {"family": "granite", "config": {"loss_type": "chunked_nll"}, "reference": {"loss_type": "nll"}},
    ])  # fmt: skip
    _assert_logs_match(nll["logitless"], nll["stock"])
    assert _legacy_counts(nll)["logits_for_metrics"] == 3
    _assert_logs_match(chunked["logitless"], chunked["stock"])
    assert _legacy_counts(chunked)["chunked"] == {"fused": 3, "materialised": 0}
    assert chunked["trl"]["patched_modules"] == ["trl.trainer.sft_trainer"]


def test_sft_default_of_trl_1_14_is_the_chunked_drop_in() -> None:
    """TRL 1.14's default (``chunked_nll``) under logitless: the model's own loss, fused, and the same metrics as a
    stock ``nll`` run (the logits materialised), Mixtral's router loss included, and with a LoRA adapter (TRL
    patches the PEFT base model); TRL's own head differs from it for Granite (its divisor ignored)."""
    families = ["llama", "gemma3", "granite", "gpt2", "mixtral", "gemma3+lora"]
    results = _legacy("1.14.2", [{"family": f.split("+")[0], "lora": f.endswith("+lora"),
                                  "reference": {"loss_type": "nll"}, "trl_own": f == "granite"}
                                 for f in families])  # fmt: skip
    for family, result in zip(families, results, strict=True):
        _assert_logs_match(result["logitless"], result["stock"])
        assert _legacy_counts(result)["chunked"] == {"fused": 3, "materialised": 0}, family
        assert result["runtime"]["fused"] == 3 and result["runtime"]["stock"] == {}, family
        if "trl_own" in result:  # what logitless fixes besides the memory: TRL's guessed epilogue
            own, stock = result["trl_own"][0]["loss"], result["stock"][0]["loss"]
            assert not math.isclose(own, stock, rel_tol=1e-3), (own, stock)
