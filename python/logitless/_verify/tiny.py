"""Tiny random configs for any transformers causal LM, built from the config class's own defaults.

The defaults describe a real checkpoint (billions of parameters); every size-like field is shrunk by name, in the
config and recursively in its sub-configs (text, vision, audio, ...). One hidden size, one head count and one head
dim are used everywhere, so the couplings between sub-configs that models assume (vision output = text hidden size,
merger widths, ...) hold without knowing each model. Per-model exceptions live in ``overrides.py``.
"""

from __future__ import annotations

import copy
from typing import Any

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128
EXPERT_INTERMEDIATE = 32
VOCAB = 256
LAYERS = 2
EXPERTS = 4
TOP_K = 2
# Special tokens above the tiny vocab are moved into this range; random input ids are drawn below it.
SPECIAL_BASE = 224

# field name -> value. Applied only when the field exists with an int value (never adds fields).
SIZES: dict[str, int] = {
    **dict.fromkeys(
        ["hidden_size", "d_model", "n_embd", "embed_dim", "n_embed", "model_dim", "text_hidden_size",
         "vision_hidden_size", "out_hidden_size", "projection_dim", "projector_hidden_size", "proj_dim",
         "hidden_size_per_layer_input", "vision_embed_dim", "text_embed_dim", "output_size", "width",
         "mm_hidden_size", "projector_dim", "merger_hidden_size", "llm_hidden_size", "adapter_hidden_size",
         "encoder_hidden_size", "backbone_hidden_size", "out_dim", "vision_output_dim", "text_hidden_dim",
         "output_dim", "embedding_dim", "hidden_size_global"],
        HIDDEN,
    ),
    **dict.fromkeys(
        ["num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
         "decoder_attention_heads", "attention_heads", "num_attention_head", "conf_num_attention_heads",
         "vision_num_heads", "linear_num_key_heads", "linear_num_value_heads"],
        HEADS,
    ),
    **dict.fromkeys(["head_dim", "attention_head_dim", "kv_channels", "v_head_dim", "linear_key_head_dim",
                     "linear_value_head_dim", "qk_head_dim", "global_head_dim", "attention_head_size"], HEAD_DIM),
    **dict.fromkeys(
        ["intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "encoder_ffn_dim", "decoder_ffn_dim",
         "inner_hidden_size", "mlp_dim", "hidden_dim", "dim_feedforward", "intermediate_dim", "d_ff",
         "mlp_hidden_size", "text_intermediate_size", "vision_intermediate_size", "projector_intermediate_size",
         "vision_mlp_hidden_size", "projection_intermediate_size"],
        INTERMEDIATE,
    ),
    **dict.fromkeys(
        ["moe_intermediate_size", "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size",
         "expert_intermediate_size", "moe_ffn_hidden_size", "shared_intermediate_size", "expert_hidden_size",
         "moe_dim", "intermediate_size_mlp", "dense_intermediate_size", "moe_latent_size"],
        EXPERT_INTERMEDIATE,
    ),
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "n_experts",
                     "num_routed_experts", "moe_num_routed_experts"], EXPERTS),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "top_k", "moe_k", "num_experts_per_token",
                     "num_selected_experts", "moe_top_k", "router_topk"], TOP_K),
    **dict.fromkeys(["n_shared_experts", "num_shared_experts", "moe_num_shared_experts"], 1),
    **dict.fromkeys(["n_group", "topk_group", "num_expert_group", "topk_groups"], 1),
    # MLA (DeepSeek-V2/V3 style attention).
    "kv_lora_rank": 16,
    "index_head_dim": HEAD_DIM,
    "index_n_heads": HEADS,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    # State-space / linear-attention blocks: heads * head_dim must equal expand * hidden (= 128).
    **dict.fromkeys(["ssm_state_size", "state_size", "mamba_d_state", "d_state", "linear_state_size"], 16),
    **dict.fromkeys(["mamba_num_heads", "mamba_n_heads", "ssm_num_heads"], 8),
    **dict.fromkeys(["mamba_head_dim", "mamba_d_head", "ssm_head_dim"], 16),
    **dict.fromkeys(["mamba_d_ssm", "d_inner", "ssm_inner_size"], 2 * HIDDEN),
    **dict.fromkeys(["n_groups", "mamba_n_groups", "ssm_n_groups"], 1),
    **dict.fromkeys(["chunk_size", "mamba_chunk_size"], 8),
    "laurel_rank": 8,
    "encoder_hash_byte_group_vocab": 512,
    # Gemma3 pools the patch grid down to this many image tokens (a square): 2x2 from a 4x4 grid.
    "mm_tokens_per_image": 4,
    "altup_num_inputs": 2,
    "time_step_rank": 8,
    # Vision towers: 32x32 images, 8x8 patches.
    "image_size": 32,
    "patch_size": 8,
    "depth": LAYERS,
    "vision_layers": LAYERS,
    "num_channels": 3,
}

