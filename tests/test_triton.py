"""``impl="triton"`` through Triton's interpreter on CPU tensors (no GPU needed), against float64 references.

TRITON_INTERPRET is read when ``@triton.jit`` decorates (Triton's own library functions included), so
tests/conftest.py sets it before anything imports Triton, on machines without an NVIDIA GPU. Shapes stay small:
the interpreter runs a kernel's blocks in numpy (about 1 s for a 64 x 32000 row pass).
"""

from __future__ import annotations

import os

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a GPU machine: the kernels are checked on the device by bench/cuda_compare.py", allow_module_level=True)
import torch  # noqa: E402
from ops_reference import TOLERANCES, assert_close, epilogue64, reference  # noqa: E402

import logitless  # noqa: E402
from logitless import _options, torch_path  # noqa: E402

pytest.importorskip("triton")
from logitless import triton_path  # noqa: E402


@pytest.fixture(autouse=True)
def _kernels_really_ran() -> None:
    """Under the interpreter a kernel failure raises (no fallback); and no test leaves a fallback recorded."""
    yield
    assert not triton_path._broken, triton_path._broken

N, H, V = 24, 16, 1300  # V spans two kernel blocks of 1024 and is not a multiple of one

EPILOGUES = {
    "plain": {},
    "bias-in-linear": {"bias": True},
    "logits-bias": {"logits_bias": True},
    "multiply": {"logit_scale_multiply": 2.5},
    "divide": {"logit_scale_divide": 0.4},
    "softcap": {"logit_softcapping": 2.0},
    "smoothing": {"label_smoothing": 0.2},
    "z-loss": {"z_loss": 1e-2},
    "all": {"bias": True, "logits_bias": True, "logit_scale_multiply": 1.5, "logit_scale_divide": 0.8,
            "logit_softcapping": 3.0, "label_smoothing": 0.1, "z_loss": 1e-3},
}  # fmt: skip


def _problem(n: int = N, v: int = V, dtype: torch.dtype = torch.float32, seed: int = 0, **spec: object) -> dict:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, H, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = v - 1  # the last column
    labels[2:5] = -100
    kw: dict = {k: val for k, val in spec.items() if k not in ("bias", "logits_bias")}
    if spec.get("bias"):
        kw["bias"] = torch.randn(v, generator=g).to(dtype).requires_grad_()
    if spec.get("logits_bias"):
        kw["logits_bias"] = torch.randn(v, generator=g)
    return {"hidden": hidden, "weight": weight, "labels": labels, **kw}


def _check(p: dict, *, reduction: str = "mean", **call: object) -> None:
    loss = logitless.linear_cross_entropy(
        p["hidden"], p["weight"], p["labels"], shift=False, impl="triton", reduction=reduction,
        **{k: v for k, v in p.items() if k not in ("hidden", "weight", "labels")}, **call,
    )  # fmt: skip
    go = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape) if reduction == "none" else torch.tensor(1.0)
    (loss * go).sum().backward()
    ref = reference(
        p["hidden"], p["weight"], p["labels"], shift=False, reduction=reduction, grad_output=go,
        **{k: v for k, v in p.items() if k not in ("hidden", "weight", "labels")}, **call,
    )  # fmt: skip
    tol_loss, tol_grad = TOLERANCES[p["hidden"].dtype]
    assert_close(loss, ref.loss, tol_loss, "loss")
    assert_close(p["hidden"].grad, ref.d_hidden, tol_grad, "d_hidden")
    assert_close(p["weight"].grad, ref.d_weight, tol_grad, "d_weight")
    if p.get("bias") is not None:
        assert_close(p["bias"].grad, ref.d_bias, tol_grad, "d_bias")


