"""Preallocated K/V slot pools: the key/value memory of up to `slots` streams on one device, allocated once.

An engine serving many streams should not allocate cache memory per update, and should know up front how many
streams fit. A `KVSlotPool` holds two pools and hands out one slot per stream:

* `EncoderKVPool`: keys and values [layers, slots, heads, window, head_dim] with window = the causal tower's
  left context (195 steps). A slot is stored right-aligned: its `cached` real steps are its last `cached`
  columns. That is the layout `causal_block_forward` takes, so a batch's past is one gather over the slot
  axis; after the forward, each stream's trimmed window is copied back into its slot.
* `DecoderKVPool`: keys and values [layers, slots, kv_heads, capacity + 1, head_dim] with capacity = the most
  positions a segment can hold (head + segment audio cap + tail + token budget). A slot backs a
  `DecoderKVCache` that writes in place and never reallocates. The extra column is scratch: a static-shape
  decode step (`pipeline.decode_step`) runs every slot of a range and lets the idle ones write there.

A stream keeps its slot for its whole life: a segment roll starts new, empty states over the same storage;
the slot is released when the stream ends. The engine keeps the slot index beside the states, and the states
stay plain `CausalEncoderState` / `DecoderKVCache` objects whose tensors are views of the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.causal_encoder import CausalAudioEncoder, CausalEncoderState, causal_block_forward
from pipeline.decoder import DecoderKVCache, PoolSlot, TextDecoder
from pipeline.encoder import CAUSAL_LEFT_CONTEXT_STEPS, AudioTower


class EncoderKVPool:
    """Causal-tower K/V windows of `slots` streams, right-aligned in one preallocated tensor pair."""

    def __init__(self, tower: AudioTower, slots: int, window: int = CAUSAL_LEFT_CONTEXT_STEPS) -> None:
        config = tower.config
        weight = tower.conv_out.weight
        shape = (config.encoder_layers, slots, config.encoder_attention_heads, window, config.head_dim)
        self.window = window
        self.keys = weight.new_zeros(shape)
        self.values = weight.new_zeros(shape)

    def new_state(self, encoder: CausalAudioEncoder, slot: int) -> CausalEncoderState:
        """An empty encoder state (segment start) whose cache lives in `slot`."""
        state = encoder.new_state()
        state.keys, state.values = self._slot_window(slot, 0)
        return state

    @torch.no_grad()
    def encode_blocks(
        self, encoder: CausalAudioEncoder, slots: list[int], states: list[CausalEncoderState], blocks: list[Tensor]
    ) -> list[Tensor]:
        """`CausalAudioEncoder.encode_blocks` for streams whose caches live in `slots`: same result, no new cache."""
        left_context = encoder.options.left_context_steps
        if left_context > self.window:
            raise ValueError(f"left_context_steps={left_context}; the pool's window holds {self.window} steps")
        for slot, state in zip(slots, states):
            self._check_backed(slot, state)
        steps = encoder.conv_blocks(states, blocks)
        counts = [block_steps.shape[0] for block_steps in steps]
        cached = [state.cached_steps for state in states]
        padded_steps = torch.stack([F.pad(s, (0, 0, 0, max(counts) - s.shape[0])) for s in steps])
        index = torch.tensor(slots, device=self.keys.device)
        embeddings, keys, values = causal_block_forward(
            encoder.tower,
            padded_steps,
            step_counts=torch.tensor(counts),
            past_keys=self.keys.index_select(1, index),
            past_values=self.values.index_select(1, index),
            past_lengths=torch.tensor(cached),
            first_positions=torch.tensor([state.next_position for state in states]),
            left_context_steps=left_context,
        )
        outputs = []
        for row, (slot, state, count) in enumerate(zip(slots, states, counts)):
            end = self.window + count
            kept = min(cached[row] + count, left_context)
            slot_keys, slot_values = self._slot_window(slot, kept)
            slot_keys.copy_(keys[:, row, :, end - kept : end])
            slot_values.copy_(values[:, row, :, end - kept : end])
            state.keys, state.values = slot_keys, slot_values
            state.next_position += count
            outputs.append(embeddings[row, :count])
        return outputs

    def _slot_window(self, slot: int, steps: int) -> tuple[Tensor, Tensor]:
        """Views of the last `steps` columns of a slot: [layers, heads, steps, head_dim] each."""
        start = self.window - steps
        return self.keys[:, slot, :, start:], self.values[:, slot, :, start:]

    def _check_backed(self, slot: int, state: CausalEncoderState) -> None:
        expected = self._slot_window(slot, state.cached_steps)[0]
        if state.keys.data_ptr() != expected.data_ptr() or state.keys.shape != expected.shape:
            raise ValueError(f"encoder state does not live in slot {slot}; make it with EncoderKVPool.new_state")


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


@dataclass(frozen=True)
class KVSlot:
    """One stream's place in the pools."""

    index: int
    encoder_pool: EncoderKVPool
    decoder_pool: DecoderKVPool

    def new_encoder_state(self, encoder: CausalAudioEncoder) -> CausalEncoderState:
        return self.encoder_pool.new_state(encoder, self.index)

    def new_decoder_cache(self) -> DecoderKVCache:
        return self.decoder_pool.new_cache(self.index)


class KVSlotPool:
    """Admission: `acquire` a slot per new stream (None when all are taken), `release` it when the stream ends."""

    def __init__(self, tower: AudioTower, decoder: TextDecoder, slots: int, decoder_capacity: int) -> None:
        if slots < 1:
            raise ValueError(f"slots is {slots}; expected at least 1")
        self.slots = slots
        self.encoder = EncoderKVPool(tower, slots)
        self.decoder = DecoderKVPool(decoder, slots, decoder_capacity)
        self._free = list(range(slots - 1, -1, -1))  # popped from the end: lowest index first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def bytes_per_slot(self) -> int:
        """Encoder + decoder K/V memory one stream holds, whatever its segment's fill."""
        tensors = (self.encoder.keys, self.encoder.values, self.decoder.keys, self.decoder.values)
        return sum(t.numel() * t.element_size() for t in tensors) // self.slots

    def acquire(self) -> KVSlot | None:
        if not self._free:
            return None
        return KVSlot(self._free.pop(), self.encoder, self.decoder)

    def release(self, slot: KVSlot) -> None:
        if slot.encoder_pool is not self.encoder or slot.index in self._free or not 0 <= slot.index < self.slots:
            raise ValueError(f"slot {slot.index} is not an acquired slot of this pool")
        self._free.append(slot.index)
