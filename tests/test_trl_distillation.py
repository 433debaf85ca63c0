"""TRL's DistillationTrainer through logitless (``logitless.integrations.trl_distillation``): the divergence against
a float64 reference computed from each model's own stock logits (so each class's epilogue is whatever its forward
does, not what either implementation believes), and whole trainer runs against TRL's own kernel."""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import pytest
import torch

import _tiny_lm as tiny
import logitless

trl = pytest.importorskip("trl")
distillation = pytest.importorskip("trl.trainer.distillation_trainer")
if not hasattr(distillation, "_chunked_divergence_loss"):  # pragma: no cover - TRL < 1.16 has no such trainer
    pytest.skip("this TRL has no DistillationTrainer divergence", allow_module_level=True)

from logitless.integrations import trl_distillation as drop_in  # noqa: E402 - after the TRL checks
from ops_reference import divergence64  # noqa: E402
from _trl_runs import _training_args, _word_tokenizer, _words  # noqa: E402

pytestmark = pytest.mark.usefixtures("stock_world")

# TRL 1.14 passes its chunk size after beta; later releases take none. install() picks the drop-in that matches.
CHUNK_ARGS = (64,) if "chunk_size" in inspect.signature(distillation._chunked_divergence_loss).parameters else ()
DROP_IN = drop_in.chunked_divergence_loss_with_chunk_size if CHUNK_ARGS else drop_in.chunked_divergence_loss

VOCAB = tiny.VOCAB


def _recurrent_gemma(seed: int = 0, cap: float = 4.0) -> torch.nn.Module:
    # Soft-caps its logits at config.logits_soft_cap, a name TRL's guess does not read.
    import transformers

    config = transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        lru_width=32, attention_window_size=16, logits_soft_cap=cap, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.RecurrentGemmaForCausalLM(config)


def _build(name: str, seed: int = 0) -> torch.nn.Module:
    return _recurrent_gemma(seed) if name == "recurrent_gemma" else tiny.build(name, seed=seed)


