"""Distributed engines, 2 gloo processes on CPU standing in for 2 GPUs (tests/_dist_worker.py is one rank).

Every setup trains two SGD steps with logitless uninstalled and installed. Checked here:

* the fused path ran on every rank, at every step (``out.logits`` is empty, the audit counts 2 fused forwards);
* each rank's loss and every parameter's gradient equal a single-process stock reference computed here under the
  engine's semantics: data parallel (DDP, FSDP2, FSDP1, ZeRO-3) averages the two ranks' gradients of their own batches;
  tensor parallel gives both ranks the same batch and the same full gradient;
* the second step's losses equal stock's run under the same engine (the update went through the engine's
  resharding / reduce-scatter / partitioned gradients exactly as a stock step's does).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import _dist_worker as worker  # noqa: E402

import logitless  # noqa: E402

DATA_PARALLEL = ("ddp", "fsdp2-head-in-root", "fsdp2-head-own-unit", "fsdp2-head-grouped", "zero3", "zero2",
                 "fsdp1-head-in-root", "fsdp1-head-own-unit", "fsdp1-head-own-unit-flat", "inkling2-ddp",
                 "inkling2-zero3", "peft-save-ddp", "peft-save-fsdp2", "peft-save-zero3", "peft-tokens-ddp",
                 "peft-tokens-fsdp2", "peft-lora-ddp", "peft-lora-fsdp2", "bert2bart-ddp", "bert2bart-fsdp2",
                 "bert2bart-zero3", "llama4-vlm-ddp", "llama4-vlm-fsdp2")
# Fused forwards counted per step: a wrapper's and its decoder's or language model's.
COUNTS_PER_STEP = {"bert2bart-ddp": 2, "bert2bart-fsdp2": 2, "bert2bart-zero3": 2, "llama4-vlm-ddp": 2,
                   "llama4-vlm-fsdp2": 2}
TENSOR_PARALLEL = ("tp-torch-colwise", "tp-transformers-colwise", "tp-uneven-vocab",
                   # 2-D on two ranks: a data-parallel dimension of 1, so every rank trains on the same batch.
                   "fsdp2-over-tp")
ALL = (*DATA_PARALLEL, "fsdp2-bf16", "fsdp1-bf16", *TENSOR_PARALLEL)
# Layouts the fused path does not reproduce: stock on every rank, counted with the reason.
STOCK = {
    "fsdp2-over-tp-hooked": "hooked-head",
    # PEFT's token layer reads its base layer's weight without calling it, so ZeRO-3's hooks on that layer are not
    # the ones that gather it: the fused path does not assume when it is whole.
    "peft-tokens-zero3": "peft-tokens-layout",
    # LoRA's B on the head is read, not called, so likewise: ZeRO-3's hooks on it are not what gathers it.
    "peft-lora-zero3": "peft-lora-layout",
}


# HF Trainer's label smoothing and loss-only evaluation on each engine: two ranks, or four for the 2-D layout.
SMOOTHING = tuple(s for s in sorted(worker.SMOOTHING_SETUPS) if not worker.is_2d(s))
SMOOTHING_2D = tuple(s for s in sorted(worker.SMOOTHING_SETUPS) if worker.is_2d(s))
EVAL = tuple(s for s in sorted(worker.EVAL_SETUPS) if not worker.is_2d(s))
EVAL_2D = tuple(s for s in sorted(worker.EVAL_SETUPS) if worker.is_2d(s))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(out: Path, world: int, setups: tuple[str, ...]) -> list[dict[str, Any]]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(worker.__file__)), str(out), ",".join(setups)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    setups = (*ALL, *STOCK, *SMOOTHING, *EVAL, *worker.KEEP_LOGITS_SETUPS, *worker.TRL_SETUPS, *worker.DISTILL_SETUPS,
              *worker.GKD_SETUPS, *worker.ODDS_SETUPS, *worker.ONLINE_DPO_SETUPS, *worker.TPO_SETUPS,
              *worker.A2PO_SETUPS, *worker.SDPO_SETUPS, "vocab-parallel-op")  # fmt: skip
    return _launch(tmp_path_factory.mktemp("dist"), 2, setups)


@pytest.fixture(scope="module")
def ranks_2d(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Four ranks, data parallel 2 x tensor parallel 2."""
    return _launch(tmp_path_factory.mktemp("dist2d"), 4, (*worker.TWO_D_SETUPS, *SMOOTHING_2D, *EVAL_2D))


