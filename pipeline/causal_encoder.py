"""Streaming runtime of the causal audio tower: append-only, each block encoded exactly once.

The causal tower is the offline tower's weights fine-tuned to run in blocks of `block_frames` mel
frames (192 = 1.92 s by default, or 96). Within a segment:

* every 8-frame piece is convolved on its own into one step (no receptive field across pieces), so a
  block's steps depend on that block's mel only;
* steps get absolute sinusoidal positions counting up from the segment start;
* a step attends to all steps of its own block (bidirectional) and to earlier steps through a
  per-layer key/value cache, at most 195 steps back (itself included).

So a stream needs only this `CausalEncoderState` between blocks:

* `keys`, `values`: per layer, the keys and values of the last <= 195 steps. Nothing older can ever be
  attended to again: the earliest query of the next block sits one step after the newest cached
  step and sees back to itself - 194. 195 steps is the 15 s of left context the tower was trained
  with, counted in offline-tower steps (15 chunks x 13 steps). With no rotary positions, cached
  keys never need re-rotating.
* `next_position`: the absolute position of the next step.
* `pending_mel`: frames that do not fill a block yet. Blocks are cut from the concatenated mel, so the
  output does not depend on how the mel arrived (pacing invariance).

At a segment roll `reset()` clears the cache and positions (the tower was trained on short chains and
drifts over hundreds of chained blocks) and keeps the pending frames. At the end of a stream `flush`
encodes the pending frames as one short block, rounded down to whole steps.

`AudioTower.forward_block_causal` computes the same as this runtime in one masked pass.

Batching: `CausalAudioEncoder.encode_blocks` runs one block from each of many streams in one
forward, ragged in cache length and block length. Its core, `causal_block_forward`, does not own the
caches: each layer stores its block's keys and values through a callback that returns what to attend
over, and a `KeyColumns` says where each stream's keys lie along that key axis. The per-state path
concatenates `[cache ; block]`; `pipeline.kv_pool.EncoderKVPool` writes the block straight into
preallocated slots and attends over them where they lie (`kv_rows` says which slot is whose).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.encoder import CAUSAL_LEFT_CONTEXT_STEPS, STEP_FRAMES, AudioKVStore, AudioTower, check_block_frames
from pipeline.row_chunks import consecutive_runs

logger = logging.getLogger(__name__)

#: Block sizes the published causal tower was trained on (a 50/50 mix).
TRAINED_BLOCK_FRAMES = (96, 192)


@dataclass(frozen=True)
class CausalEncoderOptions:
    block_frames: int = 192
    left_context_steps: int = CAUSAL_LEFT_CONTEXT_STEPS

    def __post_init__(self) -> None:
        check_block_frames(self.block_frames)
        if self.left_context_steps <= 0:
            raise ValueError(f"left_context_steps={self.left_context_steps}; expected a positive number of steps")

    @property
    def steps_per_block(self) -> int:
        return self.block_frames // STEP_FRAMES


@dataclass
class CausalEncoderState:
    """One stream's encoder state between blocks: plain tensors and an int, safe to drop or serialise."""

    keys: torch.Tensor  # [layers, heads, cached_steps <= left window, head_dim], oldest step first
    values: torch.Tensor  # same layout as keys
    next_position: int  # absolute position of the next step, counted from the segment start
    pending_mel: torch.Tensor  # [frames < block_frames, mel_bins], not yet encoded

    @property
    def cached_steps(self) -> int:
        return self.keys.shape[2]

    def reset(self) -> None:
        """Segment roll: forget the cache and restart positions at 0; the pending frames carry over."""
        self.keys = self.keys[:, :, :0].clone()
        self.values = self.values[:, :, :0].clone()
        self.next_position = 0


@dataclass(frozen=True)
class KeyColumns:
    """Where each of B streams' keys lie along the key axis (`width` columns) that its block attends over.

    Row b's cached keys fill columns oldest[b] .. block[b] - 1, oldest first, and its block's keys follow from
    column block[b]; every other column (padding, or stale entries of a slot pool) is masked out. Keys carry
    absolute positions added before projection (no rotary), so a key's column only has to be known, not fixed.
    """

    oldest: torch.Tensor  # [B]
    block: torch.Tensor  # [B]
    width: int


