"""Never a silently wrong loss: hooked, wrapped and offloaded heads, empty accumulation windows, eval mode, the
environment, threads. Every case is compared with stock transformers on identical weights (logitless uninstalled,
or a separate process where the process environment matters).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import _tiny_lm as tiny
import logitless
from logitless import _state

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("stock_world")


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tiny.VOCAB, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels}


def _loss_and_grads(model: torch.nn.Module, **kwargs: Any) -> tuple[float, dict[str, torch.Tensor], int]:
    model.zero_grad(set_to_none=True)
    out = model(**_batch(), **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), grads, out.logits.shape[-1]


def _assert_same(stock: tuple[float, dict, int], ours: tuple[float, dict, int]) -> None:
    assert math.isclose(ours[0], stock[0], rel_tol=1e-6), (ours[0], stock[0])
    assert ours[1].keys() == stock[1].keys()
    for name in stock[1]:
        torch.testing.assert_close(ours[1][name], stock[1][name], rtol=1e-5, atol=1e-7, msg=name)


def _halve_output(model: torch.nn.Module) -> None:
    model.lm_head.register_forward_hook(lambda m, i, o: o * 0.5)


def _double_input(model: torch.nn.Module) -> None:
    model.lm_head.register_forward_pre_hook(lambda m, i: (i[0] * 2.0,))


def _instance_forward(model: torch.nn.Module) -> None:
    head = model.lm_head
    original = head.forward
    head.forward = lambda x: original(x) * 0.5


def _accelerate_model_hook(model: torch.nn.Module) -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Halve(ModelHook):
        def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
            return output * 0.5

    add_hook_to_module(model.lm_head, Halve())


def _backward_hook(model: torch.nn.Module) -> None:
    model.lm_head.register_full_backward_hook(lambda m, gi, go: (gi[0] * 3.0,))


@pytest.mark.parametrize(
    ("hook", "reason"),
    [
        (_halve_output, "hooked-head"),
        (_double_input, "hooked-head"),
        (_instance_forward, "instance-forward"),
        (_accelerate_model_hook, "hooked-head"),
        (_backward_hook, "hooked-head"),
    ],
    ids=["forward-hook", "forward-pre-hook", "instance-forward", "accelerate-model-hook", "backward-hook"],
)
def test_hooked_head_takes_the_stock_path(hook: Callable[[torch.nn.Module], None], reason: str) -> None:
    model = tiny.build("llama")
    hook(model)
    stock = _loss_and_grads(model)
    logitless.install()
    ours = _loss_and_grads(model)
    _assert_same(stock, ours)
    assert ours[2] == tiny.VOCAB  # stock forward: real logits
    run = logitless.audit()["classes"]["transformers.models.llama.modeling_llama.LlamaForCausalLM"]["runtime"]
    assert run == {"fused": 0, "stock": {reason: 1}}


def test_global_module_hook_takes_the_stock_path() -> None:
    from torch.nn.modules.module import register_module_forward_hook

    model = tiny.build("llama")
    handle = register_module_forward_hook(lambda m, i, o: o * 0.5 if m is model.lm_head else o)
    try:
        stock = _loss_and_grads(model)
        logitless.install()
        ours = _loss_and_grads(model)
    finally:
        handle.remove()
    _assert_same(stock, ours)
    assert logitless.audit()["runtime"]["stock"] == {"global-module-hooks": 1}


def test_linear_subclass_head_takes_the_stock_path() -> None:
    class Scaled(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 0.5

    model = tiny.build("llama")
    head = Scaled(32, tiny.VOCAB, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    stock = _loss_and_grads(model)
    logitless.install()
    _assert_same(stock, _loss_and_grads(model))
    assert logitless.audit()["runtime"]["stock"] == {"linear-subclass": 1}


class _DequantisingWeight(torch.Tensor):
    """A weight whose ``F.linear`` runs its own kernel, as a quantised tensor's does (here: values stored doubled,
    halved on use). Its raw values are not the weight the model computes with."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.nn.functional.linear:
            x, w, *rest = args
            return torch.nn.functional.linear(x, w.as_subclass(torch.Tensor) * 0.5, *rest, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def test_tensor_subclass_weight_takes_the_stock_path() -> None:
    """A plain nn.Linear whose weight is a tensor subclass (torchao's quantised tensors are): fusing its raw values
    would give a wrong loss, so the forward takes the stock path, counted."""
    model = tiny.build("llama")
    raw = (model.lm_head.weight.detach() * 2.0).as_subclass(_DequantisingWeight)
    model.lm_head.weight = torch.nn.Parameter(raw)
    assert type(model.lm_head.weight) is _DequantisingWeight
    stock = _loss_and_grads(model)
    logitless.install()
    ours = _loss_and_grads(model)
    _assert_same(stock, ours)
    assert ours[2] == tiny.VOCAB  # stock forward: real logits
    assert logitless.audit()["runtime"]["stock"] == {"weight-subclass": 1}


_TORCHAO_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import _tiny_lm as tiny, logitless
from torchao.quantization import Int8WeightOnlyConfig, quantize_
model = tiny.build("llama").to(torch.bfloat16)
quantize_(model, Int8WeightOnlyConfig())
ids = torch.randint(3, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
stock = model(input_ids=ids, labels=ids).loss.item()
logitless.install()
ours = model(input_ids=ids, labels=ids).loss.item()
print(json.dumps({"head": type(model.lm_head).__name__, "weight": type(model.lm_head.weight).__name__,
                  "stock": stock, "ours": ours, "runtime": logitless.audit()["runtime"]}))
"""


def test_torchao_quantised_head_takes_the_stock_path() -> None:
    """torchao's ``quantize_`` quantises every nn.Linear, the head included, in place (its class stays nn.Linear):
    the step crashed under logitless before (its tensor has no kernel for the fused op); now stock's loss. In a
    child process with torchao (unpacked by ``make test`` into ``.torchao/``) on PYTHONPATH."""
    site = ROOT / ".torchao" / "site"
    if not (site / "torchao").is_dir():
        pytest.fail(f"torchao is missing from {site}: `make test` unpacks it (make .torchao/.fetched)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _TORCHAO_SCRIPT, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["head"] == "Linear" and row["weight"] != "Parameter", row
    assert row["ours"] == row["stock"], row
    assert row["runtime"] == {"fused": 0, "stock": {"weight-subclass": 1}}, row


def test_accelerate_align_devices_hook_is_honoured_and_fused() -> None:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny.build("llama")
    stock = _loss_and_grads(model)
    add_hook_to_module(model.lm_head, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    logitless.install()
    ours = _loss_and_grads(model)
    _assert_same(stock, ours)
    assert ours[2] == 0  # fused
    assert logitless.audit()["runtime"] == {"fused": 1, "stock": {}}


def test_disk_offloaded_head_is_fused_and_matches_stock(tmp_path: Path) -> None:
    """``device_map`` with the head on disk: accelerate's offload hook brings the weight in for each call."""
    tiny.build("llama").save_pretrained(tmp_path / "model")

    def load() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "model",
            device_map={"model": "cpu", "lm_head": "disk"},
            offload_folder=str(tmp_path / "offload"),
            dtype=torch.float32,
        )
        assert model.lm_head.weight.device.type == "meta"  # really offloaded
        return model.train()

    stock = _loss_and_grads(load())
    logitless.install()
    model = load()
    ours = _loss_and_grads(model)
    _assert_same(stock, ours)
    assert ours[2] == 0
    assert model.lm_head.weight.device.type == "meta"  # released again, as the hook's post_forward does
    assert logitless.audit()["runtime"] == {"fused": 1, "stock": {}}


def test_hf_loss_refuses_a_peft_wrapped_head() -> None:
    """A PEFT layer whose term the op has no operand for (DoRA rescales the merged weight's columns)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny.build("llama"), LoraConfig(r=4, target_modules=["lm_head"], use_dora=True))
    head = model.base_model.model.lm_head
    hidden, labels = torch.randn(2, 12, 32), torch.randint(0, tiny.VOCAB, (2, 12))
    with pytest.raises(TypeError, match=r"lm_head: cannot fuse a peft\.tuners\.lora\.layer\.Linear exactly "
                       r"\(peft-lora-variant\)"):  # fmt: skip
        logitless.hf_loss(hidden, head, labels, tiny.VOCAB)


@pytest.mark.parametrize("peft_kwargs", [{"target_modules": ["lm_head"]}, {"target_modules": ["q_proj"],
                                                                          "modules_to_save": ["lm_head"]}],
                         ids=["lora-on-lm_head", "modules_to_save"])  # fmt: skip
def test_peft_heads_match_stock(peft_kwargs: dict[str, Any]) -> None:
    from peft import LoraConfig, get_peft_model

    def build() -> torch.nn.Module:
        model = get_peft_model(tiny.build("llama"), LoraConfig(r=4, **peft_kwargs))
        # LoRA's B starts at zero: give it values so a dropped LoRA term would show.
        torch.manual_seed(5)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
        return model

    stock = _loss_and_grads(build())
    logitless.install()
    _assert_same(stock, _loss_and_grads(build()))


def test_num_items_in_batch_zero_without_targets_is_zero_loss_and_gradients() -> None:
    model = tiny.build("llama")
    batch = _batch()
    batch["labels"][:] = -100
    logitless.install()
    out = model(**batch, num_items_in_batch=0)
    out.loss.backward()
    assert float(out.loss) == 0.0
    assert float(model.lm_head.weight.grad.abs().sum()) == 0.0
    assert logitless.audit()["runtime"]["fused"] == 1


def test_num_items_in_batch_zero_with_targets_names_it() -> None:
    model = tiny.build("llama")
    logitless.install()
    with pytest.raises(ValueError, match=r"^num_items_in_batch: expected a positive number of target tokens") as e:
        model(**_batch(), num_items_in_batch=torch.tensor(0))
    assert "grad_scale" not in str(e.value)


def test_eval_mode_returns_stock_logits_and_trainer_evaluate_works(tmp_path: Path) -> None:
    model = tiny.build("llama").eval()
    with torch.no_grad():
        stock = model(**_batch())
    logitless.install()
    with torch.no_grad():
        ours = model(**_batch())
    assert torch.equal(ours.logits, stock.logits) and torch.equal(ours.loss, stock.loss)
    assert logitless.audit()["runtime"]["stock"] == {"eval-mode": 1}

    def accuracy(pred: Any) -> dict[str, float]:
        logits, labels = pred.predictions, pred.label_ids
        hit = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & (labels[:, 1:] != -100)
        return {"accuracy": float(hit.sum() / (labels[:, 1:] != -100).sum())}

    def evaluate() -> dict[str, float]:
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=4)
        trainer = Trainer(model=tiny.build("llama"), args=args, eval_dataset=tiny.random_examples(8),
                          data_collator=tiny.collate, compute_metrics=accuracy)  # fmt: skip
        return trainer.evaluate()

    fused = evaluate()
    logitless.uninstall()
    reference = evaluate()
    assert fused["eval_accuracy"] == reference["eval_accuracy"]
    assert math.isclose(fused["eval_loss"], reference["eval_loss"], rel_tol=1e-6)


def test_fuse_eval_is_an_explicit_opt_in() -> None:
    model = tiny.build("llama").eval()
    with torch.no_grad():
        stock = model(**_batch()).loss
    logitless.install(fuse_eval=True)
    with torch.no_grad():
        out = model(**_batch())
    assert out.logits.shape[-1] == 0
    assert math.isclose(float(out.loss), float(stock), rel_tol=1e-6)
    assert logitless.audit()["runtime"] == {"fused": 1, "stock": {}}


def test_runtime_counts_tell_fused_from_fallback() -> None:
    model = tiny.build("llama")
    logitless.install()
    model(**_batch())
    model(**_batch())
    model.eval()
    model(**_batch())
    model.train()
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()  # a custom loss
    model(**_batch())
    report = logitless.audit()
    key = "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    assert report["classes"][key]["runtime"] == {"fused": 2, "stock": {"eval-mode": 1, "custom-loss": 1}}
    assert report["runtime"] == {"fused": 2, "stock": {"eval-mode": 1, "custom-loss": 1}}
    json.dumps(report)
    logitless.uninstall()
    assert _state.runtime_counts() == {}


def test_an_auxiliary_term_on_the_logits_keeps_the_stock_path_and_is_counted() -> None:
    """Bamba adds a z-loss from the logits when ``z_loss_coefficient > 0``: then the stock statements run (counted
    ``logits-term``, loss with the z-loss, equal to stock); at 0 the loss is fused."""
    from logitless._verify.compare import build

    model = build("transformers.models.bamba.modeling_bamba", "BambaForCausalLM")[0]
    batch = {**{k: v for k, v in _batch().items() if k != "attention_mask"}, "use_cache": False}
    key = f"{type(model).__module__}.BambaForCausalLM"
    model.z_loss_coefficient = 0.5
    stock = model(**batch).loss
    logitless.install()
    out = model(**batch)
    assert out.logits.shape[-1] == model.config.vocab_size
    assert torch.equal(out.loss, stock)
    model.z_loss_coefficient = 0.0
    assert model(**batch).logits.shape[-1] == 0
    assert logitless.audit()["classes"][key]["runtime"] == {"fused": 1, "stock": {"logits-term": 1}}


def test_explicit_return_logits_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGITLESS_RETURN_LOGITS", "1")
    logitless.install(return_logits=False)
    assert logitless.audit()["return_logits"] is False
    assert tiny.build("llama")(**_batch()).logits.shape[-1] == 0
    logitless.uninstall()
    logitless.install()  # not given: the environment
    assert logitless.audit()["return_logits"] is True
    assert tiny.build("llama")(**_batch()).logits.shape[-1] == tiny.VOCAB


@pytest.mark.parametrize(
    ("name", "value", "call"),
    [
        ("LOGITLESS_RETURN_LOGITS", "maybe", "install"),
        ("LOGITLESS_FUSE_EVAL", "2", "install"),
        ("LOGITLESS_KERNEL_ISA", "avx9000", "op"),
        ("LOGITLESS_WEIGHT_GRAD", "sometimes", "op"),
        ("LOGITLESS_CHUNK_MB", "-3", "op"),
        ("LOGITLESS_KERNEL_PROFILE", "loud", "op"),
    ],
)
def test_invalid_environment_values_raise(monkeypatch: pytest.MonkeyPatch, name: str, value: str, call: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        if call == "install":
            logitless.install()
        else:
            w = torch.randn(16, 8, dtype=torch.bfloat16, requires_grad=True)
            logitless.linear_cross_entropy(torch.randn(4, 8, dtype=torch.bfloat16), w, torch.arange(4))


def test_kernel_isa_cap_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each cap gives the float64 reference's loss (the paths differ in speed, not in what they compute)."""
    torch.manual_seed(0)
    h, w, t = torch.randn(6, 16), torch.randn(40, 16), torch.randint(0, 40, (6,))
    reference = torch.nn.functional.cross_entropy(h.double() @ w.double().T, t)
    for isa in ("portable", "avx2", "avx512", "avx512bf16", "amx"):
        monkeypatch.setenv("LOGITLESS_KERNEL_ISA", isa)
        loss = logitless.linear_cross_entropy(h, w, t, shift=False)
        assert math.isclose(float(loss), float(reference), rel_tol=1e-5), isa


_THREADS_SCRIPT = """
import os, sys, torch, logitless
torch.set_num_threads(int(sys.argv[1]))
w = torch.randn(4000, 64, requires_grad=True)
h = torch.randn(256, 64, requires_grad=True)
logitless.linear_cross_entropy(h, w, torch.randint(0, 4000, (256,)), shift=False).backward()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(sum(n.startswith("logitless-") for n in names))
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads through /proc")
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_threads_follow_torch(threads: int) -> None:
    out = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(threads)], capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    # One thread: the calling thread only, no pool at all.
    assert int(out.stdout.strip().splitlines()[-1]) == (0 if threads == 1 else threads)


_ENV_ONLY_SCRIPT = """
import sys, torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config)
ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
out = model(input_ids=ids, labels=ids)
print("logitless" in sys.modules, out.logits.shape[-1], repr(float(out.loss)))
"""


def test_logitless_env_alone_patches_a_script_that_never_imports_it(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_ENV_ONLY_SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGITLESS")}
    runs = {}
    for name, extra in (("stock", {}), ("fused", {"LOGITLESS": "1"})):
        done = subprocess.run([sys.executable, str(script)], env={**env, **extra}, capture_output=True, text=True,
                              timeout=300, check=True)  # fmt: skip
        runs[name] = done.stdout.split()
    assert runs["stock"][:2] == ["False", "128"]  # nothing imported logitless
    assert runs["fused"][:2] == ["True", "0"]  # the startup hook did, and the forward was fused
    assert math.isclose(float(runs["fused"][2]), float(runs["stock"][2]), rel_tol=1e-6)


def test_wheel_ships_the_startup_hook() -> None:
    """The .pth that makes LOGITLESS=1 work is packaged at the wheel's root (maturin ``include``)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '{ path = "python/logitless_autoinstall.pth", format = ["sdist", "wheel"] }' in pyproject
    line = (ROOT / "python" / "logitless_autoinstall.pth").read_text().strip()
    assert line.startswith("import ") and "LOGITLESS" in line  # site executes .pth lines starting with import


