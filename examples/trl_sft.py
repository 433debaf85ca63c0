"""TRL's SFTTrainer through logitless, offline: a tiny random Llama, a word-level tokenizer, random token ids.

    python examples/trl_sft.py

With `logitless.install()` (or LOGITLESS=1), TRL's fused LM head is logitless's: the per-token log-probs, entropy
and top-1 that SFTTrainer logs come from the fused op, with the model class's own logit epilogue. The script
prints the trainer's logs and what logitless.audit() counted.
"""

from __future__ import annotations

import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import logitless

VOCAB = 512


def main() -> None:
    logitless.install()  # before the trainer is built: it calls add_fused_lm_head in __init__
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(config)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1")),
                                        pad_token="t0", eos_token="t2", bos_token="t1", unk_token="t1")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, VOCAB, (32,), generator=g).tolist()} for _ in range(32)]
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=8, logging_steps=1,
                     report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                     dataset_kwargs={"skip_prepare_dataset": True})  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print({k: round(entry[k], 4) for k in ("loss", "grad_norm", "entropy", "mean_token_accuracy")})
    print("logitless:", logitless.audit()["integrations"]["trl"])


if __name__ == "__main__":
    main()
