"""Small random-init causal LMs of three families, all with the same tiny shape and a large vocabulary."""

from __future__ import annotations

from typing import Any

FAMILIES = ("llama", "gemma3", "qwen3")


def build_model(family: str, vocab: int, seq_len: int, seed: int) -> Any:
    """A 2-layer, 256-wide model whose cost is dominated by the vocab-sized head, as in small real LMs."""
    import torch
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(seq_len, 128),
        # Llama 3.2 1B/3B, Gemma 3 and small Qwen3s all tie the head to the embedding.
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    if family == "llama":
        config = transformers.LlamaConfig(**common, rope_theta=500000.0)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=64)
        cls = transformers.Qwen3ForCausalLM
    elif family == "gemma3":
        # Gemma 2's final-logit softcap switched on so the fused op's epilogue is exercised.
        config = transformers.Gemma3TextConfig(
            **common, head_dim=64, query_pre_attn_scalar=64, sliding_window=512, final_logit_softcapping=30.0
        )
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    transformers.set_seed(seed)
    model = cls(config)
    return model.to(torch.float32)