_ENGINE_HEADS_SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
import _tiny_lm as tiny, logitless
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
torch.set_num_threads(1)
mesh = init_device_mesh("cpu", (1,))
ids = torch.randint(3, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))

def user_hook(module):
    module.register_forward_hook(lambda mod, args, out: out * 0.5)

setups = {
    # FSDP would cast the loss, where stock casts the logits.
    "fsdp2-output-dtype": lambda m: (
        fully_shard(m.lm_head, mesh=mesh, mp_policy=MixedPrecisionPolicy(output_dtype=torch.float64)),
        fully_shard(m, mesh=mesh),
    ),
    "fsdp2-plus-user-hook": lambda m: (fully_shard(m.lm_head, mesh=mesh), user_hook(m.lm_head), fully_shard(m, mesh=mesh)),
    "tp-rowwise-head": lambda m: parallelize_module(m, mesh, {"lm_head": RowwiseParallel(output_layouts=Replicate())}),
    "tp-sequence-sharded-input": lambda m: parallelize_module(
        m, mesh, {"lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    ),
    "tp-colwise-plus-user-hook": lambda m: (
        parallelize_module(m, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())}), user_hook(m.lm_head)
    ),
    # Inkling cuts its padded vocabulary back after the head: a vocabulary-sharded head is not cut fused.
    "tp-colwise-vocab-slice": lambda m: parallelize_module(
        m, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())}
    ),
}

