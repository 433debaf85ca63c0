"""One rank of the 2-process gloo runs of tests/test_distributed.py (spawned by it, never collected by pytest).

``python _dist_worker.py OUT_DIR SETUP[,SETUP...]`` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set. For each
setup the same tiny model (Llama; Inkling2 for its epilogue module; seed 0) is wrapped by the engine and runs one
labelled forward + backward twice: with logitless uninstalled (stock) and installed. Each rank saves its losses, the
width of ``out.logits``, every parameter's full gradient (gathered from shards) and the audit's run-time counts to
``OUT_DIR/rank{r}.pt``.

Data-parallel setups (DDP, FSDP2, ZeRO-3) give each rank its own batch (``batch(rank)``); tensor-parallel ones give
every rank the same batch (``batch(0)``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import _tiny_lm as tiny  # noqa: E402

import logitless  # noqa: E402

SEQ = 12
TP_SIZE = 2  # the tensor-parallel dimension of the 2-D setups
OUT_DIR = Path(".")  # set by main()
LR = 0.5  # SGD, so that the second step's loss depends visibly on the first step's gradients
TP_VOCAB_UNEVEN = 251


def batch(rank: int, vocab: int = tiny.VOCAB) -> torch.Tensor:
    ids = torch.randint(3, vocab, (2, SEQ), generator=torch.Generator().manual_seed(100 + rank))
    return ids


def labels_of(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, :3] = -100  # some ignored targets on every rank
    return labels


def build_llama(vocab: int = tiny.VOCAB) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(**{**tiny._COMMON, "vocab_size": vocab})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float()


def build_llama_frozen_head() -> torch.nn.Module:
    """LoRA's usual layout, as far as the head is concerned: the head (and the embedding, if tied) frozen."""
    model = build_llama()
    model.lm_head.weight.requires_grad_(False)
    return model


def build_inkling2() -> torch.nn.Module:
    """Inkling2 ends with an epilogue module (``self.logit_softcap``); a small cap, so that it matters."""
    from logitless._verify.compare import build

    torch.manual_seed(0)
    model, _, _ = build("transformers.models.inkling2.modeling_inkling2", "Inkling2ForCausalLM")
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.logit_softcap.softcap = 1.5
    return model.float()


def build_peft(kind: str) -> torch.nn.Module:
    """LoRA on the attention with the head trained as PEFT does it: a copy of it (``modules_to_save``), new-token
    rows of a tied head (``trainable_token_indices``), or a LoRA adapter on the head itself (``lora``). The injected
    model itself, as engines wrap it. The trained copy, the token rows and LoRA's B are moved off their initial
    values so that each shows in the loss."""
    import transformers
    from peft import LoraConfig, get_peft_model

    tied = kind == "tokens"
    config = transformers.LlamaConfig(**{**tiny._COMMON, "tie_word_embeddings": tied})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    targets = ["q_proj", "v_proj", *(["lm_head"] if kind == "lora" else [])]
    head = {"trainable_token_indices": [3, 5, 7, 200]} if tied else {"modules_to_save": ["lm_head"]}
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, **(head if kind != "lora" else {})))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "modules_to_save" in name or "tokens_delta" in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return peft_model.base_model.model


def build_bert2bart() -> torch.nn.Module:
    """An encoder-decoder wrapper (BERT encoder, BART decoder) that hands its loss to the decoder; dropout off so
    that the ranks and the single-process reference draw nothing."""
    import transformers

    size = dict(vocab_size=tiny.VOCAB, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    encoder = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **size)
    decoder = transformers.BartConfig(d_model=32, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                                      encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, dropout=0.0,
                                      attention_dropout=0.0, activation_dropout=0.0, **size)  # fmt: skip
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 2, 1
    torch.manual_seed(0)
    model = transformers.EncoderDecoderModel(config).float()
    model.encoder.pooler = None  # the wrapper never uses it: no parameters without a gradient
    return model


def build_llama4_vlm() -> torch.nn.Module:
    """Llama 4's multimodal wrapper (verify's tiny build), which hands its causal loss to its language model; text
    batches, so its vision tower gets no gradient. transformers 5.24's wrapper reads ``image_outputs`` off its
    language model's output, which has no such field: given as None on that class (process-wide, for stock and
    logitless alike; it answers only that read)."""
    import inspect

    from transformers.modeling_outputs import MoeCausalLMOutputWithPast
    from transformers.models.llama4 import modeling_llama4

    from logitless._verify.compare import build

    if "outputs.image_outputs" in inspect.getsource(modeling_llama4.Llama4ForConditionalGeneration.forward):
        MoeCausalLMOutputWithPast.image_outputs = None  # type: ignore[attr-defined]
    return build("transformers.models.llama4.modeling_llama4", "Llama4ForConditionalGeneration")[0]


def _ddp_some_unused(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, find_unused_parameters=True)


def _fsdp_language_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 on a multimodal wrapper as transformers' plan shards it: each decoder layer of its language model a
    unit, then the root (the wrapper embeds the tokens itself, so the language model cannot be one unit)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.language_model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp(model: torch.nn.Module, *, head: str, bf16: bool = False) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kw: dict[str, Any] = {"mesh": mesh}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    if head == "own":
        fully_shard(model.lm_head, **kw)
    elif head == "grouped":
        # transformers' FSDP plan for a "keep_full_weight" head: the final norm and the head as one unit.
        fully_shard([model.model.norm, model.lm_head], reshard_after_forward=False, **kw)
    fully_shard(model, **kw)
    return model


def _fsdp1(model: torch.nn.Module, *, head: str, orig_params: bool = True, bf16: bool = False) -> torch.nn.Module:
    """FSDP1 (``FullyShardedDataParallel``, accelerate's default) with the decoder layers as units, as
    transformers' layer-class auto-wrap makes them; the head in the root unit, or in its own (a size-based policy
    wraps a large head). ``orig_params=False``: the flat parameter's views stand in for the parameters."""
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    layer, lm_head = type(model.model.layers[0]), model.lm_head
    units = functools.partial(
        lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, layer) or (head == "own" and m is lm_head)
    )
    precision = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    return FullyShardedDataParallel(
        model, auto_wrap_policy=units, use_orig_params=orig_params, device_id=torch.device("cpu"),
        mixed_precision=precision,
    )  # fmt: skip


def _fsdp_wrapper(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 on an encoder-decoder wrapper: the decoder as its own unit (its hooks run around the call the wrapper
    hands the labels to), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model.decoder, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _ddp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def _tp_torch(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})


