"""The Qwen3-ASR audio tower: a Whisper-style encoder behind a conv stem, with a projector head.

One set of weights, two ways to run it:

* **Offline** (`AudioTower.forward_offline`), the published tower: mel is cut into 1 s chunks of 100
  frames, each chunk is convolved on its own into 13 steps whose positions restart at 0, and the
  steps attend bidirectionally inside 104-step (8 s) windows aligned to the clip start.
* **Block-causal** (`AudioTower.forward_block_causal`), the streaming tower: every 8-frame piece is
  convolved on its own into one step, positions count up from the segment start, and a step attends
  to every step of its own block and of earlier blocks, within a left window of 195 steps. This is
  the training forward; `pipeline.causal_encoder` runs the same computation block by block.

Both end in `ln_post -> proj1 -> GELU -> proj2`, one embedding per `<|audio_pad|>` position.
Parameter names equal the official checkpoint keys minus `thinker.audio_tower.`; the sinusoidal
position table is not a parameter (it is computed analytically, in fp32, for any position).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import AudioEncoderConfig
from pipeline.row_chunks import in_row_chunks, rows_per_chunk

#: Mel frames per causal step: three stride-2 convs turn 8 frames into one step (8 -> 4 -> 2 -> 1).
STEP_FRAMES = 8
#: The offline tower convolves 1 s chunks of mel (13 steps each).
OFFLINE_CHUNK_FRAMES = 100

#: Left attention window of the causal tower, in steps. The tower was trained with 15 s of left
#: context counted in offline-tower steps: 1500 frames -> 15 chunks x 13 steps = 195.
CAUSAL_LEFT_CONTEXT_STEPS = 195

#: Given one layer's keys and values of the new steps [B, heads, S, head_dim], store them where the caller keeps
#: them and return every key and value the S queries attend over [B, heads, T, head_dim] (the mask says which).
AudioKVAccess = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: The same with the layer index first: how a whole forward reaches its K/V storage.
AudioKVStore = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def conv_output_length(frames: int) -> int:
    """Time steps left after the three (kernel 3, stride 2, padding 1) convs; zero stays zero."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1 if frames > 0 else 0
    return frames


def offline_output_steps(frames: int, chunk_frames: int = OFFLINE_CHUNK_FRAMES) -> int:
    """Embeddings the offline tower makes from `frames` mel frames: 13 per whole 1 s chunk + the rest.

    Equals transformers' `_get_feat_extract_output_lengths`, i.e. 13·(T//100) + ceil((T%100)/8).
    """
    whole, rest = divmod(frames, chunk_frames)
    return whole * conv_output_length(chunk_frames) + conv_output_length(rest)


