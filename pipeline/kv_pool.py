"""Preallocated K/V slot pools: the key/value memory of up to `slots` streams on one device, allocated once.

An engine serving many streams should not allocate cache memory per update, and should know up front how many
streams fit. The encoder and decoder stages (`pipeline.stages`) each own one pool and hand out one slot per
stream, lowest free slot first:

* `EncoderKVPool`: keys and values [layers, slots, heads, window + slack, head_dim] with window = the causal
  tower's left context (195 steps) and slack = spare columns (2 blocks of 24 steps by default). A stream's
  cached steps are a run of its slot's columns that a block extends in place, like the decoder's; the run is
  moved back to the front only when a block would not fit (once every `slack` steps).
* `DecoderKVPool`: keys and values [layers, slots, kv_heads, capacity + 1, head_dim] with capacity = the most
  positions a segment can hold (head + segment audio cap + tail + token budget). A slot backs a
  `DecoderKVCache` that writes in place and never reallocates. The extra column is scratch: a static-shape
  decode step (`pipeline.decode_step`) runs every slot of a range and lets the idle ones write there.

A stream holds a slot for one segment at a time: its next segment starts new, empty states in the lowest free
slot (so live streams stay packed at the low slots), and the slot is released when the stream ends or moves.
The stage keeps the slot index beside the states, and the states stay plain `CausalEncoderState` /
`DecoderKVCache` objects whose tensors are views of the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.causal_encoder import CausalAudioEncoder, CausalEncoderState, KeyColumns, causal_block_forward
from pipeline.decoder import DecoderKVCache, PoolSlot, TextDecoder
from pipeline.device_io import to_device
from pipeline.encoder import CAUSAL_LEFT_CONTEXT_STEPS, STEP_FRAMES, AudioTower
from pipeline.ragged import concat_ranges, ragged_rows
from pipeline.row_chunks import rows_per_forward_chunk


#: Spare columns per encoder slot beyond its window: two 24-step (1.92 s) blocks, so a stream's window is moved
#: back to the front of its slot once every two blocks. Slots are what bounds streams per GPU, so the slack is
#: kept small: 243 columns instead of 195 (+25 % encoder K/V), for a sixth of the old gather/concat/copy traffic.
DEFAULT_ENCODER_SLACK_STEPS = 2 * 24
#: Columns of an encoder slot under the defaults (what a slot's memory is sized by).
ENCODER_SLOT_COLUMNS = CAUSAL_LEFT_CONTEXT_STEPS + DEFAULT_ENCODER_SLACK_STEPS


class EncoderKVPool:
    """Causal-tower K/V of `slots` streams in one preallocated tensor pair; blocks are written in place.

    Slot layout ("slack window"): a slot has `window + slack` columns, and a stream's cached steps are one run of
    them, oldest first, ending at the slot's `end` column (always >= window). A block's keys and values are written
    at end .. end + count - 1 and the run's end moves on, the state's view becoming the last <= left-context
    columns: nothing is gathered, concatenated or copied back. When a block would pass the last column, the run is
    first moved back to end at column `window`: the one remaining copy (<= window columns, once every `slack`
    steps); every stream of that batch is moved together, so streams that advance together stay aligned and
    their batch attends over window + block columns, as a gathered batch would.
    """

    def __init__(
        self,
        tower: AudioTower,
        slots: int,
        window: int = CAUSAL_LEFT_CONTEXT_STEPS,
        slack: int = DEFAULT_ENCODER_SLACK_STEPS,
    ) -> None:
        if slack <= 0:
            raise ValueError(f"slack={slack}; expected a positive number of steps (at least one block's)")
        config = tower.config
        weight = tower.conv_out.weight
        shape = (config.encoder_layers, slots, config.encoder_attention_heads, window + slack, config.head_dim)
        self.window = window
        self.slack = slack
        self.keys = weight.new_zeros(shape)
        self.values = weight.new_zeros(shape)
        self._ends = [window] * slots  # per slot: the column after its newest cached step

    @property
    def columns(self) -> int:
        return self.window + self.slack

    def new_state(self, encoder: CausalAudioEncoder, slot: int) -> CausalEncoderState:
        """An empty encoder state (segment start) whose cache lives in `slot`."""
        state = encoder.new_state()
        self._ends[slot] = self.window
        state.keys, state.values = self._run(slot, 0)
        return state

    @torch.no_grad()
    def encode_blocks(
        self, encoder: CausalAudioEncoder, slots: list[int], states: list[CausalEncoderState], blocks: list[Tensor]
    ) -> list[Tensor]:
        """`CausalAudioEncoder.encode_blocks` for streams whose caches live in `slots`: same result, no new cache.

        Streams in a run of neighbouring slots (any order) attend over a view of the pool; streams in scattered
        slots attend over the pool's columns with their slot indices (`audio_attention`'s `kv_rows`), each chunk of
        the batch reading its own slots' windows: no copy of the whole batch's. Both write the blocks' K/V into
        the slots in place. The streams run in chunks of neighbouring slots whose intermediates fit
        `pipeline.row_chunks` (a chunk re-reads the tower's weights, so it may be as large as they are).
        """
        left_context = encoder.options.left_context_steps
        if left_context > self.window:
            raise ValueError(f"left_context_steps={left_context}; the pool's window holds {self.window} steps")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots {slots} repeat a slot; expected one stream per slot")
        for slot, state in zip(slots, states):
            self._check_backed(slot, state)
        # Rows in slot order, so that neighbouring slots are the rows of one pool view.
        order = sorted(range(len(slots)), key=slots.__getitem__)
        longest = max(-(-block.shape[0] // STEP_FRAMES) for block in blocks)
        per_stream = encoder.tower.block_bytes_per_stream(longest, self.columns)
        limit = rows_per_forward_chunk(per_stream, len(slots), encoder.tower.layers)
        embeddings: list[Tensor] = [torch.empty(0)] * len(slots)
        for start in range(0, len(order), limit):
            rows = order[start : start + limit]
            chunk = [slots[i] for i in rows], [states[i] for i in rows], [blocks[i] for i in rows]
            for index, result in zip(rows, self._encode_chunk(encoder, *chunk)):
                embeddings[index] = result
        return embeddings

    def _encode_chunk(
        self, encoder: CausalAudioEncoder, slots: list[int], states: list[CausalEncoderState], blocks: list[Tensor]
    ) -> list[Tensor]:
        """`encode_blocks` for one chunk of streams, in slot order."""
        left_context = encoder.options.left_context_steps
        steps = encoder.conv_blocks(states, blocks)
        batch = self._place(slots, states, [block_steps.shape[0] for block_steps in steps])
        embeddings = causal_block_forward(
            encoder.tower,
            self._padded(steps),
            step_counts=torch.tensor(batch.counts),
            first_positions=torch.tensor([state.next_position for state in states]),
            columns=batch.key_columns(),
            kv_store=batch.store,
            left_context_steps=left_context,
            kv_rows=batch.kv_rows,
        )
        results = []
        for row, (slot, state) in enumerate(zip(slots, states)):
            count = batch.counts[row]
            self._ends[slot] = batch.ends[row] + count
            state.keys, state.values = self._run(slot, min(state.cached_steps + count, left_context))
            state.next_position += count
            results.append(embeddings[row, :count])
        return results

    @staticmethod
    def _padded(steps: list[Tensor]) -> Tensor:
        """[B, longest, d_model]: each block's steps, zero-padded, written with one indexed copy (no per-stream
        operator)."""
        width = max(block.shape[0] for block in steps)
        padded = steps[0].new_zeros(len(steps) * width, steps[0].shape[1])
        rows, step_in_block = ragged_rows([block.shape[0] for block in steps])
        padded.index_copy_(0, to_device(rows * width + step_in_block, padded.device), torch.cat(steps))
        return padded.view(len(steps), width, -1)

    def _place(self, slots: list[int], states: list[CausalEncoderState], counts: list[int]) -> _SlotBatch:
        """Where a batch (rows in slot order) reads and writes; first rewinds its slots if a block would not fit."""
        if max(counts) > self.slack:
            raise ValueError(f"a block of {max(counts)} steps; the pool's slack holds {self.slack} (make it larger)")
        cached = [state.cached_steps for state in states]
        if any(self._ends[slot] + count > self.columns for slot, count in zip(slots, counts)):
            # All of the batch, not just the full slots: streams that then advance together stay aligned.
            self._rewind(slots, cached)
        ends = [self._ends[slot] for slot in slots]
        # Only real steps are written: a short (flush) block's padding never reaches a slot.
        rows, step_in_block = ragged_rows(counts)
        device = self.keys.device
        neighbouring = slots == list(range(slots[0], slots[0] + len(slots)))
        return _SlotBatch(
            keys=self.keys,
            values=self.values,
            slots=slots,
            ends=ends,
            cached=cached,
            counts=counts,
            low=min(end - c for end, c in zip(ends, cached)),
            high=max(end + count for end, count in zip(ends, counts)),
            write_slots=to_device(np.asarray(slots)[rows], device),
            write_columns=to_device(np.asarray(ends)[rows] + step_in_block, device),
            block_rows=to_device(rows, device),
            block_steps=to_device(step_in_block, device),
            kv_rows=None if neighbouring else to_device(slots, device),
        )

    def _run(self, slot: int, steps: int) -> tuple[Tensor, Tensor]:
        """Views of a slot's newest `steps` cached columns: [layers, heads, steps, head_dim] each."""
        end = self._ends[slot]
        return self.keys[:, slot, :, end - steps : end], self.values[:, slot, :, end - steps : end]

    def _rewind(self, slots: list[int], steps: list[int]) -> None:
        """Move each slot's newest `steps` cached columns to end at column `window`: the pool's one copy, of every
        slot at once (one gather and one indexed write per pool tensor)."""
        moving = [index for index, slot in enumerate(slots) if self._ends[slot] != self.window]
        if not moving:
            return
        moved, counts = np.asarray(slots)[moving], np.asarray(steps)[moving]
        ends = np.asarray(self._ends)[moved]
        device = self.keys.device
        slot_of_column = to_device(np.repeat(moved, counts), device)
        sources = to_device(concat_ranges(ends - counts, ends), device)
        targets = to_device(concat_ranges(self.window - counts, np.full_like(counts, self.window)), device)
        for pool in (self.keys, self.values):
            by_column = pool.permute(1, 3, 0, 2, 4)  # [slots, columns, layers, heads, d]
            # The gather is a copy: source and target columns may overlap.
            by_column.index_put_((slot_of_column, targets), by_column[slot_of_column, sources])
        for slot in moved.tolist():
            self._ends[slot] = self.window

    def _check_backed(self, slot: int, state: CausalEncoderState) -> None:
        """The state's cache must be its slot's current run (a state made before the slot's last new_state is not).
        Checked on the addresses, without making a view of the slot (a step checks every stream)."""
        backed = 0 <= slot < len(self._ends) and state.cached_steps <= self._ends[slot]
        if backed:
            first = self._ends[slot] - state.cached_steps
            offset = self.keys.storage_offset() + slot * self.keys.stride(1) + first * self.keys.stride(3)
            backed = (
                state.keys.untyped_storage().data_ptr() == self.keys.untyped_storage().data_ptr()
                and state.keys.storage_offset() == offset  # (an empty view's data_ptr is 0)
                and state.keys.shape[2] == state.cached_steps
            )
        if not backed:
            raise ValueError(f"encoder state does not live in slot {slot}; make it with EncoderKVPool.new_state")