def inkling():
    from logitless._verify.compare import build
    return build("transformers.models.inkling.modeling_inkling", "InklingForCausalLM")[0].float()

out = {}
for name, setup in setups.items():
    row = {}
    for mode in ("stock", "logitless"):
        logitless.uninstall()
        if mode == "logitless":
            logitless.install()
        model = inkling() if name == "tp-colwise-vocab-slice" else tiny.build("llama")
        setup(model)
        labels = ids % model.config.unpadded_vocab_size if name == "tp-colwise-vocab-slice" else ids
        result = model(input_ids=labels, labels=labels)
        result.loss.backward()
        row[mode] = [result.loss.item(), result.logits.shape[-1]]
    row["runtime"] = logitless.audit()["runtime"]
    out[name] = row
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_engine_layouts_not_understood_take_the_stock_path() -> None:
    """Engine-managed heads that the fused path does not reproduce exactly (tests/test_distributed.py has the ones
    it does): stock path, counted with a reason, same loss, never a crash. One gloo process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    done = subprocess.run([sys.executable, "-c", _ENGINE_HEADS_SCRIPT, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    reasons = {
        "fsdp2-output-dtype": "hooked-head",
        "fsdp2-plus-user-hook": "hooked-head",
        "tp-rowwise-head": "tensor-parallel-layout",
        "tp-sequence-sharded-input": "tensor-parallel-layout",
        "tp-colwise-plus-user-hook": "tensor-parallel-layout",
        "tp-colwise-vocab-slice": "tensor-parallel-layout",
    }
    for name, row in rows.items():
        assert math.isclose(row["logitless"][0], row["stock"][0], rel_tol=1e-6), (name, row)
        assert row["runtime"] == {"fused": 0, "stock": {reasons[name]: 1}}, (name, row)
        assert row["logitless"][1] > 0


@pytest.mark.parametrize(
    "module, cls",
    [
        ("transformers.models.granite_speech.modeling_granite_speech", "GraniteSpeechForConditionalGeneration"),
        # also rebinds its labels (and mask) from the backbone's outputs between the head and the loss
        ("transformers.models.qwen2_audio.modeling_qwen2_audio", "Qwen2AudioForConditionalGeneration"),
    ],
    ids=["granite-speech", "qwen2-audio"],
)
def test_a_masked_shift_is_fused_with_the_masked_positions_ignored(module: str, cls: str) -> None:
    """Granite Speech and Qwen2-Audio compute their loss on the shifted positions their attention mask keeps
    (boolean selection); fused, the labels are ignored where the shifted mask is 0. Padded rows, against stock's
    loss and gradients."""
    from logitless import _runtime
    from logitless._verify.compare import build

    model = build(module, cls)[0]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 200, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    labels = ids.clone()
    labels[2, :4] = -100  # a masked prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), grads, out.logits.shape[-1]

    stock = run()
    # The `attention_mask[..., 1:]` crop (Qwen2-Audio's) equals Granite's last T - 1 columns for a mask of the
    # labels' length.
    assert torch.equal(_runtime.mask_shifted_labels(labels, mask, "skip-first"),
                       _runtime.mask_shifted_labels(labels, mask, "last"))  # fmt: skip
    logitless.install()
    fused = run()
    assert fused[2] == 0 and stock[2] == model.config.text_config.vocab_size
    torch.testing.assert_close(fused[0], stock[0], rtol=1e-6, atol=0)
    for name, grad in stock[1].items():
        torch.testing.assert_close(fused[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # A mask that does not fit the labels fails as stock's selection does.
    with pytest.raises(IndexError, match="attention_mask"):
        _runtime.mask_shifted_labels(labels, mask[:, :-2], "skip-first")