def _stock_loss(model: torch.nn.Module, ids: torch.Tensor, smoothing: str | None) -> torch.Tensor:
    if smoothing is None:
        return model(input_ids=ids, labels=worker.labels_of(ids)).loss
    # What HF Trainer computes with label_smoothing_factor: the model without labels, its logits smoothed.
    from transformers.trainer_pt_utils import LabelSmoother

    out = model(input_ids=ids)
    smoother = LabelSmoother(epsilon=worker.SMOOTHING)
    return smoother(out, worker.labels_of(ids), shift_labels=worker.trainer_shifts(smoothing))


def _reference(setup: str, rank: int) -> dict[str, Any]:
    """Single-process stock: step-1 loss of this rank's batch, the engine-averaged gradients, step-2 loss after
    SGD with them."""
    logitless.uninstall()
    smoothing = setup if setup in worker.SMOOTHING_SETUPS else None
    setup = worker.SMOOTHING_SETUPS.get(setup, setup)
    vocab = worker.TP_VOCAB_UNEVEN if setup == "tp-uneven-vocab" else worker.tiny.VOCAB
    build = worker.SETUPS[setup][0]
    # The data-parallel batches: one per data-parallel index (2-D: each shared by a tensor-parallel pair); under
    # tensor parallelism alone both ranks train on batch 0.
    tensor_parallel = worker.SETUPS[setup][2] is True
    batches = [worker.batch(0, vocab)] * 2 if tensor_parallel else [worker.batch(r, vocab) for r in range(2)]
    rank = worker.batch_index(setup, rank) if worker.SETUPS[setup][2] == "2d" else rank
    grads: list[dict[str, torch.Tensor]] = []
    losses = []
    for ids in batches:
        model = build()
        loss = _stock_loss(model, ids, smoothing)
        loss.backward()
        losses.append(float(loss.detach()))
        # Frozen parameters (PEFT's base weights) have no gradient, as under the engines.
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    mean = {n: (grads[0][n] + grads[1][n]) / 2 for n in grads[0]}
    model = build()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in mean:
                p -= worker.LR * mean[n]
        ids = batches[rank]
        step2 = float(_stock_loss(model, ids, smoothing))
    return {"loss": losses[rank], "grads": mean, "step2": step2}


def _close_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float) -> None:
    assert got.keys() == want.keys()
    # Attention key biases have a gradient that is zero up to rounding (softmax ignores a shift shared by all keys):
    # relative to their own largest entry, that rounding is all there is. They are held to a millionth of the
    # model's largest gradient instead.
    floor = 1e-6 * max(float(w.abs().max()) for w in want.values())
    for name, g in got.items():
        w = want[name]
        scale = max(float(w.abs().max()), floor) + 1e-12
        err = float((g - w).abs().max()) / scale
        assert err <= rel, (name, err)


@pytest.mark.parametrize("setup", ALL)
def test_fused_on_every_rank_at_every_step(ranks: list[dict[str, Any]], setup: str) -> None:
    for r in range(2):
        row = ranks[r][setup]
        assert row["runtime"] == {"fused": 2 * COUNTS_PER_STEP.get(setup, 1), "stock": {}}, (r, row["runtime"])
        assert row["logitless"]["logits_widths"] == [0, 0]
        assert min(row["stock"]["logits_widths"]) > 0