def _tp_transformers(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    # transformers shards the parameters while loading a checkpoint (the style's shard_param), then installs the
    # layout transforms around the head's forward (apply_tensor_parallelism).
    style = ALL_PARALLEL_STYLES["colwise_gather_output"]
    style.shard_param(model.lm_head, "weight", mesh)
    return apply_tensor_parallelism(model, mesh, {"lm_head": "colwise_gather_output"})


def _mesh_2d() -> Any:
    """A (data parallel, tensor parallel) mesh with a tensor-parallel dimension of ``TP_SIZE``: (1, 2) on two ranks,
    (2, 2) on four."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size() // TP_SIZE, TP_SIZE), mesh_dim_names=("dp", "tp"))


def _fsdp_over_tp(model: torch.nn.Module, head: str = "own") -> torch.nn.Module:
    """2-D parallelism: the head vocabulary-sharded over the tensor-parallel dimension (torch's ``ColwiseParallel``),
    then ``fully_shard`` over the data-parallel one, the head its own unit or in the root's. Inside the head's FSDP
    unit its weight is still a tensor-parallel ``DTensor``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = _mesh_2d()
    model = parallelize_module(model, mesh["tp"], {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    if head == "own":
        fully_shard(model.lm_head, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def _hooked(model: torch.nn.Module) -> torch.nn.Module:
    """A user's forward hook on the head, beside the engine's and the layout's: it sees the logits."""
    model.lm_head.register_forward_hook(lambda module, args, out: None)
    return model


_SAVED = [0]


def _transformers_2d(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' own 2-D parallelism: ``from_pretrained(..., distributed_config=DistributedConfig(tp_size=2,
    fsdp_size=WORLD/2))`` of the tiny model's saved weights. Its TP plan shards every layer (the head colwise,
    through an instance ``tp_forward``) and its FSDP plan groups the final norm and the head in one unit."""
    from transformers.distributed import DistributedConfig

    _SAVED[0] += 1
    path = OUT_DIR / f"tiny-llama-{_SAVED[0]}"
    if dist.get_rank() == 0:
        model.save_pretrained(path)
    dist.barrier()
    config = DistributedConfig(tp_size=TP_SIZE, fsdp_size=dist.get_world_size() // TP_SIZE)
    loaded = type(model).from_pretrained(path, distributed_config=config, dtype=torch.float32)
    return loaded.train()


def _ds_config(stage: int = 3) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }


def _zero3(model: torch.nn.Module, stage: int = 3, train: bool = True) -> torch.nn.Module:
    """``train=False``: a frozen model (a distillation teacher), partitioned without an optimizer."""
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 - the module, looked up below (the package's ``torch`` is torch)

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (C++, ninja) when it starts; gloo alone
    # is enough for two tiny processes and keeps the test free of a compiler.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    optimizer = torch.optim.SGD(model.parameters(), lr=LR) if train else None
    engine, *_ = deepspeed.initialize(model=model, config=_ds_config(stage), optimizer=optimizer)
    return engine


# name -> (builder, wrapper, parallelism): False data parallel (each rank its own batch), True tensor parallel (one
# batch on every rank), "2d" both (a batch per data-parallel index, shared by the TP_SIZE ranks holding it).
SETUPS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[torch.nn.Module], torch.nn.Module], bool | str]] = {
    "ddp": (build_llama, _ddp, False),
    "fsdp2-head-in-root": (build_llama, lambda m: _fsdp(m, head="root"), False),
    "fsdp2-head-own-unit": (build_llama, lambda m: _fsdp(m, head="own"), False),
    "fsdp2-head-grouped": (build_llama, lambda m: _fsdp(m, head="grouped"), False),
    "fsdp2-bf16": (build_llama, lambda m: _fsdp(m, head="own", bf16=True), False),
    "zero3": (build_llama, _zero3, False),
    # Engines for TRL's per-token head with a frozen head only (TRL_SETUPS).
    "frozen-head-fsdp2-head-own-unit": (build_llama_frozen_head, lambda m: _fsdp(m, head="own"), False),
    "frozen-head-zero3": (build_llama_frozen_head, _zero3, False),
    "zero2": (build_llama, lambda m: _zero3(m, stage=2), False),
    "fsdp1-head-in-root": (build_llama, lambda m: _fsdp1(m, head="root"), False),
    "fsdp1-head-own-unit": (build_llama, lambda m: _fsdp1(m, head="own"), False),
    "fsdp1-head-own-unit-flat": (build_llama, lambda m: _fsdp1(m, head="own", orig_params=False), False),
    "fsdp1-bf16": (build_llama, lambda m: _fsdp1(m, head="own", bf16=True), False),
    # ZeRO-3 hooks every module, the epilogue module included (harmless there: it holds no tensors).
    "inkling2-ddp": (build_inkling2, _ddp, False),
    "inkling2-zero3": (build_inkling2, _zero3, False),
    # PEFT's head wrappers: the wrapper is what FSDP2 shards as the head's unit and what ZeRO-3 hooks.
    "peft-save-ddp": (lambda: build_peft("save"), _ddp, False),
    "peft-save-fsdp2": (lambda: build_peft("save"), lambda m: _fsdp(m, head="own"), False),
    "peft-save-zero3": (lambda: build_peft("save"), _zero3, False),
    "peft-tokens-ddp": (lambda: build_peft("tokens"), _ddp, False),
    # The tied head's weight is the embedding's: both wrappers stay in the root unit.
    "peft-tokens-fsdp2": (lambda: build_peft("tokens"), lambda m: _fsdp(m, head="root"), False),
    "peft-tokens-zero3": (lambda: build_peft("tokens"), _zero3, False),
    # LoRA on the head: its term is formed inside the root unit (FSDP2), where nothing else manages its weights.
    "peft-lora-ddp": (lambda: build_peft("lora"), _ddp, False),
    "peft-lora-fsdp2": (lambda: build_peft("lora"), lambda m: _fsdp(m, head="root"), False),
    "peft-lora-zero3": (lambda: build_peft("lora"), _zero3, False),
    # The wrapper's forward and its decoder's both run fused: two counts a step.
    "bert2bart-ddp": (build_bert2bart, _ddp, False),
    "bert2bart-fsdp2": (build_bert2bart, _fsdp_wrapper, False),
    "bert2bart-zero3": (build_bert2bart, _zero3, False),
    "llama4-vlm-ddp": (build_llama4_vlm, _ddp_some_unused, False),
    "llama4-vlm-fsdp2": (build_llama4_vlm, _fsdp_language_model, False),
    "tp-torch-colwise": (build_llama, _tp_torch, True),
    "tp-transformers-colwise": (build_llama, _tp_transformers, True),
    "tp-uneven-vocab": (lambda: build_llama(TP_VOCAB_UNEVEN), _tp_transformers, True),
    "fsdp2-over-tp": (build_llama, _fsdp_over_tp, True),
    "fsdp2-over-tp-hooked": (build_llama, lambda m: _hooked(_fsdp_over_tp(m)), True),
    # Four ranks: data parallel 2 x tensor parallel 2 (TWO_D_SETUPS).
    "2d-torch-head-own-unit": (build_llama, _fsdp_over_tp, "2d"),
    "2d-torch-head-in-root": (build_llama, lambda m: _fsdp_over_tp(m, head="root"), "2d"),
    "2d-transformers": (build_llama, _transformers_2d, "2d"),
}
TWO_D_SETUPS = ("2d-torch-head-own-unit", "2d-torch-head-in-root", "2d-transformers")


def is_2d(setup: str) -> bool:
    """Whether a setup (or a Trainer-feature setup on an engine: ``smooth-*``, ``eval-*``) runs on the four-rank
    2-D layout."""
    engine = {**SMOOTHING_SETUPS, **EVAL_SETUPS}.get(setup, setup)
    return SETUPS.get(engine, (None, None, False))[2] == "2d"


def batch_index(setup: str, rank: int) -> int:
    """Which ``batch`` a rank trains on in a setup."""
    parallelism = SETUPS[setup][2]
    if parallelism == "2d":
        return rank // TP_SIZE
    return 0 if parallelism else rank


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(model, FullyShardedDataParallel):
        if not model._use_orig_params:
            return None  # no per-parameter gradients to gather: the second step's loss checks them
        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            return {n.replace("_fsdp_wrapped_module.", ""): p.grad.detach().float().clone()
                    for n, p in model.named_parameters() if p.grad is not None}  # fmt: skip

    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # ZeRO-3 / ZeRO-2: the partitioned gradient, gathered
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        if g is None:
            continue
        if isinstance(g, DTensor):
            g = g.full_tensor()
        grads[name.removeprefix("module.")] = g.detach().float().clone()
    return grads


# HF Trainer's label smoothing (logitless.integrations.hf_trainer) on an engine: setup -> the engine's setup.
SMOOTHING_SETUPS = {"smooth-ddp": "ddp", "smooth-fsdp2-head-own-unit": "fsdp2-head-own-unit",
                    "smooth-fsdp1-head-own-unit": "fsdp1-head-own-unit", "smooth-zero3": "zero3",
                    "smooth-tp-transformers-colwise": "tp-transformers-colwise",
                    "smooth-2d-transformers": "2d-transformers"}  # fmt: skip
SMOOTHING = 0.1


def trainer_shifts(setup: str) -> bool:
    """Whether ``Trainer.compute_loss`` shifts the labels for its smoother: only when the unwrapped model's class
    name is a causal LM's. FSDP2 renames the class it shards (``FSDPLlamaForCausalLM``), so stock Trainer smooths
    that model's logits unshifted; logitless computes what stock computes."""
    return "fsdp2" not in setup and not is_2d(setup)


def smoothed_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``Trainer.compute_loss`` itself with ``label_smoothing_factor=SMOOTHING``, on a stand-in for the Trainer
    holding what that method reads (a Trainer cannot be built around an engine-wrapped model here)."""
    from types import SimpleNamespace

    import transformers
    from accelerate.utils import extract_model_from_parallel
    from transformers.trainer_pt_utils import LabelSmoother

    trainer = SimpleNamespace(
        label_smoother=LabelSmoother(epsilon=SMOOTHING), compute_loss_func=None, model_accepts_loss_kwargs=False,
        accelerator=SimpleNamespace(unwrap_model=extract_model_from_parallel, parallelism_config=None),
        args=SimpleNamespace(average_tokens_across_devices=False, torch_compile=False, past_index=-1, n_gpu=1),
        get_tp_size=lambda: 1,
    )  # fmt: skip
    return transformers.Trainer.compute_loss(trainer, model, {"input_ids": ids, "labels": labels_of(ids)})


# A loss-only evaluation forward (eval mode, no grad, under _state.loss_only() as Trainer.prediction_step runs
# it) on an engine: setup -> the engine's setup.
EVAL_SETUPS = {"eval-fsdp2-head-own-unit": "fsdp2-head-own-unit", "eval-fsdp1-head-own-unit": "fsdp1-head-own-unit",
               "eval-zero3": "zero3", "eval-tp-transformers-colwise": "tp-transformers-colwise",
               "eval-2d-transformers": "2d-transformers"}  # fmt: skip


def run_eval(setup: str, rank: int) -> dict[str, Any]:
    from logitless import _state

    builder, wrap, _ = SETUPS[EVAL_SETUPS[setup]]
    ids = batch(batch_index(EVAL_SETUPS[setup], rank))
    row: dict[str, Any] = {}
    for mode in ("stock", "logitless"):
        logitless.uninstall()
        if mode == "logitless":
            logitless.install()
        model = wrap(builder())
        model.eval()
        with torch.no_grad(), _state.loss_only():
            out = model(input_ids=ids, labels=labels_of(ids))
        row[mode] = {"loss": float(out.loss.float()), "logits_width": int(out.logits.shape[-1])}
    row["runtime"] = logitless.audit()["runtime"]
    logitless.uninstall()
    return row


# A training forward under _state.keeping_logits() (TRL < 1.15's SFTTrainer reads the logits for its metrics):
# the fused loss, and the logits formed by a second call of the engine's head: setup -> the engine's setup.
KEEP_LOGITS_SETUPS = {"keep-fsdp2-head-own-unit": "fsdp2-head-own-unit",
                      "keep-fsdp1-head-own-unit": "fsdp1-head-own-unit", "keep-zero3": "zero3",
                      "keep-tp-transformers-colwise": "tp-transformers-colwise"}  # fmt: skip


# TRL's heads on an engine, added before the engine wraps the model as TRL's trainers do: TRL >= 1.15's fused head with
# SFT's mean loss, its gradient formed in the forward pass ("fused") or, without the hint, in the second kernel pass
# that DPO / GRPO / KTO take ("tokens"), or with a frozen head, formed in the forward pass without a hint ("tokens"
# on a "frozen-head-*" engine), and TRL 1.5-1.14's chunked SFT head. setup -> (head, the engine's setup).
TRL_SETUPS = {"trl-sft-fsdp2-head-own-unit": ("fused", "fsdp2-head-own-unit"), "trl-sft-zero3": ("fused", "zero3"),
              "trl-tokens-fsdp2-head-own-unit": ("tokens", "fsdp2-head-own-unit"), "trl-tokens-zero3": ("tokens", "zero3"),
              "trl-chunked-fsdp2-head-own-unit": ("chunked", "fsdp2-head-own-unit"),
              "trl-chunked-zero3": ("chunked", "zero3"),
              "trl-sft-ddp": ("fused", "ddp"), "trl-tokens-ddp": ("tokens", "ddp"),
              "trl-tokens-frozen-fsdp2": ("tokens", "frozen-head-fsdp2-head-own-unit"),
              "trl-tokens-frozen-zero3": ("tokens", "frozen-head-zero3")}  # fmt: skip


def run_trl(setup: str, rank: int) -> dict[str, Any]:
    from logitless import _state, ops
    from logitless.integrations import trl as fused_head
    from logitless.integrations import trl_legacy

    head, engine = TRL_SETUPS[setup]
    builder, wrap, _ = SETUPS[engine]
    ids = batch(rank)
    logitless.uninstall()
    logitless.install()
    model = builder()
    if head in ("fused", "tokens"):
        fused_head.add_fused_lm_head(model)
    else:
        trl_legacy.patch_chunked_ce_lm_head(model, chunk_size=256)
    model = wrap(model)

    def loss_of(model: torch.nn.Module) -> torch.Tensor:
        if head == "chunked":
            return model(input_ids=ids, labels=labels_of(ids)).loss
        # The hint is what the SFTTrainer.compute_loss wrapper enters.
        with _state.expecting_uniform_grad() if head == "fused" else contextlib.nullcontext():
            out = model(input_ids=ids, labels=labels_of(ids), fused_lm_head=True)
        return -out.log_probs.sum() / out.label_mask.sum()

    second_passes: list[int] = []
    real = ops._rows_backward
    ops._rows_backward = lambda *a: second_passes.append(1) or real(*a)  # type: ignore[assignment]
    try:
        losses, grads = _two_steps(model, loss_of)
    finally:
        ops._rows_backward = real  # type: ignore[assignment]
    row = {"logitless": {"losses": losses, "grads": grads}, "second_passes": len(second_passes),
           "runtime": logitless.audit()["runtime"]}  # fmt: skip
    logitless.uninstall()
    return row


# TRL's DistillationTrainer divergence on sharded heads, on each rank's own positions. FSDP2: each head its own unit,
# read outside any forward (the DTensor path both TRL's kernel and logitless's drop-in take). ZeRO-3: both models
# partitioned, the heads gathered by TRL's helper, the loss run inside the student engine's forward as
# DistillationTrainer runs it (``_ForwardRedirection``), the gradient reduced by ``engine.backward``.
DISTILL_SETUPS = ("distill-fsdp2-head-own-unit", "distill-zero3")


DISTILL_BETA, DISTILL_TEMPERATURE = 0.5, 0.9


def distill_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The student and a teacher whose head differs from it."""
    student, teacher = build_llama(), build_llama()
    with torch.no_grad():
        teacher.lm_head.weight.add_(torch.randn(teacher.lm_head.weight.shape,
                                                generator=torch.Generator().manual_seed(5)) * 0.05)  # fmt: skip
    return student, teacher


def distill_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rank's student and teacher hidden states and completion mask."""
    g = torch.Generator().manual_seed(200 + rank)
    width = tiny._COMMON["hidden_size"]
    h_s, h_t = torch.randn(2, SEQ, width, generator=g), torch.randn(2, SEQ, width, generator=g)
    return h_s, h_t, (torch.rand(2, SEQ, generator=g) > 0.3).long()


def distill_reference(world: int) -> list[dict[str, Any]]:
    """Each rank's divergence, entropy sum and hidden-state gradient in float64 from the materialised logits of the
    whole heads, and the head's gradient the engines give every rank: the mean of the ranks' own."""
    from ops_reference import divergence64

    student, teacher = distill_models()
    rows = []
    for rank in range(world):
        h_s, h_t, mask = distill_inputs(rank)
        hidden = h_s.double().requires_grad_()
        weight = student.lm_head.weight.detach().double().requires_grad_()
        log_s = torch.log_softmax(hidden @ weight.T / DISTILL_TEMPERATURE, -1)
        log_t = torch.log_softmax(h_t.double() @ teacher.lm_head.weight.detach().double().T / DISTILL_TEMPERATURE, -1)
        kept = mask.bool()
        loss = divergence64(log_s, log_t, DISTILL_BETA)[kept].sum() / kept.sum()
        loss.backward()
        entropy = -(log_s.exp() * log_s).sum(-1)[kept].sum()
        rows.append({"loss": float(loss.detach()), "entropy_sum": float(entropy.detach()),
                     "n_valid": int(kept.sum()), "d_hidden": hidden.grad, "d_weight": weight.grad})  # fmt: skip
    mean = sum(row["d_weight"] for row in rows) / world
    for row in rows:
        row["d_weight"] = mean
    return rows


def run_distill(setup: str, rank: int, trls: Callable[..., Any]) -> dict[str, Any]:
    """``trls``: TRL's own divergence, taken before ``install()`` put logitless's in its place."""
    from logitless.integrations import trl_distillation

    assert trls is not trl_distillation.chunked_divergence_loss
    h_s, h_t, mask = distill_inputs(rank)
    engine = _DistillEngine(setup, *distill_models())
    # TRL's kernel runs with the teacher frozen: on an FSDP2 teacher head that requires grad it fails in backward
    # (the gathered weight's gradient reaches ``full_tensor()``'s backward as a plain tensor). logitless, which never
    # differentiates the teacher, also runs with it trainable there.
    runs = [("trl", trls, False), ("logitless", trl_distillation.chunked_divergence_loss, False)]
    if setup == "distill-fsdp2-head-own-unit":
        runs.append(("logitless-trainable-teacher", trl_distillation.chunked_divergence_loss, True))
    row: dict[str, Any] = {}
    for name, divergence, trainable_teacher in runs:
        engine.teacher.requires_grad_(trainable_teacher)
        hidden = h_s.clone().requires_grad_()

        def compute(divergence: Callable[..., Any] = divergence, hidden: torch.Tensor = hidden) -> Any:
            s, t = engine.student, engine.teacher
            with trl_distillation._running(s, t):
                return divergence(hidden, h_t, s.lm_head.weight, t.lm_head.weight, mask, DISTILL_BETA,
                                  temperature=DISTILL_TEMPERATURE)  # fmt: skip

        loss, entropy_sum, n_valid = engine.call(compute)
        d_weight = engine.backward(loss)
        row[name] = {"loss": float(loss.detach()), "entropy_sum": float(entropy_sum), "n_valid": int(n_valid),
                     "d_hidden": hidden.grad.clone(), "d_weight": d_weight,
                     "teacher_grads": sum(p.grad is not None for p in engine.teacher.parameters())}  # fmt: skip
    row["distillation"] = logitless.audit()["integrations"]["trl"]["distillation"]
    return row


class _DistillEngine:
    """A student and a teacher under one engine: ``student`` / ``teacher`` are the transformers models,
    ``call`` runs the loss as DistillationTrainer would, ``backward`` returns the head's full gradient (the ranks'
    mean under ZeRO-3, which averages; FSDP2's reduce-scatter also averages) and clears it."""

    def __init__(self, setup: str, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        self.zero3 = setup == "distill-zero3"
        if self.zero3:
            from transformers.integrations import HfDeepSpeedConfig

            self._wrapped = _zero3(student)
            self.student, self.teacher = self._wrapped.module, _zero3(teacher.requires_grad_(False), train=False).module
            # What an HF Trainer under ZeRO-3 holds: TRL's gather helper asks transformers whether ZeRO-3 is on.
            self._hf_config = HfDeepSpeedConfig(_ds_config())
        else:
            self.student, self.teacher = _fsdp(student, head="own"), _fsdp(teacher, head="own")

    def call(self, compute: Callable[[], Any]) -> Any:
        if not self.zero3:
            return compute()
        from trl.models.utils import _ForwardRedirection

        return _ForwardRedirection()(self._wrapped, self.student, compute)

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        weight = self.student.lm_head.weight
        if not self.zero3:
            from torch.distributed.tensor import DTensor

            loss.backward()
            assert isinstance(weight, DTensor) and isinstance(weight.grad, DTensor)
            grad = weight.grad.full_tensor().clone()
            self.student.zero_grad(set_to_none=True)
            return grad
        from deepspeed.utils import safe_get_full_grad

        self._wrapped.backward(loss)
        grad = safe_get_full_grad(weight).clone()
        self._wrapped.optimizer.zero_grad()
        return grad


def _on_engine(setup: str, trained: torch.nn.Module, frozen: torch.nn.Module | None = None) -> tuple[Any, Any]:
    """A trainer setup's models on the engine its name ends with: ``-zero3`` (the frozen one a ZeRO-3 engine without
    an optimizer), ``-fsdp2-head-own-unit`` (both sharded, each head its own unit) or ``-ddp`` (the frozen one plain,
    as accelerate prepares a model for evaluation)."""
    if setup.endswith("-zero3"):
        return _zero3(trained), _zero3(frozen, train=False) if frozen is not None else None
    if setup.endswith("-fsdp2-head-own-unit"):
        return _fsdp(trained, head="own"), _fsdp(frozen, head="own") if frozen is not None else None
    return _ddp(trained), frozen


def _stock_and_logitless(trainer: str, steps: Callable[[], tuple[list[float], Any]]) -> dict[str, Any]:
    """A TRL trainer setup's row: ``steps()`` (fresh models on the engine, two SGD steps: losses and the first step's
    gradients) run stock and under ``install()``, and the trainer's audit counts of the installed run."""
    row: dict[str, Any] = {}
    for mode in ("stock", "logitless"):
        logitless.uninstall()
        if mode == "logitless":
            logitless.install()
        losses, grads = steps()
        row[mode] = {"losses": losses, "grads": grads}
    row[trainer] = logitless.audit()["integrations"]["trl"][trainer]
    logitless.uninstall()
    return row


# TRL's GKDTrainer step (logitless.integrations.trl_gkd) on an engine, stock and installed: both models' forwards
# through their engines (the teacher frozen: plain beside DDP, as accelerate prepares it for evaluation; its own
# FSDP2 units, or a ZeRO-3 engine without an optimizer), the student's head its own unit.
GKD_SETUPS = ("gkd-ddp", "gkd-fsdp2-head-own-unit", "gkd-zero3")
GKD_BETA = 0.5


def _gkd_trainer(teacher: torch.nn.Module) -> Any:
    """A GKDTrainer with only what its ``compute_loss`` reads (its __init__ builds a whole Trainer)."""
    from types import SimpleNamespace

    from trl.experimental.gkd import GKDTrainer

    trainer = GKDTrainer.__new__(GKDTrainer)
    trainer.teacher_model, trainer.beta = teacher, GKD_BETA
    trainer.args = SimpleNamespace(torch_compile=False)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: getattr(m, "module", m))
    return trainer


def run_gkd(setup: str, rank: int) -> dict[str, Any]:
    ids = batch(rank)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels_of(ids)}

    def steps() -> tuple[list[float], Any]:
        student, teacher = distill_models()
        with torch.no_grad():  # sharper distributions: a divergence far from 0
            student.lm_head.weight.mul_(8.0)
            teacher.lm_head.weight.mul_(8.0)
        teacher.requires_grad_(False)
        student, teacher = _on_engine(setup, student, teacher)
        trainer = _gkd_trainer(teacher)
        return _two_steps(student, lambda model: trainer.compute_loss(model, inputs))

    return _stock_and_logitless("gkd", steps)


# TRL's ORPOTrainer step (logitless.integrations.trl_odds) on an engine, stock and installed: the stacked chosen and
# rejected rows through the engine's forward, the per-token log-probabilities from the head's call.
ODDS_SETUPS = ("orpo-ddp", "orpo-fsdp2-head-own-unit", "orpo-zero3")


def _orpo_trainer() -> Any:
    """An ORPOTrainer with only what its ``get_batch_loss_metrics`` reads (its __init__ builds a whole Trainer)."""
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    trainer = ORPOTrainer.__new__(ORPOTrainer)
    trainer.is_encoder_decoder, trainer.padding_value, trainer.aux_loss_enabled, trainer.beta = False, 0, False, 0.5
    trainer.args = SimpleNamespace(torch_compile=False)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: getattr(m, "module", m), device=torch.device("cpu"),
                                          gather_for_metrics=lambda t: t)  # fmt: skip
    return trainer


def _orpo_batch(rank: int) -> dict[str, torch.Tensor]:
    ids = batch(rank)
    chosen, rejected = ids, ids.flip(0)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # a padded row
    labels = chosen.clone()
    labels[:, :3] = -100  # the prompt
    labels[mask == 0] = -100
    rejected_labels = rejected.clone()
    rejected_labels[:, :3] = -100
    return {"chosen_input_ids": chosen, "chosen_attention_mask": mask, "chosen_labels": labels,
            "rejected_input_ids": rejected, "rejected_attention_mask": torch.ones_like(ids),
            "rejected_labels": rejected_labels}  # fmt: skip


def run_odds(setup: str, rank: int) -> dict[str, Any]:
    inputs = _orpo_batch(rank)

    def steps() -> tuple[list[float], Any]:
        model, _ = _on_engine(setup, distill_models()[0])
        trainer = _orpo_trainer()
        return _two_steps(model, lambda m: trainer.get_batch_loss_metrics(m, inputs)[0])

    return _stock_and_logitless("orpo", steps)


# TRL's OnlineDPOTrainer log-probabilities (logitless.integrations.trl_online_dpo) on an engine, stock and installed:
# the policy's completion log-probabilities with gradients, the reference model's (frozen: plain beside DDP, its own
# FSDP2 units, or a ZeRO-3 engine without an optimizer) without, and Online DPO's sigmoid loss on them.
ONLINE_DPO_SETUPS = ("online-dpo-ddp", "online-dpo-fsdp2-head-own-unit", "online-dpo-zero3")


def _online_dpo_trainer() -> Any:
    """An OnlineDPOTrainer with only what its ``_forward`` reads (its __init__ builds a whole Trainer)."""
    from types import SimpleNamespace

    from trl.experimental.online_dpo import OnlineDPOTrainer

    trainer = OnlineDPOTrainer.__new__(OnlineDPOTrainer)
    trainer.max_length = 64
    trainer.args = SimpleNamespace(torch_compile=False)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: getattr(m, "module", m))
    return trainer


