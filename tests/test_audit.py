"""``python -m logitless audit`` over the installed transformers: coverage floor and known outcomes.

Expected outcomes below were read by hand from the transformers sources (5.23.0, unchanged in 5.24.0; Inkling2 and
Dory from 5.24.0), not from the audit's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from logitless.audit_cli import audit_report, find_transformers, transformers_version

# Committed floor: patched causal-LM classes in transformers 5.24.0 (of 186: 176 *ForCausalLM, 10 named otherwise,
# GPT2LMHeadModel among them). Raise it when coverage grows.
PINNED = "5.24.0"
MIN_PATCHED_CAUSAL_LM = 171
MIN_PATCHED_CONDITIONAL_GENERATION = 132
REASON_CODES = {
    "parse-error", "no-forward", "no-labels-branch", "non-empty-else", "unsupported-loss", "loss-input-not-logits",
    "no-head-call", "head-not-linear", "head-unresolved", "stacked-heads", "head-call-shape", "hidden-reads-logits",
    "logits-rebound", "logits-mutated", "labels-branch-reads-logits", "labels-mutated", "epilogue-order",
    "epilogue-guard", "unexpected-statement", "loss-args-read-logits", "dropped-name-used", "logits-used-after-loss",
    "unsupported-formatting", "reparse-failed",
}  # fmt: skip


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return audit_report(find_transformers())


def _by_class(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The records keyed by bare class name (unique in an installed transformers)."""
    return {c["class"]: c for c in report["classes"].values()}


@pytest.fixture(scope="module")
def is_pinned(report: dict[str, Any]) -> bool:
    return report["transformers"] == PINNED


def test_version_is_read_from_metadata_without_import() -> None:
    import transformers  # the test may import it; the audit itself must not (see test_rewrite.py)

    assert transformers_version(find_transformers()) == transformers.__version__


def test_patched_causal_lm_count_does_not_drop(report: dict[str, Any], is_pinned: bool) -> None:
    if not is_pinned:
        pytest.skip(f"the committed figure is for transformers {PINNED}")
    causal = report["summary"]["causal-lm"]
    assert causal["total"] == 186  # AutoModelForCausalLM is a factory, not a model: not counted
    assert causal["patched"] >= MIN_PATCHED_CAUSAL_LM, causal
    cond = report["summary"]["conditional-generation"]
    assert cond["patched"] >= MIN_PATCHED_CONDITIONAL_GENERATION, cond


def test_every_refusal_has_a_known_code_and_a_reason(report: dict[str, Any]) -> None:
    for name, c in report["classes"].items():
        assert c["status"] in {"patched", "refused"}, name
        if c["status"] == "refused":
            assert c["code"] in REASON_CODES, (name, c["code"])
            assert c["reason"], name
        elif c["loss_form"] == "delegated":
            # An encoder-decoder wrapper names the sub-model its loss is handed to; that class is audited itself.
            assert c["head"] and c["head_is_linear"] is None and not c["head_path"], name
        else:
            # A plain head is built as nn.Linear; a composite one names the path to the linear it is fused on.
            assert c["head"] and (c["head_is_linear"] is True or c["head_path"]), name


def _epilogue(c: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["kind"], e["expr"]) for e in c["epilogue"]]