@pytest.mark.parametrize("setup", [*DATA_PARALLEL, *TENSOR_PARALLEL])
def test_equal_to_single_process_stock(ranks: list[dict[str, Any]], setup: str) -> None:
    for r in range(2):
        row = ranks[r][setup]
        ref = _reference(setup, r)
        fused, stock = row["logitless"], row["stock"]
        assert fused["losses"][0] == pytest.approx(ref["loss"], rel=1e-6)
        if fused["grads"] is None:  # FSDP1 without original parameters: step 2's loss checks the update
            assert setup == "fsdp1-head-own-unit-flat" and stock["grads"] is None
        else:
            _close_grads(fused["grads"], ref["grads"], rel=2e-5)
        # The engine's own stock run is the reference for step 2 (DeepSpeed's optimizer wrapper is its own).
        assert fused["losses"][1] == pytest.approx(stock["losses"][1], rel=1e-5)
        if "zero" not in setup:
            assert fused["losses"][1] == pytest.approx(ref["step2"], rel=1e-5)


@pytest.mark.parametrize("setup", SMOOTHING)
def test_trainer_label_smoothing_fused_and_equal_to_stock(ranks: list[dict[str, Any]], setup: str) -> None:
    """HF Trainer's ``compute_loss`` with label smoothing on a model under DDP, FSDP2 and FSDP1 (head its own unit),
    ZeRO-3 and tensor parallelism (vocabulary-parallel smoothing): the labels reach the forward through the engine's
    wrapper, the smoothed loss is fused on every rank, and loss and gradients equal the single-process stock
    Trainer loss (``LabelSmoother`` on materialised logits)."""
    for r in range(2):
        _check_smoothing(ranks[r][setup], setup, r)


def _check_smoothing(row: dict[str, Any], setup: str, r: int) -> None:
    assert row["runtime"] == {"fused": 2, "stock": {}}, (r, row["runtime"])
    assert row["smoothing_calls"] == {"fused": 2, "materialised": 0}
    ref = _reference(setup, r)
    fused, stock = row["logitless"], row["stock"]
    assert fused["losses"][0] == pytest.approx(ref["loss"], rel=1e-6)
    _close_grads(fused["grads"], ref["grads"], rel=2e-5)
    assert fused["losses"][1] == pytest.approx(stock["losses"][1], rel=1e-5)
    if "zero" not in setup:
        assert fused["losses"][1] == pytest.approx(ref["step2"], rel=1e-5)


@pytest.mark.parametrize("setup", EVAL)
def test_loss_only_evaluation_fused_and_equal_to_stock(ranks: list[dict[str, Any]], setup: str) -> None:
    """An eval-mode forward without grad under ``_state.loss_only()`` (what HF Trainer's loss-only
    ``prediction_step`` runs) through FSDP2, FSDP1, ZeRO-3 and tensor-parallel heads: fused, no logits, the loss
    equal to stock's under the same engine and to the single-process reference."""
    for r in range(2):
        _check_eval(ranks[r][setup], setup, r)


def _check_eval(row: dict[str, Any], setup: str, r: int) -> None:
    assert row["runtime"] == {"fused": 1, "stock": {}}, (r, row["runtime"])
    assert row["logitless"]["logits_width"] == 0 and row["stock"]["logits_width"] == worker.tiny.VOCAB
    assert row["logitless"]["loss"] == pytest.approx(row["stock"]["loss"], rel=1e-6)
    ref = _reference(worker.EVAL_SETUPS[setup], r)
    assert row["logitless"]["loss"] == pytest.approx(ref["loss"], rel=1e-6)