def _online_dpo_loss(trainer: Any, policy: Any, reference: Any, rank: int) -> torch.Tensor:
    ids = batch(rank)
    prompt, completion = ids[:, :5], ids[:, 5:]
    completion_mask = torch.ones_like(completion)
    completion_mask[1, -3:] = 0  # a completion that ended early
    call = (prompt, torch.ones_like(prompt), completion, completion_mask)
    logprobs = trainer._forward(policy, *call)
    with torch.no_grad():
        ref_logprobs = trainer._forward(reference, *call)
    # Row 0 chosen, row 1 rejected: Online DPO's sigmoid loss on the summed completion log-probabilities.
    summed, ref_summed = (logprobs * completion_mask).sum(1), (ref_logprobs * completion_mask).sum(1)
    margin = (summed[0] - summed[1]) - (ref_summed[0] - ref_summed[1])
    return -torch.nn.functional.logsigmoid(0.1 * margin)


def run_online_dpo(setup: str, rank: int) -> dict[str, Any]:
    def steps() -> tuple[list[float], Any]:
        policy, reference = distill_models()
        with torch.no_grad():  # a policy far from its reference: a margin far from 0
            policy.lm_head.weight.mul_(8.0)
        reference.requires_grad_(False)
        policy, reference = _on_engine(setup, policy, reference)
        trainer = _online_dpo_trainer()
        return _two_steps(policy, lambda model: _online_dpo_loss(trainer, model, reference, rank))

    return _stock_and_logitless("online_dpo", steps)