# family -> what its forward does to the logits, read here from its config (independently of the rewriter)
EXPECTED = {
    "llama": lambda c: {},
    "gemma3": lambda c: {"logit_softcapping": c.final_logit_softcapping},
    "cohere": lambda c: {"logit_scale_multiply": c.logit_scale},
    "granite": lambda c: {"logit_scale_divide": c.logits_scaling},
    "gpt2": lambda c: {},
    "recurrent_gemma": lambda c: {"logit_softcapping": c.logits_soft_cap},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_class_epilogue_is_what_the_forward_applies(name: str) -> None:
    logitless.install()
    model = _build(name)
    assert drop_in.class_epilogue(model) == EXPECTED[name](model.config)


def test_class_epilogue_needs_the_rewritten_forward() -> None:
    assert drop_in.class_epilogue(tiny.build("gemma3")) == "class-not-rewritten"  # not installed


def test_a_local_bound_twice_is_not_resolved() -> None:
    def forward(self: Any, x: Any) -> Any:
        cap = self.config.a
        if x:
            cap = self.config.b
        return cap

    with pytest.raises(drop_in._Unresolved):
        drop_in._assigned_once(forward, "cap")

    def once(self: Any, x: Any) -> Any:
        cap = self.config.a
        return x / cap

    assert drop_in._resolve("cap", type("M", (), {"config": type("C", (), {"a": 3.5})})(), once) == 3.5


def _heads_and_logits(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states the model's head receives and the logits its stock forward returns (no labels)."""
    seen: dict[str, torch.Tensor] = {}
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    return seen["h"], logits


def _reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, beta: float,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    log_s = torch.log_softmax(student_logits.double() / temperature, -1)
    log_t = torch.log_softmax(teacher_logits.double() / temperature, -1)
    per = divergence64(log_s, log_t, beta)
    kept = mask.bool()
    entropy = -(log_s.exp() * log_s).sum(-1)
    return per[kept].sum() / kept.sum(), entropy[kept].sum()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_divergence_equals_the_reference_from_the_models_own_logits(name: str, beta: float) -> None:
    """Called as DistillationTrainer calls it (TRL's guessed scale and softcap included), inside its wrapped
    _compute_loss: the loss, entropy sum, count and the student's head gradient equal a float64 reference from both
    models' stock logits."""
    logitless.install()
    student, teacher = _build(name), _build(name, seed=5)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.rand(2, 9, generator=torch.Generator().manual_seed(3)) > 0.3
    h_s, logits_s = _heads_and_logits(student, ids)
    with torch.no_grad():
        h_t, logits_t = _heads_and_logits(teacher, ids)
    ref_loss, ref_entropy = _reference(logits_s, logits_t, mask, beta, temperature=0.8)
    (ref_grad,) = torch.autograd.grad(ref_loss, [student.get_output_embeddings().weight], retain_graph=True)
    guess = _trl_guess(student.config), _trl_guess(teacher.config)
    with drop_in._running(student, teacher):
        loss, entropy_sum, n_valid = drop_in.chunked_divergence_loss(
            h_s, h_t, student.get_output_embeddings().weight, teacher.get_output_embeddings().weight, mask.long(),
            beta, student_logit_scale=guess[0][0], teacher_logit_scale=guess[1][0],
            student_final_logit_softcapping=guess[0][1], teacher_final_logit_softcapping=guess[1][1], temperature=0.8,
        )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, [student.get_output_embeddings().weight])
    assert int(n_valid) == int(mask.sum())
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(entropy_sum.double(), ref_entropy.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert drop_in.CALLS == {"class_epilogue": 2, "trl_epilogue": 0}


def _trl_guess(config: Any) -> tuple[float, float | None]:
    """What TRL 1.16's DistillationTrainer._compute_loss reads for these configs (scale, softcap)."""
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = 1 / config.logits_scaling
    return (1.0 if scale is None else scale), getattr(config, "final_logit_softcapping", None)


def test_trls_guess_misses_recurrent_gemmas_softcap_and_logitless_corrects_it() -> None:
    """TRL's own kernel with its guess (no softcap) is off the reference by far more than rounding; logitless's
    call with the same arguments is on it, and audit() names the class it corrected."""
    trls = distillation._chunked_divergence_loss
    logitless.install()
    student, teacher = _recurrent_gemma(), _recurrent_gemma(seed=5)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    h_s, logits_s = _heads_and_logits(student, ids)
    with torch.no_grad():
        h_t, logits_t = _heads_and_logits(teacher, ids)
    ref_loss, _ = _reference(logits_s, logits_t, mask, 0.5, 1.0)
    args = (h_s.detach(), h_t, student.lm_head.weight, teacher.lm_head.weight, mask, 0.5, *CHUNK_ARGS)
    theirs, _, _ = trls(*args)
    with drop_in._running(student, teacher):
        ours, _, _ = distillation._chunked_divergence_loss(*args)  # logitless's under install()
    assert abs(float(theirs.detach()) - float(ref_loss)) > 1e-2 * float(ref_loss)
    assert math.isclose(float(ours.detach()), float(ref_loss), rel_tol=1e-5)
    corrected = logitless.audit()["integrations"]["trl"]["distillation"]["corrected"]
    assert corrected == {"transformers.models.recurrent_gemma.modeling_recurrent_gemma.RecurrentGemmaForCausalLM":
                         {"logit_softcapping": 4.0}}  # fmt: skip


def test_install_points_the_trainer_at_the_drop_in_and_uninstall_restores() -> None:
    original_loss = distillation._chunked_divergence_loss
    original_compute = distillation.DistillationTrainer.__dict__["_compute_loss"]
    logitless.install()
    assert distillation._chunked_divergence_loss is DROP_IN
    assert distillation.DistillationTrainer.__dict__["_compute_loss"].__logitless_wrapped__ is original_compute
    logitless.uninstall()
    assert distillation._chunked_divergence_loss is original_loss
    assert distillation.DistillationTrainer.__dict__["_compute_loss"] is original_compute


def test_a_divergence_of_another_signature_is_left_to_trl_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TRL release whose ``_chunked_divergence_loss`` takes arguments no drop-in takes keeps TRL's function (a
    drop-in called with them would fail, or read them wrongly), and a RuntimeWarning says so."""

    def _chunked_divergence_loss(student_hidden_states: Any, teacher_hidden_states: Any, student_lm_head: Any,
                                 teacher_lm_head: Any, completion_mask: Any, beta: float) -> Any:  # fmt: skip
        raise AssertionError("not called here")

    _chunked_divergence_loss.__module__ = distillation.__name__
    monkeypatch.setattr(distillation, "_chunked_divergence_loss", _chunked_divergence_loss)
    with pytest.warns(RuntimeWarning, match="_chunked_divergence_loss.*no drop-in of this logitless takes"):
        logitless.install()
    assert distillation._chunked_divergence_loss is _chunked_divergence_loss
    logitless.uninstall()
    assert distillation._chunked_divergence_loss is _chunked_divergence_loss


def _distillation_run(name: str, beta: float) -> list[dict[str, float]]:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": _words(g, 5)} for _ in range(8)]
    # RecurrentGemma's cache has no get_seq_length(), which generate() calls with a cache.
    generation = {"use_cache": False} if name == "recurrent_gemma" else None
    args = DistillationConfig(**_training_args(), max_completion_length=6, beta=beta, temperature=0.9,
                              gradient_checkpointing=False, generation_kwargs=generation)  # fmt: skip
    trainer = DistillationTrainer(model=_build(name), teacher_model=_build(name, seed=3), args=args,
                                  train_dataset=Dataset.from_list(rows),
                                  processing_class=_word_tokenizer())  # fmt: skip
    trainer.train()
    return [e for e in trainer.state.log_history if "grad_norm" in e]


def _compare(ours: list[dict[str, float]], reference: list[dict[str, float]]) -> None:
    assert len(ours) == len(reference) == 2
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        for key in ("loss", "grad_norm", "entropy"):
            assert math.isclose(a[key], b[key], rel_tol=2e-5, abs_tol=1e-7), (step, key, a[key], b[key])


@pytest.mark.parametrize(("name", "beta"), [("llama", 0.5), ("cohere", 1.0), ("granite", 0.0)])
def test_distillation_trainer_equals_trls_own_kernel(name: str, beta: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where TRL's guess is right, the trainer's losses, grad norms and entropies equal a run on TRL's own kernel,
    which logitless never calls; one class-epilogue call per model per step. TRL 1.14 does not read Granite's
    ``logits_scaling``: there the reference is TRL's kernel handed the divisor, and audit() names the correction."""
    trl_misses_the_scale = bool(CHUNK_ARGS) and name == "granite"
    if trl_misses_the_scale:
        original = distillation._chunked_divergence_loss
        scale = 1 / tiny.build(name).config.logits_scaling

        def with_the_scale(*args: Any, **kwargs: Any) -> Any:
            kwargs.update(student_logit_scale=scale, teacher_logit_scale=scale)
            return original(*args, **kwargs)

        monkeypatch.setattr(distillation, "_chunked_divergence_loss", with_the_scale)
    reference = _distillation_run(name, beta)
    monkeypatch.undo()

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("TRL's own divergence kernel was called")

    if CHUNK_ARGS:  # TRL 1.14: each chunk of its own loop
        monkeypatch.setattr(distillation, "_chunk", forbidden)
    else:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        monkeypatch.setattr(ChunkedDivergenceFunction, "apply", forbidden)
    logitless.install()
    ours = _distillation_run(name, beta)
    _compare(ours, reference)
    report = logitless.audit()["integrations"]["trl"]["distillation"]
    assert report["calls"] == {"class_epilogue": 4, "trl_epilogue": 0}
    assert report["unchecked"] == {}
    if trl_misses_the_scale:
        assert list(report["corrected"]) == ["transformers.models.granite.modeling_granite.GraniteForCausalLM"]
    else:
        assert report["corrected"] == {}


def test_distillation_trainer_on_recurrent_gemma_uses_its_softcap(monkeypatch: pytest.MonkeyPatch) -> None:
    """RecurrentGemma: the run equals one on TRL's own kernel handed the softcap its forward applies (TRL's guess
    leaves it out, and that run differs)."""
    original = distillation._chunked_divergence_loss
    stock = _distillation_run("recurrent_gemma", 0.5)

    def with_the_softcap(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(student_final_logit_softcapping=4.0, teacher_final_logit_softcapping=4.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(distillation, "_chunked_divergence_loss", with_the_softcap)
    reference = _distillation_run("recurrent_gemma", 0.5)
    monkeypatch.undo()
    logitless.install()
    ours = _distillation_run("recurrent_gemma", 0.5)
    _compare(ours, reference)
    assert not math.isclose(stock[0]["loss"], reference[0]["loss"], rel_tol=1e-2)


class _ScaledHead(torch.nn.Linear):
    """A head with its own forward (as Dory's learned per-token scale): more than its weight computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


def test_a_head_with_its_own_forward_keeps_trls_guess_with_a_warning() -> None:
    """The epilogue cannot be read off a head whose class computes more than ``x·Wᵀ``: TRL's guess is used (what
    TRL computes), once-per-class warning, counted in audit()."""
    logitless.install()
    student, teacher = tiny.build("llama"), tiny.build("llama", seed=5)
    old = student.lm_head
    student.lm_head = _ScaledHead(old.in_features, old.out_features, bias=False)
    student.lm_head.weight = old.weight
    assert drop_in.class_epilogue(student) == "head-not-plain-linear"
    h = torch.randn(2, 5, old.in_features)
    mask = torch.ones(2, 5, dtype=torch.long)
    with drop_in._running(student, teacher), pytest.warns(RuntimeWarning, match="could not be read"):
        loss, _, _ = drop_in.chunked_divergence_loss(h, h, student.lm_head.weight, teacher.lm_head.weight, mask, 0.0)
    with drop_in._running(student, teacher), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again, _, _ = drop_in.chunked_divergence_loss(h, h, student.lm_head.weight, teacher.lm_head.weight, mask, 0.0)
    assert float(loss.detach()) == float(again.detach())
    assert not [w for w in caught if "could not be read" in str(w.message)]  # once per class
    report = logitless.audit()["integrations"]["trl"]["distillation"]
    assert report["unchecked"] == {"transformers.models.llama.modeling_llama.LlamaForCausalLM": "head-not-plain-linear"}
    assert report["calls"] == {"class_epilogue": 2, "trl_epilogue": 2}


def _scales(source: str) -> Any:
    namespace: dict[str, Any] = {}
    exec(compile(source, "<forward>", "exec"), namespace)  # noqa: S102 - the forwards written just above
    forward = namespace["forward"]
    drop_in._function_tree.cache_clear()
    import inspect as _inspect
    from unittest import mock

    with mock.patch.object(_inspect, "getsource", lambda f: source):
        return drop_in._backbone_scales(forward, "lm_head", "model")


SCALES = {
    "direct": ("def forward(self, x):\n    outputs = self.model(x)\n    return self.lm_head(outputs.last_hidden_state)\n",
               []),
    "sliced local": ("def forward(self, x, k):\n    outputs: T = self.model(x)\n    h = outputs[0]\n"
                     "    h = slice_logits_to_keep(h, k)\n    return self.lm_head(h[:, 1:, :])\n", []),
    "scaled": ("def forward(self, x):\n    outputs = self.model(x)\n    h = outputs.last_hidden_state / self.c\n"
               "    h = h * 2\n    return self.lm_head(h)\n", [("divide", "self.c"), ("multiply", "2")]),
    "scaled in a branch": ("def forward(self, x):\n    outputs = self.model(x)\n    h = outputs.last_hidden_state\n"
                           "    if x:\n        h = h / self.c\n    return self.lm_head(h)\n", None),
    "normed": ("def forward(self, x):\n    outputs = self.model(x)\n    h = self.norm(outputs.last_hidden_state)\n"
               "    return self.lm_head(h)\n", None),
    "scaled by itself": ("def forward(self, x):\n    outputs = self.model(x)\n    h = outputs.last_hidden_state\n"
                         "    h = h / h.norm()\n    return self.lm_head(h)\n", None),
    "another backbone": ("def forward(self, x):\n    outputs = self.decoder(x)\n"
                         "    return self.lm_head(outputs.last_hidden_state)\n", None),
    "two heads": ("def forward(self, x):\n    outputs = self.model(x)\n    a = self.lm_head(outputs[0])\n"
                  "    return self.lm_head(outputs[0])\n", None),
}


@pytest.mark.parametrize("case", sorted(SCALES))
def test_the_head_input_is_read_back_to_the_backbone_output(case: str) -> None:
    """TRL hands the divergence the backbone's last hidden state: the class's epilogue is used only where the
    head's input is that, up to slices and unconditional scalings (folded into the epilogue)."""
    import ast

    source, expected = SCALES[case]
    got = _scales(source)
    if expected is None:
        assert got is None
    else:
        assert [(kind, ast.unparse(node)) for kind, node in got] == expected
