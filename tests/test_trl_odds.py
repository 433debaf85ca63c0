"""TRL's ORPOTrainer and CPOTrainer through logitless (``logitless.integrations.trl_odds``): whole trainer runs
against stock TRL on identical weights (every logged metric), one call's values and gradients against a float64
reference from the model's own logits, and the calls and releases that keep TRL's own code.

Runs on the pinned TRL (``trl.experimental``) and, by ``make test``, on TRL 0.24.0 (``trl.trainer``, its source
first on PYTHONPATH), whose methods differ."""

from __future__ import annotations

import ast
import copy
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

from logitless.integrations import trl_odds  # noqa: E402 - after the TRL check
from logitless.integrations._digest import source_digest  # noqa: E402
from _trl_runs import _training_args, _word_tokenizer, _words  # noqa: E402
from _trl_runs import assert_logs_equal, hooked_head, trained_logs  # noqa: E402

pytestmark = pytest.mark.usefixtures("stock_world")

LEGACY = Path(__file__).resolve().parent.parent / ".trl-legacy"
TRL = tuple(int(part) for part in trl.__version__.split(".")[:2])


def _classes(kind: str) -> tuple[type, type]:
    """The trainer and its config: ``trl.experimental`` from TRL 1.5, ``trl`` before."""
    name = kind.upper()
    try:
        module = __import__(f"trl.experimental.{kind}", fromlist=[f"{name}Trainer"])
    except ImportError:
        module = trl
    return getattr(module, f"{name}Trainer"), getattr(module, f"{name}Config")


def _mixtral(seed: int) -> torch.nn.Module:
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.5, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config).float()


def _build(name: str) -> torch.nn.Module:
    model = _mixtral(0) if name == "mixtral" else tiny.build(name, seed=0)
    model.warnings_issued = {}  # TRL 0.24's trainers write it; transformers 5 models no longer have it
    return model


def _rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    g = torch.Generator().manual_seed(seed)
    # Chosen and rejected of different lengths: the stacked batch has padding in both.
    return [{"prompt": _words(g, 5), "chosen": " " + _words(g, 4), "rejected": " " + _words(g, 3 + i % 3)}
            for i in range(n)]  # fmt: skip


def _trainer(kind: str, name: str, **options: Any) -> Any:
    from datasets import Dataset

    trainer_class, config_class = _classes(kind)
    change = options.pop("change", None)
    evaluate = options.pop("evaluate", False)
    peft_config = options.pop("peft_config", None)
    subclass = options.pop("subclass", None)
    extra = {"max_prompt_length": 16} if "max_prompt_length" in config_class.__dataclass_fields__ else {}
    args = config_class(**_training_args(), max_length=32, **extra, **options,
                        **({"per_device_eval_batch_size": 4} if evaluate else {}))  # fmt: skip
    model = _build(name)
    if change is not None:
        change(model)
    if peft_config is not None:
        torch.manual_seed(7)  # LoRA's A matrices are random: the same in every run
    cls = subclass(trainer_class) if subclass is not None else trainer_class
    return cls(model=model, args=args, train_dataset=Dataset.from_list(_rows(8)),
               eval_dataset=Dataset.from_list(_rows(4, seed=1)) if evaluate else None,
               processing_class=_word_tokenizer(), peft_config=peft_config)  # fmt: skip


def _run(kind: str, name: str, **options: Any) -> list[dict[str, float]]:
    return trained_logs(_trainer(kind, name, **options), options.get("evaluate", False))


def _compare(ours: list[dict[str, float]], stock: list[dict[str, float]]) -> None:
    assert_logs_equal(ours, stock, 20)


def _report(kind: str) -> dict[str, Any]:
    return logitless.audit()["integrations"]["trl"][kind]


# Each family's epilogue (softcap, divisor, multiplier) as its forward applies it; CPO's losses that average the
# log-probabilities (simpo, ipo) and its cpo_alpha=0 (no cross-entropy).
RUNS = [
    ("orpo", "llama", {}),
    ("orpo", "gemma3", {}),
    ("orpo", "granite", {}),
    ("cpo", "cohere", {}),
    ("cpo", "llama", {"loss_type": "simpo", "cpo_alpha": 0.0}),
    ("cpo", "gemma3", {"loss_type": "ipo"}),
]


