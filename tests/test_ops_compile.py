"""The op inside torch machinery: torch.library checks, torch.compile(fullgraph=True), fork()ed workers."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest
import torch
from ops_reference import assert_close, reference

import logitless.ops  # noqa: F401 - registers the torch.library ops
from logitless.ops import linear_cross_entropy

IMPLS = ["rust", "torch"]
B, T, H, V = 2, 5, 8, 13


def make(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("extra", [(), (0.8, True)], ids=["defaults", "temperature+stats"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck(impl: str, reduction: str, extra: tuple) -> None:
    """Schema, fake implementation, autograd registration and AOT dispatch agree with the real op."""
    hidden, weight, bias, labels = make()
    args = (hidden.reshape(-1, H), weight, bias, labels.reshape(-1), torch.randn(V), None, -100, 0.1, 0.01, 1.5,
            0.0, 3.0, reduction, impl, True, False, True, *extra)  # fmt: skip
    torch.library.opcheck(torch.ops.logitless.linear_cross_entropy.default, args)
    if reduction == "none":
        # The backward op itself is never differentiated (double backward raises first): plain tensors.
        hidden, weight, bias = hidden.detach(), weight.detach(), bias.detach()
        rows = (hidden.reshape(-1, H), weight, bias, labels.reshape(-1), None, torch.rand(B * T), -100, 0.0, 0.0,
                0.0, 2.0, 0.0, impl, True, True, False, *extra[:1])  # fmt: skip
        torch.library.opcheck(torch.ops.logitless.linear_cross_entropy_rows_backward.default, rows)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_opcheck_with_a_low_rank_term(reduction: str) -> None:
    hidden, weight, bias, labels = make()
    g = torch.Generator().manual_seed(2)
    a = torch.randn(B * T, 3, generator=g, requires_grad=True)
    b = torch.randn(V, 3, generator=g, requires_grad=True)
    args = (hidden.reshape(-1, H), weight.detach(), bias.detach(), labels.reshape(-1), None, None, -100, 0.0, 0.0,
            0.0, 0.0, 3.0, reduction, "torch", True, False, False, 0.0, False, a, b, True)  # fmt: skip
    torch.library.opcheck(torch.ops.logitless.linear_cross_entropy.default, args)


def test_compile_fullgraph_with_a_low_rank_term() -> None:
    """A LoRA-style term (``a = 2 · x·Aᵀ``) traced with the op, against float64 materialised logits."""
    torch._dynamo.reset()
    hidden, weight, _, labels = make()
    weight.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    lora_a = torch.randn(3, H, generator=g, requires_grad=True)
    lora_b = torch.randn(V, 3, generator=g, requires_grad=True)

    def fn(x: torch.Tensor, w: torch.Tensor, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(x, w, labels, low_rank=(2.0 * x @ la.T, lb), logit_softcapping=4.0)

    loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(hidden, weight, lora_a, lora_b)
    got = torch.autograd.grad(loss, [hidden, lora_a, lora_b])
    x64, la64, lb64 = (t.detach().double().requires_grad_() for t in (hidden, lora_a, lora_b))
    logits = x64 @ weight.double().T + (2.0 * x64 @ la64.T) @ lb64.T
    logits = 4.0 * torch.tanh(logits / 4.0)
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    expected = torch.autograd.grad(ref, [x64, la64, lb64])
    assert_close(loss, ref, 2e-5, "compiled loss")
    for name, a, e in zip(("hidden", "lora_A", "lora_B"), got, expected):
        assert_close(a, e, 2e-5, f"compiled d_{name}")


def step(impl: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor) -> Any:
    # Something around the op, so the graph has more than one node on each side of it.
    h = torch.nn.functional.silu(hidden) * 1.5
    return 2.0 * linear_cross_entropy(h, weight, labels, bias=bias, impl=impl, label_smoothing=0.1,
                                      num_items_in_batch=torch.tensor(7), logit_softcapping=4.0)  # fmt: skip


def step_none(impl: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor) -> Any:
    per_row = linear_cross_entropy(hidden, weight, labels, bias=bias, impl=impl, reduction="none", z_loss=1e-2)
    return (per_row * torch.linspace(0.5, 1.5, T)).sum()


def compare_compiled(fn: Any, impl: str, backend: str) -> None:
    hidden, weight, bias, labels = make()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    loss = compiled(impl, hidden, weight, bias, labels)
    loss.backward()
    got = [t.grad.clone() for t in (hidden, weight, bias) if t.grad is not None]
    for t in (hidden, weight, bias):
        t.grad = None
    # Reference: the same function with the op replaced by float64 materialised logits.
    h64 = hidden.detach().double().requires_grad_()
    w64, b64 = (weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_())
    if fn is step:
        ref = 2.0 * reference(torch.nn.functional.silu(h64) * 1.5, w64, labels, bias=b64, label_smoothing=0.1,
                              num_items_in_batch=7, logit_softcapping=4.0).loss  # fmt: skip
        ref_loss = ref
        # Gradients: chain through silu by hand-free means (autograd on the float64 graph).
        h_in = torch.nn.functional.silu(h64) * 1.5
        r = reference(h_in.detach().requires_grad_(), w64, labels, bias=b64, label_smoothing=0.1,
                      num_items_in_batch=7, logit_softcapping=4.0, grad_output=2.0)  # fmt: skip
        assert r.d_hidden is not None
        (d_h,) = torch.autograd.grad(h_in, h64, r.d_hidden)
        ref_grads = [d_h, r.d_weight, r.d_bias]
    else:
        go = torch.linspace(0.5, 1.5, T).expand(B, T)
        r = reference(h64, w64, labels, bias=b64, reduction="none", z_loss=1e-2, grad_output=go)
        ref_loss = (r.loss * go.double()).sum()
        ref_grads = [r.d_hidden, r.d_weight, r.d_bias]
    assert_close(loss, ref_loss, 2e-5, "compiled loss")
    assert len(got) == 3
    for name, a, e in zip(("hidden", "weight", "bias"), got, ref_grads):
        assert e is not None
        assert_close(a, e, 2e-5, f"compiled d_{name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fn", [step, step_none], ids=["mean", "none"])
def test_compile_fullgraph(impl: str, fn: Any) -> None:
    """fullgraph=True fails on any graph break, so this proves the op traces (fake impl + autograd formula)."""
    torch._dynamo.reset()
    compare_compiled(fn, impl, "aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor() -> None:
    """The default backend, once (inductor compiles C++ here: slow on 2 cores)."""
    torch._dynamo.reset()
    compare_compiled(step, "rust", "inductor")


def test_compiled_out_of_range_label_still_raises() -> None:
    torch._dynamo.reset()
    hidden, weight, bias, labels = make()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled("rust", hidden, weight, bias, labels)
    labels[1, 2] = V
    with pytest.raises(ValueError, match=f"target {V}"):
        compiled("rust", hidden, weight, bias, labels)


def _child(queue: Any) -> None:
    # autograd's engine cannot run in a fork()ed child (a torch limitation), so call the op directly: its forward
    # returns the gradients too, computed by the kernel like in training.
    hidden, weight, bias, labels = make(seed=1)
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    with torch.no_grad():
        loss, d_hidden, d_weight, *_ = torch.ops.logitless.linear_cross_entropy(
            hidden.reshape(-1, H), weight, bias, targets, None, None, -100, 0.0, 0.0, 0.0, 0.0, 0.0, "mean", "rust",
            True, True, True,
        )  # fmt: skip
    # Plain lists: torch would share tensors through file descriptors that die with the child.
    queue.put((float(loss), d_hidden.reshape(B, T, H).tolist(), d_weight.tolist()))


def test_fork_after_parallel_use_runs_in_child() -> None:
    """A DataLoader-style fork() after the kernel's thread pool started: the child must not hang on dead workers."""
    big = torch.randn(512, 64), torch.randn(2048, 64), torch.randint(0, 2048, (512,))
    linear_cross_entropy(*big, impl="rust")  # parent: starts the pool
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue,))
    proc.start()
    try:
        loss, d_hidden, d_weight = queue.get(timeout=60)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    hidden, weight, bias, labels = make(seed=1)
    ref = reference(hidden, weight, labels, bias=bias)
    assert_close(torch.tensor(loss), ref.loss, 2e-5, "child loss")
    assert_close(torch.tensor(d_hidden), ref.d_hidden, 2e-5, "child d_hidden")
    assert_close(torch.tensor(d_weight), ref.d_weight, 2e-5, "child d_weight")
    # And the parent still works afterwards.
    assert torch.isfinite(linear_cross_entropy(*big, impl="rust"))
