"""TRL's TPOTrainer through logitless (``logitless.integrations.trl_tpo``): whole trainer runs against stock TRL on
identical weights (every logged metric), one step's loss, gradients and metrics against a float64 reference from the
model's own logits, and the calls and releases that keep TRL's own code.

Runs on the pinned TRL and, by ``make test``, on TRL 1.5.1 (its source first on PYTHONPATH), whose ``_compute_loss``
is the other release logitless reproduces."""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import _tiny_lm as tiny
import logitless

trl = pytest.importorskip("trl")
tpo = pytest.importorskip("trl.experimental.tpo")

from logitless.integrations import trl_tpo  # noqa: E402 - after the TRL checks
from logitless.integrations._digest import source_digest  # noqa: E402
from _trl_runs import _training_args, _word_tokenizer, _words  # noqa: E402
from _trl_runs import assert_logs_equal, hooked_head, trained_logs  # noqa: E402

pytestmark = pytest.mark.usefixtures("stock_world")

LEGACY = Path(__file__).resolve().parent.parent / ".trl-legacy"


def _rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    g = torch.Generator().manual_seed(seed)
    # Completions of different lengths: every branch of the stacked batch has padding.
    return [{"prompt": _words(g, 4 + i % 2), "chosen": _words(g, 3 + i % 3), "rejected": _words(g, 2 + i % 4),
             "reference": _words(g, 4)} for i in range(n)]  # fmt: skip


def _trainer(name: str, **options: Any) -> Any:
    from datasets import Dataset

    change = options.pop("change", None)
    evaluate = options.pop("evaluate", False)
    peft_config = options.pop("peft_config", None)
    args = tpo.TPOConfig(**_training_args(), **options, **({"per_device_eval_batch_size": 4} if evaluate else {}))
    model = tiny.build(name, seed=0)
    if change is not None:
        change(model)
    if peft_config is not None:
        torch.manual_seed(7)  # LoRA's A matrices are random: the same in every run
    return tpo.TPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows(8)),
                          eval_dataset=Dataset.from_list(_rows(4, seed=1)) if evaluate else None,
                          processing_class=_word_tokenizer(), peft_config=peft_config)  # fmt: skip


def _run(name: str, **options: Any) -> list[dict[str, float]]:
    return trained_logs(_trainer(name, **options), options.get("evaluate", False))


def _compare(ours: list[dict[str, float]], stock: list[dict[str, float]]) -> None:
    assert_logs_equal(ours, stock, 20)
    assert stock[1]["mean_token_accuracy"] > 0  # the top-1 metric is exercised, not 0 against 0


def _report() -> dict[str, Any]:
    return logitless.audit()["integrations"]["trl"]["tpo"]


# Each family's epilogue (softcap, divisor, multiplier) as its forward applies it; every loss type, with and without
# the gold response's NLL term (tpo_alpha=0: two branches), label smoothing.
RUNS = [
    ("llama", {}),
    ("gemma3", {"loss_type": "ipo"}),
    ("granite", {"loss_type": "tpo-l", "label_smoothing": 0.1}),
    ("cohere", {"loss_type": "hinge", "tpo_alpha": 0.0}),
]


@pytest.mark.parametrize(("name", "options"), RUNS, ids=[n for n, _ in RUNS])
def test_run_equals_stock(name: str, options: dict[str, Any]) -> None:
    stock = _run(name, **options)
    logitless.install()
    ours = _run(name, **options)
    _compare(ours, stock)
    assert _report() == {"fused": 2, "stock": {}}


def test_evaluation_equals_stock() -> None:
    """``evaluate()`` runs the step without gradients, in eval mode (TPO's config evaluates the loss only)."""
    stock = _run("llama", evaluate=True)
    logitless.install()
    ours = _run("llama", evaluate=True)
    _compare(ours, stock)
    assert _report() == {"fused": 3, "stock": {}}


def test_a_call_that_returns_the_outputs_keeps_trls_path() -> None:
    """Predictions read the outputs' logits: a call that returns them runs TRL's code, logits and all."""
    trainer = _trainer("llama")
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        stock_loss, stock_out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        logitless.install()
        loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert _report() == {"fused": 0, "stock": {"return-outputs": 1}}
    assert out.logits.shape == (*batch["input_ids"].shape, tiny.VOCAB)
    torch.testing.assert_close(out.logits, stock_out.logits, rtol=0, atol=0)
    torch.testing.assert_close(loss, stock_loss, rtol=0, atol=0)


