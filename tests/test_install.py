"""The installer (docs/spec.md §3): hook, tiers, audit, uninstall, and every way a patch must fall back to stock.

References are stock transformers (logitless uninstalled) in the same process. Tests of the Rust rewriter
(tier 2) are parametrised next to a tier-1 hand-written forward.
"""

from __future__ import annotations

import importlib
import inspect
import json
import linecache
import os
import re
import subprocess
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM, Trainer, TrainingArguments
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

import _tiny_lm as tiny
import logitless
from logitless import _registry, _runtime, _versions
from logitless._hook import ModelingImportHook
from logitless._patching import PatchError, build_forward, forget_source
from logitless._source import forward_source

li = importlib.import_module("logitless.installer")
LLAMA_KEY = f"{LlamaForCausalLM.__module__}.LlamaForCausalLM"
STOCK_LLAMA_FORWARD = LlamaForCausalLM.__dict__["forward"]


def fused_llama_forward(
    self: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    **kwargs: Any,
) -> CausalLMOutputWithPast:
    """Tier 1: a hand-written fused LlamaForCausalLM.forward (what register_canonical is for)."""
    outputs = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **kwargs,
    )
    hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    loss = None
    if labels is not None and _runtime.fusable(self, self.lm_head):
        loss = _runtime.hf_loss(hidden, self.lm_head, labels, vocab_size=self.config.vocab_size, **kwargs)
        logits = _runtime.no_logits(hidden, self.lm_head)
    else:
        logits = self.lm_head(hidden)
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


class ResearchLM(LlamaForCausalLM):
    """A user's own subclass with its own forward (a name install() does not take as a language-model head)."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


STOCK_RESEARCH_FORWARD = ResearchLM.__dict__["forward"]


@pytest.fixture(autouse=True)
def _clean_world(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    logitless.uninstall()
    monkeypatch.setattr(li, "_canonical", {})  # registrations made by a test end with it
    with tiny.one_thread():
        yield
    logitless.uninstall()
    assert LlamaForCausalLM.__dict__["forward"] is STOCK_LLAMA_FORWARD
    assert ResearchLM.__dict__["forward"] is STOCK_RESEARCH_FORWARD


@pytest.fixture(params=["tier1", "tier2"])
def tier(request: pytest.FixtureRequest) -> int:
    """Install logitless with LlamaForCausalLM patched by the given tier; returns the tier number."""
    if request.param == "tier1":
        logitless.register_canonical(li.canonical_hash(STOCK_LLAMA_FORWARD), fused_llama_forward)
    logitless.install()
    record = logitless.audit()["classes"][LLAMA_KEY]
    expected = 1 if request.param == "tier1" else 2
    assert record["status"] == "patched" and record["tier"] == expected, record
    return expected


def _batch(seed: int = 5) -> dict[str, torch.Tensor]:
    return tiny.collate(tiny.random_examples(3, padded=True, seed=seed))


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, Any]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, out


def _stock_reference(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, Any]:
    with _uninstalled():
        return _loss_and_grads(model, batch)


class _uninstalled:
    """Run stock transformers for a moment by swapping the stock forward back in (the audit stays as is)."""

    def __enter__(self) -> None:
        self._saved = LlamaForCausalLM.__dict__["forward"]
        LlamaForCausalLM.forward = STOCK_LLAMA_FORWARD

    def __exit__(self, *exc: object) -> None:
        LlamaForCausalLM.forward = self._saved


def test_fused_loss_and_grads_match_stock(tier: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model, batch = tiny.build("llama"), _batch()
    ref_loss, ref_grads, ref_out = _stock_reference(model, batch)
    counter = tiny.fused_forward_counter(monkeypatch)
    loss, grads, out = _loss_and_grads(model, batch)
    assert counter.calls == 1 and out.logits.shape == (*batch["input_ids"].shape, 0)
    assert ref_out.logits.shape[-1] == tiny.VOCAB
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_custom_loss_function_keeps_original_path(tier: int, monkeypatch: pytest.MonkeyPatch) -> None:
    def doubled(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs: Any) -> torch.Tensor:
        return 2.0 * ForCausalLMLoss(logits, labels, vocab_size, **kwargs)

    model, batch = tiny.build("llama"), _batch()
    model.loss_function = doubled
    ref_loss, _, _ = _stock_reference(model, batch)
    counter = tiny.fused_forward_counter(monkeypatch)
    loss, _, out = _loss_and_grads(model, batch)
    assert counter.calls == 0 and out.logits.shape[-1] == tiny.VOCAB
    assert torch.equal(loss, ref_loss)
    # Sanity: the custom loss is in effect (twice the stock loss), so the comparison above means something.
    del model._loss_function
    assert torch.allclose(ref_loss, 2.0 * model(**batch).loss.detach(), rtol=1e-6)


def test_masked_lm_loss_type_fused_only_by_a_rewrite(tier: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``loss_type = "ForMaskedLM"`` (T5Gemma's): the rewritten forward hands ``hf_loss`` that loss function and
    fuses it unshifted; a hand-written tier-1 forward does not say which loss it mirrors, so the stock path runs.
    Either way the loss equals stock's ForMaskedLMLoss, not the causal loss."""
    model, batch = tiny.build("llama"), _batch()
    model.loss_type = "ForMaskedLM"
    ref_loss, ref_grads, _ = _stock_reference(model, batch)
    counter = tiny.fused_forward_counter(monkeypatch)
    loss, grads, out = _loss_and_grads(model, batch)
    assert counter.calls == (1 if tier == 2 else 0)
    if tier == 1:
        assert logitless.audit()["runtime"]["stock"] == {"custom-loss": 1}
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Sanity: the unshifted loss differs from the causal one, so the comparison above means something.
    del model.loss_type
    model.loss_type = "ForCausalLM"
    assert not torch.allclose(ref_loss, _stock_reference(model, batch)[0], rtol=1e-3)


