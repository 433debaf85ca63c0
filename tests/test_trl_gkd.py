"""TRL's GKDTrainer through logitless (``logitless.integrations.trl_gkd``): whole trainer runs against stock TRL on
identical weights (losses, gradient norms, evaluation), one step's loss against a float64 reference computed from
each model's own logits, and the releases and calls that keep TRL's own code."""

from __future__ import annotations

import ast
import copy
import math
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import _tiny_lm as tiny
import logitless

trl = pytest.importorskip("trl")
gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
TRL = tuple(int(part) for part in trl.__version__.split(".")[:2])

from logitless.integrations import trl_gkd  # noqa: E402 - after the TRL checks
from logitless.integrations._digest import source_digest  # noqa: E402
from ops_reference import divergence64  # noqa: E402
from _trl_runs import _training_args, _word_tokenizer, _words  # noqa: E402

pytestmark = pytest.mark.usefixtures("stock_world")

LEGACY = Path(__file__).resolve().parent.parent / ".trl-legacy"


def _bart_decoder(seed: int) -> torch.nn.Module:
    # Its own loss scores the labels unshifted; GKD's loss shifts them.
    import transformers

    config = transformers.BartConfig(
        vocab_size=tiny.VOCAB, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
        use_cache=False,  # its cache fails without an encoder (transformers 5.24), stock as here
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BartForCausalLM(config).float()


def _build(name: str, seed: int) -> torch.nn.Module:
    model = _bart_decoder(seed) if name == "bart-decoder" else tiny.build(name, seed=seed)
    head = model.get_output_embeddings()
    if name in ("cohere", "bart-decoder"):
        # Tied to the embeddings, a tiny random model's head mostly predicts its input token, in student and teacher
        # alike (a divergence near 0): an untied one of its own.
        torch.manual_seed(seed + 100)
        head.weight = torch.nn.Parameter(torch.randn_like(head.weight) * 0.02)
    with torch.no_grad():
        # A random tiny head gives near-uniform distributions (a divergence near 0 too): sharpen them.
        head.weight.mul_(12.0)
    return model


def _mixtral(seed: int) -> torch.nn.Module:
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.5, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    return model


def _rows(n: int = 8) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    return [{"messages": [{"role": "user", "content": _words(g, 5)},
                          {"role": "assistant", "content": _words(g, 6)}]} for _ in range(n)]  # fmt: skip


def _trainer(name: str, beta: float, **options: Any) -> Any:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = _word_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    make = options.pop("make", _build)
    student, teacher = make(name, 0), make(name, 3)
    for change in options.pop("change", ()):
        change(student, teacher)
    peft_config = options.pop("peft_config", None)
    evaluate = options.pop("evaluate", None)
    args = GKDConfig(**_training_args(), beta=beta, max_new_tokens=4, max_length=32, **options,
                     **({"per_device_eval_batch_size": 4} if evaluate else {}))  # fmt: skip
    return GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(_rows()),
                      eval_dataset=Dataset.from_list(_rows(4)) if evaluate else None, processing_class=tok,
                      peft_config=peft_config, compute_metrics=_metrics if evaluate == "metrics" else None)  # fmt: skip


def _metrics(prediction: Any) -> dict[str, float]:
    return {"mean_logit": float(prediction.predictions.mean())}


def _run(name: str, beta: float, **options: Any) -> list[dict[str, float]]:
    evaluate = options.get("evaluate")
    trainer = _trainer(name, beta, **options)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "grad_norm" in e]
    if evaluate:
        logs.append(trainer.evaluate())
    return logs


def _compare(ours: list[dict[str, float]], stock: list[dict[str, float]]) -> None:
    assert len(ours) == len(stock) >= 2
    for step, (a, b) in enumerate(zip(ours, stock, strict=True)):
        for key in ("loss", "grad_norm", "eval_loss", "eval_mean_logit"):
            if key in b:
                assert math.isclose(a[key], b[key], rel_tol=2e-5, abs_tol=1e-7), (step, key, a[key], b[key])
    assert stock[0]["loss"] > 0.05  # a divergence far from 0: the comparison means something


def _gkd_report() -> dict[str, Any]:
    return logitless.audit()["integrations"]["trl"]["gkd"]


EVALUATE = {"llama": "loss", "gemma3": "metrics"}


@pytest.mark.parametrize(("name", "beta"), [("llama", 0.5), ("gemma3", 0.0), ("granite", 1.0), ("cohere", 0.3),
                                           ("bart-decoder", 0.5)])  # fmt: skip
def test_gkd_run_equals_stock(name: str, beta: float) -> None:
    """Each family's epilogue (softcap, divisor, multiplier) as its forward applies it; BART's decoder, whose own
    loss does not shift the labels (GKD's positions are GKD's). A loss-only evaluation step is fused too; one with
    ``compute_metrics`` reads the student's logits and keeps TRL's path."""
    evaluate = EVALUATE.get(name)
    stock = _run(name, beta, evaluate=evaluate)
    logitless.install()
    ours = _run(name, beta, evaluate=evaluate)
    _compare(ours, stock)
    # TRL 1.14's SFTTrainer.prediction_step (GKDTrainer's) asks compute_loss for the outputs even when loss-only.
    loss_only = {"fused": 3, "stock": {}} if TRL >= (1, 15) else {"fused": 2, "stock": {"outputs-requested": 1}}
    expected = {"loss": loss_only, "metrics": {"fused": 2, "stock": {"outputs-requested": 1}}}
    assert _gkd_report() == expected.get(evaluate, {"fused": 2, "stock": {}})


