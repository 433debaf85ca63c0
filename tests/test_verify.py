"""``python -m logitless verify``: stock transformers against logitless on identical tiny weights.

The quick tests run a handful of classes and prove the harness can fail (a deliberately wrong forward must be a
MISMATCH); the slow test runs every class and holds the committed verified counts of docs/coverage.md.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from logitless._verify import compare, inputs, tiny  # noqa: E402
from logitless._verify.discover import CAUSAL, CONDITIONAL, discover  # noqa: E402
from logitless._verify.installer import Installer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
COVERAGE = ROOT / "docs" / "coverage.md"
# Classes whose rewrite exercises each epilogue and head shape the rewriter supports.
QUICK = [
    "LlamaForCausalLM",  # plain
    "Gemma2ForCausalLM",  # softcap epilogue
    "CohereForCausalLM",  # logit_scale multiply
    "GraniteForCausalLM",  # logits_scaling divide
    "MixtralForCausalLM",  # router aux loss added after the loss call
    "Qwen2VLForConditionalGeneration",  # VLM, mrope
    "LlavaForConditionalGeneration",  # VLM with an image
]


def _verify(tmp_path: pathlib.Path, *extra: str, timeout: float = 900) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "verify.json"
    proc = subprocess.run(
        [sys.executable, "-m", "logitless", "verify", "--quiet", "--json", str(out), *extra],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


def test_quick_classes_are_verified(tmp_path: pathlib.Path) -> None:
    args = [a for name in QUICK for a in ("--only", name)]
    code, report, output = _verify(tmp_path, *args)
    by_class = {r["class"]: r for r in report["results"]}
    assert set(by_class) == set(QUICK), output
    for name in QUICK:
        result = by_class[name]
        assert result["status"] == "verified", (name, result.get("reason"), output)
        numbers = result["numbers"]
        # The comparison really happened on both loss forms and on the logits of a forward without labels.
        assert numbers["loss_mean_rel"] <= compare.LOSS_RTOL
        assert numbers["loss_num_items_rel"] <= compare.LOSS_RTOL
        assert numbers["grad_mean_count"] > 0 and numbers["grad_num_items_count"] > 0
        assert numbers["logits_identical"] is True
        # The TRL drop-in on the installed class: fused, loss and gradients equal to the model's own.
        assert result["trl"]["status"] == "fused", (name, result["trl"])
        assert result["trl"]["loss_rel"] <= compare.LOSS_RTOL
        # The DistillationTrainer drop-in: the class's own epilogue, divergence equal to the logits' reference.
        assert result["distill"]["status"] == "class-epilogue", (name, result["distill"])
        assert result["distill"]["loss_rel"] <= compare.LOSS_RTOL
        # GKDTrainer's step (input_ids and attention_mask only, no images), fused, equal to the reference.
        assert result["gkd"]["status"] == "fused", (name, result["gkd"])
        assert result["gkd"]["loss_rel"] <= compare.LOSS_RTOL
        # ORPO's and CPO's concatenated_forward, both fused, every value equal to the reference.
        assert result["odds"]["status"] == "fused", (name, result["odds"])
    # The VLM case really fed an image (pixel values and image tokens), not only text.
    assert "images" in by_class["LlavaForConditionalGeneration"]["inputs"]
    assert code == 0, output


def _tiny_llama() -> tuple[Any, Any, inputs.Feeds]:
    model, config, override = compare.build("transformers.models.llama.modeling_llama", "LlamaForCausalLM")
    return model, config, inputs.make_feeds(model, config, override.inputs)


def test_stock_against_stock_matches_exactly() -> None:
    model, _, feeds = _tiny_llama()
    stock = compare._side(model, feeds, None)
    again = compare._side(model, feeds, stock)
    numbers, problems = compare.compare(stock, again)
    assert problems == []
    assert numbers["loss_mean_abs"] == 0.0 and numbers["grad_mean_abs"] == 0.0
    # num_items_in_batch really changes the normaliser (sum / count over two micro-batches, not the mean).
    assert stock.loss_n is not None and stock.loss is not None
    assert abs(stock.loss_n - stock.loss) > 0.1 * stock.loss


@pytest.mark.parametrize(
    "bug",
    ["loss-scaled", "grad-only", "logits-perturbed", "ignores-num-items"],
)
def test_a_wrong_forward_is_a_mismatch(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness must catch each kind of error a broken rewrite could make."""
    model, _, feeds = _tiny_llama()
    stock = compare._side(model, feeds, None)
    cls = type(model)
    original = cls.forward

    def wrong(self: Any, *args: Any, **kwargs: Any) -> Any:
        if bug == "ignores-num-items":
            kwargs.pop("num_items_in_batch", None)
        out = original(self, *args, **kwargs)
        if out.loss is not None:
            if bug == "loss-scaled":
                out.loss = out.loss * (1 + 1e-4)
            elif bug == "grad-only":
                # Same value, wrong gradient: the head's contribution is counted twice.
                extra = (self.lm_head.weight ** 2).sum() * 1e-3
                out.loss = out.loss + extra - extra.detach()
        elif bug == "logits-perturbed":
            out.logits = out.logits + 1e-6
        return out

    monkeypatch.setattr(cls, "forward", wrong)
    patched = compare._side(model, feeds, stock)
    _, problems = compare.compare(stock, patched)
    assert problems, f"{bug} went unnoticed"


