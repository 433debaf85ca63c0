"""What the TRL trainer runs in the tests share: a word-level tokenizer over the tiny models' vocabulary, short
prompts of its words, and the training arguments. No TRL import, so the test modules of any TRL release use it."""

from __future__ import annotations

import tempfile
from typing import Any

import torch

import _tiny_lm as tiny


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(tiny.VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1")),
                                   pad_token="t0", eos_token="t2", bos_token="t1", unk_token="t1")  # fmt: skip


def _training_args(max_steps: int = 2) -> dict[str, Any]:
    """What every trainer run here shares. float32 (no bf16 autocast) so the reference is exact, and SGD: Adam's
    first steps move every weight by about the learning rate whatever its gradient's size, so a rounding-level
    difference in a near-zero gradient would become a visible one in the next step's loss."""
    return dict(output_dir=tempfile.mkdtemp(), max_steps=max_steps, per_device_train_batch_size=4, logging_steps=1,
                report_to=[], use_cpu=True, seed=1, learning_rate=0.5, optim="sgd", disable_tqdm=True, bf16=False,
                save_strategy="no")  # fmt: skip


def _word_tokenizer() -> Any:
    from tokenizers.pre_tokenizers import Whitespace

    tok = _tokenizer()
    tok.backend_tokenizer.pre_tokenizer = Whitespace()
    return tok


def _words(g: torch.Generator, n: int) -> str:
    return " ".join(f"t{int(x)}" for x in torch.randint(3, tiny.VOCAB, (n,), generator=g))


def hooked_head(model: Any) -> None:
    """A forward hook on the head: the model's forward keeps its stock path at run time (exact values from its
    logits)."""
    model.lm_head.register_forward_hook(lambda module, args, out: out * 1.5)


def trained_logs(trainer: Any, evaluate: bool = False) -> list[dict[str, float]]:
    """``trainer.train()``'s logged steps (those with a gradient norm) and, with ``evaluate``, ``evaluate()``'s
    metrics after them."""
    trainer.train()
    logs = [e for e in trainer.state.log_history if "grad_norm" in e]
    if evaluate:
        logs.append(trainer.evaluate())
    return logs


def assert_logs_equal(ours: list[dict[str, float]], stock: list[dict[str, float]], minimum: int,
                      rel_tol: float = 2e-5, abs_tol: float = 1e-6) -> None:  # fmt: skip
    """Every float stock logged (timings aside) equal to ours to float32 rounding (``rel_tol``, ``abs_tol``), over at
    least two entries and ``minimum`` values."""
    import math

    assert len(ours) == len(stock) >= 2
    compared = 0
    for step, (a, b) in enumerate(zip(ours, stock, strict=True)):
        for key, want in b.items():
            if key.endswith(("runtime", "per_second")) or not isinstance(want, float):
                continue
            assert math.isclose(a[key], want, rel_tol=rel_tol, abs_tol=abs_tol), (step, key, a[key], want)
            compared += 1
    assert compared >= minimum
