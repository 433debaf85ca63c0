"""Per-model exceptions to the generic tiny config, kept short: each entry says why it is needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from logitless._verify.inputs import Feeds


@dataclass(frozen=True)
class Override:
    # Edits the shrunk config dict in place before the config is built.
    config: Callable[[dict[str, Any]], None] | None = None
    # Adds model-specific inputs (images, token types) to the feeds.
    inputs: Callable[[Any, Any, Feeds], None] | None = None
    # Non-empty: do not build; the text is the reason shown in the report.
    skip: str = ""
    # Edits the built config object (for attributes the config class does not declare).
    post: Callable[[Any], None] | None = None


def _text(d: dict[str, Any]) -> dict[str, Any]:
    return d["text_config"] if isinstance(d.get("text_config"), dict) else d


def _set(**values: Any) -> Callable[[dict[str, Any]], None]:
    """Set fields on the text config (or the config itself when it has no text sub-config)."""

    def apply(d: dict[str, Any]) -> None:
        _text(d).update(values)

    return apply


# Qwen4-Exp's default config leaves its sparse-attention indexer unset, and the model cannot be built without it.
_QWEN4_QSA = _set(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                  indexer_compress_ratio=4)


def _pixels_only(model: Any, config: Any, feeds: Feeds) -> None:
    """GIT prepends image patch embeddings itself (no image tokens) and always slices them off the logits."""
    from logitless._verify.inputs import pixels

    feeds.base.update(pixels(model, config, "image"))
    feeds.description = "text + images (prepended patches)"


def _audio_features(model: Any, config: Any, feeds: Feeds) -> None:
    """Speech encoder-decoders take log-mel features (Whisper: a fixed number of frames, twice its source
    positions) or a waveform instead of token ids; the labels are the decoder's, as in speech-recognition
    fine-tuning."""
    import torch

    batch = feeds.base.pop("input_ids").shape[0]
    feeds.base.pop("attention_mask", None)
    gen = torch.Generator().manual_seed(2)
    name = "input_features"
    if hasattr(config, "conv_stride"):  # SpeechT5: the raw waveform, 320 samples a frame
        name, shape = "input_values", (batch, 320 * 16)
    elif hasattr(config, "feature_projection_input_dim"):  # SeamlessM4T: (batch, frames, features)
        shape = (batch, 32, config.feature_projection_input_dim)
    elif hasattr(config, "num_mel_bins"):  # Whisper
        shape = (batch, config.num_mel_bins, 2 * config.max_source_positions)
    else:  # Speech2Text: (batch, frames, features)
        shape = (batch, 16, config.input_feat_per_channel * config.input_channels)
    feeds.base[name] = torch.randn(shape, generator=gen)
    feeds.description = "audio + decoder labels"


_DRAFTER = "draft model: all its layers share the target model's KV cache, so it cannot run alone"

OVERRIDES: dict[str, Override] = {
    # Default layer_types is None, but the model indexes it per layer.
    "Lfm2MoeForCausalLM": Override(config=_set(layer_types=["conv", "full_attention"])),
    # Adapters are chosen per language; without a default the forward refuses to run.
    "XmodForCausalLM": Override(config=_set(default_language="en_XX")),
    # T5's configs leave decoder_start_token_id to the checkpoint; _shift_right needs it to make decoder inputs.
    **{
        name: Override(config=_set(decoder_start_token_id=0))
        for name in ("T5ForConditionalGeneration", "MT5ForConditionalGeneration", "UMT5ForConditionalGeneration",
                     "LongT5ForConditionalGeneration", "SwitchTransformersForConditionalGeneration",
                     "Pop2PianoForConditionalGeneration")
    },
    "Qwen4ExpForCausalLM": Override(config=_QWEN4_QSA),
    "Qwen4ExpForConditionalGeneration": Override(config=_QWEN4_QSA),
    # Zamba2's shared attention block works on [hidden, hidden] concatenated and its mamba head dim is separate.
    "Zamba2ForCausalLM": Override(config=_set(attention_hidden_size=128, mamba_headdim=16, hybrid_layer_ids=[1])),
    # Its default layer pattern leaves sliding layers without a window.
    "Step3p7ForConditionalGeneration": Override(config=_set(sliding_window=8)),
    # Both tiny layers come out dense, and the aux-loss code indexes the (empty) router logits.
    "FlintForCausalLM": Override(config=_set(output_router_logits=False)),
    # DbrxAttentionConfig does not declare the rope_theta the attention layer reads, and its default clip_qkv
    # (None) is passed to torch.clamp unconditionally.
    "DbrxForCausalLM": Override(
        config=lambda d: d["attn_config"].update(clip_qkv=8.0),
        post=lambda config: setattr(config.attn_config, "rope_theta", 10000.0),
    ),
    # Speculative-decoding drafters: every layer reads the target model's KV cache (their configs require it),
    # so neither can be built and run on its own.
    "Gemma4AssistantForCausalLM": Override(skip=_DRAFTER),
    "Gemma4UnifiedAssistantForCausalLM": Override(skip=_DRAFTER),
    "GitForCausalLM": Override(inputs=_pixels_only),
    "WhisperForConditionalGeneration": Override(inputs=_audio_features),
    "Speech2TextForConditionalGeneration": Override(inputs=_audio_features),
    "SeamlessM4TForSpeechToText": Override(inputs=_audio_features),
    "SeamlessM4Tv2ForSpeechToText": Override(inputs=_audio_features),
    # SpecAugment draws its time masks from numpy's global generator: stock would not even match stock.
    "SpeechT5ForSpeechToText": Override(config=_set(mask_time_prob=0.0), inputs=_audio_features),
    # Its LM head asserts a decoder config (the default is an encoder); the axial position embeddings must add
    # up to the shrunk hidden size; local attention keeps LSH's random hashing out, and no dropout because its
    # reversible layers reseed torch's generator from the OS (`torch.seed()`) in training mode.
    "ReformerModelWithLMHead": Override(config=_set(is_decoder=True, axial_pos_embds=False,
                                                    attn_layers=["local", "local"], hidden_dropout_prob=0.0,
                                                    local_attention_probs_dropout_prob=0.0)),
    # The shrunk d_model must still be n_head * d_head.
    "XLNetLMHeadModel": Override(config=lambda d: d.update(d_head=d["d_model"] // d["n_head"])),
    # Its layers split into input / recurrent / output sections that must add up to the layer count.
    "DoryForCausalLM": Override(config=_set(num_hidden_layers=3, n_input_layers=1, n_recurrent_layers=1,
                                            n_output_layers=1, layer_types=None)),
    # transformers 4.x: attention_types must describe exactly num_layers layers.
    "GPTNeoForCausalLM": Override(
        config=_set(attention_types=[[["global", "local"], 1]], attention_layers=["global", "local"])
    ),
    # transformers 4.x: layer_types defaults to None but is indexed per layer.
    "GraniteMoeHybridForCausalLM": Override(config=_set(layer_types=["mamba", "attention"])),
}
