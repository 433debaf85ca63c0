"""TRL's SDPOTrainer and SDFTTrainer through logitless (``logitless.integrations.trl_self_distillation``): whole
trainer runs (sampled completions, rewards, an EMA / initial / live teacher, rollout log-probabilities; the
sampled-token and top-k objectives) against stock TRL on identical weights, every logged metric; one step's loss and
gradients against stock TRL's on float64 copies of the models; the modes, calls and releases that keep TRL's own
code."""

from __future__ import annotations

import ast
import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

import _tiny_lm as tiny
import logitless

trl = pytest.importorskip("trl")
sdpo = pytest.importorskip("trl.experimental.sdpo")
sdft = pytest.importorskip("trl.experimental.sdft")

from logitless.integrations import trl_self_distillation as ours_module  # noqa: E402 - after the TRL checks
from logitless.integrations._digest import source_digest  # noqa: E402
from _trl_runs import _training_args, _word_tokenizer, _words  # noqa: E402
from _trl_runs import assert_logs_equal, hooked_head, trained_logs  # noqa: E402

pytestmark = pytest.mark.usefixtures("stock_world")

LEGACY = Path(__file__).resolve().parent.parent / ".trl-legacy"
# SDFT's own defaults (the tests' SDFT runs otherwise use the sampled-token objective).
SDFT_DEFAULTS = {"distillation_mode": "topk_logits", "distillation_alpha": 0.5}


def _reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    # Depends on the sampled text, so some rollouts succeed (reward 1, SDPO's threshold) and teach the others.
    return [float(len(c) % 2) for c in completions]


def _model(name: str, change: Any = None) -> Any:
    """A tiny model saved where its config says it comes from: TRL builds the EMA teacher from that path."""
    model = tiny.build(name, seed=0)
    if change is not None:
        change(model)
    path = tempfile.mkdtemp()
    model.save_pretrained(path)
    model.config._name_or_path = path
    return model


def _trainer(kind: str, name: str = "llama", **options: Any) -> Any:
    from datasets import Dataset

    change = options.pop("change", None)
    evaluate = options.pop("evaluate", False)
    peft_config = options.pop("peft_config", None)
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": _words(g, 3 + i % 3), "privileged_context": _words(g, 4)} for i in range(12)]
    common = dict(**_training_args(), max_completion_length=6, max_prompt_length=16, steps_per_generation=2,
                  **({"per_device_eval_batch_size": 4, "eval_strategy": "no"} if evaluate else {}))  # fmt: skip
    datasets = dict(train_dataset=Dataset.from_list(rows[:8]),
                    eval_dataset=Dataset.from_list(rows[8:]) if evaluate else None)  # fmt: skip
    if kind == "sdpo":
        args = sdpo.SDPOConfig(**common, num_generations=2, **options)
        return sdpo.SDPOTrainer(model=_model(name, change), reward_funcs=_reward, args=args, **datasets,
                                processing_class=_word_tokenizer(), peft_config=peft_config)  # fmt: skip
    args = sdft.SDFTConfig(**common, num_generations=1, **{"distillation_mode": "sampled_token",
                                                            "distillation_alpha": 1.0, **options})  # fmt: skip
    return sdft.SDFTTrainer(model=_model(name, change), args=args, **datasets, processing_class=_word_tokenizer(),
                            peft_config=peft_config)  # fmt: skip


def _run(kind: str, name: str = "llama", **options: Any) -> list[dict[str, float]]:
    evaluate = options.get("evaluate", False)
    trainer = _trainer(kind, name, **options)
    torch.manual_seed(3)  # the sampled completions: the same in both runs
    return trained_logs(trainer, evaluate)


def _stock_and_ours(kind: str, name: str = "llama", **options: Any) -> tuple[Any, Any]:
    stock = _run(kind, name, **options)
    logitless.install()
    return _run(kind, name, **options), stock


def _assert_equal(ours: list[dict[str, float]], stock: list[dict[str, float]], minimum: int) -> None:
    # The sampled-token loss is a small difference of products of log-probabilities of size 0.1 to 1: float32's
    # rounding of those terms, carried through an SGD step at learning rate 0.5, moves the second step's loss by about
    # 1e-6 (-0.0041041 against stock's -0.0041026 for a live teacher; the same code on float64 copies bounds ours by
    # stock's own float32 error in test_one_step_loss_and_gradients_equal_float64).
    assert_logs_equal(ours, stock, minimum, rel_tol=1e-4, abs_tol=5e-6)


