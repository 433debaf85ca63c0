"""The rewriter's Python face: real forwards rewrite into code that compiles and behaves, refusals carry
a code, and the audit CLI imports neither torch nor transformers.

The behaviour check runs a rewritten forward against a stand-in ``__logitless__`` and plain-Python "tensors", so
it needs no torch: what it checks is which statements run and what reaches ``hf_loss``.
"""

from __future__ import annotations

import ast
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from logitless.audit_cli import _forward_source, audit_report, find_transformers
from logitless.rewrite import rewrite_forward

RUNTIME_API = {"fusable", "hf_loss", "mask_shifted_labels", "no_logits", "return_logits"}


@pytest.fixture(scope="module")
def patched_sources() -> list[tuple[str, str, dict[str, Any]]]:
    """(class, original forward, rewrite result) for every class the audit patches, read with Python's own ast."""
    package = find_transformers()
    report = audit_report(package)
    out = []
    files: dict[str, str] = {}
    for c in sorted(report["classes"].values(), key=lambda c: c["class"]):
        name = c["class"]
        if c["status"] != "patched" or c.get("forward_from"):
            continue
        rel = c["module"].removeprefix("transformers.").replace(".", "/") + ".py"
        text = files.setdefault(rel, (package / rel).read_text(encoding="utf-8"))
        source = _forward_source(text, name)
        assert source is not None, name
        out.append((name, source, rewrite_forward(source)))
    return out


def test_every_patched_real_forward_compiles_and_calls_only_the_runtime_api(patched_sources: list) -> None:
    assert len(patched_sources) > 100
    for name, original, result in patched_sources:
        assert result["status"] == "patched", (name, result)
        code = compile(result["source"], f"<{name}>", "exec")
        assert "forward" in code.co_names or any(getattr(c, "co_name", "") == "forward" for c in code.co_consts)
        used = {
            n.attr
            for n in ast.walk(ast.parse(result["source"]))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "__logitless__"
        }
        if result["loss_form"] == "delegated":  # an encoder-decoder wrapper hands its loss to its decoder
            assert used == {"delegable"}, (name, used)
        else:
            assert used <= RUNTIME_API and {"fusable", "hf_loss"} <= used, (name, used)


def test_original_statements_survive_verbatim_in_the_else_branch(patched_sources: list) -> None:
    for name, original, result in patched_sources:
        lines = original.splitlines()
        # From the head statement (a top-level line assigning the logits from self.<head>; a wrapper's outputs from
        # self.<decoder>) to the end of the labels branch (the next top-level line after `if labels is not None:`).
        target = r"\w+" if result["loss_form"] == "delegated" else result["logits"]
        head_re = re.compile(rf"^    {target}\b.*= .*self\.{result['head']}\(")
        start = next(i for i, line in enumerate(lines) if head_re.match(line))
        branch = next(i for i in range(start, len(lines)) if lines[i].startswith("    if labels is not None"))
        end = next(
            (i for i in range(branch + 1, len(lines)) if lines[i].strip() and not lines[i].startswith("     ")),
            len(lines),
        )
        test = result["source"].index("__logitless__.fusable(") if "fusable" in result["source"] else None
        for line in lines[start:end]:
            if not line.strip():
                continue
            if line.startswith(f"    {result['labels']} = "):
                # A rebinding of the labels runs above the fused-path test, unchanged, on both paths.
                at = result["source"].find("\n" + line + "\n")
                assert at != -1 and test is not None and at < test, (name, line)
            else:
                assert "    " + line in result["source"], (name, line)


SOFTCAP_FORWARD = '''
@can_return_tuple
def forward(self, hidden_states, labels=None, **kwargs):
    logits = self.lm_head(hidden_states)
    logits = logits * self.logit_scale
    if self.config.final_logit_softcapping is not None:
        logits = logits / self.config.final_logit_softcapping
        logits = torch.tanh(logits)
        logits = logits * self.config.final_logit_softcapping
    loss = None
    if labels is not None:
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
    return loss, logits
'''


class FakeRuntime:
    """Records what a rewritten forward asks of ``__logitless__``."""

    def __init__(self, fusable: bool, return_logits: bool) -> None:
        self._fusable, self._return_logits, self.calls = fusable, return_logits, []

    def fusable(self, model: Any, head: Any) -> bool:
        self.calls.append(("fusable", head))
        return self._fusable

    def hf_loss(self, hidden: Any, head: Any, labels: Any, **kw: Any) -> str:
        self.calls.append(("hf_loss", hidden, head, labels, kw))
        return "fused-loss"

    def no_logits(self, hidden: Any, head: Any) -> str:
        return "empty"

    def return_logits(self) -> bool:
        return self._return_logits