def test_a_patch_that_raises_where_stock_ran_is_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """On torch 2.4 every class read "not-built" (no model could be run stock) because logitless raised after the
    stock side had run; any such failure, patching included, is a mismatch."""
    import logitless

    def broken(model: Any) -> Any:
        raise ValueError("infer_schema(func): unsupported type")

    monkeypatch.setattr(logitless, "patch", broken)
    result = compare.run_case("transformers.models.llama.modeling_llama", "LlamaForCausalLM", "causal-lm",
                              Installer())  # fmt: skip
    assert result["status"] == compare.MISMATCH
    assert "patching failed where stock ran: ValueError" in result["reason"]


def test_tiny_config_shrinks_sizes_and_keeps_layer_types() -> None:
    from transformers import Gemma3TextConfig

    d = tiny.shrink_dict(Gemma3TextConfig().to_dict())
    assert d["hidden_size"] == tiny.HIDDEN and d["vocab_size"] == tiny.VOCAB
    assert d["num_hidden_layers"] == len(d["layer_types"])
    # One layer of each kind survives, so sliding and full attention are both exercised.
    assert set(d["layer_types"]) == set(Gemma3TextConfig().layer_types)
    config = Gemma3TextConfig.from_dict(d)
    assert config.head_dim * config.num_attention_heads == tiny.HIDDEN


def test_special_tokens_are_remapped_into_the_tiny_vocab() -> None:
    from transformers import LlavaConfig

    d = tiny.remap_special_tokens(tiny.shrink_dict(LlavaConfig().to_dict()))
    assert tiny.SPECIAL_BASE <= d["image_token_index"] < tiny.VOCAB
    config = LlavaConfig.from_dict(d)
    feeds = inputs.make_feeds(torch.nn.Module(), config)
    assert not (feeds.base["input_ids"] == config.image_token_index).any()


@pytest.mark.skipif(transformers.__version__ != "5.24.0", reason="class counts are those of transformers 5.24.0")
def test_discovers_every_causal_lm() -> None:
    found = discover()
    # Not the AutoModelForCausalLM factory; 176 *ForCausalLM and 10 causal LMs named otherwise.
    assert sum(c.kind == CAUSAL for c in found) == 186
    assert sum(c.kind == CONDITIONAL for c in found) >= 133  # causal-loss and encoder-decoder CE classes, wrappers
    names = {c.cls: c.kind for c in found}
    # The most used heads whose names do not follow the *ForCausalLM / *ForConditionalGeneration convention.
    assert (names["GPT2LMHeadModel"], names["MarianMTModel"], names["EncoderDecoderModel"]) == (
        CAUSAL, CONDITIONAL, CONDITIONAL)
    assert not {"FSMTModel", "GPT2Model", "AutoModelWithLMHead"} & set(names)


def test_installer_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="mode"):
        Installer("bogus")


def _committed_floor() -> tuple[int, int] | None:
    """The verified counts in the committed docs/coverage.md (summary rows), if it was generated for this
    transformers version."""
    if not COVERAGE.exists():
        return None
    text = COVERAGE.read_text()
    if f"transformers {transformers.__version__}," not in text:
        return None
    counts = {}
    for kind in (CAUSAL, CONDITIONAL):
        match = re.search(rf"^\| {re.escape(kind)} \| (\d+) \|", text, re.MULTILINE)
        if match is None:
            return None
        counts[kind] = int(match.group(1))
    return counts[CAUSAL], counts[CONDITIONAL]


@pytest.mark.slow
def test_every_class_no_mismatch_and_committed_coverage(tmp_path: pathlib.Path) -> None:
    floor = _committed_floor()
    extra = ["--min-verified", str(floor[0]), str(floor[1])] if floor else []
    code, report, output = _verify(tmp_path, *extra)
    mismatches = [r for r in report["results"] if r["status"] == "MISMATCH"]
    assert mismatches == [], mismatches
    assert code == 0, output
    if floor is None:
        pytest.skip(f"docs/coverage.md was not generated for transformers {transformers.__version__}")