@pytest.mark.parametrize("setup", sorted(worker.KEEP_LOGITS_SETUPS))
def test_kept_logits_beside_the_fused_loss(ranks: list[dict[str, Any]], setup: str) -> None:
    """Under ``_state.keeping_logits()`` (TRL < 1.15's SFTTrainer, whose metrics read the logits) through FSDP2,
    FSDP1 (head its own unit), ZeRO-3 and tensor parallelism: the loss is fused and the head is called again for the
    logits, through the engine's hooks; nothing backpropagates through that call, and loss and gradients equal the
    single-process reference."""
    engine = worker.KEEP_LOGITS_SETUPS[setup]
    for r in range(2):
        row = ranks[r][setup]
        assert row["runtime"] == {"fused": 2, "stock": {}}, (r, row["runtime"])
        fused, stock = row["logitless"], row["stock"]
        assert fused["logits_widths"] == stock["logits_widths"] == [worker.tiny.VOCAB] * 2
        ref = _reference(engine, r)
        assert fused["losses"][0] == pytest.approx(ref["loss"], rel=1e-6)
        _close_grads(fused["grads"], ref["grads"], rel=2e-5)
        assert fused["losses"][1] == pytest.approx(stock["losses"][1], rel=1e-5)


@pytest.mark.parametrize("setup", sorted(worker.TRL_SETUPS))
def test_trl_heads_on_engines_equal_to_stock(ranks: list[dict[str, Any]], setup: str) -> None:
    """TRL's heads as logitless replaces them, added before DDP, FSDP2 (head its own unit) or ZeRO-3 wraps the model:
    TRL >= 1.15's fused head with SFT's mean of ``-log_probs``, its gradient formed in the forward pass or in the
    second kernel pass (which reads the head's weight in backward: ZeRO-3 gathers it again only through its hook on
    what the head's call returned, so the per-token fields are those outputs), the same with a frozen head (LoRA:
    no second pass for any upstream gradient), and TRL 1.5-1.14's chunked SFT head (the model's own loss). Fused
    on every rank, loss and gradients equal to the single-process stock reference (the causal-LM mean over the same
    targets)."""
    head, engine = worker.TRL_SETUPS[setup]
    for r in range(2):
        row = ranks[r][setup]
        assert row["runtime"] == {"fused": 2, "stock": {}}, (r, row["runtime"])
        if head == "fused" or engine.startswith("frozen-head"):
            assert row["second_passes"] == 0
        elif head == "tokens":
            assert row["second_passes"] == 2  # one backward a step
        ref = _reference(engine, r)
        fused = row["logitless"]
        assert fused["losses"][0] == pytest.approx(ref["loss"], rel=1e-6)
        _close_grads(fused["grads"], ref["grads"], rel=2e-5)
        if "zero" not in setup:
            assert fused["losses"][1] == pytest.approx(ref["step2"], rel=1e-5)


@pytest.mark.parametrize("setup", sorted(STOCK))
def test_layouts_not_reproduced_keep_the_stock_path(ranks: list[dict[str, Any]], setup: str) -> None:
    """FSDP2 over a tensor-parallel head with a user's forward hook beside FSDP's and the layout's (it may read the
    logits), and PEFT trainable tokens under ZeRO-3 (the token layer's base layer is hooked): both steps run stock,
    with the reason counted, equal to stock under the same engines and to the single-process reference."""
    for r in range(2):
        row = ranks[r][setup]
        assert row["runtime"] == {"fused": 0, "stock": {STOCK[setup]: 2}}, (r, row["runtime"])
        assert row["logitless"]["losses"] == row["stock"]["losses"]
        assert row["logitless"]["logits_widths"] == row["stock"]["logits_widths"] == [worker.tiny.VOCAB] * 2
        ref = _reference(setup, r)
        assert row["logitless"]["losses"][0] == pytest.approx(ref["loss"], rel=1e-6)
        _close_grads(row["logitless"]["grads"], ref["grads"], rel=2e-5)


