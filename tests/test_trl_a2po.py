"""TRL's A2POTrainer through logitless (``logitless.integrations.trl_a2po``): whole trainer runs (value estimation,
sampled completions, a reward function) against stock TRL on identical weights, every logged metric;
``_get_sequence_logps`` and its gradients against a float64 reference from the model's own logits; the calls and
releases that keep TRL's own code."""

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
a2po = pytest.importorskip("trl.experimental.a2po")

from logitless.integrations import trl_a2po  # noqa: E402 - after the TRL checks
from logitless.integrations._digest import source_digest  # noqa: E402
from _trl_runs import _training_args, _word_tokenizer, _words  # noqa: E402
from _trl_runs import assert_logs_equal, hooked_head, trained_logs  # noqa: E402

pytestmark = pytest.mark.usefixtures("stock_world")

LEGACY = Path(__file__).resolve().parent.parent / ".trl-legacy"


def _reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    # Binary, as A*-PO assumes; depends on the sampled text, so the advantages differ between prompts.
    return [float(len(c) % 2) for c in completions]


def _trainer(name: str, **options: Any) -> Any:
    from datasets import Dataset

    change = options.pop("change", None)
    evaluate = options.pop("evaluate", False)
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": _words(g, 3 + i % 3)} for i in range(12)]
    model = tiny.build(name, seed=0)
    if change is not None:
        change(model)
    args = a2po.A2POConfig(**_training_args(), max_completion_length=6, max_prompt_length=16, num_value_samples=2,
                           beta2=1.0, **options, **({"per_device_eval_batch_size": 4} if evaluate else {}))
    return a2po.A2POTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=Dataset.from_list(rows[:8]),
                            eval_dataset=Dataset.from_list(rows[8:]) if evaluate else None,
                            processing_class=_word_tokenizer())  # fmt: skip


def _run(name: str, **options: Any) -> list[dict[str, float]]:
    trainer = _trainer(name, **options)
    torch.manual_seed(3)  # the sampled completions: the same in both runs
    return trained_logs(trainer, options.get("evaluate", False))


def _compare(ours: list[dict[str, float]], stock: list[dict[str, float]]) -> None:
    assert_logs_equal(ours, stock, 10)
    # The second step's policy differs from the reference: its implicit reward is a real comparison.
    assert abs(stock[1]["implicit_reward"]) > 1e-4


def _report() -> dict[str, Any]:
    return logitless.audit()["integrations"]["trl"]["a2po"]


@pytest.mark.parametrize("name", ["llama", "gemma3", "granite"])
def test_run_equals_stock(name: str) -> None:
    """Each step scores its completions under the reference model (no gradients) and the policy (in the loss): four
    calls over two steps."""
    stock = _run(name)
    logitless.install()
    ours = _run(name)
    _compare(ours, stock)
    assert _report() == {"fused": 4, "stock": {}}


def test_evaluation_equals_stock() -> None:
    stock = _run("llama", evaluate=True)
    logitless.install()
    ours = _run("llama", evaluate=True)
    _compare(ours, stock)
    assert _report() == {"fused": 6, "stock": {}}


def test_a_hooked_head_gives_exact_values_from_its_logits() -> None:
    stock = _run("llama", change=hooked_head)
    logitless.install()
    ours = _run("llama", change=hooked_head)
    _compare(ours, stock)
    assert _report() == {"fused": 0, "stock": {"materialised": 4}}


def _inputs(prompt_len: int, completion_len: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, tiny.VOCAB, (3, prompt_len + completion_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    mask[1, prompt_len + 5 :] = 0  # a completion that ended early
    return ids, mask


@pytest.mark.parametrize("name", ["gemma3", "cohere"])
def test_sequence_logps_and_their_gradients_equal_float64(name: str) -> None:
    """Each completion's summed log-probability over its mask, and the gradients of a weighted sum of them, against
    float64 from the model's own logits."""
    trainer = _trainer(name)
    ids, mask = _inputs(6)
    reference = copy.deepcopy(trainer.model).double()
    logitless.install()
    ours = trainer._get_sequence_logps(trainer.model, ids, mask, 7)
    assert _report() == {"fused": 1, "stock": {}}
    logitless.uninstall()
    logp = reference(ids, attention_mask=mask).logits.double()[:, 5:-1].log_softmax(-1)
    want = (logp.gather(-1, ids[:, 6:].unsqueeze(-1)).squeeze(-1) * mask[:, 6:]).sum(-1)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=2e-6)
    weights = torch.tensor([0.5, -1.0, 1.5], dtype=torch.float64)
    (ours.double() @ weights).backward()
    (want @ weights).backward()
    params = dict(reference.named_parameters())
    for key, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[key].grad, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize(("prompt_len", "kept", "reason"), [(0, 7, "empty-prompt"), (6, 0, "empty-completion")])
def test_an_empty_prompt_or_completion_keeps_trls_path(prompt_len: int, kept: int, reason: str) -> None:
    """Without a prompt, or a completion, TRL's slices do not score the completion's causal targets: its code runs,
    whatever it does."""
    trainer = _trainer("llama")
    ids, mask = _inputs(prompt_len)
    with torch.no_grad():
        try:
            stock: Any = trainer._get_sequence_logps(trainer.model, ids, mask, kept)
        except Exception as exc:  # noqa: BLE001 - compared below
            stock = type(exc)
        logitless.install()
        try:
            ours: Any = trainer._get_sequence_logps(trainer.model, ids, mask, kept)
        except Exception as exc:  # noqa: BLE001
            ours = type(exc)
    assert _report() == {"fused": 0, "stock": {reason: 1}}
    if isinstance(stock, torch.Tensor):
        torch.testing.assert_close(ours, stock, rtol=0, atol=0)
    else:
        assert ours is stock


def test_install_wraps_and_uninstall_restores() -> None:
    cls = a2po.A2POTrainer
    original = cls.__dict__["_get_sequence_logps"]
    assert trl_a2po.known(cls)
    logitless.install()
    assert cls.__dict__["_get_sequence_logps"].__logitless_wrapped__ is original
    logitless.uninstall()
    assert cls.__dict__["_get_sequence_logps"] is original


@pytest.mark.parametrize("version", ["1.14.2", "1.15.0"])
def test_known_releases(version: str) -> None:
    """TRL 1.14 (A*-PO's first release) to 1.16 share ``_get_sequence_logps``; one changed token is another."""
    found = list((LEGACY / f"trl-{version}").glob("trl/experimental/a2po/a2po_trainer.py"))
    if not found:
        pytest.skip(f"TRL {version}'s source is not unpacked (make test unpacks it)")
    source = found[0].read_text()
    lines = source.splitlines(keepends=True)
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "A2POTrainer")
    method = next(m for m in cls.body if isinstance(m, ast.FunctionDef) and m.name == "_get_sequence_logps")
    text = "".join(lines[method.lineno - 1 : method.end_lineno])
    assert source_digest(text) in trl_a2po._KNOWN
    assert source_digest(text.replace("logits[:, :-1, :]", "logits[:, 1:, :]", 1)) not in trl_a2po._KNOWN
