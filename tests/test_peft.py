"""PEFT's head wrappers (``modules_to_save``, trainable tokens on a tied head) fused exactly, against stock
transformers + PEFT on identical weights; what PEFT does that the fused path cannot reproduce keeps the stock path,
counted with its reason.

Every comparison runs the same model twice: stock (logitless not installed), then with ``logitless.install()``,
and compares the loss and every parameter gradient. Each fused case also asserts it was fused (empty logits, the
runtime count), so a silent fallback to stock cannot pass as a match.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import _tiny_lm as tiny
import logitless
from logitless import _peft

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer  # noqa: E402
from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper  # noqa: E402

TOKENS = [3, 5, 7, 200]


pytestmark = pytest.mark.usefixtures("stock_world")


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tiny.VOCAB, (2, 12), generator=g)
    ids[1, 2:6] = torch.tensor(TOKENS)  # the trainable tokens occur as targets
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels}


def _run(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor], int]:
    model.zero_grad(set_to_none=True)
    out = model(**_batch())
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), grads, out.logits.shape[-1]


def _compare(build: Callable[[], torch.nn.Module], *, fused: bool, reason: str | None = None) -> dict[str, Any]:
    """Stock, then installed, on a freshly built (identical) model; returns the installed run's runtime counts."""
    stock = _run(build())
    assert stock[2] == tiny.VOCAB
    logitless.install()
    ours = _run(build())
    assert math.isclose(ours[0], stock[0], rel_tol=1e-6), (ours[0], stock[0])
    assert ours[1].keys() == stock[1].keys()
    for name, reference in stock[1].items():
        # verify's criterion: within 1e-5 of the gradient's largest entry (perturbed rows make entries large)
        assert (ours[1][name] - reference).abs().max() <= 1e-5 * reference.abs().max(), name
    runtime = logitless.audit()["runtime"]
    if fused:
        assert ours[2] == 0 and runtime == {"fused": 1, "stock": {}}
    else:
        assert ours[2] == tiny.VOCAB and runtime == {"fused": 0, "stock": {reason: 1}}
    return runtime