@pytest.mark.parametrize("setup", worker.TWO_D_SETUPS)
def test_2d_parallel_fused_and_equal_to_single_process_stock(ranks_2d: list[dict[str, Any]], setup: str) -> None:
    """FSDP2 over tensor parallelism on four ranks (data parallel 2 x tensor parallel 2): torch's ``ColwiseParallel``
    head in its own FSDP unit or in the root's, and transformers' ``DistributedConfig(tp_size=2, fsdp_size=2)``
    (every layer tensor-parallel, the head grouped with the final norm). Fused on every rank at both steps; each
    rank's loss and every gathered gradient equal the single-process stock reference (the two data-parallel batches'
    mean gradient), step 2 equals stock's under the same layout, and a forward without labels afterwards returns
    the whole logits (the layout's hooks are back on the head)."""
    for r in range(4):
        row = ranks_2d[r][setup]
        assert row["runtime"] == {"fused": 2, "stock": {}}, (r, row["runtime"])
        fused, stock = row["logitless"], row["stock"]
        assert fused["logits_widths"] == [0, 0] and stock["logits_widths"] == [worker.tiny.VOCAB] * 2
        # The tensor-parallel pair shares a batch: both compute the same loss.
        assert fused["losses"] == ranks_2d[r ^ 1][setup]["logitless"]["losses"]
        ref = _reference(setup, r)
        assert fused["losses"][0] == pytest.approx(ref["loss"], rel=1e-6)
        _close_grads(fused["grads"], ref["grads"], rel=2e-5)
        assert fused["losses"][1] == pytest.approx(stock["losses"][1], rel=1e-5)
        assert fused["losses"][1] == pytest.approx(ref["step2"], rel=1e-5)
        # After two fused steps the head is called as stock calls it again (layout hooks restored): whole logits.
        assert fused["logits_after"].shape[-1] == worker.tiny.VOCAB
        torch.testing.assert_close(fused["logits_after"], stock["logits_after"], rtol=1e-4, atol=1e-5)


def test_2d_trainer_smoothing_and_loss_only_eval_fused_and_equal_to_stock(ranks_2d: list[dict[str, Any]]) -> None:
    """On transformers' 2-D layout (four ranks): HF Trainer's ``compute_loss`` with label smoothing (the
    vocabulary-parallel smoothed loss; FSDP renames the class, so stock smooths unshifted) and a loss-only eval-mode
    forward without grad. Both fused on every rank and equal to the single-process stock reference."""
    (smooth,), (evaluation,) = SMOOTHING_2D, EVAL_2D
    for r in range(4):
        _check_smoothing(ranks_2d[r][smooth], smooth, r)
        _check_eval(ranks_2d[r][evaluation], evaluation, r)


@pytest.mark.parametrize("setup", ["fsdp2-bf16", "fsdp1-bf16"])
def test_fsdp_bf16_mixed_precision_no_worse_than_stock(ranks: list[dict[str, Any]], setup: str) -> None:
    """FSDP2's ``MixedPrecisionPolicy`` / FSDP1's ``MixedPrecision`` with ``param_dtype=bf16``: the kernel gets the
    bf16 weight FSDP computes with; its loss and gradients are at least as close to the float32 reference as
    stock's bf16 step.

    The head's weight and the final norm's (the gradients the fused op forms, or the first it feeds) are held to
    stock's error each; the model's gradient as a whole too. The layers further up see the bf16 forward's rounding
    through every layer, the same for both, and a different rounding of the head's input gradient: there each
    parameter's error is as likely a little above stock's as below (0.91-1.34x on an AVX2 CPU, whose bf16 path
    widens to float32, 1.01x over the whole model), so each is only held to twice stock's."""
    for r in range(2):
        row = ranks[r][setup]
        ref = _reference(setup, r)
        fused, stock = row["logitless"], row["stock"]
        assert abs(fused["losses"][0] - ref["loss"]) <= max(2 * abs(stock["losses"][0] - ref["loss"]), 1e-4)
        total_fused = total_stock = 0.0
        for name, want in ref["grads"].items():
            e_fused = float((fused["grads"][name] - want).norm())
            e_stock = float((stock["grads"][name] - want).norm())
            total_fused, total_stock = total_fused + e_fused**2, total_stock + e_stock**2
            bound = 1.25 if name in ("lm_head.weight", "model.norm.weight") else 2.0
            assert e_fused <= bound * e_stock + 1e-6 * float(want.norm()), (name, e_fused, e_stock)
        assert total_fused**0.5 <= 1.1 * total_stock**0.5, (total_fused**0.5, total_stock**0.5)


