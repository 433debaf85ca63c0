"""Per-model exceptions to the generic tiny config, kept short: each entry says why it is needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from logitless._verify.inputs import Feeds, pixels


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
    # The default config as a dict, for config classes that cannot be built without arguments.
    base: Callable[[], dict[str, Any]] | None = None


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
    feeds.base.update(pixels(model, config, "image"))
    feeds.description = "text + images (prepended patches)"


def _audio_features(model: Any, config: Any, feeds: Feeds) -> None:
    """Speech encoder-decoders take log-mel features (Whisper: a fixed number of frames, twice its source
    positions) or a waveform instead of token ids; the labels are the decoder's, as in speech-recognition
    fine-tuning. Voxtral realtime is a decoder that adds audio frames, aligned with the tokens, to its text."""
    import torch

    ids = feeds.base.pop("input_ids")
    batch = ids.shape[0]
    feeds.base.pop("attention_mask", None)
    gen = torch.Generator().manual_seed(2)
    name, description = "input_features", "audio + decoder labels"
    if hasattr(config, "audio_length_per_tok"):  # Voxtral realtime: (batch, mels, frames per token x tokens)
        shape = (batch, config.audio_config.num_mel_bins, ids.shape[1] * config.audio_length_per_tok)
        feeds.base["input_ids"] = ids
        description = "text + aligned audio"
    elif hasattr(config, "conv_stride"):  # SpeechT5: the raw waveform, 320 samples a frame
        name, shape = "input_values", (batch, 320 * 16)
    elif hasattr(config, "feature_projection_input_dim"):  # SeamlessM4T: (batch, frames, features)
        shape = (batch, 32, config.feature_projection_input_dim)
    elif hasattr(config, "num_mel_bins"):  # Whisper
        shape = (batch, config.num_mel_bins, 2 * config.max_source_positions)
    else:  # Speech2Text: (batch, frames, features)
        shape = (batch, 16, config.input_feat_per_channel * config.input_channels)
    feeds.base[name] = torch.randn(shape, generator=gen)
    feeds.description = description


def _layout_boxes(model: Any, config: Any, feeds: Feeds) -> None:
    """UDOP's relative position bias reads a box per token (x0, y0, x1, y1 in [0, 1]); text only, no page image."""
    import torch

    ids = feeds.base["input_ids"]
    gen = torch.Generator().manual_seed(2)
    corners = torch.rand(*ids.shape, 2, 2, generator=gen).sort(dim=-2).values  # [(x0, y0), (x1, y1)], x0 <= x1
    feeds.base["bbox"] = corners.reshape(*ids.shape, 4)
    feeds.description = "text + layout boxes"


def _hidden_states_in(model: Any, config: Any, feeds: Feeds) -> None:
    """SeamlessM4T's text-to-unit models read the text decoder's hidden states (``inputs_embeds``), not token ids;
    the labels are unit ids."""
    import torch

    ids = feeds.base.pop("input_ids")
    gen = torch.Generator().manual_seed(2)
    feeds.base["inputs_embeds"] = torch.randn(*ids.shape, config.hidden_size, generator=gen)
    feeds.description = "hidden states + unit labels"


def _encoder_decoder(wrapper: str, encoder: str, decoder: str) -> Callable[[], dict[str, Any]]:
    """An encoder-decoder wrapper's default config: two default configs put together as
    ``from_encoder_decoder_configs`` does, with the decoder's start and pad ids, which ``shift_tokens_right`` reads
    off the wrapper's config."""

    def base() -> dict[str, Any]:
        import transformers

        dec = getattr(transformers, decoder)()
        config = getattr(transformers, wrapper).from_encoder_decoder_configs(getattr(transformers, encoder)(), dec)
        config.decoder_start_token_id = dec.decoder_start_token_id or dec.bos_token_id
        config.pad_token_id = dec.pad_token_id
        return config.to_dict()

    return base


def _decoder_labels_only(model: Any, config: Any, feeds: Feeds) -> None:
    """A wrapper's encoder input in place of the token ids (pixels, or a waveform of 16 frames of 320 samples); the
    labels are the decoder's."""
    import torch

    batch = feeds.base.pop("input_ids").shape[0]
    feeds.base.pop("attention_mask", None)
    if hasattr(config.encoder, "conv_stride"):
        gen = torch.Generator().manual_seed(2)
        feeds.base["input_values"] = torch.randn(batch, 320 * 16, generator=gen)
        feeds.description = "audio + decoder labels"
    else:
        size = config.encoder.image_size
        feeds.base["pixel_values"] = torch.randn(batch, config.encoder.num_channels, size, size,
                                                 generator=torch.Generator().manual_seed(2))
        feeds.description = "image + decoder labels"