def _perturb(model: torch.nn.Module, *names: str) -> torch.nn.Module:
    """Move trainable adapter weights off their initial values (copies of the base, zero deltas), so that a fused
    path reading the wrong module or dropping the adapter's rows would show."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.add_(torch.randn(p.shape, generator=g))
    return model


def _modules_to_save(**config: Any) -> torch.nn.Module:
    lora = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], **config)
    return _perturb(get_peft_model(tiny.build("llama"), lora), "modules_to_save")


def _tied(name: str = "llama") -> torch.nn.Module:
    cls, config = tiny._configs()[name]
    config = type(config)(**{**config.to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(0)
    return cls(config)


def _trainable_tokens(name: str = "llama") -> torch.nn.Module:
    lora = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=TOKENS)
    return _perturb(get_peft_model(_tied(name), lora), "trainable_tokens_delta")


# --- modules_to_save ---------------------------------------------------------------------------------------------


def test_modules_to_save_head_is_fused_with_the_trained_copy() -> None:
    model = _modules_to_save()
    assert type(model.base_model.model.lm_head) is ModulesToSaveWrapper
    _compare(_modules_to_save, fused=True)


def test_modules_to_save_with_adapters_disabled_uses_the_original_head() -> None:
    def build() -> torch.nn.Module:
        model = _modules_to_save()
        model.base_model.disable_adapter_layers()  # also freezes every adapter: let the original head learn
        model.base_model.model.lm_head.original_module.weight.requires_grad_(True)
        return model

    # The copy was perturbed: a fused path reading it instead of the original would differ from stock.
    _compare(build, fused=True)


def test_modules_to_save_follows_the_active_adapter() -> None:
    def build() -> torch.nn.Module:
        model = _modules_to_save()
        model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        _perturb(model, "modules_to_save.other")
        model.set_adapter("other")
        return model

    _compare(build, fused=True)


def test_modules_to_save_around_a_softcapped_head() -> None:
    def build() -> torch.nn.Module:
        lora = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
        return _perturb(get_peft_model(tiny.build("gemma3"), lora), "modules_to_save")

    _compare(build, fused=True)


def test_a_hook_on_the_wrapper_or_its_copy_keeps_the_stock_path() -> None:
    def on_wrapper() -> torch.nn.Module:
        model = _modules_to_save()
        model.base_model.model.lm_head.register_forward_hook(lambda m, i, o: o * 0.5)
        return model

    def on_copy() -> torch.nn.Module:
        model = _modules_to_save()
        model.base_model.model.lm_head.modules_to_save["default"].register_forward_pre_hook(lambda m, i: (i[0] * 2,))
        return model

    _compare(on_wrapper, fused=False, reason="hooked-head")
    logitless.uninstall()
    _compare(on_copy, fused=False, reason="hooked-head")


# --- trainable tokens on a tied head -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_trainable_tokens_on_a_tied_head_are_fused_with_their_rows(name: str) -> None:
    model = _trainable_tokens(name)
    head = model.base_model.model.lm_head
    assert type(head) is TrainableTokensWrapper and type(head.token_adapter) is TrainableTokensLayer
    _compare(lambda: _trainable_tokens(name), fused=True)


def test_trainable_tokens_disabled_or_merged_use_the_base_layer() -> None:
    # Neither forward uses a trainable parameter: let the (tied) base weight learn.
    def disabled() -> torch.nn.Module:
        model = _trainable_tokens()
        model.base_model.disable_adapter_layers()
        model.base_model.model.lm_head.token_adapter.base_layer.weight.requires_grad_(True)
        return model

    def merged() -> torch.nn.Module:
        model = _trainable_tokens()
        model.base_model.merge_adapter()
        model.base_model.model.lm_head.token_adapter.base_layer.weight.requires_grad_(True)
        return model

    _compare(disabled, fused=True)
    logitless.uninstall()
    _compare(merged, fused=True)


def test_trainable_tokens_disabled_while_merged_keep_the_stock_path() -> None:
    # PEFT's forward unmerges the base weight in this state: a side effect the fused path would skip.
    def build() -> torch.nn.Module:
        model = _trainable_tokens()
        model.base_model.merge_adapter()
        model.base_model.disable_adapter_layers()
        model.base_model.model.lm_head.token_adapter.base_layer.weight.requires_grad_(True)
        return model

    _compare(build, fused=False, reason="peft-merged")


def test_trainable_tokens_with_a_hooked_base_layer_keep_the_stock_path() -> None:
    # PEFT reads the base layer's weight without calling it, so the hook never runs in stock; a hook (or an engine)
    # on that layer may still manage the weight, so the fused path does not read it either.
    def build() -> torch.nn.Module:
        model = _trainable_tokens()
        model.base_model.model.lm_head.token_adapter.base_layer.register_forward_pre_hook(lambda m, i: None)
        return model

    _compare(build, fused=False, reason="peft-tokens-layout")


# --- what is not reduced -----------------------------------------------------------------------------------------


def _lora_head(**config: Any) -> torch.nn.Module:
    """LoRA on the head beside q_proj, its B matrices moved off zero (else the term adds nothing)."""
    lora = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], **config)
    return _perturb(get_peft_model(tiny.build("llama"), lora), "lora_B")


@pytest.mark.parametrize("config", [{}, {"lora_alpha": 16, "use_rslora": True}, {"lora_dropout": 0.25}],
                         ids=["plain", "rslora", "dropout"])  # fmt: skip
def test_lora_on_the_head_is_fused_with_its_low_rank_term(config: dict[str, Any]) -> None:
    """Every gradient equal to stock's, the head's A and B included; with dropout, the same mask (the fused path
    draws it as PEFT's forward does)."""
    _compare(lambda: _lora_head(**config), fused=True)


def test_lora_on_the_head_in_eval_mode_returns_stock_logits() -> None:
    def run() -> Any:
        with torch.no_grad():
            return _lora_head().eval()(**_batch())

    stock = run()
    logitless.install()
    ours = run()
    assert torch.equal(ours.logits, stock.logits) and torch.equal(ours.loss, stock.loss)
    assert logitless.audit()["runtime"] == {"fused": 0, "stock": {"eval-mode": 1}}


def test_lora_on_the_head_with_two_active_adapters() -> None:
    def build() -> torch.nn.Module:
        model = _lora_head()
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"]))
        model.base_model.set_adapter(["default", "second"])
        return _perturb(model, "lora_B.second")

    _compare(build, fused=True)


def test_lora_on_the_head_disabled_or_merged_uses_the_base_layer() -> None:
    # Neither computes the adapters' terms, so the final norm is trained to have gradients to compare.
    def disabled() -> torch.nn.Module:
        model = _lora_head()
        model.base_model.disable_adapter_layers()
        model.base_model.model.model.norm.weight.requires_grad_(True)
        return model

    def merged() -> torch.nn.Module:
        model = _lora_head()
        model.base_model.merge_adapter()
        model.base_model.model.model.norm.weight.requires_grad_(True)
        return model

    _compare(disabled, fused=True)
    logitless.uninstall()
    _compare(merged, fused=True)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("dora", "peft-lora-variant"),
        ("lora_bias", "peft-lora-variant"),
        ("trained_head", "peft-lora-trained-head"),
        ("hooked_b", "peft-lora-layout"),
        ("hooked_base", "hooked-head"),
        ("disabled_while_merged", "peft-merged"),
    ],
)
def test_lora_on_the_head_that_is_not_reduced_keeps_the_stock_path(change: str, reason: str) -> None:
    def build() -> torch.nn.Module:
        config = {"use_dora": change == "dora", "lora_bias": change == "lora_bias"}
        model = _lora_head(**config)
        layer = model.base_model.model.lm_head
        if change == "trained_head":
            layer.base_layer.weight.requires_grad_(True)
        if change == "hooked_b":
            layer.lora_B["default"].register_forward_hook(lambda m, i, o: None)
        if change == "hooked_base":
            layer.base_layer.register_forward_pre_hook(lambda m, i: None)
        if change == "disabled_while_merged":  # the forward unmerges (a side effect): no adapter term, so norm trains
            layer.merge()
            model.base_model.disable_adapter_layers()
            model.base_model.model.model.norm.weight.requires_grad_(True)
        return model

    _compare(build, fused=False, reason=reason)