@pytest.mark.parametrize("case", list(worker.vp_cases("cpu")))
def test_vocab_parallel_op_against_float64(ranks: list[dict[str, Any]], case: str) -> None:
    """``vocab_parallel_linear_cross_entropy`` on an uneven 2-way split of V=1301 against float64 (the CUDA twin is
    in tests/test_cuda.py)."""
    worker.check_vocab_parallel_case([ranks[r]["vocab-parallel-op"][case] for r in range(2)], case, "cpu")


@pytest.mark.parametrize("setup", worker.DISTILL_SETUPS)
def test_distillation_divergence_on_sharded_heads(ranks: list[dict[str, Any]], setup: str) -> None:
    """TRL's DistillationTrainer divergence with sharded student and teacher heads (FSDP2: DTensors read outside
    their unit's forward; ZeRO-3: partitioned parameters gathered by TRL's helper inside the student engine's
    forward). logitless's drop-in gives every rank the float64 reference's loss, entropy, count and hidden-state
    gradient, and the head the ranks' mean gradient, as the engine's reduction does for a head it gathered itself;
    with the teacher frozen, and on FSDP2 also trainable (TRL's kernel fails there; logitless leaves the teacher's
    gradients unset). TRL's own kernel agrees on each rank's values; on FSDP2 its head gradient is each rank's own
    rows, unaveraged (``full_tensor()``'s backward does not reduce), so that is not compared."""
    reference = worker.distill_reference(2)
    for r in range(2):
        row, ref = ranks[r][setup], reference[r]
        trls = row["trl"]
        ours_runs = [row[k] for k in row if k.startswith("logitless")]
        assert len(ours_runs) == (2 if setup == "distill-fsdp2-head-own-unit" else 1)
        # One per model per call of logitless's.
        assert row["distillation"]["calls"] == {"class_epilogue": 2 * len(ours_runs), "trl_epilogue": 0}
        for ours in ours_runs:
            assert ours["n_valid"] == trls["n_valid"] == ref["n_valid"] > 0
            for key in ("loss", "entropy_sum"):
                assert ours[key] == pytest.approx(ref[key], rel=1e-5)
                assert ours[key] == pytest.approx(trls[key], rel=1e-5)
            torch.testing.assert_close(ours["d_hidden"].double(), ref["d_hidden"], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(ours["d_hidden"], trls["d_hidden"], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(ours["d_weight"].double(), ref["d_weight"], rtol=1e-4, atol=1e-7)
            if setup == "distill-zero3":
                torch.testing.assert_close(ours["d_weight"], trls["d_weight"], rtol=1e-4, atol=1e-7)
            assert ours["teacher_grads"] == 0


@pytest.mark.parametrize("setup", worker.GKD_SETUPS)
def test_gkd_steps_on_engines_equal_to_stock(ranks: list[dict[str, Any]], setup: str) -> None:
    """TRL's GKDTrainer step with both models on an engine: the teacher's head operands kept from its own forward
    (FSDP2 and ZeRO-3 release the gathered head when its call returns), the divergence inside the student head's
    call. Each rank's losses over two SGD steps and the first step's gradients (the engine's reduction over the
    ranks) equal stock GKD's under the same engine."""
    for r in range(2):
        row = ranks[r][setup]
        assert row["gkd"] == {"fused": 2, "stock": {}}
        stock, ours = row["stock"], row["logitless"]
        assert ours["losses"] == pytest.approx(stock["losses"], rel=1e-5)
        assert stock["losses"][0] > 0.01 and stock["losses"][1] != pytest.approx(stock["losses"][0], rel=1e-3)
        _close_grads(ours["grads"], stock["grads"], rel=1e-4)


def _assert_trainer_steps_equal_stock(ranks: list[dict[str, Any]], setup: str, trainer: str, fused: int) -> None:
    """A TRL trainer's setup on both ranks: ``fused`` calls fused, none left to TRL; each rank's losses over two SGD
    steps (the second different from the first) and the first step's gradients equal stock's under the same
    engine."""
    for r in range(2):
        row = ranks[r][setup]
        assert row[trainer] == {"fused": fused, "stock": {}}
        stock, ours = row["stock"], row["logitless"]
        assert ours["losses"] == pytest.approx(stock["losses"], rel=1e-5)
        assert stock["losses"][1] != pytest.approx(stock["losses"][0], rel=1e-3)
        _close_grads(ours["grads"], stock["grads"], rel=1e-4)


@pytest.mark.parametrize("setup", worker.ODDS_SETUPS)
def test_orpo_steps_on_engines_equal_to_stock(ranks: list[dict[str, Any]], setup: str) -> None:
    """TRL's ORPOTrainer step on an engine: the per-token log-probabilities from the head's call inside the engine's
    forward, differentiated with a different gradient at every position (the second kernel pass reads the head's
    weight in backward). Each rank's losses over two SGD steps and the first step's gradients equal stock ORPO's
    under the same engine."""
    _assert_trainer_steps_equal_stock(ranks, setup, "orpo", 2)


@pytest.mark.parametrize("setup", worker.ONLINE_DPO_SETUPS)
def test_online_dpo_log_probs_on_engines_equal_to_stock(ranks: list[dict[str, Any]], setup: str) -> None:
    """TRL's OnlineDPOTrainer ``_forward`` on an engine: the policy's completion log-probabilities from its head's
    call (differentiated per sequence: the second kernel pass), the frozen reference model's without gradients under
    its own engine. Each rank's losses over two SGD steps and the first step's gradients equal stock's under the same
    engine."""
    _assert_trainer_steps_equal_stock(ranks, setup, "online_dpo", 4)


@pytest.mark.parametrize("setup", worker.TPO_SETUPS)
def test_tpo_steps_on_engines_equal_to_stock(ranks: list[dict[str, Any]], setup: str) -> None:
    """TRL's TPOTrainer step on an engine: the chosen, rejected and gold rows' per-token log-probabilities (and the
    metrics' entropy, mean logit and top-1) from the head's call inside the engine's forward. Each rank's losses over
    two SGD steps and the first step's gradients equal stock TPO's under the same engine."""
    _assert_trainer_steps_equal_stock(ranks, setup, "tpo", 2)


@pytest.mark.parametrize("setup", worker.A2PO_SETUPS)
def test_a2po_log_probs_on_engines_equal_to_stock(ranks: list[dict[str, Any]], setup: str) -> None:
    """TRL's A2POTrainer ``_get_sequence_logps`` on an engine: the policy's from its head's call, the frozen
    reference model's under its own engine. Each rank's losses over two SGD steps and the first step's gradients
    equal stock's under the same engine."""
    _assert_trainer_steps_equal_stock(ranks, setup, "a2po", 4)


@pytest.mark.parametrize("setup", worker.SDPO_SETUPS)
def test_sdpo_steps_on_engines_equal_to_stock(ranks: list[dict[str, Any]], setup: str) -> None:
    """TRL's SDPOTrainer step on an engine: the student's completion log-probabilities (or its top-k support's) from
    its head's call, differentiated per token (the second kernel pass, or the support's recompute, reads the head's
    weight in backward), the frozen teacher's under its own engine. Each rank's losses over two SGD steps and the
    first step's gradients equal stock SDPO's under the same engine."""
    _assert_trainer_steps_equal_stock(ranks, setup, "sdpo", 2)