def test_on_policy_steps_with_a_lora_student_equal_stock() -> None:
    """lmbda=1: every step trains on the student's own generations; the student is a PEFT LoRA model."""
    from peft import LoraConfig

    options = {"lmbda": 1.0, "peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}
    stock = _run("llama", 0.5, **options)
    logitless.install()
    ours = _run("llama", 0.5, **options)
    _compare(ours, stock)
    assert _gkd_report() == {"fused": 2, "stock": {}}


def test_mixtral_router_loss_is_left_out_as_stock_does() -> None:
    """Given labels, Mixtral's forward adds its router loss to its loss, in place; GKD's loss has none."""
    stock = _run("mixtral", 0.5, make=lambda name, seed: _mixtral(seed))
    logitless.install()
    ours = _run("mixtral", 0.5, make=lambda name, seed: _mixtral(seed))
    _compare(ours, stock)
    assert _gkd_report() == {"fused": 2, "stock": {}}


def _custom_student_loss(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    student.loss_function = lambda logits, labels, **kwargs: logits.float().mean()


def _hooked_teacher_head(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    teacher.lm_head.register_forward_hook(lambda module, args, out: None)


def _hooked_student_head(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    student.lm_head.register_forward_hook(lambda module, args, out: out * 1.5)


@pytest.mark.parametrize(("change", "reason"), [(_custom_student_loss, "student-custom-loss"),
                                                (_hooked_teacher_head, "teacher-hooked-head"),
                                                (_hooked_student_head, "student-hooked-head")])  # fmt: skip
def test_a_forward_that_refuses_gives_trls_loss(change: Any, reason: str) -> None:
    """A model whose forward keeps its stock path at run time (a loss of the user's, a hooked head): its logits go to
    TRL's own loss, as stock."""
    stock = _run("llama", 0.5, change=(change,))
    logitless.install()
    ours = _run("llama", 0.5, change=(change,))
    _compare(ours, stock)
    assert _gkd_report() == {"fused": 0, "stock": {reason: 2}}


def test_one_step_equals_a_float64_reference_from_the_models_own_logits() -> None:
    logitless.install()
    trainer = _trainer("gemma3", 0.5)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    assert _gkd_report() == {"fused": 1, "stock": {}}
    logitless.uninstall()
    student, teacher = copy.deepcopy(trainer.model).double(), copy.deepcopy(trainer.teacher_model).double()
    with torch.no_grad():
        log_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
        log_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    mask = batch["labels"][:, 1:] != -100
    per_position = divergence64(log_s[:, :-1], log_t[:, :-1], 0.5)
    want = per_position[mask].sum() / mask.sum()
    assert want > 0.05
    assert math.isclose(loss.item(), want.item(), rel_tol=2e-6), (loss.item(), want.item())


def test_install_wraps_compute_loss_and_uninstall_restores() -> None:
    original = gkd.GKDTrainer.__dict__["compute_loss"]
    assert trl_gkd.known(gkd.GKDTrainer)
    logitless.install()
    assert gkd.GKDTrainer.__dict__["compute_loss"].__logitless_wrapped__ is original
    logitless.uninstall()
    assert gkd.GKDTrainer.__dict__["compute_loss"] is original


def test_another_releases_gkd_is_left_to_trl_with_a_warning() -> None:
    module = types.ModuleType("trl.trainer.gkd_trainer")

    class GKDTrainer:
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False) -> Any:
            return model(**inputs).loss

        @staticmethod
        def generalized_jsd_loss(student_logits: Any, teacher_logits: Any) -> Any:
            return None

    GKDTrainer.__module__ = module.__name__
    module.GKDTrainer = GKDTrainer  # type: ignore[attr-defined]
    original = GKDTrainer.__dict__["compute_loss"]
    sys.modules[module.__name__] = module
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logitless.install()
        assert GKDTrainer.__dict__["compute_loss"] is original
        assert any("GKDTrainer.compute_loss is not the code" in str(w.message) for w in caught)
        assert logitless.audit()["integrations"]["trl"]["left_to_trl"] == ["trl.trainer.gkd_trainer.GKDTrainer."
                                                                           "compute_loss"]  # fmt: skip
    finally:
        del sys.modules[module.__name__]


def _methods(path: Path) -> dict[str, str]:
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == "GKDTrainer":
            return {m.name: "".join(lines[(m.decorator_list[0] if m.decorator_list else m).lineno - 1: m.end_lineno])
                    for m in node.body if isinstance(m, ast.FunctionDef)}  # fmt: skip
    raise AssertionError(f"no GKDTrainer in {path}")


@pytest.mark.parametrize(("version", "accepted"), [("1.15.0", True), ("1.14.2", True), ("1.5.1", False),
                                                   ("0.24.0", False)])  # fmt: skip
def test_known_releases(version: str, accepted: bool) -> None:
    """TRL 1.14 to 1.16 share GKD's loss code; 1.5 slices the logits by the prompt's length and divides by a count
    that may be 0, 0.24 also has a Liger path: those keep TRL's code."""
    found = list((LEGACY / f"trl-{version}").glob("trl/**/gkd_trainer.py"))
    if not found:
        pytest.skip(f"TRL {version}'s source is not unpacked (make test unpacks it)")
    methods = _methods(found[0])
    digests = {name: source_digest(methods[name]) for name in ("compute_loss", "generalized_jsd_loss")}
    assert all(digests[name] in trl_gkd._KNOWN[name] for name in digests) is accepted