def test_lora_other_tuners_on_the_head_keep_the_stock_path() -> None:
    from peft import IA3Config

    def build() -> torch.nn.Module:
        config = IA3Config(target_modules=["q_proj", "lm_head"], feedforward_modules=[])
        return _perturb(get_peft_model(tiny.build("llama"), config), "ia3_l")

    _compare(build, fused=False, reason="peft-layer")


def test_changed_peft_code_keeps_the_stock_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PEFT whose deciding code differs from the reviewed one is not second-guessed: here a release that would
    route through the original head even with an adapter active."""

    def _forward_wrapped(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.original_module(*args, **kwargs)

    logitless.install()
    _modules_to_save()(**_batch())  # a fused forward hashes PEFT's reviewed code; the patch below must still be seen
    assert logitless.audit()["runtime"] == {"fused": 1, "stock": {}}
    logitless.uninstall()
    monkeypatch.setattr(ModulesToSaveWrapper, "_forward_wrapped", _forward_wrapped)
    _compare(_modules_to_save, fused=False, reason="peft-unverified")


def test_an_instance_override_keeps_the_stock_path() -> None:
    def build() -> torch.nn.Module:
        model = _modules_to_save()
        wrapper = model.base_model.model.lm_head
        wrapper._forward_wrapped_passthrough = lambda *a, **k: wrapper.original_module(*a, **k) * 2.0
        wrapper.enable_adapters(False)
        return model

    _compare(build, fused=False, reason="peft-unverified")


def test_the_installed_peft_is_the_reviewed_one() -> None:
    """If this fails after a PEFT upgrade, read the members in ``_peft._MEMBERS`` of the new release and, if their
    behaviour is unchanged (or ``_peft`` is updated to it), add the new hashes to ``_peft._REVIEWED``."""
    for cls in (ModulesToSaveWrapper, TrainableTokensWrapper, TrainableTokensLayer, LoraLinear):
        fingerprint = _peft._fingerprint(cls)
        assert fingerprint in _peft._REVIEWED[_peft._key(cls)], (peft.__version__, cls.__qualname__, fingerprint)


# --- training ----------------------------------------------------------------------------------------------------


def test_trainer_with_modules_to_save_matches_stock(tmp_path: Any) -> None:
    """HF Trainer, LoRA with a trained copy of the head: every logged loss and the final weights equal stock's."""

    def build() -> torch.nn.Module:
        torch.manual_seed(7)  # LoRA A matrices are random: the same in both runs
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], lora_dropout=0.0)
        return get_peft_model(tiny.build("llama"), lora)

    examples = tiny.random_examples(40)
    stock = tiny.train(build(), examples, output_dir=str(tmp_path / "stock"))
    logitless.install()
    fused = tiny.train(build(), examples, output_dir=str(tmp_path / "fused"))
    tiny.assert_runs_match(stock, fused)
    assert logitless.audit()["runtime"]["stock"] == {}
    assert logitless.audit()["runtime"]["fused"] > 0


