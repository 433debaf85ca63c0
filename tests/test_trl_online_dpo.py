"""TRL's OnlineDPOTrainer through logitless (``logitless.integrations.trl_online_dpo``): whole trainer runs (sampled
completions, a reward function) against stock TRL on identical weights, every logged metric; ``_forward``'s
completion log-probabilities and their gradients against a float64 reference from the model's own logits; the calls
and releases that keep TRL's own code."""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import _tiny_lm as tiny
import logitless

trl = pytest.importorskip("trl")
try:
    import trl.experimental.online_dpo as online_dpo
except ImportError:  # TRL before 1.5: trl.trainer
    import trl as online_dpo  # type: ignore[no-redef]
try:
    online_dpo.OnlineDPOTrainer  # noqa: B018 - TRL's lazy import, which may fail on a missing extra
except (AttributeError, RuntimeError) as exc:  # pragma: no cover - TRL 0.x needs `requests` here
    pytest.skip(f"this TRL's OnlineDPOTrainer does not import: {exc}"[:200], allow_module_level=True)

from logitless.integrations import trl_online_dpo  # noqa: E402 - after the TRL checks
from logitless.integrations._digest import source_digest  # noqa: E402
from _trl_runs import _training_args, _word_tokenizer, _words  # noqa: E402
from _trl_runs import assert_logs_equal, hooked_head, trained_logs  # noqa: E402

pytestmark = pytest.mark.usefixtures("stock_world")

LEGACY = Path(__file__).resolve().parent.parent / ".trl-legacy"


def _reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    # Prefers longer completions: sampled pairs differ, so chosen and rejected are both exercised.
    return [float(len(c)) for c in completions]


def _trainer(name: str, **options: Any) -> Any:
    from datasets import Dataset

    change = options.pop("change", None)
    peft_config = options.pop("peft_config", None)
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": _words(g, 5)} for _ in range(8)]
    model = tiny.build(name, seed=0)
    model.warnings_issued = {}  # TRL 0.24's trainers write it; transformers 5 models no longer have it
    if change is not None:
        change(model)
    if peft_config is not None:
        torch.manual_seed(7)  # LoRA's A matrices are random: the same in every run
    args = online_dpo.OnlineDPOConfig(**_training_args(), max_new_tokens=6, max_length=32, **options)
    return online_dpo.OnlineDPOTrainer(model=model, reward_funcs=_reward, args=args, peft_config=peft_config,
                                       train_dataset=Dataset.from_list(rows),
                                       processing_class=_word_tokenizer())  # fmt: skip


def _run(name: str, **options: Any) -> list[dict[str, float]]:
    return trained_logs(_trainer(name, **options))


def _compare(ours: list[dict[str, float]], stock: list[dict[str, float]]) -> None:
    assert_logs_equal(ours, stock, 20)
    assert stock[1]["objective/kl"] > 0  # the second step's policy differs from the reference: a real comparison


def _report() -> dict[str, Any]:
    return logitless.audit()["integrations"]["trl"]["online_dpo"]


@pytest.mark.parametrize(("name", "options"), [("llama", {}), ("gemma3", {}), ("granite", {"loss_type": "ipo"})])
def test_run_equals_stock(name: str, options: dict[str, Any]) -> None:
    """Each step samples two completions per prompt, scores them, and differentiates the policy's completion
    log-probabilities (the reference model's too, without gradients): four calls over two steps."""
    stock = _run(name, **options)
    logitless.install()
    ours = _run(name, **options)
    _compare(ours, stock)
    assert _report() == {"fused": 4, "stock": {}}


def test_lora_policy_equals_stock() -> None:
    """With PEFT the reference is the policy with its adapter disabled."""
    from peft import LoraConfig

    options = {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}
    stock = _run("llama", **options)
    logitless.install()
    ours = _run("llama", **options)
    _compare(ours, stock)
    assert _report() == {"fused": 4, "stock": {}}