def test_lora_policy_equals_stock() -> None:
    from peft import LoraConfig

    options = {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}
    stock = _run("llama", **options)
    logitless.install()
    ours = _run("llama", **options)
    _compare(ours, stock)
    assert _report() == {"fused": 2, "stock": {}}


def test_a_hooked_head_gives_exact_values_from_its_logits() -> None:
    stock = _run("llama", change=hooked_head)
    logitless.install()
    ours = _run("llama", change=hooked_head)
    _compare(ours, stock)
    assert _report() == {"fused": 0, "stock": {"materialised": 2}}


def _float64(trainer: Any, reference: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The step by TPO's definitions from float64 logits: summed completion log-probabilities, the sigmoid
    preference loss plus ``tpo_alpha`` times the gold rows' mean cross-entropy; the completion tokens' mean entropy,
    the chosen and rejected completions' mean logit, the chosen completions' top-1 accuracy."""
    ids, scored = batch["input_ids"], batch["completion_mask"][:, 1:] == 1
    logits = reference(ids, attention_mask=batch["attention_mask"]).logits.double()[:, :-1]
    logp = logits.log_softmax(-1)
    picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    chosen, rejected, gold = (picked * scored).sum(-1).chunk(3)
    loss = -F.logsigmoid(trainer.beta * (chosen - rejected)).mean()
    gold_mask = scored.chunk(3)[2]
    loss = loss + trainer.tpo_alpha * -(picked.chunk(3)[2][gold_mask]).mean()
    entropy = -(logp.exp() * logp).sum(-1)[scored].mean()
    means, masks = logits.mean(-1).chunk(3), scored.chunk(3)
    top1 = (logits.argmax(-1) == ids[:, 1:]).chunk(3)[0][masks[0]].double().mean()
    return {"loss": loss, "entropy": entropy, "logits/chosen": means[0][masks[0]].mean(),
            "logits/rejected": means[1][masks[1]].mean(), "mean_token_accuracy": top1,
            "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean()}  # fmt: skip


@pytest.mark.parametrize("name", ["gemma3", "granite"])
def test_one_step_and_its_gradients_equal_float64(name: str) -> None:
    trainer = _trainer(name)
    batch = next(iter(trainer.get_train_dataloader()))
    reference = copy.deepcopy(trainer.model).double()
    logitless.install()
    loss = trainer.compute_loss(trainer.model, batch)
    assert _report() == {"fused": 1, "stock": {}}
    logitless.uninstall()
    with torch.no_grad():
        want = _float64(trainer, reference, batch)
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    torch.testing.assert_close(loss.double(), want.pop("loss"), rtol=1e-5, atol=1e-6)
    for key, value in want.items():
        assert math.isclose(logged[key], float(value), rel_tol=1e-5, abs_tol=1e-6), (key, logged[key], float(value))
    loss.backward()
    _float64(trainer, reference, batch)["loss"].backward()
    params = dict(reference.named_parameters())
    for key, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[key].grad, rtol=1e-4, atol=1e-6, msg=key)


def test_install_wraps_and_uninstall_restores() -> None:
    cls = tpo.TPOTrainer
    original = cls.__dict__["_compute_loss"]
    assert trl_tpo.known(cls)
    logitless.install()
    assert cls.__dict__["_compute_loss"].__logitless_wrapped__ is original
    logitless.uninstall()
    assert cls.__dict__["_compute_loss"] is original


@pytest.mark.parametrize(("version", "divides_by_tp"), [("1.5.1", False), ("1.14.2", True), ("1.15.0", True)])
def test_known_releases(version: str, divides_by_tp: bool) -> None:
    """TRL 1.5's ``_compute_loss`` and 1.14 to 1.16's (fused entropy, token count divided by the tensor-parallel
    size) are the two logitless reproduces; one changed token is another release."""
    found = list((LEGACY / f"trl-{version}").glob("trl/experimental/tpo/tpo_trainer.py"))
    if not found:
        pytest.skip(f"TRL {version}'s source is not unpacked (make test unpacks it)")
    source = found[0].read_text()
    lines = source.splitlines(keepends=True)
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "TPOTrainer")
    method = next(m for m in cls.body if isinstance(m, ast.FunctionDef) and m.name == "_compute_loss")
    text = "".join(lines[method.lineno - 1 : method.end_lineno])
    assert trl_tpo._KNOWN.get(source_digest(text)) is divides_by_tp
    assert source_digest(text.replace('"hinge"', '"hinge2"', 1)) not in trl_tpo._KNOWN