def _report(kind: str) -> dict[str, Any]:
    return logitless.audit()["integrations"]["trl"][kind]


@pytest.mark.parametrize("name", ["llama", "gemma3", "granite"])
def test_sdpo_run_equals_stock(name: str) -> None:
    """SDPO's defaults (sampled-token reverse KL, an EMA teacher, clipped importance ratios): two loss steps and the
    rollout's log-probabilities of the batch they share."""
    ours, stock = _stock_and_ours("sdpo", name)
    _assert_equal(ours, stock, 20)
    assert abs(stock[1]["self_distillation/distillation_loss"]) > 1e-4
    assert _report("sdpo") == {"fused": 3, "stock": {}}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        # Both losses from one student forward; a live teacher (the student itself, in training mode).
        ("llama", dict(distillation_weight=0.3, teacher_model_kind="live", temperature=0.7,
                       importance_sampling_level="sequence", loss_type="grpo")),  # fmt: skip
        # The policy loss alone: no teacher forward.
        ("cohere", dict(distillation_weight=0.0, loss_type="dr_grpo", scale_rewards="none")),
    ],
)
def test_sdpo_policy_loss_equals_stock(name: str, options: dict[str, Any]) -> None:
    ours, stock = _stock_and_ours("sdpo", name, **options)
    _assert_equal(ours, stock, 20)
    # The second step reuses the batch: its importance ratios differ from 1.
    assert abs(stock[1]["self_distillation/policy_loss"]) > 1e-4
    assert _report("sdpo") == {"fused": 3, "stock": {}}


@pytest.mark.parametrize(("name", "options"), [("llama", {}), ("gemma3", {"num_loss_tokens_to_skip": 2}),
                                               ("granite", {"teacher_model_kind": "base"})])  # fmt: skip
def test_sdft_sampled_token_run_equals_stock(name: str, options: dict[str, Any]) -> None:
    """SDFT's teacher sees the privileged context; the loss may skip the completion's first tokens."""
    ours, stock = _stock_and_ours("sdft", name, **options)
    _assert_equal(ours, stock, 10)
    assert _report("sdft") == {"fused": 3, "stock": {}}