@dataclass(frozen=True)
class _SlotBatch:
    """Where one `encode_blocks` batch lives in the pool tensors: rows in slot order, row r in slots[r].

    Row r's cached steps are columns ends[r] - cached[r] .. ends[r] - 1 of its slot and its block goes to
    ends[r] .. ends[r] + counts[r] - 1; the batch attends over the columns low .. high - 1, which cover every row.
    """

    keys: Tensor  # the pool's [layers, slots, heads, columns, head_dim]
    values: Tensor
    slots: list[int]
    ends: list[int]
    cached: list[int]
    counts: list[int]
    low: int
    high: int
    write_slots: Tensor  # [real block steps of the batch]: the slot each one goes to,
    write_columns: Tensor  # its column there,
    block_rows: Tensor  # and its row and step in the padded block [B, S].
    block_steps: Tensor
    kv_rows: Tensor | None  # row r's slot; None when the slots are neighbours (the rows of one view)

    def key_columns(self) -> KeyColumns:
        return KeyColumns(
            oldest=torch.tensor([end - c - self.low for end, c in zip(self.ends, self.cached)]),
            block=torch.tensor([end - self.low for end in self.ends]),
            width=self.high - self.low,
        )

    def store(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Write the block's real K/V into the slots; return the batch's columns of them, [B, heads, T, head_dim]
        for neighbouring slots, else every slot's [slots, heads, T, head_dim] (a view: row r reads kv_rows[r])."""
        attended = []
        for pool, new in ((self.keys[layer], key), (self.values[layer], value)):
            # As [slots, columns, heads, d] and [B, S, heads, d]: one indexed write of every real step.
            new_steps = new.transpose(1, 2)[self.block_rows, self.block_steps]
            pool.transpose(1, 2).index_put_((self.write_slots, self.write_columns), new_steps)
            columns = pool[:, :, self.low : self.high]
            if self.kv_rows is None:
                columns = columns[self.slots[0] : self.slots[0] + len(self.slots)]
            attended.append(columns)
        return attended[0], attended[1]


class DecoderKVPool:
    """Decoder K/V of `slots` streams, `capacity` positions each (+ one scratch column), in one tensor pair."""

    def __init__(self, decoder: TextDecoder, slots: int, capacity: int) -> None:
        config = decoder.config
        weight = decoder.embed_tokens.weight
        shape = (config.num_hidden_layers, slots, config.num_key_value_heads, capacity + 1, config.head_dim)
        self.capacity = capacity
        self.keys = weight.new_zeros(shape)
        self.values = weight.new_zeros(shape)

    def new_cache(self, slot: int) -> DecoderKVCache:
        """An empty cache (segment start) that writes into `slot`."""
        layers, capacity = self.keys.shape[0], self.capacity
        storage = [(self.keys[layer, slot, :, :capacity], self.values[layer, slot, :, :capacity]) for layer in range(layers)]
        return DecoderKVCache(layers, storage=storage, pool_slot=PoolSlot(self.keys, self.values, slot, capacity))

    @property
    def scratch_column(self) -> int:
        """The column no stream owns: rows without a stream write there."""
        return self.capacity