@pytest.mark.parametrize(("kind", "name", "options"), RUNS, ids=[f"{k}-{n}-{len(o)}" for k, n, o in RUNS])
def test_run_equals_stock(kind: str, name: str, options: dict[str, Any]) -> None:
    stock = _run(kind, name, **options)
    logitless.install()
    ours = _run(kind, name, **options)
    _compare(ours, stock)
    assert _report(kind) == {"fused": 2, "stock": {}}


@pytest.mark.parametrize("kind", ["orpo", "cpo"])
def test_evaluation_equals_stock(kind: str) -> None:
    """``evaluate()`` runs the same call without gradients; its logits "predictions" are the metrics' means."""
    stock = _run(kind, "llama", evaluate=True)
    logitless.install()
    ours = _run(kind, "llama", evaluate=True)
    _compare(ours, stock)
    assert _report(kind) == {"fused": 3, "stock": {}}


def test_lora_policy_equals_stock() -> None:
    from peft import LoraConfig

    options = {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}
    stock = _run("orpo", "llama", **options)
    logitless.install()
    ours = _run("orpo", "llama", **options)
    _compare(ours, stock)
    assert _report("orpo") == {"fused": 2, "stock": {}}


def test_mixtral_router_loss_equals_stock() -> None:
    """A MoE model's router loss (``aux_loss_enabled``) comes from the same forward and is added as in stock."""
    stock = _run("orpo", "mixtral")
    logitless.install()
    ours = _run("orpo", "mixtral")
    _compare(ours, stock)
    assert _report("orpo") == {"fused": 2, "stock": {}}


def _own_logps(trainer_class: type) -> type:
    class Trainer(trainer_class):  # type: ignore[misc, valid-type]
        @staticmethod
        def get_batch_logps(logits: Any, labels: Any, average_log_prob: bool = False, **kwargs: Any) -> Any:
            return trainer_class.get_batch_logps(logits, labels, average_log_prob, **kwargs) * 0.5

    return Trainer


@pytest.mark.parametrize(("options", "reason"), [({"change": hooked_head}, "materialised"),
                                                 ({"subclass": _own_logps}, "custom-get-batch-logps")])  # fmt: skip
def test_what_keeps_trls_values(options: dict[str, Any], reason: str) -> None:
    """A hooked head (the forward keeps its stock path at run time: exact values from its logits, formed once) and
    a subclass's own ``get_batch_logps`` (TRL's code runs) give stock's values."""
    stock = _run("cpo", "llama", **options)
    logitless.install()
    ours = _run("cpo", "llama", **options)
    _compare(ours, stock)
    assert _report("cpo") == {"fused": 0, "stock": {reason: 2}}


@pytest.mark.parametrize(("kind", "report"), [("orpo", {"fused": 2, "stock": {}}),
                                              ("cpo", {"fused": 0, "stock": {"shift-labels-not-read": 2}})])
def test_a_forward_that_drops_shift_labels(kind: str, report: dict[str, Any], monkeypatch: Any) -> None:
    """The targets go as ``shift_labels`` and as ``labels``. A forward whose loss reads the labels alone (here:
    ``shift_labels`` withheld) gives the positions but the last: enough for ORPO; CPO's logits metric reads the
    last, so that call runs TRL's code."""
    from logitless.integrations import trl as drop_in

    real = drop_in.per_token_fields

    def without_shift_labels(model: Any, forward: Any, args: Any, kwargs: Any, labels: Any, shift_labels: Any,
                             *rest: Any) -> Any:  # fmt: skip
        return real(model, forward, args, kwargs, labels, None, *rest)

    stock = _run(kind, "llama")
    monkeypatch.setattr(drop_in, "per_token_fields", without_shift_labels)
    logitless.install()
    ours = _run(kind, "llama")
    _compare(ours, stock)
    assert _report(kind) == report