@pytest.mark.parametrize(("kind", "teacher", "options"), [("sdpo", "base", {}), ("sdft", "ema", SDFT_DEFAULTS)])
def test_a_lora_student_with_an_adapter_teacher_equals_stock(kind: str, teacher: str, options: dict[str, Any]) -> None:
    """The teacher is the student's model with the adapter off (``base``) or switched to TRL's EMA ``teacher``
    adapter (``ema``): TRL's ``use_adapter`` around its forward."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ours, stock = _stock_and_ours(kind, "llama", peft_config=lora, teacher_model_kind=teacher, **options)
    _assert_equal(ours, stock, 10)
    assert _report(kind) == {"fused": 3, "stock": {}}


@pytest.mark.parametrize(("kind", "options", "calls"), [("sdpo", {}, 7), ("sdft", SDFT_DEFAULTS, 5)])
def test_evaluation_equals_stock(kind: str, options: dict[str, Any], calls: int) -> None:
    """Training: two loss steps and one rollout; evaluation: each batch sampled (a rollout) and scored (SDPO's four
    prompts give two batches of two generations each, SDFT's one)."""
    ours, stock = _stock_and_ours(kind, "llama", evaluate=True, **options)
    _assert_equal(ours, stock, 10)
    assert _report(kind) == {"fused": calls, "stock": {}}


@pytest.mark.parametrize(("kind", "options"), [("sdpo", {}), ("sdft", SDFT_DEFAULTS)])
def test_a_hooked_head_gives_exact_values_from_its_logits(kind: str, options: dict[str, Any]) -> None:
    """The forward keeps its stock path: the log-probabilities (sampled-token, or the top-k support's) from its
    logits."""
    ours, stock = _stock_and_ours(kind, "llama", change=hooked_head, **options)
    _assert_equal(ours, stock, 10)
    assert _report(kind) == {"fused": 0, "stock": {"materialised": 3}}


@pytest.mark.parametrize(("kind", "name", "options"), [
    # SDFT's defaults: the student's top 100 (of 256) tokens, renormalised, the JSD at 0.5, clipped ratios.
    ("sdft", "llama", SDFT_DEFAULTS),
    ("sdft", "gemma3", {**SDFT_DEFAULTS, "num_loss_tokens_to_skip": 2}),
    # A tail bucket for the rest of the mass, the forward KL, five tokens.
    ("sdft", "granite", {**SDFT_DEFAULTS, "distillation_add_tail": True, "distillation_alpha": 0.0,
                         "distillation_topk": 5}),  # fmt: skip
    # Mixed with SDPO's policy loss; the reverse KL.
    ("sdpo", "cohere", {"distillation_mode": "topk_logits", "distillation_topk": 10, "distillation_weight": 0.5}),
])  # fmt: skip
def test_topk_runs_equal_stock(kind: str, name: str, options: dict[str, Any]) -> None:
    """The student's top-k log-probabilities (with gradients) and the teacher's at the same ids from the heads'
    calls (``logitless.integrations._support``); TRL's tail bucket or renormalisation and divergence on them."""
    ours, stock = _stock_and_ours(kind, name, **options)
    _assert_equal(ours, stock, 10)
    assert abs(stock[1]["self_distillation/distillation_loss"]) > 1e-5
    assert _report(kind) == {"fused": 3, "stock": {}}


def test_full_logits_mode_keeps_trls_path() -> None:
    """Its divergence reads every logit: TRL's code runs, counted; the rollout's log-probabilities are still fused."""
    ours, stock = _stock_and_ours("sdpo", "llama", distillation_mode="full_logits")
    _assert_equal(ours, stock, 10)
    assert _report("sdpo") == {"fused": 1, "stock": {"mode-full_logits": 2}}


def test_a_sampled_token_alpha_other_than_one_raises_trls_error() -> None:
    trainer = _trainer("sdpo")
    trainer.args.distillation_alpha = 0.5  # the config refuses it; a trainer whose arguments change later raises
    logitless.install()
    with pytest.raises(ValueError, match="Only reverse KL"):
        trainer.train()
    # TRL raises at the first step with a sample to distill (a step without one returns zero first); the rollout's
    # log-probabilities before it are fused.
    assert set(_report("sdpo")["stock"]) == {"sampled-token-alpha"}


def _batch(trainer: Any) -> dict[str, torch.Tensor]:
    """One step's batch as TRL prepares it: left-padded prompts, a completion that ended early, a sample without a
    teacher (SDPO's distillation mask), the rollout's log-probabilities (the importance ratio clips some), and the
    teacher's longer prompt before the same completion."""
    g = torch.Generator().manual_seed(5)
    batch, prompt, completion, teacher_prompt = 4, 5, 7, 9
    prompt_ids = torch.randint(3, tiny.VOCAB, (batch, prompt), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(3, tiny.VOCAB, (batch, completion), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = 0
    completion_ids[1, 4:] = 0  # the pad token
    teacher_ids = torch.cat([torch.randint(3, tiny.VOCAB, (batch, teacher_prompt), generator=g), completion_ids], 1)
    teacher_mask = torch.cat([torch.ones(batch, teacher_prompt, dtype=torch.long), completion_mask], 1)
    teacher_mask[2, :3] = 0
    with torch.no_grad():
        logits = trainer.model(torch.cat([prompt_ids, completion_ids], 1)).logits[:, prompt - 1 : -1].double()
    old = logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    old = old + torch.randn(old.shape, generator=g, dtype=torch.float64)  # ratios beyond the clip too
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "teacher_input_ids": teacher_ids, "teacher_attention_mask": teacher_mask,
        "self_distillation_mask": torch.tensor([1.0, 1.0, 0.0, 1.0]), "advantages": torch.tensor([0.5, -1.0, 1.5, 0.2]),
        "old_per_token_logps": old.float(),
    }  # fmt: skip


def _max_error(got: Any, want: Any) -> float:
    """The largest error of ``got``'s gradients against ``want``'s, relative to each gradient's largest value."""
    reference = dict(want.named_parameters())
    return max(float((p.grad.double() - reference[k].grad).abs().max() / reference[k].grad.abs().max())
               for k, p in got.named_parameters())  # fmt: skip


@pytest.mark.parametrize(("kind", "name", "options"), [
    ("sdpo", "gemma3", {}),
    ("sdpo", "granite", {"distillation_weight": 0.5, "temperature": 0.8}),
    ("sdpo", "llama", {"distillation_weight": 0.3, "teacher_model_kind": "live", "temperature": 0.7,
                       "importance_sampling_level": "sequence"}),
    ("sdft", "cohere", {"num_loss_tokens_to_skip": 1}),
    ("sdft", "gemma3", {**SDFT_DEFAULTS, "distillation_topk": 20}),
    ("sdpo", "granite", {"distillation_mode": "topk_logits", "distillation_topk": 8, "distillation_add_tail": True,
                         "distillation_weight": 0.5, "temperature": 0.8}),  # fmt: skip
])  # fmt: skip
def test_one_step_loss_and_gradients_equal_float64(kind: str, name: str, options: dict[str, Any]) -> None:
    """``compute_loss`` and the student's gradients against stock TRL's on float64 copies of the student and the
    teacher (TRL's own code computes the reference from their logits): errors no worse than stock's in float32 (the
    loss is a small difference of products of log-probabilities, so both are well above float32's rounding)."""
    trainer = _trainer(kind, name, **options)
    trainer.current_gradient_accumulation_steps = 1
    inputs = _batch(trainer)
    student64, teacher64 = copy.deepcopy(trainer.model).double(), copy.deepcopy(trainer.teacher_model).double()
    student32 = copy.deepcopy(trainer.model)
    logitless.install()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    assert _report(kind) == {"fused": 1, "stock": {}}
    logitless.uninstall()
    stock = trainer.compute_loss(student32, inputs)
    stock.backward()
    trainer.teacher_model = teacher64
    want = trainer.compute_loss(student64, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})
    want.backward()
    assert abs(want.item()) > 1e-3
    assert abs(loss.item() - want.item()) <= max(4 * abs(stock.item() - want.item()), 1e-7)
    assert _max_error(trainer.model, student64) <= max(4 * _max_error(student32, student64), 1e-6)


def test_rollout_logps_equal_float64() -> None:
    trainer = _trainer("sdpo", "gemma3")
    inputs = _batch(trainer)
    student64 = copy.deepcopy(trainer.model).double()
    logitless.install()
    ours = trainer._compute_rollout_logps(*(inputs[k] for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                                  "completion_mask")))  # fmt: skip
    assert _report("sdpo") == {"fused": 1, "stock": {}}
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logits = student64(ids, attention_mask=mask).logits[:, 4:-1] / trainer.temperature
    want = logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    kept = inputs["completion_mask"] != 0
    torch.testing.assert_close(ours.double()[kept], want[kept], rtol=1e-5, atol=2e-6)


