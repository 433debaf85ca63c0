"""Remote code (``trust_remote_code=True``): a checkpoint's own modeling file, executed by transformers past the import
system, is patched like transformers' own modules (docs/spec.md §3).

The "checkpoint" is a local directory written here: a config with ``auto_map``, and a modeling file in the style much
remote code still ships (DeepSeek-V3, InternLM, Baichuan, ...): no ``**kwargs``, ``logits = logits.float()``, and
the manual causal shift into ``CrossEntropyLoss``. Stock is the same model with logitless uninstalled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import logitless

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("stock_world")

CONFIG = '''
from transformers import PretrainedConfig


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tiny_remote"

    def __init__(self, vocab_size=256, hidden_size=32, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
'''

MODELING = '''
import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tiny_remote import TinyRemoteConfig
{shadow}

class TinyRemoteModel(PreTrainedModel):
    config_class = TinyRemoteConfig

    def __init__(self, config):
        super().__init__(config)
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.mlp = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, h))
        self.norm = nn.LayerNorm(h)
        self.post_init()

    def forward(self, input_ids=None):
        hidden = self.embed_tokens(input_ids)
        return (self.norm(hidden + self.mlp(hidden)),)


class TinyRemoteForCausalLM(PreTrainedModel):
    config_class = TinyRemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = TinyRemoteModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None):
        outputs = self.model(input_ids)

        hidden_states = outputs[0]
        logits = self.lm_head(hidden_states)
        logits = logits.float()

        loss = None
        if labels is not None:
            # Shift so that tokens < n predict n
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss_fct = CrossEntropyLoss()
            shift_logits = shift_logits.view(-1, self.config.vocab_size)
            shift_labels = shift_labels.view(-1)
            shift_labels = shift_labels.to(shift_logits.device)
            loss = loss_fct(shift_logits, shift_labels)

        return CausalLMOutputWithPast(loss=loss, logits=logits)
'''

# The same forward, but the module binds `CrossEntropyLoss` to a loss of its own (label smoothing).
SHADOW = '''

class CrossEntropyLoss(nn.CrossEntropyLoss):
    def __init__(self):
        super().__init__(label_smoothing=0.2)
'''


def _checkpoint(root: Path, name: str, shadow: str = "") -> Path:
    repo = root / name
    repo.mkdir()
    (repo / "configuration_tiny_remote.py").write_text(CONFIG)
    (repo / "modeling_tiny_remote.py").write_text(MODELING.format(shadow=shadow))
    auto_map = {"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"}
    (repo / "config.json").write_text(json.dumps({"model_type": "tiny_remote", "auto_map": auto_map}))
    return repo


def _load(repo: Path) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(repo, trust_remote_code=True)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True).float().train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 10), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt
    return ids, labels


def _step(model: torch.nn.Module) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
    ids, labels = _batch()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _record(model: torch.nn.Module) -> dict[str, Any]:
    cls = type(model)
    return logitless.audit()["classes"][f"{cls.__module__}.{cls.__qualname__}"]


def _assert_equal(got: tuple[Any, torch.Tensor, dict], want: tuple[Any, torch.Tensor, dict]) -> None:
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
    assert got[2].keys() == want[2].keys()
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_remote_class_loaded_after_install_is_fused_like_stock(tmp_path: Path) -> None:
    logitless.install()
    model = _load(_checkpoint(tmp_path, "remote_after"))
    assert type(model).__module__.startswith("transformers_modules.")
    record = _record(model)
    assert (record["status"], record["head"], record["loss_form"]) == ("patched", "lm_head", "shifted_cross_entropy")
    fused = _step(model)
    assert fused[0].logits.shape[-1] == 0
    assert logitless.audit()["runtime"] == {"fused": 1, "stock": {}}
    logitless.uninstall()
    stock = _step(model)
    assert stock[0].logits.shape[-1] == 256
    _assert_equal(fused, stock)


def test_remote_class_loaded_before_install_is_patched_by_install(tmp_path: Path) -> None:
    model = _load(_checkpoint(tmp_path, "remote_before"))
    stock = _step(model)
    logitless.install()
    assert _record(model)["status"] == "patched"
    fused = _step(model)
    assert fused[0].logits.shape[-1] == 0
    _assert_equal(fused, stock)


def test_a_shadowed_cross_entropy_class_keeps_the_stock_forward(tmp_path: Path) -> None:
    """The rewriter reads `CrossEntropyLoss()` by name; here the module binds the name to a label-smoothing loss,
    so the fused loss would be wrong: the class is refused and computes its own loss."""
    logitless.install()
    model = _load(_checkpoint(tmp_path, "remote_shadow", SHADOW))
    record = _record(model)
    assert (record["status"], record["code"]) == ("refused", "loss-class-not-torch"), record
    out, loss, _ = _step(model)
    assert out.logits.shape[-1] == 256
    logitless.uninstall()
    assert torch.equal(_step(model)[1], loss)
    # And it is the label-smoothed loss, not the plain cross-entropy the fused path would give.
    labels = _batch()[1]
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256).detach(), labels[:, 1:].reshape(-1))
    assert not torch.isclose(loss, plain)


def test_uninstall_puts_transformers_loader_back() -> None:
    from transformers import dynamic_module_utils

    original = dynamic_module_utils.get_class_in_module
    logitless.install()
    assert dynamic_module_utils.get_class_in_module is not original
    logitless.uninstall()
    assert dynamic_module_utils.get_class_in_module is original


def test_env_install_reaches_remote_code(tmp_path: Path) -> None:
    """``LOGITLESS=1``: installed at interpreter start, before transformers (and its remote-code loader) is imported."""
    repo = _checkpoint(tmp_path, "remote_env")
    script = textwrap.dedent(
        f"""
        import json, logitless, torch, transformers
        config = transformers.AutoConfig.from_pretrained({str(repo)!r}, trust_remote_code=True)
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
        ids = torch.randint(0, 256, (1, 8))
        out = model(input_ids=ids, labels=ids)
        print(json.dumps({{"runtime": logitless.audit()["runtime"], "width": out.logits.shape[-1]}}))
        """
    )
    env = {**os.environ, "LOGITLESS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"runtime": {"fused": 1, "stock": {}}, "width": 0}