def block_attention_mask(
    first_positions: torch.Tensor,
    step_counts: torch.Tensor,
    block_width: int,
    columns: KeyColumns,
    left_context_steps: int,
) -> torch.Tensor:
    """allowed [B, block_width, columns.width]: each block query sees its stream's real keys within its window.

    Stream b's block holds step_counts[b] real steps from absolute position first_positions[b] (padded to
    block_width); a query sees every real key of its own block (bidirectional) and cached keys at most
    `left_context_steps` steps back, itself included. Padding queries act as the block's last step, so that no
    row is fully masked.
    """
    device = first_positions.device
    first = first_positions[:, None]
    counts = step_counts[:, None]
    query_positions = first + torch.minimum(torch.arange(block_width, device=device), counts - 1)  # [B, S]
    column = torch.arange(columns.width, device=device)[None, :]
    block_column = columns.block.to(device, non_blocking=True)[:, None]
    key_positions = first + column - block_column  # [B, T]
    key_is_real = (column >= columns.oldest.to(device, non_blocking=True)[:, None]) & (column < block_column + counts)
    in_window = key_positions[:, None, :] >= query_positions[:, :, None] - left_context_steps + 1
    return key_is_real[:, None, :] & in_window


def causal_block_forward(
    tower: AudioTower,
    steps: torch.Tensor,
    step_counts: torch.Tensor,
    first_positions: torch.Tensor,
    columns: KeyColumns,
    kv_store: AudioKVStore,
    left_context_steps: int = CAUSAL_LEFT_CONTEXT_STEPS,
    kv_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One block from each of B streams through the layers and head, in one forward.

    steps [B, S, D]: conv-stem output of each block, zero-padded to the longest (step_counts [B] real), stream b's
    first step at absolute position first_positions[b]. `kv_store(layer, key, value)` keeps the block's keys and
    values where the caller's cache lives and returns the keys and values to attend over, laid out as `columns`
    says: one row per stream, or with `kv_rows` [B] stream b's in row kv_rows[b] (e.g. a pool's slots).
    Returns embeddings [B, S, output_dim] (rows past step_counts are padding).
    """
    device = steps.device
    # Host-made index tensors: asynchronous copies (a blocking one would wait for every queued kernel).
    first_positions = first_positions.to(device, non_blocking=True)
    step_counts = step_counts.to(device, non_blocking=True)
    allowed = block_attention_mask(first_positions, step_counts, steps.shape[1], columns, left_context_steps)
    step_positions = first_positions[:, None] + torch.arange(steps.shape[1], device=device)
    x = tower.add_positions(steps, step_positions)
    return tower.head(tower.encode(x, allowed, kv_store, kv_rows))


class CausalAudioEncoder:
    """Runs streams through a causal `AudioTower`. Holds no per-stream data: that is the state."""

    def __init__(self, tower: AudioTower, options: CausalEncoderOptions = CausalEncoderOptions()):
        if options.block_frames not in TRAINED_BLOCK_FRAMES:
            logger.warning(
                "block_frames=%d; the causal tower was trained on %s", options.block_frames, TRAINED_BLOCK_FRAMES
            )
        self.tower = tower
        self.options = options

    def new_state(self) -> CausalEncoderState:
        config = self.tower.config
        weight = self.tower.conv_out.weight
        empty_cache = weight.new_zeros(config.encoder_layers, config.encoder_attention_heads, 0, config.head_dim)
        return CausalEncoderState(
            keys=empty_cache,
            values=empty_cache.clone(),
            next_position=0,
            pending_mel=torch.zeros(0, config.num_mel_bins, device=weight.device),
        )

    def push(self, state: CausalEncoderState, mel: torch.Tensor) -> list[torch.Tensor]:
        """Buffer mel [n, mel_bins] (any n) and take out the whole blocks now ready, oldest first.

        The blocks leave the state; encode them in order with `encode_blocks`.
        """
        bins = self.tower.config.num_mel_bins
        if mel.dim() != 2 or mel.shape[1] != bins:
            raise ValueError(f"mel has shape {tuple(mel.shape)}; expected [frames, {bins}] (frame-major)")
        buffered = torch.cat([state.pending_mel, mel.to(state.pending_mel)])
        ready = buffered.shape[0] // self.options.block_frames * self.options.block_frames
        state.pending_mel = buffered[ready:].clone()
        return list(buffered[:ready].split(self.options.block_frames))

    @torch.no_grad()
    def append(self, state: CausalEncoderState, mel: torch.Tensor) -> torch.Tensor:
        """Buffer mel and encode every whole block: -> [new steps, output_dim] (possibly 0 rows)."""
        blocks = self.push(state, mel)
        if not blocks:
            return self._no_embeddings()
        # The conv stem has no state, so all blocks share one conv call; only the layers go in order.
        steps = self.tower.conv_steps(torch.cat(blocks)).split(self.options.steps_per_block)
        return torch.cat([self._encode_steps([state], [block_steps])[0] for block_steps in steps])

    @torch.no_grad()
    def flush(self, state: CausalEncoderState) -> torch.Tensor:
        """End of stream: encode the pending frames once as a short block, dropping a remainder < 8 frames."""
        usable = state.pending_mel.shape[0] // STEP_FRAMES * STEP_FRAMES
        block = state.pending_mel[:usable]
        state.pending_mel = state.pending_mel[:0].clone()
        if usable == 0:
            return self._no_embeddings()
        return self.encode_blocks([state], [block])[0]

    @torch.no_grad()
    def encode_blocks(self, states: list[CausalEncoderState], blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encode one block per stream, all streams in one forward; each gets what it would alone.

        blocks[i] is mel [frames, mel_bins] for states[i], frames a multiple of 8 up to block_frames
        (a flush block may be shorter). Returns [frames // 8, output_dim] per stream and advances
        each state's cache and position.
        """
        return self._encode_steps(states, self.conv_blocks(states, blocks))

    def conv_blocks(self, states: list[CausalEncoderState], blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Check one block per stream (see `encode_blocks`) and run the conv stem over all of them in one call.

        Returns each block's steps [frames // 8, d_model]; layers and head come next (`encode_blocks` runs
        them on the states' own caches, `pipeline.kv_pool.EncoderKVPool` on preallocated slots).
        """
        if len(states) != len(blocks):
            raise ValueError(f"got {len(states)} states and {len(blocks)} blocks; expected one block per state")
        if len({id(state) for state in states}) != len(states):
            raise ValueError("a stream appears twice; its blocks depend on each other and must go in order")
        for block in blocks:
            frames = block.shape[0]
            if frames == 0 or frames % STEP_FRAMES or frames > self.options.block_frames:
                raise ValueError(
                    f"block has {frames} frames; expected a positive multiple of {STEP_FRAMES} "
                    f"up to block_frames={self.options.block_frames}"
                )
        device = self.tower.conv_out.weight.device
        counts = [block.shape[0] // STEP_FRAMES for block in blocks]
        # One call's blocks concatenated at a time: never a copy of the whole batch's mel.
        calls = consecutive_runs(counts, self.tower.conv_pieces_per_call())
        steps = [self.tower.conv_steps(torch.cat([blocks[i].to(device) for i in call])) for call in calls]
        return list(torch.cat(steps).split(counts))

    def _encode_steps(self, states: list[CausalEncoderState], steps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Layers + head for one conv-stemmed block per stream; each state gets a new cache of its own."""
        counts = [block_steps.shape[0] for block_steps in steps]
        cached = [state.cached_steps for state in states]
        past_width = max(cached)
        padded_steps = torch.stack([F.pad(s, (0, 0, 0, max(counts) - s.shape[0])) for s in steps])

        def right_aligned(caches: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([F.pad(c, (0, 0, past_width - c.shape[2], 0)) for c in caches], dim=1)

        past_keys = right_aligned([state.keys for state in states])
        past_values = right_aligned([state.values for state in states])
        layer_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

        def past_then_block(layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = torch.cat([past_keys[layer], key], dim=2), torch.cat([past_values[layer], value], dim=2)
            layer_kv.append((keys, values))
            return keys, values

        embeddings = causal_block_forward(
            self.tower,
            padded_steps,
            step_counts=torch.tensor(counts),
            first_positions=torch.tensor([state.next_position for state in states]),
            columns=KeyColumns(
                oldest=torch.tensor([past_width - c for c in cached]),
                block=torch.full((len(states),), past_width),
                width=past_width + max(counts),
            ),
            kv_store=past_then_block,
            left_context_steps=self.options.left_context_steps,
        )
        outputs = []
        for row, (state, count) in enumerate(zip(states, counts)):
            end = past_width + count
            kept = min(state.cached_steps + count, self.options.left_context_steps)
            state.keys = torch.stack([keys[row, :, end - kept : end] for keys, _ in layer_kv])
            state.values = torch.stack([values[row, :, end - kept : end] for _, values in layer_kv])
            state.next_position += count
            outputs.append(embeddings[row, :count])
        return outputs

    def _no_embeddings(self) -> torch.Tensor:
        weight = self.tower.proj2.weight
        return weight.new_zeros(0, weight.shape[0])
