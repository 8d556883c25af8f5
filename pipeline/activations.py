"""Activation traffic of a forward: the bytes its intermediate tensors move through device memory (an ESTIMATE).

First-order model of eager PyTorch: every intermediate tensor is written once by the kernel that makes it and read
once by the next; a fused kernel would move less, so the model errs on the slow side. Counted per forward shape
(`ForwardShape`), so the roofline adds it to the weights and K/V a forward reads:

* per position and layer: the residual stream (norm, attention output, sum; norm, MLP output, sum), the attention
  projections (decoder: q and k through projection, RMSNorm and rotary; v; the attended output and its contiguous
  copy), the MLP intermediates (decoder SwiGLU: gate, up, silu, product; encoder: fc1, GELU); the encoder's conv
  stem per step (three stride-2 convs and their GELUs over an 8-frame piece, and the flattened copy);
* per (query, key) pair and layer: the attention scores [rows, heads, new, span] in fp32 where attention is eager
  (written, masked in place, softmaxed, read by the value matmul); where it is fused (SDPA on CUDA) only its
  boolean mask is read, one byte per pair and query group;
* per row of the output matrix: the logits [rows, vocab], written once; per row the decode controls pick from: a
  copy of it, the fp32 scores the filter chain and argmax run on, and the fp32 log-softmax of the pick's
  log-probability.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import AudioEncoderConfig, TextDecoderConfig
from pipeline.encoder import STEP_FRAMES

FP32_BYTES = 4
#: Conv stem: three 3x3 convolutions of stride 2 (each output, then its GELU).
STEM_CONVS = 3
#: fp32 score passes of eager attention: written, masked in place (read + write), softmaxed (read + write), read.
SCORE_PASSES = 6


@dataclass(frozen=True)
class ForwardShape:
    """One batched forward's work, in positions and pairs.

    `positions` run through the linears (rows x padded width); attention runs over `attention_rows` rows (a pool's
    slot range where queries are spread to their slots, so rows with no query still attend), each of `queries`
    query positions over `span` keys; the output matrix makes `logit_rows` rows, of which the decode controls
    read `picked_rows`."""

    positions: int
    attention_rows: int
    queries: int
    span: int
    logit_rows: int = 0
    picked_rows: int = 0

    @property
    def pairs(self) -> int:
        return self.attention_rows * self.queries * self.span


@dataclass(frozen=True)
class ActivationModel:
    """Activation bytes of one model's forwards (all layers), per unit of a `ForwardShape`."""

    per_position: float
    per_pair: float
    per_logit_row: float = 0.0
    per_picked_row: float = 0.0

    def bytes_of(self, shape: ForwardShape) -> float:
        return (
            shape.positions * self.per_position
            + shape.pairs * self.per_pair
            + shape.logit_rows * self.per_logit_row
            + shape.picked_rows * self.per_picked_row
        )


def _written_and_read(values: int, bytes_per_value: int) -> int:
    return 2 * values * bytes_per_value


def _pair_bytes(heads: int, query_groups: int, fused_attention: bool) -> int:
    """Bytes per (query, key) pair in one layer: the mask where attention is fused, fp32 scores where it is eager."""
    return query_groups if fused_attention else SCORE_PASSES * heads * FP32_BYTES


def decoder_activations(text: TextDecoderConfig, bytes_per_value: int, fused_attention: bool) -> ActivationModel:
    q_width, kv_width = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    residual = 6 * text.hidden_size
    attention = 3 * q_width + 3 * kv_width + kv_width + 2 * q_width
    mlp = 4 * text.intermediate_size
    layers = text.num_hidden_layers
    groups = text.num_attention_heads // text.num_key_value_heads
    vocab = text.vocab_size
    return ActivationModel(
        per_position=layers * _written_and_read(residual + attention + mlp, bytes_per_value),
        per_pair=layers * _pair_bytes(text.num_attention_heads, groups, fused_attention),
        per_logit_row=vocab * bytes_per_value,
        # a copy of the picked rows (read + write), read twice more into fp32: the filter chain's scores (write +
        # argmax read) and the raw logits for the log-probability (write, log-softmax's two reductions + write)
        per_picked_row=vocab * (4 * bytes_per_value + 6 * FP32_BYTES),
    )


def _stem_values_per_step(audio: AudioEncoderConfig) -> int:
    """Values the conv stem writes for one encoder step (one 8-frame piece), GELUs and flattened copy included."""
    values, bins, frames = 0, audio.num_mel_bins, STEP_FRAMES
    for _ in range(STEM_CONVS):
        bins, frames = (bins - 1) // 2 + 1, (frames - 1) // 2 + 1
        values += 2 * audio.downsample_hidden_size * bins * frames
    return values + audio.downsample_hidden_size * bins * frames


def encoder_activations(audio: AudioEncoderConfig, bytes_per_value: int, fused_attention: bool) -> ActivationModel:
    width = audio.d_model
    # per layer: the residual stream; q, k, v, the attended output and its copy; fc1 and its GELU
    per_layer = 6 * width + 5 * width + 2 * audio.encoder_ffn_dim
    head = 3 * width + audio.output_dim  # ln_post, proj1, GELU, proj2
    positions = width  # the sinusoids added to the stem's output
    values = audio.encoder_layers * per_layer + positions + head + _stem_values_per_step(audio)
    return ActivationModel(
        per_position=_written_and_read(values, bytes_per_value),
        per_pair=audio.encoder_layers * _pair_bytes(audio.encoder_attention_heads, 1, fused_attention),
    )