@pytest.mark.parametrize("name", list(EPILOGUES))
def test_every_epilogue_alone_and_together(name: str) -> None:
    _check(_problem(**EPILOGUES[name]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction: str) -> None:
    _check(_problem(**EPILOGUES["all"]), reduction=reduction)


def test_num_items_in_batch() -> None:
    _check(_problem(logit_softcapping=2.0), num_items_in_batch=37)


@pytest.mark.parametrize("chunk_mb", [0.05, 64])
def test_one_chunk_and_many_with_boundaries(chunk_mb: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """0.05 MiB: 4 rows of V=1300 float32 temporaries per chunk, so 24 rows (19 scored) split 5 ways."""
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", str(chunk_mb))
    _check(_problem(**EPILOGUES["all"]))


def test_fully_ignored_rows_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", "0.05")
    p = _problem()
    p["labels"][:12] = -100  # whole chunks without a target
    _check(p)
    q = _problem()
    q["labels"][:] = -100
    loss = logitless.linear_cross_entropy(q["hidden"], q["weight"], q["labels"], shift=False, impl="triton")
    loss.backward()
    assert float(loss.detach()) == 0.0 and not q["hidden"].grad.any() and not q["weight"].grad.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    _check(_problem(dtype=dtype, **EPILOGUES["all"]))


def test_accumulate_and_recompute_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 weight gradient: a float32 V x H accumulator, or slab by slab from each row's saved log-sum-exp (the
    slab kernel); both against the reference, and with each other to within one bf16 rounding."""
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", "0.05")  # several chunks and several slabs
    grads = {}
    for mode in ("accumulate", "recompute"):
        monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", mode)
        p = _problem(dtype=torch.bfloat16, **EPILOGUES["all"])
        _check(p)
        grads[mode] = p["weight"].grad.double()
    scale = float(grads["accumulate"].abs().max())
    assert float((grads["accumulate"] - grads["recompute"]).abs().max()) <= scale * 2**-7


def test_per_token_outputs_at_a_temperature() -> None:
    """log-probs (differentiable), entropy, mean logit, log Σp² and top-1 against float64 log_softmax."""
    p = _problem(v=700, logit_softcapping=3.0)
    temperature = 0.7
    loss, stats = logitless.linear_cross_entropy(
        p["hidden"], p["weight"], p["labels"], shift=False, impl="triton", reduction="none", temperature=temperature,
        logit_softcapping=3.0, return_token_stats=True,
    )  # fmt: skip
    h, w = p["hidden"].detach().double().requires_grad_(), p["weight"].detach().double().requires_grad_()
    z = 3.0 * torch.tanh((h @ w.T) / 3.0) / temperature
    logp = torch.log_softmax(z, dim=-1)
    keep = p["labels"] != -100
    t = torch.where(keep, p["labels"], 0)
    nll = torch.where(keep, -logp.gather(1, t[:, None])[:, 0], 0.0)
    prob = logp.exp()
    entropy = torch.where(keep, -(prob * logp).sum(-1), 0.0)
    mean = torch.where(keep, z.mean(-1), 0.0)
    log_sum_sq = torch.where(keep, torch.logsumexp(2 * logp, -1), 0.0)
    top1 = keep & (z.argmax(-1) == t)
    assert_close(loss, nll, 2e-5, "nll")
    assert_close(stats.entropy, entropy.detach(), 2e-5, "entropy")
    assert_close(stats.mean_logits, mean.detach(), 2e-5, "mean logit")
    assert_close(stats.log_sum_sq_probs, log_sum_sq.detach(), 2e-5, "log Σp²")
    assert torch.equal(stats.is_top1, top1)
    u = torch.linspace(0.5, 1.5, N)
    (loss * u).sum().backward()
    (nll * u).sum().backward()
    assert_close(p["hidden"].grad, h.grad, 2e-5, "d_hidden")
    assert_close(p["weight"].grad, w.grad, 2e-5, "d_weight")


def test_top1_ties_go_to_the_lowest_index_across_blocks() -> None:
    """Two equal maxima, one in each kernel block: the first wins, as ``argmax``."""
    hidden = torch.ones(2, 1)
    weight = torch.zeros(1300, 1)
    weight[5, 0] = weight[1200, 0] = 1.0
    labels = torch.tensor([5, 1200])
    _, stats = logitless.linear_cross_entropy(hidden, weight, labels, shift=False, impl="triton", reduction="none",
                                              return_token_stats=True)  # fmt: skip
    assert stats.is_top1.tolist() == [True, False]


def test_matches_the_torch_path_bitwise_close_and_repeatable() -> None:
    """Two runs give identical results (no atomics); the torch path agrees to float32 rounding."""
    runs = []
    for impl in ("triton", "triton", "torch"):
        p = _problem(**EPILOGUES["all"])
        loss = logitless.linear_cross_entropy(p["hidden"], p["weight"], p["labels"], shift=False, impl=impl,
                                              **{k: v for k, v in p.items() if k not in ("hidden", "weight", "labels")})  # fmt: skip
        loss.backward()
        runs.append((loss.detach(), p["hidden"].grad, p["weight"].grad))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[2]):
        assert_close(a, b, 1e-5, "triton vs torch")


def test_bad_inputs_rejected_as_on_the_other_paths() -> None:
    p = _problem()
    with pytest.raises(ValueError, match=r"labels: target 1300 .* outside \[0, 1300\)"):
        bad = p["labels"].clone()
        bad[0] = V
        logitless.linear_cross_entropy(p["hidden"], p["weight"], bad, shift=False, impl="triton")
    with pytest.raises(TypeError, match="weight: expected dtype"):
        logitless.linear_cross_entropy(p["hidden"], p["weight"].double(), p["labels"], shift=False, impl="triton")
    with pytest.raises(ValueError, match="logit_softcapping"):
        logitless.linear_cross_entropy(p["hidden"], p["weight"], p["labels"], impl="triton", logit_softcapping=float("inf"))


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    p = _problem()
    with pytest.raises(ValueError, match='impl="triton": expected CUDA tensors, got device cpu'):
        logitless.linear_cross_entropy(p["hidden"], p["weight"], p["labels"], impl="triton")


def test_the_row_pass_is_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter really ran the Triton kernels: with the torch row and slab passes made to fail, impl="triton"
    still computes (no silent fallback)."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the torch row pass ran under impl='triton'")

    monkeypatch.setattr(torch_path, "torch_row_pass", forbidden)
    monkeypatch.setattr(torch_path, "torch_slab_pass", forbidden)
    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", "recompute")
    _check(_problem(dtype=torch.bfloat16, **EPILOGUES["all"]))
    assert not triton_path._broken


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_mb", [0.05, 64])
def test_gradient_written_in_the_gemm_dtype(
    dtype: torch.dtype, chunk_mb: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What CUDA does for bf16/f16 inputs: the kernel rounds the logits gradient once into the inputs' dtype as it
    writes it (no float32 gradient, no cast pass). Loss and gradients against float64, one chunk and many."""
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", str(chunk_mb))
    p = _problem(dtype=dtype, **{k: v for k, v in EPILOGUES["all"].items() if k != "bias"})
    opts = _options.parse(
        device=p["hidden"].device, vocab=V, ignore_index=-100, impl="triton",
        **{k: v for k, v in p.items() if k not in ("hidden", "weight", "labels")},
    )  # fmt: skip
    seen: list[torch.dtype] = []

    def row_pass(*args: object, **kw: object) -> torch_path.RowPass:
        out = triton_path.row_pass(*args, **kw)
        assert out.grad is not None
        seen.append(out.grad.dtype)
        return out

    n = int((p["labels"] != -100).sum())
    res = torch_path.fused_lce(
        p["hidden"].detach(), p["weight"].detach(), None, p["labels"], opts, grad_scale=torch.tensor(1.0 / n),
        row_scale=None, want_per_row=False, need_d_hidden=True, need_d_weight=True, need_d_bias=False,
        compact=False, low_precision_grad=True, row_pass=row_pass,
    )  # fmt: skip
    assert seen and set(seen) == {dtype}
    ref = reference(
        p["hidden"].requires_grad_(), p["weight"].requires_grad_(), p["labels"], shift=False,
        **{k: v for k, v in p.items() if k not in ("hidden", "weight", "labels")},
    )  # fmt: skip
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert_close(res.loss_sum / n, ref.loss, tol_loss, "loss")
    assert_close(res.d_hidden, ref.d_hidden, tol_grad, "d_hidden")
    assert_close(res.d_weight, ref.d_weight, tol_grad, "d_weight")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slab_kernel_stores_in_the_gemm_dtype(dtype: torch.dtype) -> None:
    """The slab kernel (recompute, and the vocabulary-parallel loss on CUDA) writing a bf16/f16 gradient: the float32
    one it writes in place, rounded (the interpreter truncates where a GPU rounds: one ulp)."""
    p = _problem(**{k: v for k, v in EPILOGUES["all"].items() if k != "bias"})
    opts = _options.parse(
        device=p["hidden"].device, vocab=V, ignore_index=-100, impl="triton",
        **{k: v for k, v in p.items() if k not in ("hidden", "weight", "labels")},
    )  # fmt: skip
    y = (p["hidden"].detach() @ p["weight"].detach()[300:1200].T).contiguous()
    t = p["labels"].clamp(min=0)
    lse = torch.logsumexp(p["hidden"].detach() @ p["weight"].detach().T, dim=1)  # any per-row value will do
    s = torch.linspace(0.0, 1.0, N)
    exact = triton_path.slab_pass(y.clone(), t, lse, s, opts, v0=300, vocab=V)
    rounded = triton_path.slab_pass(y.clone(), t, lse, s, opts, v0=300, vocab=V, grad_dtype=dtype)
    assert rounded.dtype == dtype and exact.dtype == torch.float32
    ulp = exact.abs() * torch.finfo(dtype).eps + torch.finfo(dtype).tiny
    assert bool(((rounded.double() - exact.double()).abs() <= ulp.double()).all())
    assert bool((exact != 0).any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize("programs", [0, 64])  # one program per row, or rows split into parts
def test_rounded_gradient_over_its_own_logits(
    dtype: torch.dtype, stats: bool, programs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rounded gradient written over the first half of each row's float32 logits (no second buffer) equals,
    bit for bit, the one written into a buffer of its own, for the row and slab kernels, every epilogue on; split
    rows (parts run in parallel) keep a buffer."""
    monkeypatch.setattr(triton_path, "_INTERPRETED_PROGRAMS", programs)
    p = _problem(n=8, **{k: v for k, v in EPILOGUES["all"].items() if k != "bias"})
    opts = _options.parse(
        device=p["hidden"].device, vocab=V, ignore_index=-100, impl="triton",
        **{k: v for k, v in p.items() if k not in ("hidden", "weight", "labels")},
    )  # fmt: skip
    logits = p["hidden"].detach() @ p["weight"].detach().T
    t = p["labels"].clamp(min=0)
    s = torch.linspace(0.0, 1.0, 8)

    def row(alias: bool) -> tuple[torch.Tensor, torch.Tensor]:
        y = logits.clone()
        with monkeypatch.context() as m:
            if not alias:
                m.setattr(triton_path, "aliased_gradient", lambda *a: None)
            out = triton_path.row_pass(y, t, s, opts, vocab=V, want_stats=stats, grad=True, grad_dtype=dtype)
        assert out.grad is not None and out.grad.dtype == dtype and out.grad.shape == y.shape
        return out.grad, y

    aliased, y = row(True)
    separate, _ = row(False)
    assert torch.equal(aliased, separate)
    split = programs > 0 and not stats
    assert (aliased.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()) != split
    lse = torch.logsumexp(logits, dim=1)
    y = logits[:, 300:1200].contiguous()
    slab = triton_path.slab_pass(y, t, lse, s, opts, v0=300, vocab=V, grad_dtype=dtype)
    assert slab.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    monkeypatch.setattr(triton_path, "aliased_gradient", lambda *a: None)
    own = triton_path.slab_pass(logits[:, 300:1200].contiguous(), t, lse, s, opts, v0=300, vocab=V, grad_dtype=dtype)
    assert torch.equal(slab, own) and bool((own != 0).any())


def test_shard_pass_and_its_torch_fallback_against_float64() -> None:
    """A vocabulary shard's log-sum-exp, target logit (0 off the shard) and logit sum, through every epilogue: the
    kernel, and the torch ops a GPU without a working kernel falls back to."""
    p = _problem(**{k: v for k, v in EPILOGUES["all"].items() if k != "bias"})
    opts = _options.parse(
        device=p["hidden"].device, vocab=V, ignore_index=-100, impl="triton",
        **{k: v for k, v in p.items() if k not in ("hidden", "weight", "labels")},
    )  # fmt: skip
    v0, v1 = 300, 1250
    y = (p["hidden"].detach() @ p["weight"].detach()[v0:v1].T).contiguous()
    t = p["labels"].clamp(min=0)
    t_local = torch.where((t >= v0) & (t < v1), t - v0, -1)
    assert bool((t_local >= 0).any()) and bool((t_local < 0).any())
    z = epilogue64(
        y.double(), logits_bias=p["logits_bias"][v0:v1], logit_scale_multiply=1.5, logit_scale_divide=0.8,
        logit_softcapping=3.0,
    )  # fmt: skip
    want = (
        torch.logsumexp(z, dim=1),
        torch.where(t_local >= 0, z.gather(1, t_local.clamp(min=0)[:, None])[:, 0], 0.0),
        z.sum(dim=1),
    )
    before = y.clone()
    for got in (triton_path.shard_pass(y, t_local, opts, v0=v0), triton_path.torch_shard_pass(y, t_local, opts, v0=v0)):
        for g, w, what in zip(got, want, ("lse", "target logit", "sum")):
            assert_close(g, w, 2e-5, what)
    assert torch.equal(y, before)


SPLIT_V = 3000  # three parts of whole 1024-column blocks, the last one short


def _split(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows split into parts (as a GPU splits few-row chunks); returns the part counts of the split launches."""
    monkeypatch.setattr(triton_path, "_INTERPRETED_PROGRAMS", 1000)
    launched: list[int] = []
    real = triton_path._split_row_pass

    def counting(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        launched.append(int(args[-1]))  # type: ignore[call-overload]
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_path, "_split_row_pass", counting)
    return launched


@pytest.mark.parametrize("name", ["plain", "softcap", "smoothing", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_split_into_parts(name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Few rows and a long vocabulary: each row's columns in parts (statistics per part, combined per row, the
    gradient per part), against float64; the target in the first, a middle and the last part."""
    launched = _split(monkeypatch)
    p = _problem(v=SPLIT_V, dtype=dtype, **EPILOGUES[name])
    p["labels"][5:8] = torch.tensor([1500, 2999, 2047])
    _check(p)
    assert launched and set(launched) == {3}


def test_split_rows_with_recompute_per_token_and_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    launched = _split(monkeypatch)
    monkeypatch.setenv("LOGITLESS_CHUNK_MB", "0.2")  # a few rows per chunk
    monkeypatch.setenv("LOGITLESS_WEIGHT_GRAD", "recompute")
    _check(_problem(v=SPLIT_V, dtype=torch.bfloat16, **EPILOGUES["all"]), reduction="none")
    assert len(launched) > 1


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: the unused 0·inf
@pytest.mark.parametrize("split", [False, True])
def test_a_block_of_minus_infinity_logits(split: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A logits bias of -inf over whole blocks (masked columns, the first block included): their probabilities are
    0, not NaN, in one program per row and in parts."""
    if split:
        _split(monkeypatch)
    p = _problem(v=SPLIT_V, logits_bias=True)
    p["logits_bias"][:1100] = float("-inf")
    p["logits_bias"][2048:] = float("-inf")
    p["labels"] = torch.where(p["labels"] == -100, -100, 1100 + p["labels"] % 900)
    _check(p)
    assert torch.isfinite(p["hidden"].grad).all() and torch.isfinite(p["weight"].grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_scales_the_saved_gradients_in_place(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream gradient other than 1 scales the forward's gradients in place through the kernel that reads the
    factor on the device: the product of torch's ``d * g`` (exact in float32; one bf16 ulp where the interpreter
    truncates). With retain_graph the saved gradients are left intact (torch's product instead) for the next
    backward, which then scales them in place."""
    calls: list[float] = []
    real = triton_path.scale_

    def spying(xs: list[torch.Tensor], factor: torch.Tensor) -> bool:
        calls.append(float(factor))
        return real(xs, factor)

    monkeypatch.setattr(triton_path, "scale_", spying)
    p = _problem(dtype=dtype, **EPILOGUES["all"])
    loss = logitless.linear_cross_entropy(
        p["hidden"], p["weight"], p["labels"], shift=False, impl="triton",
        **{k: v for k, v in p.items() if k not in ("hidden", "weight", "labels")},
    )  # fmt: skip
    (loss * 0.37).backward(retain_graph=True)
    assert calls == []
    kept = [t.grad.clone() for t in (p["hidden"], p["weight"], p["bias"])]
    for t in (p["hidden"], p["weight"], p["bias"]):
        t.grad = None
    (loss * 0.37).backward()
    assert calls and all(c == pytest.approx(0.37) for c in calls)
    ref = reference(
        p["hidden"], p["weight"], p["labels"], shift=False, grad_output=torch.tensor(0.37),
        **{k: v for k, v in p.items() if k not in ("hidden", "weight", "labels")},
    )  # fmt: skip
    _, tol_grad = TOLERANCES[dtype]
    for got, before, want, what in zip(
        (p["hidden"].grad, p["weight"].grad, p["bias"].grad), kept, (ref.d_hidden, ref.d_weight, ref.d_bias),
        ("d_hidden", "d_weight", "d_bias"),
    ):  # fmt: skip
        assert_close(got, want, tol_grad, what)
        assert_close(before, want, tol_grad, what)
        if dtype == torch.float32:
            assert torch.equal(got, before)
        else:
            ulp = before.double().abs() * torch.finfo(dtype).eps + torch.finfo(dtype).tiny
            assert bool(((got.double() - before.double()).abs() <= ulp).all())


@pytest.mark.parametrize("programs", [4096, 3])  # one block per program, or blocks strided over few programs
def test_scale_kernel_in_place_and_a_factor_of_one(programs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_path, "_SCALE_MAX_PROGRAMS", programs)
    x = torch.randn(10_000).to(torch.bfloat16)
    for factor in (1.0, -2.5):
        y = x.clone()
        assert triton_path.scale_([y], torch.tensor(factor))
        want = (x.float() * factor).to(torch.bfloat16)  # one bf16 ulp: the interpreter truncates, a GPU rounds
        assert bool(((y.double() - want.double()).abs() <= want.double().abs() * 2**-7).all())
    y = x.clone()
    assert triton_path.scale_([y], torch.tensor(float("nan"))) and bool(torch.isnan(y).all())
    z = torch.randn(10_000)
    want32 = z * torch.tensor(0.3)
    assert triton_path.scale_([z], torch.tensor(0.3)) and torch.equal(z, want32)  # float32: torch's product exactly
    assert triton_path.scale_([torch.empty(0)], torch.tensor(3.0))
    assert not triton_path.scale_([torch.randn(4, dtype=torch.float64)], torch.tensor(2.0))
    assert not triton_path.scale_([torch.randn(4, 4).T], torch.tensor(2.0))
    assert not triton_path.scale_([torch.randn(4)], torch.tensor(2.0, dtype=torch.float64))


@pytest.mark.parametrize("programs", [4096, 2])
def test_scale_kernel_takes_several_tensors_in_one_launch(programs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Backward's gradients (up to three per launch, of any sizes and float dtypes) scaled together: each equals
    torch's float32 product; with one tensor it cannot take, none is touched."""
    monkeypatch.setattr(triton_path, "_SCALE_MAX_PROGRAMS", programs)
    launches: list[int] = []
    real = triton_path._scale_kernel

    class Counting:
        def __getitem__(self, grid: tuple[int]) -> object:
            launches.append(grid[0])
            return real[grid]

    monkeypatch.setattr(triton_path, "_scale_kernel", Counting())
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=g) for n in (5000, 37, 2500, 1)] + [torch.randn(0), torch.randn(3, 7, generator=g)]
    wants = [x * torch.tensor(-0.7) for x in xs]
    assert triton_path.scale_(xs, torch.tensor(-0.7))
    assert len(launches) == 2  # five non-empty tensors: three, then two
    for x, want in zip(xs, wants):
        assert torch.equal(x, want)
    before = [x.clone() for x in xs]
    assert not triton_path.scale_([*xs, torch.randn(4, 4).T], torch.tensor(2.0))
    for x, kept in zip(xs, before):
        assert torch.equal(x, kept)


def _rows_reference(
    targets: list[int], v: int, ignore: int, weights: list[float] | float | None, mean: bool, sort: bool
) -> tuple[list[bool], int, list[int], list[float], bool, list[int] | None]:
    """``Rows`` from their definitions, in plain Python (float32 arithmetic through one-element tensors)."""
    valid = [t != ignore for t in targets]
    count = sum(valid)
    order = [i for i, ok in enumerate(valid) if ok] + [i for i, ok in enumerate(valid) if not ok]
    inv = (torch.tensor(1.0) / torch.tensor(float(max(count, 1)))).item()  # float32, correctly rounded

    def weight(i: int) -> float:
        if not valid[i]:
            return 0.0
        if mean:
            return inv
        if weights is None:
            return 1.0
        w = weights[i] if isinstance(weights, list) else weights
        return torch.tensor(w, dtype=torch.float32).item()

    t_rows = [min(max(t, 0), v - 1) if ok else 0 for t, ok in zip(targets, valid)]
    in_range = all(0 <= t < v for t, ok in zip(targets, valid) if ok)
    at = order if sort else list(range(len(targets)))
    return ([valid[i] for i in at], count, [t_rows[i] for i in at], [weight(i) for i in at], in_range,
            order if sort else None)  # fmt: skip


@pytest.mark.parametrize("n", [1, 7, 1023, 1024, 1025, 2600])
@pytest.mark.parametrize("ignored", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("weights", ["mean", "none", "rows-bf16", "rows-f32", "scalar"])
def test_rows_kernel_against_their_definitions(
    n: int, ignored: float, weights: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows kernel (one program: the count, then each row at its place) against plain Python: validity, count,
    clamped target, gradient weight (the mean's float32 1/count to the bit; a row weight of any float dtype, or one
    for all; 0 where ignored, even a NaN weight), the in-range flag, and argsort's stable scored-first order, over
    block boundaries (1024) and with out-of-range targets and a non-default ignore_index among them."""
    asserted: list[bool] = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: asserted.append(bool(cond)))
    g = torch.Generator().manual_seed(n)
    v, ignore = 50, 7
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = ignore
    if n > 5 and ignored < 1.0:
        targets[3], targets[4] = v, -1  # out of range (scored, unless the draw ignored them)
    w: torch.Tensor | None = None
    if weights.startswith("rows"):
        w = torch.randn(n, generator=g).to(torch.bfloat16 if weights == "rows-bf16" else torch.float32)
        w[targets == ignore] = float("nan")  # an ignored row's upstream value never reaches its weight
    elif weights == "scalar":
        w = torch.tensor(0.37)
    for sort in (False, True):
        asserted.clear()
        got = triton_path.rows(targets, v, ignore, torch.float32, mean_over_count=weights == "mean", weights=w,
                               sort=sort)  # fmt: skip
        assert got is not None
        plain = None if w is None else w.tolist() if w.dim() else w.item()
        want = _rows_reference(targets.tolist(), v, ignore, plain, weights == "mean", sort)
        assert got.valid.dtype == torch.bool and got.valid.tolist() == want[0]
        assert got.count.dtype == torch.int64 and got.count.item() == want[1]
        assert got.t.dtype == torch.int64 and got.t.tolist() == want[2]
        assert got.s.dtype == torch.float32 and got.s.tolist() == want[3]
        assert bool(got.in_range) == want[4] and asserted == [want[4]]
        assert (got.order.tolist() if got.order is not None else None) == want[5]
        if sort:
            assert torch.equal(got.order, torch.argsort((targets != ignore).to(torch.uint8), descending=True,
                                                        stable=True))  # fmt: skip


def test_rows_kernel_mean_over_the_count_before_any_weight() -> None:
    """As torch_path._rows: asked for the mean over the scored count, the weights given are not read."""
    t = torch.tensor([1, -100, 3, 4])
    got = triton_path.rows(t, 5, -100, torch.float32, mean_over_count=True, weights=torch.tensor(9.0), sort=False)
    assert got is not None and torch.equal(got.s, torch.tensor([1.0, 0.0, 1.0, 1.0]) / 3)


def test_rows_kernel_leaves_to_torch_what_it_does_not_take() -> None:
    t = torch.tensor([1, 2, -100])
    assert triton_path.rows(t, 5, -100, torch.float64, mean_over_count=True, weights=None, sort=True) is None
    assert triton_path.rows(t[:0], 5, -100, torch.float32, mean_over_count=True, weights=None, sort=True) is None
    w64 = torch.ones(3, dtype=torch.float64)
    assert triton_path.rows(t, 5, -100, torch.float32, mean_over_count=False, weights=w64, sort=True) is None


def test_the_accelerator_path_takes_its_rows_from_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off CPU's host checks (as on a GPU), impl="triton" forms each row's target and weight, and the scored-first
    order of its chunks, in the rows kernel: with torch's versions made to fail it still computes, against float64,
    in one chunk and in several, with ignored rows, a num_items_in_batch and per-row weights."""
    from logitless import ops

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch formed the rows under impl='triton'")

    monkeypatch.setattr(ops, "_host_reads_free", lambda device: False)
    monkeypatch.setattr(torch_path, "_rows", forbidden)
    monkeypatch.setattr(torch, "argsort", forbidden)
    for chunk_mb in (64, 0.05):
        monkeypatch.setenv("LOGITLESS_CHUNK_MB", str(chunk_mb))
        _check(_problem(n=40, dtype=torch.bfloat16, **EPILOGUES["all"]))
        _check(_problem(n=40), num_items_in_batch=17)
        _check(_problem(n=40), reduction="none")
