"""Epilogue modules: ``logits = self.logit_softcap(logits)`` after the head (Inkling2, transformers 5.24).

The module's class is analysed at run time; the fused loss must equal stock transformers on the same weights
(stock float32 copies computed before installing: the model's router does not run in float64; the op's own
float64 check is the last test), and every instance the analysis cannot vouch for (another class, a
hook, a learned constant) must keep the stock statements, counted with its reason.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import logitless
from logitless import _state
from logitless._epilogue_modules import epilogue_keywords
from logitless._verify.compare import build
from logitless.hf import hf_loss

pytest.importorskip("transformers.models.inkling2")

# A cap this small bends the tiny model's logits (|z| up to ~4 after the head is scaled below) far from linear,
# so a loss computed without the softcap, or with another cap, is far off.
CAP = 1.5


def _inkling2() -> nn.Module:
    model, _, _ = build("transformers.models.inkling2.modeling_inkling2", "Inkling2ForCausalLM")
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.logit_softcap.softcap = CAP
    return model.train()


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, vocab, (2, 10), generator=g)
    labels = input_ids.clone()
    labels[0, :3] = -100
    return {"input_ids": input_ids, "labels": labels}


def _loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any], Any]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, out


def _assert_close(loss: torch.Tensor, grads: dict, ref_loss: torch.Tensor, ref_grads: dict) -> None:
    # verify's tolerances: loss within 1e-5 relative, each gradient within 1e-5 of its largest entry.
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0), (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        ref = ref_grads[name]
        scale = ref.abs().max().clamp(min=1e-12)
        assert ((g - ref).abs().max() / scale) < 1e-5, name


def _counts() -> dict[str, Any]:
    key = "transformers.models.inkling2.modeling_inkling2.Inkling2ForCausalLM"
    return _state.runtime_counts().get(key, {"fused": 0, "stock": {}})


@pytest.fixture(autouse=True)
def _uninstalled_after() -> Iterator[None]:
    logitless.uninstall()
    _state.reset_counts()
    yield
    logitless.uninstall()


@pytest.fixture(scope="module")
def stock_model() -> nn.Module:
    return _inkling2()


def test_softcap_module_is_fused_and_matches_float64_stock(stock_model: nn.Module) -> None:
    model = copy.deepcopy(stock_model)
    batch = _batch(model.config.vocab_size)
    ref_loss, ref_grads, _ = _loss_and_grads(copy.deepcopy(model), batch)
    # The cap matters here: without it the loss is far from stock's.
    uncapped = copy.deepcopy(model)
    uncapped.logit_softcap = nn.Identity()
    assert abs(_loss_and_grads(uncapped, batch)[0].item() - ref_loss.item()) > 1e-2

    logitless.install()
    loss, grads, out = _loss_and_grads(model, batch)
    assert out.logits.numel() == 0  # the fused path ran
    assert _counts() == {"fused": 1, "stock": {}}
    _assert_close(loss, grads, ref_loss, ref_grads)


def test_the_modules_constant_is_read_on_every_call(stock_model: nn.Module) -> None:
    model = copy.deepcopy(stock_model)
    model.logit_softcap.softcap = 0.7
    batch = _batch(model.config.vocab_size)
    ref_loss, ref_grads, _ = _loss_and_grads(copy.deepcopy(model), batch)
    logitless.install()
    loss, grads, out = _loss_and_grads(model, batch)
    assert out.logits.numel() == 0
    _assert_close(loss, grads, ref_loss, ref_grads)


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1.0, 1.0)


class _LearnedCap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.softcap = nn.Parameter(torch.tensor(CAP))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / self.softcap) * self.softcap


def _doubled(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output * 2.0


def _swap_clamp(model: nn.Module) -> None:
    model.logit_softcap = _Clamp()


def _learned(model: nn.Module) -> None:
    model.logit_softcap = _LearnedCap()


def _hooked(model: nn.Module) -> None:
    model.logit_softcap.register_forward_hook(_doubled)


def _instance_forward(model: nn.Module) -> None:
    module = model.logit_softcap
    module.forward = lambda x: torch.tanh(x / 0.3) * 0.3


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_swap_clamp, "epilogue-not-understood"),
        (_learned, "epilogue-parameter"),
        (_hooked, "hooked-epilogue"),
        (_instance_forward, "hooked-epilogue"),
    ],
)
def test_an_epilogue_module_it_cannot_vouch_for_keeps_the_stock_path(
    stock_model: nn.Module, change: Any, reason: str
) -> None:
    model = copy.deepcopy(stock_model)
    change(model)
    batch = _batch(model.config.vocab_size)
    ref_loss, ref_grads, _ = _loss_and_grads(copy.deepcopy(model), batch)
    logitless.install()
    loss, grads, out = _loss_and_grads(model, batch)
    assert out.logits.numel() > 0  # stock statements
    assert _counts() == {"fused": 0, "stock": {reason: 1}}
    _assert_close(loss, grads, ref_loss, ref_grads)
    if change is _learned:
        assert "logit_softcap.softcap" in grads  # the learned cap got its gradient


def test_accelerates_alignment_hook_on_a_module_without_tensors_is_fused(stock_model: nn.Module) -> None:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = copy.deepcopy(stock_model)
    batch = _batch(model.config.vocab_size)
    ref_loss, ref_grads, _ = _loss_and_grads(copy.deepcopy(model), batch)
    # What device_map dispatch puts on every top-level module: it only moves tensors between devices.
    add_hook_to_module(model.logit_softcap, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    logitless.install()
    loss, grads, out = _loss_and_grads(model, batch)
    assert out.logits.numel() == 0
    assert _counts() == {"fused": 1, "stock": {}}
    _assert_close(loss, grads, ref_loss, ref_grads)
    # A torch hook beside it is not understood.
    model.logit_softcap.register_full_backward_hook(lambda *args: None)
    _loss_and_grads(model, batch)
    assert _counts() == {"fused": 1, "stock": {"hooked-epilogue": 1}}


class _Scaled(nn.Module):
    """Every step kind, constants from attributes and literals."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.linspace(-1.0, 1.0, 8))
        self.scale = 3.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.bias
        x = x * self.scale
        x = x / 2.0
        return 4.0 * torch.tanh(x / 4.0)


