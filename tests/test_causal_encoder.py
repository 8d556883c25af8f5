"""The streamed causal tower against its one-shot block-causal forward (the training forward)."""

from __future__ import annotations

import pytest
import torch

from pipeline.causal_encoder import CausalAudioEncoder, CausalEncoderOptions, CausalEncoderState
from pipeline.config import TINY_AUDIO
from tests.test_encoder import random_tower, relative_error

BINS = TINY_AUDIO.num_mel_bins
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tower():
    return random_tower(seed=7)


def one_shot(tower, mel: torch.Tensor, block_frames: int) -> torch.Tensor:
    with torch.no_grad():
        return tower.forward_block_causal(mel, block_frames)


def stream(encoder: CausalAudioEncoder, mel: torch.Tensor, chunk_frames: list[int] | int) -> torch.Tensor:
    """Feed mel in chunks (a fixed size or a repeating size pattern), then flush."""
    sizes = chunk_frames if isinstance(chunk_frames, list) else [chunk_frames]
    state = encoder.new_state()
    outputs, start, turn = [], 0, 0
    while start < mel.shape[0]:
        size = sizes[turn % len(sizes)]
        outputs.append(encoder.append(state, mel[start : start + size]))
        start, turn = start + size, turn + 1
    outputs.append(encoder.flush(state))
    return torch.cat(outputs)