# TRL's TPOTrainer step (logitless.integrations.trl_tpo) on an engine, stock and installed: the chosen, rejected and
# gold rows through the engine's forward, the preference loss and the gold rows' NLL from the head's call.
TPO_SETUPS = ("tpo-ddp", "tpo-fsdp2-head-own-unit", "tpo-zero3")


def _tpo_trainer(model: torch.nn.Module) -> Any:
    """A TPOTrainer with only what its ``_compute_loss`` reads (its __init__ builds a whole Trainer)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.experimental.tpo import TPOTrainer

    trainer = TPOTrainer.__new__(TPOTrainer)
    trainer.model, trainer.tpo_alpha, trainer.beta, trainer.loss_type, trainer.label_smoothing = model, 1.0, 0.5, \
        "sigmoid", 0.0
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    trainer.args = SimpleNamespace(torch_compile=False)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: getattr(m, "module", m),
                                          gather_for_metrics=lambda t: t, gather=lambda t: t)  # fmt: skip
    return trainer


def _tpo_inputs(rank: int) -> dict[str, torch.Tensor]:
    ids = batch(rank)
    ids = torch.cat([ids[:1], ids[1:], ids[:1].flip(1)])  # chosen, rejected, gold
    attention = torch.ones_like(ids)
    attention[1, -2:] = 0  # a padded row
    completion = attention.clone()
    completion[:, :4] = 0  # the prompt
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def run_tpo(setup: str, rank: int) -> dict[str, Any]:
    inputs = _tpo_inputs(rank)

    def steps() -> tuple[list[float], Any]:
        model, _ = _on_engine(setup, distill_models()[0])
        trainer = _tpo_trainer(model)
        return _two_steps(model, lambda m: trainer._compute_loss(m, inputs, False))

    return _stock_and_logitless("tpo", steps)


# TRL's A2POTrainer sequence log-probabilities (logitless.integrations.trl_a2po) on an engine, stock and installed:
# the policy's with gradients, the frozen reference model's without under its own engine, and A*-PO's regression
# loss on them.
A2PO_SETUPS = ("a2po-ddp", "a2po-fsdp2-head-own-unit", "a2po-zero3")


def _a2po_loss(trainer: Any, policy: Any, reference: Any, rank: int) -> torch.Tensor:
    ids = batch(rank)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a completion that ended early
    completion = ids.size(1) - 5
    logps = trainer._get_sequence_logps(policy, ids, mask, completion)
    with torch.no_grad():
        ref_logps = trainer._get_sequence_logps(reference, ids, mask, completion)
    target = torch.tensor([0.5, -0.5])  # reward minus the optimal value
    return ((0.1 * (logps - ref_logps) - target) ** 2).mean()


def run_a2po(setup: str, rank: int) -> dict[str, Any]:
    from types import SimpleNamespace

    from trl.experimental.a2po import A2POTrainer

    def steps() -> tuple[list[float], Any]:
        policy, reference = distill_models()
        with torch.no_grad():  # a policy far from its reference: log-ratios far from 0
            policy.lm_head.weight.mul_(8.0)
        reference.requires_grad_(False)
        trainer = A2POTrainer.__new__(A2POTrainer)  # only what _get_sequence_logps reads
        trainer.model_kwarg_keys = inspect.signature(policy.forward).parameters.keys()
        trainer.args = SimpleNamespace(torch_compile=False)
        trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: getattr(m, "module", m))
        policy, reference = _on_engine(setup, policy, reference)
        return _two_steps(policy, lambda model: _a2po_loss(trainer, model, reference, rank))

    return _stock_and_logitless("a2po", steps)


# TRL's SDPOTrainer step (logitless.integrations.trl_self_distillation) on an engine, stock and installed: the
# student's completion log-probabilities with gradients (policy and distillation losses, half each), the frozen EMA
# teacher's under its own engine on a longer prompt before the same completion; sampled-token distillation, or top-k
# ("sdpo-topk-*": the student's top 8 log-probabilities from its head's call, the teacher's at those ids).
SDPO_SETUPS = ("sdpo-ddp", "sdpo-fsdp2-head-own-unit", "sdpo-zero3", "sdpo-topk-ddp", "sdpo-topk-fsdp2-head-own-unit",
               "sdpo-topk-zero3")  # fmt: skip


def _sdpo_trainer(model: torch.nn.Module, teacher: torch.nn.Module, mode: str) -> Any:
    """An SDPOTrainer with only what its ``compute_loss`` reads (its __init__ builds a whole Trainer)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.experimental.sdpo import SDPOTrainer

    trainer = SDPOTrainer.__new__(SDPOTrainer)
    trainer.model, trainer.teacher_model, trainer.use_teacher_server = model, teacher, False
    trainer.temperature, trainer.importance_sampling_level, trainer.loss_type = 0.9, "token", "grpo"
    trainer.epsilon_low, trainer.epsilon_high, trainer.max_completion_length = 0.2, 0.2, SEQ - 5
    trainer.current_gradient_accumulation_steps, trainer._name = 1, "SDPO"
    trainer.model_kwarg_keys = inspect.signature(getattr(model, "module", model).forward).parameters.keys()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.args = SimpleNamespace(torch_compile=False, distillation_weight=0.5, distillation_mode=mode,
                                   distillation_alpha=1.0, distillation_is_clip=2.0, teacher_model_kind="ema",
                                   distillation_topk=8, distillation_add_tail=True)  # fmt: skip
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: getattr(m, "module", m), gather=lambda t: t)
    return trainer