@pytest.mark.parametrize("extra", [{}, {"label_smoothing_factor": 0.1}], ids=["plain", "smoothing-accumulation"])
def test_trainer_with_lora_on_the_head_matches_stock(extra: dict[str, Any], tmp_path: Any) -> None:
    """HF Trainer, LoRA on the head (its base frozen): every logged loss and the final weights equal stock's; with
    the Trainer's label smoothing too (its summed loss, §5) over accumulated micro-batches."""

    def build() -> torch.nn.Module:
        torch.manual_seed(7)
        lora = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0, init_lora_weights="gaussian")
        return get_peft_model(tiny.build("llama"), lora)

    examples = tiny.random_examples(80)
    accumulation = 2 if extra else 1
    stock = tiny.train(build(), examples, output_dir=str(tmp_path / "stock"), extra_args=extra, grad_accum=accumulation)
    logitless.install()
    fused = tiny.train(build(), examples, output_dir=str(tmp_path / "fused"), extra_args=extra, grad_accum=accumulation)
    tiny.assert_runs_match(stock, fused)
    audit = logitless.audit()
    assert audit["runtime"]["stock"] == {}
    assert audit["runtime"]["fused"] > 0
    if extra:
        assert audit["integrations"]["hf_trainer"]["calls"]["materialised"] == 0
        assert audit["integrations"]["hf_trainer"]["calls"]["fused"] > 0


def test_hf_loss_on_a_lora_head_against_float64() -> None:
    """The fused loss against a float64 materialised one, ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ``, with every gradient."""
    model = _lora_head(lora_alpha=12)
    head = model.base_model.model.lm_head
    lora_a, lora_b = head.lora_A["default"].weight, head.lora_B["default"].weight
    hidden = torch.randn(2, 12, 32, requires_grad=True)
    labels = _batch()["labels"]
    loss = logitless.hf_loss(hidden, head, labels, tiny.VOCAB)
    grads = torch.autograd.grad(loss, [hidden, lora_a, lora_b])

    h64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (hidden, lora_a, lora_b))
    weight = head.base_layer.weight.detach().double()
    logits = (h64 @ weight.T + head.scaling["default"] * (h64 @ a64.T) @ b64.T)[:, :-1].reshape(-1, tiny.VOCAB)
    reference = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    expected = torch.autograd.grad(reference, [h64, a64, b64])
    assert head.scaling["default"] == 3.0
    assert math.isclose(loss.item(), reference.item(), rel_tol=1e-6)
    for got, want in zip(grads, expected):
        assert want.abs().max() > 0
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_hf_loss_on_a_trainable_tokens_head_against_float64() -> None:
    """The fused loss against a float64 materialised one on PEFT's merged weight, gradients included."""
    model = _trainable_tokens()
    head = model.base_model.model.lm_head
    hidden = torch.randn(2, 12, 32, requires_grad=True)
    labels = _batch()["labels"]
    loss = logitless.hf_loss(hidden, head, labels, tiny.VOCAB)
    delta = head.token_adapter.trainable_tokens_delta["default"]
    d_hidden, d_delta = torch.autograd.grad(loss, [hidden, delta])

    h64 = hidden.detach().double().requires_grad_(True)
    delta64 = delta.detach().double().requires_grad_(True)
    weight = head.token_adapter.base_layer.weight.detach().double().index_copy(0, torch.tensor(TOKENS), delta64)
    logits = (h64 @ weight.T)[:, :-1].reshape(-1, tiny.VOCAB)
    reference = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    r_hidden, r_delta = torch.autograd.grad(reference, [h64, delta64])
    assert math.isclose(loss.item(), reference.item(), rel_tol=1e-6)
    torch.testing.assert_close(d_hidden.double(), r_hidden, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d_delta.double(), r_delta, rtol=1e-5, atol=1e-7)
    assert d_delta.abs().sum() > 0  # the trainable rows are targets in this batch