LAYER_COUNTS = ["num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
                "num_decoder_layers", "num_encoder_layers", "text_num_hidden_layers", "vision_num_hidden_layers",
                "conf_num_hidden_layers", "num_text_layers"]
VOCABS = ["vocab_size", "text_vocab_size", "vocab_size_per_layer_input", "decoder_vocab_size", "unpadded_vocab_size"]
# Keys that are never shrunk even though they look like sizes.
KEEP = {"max_position_embeddings", "original_max_position_embeddings", "sliding_window", "num_labels"}


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_config_dict(value: Any) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _layer_selection(d: dict[str, Any], old_layers: int) -> list[int]:
    """Indices of the original layers to keep: one of each distinct layer type, at least ``LAYERS``."""
    types = d.get("layer_types")
    if isinstance(types, list) and len(types) == old_layers and old_layers > 0:
        first: dict[str, int] = {}
        for i, t in enumerate(types):
            first.setdefault(str(t), i)
        keep = sorted(first.values())
        # Prefer keeping layer 0 and a later one so dense-then-sparse (first_k_dense) patterns both appear.
        extra = [i for i in range(old_layers) if i not in keep]
        while len(keep) < LAYERS and extra:
            keep.append(extra.pop())
        return sorted(keep)
    return list(range(min(LAYERS, old_layers)))


def shrink_dict(d: dict[str, Any]) -> dict[str, Any]:
    """Return a shrunk copy of a config's ``to_dict()``; sub-config dicts are shrunk recursively."""
    original = d
    d = copy.deepcopy(d)
    for key, value in list(d.items()):
        if _is_config_dict(value):
            d[key] = shrink_dict(value)
        elif isinstance(value, list) and value and all(_is_config_dict(v) for v in value):
            d[key] = [shrink_dict(v) for v in value]
    _shrink_sizes(d, original)
    _shrink_layers(d)
    _fill_unset(d, original)
    _shrink_rope(d)
    _training_knobs(d)
    return d


def _shrink_sizes(d: dict[str, Any], original: dict[str, Any]) -> None:
    for key, value in list(d.items()):
        if key in KEEP or not _is_size(value):
            continue
        if key in SIZES:
            new = SIZES[key]
            # Never raise a head or top-k count above its default (multi-query stays multi-query).
            d[key] = min(new, value) if key.endswith("heads") or key == "num_experts_per_tok" else new
        elif key in VOCABS:
            d[key] = VOCAB
    heads_before = next(
        (original[k] for k in ("num_attention_heads", "n_head", "num_heads") if _is_size(original.get(k))), 0
    )
    for key in ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv",
                "num_key_value_groups", "kv_heads", "text_num_key_value_heads"):
        if _is_size(d.get(key)):
            # Multi-query stays multi-query, multi-head stays multi-head, grouped stays grouped.
            d[key] = 1 if d[key] == 1 else HEADS if d[key] == heads_before else KV_HEADS
    if _is_size(d.get("expand")):
        # State-space blocks: heads * head_dim must equal expand * hidden.
        for heads_key, dim_key in (("num_heads", "head_dim"), ("mamba_num_heads", "mamba_head_dim"),
                                   ("mamba_n_heads", "mamba_d_head")):
            if _is_size(d.get(heads_key)) and _is_size(d.get(dim_key)):
                d[heads_key] = d["expand"] * HIDDEN // d[dim_key]