class _ScaledHead(torch.nn.Module):
    def __init__(self, inner: torch.nn.Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.inner(x)


def test_non_linear_head_keeps_original_path(tier: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model, batch = tiny.build("llama"), _batch()
    model.lm_head = _ScaledHead(model.lm_head)
    ref_loss, ref_grads, _ = _stock_reference(model, batch)
    counter = tiny.fused_forward_counter(monkeypatch)
    loss, grads, out = _loss_and_grads(model, batch)
    assert counter.calls == 0 and out.logits.shape[-1] == tiny.VOCAB
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)


def test_inference_path_untouched(tier: int) -> None:
    model, batch = tiny.build("llama").eval(), _batch()
    with torch.no_grad():
        with _uninstalled():
            ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(got, ref)


def test_uninstall_restores_every_original(tier: int) -> None:
    patched = {cls: record.original for cls, record in _registry.patched.items()}
    assert LlamaForCausalLM in patched
    filenames = [r.filename for r in _registry.patched.values() if r.filename]
    logitless.uninstall()
    for cls, original in patched.items():
        assert cls.__dict__["forward"] is original, cls
    assert not any(isinstance(f, ModelingImportHook) for f in sys.meta_path)
    assert all(name not in linecache.cache for name in filenames)
    assert "__logitless__" not in vars(sys.modules[LlamaForCausalLM.__module__])
    assert logitless.audit()["classes"] == {} and not logitless.audit()["installed"]
    model, batch = tiny.build("llama"), _batch()
    assert model(**batch).logits.shape[-1] == tiny.VOCAB


def test_install_is_idempotent_and_thread_safe(tier: int) -> None:
    forward = LlamaForCausalLM.__dict__["forward"]
    logitless.uninstall()
    threads = [threading.Thread(target=logitless.install) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logitless.install()
    # One hook per pattern (transformers modeling modules, its remote-code loader, TRL modules, transformers.trainer),
    # however many installs raced.
    hooks = [f for f in sys.meta_path if isinstance(f, ModelingImportHook)]
    assert sorted(h.pattern.pattern for h in hooks) == sorted({h.pattern.pattern for h in hooks}) and len(hooks) == 4
    assert logitless.audit()["classes"][LLAMA_KEY]["status"] == "patched"
    if tier == 1:
        assert LlamaForCausalLM.__dict__["forward"] is forward
    assert _registry.patched[LlamaForCausalLM].original is STOCK_LLAMA_FORWARD


def test_signature_seen_by_trainer_is_stock(tier: int, tmp_path: Any) -> None:
    params = inspect.signature(LlamaForCausalLM.forward).parameters
    stock_params = inspect.signature(STOCK_LLAMA_FORWARD).parameters
    assert [(p.name, p.kind, p.default) for p in params.values()] == [
        (p.name, p.kind, p.default) for p in stock_params.values()
    ]
    if tier == 2:  # compiled from the stock def line: annotations included
        assert inspect.signature(LlamaForCausalLM.forward) == inspect.signature(STOCK_LLAMA_FORWARD)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = Trainer(model=tiny.build("llama"), args=args)
    trainer._set_signature_columns_if_needed()
    assert "labels" in trainer._signature_columns and "input_ids" in trainer._signature_columns
    assert trainer.model_accepts_loss_kwargs  # **kwargs kept: num_items_in_batch reaches the loss


def test_patch_built_model(monkeypatch: pytest.MonkeyPatch) -> None:
    logitless.register_canonical(li.canonical_hash(STOCK_LLAMA_FORWARD), fused_llama_forward)
    model = tiny.build("llama")
    assert not any(isinstance(f, ModelingImportHook) for f in sys.meta_path)
    assert logitless.patch(model) is model
    assert LlamaForCausalLM.__dict__["forward"] is fused_llama_forward
    counter = tiny.fused_forward_counter(monkeypatch)
    assert model(**_batch()).logits.shape[-1] == 0 and counter.calls == 1


def test_patch_takes_the_class_a_model_runs_whatever_its_name() -> None:
    """install() patches classes by name; patch(model) also patches the class whose forward the model runs."""
    model = ResearchLM(tiny.build("llama").config).float()
    model.load_state_dict(tiny.build("llama").state_dict())
    batch = _batch()
    stock = _loss_and_grads(model, batch)
    logitless.install()
    assert ResearchLM.__dict__["forward"] is STOCK_RESEARCH_FORWARD  # not a language-model head's name
    key = f"{ResearchLM.__module__}.ResearchLM"
    assert logitless.patch(model) is model
    assert logitless.audit()["classes"][key]["status"] == "patched"
    fused = _loss_and_grads(model, batch)
    assert fused[2].logits.shape[-1] == 0
    assert logitless.audit()["classes"][key]["runtime"] == {"fused": 1, "stock": {}}
    torch.testing.assert_close(fused[0], stock[0], rtol=1e-6, atol=0)
    for name, grad in stock[1].items():
        torch.testing.assert_close(fused[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_patch_peft_model_patches_its_base_class(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig, get_peft_model

    logitless.register_canonical(li.canonical_hash(STOCK_LLAMA_FORWARD), fused_llama_forward)
    peft_model = get_peft_model(tiny.build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert logitless.patch(peft_model) is peft_model
    assert logitless.audit()["classes"][LLAMA_KEY]["status"] == "patched"
    counter = tiny.fused_forward_counter(monkeypatch)
    assert peft_model(**_batch()).logits.shape[-1] == 0 and counter.calls == 1


@pytest.mark.parametrize(
    ("package", "version", "floor"), [("transformers", "4.55.4", "4.56"), ("torch", "2.5.1+cu124", "2.6")]
)
def test_a_release_below_the_floor_warns_and_patches_nothing(
    monkeypatch: pytest.MonkeyPatch, package: str, version: str, floor: str
) -> None:
    """torch 2.4 failed inside the op's registration on the first fused forward (found by running it); below the
    floors nothing is patched and the script runs stock."""
    real = _versions.installed
    monkeypatch.setattr(_versions, "installed", lambda name: version if name == package else real(name))
    with pytest.warns(RuntimeWarning, match=rf"{package} >= {floor}; found {re.escape(version)}"):
        logitless.install()
    report = logitless.audit()
    assert not report["installed"] and report["classes"] == {}
    assert report["unsupported"] == f"logitless supports {package} >= {floor}; found {version}"
    assert not any(isinstance(f, ModelingImportHook) for f in sys.meta_path)
    assert LlamaForCausalLM.__dict__["forward"] is STOCK_LLAMA_FORWARD
    model = tiny.build("llama")
    with pytest.warns(RuntimeWarning, match=package):
        assert logitless.patch(model) is model
    assert LlamaForCausalLM.__dict__["forward"] is STOCK_LLAMA_FORWARD
    monkeypatch.setattr(_versions, "installed", real)
    logitless.install()
    assert logitless.audit()["installed"] and logitless.audit()["unsupported"] is None


@pytest.mark.parametrize(
    ("version", "parsed"), [("2.6.0", (2, 6)), ("2.7.0a0+git1234", (2, 7)), ("10.12.1+cu130", (10, 12)), ("dev", None)]
)
def test_versions_parse_major_and_minor(version: str, parsed: tuple[int, int] | None) -> None:
    assert _versions.parse(version) == parsed


def test_the_op_on_an_old_torch_is_an_import_error_naming_the_floor() -> None:
    """In a child process (the op's module registers custom ops once per process), with torch claiming 2.5."""
    code = "import torch; torch.__version__ = '2.5.1'; import logitless.ops"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "ImportError: logitless supports torch >= 2.6; found 2.5.1" in done.stderr


def test_register_canonical_validates() -> None:
    with pytest.raises(ValueError, match="sha256"):
        logitless.register_canonical("abc", fused_llama_forward)
    with pytest.raises(TypeError):
        logitless.register_canonical("0" * 64, 42)  # type: ignore[arg-type]


def test_canonical_with_wrong_signature_is_failed_not_patched() -> None:
    def forward(self: Any, input_ids: torch.Tensor) -> None:  # no labels: would break Trainer
        raise AssertionError("must not be installed")

    logitless.register_canonical(li.canonical_hash(STOCK_LLAMA_FORWARD), forward)
    logitless.install()
    record = logitless.audit()["classes"][LLAMA_KEY]
    assert record["status"] == "failed" and record["code"] == "signature-mismatch", record
    assert LlamaForCausalLM.__dict__["forward"] is STOCK_LLAMA_FORWARD


# --- broken rewrites: simulated by replacing the rewriter's answer --------------------------------------------------


def _rewrite_returning(source_of: Any) -> Any:
    def rewrite(source: str) -> dict[str, Any]:
        return {"status": "patched", "source": source_of(source), "head": "lm_head", "epilogue": []}

    return rewrite


@pytest.mark.parametrize(
    ("mutate", "code", "words"),
    [
        (lambda s: s + "\n    def broken(:\n", "compile-error", "does not compile"),
        (lambda s: s.replace("loss = None", "loss = undefined_helper()", 1), "unresolved-global", "undefined_helper"),
        (lambda s: s.replace("loss = None", "loss = __logitless__.bogus()", 1), "unresolved-global", "bogus"),
        (lambda s: s.replace("def forward(", "def not_forward(", 1), "unresolved-global", "forward"),
        (
            lambda s: s.replace("\n    use_cache:", "\n    extra_flag: bool = False,\n    use_cache:", 1),
            "signature-mismatch",
            "extra_flag",
        ),
    ],
    ids=["syntax", "unknown-global", "unknown-runtime-attr", "wrong-name", "signature"],
)
def test_broken_rewrite_keeps_original(
    mutate: Any, code: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module_globals = vars(sys.modules[LlamaForCausalLM.__module__])
    monkeypatch.setattr(li, "_rewrite", _rewrite_returning(mutate))
    before = set(linecache.cache)
    logitless.install()
    record = logitless.audit()["classes"][LLAMA_KEY]
    assert record["status"] == "failed" and record["code"] == code and words in record["error"], record
    assert LlamaForCausalLM.__dict__["forward"] is STOCK_LLAMA_FORWARD
    assert "__logitless__" not in module_globals
    # Llama's broken rewrite left no source behind. (Other imported classes whose forward the mutation leaves
    # valid, e.g. BLIP-2's, which Granite Speech imports, are patched with their stock source: not this test's.)
    assert not [k for k in set(linecache.cache) - before if k.startswith(f"<logitless-rewrite:{LLAMA_KEY}.")]
    json.dumps(logitless.audit())


def test_rewriter_crash_is_a_refusal_not_an_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Rust panic reaches Python as RuntimeError (errors.rs); the class keeps its stock forward."""
    from logitless import _core

    def crash(source: str) -> dict[str, Any]:
        raise RuntimeError("logitless internal error (please report): boom")

    monkeypatch.setattr(_core, "rewrite_forward", crash)
    logitless.install()
    record = logitless.audit()["classes"][LLAMA_KEY]
    assert (record["status"], record["code"]) == ("refused", "rewriter-error") and "boom" in record["reason"]
    assert LlamaForCausalLM.__dict__["forward"] is STOCK_LLAMA_FORWARD


def test_missing_output_class_is_supplied_and_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    # modeling_llama does not import CausalLMOutputWithCrossAttentions; the installer supplies transformers' own.
    name = "CausalLMOutputWithCrossAttentions"
    module_globals = vars(sys.modules[LlamaForCausalLM.__module__])
    assert name not in module_globals
    monkeypatch.setattr(
        li, "_rewrite", _rewrite_returning(lambda s: s.replace("return CausalLMOutputWithPast(", f"return {name}(", 1))
    )
    logitless.install()
    assert logitless.audit()["classes"][LLAMA_KEY]["status"] == "patched"
    out = tiny.build("llama")(**_batch())
    assert type(out).__name__ == name
    logitless.uninstall()
    assert name not in module_globals and "__logitless__" not in module_globals


def test_env_return_logits_and_json_safe_audit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGITLESS_RETURN_LOGITS", "1")
    logitless.install()
    report = logitless.audit()
    assert report["return_logits"] and report["installed"]
    assert json.loads(json.dumps(report)) == report
    monkeypatch.delenv("LOGITLESS_RETURN_LOGITS")
    logitless.uninstall()
    logitless.install()
    assert not logitless.audit()["return_logits"]


def test_refusal_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    reason = "labels branch computes more than the loss"
    refusal = {"status": "refused", "code": "aux-loss", "reason": reason, "line": 7}
    monkeypatch.setattr(li, "_rewrite", lambda source: dict(refusal))
    logitless.install()
    record = logitless.audit()["classes"][LLAMA_KEY]
    assert record == {"status": "refused", "code": "aux-loss", "reason": refusal["reason"], "line": 7}
    assert LlamaForCausalLM.__dict__["forward"] is STOCK_LLAMA_FORWARD


# --- tier 2 specifics -----------------------------------------------------------------------------------------------


def test_rewritten_forward_is_inspectable_and_traceback_shows_it() -> None:
    logitless.install()
    record = logitless.audit()["classes"][LLAMA_KEY]
    assert record["status"] == "patched" and record["tier"] == 2, record
    source = inspect.getsource(LlamaForCausalLM.forward)
    assert "__logitless__.hf_loss(" in source and "__logitless__.fusable(" in source
    assert LlamaForCausalLM.forward.__qualname__ == STOCK_LLAMA_FORWARD.__qualname__
    assert LlamaForCausalLM.forward.__doc__ == STOCK_LLAMA_FORWARD.__doc__

    model, batch = tiny.build("llama"), _batch()
    batch["labels"][0, 2] = tiny.VOCAB + 7  # out of range: the fused op raises ValueError
    with pytest.raises(ValueError) as excinfo:
        model(**batch)
    frames = traceback.extract_tb(excinfo.value.__traceback__)
    rewritten = [f for f in frames if f.filename == record["source_file"]]
    assert rewritten and "__logitless__.hf_loss(" in (rewritten[-1].line or ""), frames


def test_return_logits_keeps_real_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batch = tiny.build("llama"), _batch()
    ref = model(**batch)
    logitless.install(return_logits=True)
    counter = tiny.fused_forward_counter(monkeypatch)
    out = model(**batch)
    assert counter.calls == 1 and logitless.audit()["return_logits"]
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    logitless.uninstall()
    logitless.install()
    assert model(**batch).logits.shape[-1] == 0 and not logitless.audit()["return_logits"]


class _Base(torch.nn.Module):
    def forward(self, x: int, labels: Any = None) -> int:
        return x + 1


class _Child(_Base):
    def forward(self, x: int, labels: Any = None) -> int:
        return super().forward(x) * 2  # zero-argument super(): the forward has a __class__ closure cell


def test_closure_of_original_is_reproduced() -> None:
    original = _Child.__dict__["forward"]
    assert original.__code__.co_freevars == ("__class__",)
    source = forward_source(original).replace("* 2", "* 3")
    forward, filename, added = build_forward(_Child, original, source)
    try:
        assert forward(_Child(), 1) == 6
        assert forward.__qualname__ == original.__qualname__
        assert "* 3" in inspect.getsource(forward)
    finally:
        forget_source(filename)
        for name in added:
            globals().pop(name, None)


def test_unbound_closure_is_refused() -> None:
    def make() -> Any:
        def forward(self: Any, labels: Any = None) -> Any:
            return late

        return forward
        late = 1  # noqa: F841 - never runs, but makes `late` a closure cell that stays empty

    original = make()
    with pytest.raises(PatchError) as excinfo:
        build_forward(_Child, original, textwrap.dedent(inspect.getsource(original)))
    assert excinfo.value.code == "closure"


def test_env_install_imports_neither_torch_nor_transformers() -> None:
    script = (
        "import sys, logitless; assert logitless.audit()['installed']; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    env = {**os.environ, "LOGITLESS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_hook_patches_modules_imported_later() -> None:
    # A fresh interpreter: LOGITLESS=1 installs at import; Qwen2 is reached only through transformers' lazy Auto path.
    script = textwrap.dedent(
        """
        import json, sys
        import logitless, torch, transformers
        name = "transformers.models.qwen2.modeling_qwen2"
        assert name not in sys.modules
        config = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2)
        model = transformers.AutoModelForCausalLM.from_config(config)
        ids = torch.randint(0, 128, (1, 8))
        out = model(input_ids=ids, labels=ids)
        import inspect
        assert "class Qwen2Model" in inspect.getsource(sys.modules[name].Qwen2Model)  # loader wrapper delegates
        print(json.dumps({"audit": logitless.audit(), "logits": list(out.logits.shape), "loss": out.loss.item(),
                          "loader": type(sys.modules[name].__spec__.loader).__name__}))
        """
    )
    env = {**os.environ, "LOGITLESS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    record = result["audit"]["classes"]["transformers.models.qwen2.modeling_qwen2.Qwen2ForCausalLM"]
    assert record["status"] == "patched" and record["tier"] == 2, record
    assert result["logits"] == [1, 8, 0] and result["loss"] > 0
    assert result["audit"]["installed"]