def _llama4_vision(d: dict[str, Any]) -> None:
    """Llama 4's vision adapter: the pixel shuffle (ratio 0.5) turns ``hidden_size`` features into four times as
    many, which its MLP takes as ``intermediate_size``, and it projects to ``projector_output_dim``, which the
    multimodal projector reads as ``vision_output_dim``; the shrunk sizes keep these relations."""
    vision = d["vision_config"]
    vision["intermediate_size"] = 4 * vision["hidden_size"]
    vision["projector_input_dim"] = vision["projector_output_dim"] = vision["vision_output_dim"]


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
    "UdopForConditionalGeneration": Override(config=_set(decoder_start_token_id=0), inputs=_layout_boxes),
    # The image tokenizer's vocabulary map comes with a checkpoint; text only needs its two special entries.
    "Emu3ForConditionalGeneration": Override(config=lambda d: d.update(vocabulary_map={
        "<|extra_200|>": 250, "<image>": 251, "<|visual token000000|>": 252, "<|visual token000001|>": 253})),
    # Per-layer dense / sparse MLP choice left unset by default (a checkpoint sets it).
    "DeepseekOcr2ForConditionalGeneration": Override(config=_set(mlp_layer_types=["dense", "sparse"])),
    # Which vision layers feed which language layers is a checkpoint's choice; one of each within the tiny depths.
    "Granite4VisionForConditionalGeneration": Override(
        config=lambda d: d.update(deepstack_layer_map=[[-2, 0]], spatial_target_layers=[1], downsample_rate="2/4")
    ),
    # The omni thinkers read the vision-start token from their own config, where only the full omni config
    # declares it; any id outside the text the inputs draw from.
    **{
        name: Override(post=lambda c: setattr(c, "vision_start_token_id", 250))
        for name in ("Qwen2_5OmniThinkerForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration")
    },
    # Its rotary sections (default in code: [22, 22, 20]) must split the tiny head's 8 rotary pairs with height
    # and width equal, which the generic three-way split ([2, 3, 3]) does not.
    "Ernie4_5_VLMoeForConditionalGeneration": Override(
        post=lambda c: c.text_config.rope_parameters.update(mrope_section=[3, 3, 2])
    ),
    # Which layer's KV cache each layer reads, by layer index (by default its own): the per-layer cut keeps the
    # original indices [0, 71].
    "MistralLarge4ForConditionalGeneration": Override(config=_set(kv_source_layers=[0, 1])),
    # The adapter reads two vision layers, by original index: the tiny tower's last two.
    "Molmo2ForConditionalGeneration": Override(
        config=lambda d: d["adapter_config"].update(vision_feature_layer=[-1, -2])
    ),
    # A coupling between sub-configs that the generic shrink does not know of, checked by the config class.
    "FunAsrNanoForConditionalGeneration": Override(
        config=lambda d: d["adaptor_config"].update(intermediate_size=d["text_config"]["hidden_size"] // 4)
    ),
    "SeamlessM4TTextToUnitForConditionalGeneration": Override(inputs=_hidden_states_in),
    # The wrappers hold any encoder and decoder; built as TrOCR (ViT + TrOCR decoder), bert2bart and wav2vec2-BART
    # are: decoders whose own loss is the wrapper's, so the fused path hands it over.
    "VisionEncoderDecoderModel": Override(
        base=_encoder_decoder("VisionEncoderDecoderConfig", "ViTConfig", "TrOCRConfig"), inputs=_decoder_labels_only
    ),
    "EncoderDecoderModel": Override(base=_encoder_decoder("EncoderDecoderConfig", "BertConfig", "BartConfig")),
    # wav2vec2's SpecAugment draws its masks from numpy's global generator: off, or stock would not match stock.
    "SpeechEncoderDecoderModel": Override(
        base=_encoder_decoder("SpeechEncoderDecoderConfig", "Wav2Vec2Config", "BartConfig"),
        config=lambda d: d["encoder"].update(mask_time_prob=0.0),
        inputs=_decoder_labels_only,
    ),
    "Qwen4ExpForCausalLM": Override(config=_QWEN4_QSA),
    "Qwen4ExpForConditionalGeneration": Override(config=_QWEN4_QSA),
    # Zamba2's shared attention block works on [hidden, hidden] concatenated and its mamba head dim is separate.
    "Llama4ForConditionalGeneration": Override(config=_llama4_vision),
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
    "VoxtralRealtimeForConditionalGeneration": Override(inputs=_audio_features),
    "SpeechT5ForSpeechToText": Override(config=_set(mask_time_prob=0.0), inputs=_audio_features),
    # One sparse layer in four by default: the two tiny layers would have none, and its router loss needs one.
    "NllbMoeForConditionalGeneration": Override(config=_set(encoder_sparse_step=2, decoder_sparse_step=2)),
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