@pytest.mark.parametrize(
    ("name", "head", "epilogue"),
    [
        ("LlamaForCausalLM", "lm_head", []),
        ("Gemma2ForCausalLM", "lm_head", [("softcap", "self.config.final_logit_softcapping")]),
        ("CohereForCausalLM", "lm_head", [("multiply", "self.logit_scale")]),
        ("GraniteForCausalLM", "lm_head", [("divide", "self.config.logits_scaling")]),
        ("FalconH1ForCausalLM", "lm_head", [("multiply", "self.model.lm_head_multiplier")]),
        ("RecurrentGemmaForCausalLM", "lm_head", [("softcap", "cap")]),
        ("FalconForCausalLM", "lm_head", []),
        ("RwkvForCausalLM", "head", []),
        ("ElectraForCausalLM", "generator_lm_head", []),
        (
            "Gemma3nForConditionalGeneration",
            "lm_head",
            [("softcap", "(final_logit_softcapping := self.config.get_text_config().final_logit_softcapping)")],
        ),
        # `logits = self.logit_softcap(logits)`: an Inkling2Softcap, whose forward is `tanh(x / c) * c`.
        ("Inkling2ForCausalLM", "lm_head", [("module", "self.logit_softcap")]),
        # Its padded vocabulary cut back: `if end is not None and end < logits.shape[-1]: logits = logits[..., :end]`.
        ("InklingForCausalLM", "lm_head", [("vocab_slice", "unpadded_vocab_size")]),
        # Named outside the *ForCausalLM / *ForConditionalGeneration convention.
        ("GPT2LMHeadModel", "lm_head", []),
        ("MarianMTModel", "lm_head", [("logits_bias", "self.final_logits_bias")]),
        ("XLNetLMHeadModel", "lm_loss", []),  # CrossEntropyLoss on unshifted labels (permutation LM)
        ("VisionEncoderDecoderModel", "decoder", []),  # the loss is handed to the decoder (delegated)
        # loss_function of `logits = outputs[0]` from self.language_model(..., **kwargs): handed to that
        # Llama4ForCausalLM with the labels (delegated, the causal-LM form)
        ("Llama4ForConditionalGeneration", "language_model", []),
    ],
)
def test_known_patched_classes(report: dict[str, Any], is_pinned: bool, name: str, head: str, epilogue: list) -> None:
    if not is_pinned:
        pytest.skip(f"outcomes read from transformers {PINNED}")
    c = _by_class(report)[name]
    assert (c["status"], c["head"], _epilogue(c)) == ("patched", head, epilogue), c


@pytest.mark.parametrize(
    ("name", "head", "path"),
    [
        ("BigBirdForCausalLM", "cls", ["predictions", "decoder"]),  # BERT-style: cls → predictions → decoder
        ("RemBertForCausalLM", "cls", ["predictions", "decoder"]),  # dense/activation/norm inside predictions
        ("RobertaForCausalLM", "lm_head", ["decoder"]),  # RobertaLMHead: dense, gelu, layer norm, decoder
        ("XLMRobertaXLForCausalLM", "lm_head", ["decoder"]),
        # T5GemmaLMHead: out_proj; its __init__ sets loss_type = "ForMaskedLM", fused unshifted (no longer refused)
        ("T5GemmaForConditionalGeneration", "lm_head", ["out_proj"]),
        ("T5Gemma2ForConditionalGeneration", "lm_head", ["out_proj"]),
    ],
)
def test_composite_heads_are_patched_with_their_path(
    report: dict[str, Any], is_pinned: bool, name: str, head: str, path: list[str]
) -> None:
    if not is_pinned:
        pytest.skip(f"outcomes read from transformers {PINNED}")
    c = _by_class(report)[name]
    assert (c["status"], c["head"], c["head_is_linear"], c["head_path"]) == ("patched", head, False, path), c


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("ClvpForCausalLM", "logits-rebound"),  # `lm_logits` first holds final_norm(hidden), then the head output
        ("MusicgenForCausalLM", "stacked-heads"),  # one head per codebook
        ("ChameleonForConditionalGeneration", "logits-mutated"),  # image-token logits set to -inf in place
        ("GitForCausalLM", "loss-input-not-logits"),  # loss on shifted logits slices
        ("xLSTMForCausalLM", "epilogue-guard"),  # chunked in-place softcap under a guard reading logits.shape
        ("DoryForCausalLM", "head-not-linear"),  # DoryLMHead: nn.Linear times a learned per-token scale
        ("XLMWithLMHeadModel", "no-labels-branch"),  # the loss is computed inside `self.pred_layer(output, labels)`
        ("ReformerModelWithLMHead", "head-not-linear"),  # ReformerOnlyLMHead: apply_chunking_to_forward
        ("BlipTextLMHeadModel", "unsupported-loss"),  # CrossEntropyLoss(label_smoothing=self.label_smoothing, ...)
    ],
)
def test_known_refusals(report: dict[str, Any], is_pinned: bool, name: str, code: str) -> None:
    if not is_pinned:
        pytest.skip(f"outcomes read from transformers {PINNED}")
    c = _by_class(report)[name]
    assert (c["status"], c["code"]) == ("refused", code), c