def test_a_hooked_head_gives_exact_values_from_its_logits() -> None:
    stock = _run("llama", change=hooked_head)
    logitless.install()
    ours = _run("llama", change=hooked_head)
    _compare(ours, stock)
    assert _report() == {"fused": 0, "stock": {"materialised": 4}}


def _inputs(prompt_len: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(4)
    prompt_ids = torch.randint(3, tiny.VOCAB, (3, prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    if prompt_len:
        prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(3, tiny.VOCAB, (3, 7), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 5:] = 0  # a completion that ended early
    return prompt_ids, prompt_mask, completion_ids, completion_mask


@pytest.mark.parametrize("name", ["gemma3", "cohere"])
def test_forward_and_its_gradients_equal_float64(name: str) -> None:
    """The completion tokens' log-probabilities (padding positions included, as TRL scores them) and the gradients
    of a weighted sum of them, against float64 from the model's own logits. A prompt longer than ``max_length``
    allows is cut from the left, as TRL cuts it."""
    trainer = _trainer(name)
    trainer.max_length = 16  # 12 prompt + 7 completion tokens: 3 prompt tokens cut
    prompt_ids, prompt_mask, completion_ids, completion_mask = _inputs(12)
    reference = copy.deepcopy(trainer.model).double()
    logitless.install()
    ours = trainer._forward(trainer.model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert _report() == {"fused": 1, "stock": {}}
    logitless.uninstall()
    ids = torch.cat((prompt_ids[:, 3:], completion_ids), dim=1)
    mask = torch.cat((prompt_mask[:, 3:], completion_mask), dim=1)
    logits = reference(ids, attention_mask=mask).logits.double()[:, 8:-1]
    want = logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=2e-6)
    weights = torch.linspace(0.5, 1.5, want.numel(), dtype=torch.float64).reshape(want.shape)
    (ours.double() * weights).sum().backward()
    (want * weights).sum().backward()
    params = dict(reference.named_parameters())
    for key, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[key].grad, rtol=1e-4, atol=1e-6, msg=key)


def test_an_empty_prompt_keeps_trls_path() -> None:
    """With no prompt TRL scores each completion position against its own token (no next-token shift): its code
    runs."""
    trainer = _trainer("llama")
    call = (trainer.model, *_inputs(0))
    with torch.no_grad():
        stock = trainer._forward(*call)
        logitless.install()
        ours = trainer._forward(*call)
    assert _report() == {"fused": 0, "stock": {"empty-prompt": 1}}
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)


def test_install_wraps_and_uninstall_restores() -> None:
    cls = online_dpo.OnlineDPOTrainer
    original = cls.__dict__["_forward"]
    assert trl_online_dpo.known(cls)
    logitless.install()
    assert cls.__dict__["_forward"].__logitless_wrapped__ is original
    logitless.uninstall()
    assert cls.__dict__["_forward"] is original


@pytest.mark.parametrize(("version", "accepted"), [("0.19.1", False), ("0.24.0", True), ("1.5.1", True),
                                                   ("1.14.2", True), ("1.15.0", True)])  # fmt: skip
def test_known_releases(version: str, accepted: bool) -> None:
    """TRL 0.24 to 1.15 share ``_forward`` (1.16 skips the truncation with images); 0.19's differs."""
    found = list((LEGACY / f"trl-{version}").glob("trl/**/online_dpo_trainer.py"))
    if not found:
        pytest.skip(f"TRL {version}'s source is not unpacked (make test unpacks it)")
    source = found[0].read_text()
    lines = source.splitlines(keepends=True)
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "OnlineDPOTrainer")
    method = next(m for m in cls.body if isinstance(m, ast.FunctionDef) and m.name == "_forward")
    assert (source_digest("".join(lines[method.lineno - 1 : method.end_lineno])) in trl_online_dpo._KNOWN) is accepted