def _build(source: str, runtime: FakeRuntime) -> Any:
    env: dict[str, Any] = {
        "__logitless__": runtime,
        "can_return_tuple": lambda f: f,
        "torch": SimpleNamespace(tanh=math.tanh),
    }
    exec(compile(textwrap.dedent(source), "<test>", "exec"), env)
    return env["forward"]


def _model() -> Any:
    def loss_function(logits: float, labels: Any, vocab_size: int, **kw: Any) -> tuple:
        return ("stock-loss", logits, labels, vocab_size, kw)

    return SimpleNamespace(
        lm_head=lambda h: 2.0 * h,
        logit_scale=3.0,
        vocab_size=7,
        config=SimpleNamespace(final_logit_softcapping=5.0),
        loss_function=loss_function,
    )


def _expected_logits(h: float) -> float:
    return 5.0 * math.tanh(2.0 * h * 3.0 / 5.0)


def test_rewritten_forward_fused_path_passes_the_epilogue_to_hf_loss() -> None:
    result = rewrite_forward(SOFTCAP_FORWARD)
    assert result["status"] == "patched"
    assert [(e["kind"], e["expr"]) for e in result["epilogue"]] == [
        ("multiply", "self.logit_scale"),
        ("softcap", "self.config.final_logit_softcapping"),
    ]
    model = _model()
    runtime = FakeRuntime(fusable=True, return_logits=False)
    loss, logits = _build(result["source"], runtime)(model, 0.25, labels="L", num_items_in_batch=4)
    assert (loss, logits) == ("fused-loss", "empty")
    _, hidden, head, labels, kw = runtime.calls[-1]
    assert (hidden, head, labels) == (0.25, model.lm_head, "L")
    # The model's own loss function travels with the call: which loss it is (causal, or T5Gemma's unshifted
    # ForMaskedLM) is known only at run time.
    assert kw == {"vocab_size": 7, "logit_scale_multiply": 3.0, "logit_softcapping": 5.0,
                  "loss_function": model.loss_function, "num_items_in_batch": 4}  # fmt: skip


def test_rewritten_forward_other_paths_run_the_original_statements() -> None:
    source = rewrite_forward(SOFTCAP_FORWARD)["source"]
    model = _model()
    # Not fusable (e.g. custom loss_function or PEFT head): the stock statements, stock loss.
    loss, logits = _build(source, FakeRuntime(fusable=False, return_logits=False))(model, 0.25, labels="L")
    assert loss == ("stock-loss", _expected_logits(0.25), "L", 7, {})
    assert logits == pytest.approx(_expected_logits(0.25))
    # Inference (labels None): fusable is never asked, logits are the real ones.
    runtime = FakeRuntime(fusable=True, return_logits=False)
    loss, logits = _build(source, runtime)(model, 0.25)
    assert loss is None and logits == pytest.approx(_expected_logits(0.25)) and runtime.calls == []
    # return_logits: fused loss and real logits.
    loss, logits = _build(source, FakeRuntime(fusable=True, return_logits=True))(model, 0.25, labels="L")
    assert loss == "fused-loss" and logits == pytest.approx(_expected_logits(0.25))
    # softcap None at run time: the original skips it; hf_loss receives None (= not set).
    model.config.final_logit_softcapping = None
    runtime = FakeRuntime(fusable=True, return_logits=False)
    _build(source, runtime)(model, 0.25, labels="L")
    assert runtime.calls[-1][4]["logit_softcapping"] is None


def test_refusal_has_code_reason_and_line_and_no_source() -> None:
    source = SOFTCAP_FORWARD.replace("loss = None\n", "loss = None\n    logits[:, 0] = 0.0\n")
    result = rewrite_forward(source)
    assert result == {"status": "refused", "code": "logits-mutated", "reason": result["reason"], "line": 11}
    assert rewrite_forward("def forward(self:\n")["code"] == "parse-error"


def test_rewrite_cli_prints_a_unified_diff() -> None:
    llama = find_transformers() / "models" / "llama" / "modeling_llama.py"
    out = subprocess.run(
        [sys.executable, "-m", "logitless", "rewrite", str(llama), "--class", "LlamaForCausalLM"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("--- LlamaForCausalLM.forward")
    assert "+    if labels is not None and __logitless__.fusable(self, self.lm_head):" in out
    assert "-@auto_docstring" in out


def test_audit_cli_imports_neither_torch_nor_transformers() -> None:
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['logitless', 'audit', '--json']\n"
        "try:\n    runpy.run_module('logitless', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "sys.stderr.write('HEAVY=' + repr(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert proc.stderr.strip().endswith("HEAVY=[]"), proc.stderr[-500:]
    assert proc.stdout.lstrip().startswith("{")