def _shrink_layers(d: dict[str, Any]) -> None:
    """Keep a few layers, and cut every per-layer field (lists, patterns, index-keyed dicts) to match."""
    old_layers = next((d[k] for k in LAYER_COUNTS if _is_size(d.get(k))), 0)
    if not old_layers:
        return
    keep = _layer_selection(d, old_layers)
    new_layers = len(keep)
    for key, value in list(d.items()):
        if key in LAYER_COUNTS and _is_size(value):
            d[key] = new_layers
        elif isinstance(value, list) and len(value) == old_layers and old_layers > 1:
            d[key] = [value[i] for i in keep]
        elif isinstance(value, str) and len(value) == old_layers and old_layers > 1 and key.endswith("pattern"):
            d[key] = "".join(value[i] for i in keep)
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            # Per-layer overrides keyed by layer index: renumbered, and their own sizes shrunk alike.
            d[key] = {type(k)(keep.index(int(k))): v for k, v in value.items() if int(k) in keep}
            for entry in d[key].values():
                if isinstance(entry, dict):
                    _shrink_sizes(entry, copy.deepcopy(entry))
        elif _is_size(value) and value == old_layers and "layer" in key and key not in KEEP:
            # e.g. max_window_layers == num_layers, meaning "all layers".
            d[key] = new_layers
    for key in ("first_k_dense_replace", "first_dense_layers", "num_dense_layers", "moe_layer_start_index"):
        if _is_size(d.get(key)) and d[key] >= new_layers:
            # Keep one dense layer and one sparse one.
            d[key] = 1


def _fill_unset(d: dict[str, Any], original: dict[str, Any]) -> None:
    """Sizes that default configs leave unset (every real checkpoint sets them) and couplings between fields."""
    for key, value in (("head_dim", HEAD_DIM), ("num_key_value_heads", KV_HEADS), ("num_experts_per_tok", TOP_K),
                       ("n_routed_experts", EXPERTS), ("moe_intermediate_size", EXPERT_INTERMEDIATE),
                       ("n_shared_experts", 1)):
        if key in d and d[key] is None and (key != "head_dim" or "num_attention_heads" in d):
            d[key] = value
    rope_dim = original.get("qk_rope_head_dim")
    if _is_size(d.get("head_dim")) and _is_size(rope_dim) and original.get("head_dim") == rope_dim:
        # MLA configs that derive head_dim (the rotary width) from qk_rope_head_dim.
        d["head_dim"] = d["qk_rope_head_dim"]
    if isinstance(d.get("image_grid_pinpoints"), list):
        # LLaVA-NeXT tiles images on these resolutions; one tile of the tiny image size.
        d["image_grid_pinpoints"] = [[SIZES["image_size"], SIZES["image_size"]]]
    if isinstance(d.get("depths"), list) and all(_is_size(v) for v in d["depths"]):
        d["depths"] = [1] * len(d["depths"])
    types = d.get("layer_types")
    if "sliding_window" in d and d["sliding_window"] is None and isinstance(types, list) and any(
        "sliding" in str(t) for t in types
    ):
        d["sliding_window"] = 8
    for key in ("rotary_dim", "rotary_emb_base_dim"):
        if _is_size(d.get(key)):
            d[key] = HEAD_DIM // 2
    if _is_size(d.get("num_kv_shared_layers")):
        # Gemma3n-style KV sharing across the last layers needs more layers than the tiny model keeps.
        d["num_kv_shared_layers"] = 0
    if d.get("use_mamba_kernels") is True:
        # The fused mamba kernels are CUDA-only; the reference torch path is what runs on CPU.
        d["use_mamba_kernels"] = False


def _training_knobs(d: dict[str, Any]) -> None:
    for key in ("hidden_dropout", "attention_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "activation_dropout", "classifier_dropout",
                "ffn_dropout", "residual_dropout", "embedding_dropout", "projector_dropout", "mlp_dropout"):
        if isinstance(d.get(key), float):
            d[key] = 0.0
    # Epilogue constants (1.2 of the spec) set to values that change the logits, so that a wrong or dropped
    # epilogue in a rewrite shows up in the loss: a default of 1.0 (Granite) would make the check vacuous.
    for key, value in (("logits_scaling", 2.5), ("final_logit_softcapping", 5.0), ("lm_head_multiplier", 0.5),
                       ("logit_scale", 0.25), ("output_logits_scaling", 2.5), ("logit_softcapping", 5.0)):
        if isinstance(d.get(key), (int, float)) and not isinstance(d.get(key), bool):
            d[key] = value
    if "unpadded_vocab_size" in d and _is_size(d.get("vocab_size")):
        # A padded vocabulary the forward cuts back (Inkling): cut for real, so a dropped cut shows in the loss.
        d["unpadded_vocab_size"] = d["vocab_size"] - 5
    if "output_router_logits" in d:
        # Exercise the aux-loss branch next to the loss call: a rewrite must keep it exactly.
        d["output_router_logits"] = True