def _sdpo_inputs(rank: int) -> dict[str, torch.Tensor]:
    ids = batch(rank)
    prompt, completion = ids[:, :5], ids[:, 5:]
    completion_mask = torch.ones_like(completion)
    completion_mask[1, -3:] = 0  # a completion that ended early
    teacher_ids = torch.cat([ids[:, :5].flip(1), prompt, completion], 1)  # privileged context, prompt, completion
    old = torch.linspace(-5.0, -3.0, completion.numel()).reshape(completion.shape)  # some ratios clipped
    return {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
            "completion_mask": completion_mask, "teacher_input_ids": teacher_ids,
            "teacher_attention_mask": torch.ones_like(teacher_ids), "self_distillation_mask": torch.tensor([1.0, 1.0]),
            "advantages": torch.tensor([0.5, -0.5]), "old_per_token_logps": old}  # fmt: skip


def run_sdpo(setup: str, rank: int) -> dict[str, Any]:
    inputs = _sdpo_inputs(rank)

    def steps() -> tuple[list[float], Any]:
        student, teacher = distill_models()
        teacher.requires_grad_(False)
        student, teacher = _on_engine(setup, student, teacher)
        trainer = _sdpo_trainer(student, teacher, "topk_logits" if "topk" in setup else "sampled_token")
        return _two_steps(student, lambda model: trainer.compute_loss(model, inputs))

    return _stock_and_logitless("sdpo", steps)


