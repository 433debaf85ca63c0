"""hf_loss: transformers' ``self.loss_function`` calling convention, against stock ``ForCausalLMLoss`` and models."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import transformers
from ops_reference import assert_close
from transformers.loss.loss_utils import ForCausalLMLoss

import logitless.hf
from logitless.hf import hf_loss
from logitless.ops import linear_cross_entropy

B, T, H, V = 2, 7, 16, 29


@pytest.fixture(params=["auto", "torch"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """hf_loss has no impl switch (CPU → Rust); "torch" reroutes it through the torch path to cover both."""
    if request.param == "torch":
        monkeypatch.setattr(logitless.hf, "linear_cross_entropy", functools.partial(linear_cross_entropy, impl="torch"))
    return str(request.param)


def head(with_bias: bool, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(H, V, bias=with_bias)


def stock(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor, softcap: float | None = None,
          **kwargs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """ForCausalLMLoss on float64 logits from float64 copies of the head; returns loss and grads (h, W, b)."""
    h = hidden.detach().double().requires_grad_()
    w = lm_head.weight.detach().double().requires_grad_()
    b = lm_head.bias.detach().double().requires_grad_() if lm_head.bias is not None else None
    logits = torch.nn.functional.linear(h, w, b)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss = ForCausalLMLoss(logits, labels, V, **kwargs)
    leaves = [x for x in (h, w, b) if x is not None]
    return loss.detach(), list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_items_in_batch": 9},
        {"num_items_in_batch": torch.tensor(9)},
        {"ignore_index": 5},
        {"shift_labels": "given"},
        {"position_ids": torch.arange(T), "output_attentions": False},  # extras: ignored, as stock ignores them
    ],
    ids=["plain", "num_items_int", "num_items_tensor", "ignore_index", "shift_labels", "extra_kwargs"],
)
def test_matches_for_causal_lm_loss(impl: str, with_bias: bool, kwargs: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(1)
    lm_head = head(with_bias)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = kwargs.get("ignore_index", -100)
    kwargs = dict(kwargs)
    if kwargs.get("shift_labels") == "given":
        kwargs["shift_labels"] = torch.randint(0, V, (B, T), generator=g)
        kwargs["shift_labels"][1, 3:] = -100
    loss = hf_loss(hidden, lm_head, labels, V, **kwargs)
    ref_loss, ref_grads = stock(hidden, lm_head, labels, **kwargs)
    assert_close(loss, ref_loss, 2e-5, "loss")
    loss.backward()
    params = [hidden, lm_head.weight] + ([lm_head.bias] if with_bias else [])
    for p, r in zip(params, ref_grads):
        assert p.grad is not None
        assert_close(p.grad, r, 2e-5, "grad")


def test_epilogue_none_means_not_set(impl: str) -> None:
    g = torch.Generator().manual_seed(2)
    lm_head = head(False)
    hidden = torch.randn(B, T, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    plain = hf_loss(hidden, lm_head, labels, V, logits_bias=None, logit_scale_multiply=None,
                    logit_scale_divide=None, logit_softcapping=None)  # fmt: skip
    assert_close(plain, stock(hidden, lm_head, labels)[0], 2e-5, "loss with epilogue None")
    capped = hf_loss(hidden, lm_head, labels, vocab_size=V, logit_softcapping=1.5)
    assert_close(capped, stock(hidden, lm_head, labels, softcap=1.5)[0], 2e-5, "softcapped loss")


@pytest.mark.parametrize("end", [V - 6, V, V + 10, None, -4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_vocab_slice_cuts_the_head_as_the_logits(impl: str, end: int | None, with_bias: bool) -> None:
    """``vocab_slice_end`` (a padded vocabulary cut back, ``logits[..., :end]``, then the other epilogue steps):
    the loss and gradients of ForCausalLMLoss on the cut float64 logits, Python's slice rules included (an end past
    the vocabulary or None keeps it whole, a negative one drops the last columns); the cut rows get zero gradient."""
    g = torch.Generator().manual_seed(4)
    lm_head = head(with_bias, seed=4)
    kept = len(range(V)[:end])
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    labels = torch.randint(0, kept, (B, T), generator=g)
    labels[0, :3] = -100
    loss = hf_loss(hidden, lm_head, labels, None, vocab_slice_end=end, logit_softcapping=2.0)
    h = hidden.detach().double().requires_grad_()
    w = lm_head.weight.detach().double().requires_grad_()
    b = lm_head.bias.detach().double().requires_grad_() if lm_head.bias is not None else None
    logits = torch.nn.functional.linear(h, w, b)[..., :end]
    logits = torch.tanh(logits / 2.0) * 2.0
    ref = ForCausalLMLoss(logits, labels, kept)
    assert_close(loss, ref.detach(), 2e-5, "loss")
    loss.backward()
    leaves = [x for x in (h, w, b) if x is not None]
    params = [p for p in (hidden, lm_head.weight, lm_head.bias) if p is not None]
    for p, r in zip(params, torch.autograd.grad(ref, leaves), strict=True):
        assert p.grad is not None
        assert_close(p.grad, r, 2e-5, "grad")
    assert lm_head.weight.grad is not None and not lm_head.weight.grad[kept:].any()


def test_vocab_slice_checks_the_vocab_size_against_the_cut() -> None:
    lm_head = head(False)
    labels = torch.zeros(B, T, dtype=torch.long)
    with pytest.raises(ValueError, match=f"vocab_size: expected the head's output size {V - 5}, got {V}"):
        hf_loss(torch.randn(B, T, H), lm_head, labels, V, vocab_slice_end=V - 5)
    with pytest.raises(TypeError, match="vocab_slice_end: expected an int or None, got float"):
        hf_loss(torch.randn(B, T, H), lm_head, labels, None, vocab_slice_end=3.0)


def test_vocab_size_mismatch_raises() -> None:
    lm_head = head(False)
    with pytest.raises(ValueError, match=f"vocab_size: expected the head's output size {V}, got {V + 3}"):
        hf_loss(torch.randn(B, T, H), lm_head, torch.zeros(B, T, dtype=torch.long), V + 3)


def test_head_without_weight_raises() -> None:
    with pytest.raises(TypeError, match="lm_head: cannot fuse a torch.nn.modules.linear.Identity exactly"):
        hf_loss(torch.randn(B, T, H), torch.nn.Identity(), torch.zeros(B, T, dtype=torch.long), V)


TINY = dict(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, head_dim=8)  # fmt: skip


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "extra"),
    [
        (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, {"final_logit_softcapping": 2.0}),
    ],
    ids=["llama", "gemma2-softcap"],
)
def test_matches_stock_model_loss(impl: str, config_cls: Any, model_cls: Any, extra: dict[str, Any]) -> None:
    """hf_loss on a real model's hidden states and head equals the model's own (float32, materialised) loss."""
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **extra)).eval()
    ids = torch.randint(0, V, (B, T))
    labels = ids.clone()
    labels[0, :3] = -100
    stock_out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(8))
    stock_out.loss.backward()
    stock_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    hidden = model.model(input_ids=ids).last_hidden_state
    loss = hf_loss(hidden, model.lm_head, labels, model.vocab_size, num_items_in_batch=torch.tensor(8),
                   logit_softcapping=model.config.to_dict().get("final_logit_softcapping"))  # fmt: skip
    loss.backward()
    assert_close(loss, stock_out.loss, 1e-5, "loss")
    assert model.lm_head.weight.grad is not None
    assert_close(model.lm_head.weight.grad, stock_grad, 1e-4, "d_lm_head")


@pytest.mark.parametrize("num_items", [None, 11])
def test_masked_lm_loss_function_is_unshifted(impl: str, num_items: int | None) -> None:
    """``loss_function=ForMaskedLMLoss`` (T5Gemma's loss type): the labels as given, no shift, and a
    ``shift_labels`` keyword ignored as that loss ignores it; against it on float64 logits."""
    from transformers.loss.loss_utils import ForMaskedLMLoss

    g = torch.Generator().manual_seed(4)
    lm_head = head(True)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 4:] = -100
    ignored = torch.randint(0, V, (B, T), generator=g)
    loss = hf_loss(hidden, lm_head, labels, V, logit_softcapping=1.5, num_items_in_batch=num_items,
                   shift_labels=ignored, loss_function=ForMaskedLMLoss)  # fmt: skip
    loss.backward()
    h = hidden.detach().double().requires_grad_()
    w = lm_head.weight.detach().double().requires_grad_()
    logits = torch.tanh(torch.nn.functional.linear(h, w, lm_head.bias.detach().double()) / 1.5) * 1.5
    ref = ForMaskedLMLoss(logits, labels, V, num_items_in_batch=num_items, shift_labels=ignored)
    ref_h, ref_w = torch.autograd.grad(ref, [h, w])
    assert_close(loss, ref, 2e-5, "loss")
    assert_close(hidden.grad, ref_h, 2e-5, "d_hidden")
    assert_close(lm_head.weight.grad, ref_w, 2e-5, "d_weight")


def test_other_loss_function_raises() -> None:
    from transformers.loss.loss_utils import ForTokenClassification

    with pytest.raises(TypeError, match="loss_function: expected transformers' ForCausalLMLoss or ForMaskedLMLoss"):
        hf_loss(torch.randn(B, T, H), head(False), torch.zeros(B, T, dtype=torch.long), V,
                loss_function=ForTokenClassification)  # fmt: skip



def test_per_token_capture_follows_trls_shift_whatever_the_models_loss() -> None:
    """TRL's fused-head contract scores position t against labels[t+1] (no ``shift_labels``): a model whose own
    loss is ForMaskedLMLoss still gets shifted per-token fields from the drop-in."""
    from transformers.loss.loss_utils import ForMaskedLMLoss

    from logitless import _state

    g = torch.Generator().manual_seed(5)
    lm_head = head(False)
    hidden = torch.randn(B, T, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    capture = _state.Capture(temperature=1.0, outputs=frozenset({"log_probs"}))
    with _state.capturing(capture):
        hf_loss(hidden, lm_head, labels, V, loss_function=ForMaskedLMLoss)
    assert capture.result is not None
    logp = torch.log_softmax(torch.nn.functional.linear(hidden.double(), lm_head.weight.detach().double()), dim=-1)
    expected = logp[:, :-1].gather(-1, labels[:, 1:].unsqueeze(-1)).squeeze(-1)
    assert_close(capture.result["log_probs"], expected, 2e-5, "shifted log_probs")