@pytest.mark.parametrize("block_frames", [192, 96])
@pytest.mark.parametrize("seconds", [5, 40, 300])
def test_streamed_equals_one_shot_masked(tower, block_frames, seconds):
    # 40 s slides the 195-step window; 5 min (3750 steps) also takes positions past the 1500-row table.
    torch.manual_seed(seconds)
    mel = torch.randn(seconds * 100 + 37, BINS)  # ends in a partial block and a partial step
    encoder = CausalAudioEncoder(tower, CausalEncoderOptions(block_frames=block_frames))
    streamed = stream(encoder, mel, chunk_frames=1000)
    expected = one_shot(tower, mel, block_frames)
    assert streamed.shape == (mel.shape[0] // 8, TINY_AUDIO.output_dim)
    assert relative_error(streamed, expected) < TOLERANCE


def test_a_wrong_window_is_detected(tower):
    # The comparison above can fail: a 194-step window gives visibly different embeddings.
    torch.manual_seed(1)
    mel = torch.randn(4000, BINS)
    streamed = stream(CausalAudioEncoder(tower), mel, chunk_frames=1000)
    with torch.no_grad():
        narrower = tower.forward_block_causal(mel, 192, left_context_steps=194)
    assert relative_error(streamed, narrower) > 1e-3


def test_pacing_invariance(tower):
    torch.manual_seed(2)
    mel = torch.randn(2345, BINS)
    encoder = CausalAudioEncoder(tower, CausalEncoderOptions(block_frames=96))
    whole = stream(encoder, mel, chunk_frames=mel.shape[0])
    odd = stream(encoder, mel, chunk_frames=[1, 7, 13, 250, 0, 96, 191, 3])
    torch.testing.assert_close(odd, whole, rtol=0, atol=0)


def test_embeddings_come_out_as_soon_as_a_block_is_whole(tower):
    encoder = CausalAudioEncoder(tower)
    state = encoder.new_state()
    assert encoder.append(state, torch.randn(191, BINS)).shape == (0, TINY_AUDIO.output_dim)
    assert encoder.append(state, torch.randn(1, BINS)).shape == (24, TINY_AUDIO.output_dim)
    assert encoder.append(state, torch.randn(3 * 192 + 5, BINS)).shape == (72, TINY_AUDIO.output_dim)
    assert state.pending_mel.shape == (5, BINS)
    assert state.next_position == 96
    assert state.cached_steps == 96


def test_cache_keeps_only_the_left_window(tower):
    encoder = CausalAudioEncoder(tower)
    state = encoder.new_state()
    encoder.append(state, torch.randn(10 * 192, BINS))
    assert state.next_position == 240
    assert state.keys.shape == (TINY_AUDIO.encoder_layers, TINY_AUDIO.encoder_attention_heads, 195, 16)
    assert state.values.shape == state.keys.shape


def test_flush_encodes_the_partial_block_rounded_down_to_whole_steps(tower):
    torch.manual_seed(3)
    mel = torch.randn(192 * 2 + 100, BINS)  # 100 pending frames -> 12 steps, 4 frames dropped
    encoder = CausalAudioEncoder(tower)
    state = encoder.new_state()
    blocks = encoder.append(state, mel)
    tail = encoder.flush(state)
    assert blocks.shape[0] == 48 and tail.shape[0] == 12
    assert state.pending_mel.shape[0] == 0 and state.next_position == 60
    assert relative_error(torch.cat([blocks, tail]), one_shot(tower, mel[: 192 * 2 + 96], 192)) < TOLERANCE
    assert encoder.flush(state).shape == (0, TINY_AUDIO.output_dim)
    encoder.append(state, torch.randn(7, BINS))
    assert encoder.flush(state).shape == (0, TINY_AUDIO.output_dim)  # < 8 frames: nothing to encode


@pytest.mark.parametrize("block_frames", [192, 96])
def test_reset_starts_a_fresh_segment_and_keeps_the_pending_frames(tower, block_frames):
    torch.manual_seed(4)
    first = torch.randn(2500, BINS)
    second = torch.randn(1900, BINS)
    encoder = CausalAudioEncoder(tower, CausalEncoderOptions(block_frames=block_frames))
    state = encoder.new_state()
    before = encoder.append(state, first)
    carried = state.pending_mel.clone()
    state.reset()
    assert state.next_position == 0 and state.cached_steps == 0
    after = torch.cat([encoder.append(state, second), encoder.flush(state)])

    ready = first.shape[0] // block_frames * block_frames
    assert relative_error(before, one_shot(tower, first[:ready], block_frames)) < TOLERANCE
    assert relative_error(after, one_shot(tower, torch.cat([carried, second]), block_frames)) < TOLERANCE


def test_batched_ragged_blocks_equal_each_stream_alone(tower):
    # Four streams at cache fills 0, 24, 120 and a full 195 (positions past the window), one of
    # them with a short flush block, in one forward.
    torch.manual_seed(5)
    encoder = CausalAudioEncoder(tower)
    histories = [0, 192, 5 * 192, 12 * 192]
    blocks = [torch.randn(192, BINS), torch.randn(192, BINS), torch.randn(56, BINS), torch.randn(192, BINS)]
    histories_mel = [torch.randn(frames, BINS) for frames in histories]

    def prepared() -> list[CausalEncoderState]:
        states = []
        for mel in histories_mel:
            state = encoder.new_state()
            encoder.append(state, mel)
            states.append(state)
        return states

    batched_states = prepared()
    assert [s.cached_steps for s in batched_states] == [0, 24, 120, 195]
    batched = encoder.encode_blocks(batched_states, blocks)

    for index, (state, block) in enumerate(zip(prepared(), blocks)):
        alone = encoder.encode_blocks([state], [block])[0]
        assert batched[index].shape == (block.shape[0] // 8, TINY_AUDIO.output_dim)
        assert relative_error(batched[index], alone) < TOLERANCE
        assert state.next_position == batched_states[index].next_position
        torch.testing.assert_close(batched_states[index].keys, state.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched_states[index].values, state.values, rtol=1e-5, atol=1e-6)
        expected = one_shot(tower, torch.cat([histories_mel[index], block]), 192)[-alone.shape[0] :]
        assert relative_error(alone, expected) < TOLERANCE


@pytest.mark.parametrize("block_frames", [0, 100, -8, 20])
def test_bad_block_sizes_are_rejected(block_frames):
    with pytest.raises(ValueError, match="expected a positive multiple of 8"):
        CausalEncoderOptions(block_frames=block_frames)


def test_bad_blocks_and_mel_are_rejected(tower):
    encoder = CausalAudioEncoder(tower, CausalEncoderOptions(block_frames=96))
    state = encoder.new_state()
    with pytest.raises(ValueError, match="block has 100 frames"):
        encoder.encode_blocks([state], [torch.zeros(100, BINS)])
    with pytest.raises(ValueError, match="block has 192 frames"):
        encoder.encode_blocks([state], [torch.zeros(192, BINS)])
    with pytest.raises(ValueError, match="a stream appears twice"):
        encoder.encode_blocks([state, state], [torch.zeros(96, BINS)] * 2)
    with pytest.raises(ValueError, match="one block per state"):
        encoder.encode_blocks([state], [])
    with pytest.raises(ValueError, match=r"expected \[frames, 128\]"):
        encoder.append(state, torch.zeros(128, 10))