@pytest.mark.parametrize("bug", ["log-probs-scaled", "fallback-wrong"])
def test_a_wrong_trl_drop_in_is_a_mismatch(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TRL column catches a drop-in whose fields are off, on the fused path and on the fallback."""
    import logitless
    from logitless.integrations import _per_token

    model, _, feeds = _tiny_llama()
    stock = compare._side(model, feeds, None)
    target = "fused_per_token" if bug == "log-probs-scaled" else "materialised_per_token"
    original = getattr(_per_token, target)

    def wrong(*args: Any, **kwargs: Any) -> dict[str, Any]:
        fields = original(*args, **kwargs)
        return {**fields, "log_probs": fields["log_probs"] * (1 + 1e-4)}

    monkeypatch.setattr(_per_token, target, wrong)
    if bug == "fallback-wrong":
        monkeypatch.setattr("logitless.integrations.trl.materialised_per_token", wrong)
    else:
        logitless.patch(model)
    try:
        result = compare._trl_check(model, feeds, stock)
    finally:
        logitless.uninstall()
    assert result["status"] == "MISMATCH", result


def _scale_the_divergence(monkeypatch: pytest.MonkeyPatch) -> None:
    """A divergence 1e-4 off (the op's row pass scaled): what the distillation and GKD columns must catch."""
    from logitless import divergence

    original = divergence._row_pass

    def scaled(*args: Any) -> Any:
        value, entropy, grad = original(*args)
        return value * (1 + 1e-4), entropy, grad

    monkeypatch.setattr(divergence, "_row_pass", scaled)


@pytest.mark.parametrize("bug", ["epilogue-dropped", "divergence-scaled"])
def test_a_wrong_distillation_drop_in_is_a_mismatch(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The distillation column catches a drop-in that reads the wrong epilogue or computes a wrong divergence."""
    import logitless
    from logitless._verify import distill
    from logitless.integrations import trl_distillation

    model, config, override = compare.build("transformers.models.gemma2.modeling_gemma2", "Gemma2ForCausalLM")
    feeds = inputs.make_feeds(model, config, override.inputs)
    if bug == "epilogue-dropped":
        monkeypatch.setattr(trl_distillation, "class_epilogue", lambda m: {})
    else:
        _scale_the_divergence(monkeypatch)
    logitless.patch(model)
    try:
        result = distill.check(model, dict(feeds.base), lambda: model)
    finally:
        logitless.uninstall()
    assert result["status"] == "MISMATCH", result


@pytest.mark.parametrize("bug", ["teacher-epilogue-dropped", "divergence-scaled"])
def test_a_wrong_gkd_step_is_a_mismatch(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GKD column catches a step that drops the teacher's epilogue or computes a wrong divergence."""
    import logitless
    from logitless import hf
    from logitless._verify import gkd

    model, config, override = compare.build("transformers.models.gemma2.modeling_gemma2", "Gemma2ForCausalLM")
    feeds = inputs.make_feeds(model, config, override.inputs)
    if bug == "teacher-epilogue-dropped":
        operands = hf._Operands

        def without_epilogue(hidden: Any, weight: Any, bias: Any, epilogue: dict[str, Any]) -> Any:
            return operands(hidden, weight, bias, dict.fromkeys(epilogue))

        monkeypatch.setattr(hf, "_Operands", without_epilogue)
    else:
        _scale_the_divergence(monkeypatch)
    logitless.install()
    try:
        result = gkd.check(model, dict(feeds.base), feeds.labels, lambda: model)
    finally:
        logitless.uninstall()
    assert result["status"] == "MISMATCH", result


@pytest.mark.parametrize("bug", ["log-probs-shifted", "mean-logits-scaled"])
def test_a_wrong_orpo_cpo_call_is_a_mismatch(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ORPO / CPO column catches log-probabilities scored one position off and a wrong logits metric."""
    import logitless
    from logitless._verify import odds
    from logitless.integrations import trl as drop_in

    model, config, override = compare.build("transformers.models.gemma2.modeling_gemma2", "Gemma2ForCausalLM")
    feeds = inputs.make_feeds(model, config, override.inputs)
    real = drop_in.per_token_fields

    def wrong(*args: Any) -> Any:
        fields, out, fused = real(*args)
        fields = dict(fields)
        if bug == "log-probs-shifted":
            fields["log_probs"] = fields["log_probs"].roll(1, dims=-1)
        else:
            fields["mean_logits"] = fields["mean_logits"] * (1 + 1e-3) + 1e-3
        return fields, out, fused

    monkeypatch.setattr(drop_in, "per_token_fields", wrong)
    logitless.install()
    try:
        result = odds.check(model, dict(feeds.base))
    finally:
        logitless.uninstall()
    assert result["status"] == "MISMATCH", result