def stem_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a (kernel 3, stride 2, padding 1) stem conv, x [N, C, freq, time].

    oneDNN's bf16 convolution on CPU (brg_conv_fwd with AMX / AVX512-BF16, oneDNN 3.x as shipped with torch 2.x)
    computes an output time width of 1, i.e. an input of at most 2 time columns, with garbage where the left
    zero padding should be: it reads uninitialised scratch memory, so the result is wrong, varies from call to call
    and can be inf/NaN. Every causal step hits it (its 8-frame piece reaches the third conv 2 columns wide). That
    single output column is exactly a 1-D conv over frequency: the left padding column contributes nothing, and the
    input columns 0..width-1 meet kernel columns 1..width, so they are folded into channels (index c * width + w)
    and the kernel likewise. Only bf16 on CPU takes this route; everything else runs the conv as it is.
    """
    width = x.shape[-1]
    if width > 2 or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return conv(x)
    batch, channels, freq, _ = x.shape
    folded = x.transpose(2, 3).reshape(batch, channels * width, freq)
    weight = conv.weight[..., 1 : 1 + width].transpose(2, 3).reshape(conv.out_channels, channels * width, 3)
    return F.conv1d(folded, weight, conv.bias, stride=conv.stride[0], padding=conv.padding[0])[..., None]


def sinusoidal_positions(positions: torch.Tensor, channels: int) -> torch.Tensor:
    """Whisper sinusoids `[sin(p·inv), cos(p·inv)]` for any absolute positions, in fp32.

    The same formula as the 1500-row table of the checkpoint, so rows below 1500 match it and rows
    past it continue it.
    """
    half = channels // 2
    inv_timescales = torch.exp(
        -(math.log(10000.0) / (half - 1)) * torch.arange(half, device=positions.device, dtype=torch.float32)
    )
    scaled = positions.to(torch.float32)[..., None] * inv_timescales
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1)


class AudioSelfAttention(nn.Module):
    """Multi-head attention without rotary positions (so cached keys and values never move)."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        if config.d_model % config.encoder_attention_heads:
            raise ValueError(
                f"d_model={config.d_model} is not divisible by encoder_attention_heads="
                f"{config.encoder_attention_heads}"
            )
        self.num_heads = config.encoder_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, H, S, head_dim]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        allowed: torch.Tensor,
        kv: AudioKVAccess | None = None,
        kv_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend queries `x` [B, S, D] -> [B, S, D] to the keys where `allowed` [B, S, T] is true.

        Without `kv` the keys are x's own (T = S); with it, `kv(key, value)` stores x's keys and values where the
        caller keeps them and returns the T keys and values to attend over (e.g. a stream's cache and x's), row
        kv_rows[b] of them for batch row b if given (see `audio_attention`).
        """
        query = self.split_heads(self.q_proj(x))
        key = self.split_heads(self.k_proj(x))
        value = self.split_heads(self.v_proj(x))
        if kv is not None:
            key, value = kv(key, value)
        out = audio_attention(query, key, value, allowed, fused=query.is_cuda, kv_rows=kv_rows)
        return self.out_proj(out.transpose(1, 2).flatten(-2))


def audio_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    fused: bool,
    kv_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the `allowed` [B, S, T] keys, with the softmax in fp32.

    query [B, heads, S, d]; key/value [R, heads, T, d]: R = B, or with `kv_rows` [B] query row b reads K/V row
    kv_rows[b] (e.g. the rows are a pool's slots and the batch's streams sit in scattered ones). The explicit path
    runs in chunks of rows (`pipeline.row_chunks`), and with `kv_rows` each chunk gathers its own rows' K/V: the
    copy is one chunk's, never the batch's. Gathering keeps work proportional to the batch; attending over the
    slot range in place (queries spread to every slot, as the decoder does) would copy nothing but compute every
    idle slot between the batch's, e.g. ten times the work for 100 ready streams of 1000. The fused path has no
    scores to bound and gathers every row's K/V of the layer at once: one layer's windows of the batch, a small
    part of the batch's slots (1 / layers of them). Chunked by the same 4 MiB, a full-size bf16 batch ran ~4 rows
    per chunk, a gather and an SDPA launch each: over a hundred launches per layer at 500 streams.

    `fused` uses PyTorch's SDPA (flash / memory-efficient kernels on CUDA, which accumulate in fp32 even for bf16
    inputs); otherwise the explicit form in fp32, the reference runtime's arithmetic and the tested CPU path.
    """
    attend = partial(_attend, fused=fused)

    def gathered(query: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return attend(query, key.index_select(0, rows), value.index_select(0, rows), allowed)

    if kv_rows is None:
        function, inputs = attend, (query, key, value, allowed)
    else:
        function, inputs = gathered, (query, kv_rows, allowed)
    row_bytes = 0 if fused else _explicit_row_bytes(query, key, gathers=kv_rows is not None)
    return function(*inputs) if row_bytes == 0 else in_row_chunks(function, row_bytes, *inputs)


def _explicit_row_bytes(query: torch.Tensor, key: torch.Tensor, gathers: bool) -> int:
    """Bytes one batch row of the explicit `audio_attention` allocates beyond its output: fp32 scores and their
    softmax (+ fp32 copies of lower-precision keys and values), and the gathered K/V when it gathers."""
    heads, length, head_dim = query.shape[1], query.shape[2], query.shape[3]
    columns = key.shape[2]
    kv_bytes = 2 * heads * columns * head_dim * key.element_size()
    scores = 2 * 4 * heads * length * columns
    upcast = 0 if key.dtype == torch.float32 else 2 * 4 * heads * columns * head_dim
    return scores + upcast + (kv_bytes if gathers else 0)


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, fused: bool
) -> torch.Tensor:
    if fused:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None])
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2))
    # In place: the scores are the attention's largest intermediate.
    scores.mul_(query.shape[-1] ** -0.5).masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    return torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)


class AudioEncoderLayer(nn.Module):
    """Pre-LN Whisper layer: x + attn(LN(x)), then x + fc2(GELU(fc1(LN(x))))."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.self_attn = AudioSelfAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(
        self,
        x: torch.Tensor,
        allowed: torch.Tensor,
        kv: AudioKVAccess | None = None,
        kv_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The new hidden states [B, S, D]; `allowed`, `kv` and `kv_rows` as in AudioSelfAttention."""
        attended = self.self_attn(self.self_attn_layer_norm(x), allowed, kv, kv_rows)
        x = x + attended
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:
            # fp16 overflows in late layers of the real tower; the reference clamps the same way.
            limit = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-limit, limit)
        return x