def _float64(trainer: Any, model: torch.nn.Module, batch: dict[str, Any], kind: str) -> tuple[torch.Tensor, ...]:
    """``concatenated_forward``'s values from the model's own logits in float64, written from ORPO's and CPO's
    definitions: per sequence the mean (ORPO, CPO's simpo / ipo) or sum of its labels' log-probabilities, the
    chosen rows' cross-entropy (ORPO: every attended next token), the mean logit of the chosen and rejected rows."""
    stacked = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=0, device="cpu")
    ids, attention = stacked["concatenated_input_ids"], stacked["concatenated_attention_mask"]
    labels = stacked["concatenated_labels"]
    n = batch["chosen_labels"].shape[0]
    logits = model(ids, attention_mask=attention).logits.double()
    logp = logits.log_softmax(-1)[:, :-1]
    kept = labels[:, 1:] != -100
    picked = logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = (picked * kept).sum(-1) / kept.sum(-1)
    if kind == "orpo":
        scored = attention[:, 1:] == 1
        token = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        means = logits[:, :-1].mean(-1)
    else:
        scored, token, means = kept, picked, logits.mean(-1)
    nll = -(token[:n] * scored[:n]).sum() / scored[:n].sum()
    return logps[:n], logps[n:], means[:n].mean(), means[n:].mean(), nll


@pytest.mark.parametrize(("kind", "name"), [("orpo", "gemma3"), ("cpo", "granite")])
def test_one_call_and_its_gradients_equal_float64(kind: str, name: str) -> None:
    options = {"loss_type": "simpo"} if kind == "cpo" else {}
    trainer = _trainer(kind, name, **options)
    batch = next(iter(trainer.get_train_dataloader()))
    reference = copy.deepcopy(trainer.model).double()
    logitless.install()
    ours = trainer.concatenated_forward(trainer.model, batch)
    assert _report(kind) == {"fused": 1, "stock": {}}
    logitless.uninstall()
    want = _float64(trainer, reference, batch, kind)
    got = (ours[0], ours[1], ours[2].mean(), ours[3].mean(), ours[4])
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6, msg=f"output {i}")
    # The values TRL's losses differentiate: the log-probabilities (per sequence) and the cross-entropy.
    weights = torch.linspace(0.5, 1.5, ours[0].numel() + ours[1].numel(), dtype=torch.float64)
    (torch.cat([ours[0], ours[1]]).double() @ weights + ours[4]).backward()
    (torch.cat([want[0], want[1]]) @ weights + want[4]).backward()
    params = dict(reference.named_parameters())
    for key, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[key].grad, rtol=1e-4, atol=1e-6, msg=key)


def test_bf16_log_probs_are_float32_math_on_the_hidden_states() -> None:
    """In bf16, stock's log-probabilities are those of bf16 logits through a bf16 log-softmax; the op's are float32
    math on the same hidden states and head: their error against float64 from those is several times smaller."""
    trainer = _trainer("orpo", "llama")
    model = trainer.model.to(torch.bfloat16)
    batch = next(iter(trainer.get_train_dataloader()))
    stacked = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=0, device="cpu")
    ids, labels = stacked["concatenated_input_ids"], stacked["concatenated_labels"]
    with torch.no_grad():
        hidden = model(ids, attention_mask=stacked["concatenated_attention_mask"],
                       output_hidden_states=True).hidden_states[-1]  # fmt: skip
        logp = (hidden.double() @ model.lm_head.weight.double().T).log_softmax(-1)[:, :-1]
        kept = labels[:, 1:] != -100
        picked = logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        want = (picked * kept).sum(-1) / kept.sum(-1)
        stock = torch.cat(trainer.concatenated_forward(model, batch)[:2]).double()
        logitless.install()
        ours = torch.cat(trainer.concatenated_forward(model, batch)[:2]).double()
    assert _report("orpo") == {"fused": 1, "stock": {}}
    ours_error, stock_error = (ours - want).abs().max().item(), (stock - want).abs().max().item()
    assert ours_error < stock_error / 4, (ours_error, stock_error)