def _two_steps(
    model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor]
) -> tuple[list[float], dict[str, torch.Tensor] | None]:
    """Two SGD steps on an engine-wrapped model: each step's loss, and the full gradients of the first. Step 2 runs on
    the updated (resharded, re-gathered) parameters: the engines' state after a fused step."""
    deepspeed_engine = hasattr(model, "backward")
    optimizer = None if deepspeed_engine else torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], None
    for step in range(2):
        loss = loss_of(model)
        losses.append(float(loss.detach().float()))
        if deepspeed_engine:
            model.backward(loss)
        else:
            loss.backward()
        if step == 0:
            grads = _full_grads(model)
            if deepspeed_engine:
                model.step()
            elif optimizer is not None:
                optimizer.step()
                optimizer.zero_grad()
    return losses, grads


def run(setup: str, rank: int) -> dict[str, Any]:
    if setup in DISTILL_SETUPS:
        from trl.trainer import distillation_trainer

        logitless.uninstall()
        trls = distillation_trainer._chunked_divergence_loss
        logitless.install()
        try:
            return run_distill(setup, rank, trls)
        finally:
            logitless.uninstall()
    if setup in GKD_SETUPS:
        return run_gkd(setup, rank)
    if setup in ODDS_SETUPS:
        return run_odds(setup, rank)
    if setup in ONLINE_DPO_SETUPS:
        return run_online_dpo(setup, rank)
    if setup in TPO_SETUPS:
        return run_tpo(setup, rank)
    if setup in A2PO_SETUPS:
        return run_a2po(setup, rank)
    if setup in SDPO_SETUPS:
        return run_sdpo(setup, rank)
    if setup in EVAL_SETUPS:
        return run_eval(setup, rank)
    if setup in TRL_SETUPS:
        return run_trl(setup, rank)
    if setup in KEEP_LOGITS_SETUPS:
        from logitless import _state

        with _state.keeping_logits():
            return _run(KEEP_LOGITS_SETUPS[setup], rank, smoothing=False)
    return _run(SMOOTHING_SETUPS.get(setup, setup), rank, smoothing=setup in SMOOTHING_SETUPS)


