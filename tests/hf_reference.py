"""Build transformers' native Qwen3-ASR / Qwen3 modules with *our* weights: the numerical references.

transformers >= 5.13 ships `Qwen3ASREncoder`, `Qwen3ASRMultiModalProjector` and `Qwen3Model` with a
different key layout than the official checkpoint (DESIGN.md; reference §7). These helpers map an
official-layout tower / decoder state dict onto them so tests compare like with like.
"""

from __future__ import annotations

import torch
from transformers import Qwen3Config
from transformers.models.qwen3_asr.configuration_qwen3_asr import (
    Qwen3ASRConfig as NativeASRConfig,
    Qwen3ASREncoderConfig,
)
from transformers.models.qwen3_asr.modeling_qwen3_asr import Qwen3ASREncoder, Qwen3ASRMultiModalProjector
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

from pipeline.config import AudioEncoderConfig, TextDecoderConfig


def native_encoder_config(audio: AudioEncoderConfig) -> Qwen3ASREncoderConfig:
    return Qwen3ASREncoderConfig(
        num_mel_bins=audio.num_mel_bins,
        encoder_layers=audio.encoder_layers,
        encoder_attention_heads=audio.encoder_attention_heads,
        encoder_ffn_dim=audio.encoder_ffn_dim,
        d_model=audio.d_model,
        n_window=audio.n_window,
        n_window_infer=audio.n_window_infer,
        downsample_hidden_size=audio.downsample_hidden_size,
        output_dim=audio.output_dim,
        max_position_embeddings=13,
        activation_function=audio.activation_function,
        attn_implementation="eager",
    )


def native_text_config(text: TextDecoderConfig) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        rms_norm_eps=text.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": text.rope_theta},
        tie_word_embeddings=True,
        attn_implementation="eager",
        max_position_embeddings=65536,
    )


def native_audio_tower(audio: AudioEncoderConfig, tower_state: dict[str, torch.Tensor]):
    """(encoder, projector) in fp32 loaded from a tower-relative official state dict."""
    encoder = Qwen3ASREncoder(native_encoder_config(audio)).eval()
    projector = Qwen3ASRMultiModalProjector(
        NativeASRConfig(audio_config=native_encoder_config(audio).to_dict())
    ).eval()
    encoder_state = {k: v for k, v in tower_state.items() if not k.startswith(("proj1.", "proj2."))}
    encoder.load_state_dict(encoder_state, strict=True)
    projector.load_state_dict(
        {
            "linear_1.weight": tower_state["proj1.weight"],
            "linear_1.bias": tower_state["proj1.bias"],
            "linear_2.weight": tower_state["proj2.weight"],
            "linear_2.bias": tower_state["proj2.bias"],
        },
        strict=True,
    )
    return encoder, projector


def native_text_model(text: TextDecoderConfig, decoder_state: dict[str, torch.Tensor]) -> Qwen3ForCausalLM:
    """transformers' Qwen3ForCausalLM in fp32 from a `thinker.model.`-relative state dict (tied head)."""
    model = Qwen3ForCausalLM(native_text_config(text)).eval()
    state = {f"model.{k}": v for k, v in decoder_state.items()}
    state["lm_head.weight"] = decoder_state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model