def test_cli_json_shape(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "logitless", "audit", "--json"], capture_output=True, text=True, check=True
    ).stdout
    doc = json.loads(out)
    assert set(doc) == {"transformers", "counts", "classes", "summary"}
    llama = doc["classes"]["transformers.models.llama.modeling_llama.LlamaForCausalLM"]
    assert {"class", "module", "status", "head", "epilogue", "code", "reason", "line"} <= set(llama)
    assert (llama["class"], llama["status"]) == ("LlamaForCausalLM", "patched")
    assert sum(doc["counts"].values()) == len(doc["classes"])
    assert not any(c["class"].startswith("Auto") for c in doc["classes"].values())


def test_cli_json_shares_the_schema_of_audit() -> None:
    """What ``python -m logitless audit --json`` and ``logitless.audit()`` both report, they report alike."""
    import transformers.models.llama.modeling_llama  # noqa: F401 - the installer patches modules as imported

    import logitless

    doc = json.loads(subprocess.run([sys.executable, "-m", "logitless", "audit", "--json"], capture_output=True,
                                    text=True, check=True).stdout)  # fmt: skip
    logitless.install()
    try:
        live = logitless.audit()
    finally:
        logitless.uninstall()
    assert live["transformers"] == doc["transformers"]
    key = "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    for field in ("status", "head", "epilogue", "loss_form"):
        assert live["classes"][key][field] == doc["classes"][key][field], field
    shared = set(live["classes"]) & set(doc["classes"])
    assert len(shared) > 0
    for name in shared:
        assert live["classes"][name]["status"] == doc["classes"][name]["status"], name


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_cli_audit_of_a_directory_without_transformers_is_an_error(tmp_path: Path, where: str) -> None:
    target = tmp_path / "nowhere" if where == "missing" else tmp_path
    done = subprocess.run([sys.executable, "-m", "logitless", "audit", "--transformers", str(target)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"logitless audit: {target}: not a transformers package (no models/ "
                                                 "directory)"]  # fmt: skip


def test_cli_rewrite_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "modeling_x.py"
    done = subprocess.run([sys.executable, "-m", "logitless", "rewrite", str(missing), "--class", "XForCausalLM"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"logitless rewrite: {missing}: No such file or directory"]


@pytest.mark.parametrize(("package", "floor"), [("torch", "2.6"), ("transformers", "4.56")])
def test_cli_audit_says_when_install_would_patch_nothing(
    package: str, floor: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from logitless import _versions, cli

    real = _versions.installed
    monkeypatch.setattr(_versions, "installed", lambda name: "1.0.0" if name == package else real(name))
    assert cli.main(["audit"]) == 0
    out, err = capsys.readouterr()
    assert "LlamaForCausalLM" in out
    assert err == f"logitless audit: logitless supports {package} >= {floor}; found 1.0.0: install() patches nothing\n"
    monkeypatch.setattr(_versions, "installed", real)
    assert cli.main(["audit"]) == 0 and capsys.readouterr().err == ""


def test_cli_table_and_explicit_dir() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "logitless", "audit", "--transformers", str(find_transformers())],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "LlamaForCausalLM" in out and "causal-lm:" in out


FORK_PROBE = """
import os, sys
from logitless import _core
from logitless.audit_cli import find_transformers
models = str(find_transformers() / "models")
n = len(_core.audit_tree(models))
pid = os.fork()
if pid == 0:
    os._exit(0 if len(_core.audit_tree(models)) == n else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_audit_still_works_in_a_forked_child() -> None:
    # A child forked after the parent ran the parallel scan (DataLoader workers do this) must not wait forever on
    # pool threads that only exist in the parent.
    subprocess.run([sys.executable, "-c", FORK_PROBE], timeout=60, check=True)