def _run(setup: str, rank: int, smoothing: bool) -> dict[str, Any]:
    builder, wrap, _ = SETUPS[setup]
    vocab = TP_VOCAB_UNEVEN if setup == "tp-uneven-vocab" else tiny.VOCAB
    ids = batch(batch_index(setup, rank), vocab)
    row: dict[str, Any] = {}
    for mode in ("stock", "logitless"):
        logitless.uninstall()
        if mode == "logitless":
            logitless.install()
        widths: list[int] = []

        def loss_of(model: torch.nn.Module) -> torch.Tensor:
            if smoothing:
                return smoothed_loss(model, ids)
            out = model(input_ids=ids, labels=labels_of(ids))
            widths.append(int(out.logits.shape[-1]))
            return out.loss

        model = wrap(builder())
        losses, grads = _two_steps(model, loss_of)
        row[mode] = {"losses": losses, "logits_widths": widths, "grads": grads}
        if SETUPS[setup][2] == "2d":
            # A forward without labels after the fused steps: the layout's hooks are back, the logits whole.
            with torch.no_grad():
                row[mode]["logits_after"] = model(input_ids=ids).logits.detach().float().clone()
    report = logitless.audit()
    row["runtime"] = report["runtime"]
    row["smoothing_calls"] = report["integrations"]["hf_trainer"]["calls"]
    logitless.uninstall()
    return row


# The vocabulary-parallel op itself (``vocab-parallel-op``): the whole head is made on both ranks from one seed and
# each rank keeps rows [VP_SPLIT[r], VP_SPLIT[r + 1]) -- uneven, and the boundary is a target.
VP_ROWS, VP_HIDDEN, VP_VOCAB = 24, 16, 1301
VP_SPLIT = (0, 651, VP_VOCAB)
VP_ALL = {"bias": True, "logits_bias": True, "logit_scale_multiply": 1.5, "logit_scale_divide": 0.8,
          "logit_softcapping": 3.0, "label_smoothing": 0.1, "z_loss": 1e-3}  # fmt: skip