def test_every_step_kind_of_a_module_matches_the_module_in_float64() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(5, 8, bias=False).double()
    labels = torch.tensor([1, 7, -100, 0, 3, 5])
    module = _Scaled().double()
    assert set(epilogue_keywords(module)) == {
        "logits_bias", "logit_scale_multiply", "logit_scale_divide", "logit_softcapping"
    }  # fmt: skip
    ref = torch.nn.functional.cross_entropy(module(head(hidden)), labels, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, (hidden, head.weight))
    loss = hf_loss(hidden, head, labels, shift_labels=labels, epilogue_module=module)
    grads = torch.autograd.grad(loss, (hidden, head.weight))
    assert torch.allclose(loss, ref, rtol=1e-10, atol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12)


def test_identity_module_is_no_epilogue() -> None:
    assert epilogue_keywords(nn.Identity()) == {}


def test_hf_loss_rejects_a_module_it_cannot_fuse_and_a_second_epilogue() -> None:
    hidden = torch.randn(4, 5)
    head = nn.Linear(5, 8, bias=False)
    labels = torch.tensor([1, 2, 3, -100])
    with pytest.raises(TypeError, match=r"epilogue_module: cannot fuse .*_Clamp.*epilogue-not-understood"):
        hf_loss(hidden, head, labels, epilogue_module=_Clamp())
    with pytest.raises(ValueError, match="epilogue_module: expected no other epilogue keyword"):
        hf_loss(hidden, head, labels, epilogue_module=nn.Identity(), logit_softcapping=30.0)