def test_install_wraps_and_uninstall_restores() -> None:
    for cls in (sdpo.SDPOTrainer, sdft.SDFTTrainer):
        originals = {m: cls.__dict__[m] for m in ("compute_loss", "_compute_rollout_logps")}
        assert ours_module.known(cls)
        logitless.install()
        for method, original in originals.items():
            assert cls.__dict__[method].__logitless_wrapped__ is original
        logitless.uninstall()
        for method, original in originals.items():
            assert cls.__dict__[method] is original


@pytest.mark.parametrize("version", ["1.14.2", "1.15.0"])
@pytest.mark.parametrize("kind", ["sdpo", "sdft"])
def test_known_releases(kind: str, version: str) -> None:
    """TRL 1.14 (the trainers' first release in this form) to 1.16 share the reproduced methods; one changed token
    is another release."""
    found = list((LEGACY / f"trl-{version}").glob(f"trl/experimental/{kind}/{kind}_trainer.py"))
    if not found:
        pytest.skip(f"TRL {version}'s source is not unpacked (make test unpacks it)")
    source = found[0].read_text()
    lines = source.splitlines(keepends=True)
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == f"{kind.upper()}Trainer")
    methods = {m.name: "".join(lines[m.lineno - 1 : m.end_lineno]) for m in cls.body if isinstance(m, ast.FunctionDef)}
    known = ours_module._KNOWN[f"{kind.upper()}Trainer"]
    for name, want in known.items():
        assert source_digest(methods[name]) == want, name
    changed = methods["_forward_logits"].replace("logits[:, :-1, :]", "logits[:, 1:, :]", 1)
    assert source_digest(changed) != known["_forward_logits"]
