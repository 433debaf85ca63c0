"""What the whole-step benchmarks (hf_trainer.py, encoder_decoder.py, trl_sft.py, trl_dpo.py) build and measure in
each child process."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any


def llama_shaped(vocab: int, width: int) -> Any:
    """The benchmarks' model config: Llama's layout (two layers, grouped-query attention) at a small width, so the
    head and its logits are most of the step."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip


def word_tokenizer() -> Any:
    """A tokenizer with the pad and eos tokens TRL's trainers ask for; the steps are handed token ids, not text."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(8)}, unk_token="t1")),
        pad_token="t0", eos_token="t2",
    )  # fmt: skip


def timed_steps(step: Callable[[], float]) -> dict[str, float]:
    """A warm-up ``step()``, then two timed ones: the last loss, seconds per step (their mean) and what the three
    added to the process's peak RSS, in MiB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    start = time.perf_counter()
    loss = [step() for _ in range(2)][-1]
    seconds = (time.perf_counter() - start) / 2
    added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"loss": loss, "seconds": seconds, "added_mib": added}