# name -> (problem options, call options, LOGITLESS_CHUNK_MB or None). 0.02 MiB: about 2 rows per chunk.
VP_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], float | None]] = {
    "plain": ({}, {}, None),
    "every-epilogue": (VP_ALL, {}, None),
    "every-epilogue-many-chunks": (VP_ALL, {}, 0.02),
    "sum": (VP_ALL, {"reduction": "sum"}, 0.02),
    "num-items": ({"logit_softcapping": 2.0}, {"num_items_in_batch": 37}, 0.02),
    "ignored-chunks": ({"ignore_first": 12}, {}, 0.02),
    "all-ignored": ({"ignore_first": VP_ROWS}, {}, 0.02),
    "shifted-batch": ({"batch": True}, {"shift": True}, 0.02),
    "bf16": ({**VP_ALL, "dtype": torch.bfloat16}, {}, 0.02),
    # The accelerators' chunking, on CPU: rows sorted scored-first, masked, stopping at the scored count.
    "device-chunks": (VP_ALL, {}, 0.02),
    "device-chunks-ignored": ({**VP_ALL, "ignore_first": 12}, {}, 0.02),
    "device-one-chunk": (VP_ALL, {}, None),
}
VP_DEVICE_CHUNKING = {"device-chunks", "device-chunks-ignored", "device-one-chunk", "triton-device-chunks"}
VP_TRITON_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], float | None]] = {
    "triton-every-epilogue": (VP_ALL, {"impl": "triton"}, None),
    "triton-sum-many-chunks": (VP_ALL, {"impl": "triton", "reduction": "sum"}, 0.02),
    "triton-num-items": ({"logit_softcapping": 2.0}, {"impl": "triton", "num_items_in_batch": 37}, 0.02),
    "triton-bf16": ({**VP_ALL, "dtype": torch.bfloat16}, {"impl": "triton"}, 0.02),
    "triton-device-chunks": ({**VP_ALL, "ignore_first": 12}, {"impl": "triton"}, 0.02),
}  # fmt: skip


def vp_cases(device: str) -> dict[str, tuple[dict[str, Any], dict[str, Any], float | None]]:
    """The cases run on ``device``: the Triton ones on CUDA, and on CPU tensors under Triton's interpreter
    (tests/conftest.py turns it on where there is no GPU)."""
    triton = device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return {**VP_CASES, **(VP_TRITON_CASES if triton else {})}


def vp_problem(spec: dict[str, Any]) -> dict[str, Any]:
    """The whole problem of a case, identical on every rank (and in the test's float64 reference)."""
    g = torch.Generator().manual_seed(7)
    dtype = spec.get("dtype", torch.float32)
    hidden = torch.randn(VP_ROWS, VP_HIDDEN, generator=g).to(dtype)
    weight = (torch.randn(VP_VOCAB, VP_HIDDEN, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, VP_VOCAB, (VP_ROWS,), generator=g)
    labels[1], labels[2], labels[3] = VP_VOCAB - 1, VP_SPLIT[1] - 1, VP_SPLIT[1]  # last column, either side of the cut
    labels[5:7] = -100
    labels[: spec.get("ignore_first", 0)] = -100
    out: dict[str, Any] = {"hidden": hidden, "weight": weight, "labels": labels}
    if spec.get("bias"):
        out["bias"] = torch.randn(VP_VOCAB, generator=g).to(dtype)
    if spec.get("logits_bias"):
        out["logits_bias"] = torch.randn(VP_VOCAB, generator=g)
    if spec.get("batch"):
        out["hidden"], out["labels"] = hidden.reshape(2, VP_ROWS // 2, VP_HIDDEN), labels.reshape(2, VP_ROWS // 2)
    options = ("label_smoothing", "z_loss", "logit_scale_multiply", "logit_scale_divide", "logit_softcapping")
    out.update({k: v for k, v in spec.items() if k in options})
    return out


def run_vocab_parallel_op(rank: int, device: str = "cpu") -> dict[str, Any]:
    """Loss and gradients of every case of ``vp_cases(device)`` on this rank's shard, on ``device`` (results on
    CPU)."""
    from logitless import vocab_parallel
    from logitless.vocab_parallel import vocab_parallel_linear_cross_entropy

    start, stop = VP_SPLIT[rank], VP_SPLIT[rank + 1]
    rows: dict[str, Any] = {}
    compact = vocab_parallel._compact
    for name, (spec, call, chunk_mb) in vp_cases(device).items():
        vocab_parallel._compact = (lambda device: False) if name in VP_DEVICE_CHUNKING else compact
        if chunk_mb is None:
            os.environ.pop("LOGITLESS_CHUNK_MB", None)
        else:
            os.environ["LOGITLESS_CHUNK_MB"] = str(chunk_mb)
        p = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vp_problem(spec).items()}
        hidden = p.pop("hidden").requires_grad_()
        weight = p.pop("weight")[start:stop].clone().requires_grad_()
        bias = p.pop("bias")[start:stop].clone().requires_grad_() if "bias" in p else None
        labels = p.pop("labels")
        loss = vocab_parallel_linear_cross_entropy(
            hidden, weight, labels, vocab_start=start, vocab_size=VP_VOCAB, bias=bias, **{"shift": False, **call}, **p
        )
        loss.backward()
        rows[name] = {"loss": loss.detach().cpu(), "d_hidden": hidden.grad.cpu(), "d_weight": weight.grad.cpu(),
                      "d_bias": None if bias is None else bias.grad.cpu()}  # fmt: skip
    vocab_parallel._compact = compact
    os.environ.pop("LOGITLESS_CHUNK_MB", None)
    return rows


def main() -> None:
    global OUT_DIR
    out_dir, setups = Path(sys.argv[1]), sys.argv[2].split(",")
    OUT_DIR = out_dir
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for setup in setups:
        if setup == "vocab-parallel-op":
            results[setup] = run_vocab_parallel_op(rank)
        elif setup == "vocab-parallel-op-cuda":  # both ranks on one GPU: gloo moves CUDA tensors through the host
            results[setup] = run_vocab_parallel_op(rank, "cuda")
        else:
            results[setup] = run(setup, rank)
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()


def check_vocab_parallel_case(rows: list[dict[str, Any]], case: str, device: str) -> None:
    """Both ranks' results of a ``vp_cases(device)`` case against the float64 reference of the whole head: every
    rank returns the reference's loss (the same bits on both) and the full d_hidden; the shards' d_weight / d_bias,
    put together, are the reference's."""
    from ops_reference import TOLERANCES, assert_close, reference

    spec, call, _ = vp_cases(device)[case]
    p = vp_problem(spec)
    for name in ("hidden", "weight", "bias"):
        if name in p:
            p[name].requires_grad_()
    ref = reference(**{"shift": False, **{k: v for k, v in call.items() if k != "impl"}}, **p)
    tol_loss, tol_grad = TOLERANCES[p["hidden"].dtype]
    assert torch.equal(rows[0]["loss"], rows[1]["loss"])
    for r, row in enumerate(rows):
        assert_close(row["loss"], ref.loss, tol_loss, f"rank {r} loss")
        assert_close(row["d_hidden"], ref.d_hidden, tol_grad, f"rank {r} d_hidden")
    assert_close(torch.cat([row["d_weight"] for row in rows]), ref.d_weight, tol_grad, "d_weight")
    if ref.d_bias is not None:
        assert_close(torch.cat([row["d_bias"] for row in rows]), ref.d_bias, tol_grad, "d_bias")
    if spec.get("ignore_first") == VP_ROWS:
        assert float(rows[0]["loss"]) == 0.0 and not rows[0]["d_hidden"].any()
