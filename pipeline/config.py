"""Model geometry and special-token ids, read from the official `config.json` of Qwen3-ASR.

The official layout nests everything under `thinker_config`; the dataclasses here hold only what
the runtime needs, frozen, so that every module agrees on one description of the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class AudioEncoderConfig:
    """The audio tower (Whisper-style encoder + conv stem + projector head)."""

    num_mel_bins: int = 128
    d_model: int = 896
    encoder_layers: int = 18
    encoder_attention_heads: int = 14
    encoder_ffn_dim: int = 3584
    downsample_hidden_size: int = 480
    output_dim: int = 1024
    n_window: int = 50  # conv chunk = 2 * n_window mel frames (1 s) in the offline tower
    n_window_infer: int = 800  # offline attention window in mel frames (8 s)
    max_source_positions: int = 1500
    activation_function: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def conv_freq_bins(self) -> int:
        """Mel bins left after three stride-2 convs (128 -> 64 -> 32 -> 16)."""
        bins = self.num_mel_bins
        for _ in range(3):
            bins = (bins - 1) // 2 + 1
        return bins


@dataclass(frozen=True)
class TextDecoderConfig:
    """The Qwen3 text decoder."""

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class Qwen3ASRConfig:
    """Whole-model description: both towers plus the audio placeholder token ids."""

    audio: AudioEncoderConfig
    text: TextDecoderConfig
    audio_token_id: int = 151676
    audio_start_token_id: int = 151669
    audio_end_token_id: int = 151670

    @classmethod
    def from_official_dict(cls, raw: dict[str, Any]) -> "Qwen3ASRConfig":
        """Parse an official `config.json` (`model_type: qwen3_asr`, with `thinker_config`)."""
        if raw.get("model_type") != "qwen3_asr":
            raise ValueError(
                f"config.json has model_type={raw.get('model_type')!r}; expected 'qwen3_asr' "
                "(the official Qwen/Qwen3-ASR-* layout)"
            )
        thinker = raw.get("thinker_config")
        if not isinstance(thinker, dict):
            raise ValueError("config.json has no 'thinker_config' object; expected the official Qwen3-ASR layout")
        audio_raw = thinker.get("audio_config") or {}
        text_raw = dict(thinker.get("text_config") or {})
        # transformers 5 moved rope_theta under rope_parameters; accept both spellings.
        rope = text_raw.get("rope_parameters") or {}
        if "rope_theta" not in text_raw and "rope_theta" in rope:
            text_raw["rope_theta"] = rope["rope_theta"]
        return cls(
            audio=_pick(AudioEncoderConfig, audio_raw),
            text=_pick(TextDecoderConfig, text_raw),
            audio_token_id=int(thinker.get("audio_token_id", cls.audio_token_id)),
            audio_start_token_id=int(thinker.get("audio_start_token_id", cls.audio_start_token_id)),
            audio_end_token_id=int(thinker.get("audio_end_token_id", cls.audio_end_token_id)),
        )

    def to_official_dict(self) -> dict[str, Any]:
        """The inverse of `from_official_dict`: an official-layout `config.json` body."""
        audio = asdict(self.audio) | {
            "model_type": "qwen3_asr_audio_encoder",
            "conv_chunksize": 500,
            "scale_embedding": False,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
        }
        text = asdict(self.text) | {
            "model_type": "qwen3",
            "hidden_act": "silu",
            "attention_bias": False,
            "max_position_embeddings": 65536,
            "rope_scaling": {
                "rope_type": "default",
                "type": "default",
                "mrope_section": [24, 20, 20],
                "interleaved": True,
                "mrope_interleaved": True,
            },
        }
        return {
            "architectures": ["Qwen3ASRForConditionalGeneration"],
            "model_type": "qwen3_asr",
            "thinker_config": {
                "model_type": "qwen3_asr",
                "audio_config": audio,
                "text_config": text,
                "audio_token_id": self.audio_token_id,
                "audio_start_token_id": self.audio_start_token_id,
                "audio_end_token_id": self.audio_end_token_id,
                "dtype": "bfloat16",
            },
        }


def _pick(kind: type, raw: dict[str, Any]):
    """Build dataclass `kind` from the keys of `raw` it knows; defaults fill the rest."""
    names = kind.__dataclass_fields__.keys()
    return kind(**{name: raw[name] for name in names if name in raw})


#: The published Qwen/Qwen3-ASR-0.6B geometry (used by benchmarks with random weights).
QWEN3_ASR_0_6B = Qwen3ASRConfig(audio=AudioEncoderConfig(), text=TextDecoderConfig())


#: Tiny widths and depths with the real mel/conv geometry, for tests and demos (random weights).
TINY_AUDIO = AudioEncoderConfig(
    d_model=64,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=128,
    downsample_hidden_size=16,
    output_dim=64,
)
TINY_TEXT = TextDecoderConfig(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