def _shrink_rope(d: dict[str, Any]) -> None:
    if d.get("rope_parameters") == {} and "vocab_size" in d:
        # An empty default (real checkpoints set it): per layer type where the model keys it so.
        default = {"rope_type": "default", "rope_theta": 10000.0}
        types = d.get("layer_types")
        d["rope_parameters"] = {t: dict(default) for t in set(types)} if isinstance(types, list) else default
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        if not isinstance(rope, dict):
            continue
        targets = [rope] + [v for v in rope.values() if isinstance(v, dict)]
        # MLA attention rotates only its qk_rope_head_dim part of each head.
        rotary = d["qk_rope_head_dim"] if _is_size(d.get("qk_rope_head_dim")) else HEAD_DIM
        for r in targets:
            section = r.get("mrope_section")
            if isinstance(section, list) and section:
                r["mrope_section"] = _split(rotary // 2, len(section))


def _split(total: int, parts: int) -> list[int]:
    base = [total // parts] * parts
    for i in range(total - sum(base)):
        base[-1 - i] += 1
    return base


def remap_special_tokens(d: dict[str, Any], vocab: int = VOCAB) -> dict[str, Any]:
    """Move every ``*_token_id``/``*_token_index`` outside the tiny vocab to a distinct id in [SPECIAL_BASE, vocab)."""
    mapping: dict[int, int] = {}

    def new_id(old: int) -> int:
        if old not in mapping:
            mapping[old] = SPECIAL_BASE + len(mapping) % (vocab - SPECIAL_BASE)
        return mapping[old]

    def walk(node: dict[str, Any]) -> None:
        for key, value in node.items():
            if _is_config_dict(value):
                walk(value)
            elif ("token_id" in key or "token_index" in key or key.endswith("_id") and "token" in key):
                if _is_size(value) and value >= SPECIAL_BASE:
                    node[key] = new_id(value)
                elif isinstance(value, list) and all(_is_size(v) for v in value):
                    node[key] = [new_id(v) if v >= SPECIAL_BASE else v for v in value]

    walk(d)
    return d


def special_ids(d: dict[str, Any]) -> set[int]:
    """Every token id named in the config tree (kept out of the random input ids)."""
    out: set[int] = set()
    for key, value in d.items():
        if _is_config_dict(value):
            out |= special_ids(value)
        elif "token" in key and ("_id" in key or "index" in key):
            if _is_size(value) or value == 0:
                out.add(int(value))
            elif isinstance(value, list):
                out |= {int(v) for v in value if isinstance(v, int)}
    return out


def sub_configs(config: Any) -> list[Any]:
    """The config and all its sub-configs, depth first."""
    out = [config]
    for key in getattr(type(config), "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            out += sub_configs(sub)
    return out


def fix_mrope(config: Any, force: bool = False) -> None:
    """Size ``mrope_section`` for the tiny rotary width.

    Multimodal-rope models split the rotary dims by ``mrope_section`` and fall back to a default sized for the real
    head dim when the config has none; most of those config classes say so by ignoring the key at rope validation,
    ``force`` (the modeling source reads ``mrope_section``) covers the rest.
    """
    for cfg in sub_configs(config):
        declared = "mrope_section" in (getattr(type(cfg), "ignore_keys_at_rope_validation", None) or ())
        if not declared and not (force and hasattr(cfg, "vocab_size")):
            continue
        # transformers 5.x: rope_parameters; 4.x: rope_scaling, None when the model falls back to its default.
        attr = "rope_parameters" if hasattr(cfg, "rope_parameters") else "rope_scaling"
        rope = getattr(cfg, attr, None)
        if rope is None and attr == "rope_scaling" and hasattr(cfg, "vocab_size"):
            rope = {"rope_type": "default", "type": "mrope"}
            setattr(cfg, attr, rope)
        if not isinstance(rope, dict):
            continue
        heads = getattr(cfg, "num_attention_heads", None) or HEADS
        head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", HIDDEN) // heads
        # MLA attention rotates only its qk_rope_head_dim part of each head.
        head_dim = getattr(cfg, "qk_rope_head_dim", None) or head_dim
        factor = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None)) or 1.0
        parts = len(rope.get("mrope_section") or [0, 0, 0])
        rope["mrope_section"] = _split(int(head_dim * factor) // 2, parts)