class AudioTower(nn.Module):
    """Conv stem + encoder layers + projector head, keyed like the official `thinker.audio_tower.`."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        if config.activation_function != "gelu":
            raise ValueError(f"activation_function={config.activation_function!r}; expected 'gelu' (exact GELU)")
        if config.d_model % 2:
            raise ValueError(f"d_model={config.d_model} must be even for sinusoidal positions")
        self.config = config
        hidden = config.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, hidden, 3, stride=2, padding=1)
        self.conv2d2 = nn.Conv2d(hidden, hidden, 3, stride=2, padding=1)
        self.conv2d3 = nn.Conv2d(hidden, hidden, 3, stride=2, padding=1)
        self.conv_out = nn.Linear(hidden * config.conv_freq_bins, config.d_model, bias=False)
        self.layers = nn.ModuleList(AudioEncoderLayer(config) for _ in range(config.encoder_layers))
        self.ln_post = nn.LayerNorm(config.d_model)
        self.proj1 = nn.Linear(config.d_model, config.d_model)
        self.proj2 = nn.Linear(config.d_model, config.output_dim)

    # ---- building blocks shared by both paths -------------------------------------------------

    def conv_stem(self, pieces: torch.Tensor) -> torch.Tensor:
        """Convolve each mel piece [N, mel_bins, frames] on its own -> [N, steps, d_model].

        The pieces are the conv batch, so nothing crosses a piece border (zero padding at each edge).
        """
        x = pieces.to(self.conv_out.weight.dtype).unsqueeze(1)
        x = F.gelu(stem_conv(self.conv2d1, x))
        x = F.gelu(stem_conv(self.conv2d2, x))
        x = F.gelu(stem_conv(self.conv2d3, x))
        # [N, C, F, S] -> [N, S, C·F]: channel-major flatten (index c·F + f), as the checkpoint expects.
        return self.conv_out(x.permute(0, 3, 1, 2).flatten(2))

    def conv_steps(self, mel: torch.Tensor) -> torch.Tensor:
        """Causal conv stem: mel [n·8, mel_bins] -> [n, d_model], one step per 8-frame piece, in calls of
        `conv_pieces_per_call` pieces."""
        frames = mel.shape[0]
        if frames % STEP_FRAMES:
            raise ValueError(f"mel has {frames} frames; expected a multiple of {STEP_FRAMES}")
        pieces = mel.reshape(frames // STEP_FRAMES, STEP_FRAMES, mel.shape[1]).transpose(1, 2)
        return in_row_chunks(lambda chunk: self.conv_stem(chunk).squeeze(1), self._conv_piece_bytes(), pieces)

    def conv_pieces_per_call(self) -> int:
        """Pieces per conv-stem call, within `pipeline.row_chunks.CHUNK_BYTES`."""
        return rows_per_chunk(self._conv_piece_bytes())

    def _conv_piece_bytes(self) -> int:
        """The conv stem's largest intermediates per piece: the first conv's feature map and its GELU (480 x 64 x 4
        values per piece at full size)."""
        freq, time = ((size + 1) // 2 for size in (self.config.num_mel_bins, STEP_FRAMES))  # one stride-2 conv
        return 2 * self.conv2d1.out_channels * freq * time * self.conv_out.weight.element_size()

    def block_bytes_per_stream(self, steps: int, keys: int) -> int:
        """What one stream's block of `steps` steps holds at once in the layers and head: the residual stream, its
        norms, projections and attention output (d_model wide), the MLP's two ffn-wide tensors, the head's output,
        and its mask rows over `keys` key columns (bool). Scores are chunked on their own."""
        config = self.config
        per_step = 8 * config.d_model + 2 * config.encoder_ffn_dim + 2 * config.output_dim
        return steps * (per_step * self.conv_out.weight.element_size() + keys)

    def add_positions(self, steps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """steps [..., S, D] + sinusoids of `positions` [..., S], computed in fp32, added in the steps' dtype."""
        return steps + sinusoidal_positions(positions, self.config.d_model).to(steps.dtype)

    def encode(
        self,
        x: torch.Tensor,
        allowed: torch.Tensor,
        kv_store: AudioKVStore | None = None,
        kv_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All layers over x [B, S, D] with one attention mask `allowed` [B or 1, S, T].

        Without `kv_store` each layer attends within x (T = S); with it, layer i reaches its K/V through
        `kv_store(i, key, value)` (see `AudioKVStore`), batch row b attending over row kv_rows[b] of it if given.
        """
        for index, layer in enumerate(self.layers):
            x = layer(x, allowed, None if kv_store is None else partial(kv_store, index), kv_rows)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """ln_post -> proj1 -> GELU -> proj2: encoder states -> decoder-width embeddings."""
        return self.proj2(F.gelu(self.proj1(self.ln_post(x))))

    # ---- offline (published) tower --------------------------------------------------------------

    def forward_offline(self, mel: torch.Tensor) -> torch.Tensor:
        """Offline tower: mel [T, mel_bins] (frame-major) -> [offline_output_steps(T), output_dim]."""
        frames = self._check_mel(mel)
        chunk = 2 * self.config.n_window
        num_chunks = -(-frames // chunk)
        # Zero-pad the last partial chunk to a whole one before the conv, as transformers does: the
        # padding leaks into the valid border steps through the conv receptive field.
        padded = mel.new_zeros(num_chunks * chunk, mel.shape[1])
        padded[:frames] = mel
        steps = self.conv_stem(padded.reshape(num_chunks, chunk, -1).transpose(1, 2))
        steps_per_chunk = steps.shape[1]
        steps = self.add_positions(steps, torch.arange(steps_per_chunk, device=mel.device))
        # Only the last chunk has steps made from padding, at its end: the real steps are a prefix.
        hidden = steps.flatten(0, 1)[: offline_output_steps(frames, chunk)]

        # Bidirectional attention inside fixed windows aligned to the clip start (8 s = 104 steps): the
        # whole windows run as one batch, the partial last one on its own (padding it would cost up to
        # a whole window of wasted rows through every layer).
        window = steps_per_chunk * (self.config.n_window_infer // chunk)
        whole = hidden.shape[0] // window * window
        pieces = []
        if whole:
            full = hidden[:whole].reshape(whole // window, window, -1)
            everything = torch.ones(1, 1, window, dtype=torch.bool, device=mel.device)
            pieces.append(self.encode(full, everything).flatten(0, 1))
        if whole < hidden.shape[0]:
            rest = hidden[whole:][None]
            pieces.append(self.encode(rest, torch.ones(1, 1, rest.shape[1], dtype=torch.bool, device=mel.device))[0])
        encoded = torch.cat(pieces)
        return self.head(encoded)

    # ---- block-causal (streaming) tower, in one pass ------------------------------------------

    def forward_block_causal(
        self,
        mel: torch.Tensor,
        block_frames: int,
        first_position: int = 0,
        left_context_steps: int = CAUSAL_LEFT_CONTEXT_STEPS,
    ) -> torch.Tensor:
        """The causal tower over a whole segment in one pass: the training forward.

        mel [T, mel_bins] -> [T // 8, output_dim]. Frames past the last whole 8-frame step are
        dropped, and the last block may be short, exactly as a stream that ends with a flush.
        `first_position` shifts the absolute positions (the distillation's position augmentation).
        Equals `pipeline.causal_encoder` fed the same mel block by block.
        """
        check_block_frames(block_frames)
        frames = self._check_mel(mel)
        num_steps = frames // STEP_FRAMES
        steps = self.conv_steps(mel[: num_steps * STEP_FRAMES])
        positions = torch.arange(first_position, first_position + num_steps, device=mel.device)
        steps = self.add_positions(steps, positions)
        allowed = block_causal_mask(num_steps, block_frames // STEP_FRAMES, left_context_steps, mel.device)
        return self.head(self.encode(steps[None], allowed[None])[0])

    def _check_mel(self, mel: torch.Tensor) -> int:
        if mel.dim() != 2 or mel.shape[1] != self.config.num_mel_bins or mel.shape[0] == 0:
            raise ValueError(
                f"mel has shape {tuple(mel.shape)}; expected [frames > 0, {self.config.num_mel_bins}] (frame-major)"
            )
        return mel.shape[0]


def check_block_frames(block_frames: int) -> None:
    """Blocks are whole 8-frame steps; the tower was trained on 96- and 192-frame blocks."""
    if block_frames <= 0 or block_frames % STEP_FRAMES:
        raise ValueError(f"block_frames={block_frames}; expected a positive multiple of {STEP_FRAMES} (96 or 192)")


def block_causal_mask(
    num_steps: int, steps_per_block: int, left_context_steps: int, device: torch.device | None = None
) -> torch.Tensor:
    """allowed[q, k]: k is in q's block or an earlier one, and within q's left window.

    Bidirectional inside a block, causal across blocks, and at most `left_context_steps` steps back
    (q itself included): k >= q - left_context_steps + 1.
    """
    step = torch.arange(num_steps, device=device)
    block = step // steps_per_block
    same_or_earlier_block = block[None, :] <= block[:, None]
    in_window = step[None, :] >= step[:, None] - left_context_steps + 1
    return same_or_earlier_block & in_window