def test_labels_that_are_not_the_input_tokens_keep_trls_path() -> None:
    """ORPO's cross-entropy reads the input ids, its log-probabilities the labels: one pass has one target per
    position, so a batch whose labels differ from its tokens (a collator of the user's) runs TRL's code."""
    trainer = _trainer("orpo", "llama")
    batch = next(iter(trainer.get_train_dataloader()))
    batch["chosen_labels"] = torch.where(batch["chosen_labels"] != -100, (batch["chosen_labels"] + 1) % tiny.VOCAB,
                                         batch["chosen_labels"])  # fmt: skip
    with torch.no_grad():
        stock = trainer.concatenated_forward(trainer.model, batch)
        logitless.install()
        ours = trainer.concatenated_forward(trainer.model, batch)
    assert _report("orpo") == {"fused": 0, "stock": {"labels-differ-from-input-ids": 1}}
    for a, b in zip(ours, stock, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(TRL >= (1, 0), reason="label_pad_token_id is configurable in TRL 0.x only")
def test_a_label_pad_token_id_other_than_the_cross_entropys_keeps_trls_path() -> None:
    """TRL 0.x pads ORPO's labels with ``label_pad_token_id`` but its cross-entropy ignores -100 alone: another value
    runs TRL's code, which fails on it as stock does."""
    trainer = _trainer("orpo", "llama", label_pad_token_id=-1)
    batch = next(iter(trainer.get_train_dataloader()))
    with pytest.raises((IndexError, RuntimeError)) as stock:
        trainer.concatenated_forward(trainer.model, batch)
    logitless.install()
    with pytest.raises(type(stock.value)):
        trainer.concatenated_forward(trainer.model, batch)
    assert _report("orpo") == {"fused": 0, "stock": {"label-pad-token-id": 1}}


@pytest.mark.parametrize("kind", ["orpo", "cpo"])
def test_install_wraps_and_uninstall_restores(kind: str) -> None:
    trainer_class, _ = _classes(kind)
    original = trainer_class.__dict__["concatenated_forward"]
    assert trl_odds.known(trainer_class)
    logitless.install()
    assert trainer_class.__dict__["concatenated_forward"].__logitless_wrapped__ is original
    logitless.uninstall()
    assert trainer_class.__dict__["concatenated_forward"] is original


def test_another_release_is_left_to_trl_with_a_warning() -> None:
    module = types.ModuleType("trl.experimental.orpo.orpo_trainer")

    class ORPOTrainer:
        def concatenated_forward(self, model: Any, batch: Any) -> Any:
            return model(batch["input_ids"]).logits

        @staticmethod
        def get_batch_logps(logits: Any, labels: Any) -> Any:
            return None

        def get_batch_loss_metrics(self, model: Any, batch: Any, train_eval: str = "train") -> Any:
            return None

    ORPOTrainer.__module__ = module.__name__
    module.ORPOTrainer = ORPOTrainer  # type: ignore[attr-defined]
    original = ORPOTrainer.__dict__["concatenated_forward"]
    saved = sys.modules.get(module.__name__)
    sys.modules[module.__name__] = module
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logitless.install()
        assert ORPOTrainer.__dict__["concatenated_forward"] is original
        assert any("ORPOTrainer.concatenated_forward is not the code" in str(w.message) for w in caught)
        assert f"{module.__name__}.ORPOTrainer.concatenated_forward" in logitless.audit()["integrations"]["trl"][
            "left_to_trl"]  # fmt: skip
    finally:
        if saved is None:
            del sys.modules[module.__name__]
        else:
            sys.modules[module.__name__] = saved


def _methods(path: Path, class_name: str) -> dict[str, str]:
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {m.name: "".join(lines[(m.decorator_list[0] if m.decorator_list else m).lineno - 1: m.end_lineno])
                    for m in node.body if isinstance(m, ast.FunctionDef)}  # fmt: skip
    raise AssertionError(f"no {class_name} in {path}")


@pytest.mark.parametrize("version", ["0.19.1", "0.24.0", "1.5.1", "1.14.2", "1.15.0"])
@pytest.mark.parametrize("kind", ["orpo", "cpo"])
def test_known_releases(kind: str, version: str) -> None:
    """Two versions of the three methods: TRL 0.19 to 0.24 (``label_pad_token_id`` configurable) and 1.5 to 1.16
    (-100); each release unpacked by ``make test`` is one of them."""
    found = list((LEGACY / f"trl-{version}").glob(f"trl/**/{kind}_trainer.py"))
    if not found:
        pytest.skip(f"TRL {version}'s source is not unpacked (make test unpacks it)")
    class_name = f"{kind.upper()}Trainer"
    methods = _methods(found[0], class_name)
    digests = tuple(source_digest(methods[name]) for name in trl_odds._METHODS)
    assert digests in trl_odds._KNOWN[class_name]
    # One changed token is another release.
    changed = methods["get_batch_logps"].replace("-100", "-101", 1).replace("label_pad_token_id", "pad_id", 1)
    assert (digests[0], source_digest(changed), digests[2]) not in trl_odds._KNOWN[class_name]
