"""Tiny random-initialised causal LMs and a deterministic HF ``Trainer`` run, for the end-to-end tests.

Nothing is downloaded: every model is built from a config with a fixed seed, every batch is random token ids.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import Trainer, TrainingArguments

VOCAB = 256
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _configs() -> dict[str, tuple[type, transformers.PretrainedConfig]]:
    # Epilogue constants are far from 1 so that a fused path ignoring them would be caught by the comparison.
    return {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**_COMMON)),
        "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(head_dim=8, **_COMMON)),
        "mistral": (
            transformers.MistralForCausalLM,
            transformers.MistralConfig(head_dim=8, sliding_window=None, **_COMMON),
        ),
        "gemma3": (
            transformers.Gemma3ForCausalLM,
            transformers.Gemma3TextConfig(head_dim=8, final_logit_softcapping=2.0, sliding_window=8, **_COMMON),
        ),
        "cohere": (transformers.CohereForCausalLM, transformers.CohereConfig(logit_scale=3.0, **_COMMON)),
        "granite": (transformers.GraniteForCausalLM, transformers.GraniteConfig(logits_scaling=0.25, **_COMMON)),
        # Named GPT2LMHeadModel, not *ForCausalLM; tied head, Conv1D projections, dropout 0.1 left on.
        "gpt2": (
            transformers.GPT2LMHeadModel,
            transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2),
        ),
    }


MODEL_NAMES = tuple(_configs())


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny matmuls on a shared 2-core machine: intra-op threads only add contention (30x slower runs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build(name: str, seed: int = 0) -> torch.nn.Module:
    cls, config = _configs()[name]
    torch.manual_seed(seed)
    return cls(config).float()


def model_class(name: str) -> type:
    return _configs()[name][0]


def random_examples(n: int, *, seq: int = 16, padded: bool = False, seed: int = 1) -> list[dict[str, list[int]]]:
    """``n`` sequences of random ids; ``padded``: lengths vary in ``[seq // 3, seq]`` (padding added by ``collate``)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(seq // 3, seq + 1, (1,), generator=g)) if padded else seq
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        examples.append({"input_ids": ids})
    return examples


def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad with id 0; labels are -100 on padding so the loss and ``num_items_in_batch`` ignore it."""
    width = max(len(e["input_ids"]) for e in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, example in enumerate(batch):
        ids = torch.tensor(example["input_ids"])
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class RunResult:
    losses: list[float]
    grad_norms: list[float]
    state: dict[str, torch.Tensor]
    model: torch.nn.Module


def train(
    model: torch.nn.Module,
    examples: list[dict[str, list[int]]],
    *,
    steps: int = 10,
    batch_size: int = 4,
    grad_accum: int = 1,
    output_dir: str,
    extra_args: dict[str, Any] | None = None,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] = collate,
) -> RunResult:
    """``steps`` optimizer steps of HF Trainer on CPU; per-step loss and grad norm from ``state.log_history``."""
    assert len(examples) >= steps * batch_size * grad_accum
    args = TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=1e-3,
        seed=1234,
        data_seed=1234,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **(extra_args or {}),
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "grad_norm" in entry]
    assert len(logs) == steps, logs
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return RunResult([e["loss"] for e in logs], [e["grad_norm"] for e in logs], state, trainer.model)


def assert_runs_match(stock: RunResult, fused: RunResult, *, rtol: float = 1e-5, weight_atol: float = 1e-5) -> None:
    for step, (a, b) in enumerate(zip(stock.losses, fused.losses, strict=True)):
        assert math.isfinite(a) and math.isclose(a, b, rel_tol=rtol, abs_tol=0.0), f"step {step}: loss {a} vs {b}"
    for step, (a, b) in enumerate(zip(stock.grad_norms, fused.grad_norms, strict=True)):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7), f"step {step}: grad norm {a} vs {b}"
    assert stock.state.keys() == fused.state.keys()
    for key in stock.state:
        torch.testing.assert_close(fused.state[key], stock.state[key], rtol=1e-4, atol=weight_atol, msg=key)


Step = tuple[Any, dict[str, torch.Tensor]]


def labelled_step(model: torch.nn.Module, batch: dict[str, Any]) -> Step:
    """One forward with labels and its backward: the outputs and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(4)  # the same dropout masks in both runs
    out = model(**batch)
    loss = out.loss if hasattr(out, "loss") else out[0]
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_steps_equal(got: Step, want: Step) -> None:
    """The loss (first in outputs and tuples alike) and every gradient of two ``labelled_step``s."""
    torch.testing.assert_close(got[0][0], want[0][0], rtol=1e-6, atol=0)
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def fused_forward_counter(monkeypatch: Any) -> CallCounter:
    """Count calls of the fused loss as rewritten forwards reach it (``__logitless__.hf_loss``)."""
    from logitless import _runtime

    counter = CallCounter(_runtime.hf_loss)
    monkeypatch.setattr(_runtime, "hf_loss", counter)
    return counter


class CallCounter:
    """Wraps a callable and counts calls: proves the fused path ran (or did not)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)
