"""Preallocated K/V slot pools: the pooled encoder equals the per-state one; fixed decoder slots; admission."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.causal_encoder import CausalAudioEncoder, CausalEncoderOptions
from pipeline.config import TINY_AUDIO
from pipeline.decoder import DecoderKVCache, forward_streams
from pipeline.kv_pool import DecoderKVPool, EncoderKVPool
from tests.test_decoder import random_decoder
from tests.test_encoder import random_tower, relative_error

BINS = TINY_AUDIO.num_mel_bins


@pytest.fixture(autouse=True)
def _own_random_state():
    """These tests seed torch's global generator; give later test files back the state they would have seen."""
    with torch.random.fork_rng():
        yield


def slot_column(pool: torch.Tensor, slot: int, view: torch.Tensor) -> int:
    """The column of `pool` (keys or values) where a state's `view` starts; fails unless it is a run of `slot`."""
    in_slot = pool[:, slot]
    assert view.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
    assert view.stride() == in_slot.stride()
    column, rest = divmod(view.storage_offset() - in_slot.storage_offset(), in_slot.stride(2))
    assert rest == 0 and 0 <= column and column + view.shape[2] <= pool.shape[3]
    return column


# Slots 4, 0, 2 gather (but a stream alone runs in place); slots 0, 1, 2 run in place whenever the streams that
# have a block are neighbours. A slack of one 24-step block moves the windows back before nearly every block.
@pytest.mark.parametrize("slack", [192, 24])
@pytest.mark.parametrize("slots", [[4, 0, 2], [0, 1, 2]])
@pytest.mark.parametrize("block_frames", [192, 96])
def test_pooled_encoder_equals_per_state_encoder(block_frames: int, slots: list[int], slack: int) -> None:
    # Three streams starting at different blocks, ragged flush blocks, long enough (> 195 steps) to slide the
    # window; the pool and plain states must give the same embeddings and the same K/V.
    tower = random_tower(seed=3)
    encoder = CausalAudioEncoder(tower, CausalEncoderOptions(block_frames=block_frames))
    pool = EncoderKVPool(tower, slots=5, slack=slack)
    starts = [0, 3, 7]
    torch.manual_seed(0)
    blocks_per_stream = [list(torch.randn(block_frames * count, BINS).split(block_frames)) for count in (30, 24, 14)]
    blocks_per_stream[1][-1] = blocks_per_stream[1][-1][: block_frames // 2]  # a short flush block
    plain = [encoder.new_state() for _ in slots]
    pooled = [pool.new_state(encoder, slot) for slot in slots]
    worst = 0.0
    for step in range(40):
        ready = [i for i, start in enumerate(starts) if 0 <= step - start < len(blocks_per_stream[i])]
        if not ready:
            continue
        blocks = [blocks_per_stream[i][step - starts[i]] for i in ready]
        expected = encoder.encode_blocks([plain[i] for i in ready], blocks)
        actual = pool.encode_blocks(encoder, [slots[i] for i in ready], [pooled[i] for i in ready], blocks)
        for i, got, want in zip(ready, actual, expected):
            worst = max(worst, relative_error(got, want))
            assert pooled[i].next_position == plain[i].next_position
            assert pooled[i].cached_steps == plain[i].cached_steps
            torch.testing.assert_close(pooled[i].keys, plain[i].keys, rtol=0, atol=1e-5)
    assert worst < 1e-5
    assert plain[0].cached_steps == encoder.options.left_context_steps  # the window did slide
    # The pooled states are views of their slots.
    for slot, state in zip(slots, pooled):
        assert slot_column(pool.keys, slot, state.keys) == slot_column(pool.values, slot, state.values)


class _TorchCalls(TorchFunctionMode):
    """Records which torch functions run, and how many matmuls read the pool's own K/V storage."""

    def __init__(self, pool: EncoderKVPool) -> None:
        super().__init__()
        self.pool_storage = {pool.keys.untyped_storage().data_ptr(), pool.values.untyped_storage().data_ptr()}
        self.names: set[str] = set()
        self.matmuls_on_pool = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        if func is torch.matmul:
            storages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            self.matmuls_on_pool += bool(storages & self.pool_storage)
        return func(*args, **(kwargs or {}))


def test_neighbouring_slots_attend_over_the_pool_itself() -> None:
    tower = random_tower(seed=3)
    encoder = CausalAudioEncoder(tower)
    pool = EncoderKVPool(tower, slots=3)
    states = [pool.new_state(encoder, slot) for slot in range(3)]
    torch.manual_seed(0)
    pool.encode_blocks(encoder, [0, 1, 2], states, [torch.randn(192, BINS) for _ in states])

    neighbours = _TorchCalls(pool)
    with neighbours:
        pool.encode_blocks(encoder, [1, 0], [states[1], states[0]], [torch.randn(192, BINS), torch.randn(56, BINS)])
    assert "index_select" not in neighbours.names
    assert neighbours.matmuls_on_pool == 2 * len(tower.layers)  # scores over the keys, weights times the values

    apart = _TorchCalls(pool)
    with apart:
        pool.encode_blocks(encoder, [0, 2], [states[0], states[2]], [torch.randn(192, BINS), torch.randn(192, BINS)])
    assert "index_select" in apart.names and apart.matmuls_on_pool == 0  # each chunk reads its own slots' windows


class _Gathers(TorchDispatchMode):
    """Records the shape of every index_select result (how the attention reads scattered slots' K/V)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.index_select.default:
            self.shapes.append(tuple(out.shape))
        return out


def test_scattered_slots_equal_each_stream_alone_and_copy_no_batch_of_windows(monkeypatch) -> None:
    """Streams in slots 0, 5 and 9 with unequal cache lengths, in one batch: each gets what it gets encoded alone,
    and the attention reads their windows one chunk of rows at a time (here one row: the bound is set to one
    row's attention), never as one [streams, heads, columns, head_dim] copy of the batch's."""
    tower = random_tower(seed=3)
    encoder = CausalAudioEncoder(tower)
    pool = EncoderKVPool(tower, slots=10)
    slots, history = [0, 5, 9], [3, 1, 6]  # blocks each stream has had before the batch
    generator = torch.Generator().manual_seed(5)
    blocks = [[torch.randn(192, BINS, generator=generator) for _ in range(count + 1)] for count in history]
    alone = [encoder.new_state() for _ in slots]
    pooled = [pool.new_state(encoder, slot) for slot in slots]
    for state, pooled_state, slot, own in zip(alone, pooled, slots, blocks):
        for block in own[:-1]:
            encoder.encode_blocks([state], [block])
            pool.encode_blocks(encoder, [slot], [pooled_state], [block])
    assert len({state.cached_steps for state in pooled}) == len(slots)
    expected = [encoder.encode_blocks([state], [own[-1]])[0] for state, own in zip(alone, blocks)]

    config = tower.config
    columns = max(state.cached_steps for state in pooled) + encoder.options.steps_per_block
    one_row = 2 * 4 * config.encoder_attention_heads * columns * (encoder.options.steps_per_block + config.head_dim)
    monkeypatch.setattr("pipeline.row_chunks.CHUNK_BYTES", one_row)
    gathers = _Gathers()
    with gathers:
        actual = pool.encode_blocks(encoder, slots, pooled, [own[-1] for own in blocks])
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    window_reads = [shape for shape in gathers.shapes if len(shape) == 4]
    # Keys and values, per row, per layer, of the streams whose chunk of neighbouring slots is scattered (the
    # stream chunks follow the same bound: here a chunk of one slot attends over the pool view itself).
    assert 0 < len(window_reads) <= 2 * len(slots) * len(tower.layers)
    assert len(window_reads) % (2 * len(tower.layers)) == 0
    assert all(shape[0] == 1 for shape in window_reads)


def test_state_views_stay_put_until_the_window_is_moved_back() -> None:
    # 24-step blocks, window 195, slack 192: a run starts at column 195 and grows in place for 8 blocks (to
    # column 387, the last); the 9th block moves the newest 192 steps back to end at column 195 first.
    tower = random_tower(seed=3)
    encoder = CausalAudioEncoder(tower)
    pool = EncoderKVPool(tower, slots=2, slack=192)
    states = [pool.new_state(encoder, slot) for slot in range(2)]
    torch.manual_seed(1)
    columns, pointers = [], []
    for _ in range(12):
        pool.encode_blocks(encoder, [0, 1], states, [torch.randn(192, BINS) for _ in states])
        columns.append(slot_column(pool.keys, 1, states[1].keys))
        pointers.append(states[1].keys.data_ptr())
    assert columns == [195] * 8 + [24, 48, 72, 96]
    assert len(set(pointers[:8])) == 1  # not moved, not copied: the blocks were written after the cached steps
    assert [state.cached_steps for state in states] == [195, 195]


def test_pooled_encoder_refuses_blocks_longer_than_the_slack_and_repeated_slots() -> None:
    tower = random_tower(seed=3)
    encoder = CausalAudioEncoder(tower)
    pool = EncoderKVPool(tower, slots=2, slack=12)
    states = [pool.new_state(encoder, slot) for slot in range(2)]
    with pytest.raises(ValueError, match="block of 24 steps; the pool's slack holds 12"):
        pool.encode_blocks(encoder, [0], states[:1], [torch.randn(192, BINS)])
    with pytest.raises(ValueError, match="repeat a slot"):
        pool.encode_blocks(encoder, [0, 0], states, [torch.randn(96, BINS)] * 2)


def test_pooled_encoder_refuses_a_state_from_elsewhere() -> None:
    tower = random_tower(seed=3)
    encoder = CausalAudioEncoder(tower)
    pool = EncoderKVPool(tower, slots=2)
    state = pool.new_state(encoder, 0)
    pool.encode_blocks(encoder, [0], [state], [torch.randn(192, BINS)])
    with pytest.raises(ValueError, match="does not live in slot 1"):
        pool.encode_blocks(encoder, [1], [state], [torch.randn(192, BINS)])
    pool.new_state(encoder, 0)  # a new segment in slot 0: the old state no longer owns it
    with pytest.raises(ValueError, match="does not live in slot 0"):
        pool.encode_blocks(encoder, [0], [state], [torch.randn(192, BINS)])


def test_decoder_cache_on_fixed_storage_matches_growing_cache_and_never_reallocates() -> None:
    decoder = random_decoder(seed=0)
    pool = DecoderKVPool(decoder, slots=3, capacity=50)
    pooled = [pool.new_cache(2), pool.new_cache(0)]
    growing = [DecoderKVCache(len(decoder.layers)) for _ in pooled]
    torch.manual_seed(0)
    with torch.no_grad():
        for lengths in ([20, 7], [1, 1], [9, 30], [1, 1]):
            inputs = [torch.randn(n, decoder.config.hidden_size) for n in lengths]
            expected = forward_streams(decoder, growing, inputs)
            actual = forward_streams(decoder, pooled, inputs)
            for got, want in zip(actual, expected):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            for cache in growing + pooled:
                cache.crop(cache.length - 1)
    # After every append and crop the caches still write into their slots.
    assert pooled[0].layer(0)[0].data_ptr() == pool.keys[0, 2].data_ptr()
    assert pooled[1].layer(1)[1].data_ptr() == pool.values[1, 0].data_ptr()
    with pytest.raises(ValueError, match="fixed storage holds 50"):
        with torch.no_grad():
            forward_streams(decoder, [pooled[1]], [torch.randn(50 - pooled[1].length + 1, decoder.config.hidden_size)])


def test_neighbouring_slots_run_in_place_and_match_growing_caches() -> None:
    """A batch filling slots 0..2 (in any order) writes K/V straight into the pool: same results as gathering."""
    from pipeline.decoder import _pool_rows

    decoder = random_decoder(seed=0)
    pool = DecoderKVPool(decoder, slots=3, capacity=80)
    pooled = [pool.new_cache(1), pool.new_cache(2), pool.new_cache(0)]
    growing = [DecoderKVCache(len(decoder.layers)) for _ in pooled]
    assert _pool_rows(pooled, needed=10) is not None and _pool_rows(pooled[:2] + growing[:1], needed=10) is None
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lengths in ([20, 7, 12], [1, 1, 1], [9, 30, 2], [5, 5, 5], [1, 1, 1]):
            inputs = [torch.randn(n, decoder.config.hidden_size, generator=generator) for n in lengths]
            expected = forward_streams(decoder, growing, inputs)
            actual = forward_streams(decoder, pooled, inputs)
            for got, want in zip(actual, expected):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            for cache, other in zip(pooled, growing):
                assert cache.length == other.length
                torch.testing.assert_close(cache.layer(1)[0], other.layer(1)[0], rtol=0, atol=1e-5)
                cache.crop(cache.length - 2)
                other.crop(other.length - 2)


class _ScatterCalls(_TorchCalls):
    """Also counts indexed writes (`index_put_`)."""

    def __init__(self, pool) -> None:
        super().__init__(pool)
        self.scatters = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.scatters += getattr(func, "__name__", "") == "index_put_"
        return super().__torch_function__(func, types, args, kwargs)


def test_scattered_slots_with_unequal_lengths_attend_in_place_and_match_growing_caches() -> None:
    """Streams in slots 4, 0, 2 (slot 1 holds a stream that sits this batch out, 3 and 5 none) with unequal cache
    and input lengths: every layer writes with one scatter per tensor and attends over the pool itself (no
    gathered copy of the K/V), results equal to growing caches, and the idle stream's K/V is untouched."""
    decoder = random_decoder(seed=1)
    pool = DecoderKVPool(decoder, slots=6, capacity=90)
    slots = [4, 0, 2]
    pooled = [pool.new_cache(slot) for slot in slots]
    growing = [DecoderKVCache(len(decoder.layers)) for _ in slots]
    idle = pool.new_cache(1)
    generator = torch.Generator().manual_seed(4)
    hidden = decoder.config.hidden_size
    with torch.no_grad():
        forward_streams(decoder, [idle], [torch.randn(13, hidden, generator=generator)])
        idle_keys, idle_values = (part.clone() for part in idle.layer(1))
        for lengths in ([20, 7, 12], [1, 3, 1], [9, 30, 2], [4, 4, 4], [1, 1, 1]):
            inputs = [torch.randn(n, hidden, generator=generator) for n in lengths]
            expected = forward_streams(decoder, growing, inputs)
            calls = _ScatterCalls(pool)
            with calls:
                actual = forward_streams(decoder, pooled, inputs)
            assert calls.matmuls_on_pool == 2 * len(decoder.layers)  # scores over the keys, weights x values
            assert calls.scatters == 2 * len(decoder.layers)  # one write of every stream's K/V per tensor
            for got, want in zip(actual, expected):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            for cache, other in zip(pooled, growing):
                assert cache.length == other.length
                torch.testing.assert_close(cache.layer(1)[0], other.layer(1)[0], rtol=0, atol=1e-5)
                cache.crop(cache.length - 1)
                other.crop(other.length - 1)
    assert idle.length == 13
    assert torch.equal(idle.layer(1)[0], idle_keys) and torch.equal(idle.layer(1)[1], idle_values)


def test_a_pooled_forward_holds_one_layers_new_kv_at_a_time() -> None:
    """The pool keeps each layer's new K/V; the forward returns none of it, and its peak memory does not grow
    with the number of layers (a copy per layer kept to the end would: 2 x layers x the new positions' K/V)."""
    from dataclasses import replace

    from pipeline.config import TINY_TEXT
    from pipeline.decoder import TextDecoder, forward_padded
    from pipeline.step_probes import PeakTensorBytes

    peaks = {}
    for layers in (2, 8):
        torch.manual_seed(0)
        decoder = TextDecoder(replace(TINY_TEXT, num_hidden_layers=layers)).eval()
        pool = DecoderKVPool(decoder, slots=4, capacity=300)
        caches = [pool.new_cache(slot) for slot in (3, 0, 1)]
        embeds = torch.randn(3, 200, decoder.config.hidden_size)
        with torch.no_grad(), PeakTensorBytes() as probe:
            forward_padded(decoder, caches, embeds, [200, 150, 120])
        peaks[layers] = probe.peak
        assert all(cache.length == n for cache, n in zip(caches, [200, 150, 120]))
    new_kv_bytes_per_layer = 2 * 3 * 200 * TINY_TEXT.num_key_value_heads * TINY_TEXT.head_dim * 4
    assert peaks[8] - peaks[2] < new_kv_bytes_per_layer  # not 6 more layers' worth


def test_a_forward_over_many_streams_runs_in_chunks_of_streams_with_the_same_results(monkeypatch) -> None:
    """With the chunk bound at one stream's intermediates, scattered pooled streams run one whole forward per
    chunk of neighbouring slots (each chunk padded only to its own longest input) and get what one batch gets."""
    import pipeline.decoder as decoder_module
    from pipeline.row_chunks import rows_per_forward_chunk

    decoder = random_decoder(seed=2)
    lengths = [7, 30, 2, 12, 1]
    generator = torch.Generator().manual_seed(5)
    inputs = [torch.randn(n, decoder.config.hidden_size, generator=generator) for n in lengths]
    results = {}
    chunk = decoder_module._forward_chunk
    for name, chunk_bytes in (("one batch", 2**40), ("chunks", 1)):
        monkeypatch.setattr("pipeline.row_chunks.CHUNK_BYTES", chunk_bytes)
        pool = DecoderKVPool(decoder, slots=8, capacity=90)
        caches = [pool.new_cache(slot) for slot in (6, 0, 3, 1, 4)]
        widths: list[int] = []

        def recorded(decoder, caches, embeds, new_lengths):  # noqa: ANN001, ANN202
            widths.append(embeds.shape[1])
            return chunk(decoder, caches, embeds, new_lengths)

        monkeypatch.setattr(decoder_module, "_forward_chunk", recorded)
        with torch.no_grad():
            forward_streams(decoder, caches, [x[:3] for x in inputs])  # a first update on empty caches
            results[name] = forward_streams(decoder, caches, inputs), [cache.layer(1)[0].clone() for cache in caches]
        results[name + " widths"] = widths[1:]
    assert results["one batch widths"] == [30]
    monkeypatch.setattr("pipeline.row_chunks.CHUNK_BYTES", 1)
    per_stream = decoder_module._bytes_per_stream(decoder, width=30, keys=3 + 30)
    limit = rows_per_forward_chunk(per_stream, len(lengths), decoder.layers)
    assert 1 <= limit < len(lengths)  # the weights are the bound: a few streams per chunk
    by_slot = [lengths[row] for row in (1, 3, 2, 4, 0)]  # chunks of neighbouring slots (0, 1, 3, 4, 6)
    assert results["chunks widths"] == [max(by_slot[start : start + limit]) for start in range(0, len(lengths), limit)]
    for got, want in zip(*(results["chunks"][0], results["one batch"][0])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for got, want in zip(*(results["chunks"][1], results["one batch"][1])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_chunked_forward_may_write_its_output_over_its_inputs(monkeypatch) -> None:
    """`consume_inputs`: the chunks' outputs go over their own rows of the inputs, equal to a fresh output."""
    from pipeline.decoder import forward_padded

    monkeypatch.setattr("pipeline.row_chunks.CHUNK_BYTES", 1)
    decoder = random_decoder(seed=3)
    lengths = [40, 9, 64, 1]  # 64 positions' intermediates outweigh the tiny layers: chunks of one or two streams
    embeds = torch.randn(4, 64, decoder.config.hidden_size, generator=torch.Generator().manual_seed(6))
    outputs = []
    for consume in (False, True):
        pool = DecoderKVPool(decoder, slots=4, capacity=80)
        caches = [pool.new_cache(slot) for slot in (2, 0, 3, 1)]
        inputs = embeds.clone()
        with torch.no_grad():
            hidden = forward_padded(decoder, caches, inputs, lengths, consume_inputs=consume)
        assert (hidden is inputs) == consume
        outputs.append([hidden[row, :n] for row, n in enumerate(lengths)])
    for fresh, consumed in zip(*outputs):
        assert torch.equal(fresh, consumed)


def test_a_batch_within_the_chunk_bound_is_one_chunk_without_counting_the_weights(monkeypatch) -> None:
    """The walk over every parameter runs only when the batch exceeds the bound (not in every decode step)."""
    from pipeline import row_chunks

    walked: list[object] = []
    monkeypatch.setattr(row_chunks, "weight_bytes", lambda module: walked.append(module) or 10**9)
    decoder = random_decoder(seed=4)
    assert row_chunks.rows_per_forward_chunk(1000, 8, decoder.layers) == 8 and not walked
    over_the_bound = row_chunks.rows_per_forward_chunk(row_chunks.CHUNK_BYTES, 8, decoder.layers)
    assert over_the_bound == 10**9 // row_chunks.CHUNK_BYTES
    assert walked == [decoder.layers]
