"""One stream end to end: chunking invariance, segment rolls, restore from checkpoints, flush, both backends."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import ASRModel, load_model
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession, TranscriptEvent, checkpoint_offset, checkpoint_options
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR

SAMPLE_RATE = 16000
# Short segments so that a 20 s stream rolls several times (the tiny random model never writes punctuation
# reliably, so most rolls come from the cap).
SMALL = {"decode": {"max_new_tokens": 12}, "segment": {"segment_max_steps": 60, "segment_punct_min_steps": 40}}
CAUSAL = SessionOptions.from_dict(SMALL)
WINDOWED = SessionOptions.windowed(**SMALL)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> ASRModel:
    return load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR)


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise with a slow loudness envelope: enough structure for the front-end and the towers."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = 0.05 + 0.2 * (1 + np.sin(2 * np.pi * 0.3 * t)) / 2
    return (envelope * rng.standard_normal(t.size)).astype(np.float32)


def _run(model: ASRModel, audio: np.ndarray, chunk: int | list[int], options: SessionOptions) -> tuple[list[TranscriptEvent], StreamingSession]:
    session = StreamingSession(model, options)
    sizes = chunk if isinstance(chunk, list) else [chunk]
    events, start, index = [], 0, 0
    while start < audio.size:
        size = sizes[index % len(sizes)]
        events += session.push_audio(audio[start : start + size])
        start, index = start + size, index + 1
    return events + session.finish(), session


def _comparable(events: list[TranscriptEvent]) -> list[tuple]:
    return [
        (e.kind, tuple((w.text, w.start_sec, w.end_sec) for w in e.new_words), e.tentative, e.transcript, e.hypothesis, e.segment_index, e.audio_sec, e.stats)
        for e in events
    ]


@pytest.mark.parametrize("options", [CAUSAL, WINDOWED], ids=["causal", "windowed"])
def test_output_does_not_depend_on_chunk_sizes(model: ASRModel, options: SessionOptions) -> None:
    audio = _audio(9.3)
    whole, _ = _run(model, audio, audio.size, options)
    for chunking in (160, 2192, [1, 5000, 333, 16000, 77]):
        events, _ = _run(model, audio, chunking, options)
        assert _comparable(events) == _comparable(whole)


@pytest.mark.parametrize("options", [CAUSAL, WINDOWED], ids=["causal", "windowed"])
def test_restored_checkpoint_reproduces_the_rest_of_the_stream(model: ASRModel, options: SessionOptions) -> None:
    audio = _audio(20.0, seed=1)
    events, _ = _run(model, audio, 7000, options)
    rolls = [i for i, e in enumerate(events) if e.kind == "segment"]
    assert len(rolls) >= 2
    for roll in rolls:
        checkpoint = events[roll].checkpoint
        assert checkpoint is not None
        restored = StreamingSession.restore(model, checkpoint)
        offset = checkpoint_offset(checkpoint)
        rest: list[TranscriptEvent] = []
        for start in range(offset, audio.size, 5000):
            rest += restored.push_audio(audio[start : start + 5000])
        rest += restored.finish()
        assert _comparable(rest) == _comparable(events[roll + 1 :])


def test_segments_respect_the_cap_and_roll_before_generate(model: ASRModel) -> None:
    events, session = _run(model, _audio(25.0, seed=2), 16000, CAUSAL)
    updates = [e for e in events if e.kind == "update"]
    segment_steps: dict[int, float] = {}
    for event in updates:
        segment_steps.setdefault(event.segment_index, 0)
    # 60-step cap with 24-step blocks: two blocks per segment, the third would exceed the cap and rolls first.
    per_segment = [sum(1 for e in updates if e.segment_index == s) for s in sorted(segment_steps)]
    assert all(count <= 2 for count in per_segment) and per_segment[0] == 2
    assert [e.segment_index for e in events if e.kind == "segment"] == list(range(1, session.segment_index + 1))


def test_end_of_stream_flushes_the_partial_block_and_finalizes(model: ASRModel) -> None:
    audio = _audio(3.0, seed=3)  # 300 frames: one 192-frame block, then 108 frames flushed as 13 steps
    events, session = _run(model, audio, 4000, CAUSAL)
    updates = [e for e in events if e.kind == "update"]
    assert [e.audio_sec for e in updates] == [1.92, 3.0]
    final = events[-1]
    assert final.kind == "final" and final.tentative == ""
    emitted = " ".join(w.text for e in events for w in e.new_words)
    assert emitted == session.transcript == final.transcript
    assert session.token_ids  # the tiny model always writes something
    times = [w.end_sec for e in events for w in e.new_words]
    assert times == sorted(times) and times[-1] <= 3.0


def test_committed_words_are_append_only(model: ASRModel) -> None:
    events, session = _run(model, _audio(14.0, seed=4), 3000, CAUSAL)
    emitted: list[str] = []
    for event in events:
        emitted += [w.text for w in event.new_words]
        # Whatever was emitted is a prefix of the final transcript.
        assert session.transcript.split()[: len(emitted)] == emitted


def test_speculative_off_gives_the_same_events(model: ASRModel) -> None:
    audio = _audio(8.0, seed=5)
    on, _ = _run(model, audio, 8000, CAUSAL)
    off, _ = _run(model, audio, 8000, replace(CAUSAL, speculative=False))
    strip = lambda events: [c[:-1] for c in _comparable(events)]  # stats differ by design
    assert strip(on) == strip(off)
    assert sum(e.stats.draft_tokens for e in on if e.stats) > 0
    assert sum(e.stats.draft_tokens for e in off if e.stats) == 0


def test_finished_session_refuses_audio(model: ASRModel) -> None:
    session = StreamingSession(model, CAUSAL)
    session.finish()
    with pytest.raises(RuntimeError, match="finished"):
        session.push_audio(np.zeros(160, dtype=np.float32))


def test_checkpoint_inside_a_segment_is_refused(model: ASRModel) -> None:
    session = StreamingSession(model, CAUSAL)
    session.push_audio(_audio(2.0))
    with pytest.raises(ValueError, match="segment boundary"):
        session.checkpoint()


def test_bf16_model_runs_the_whole_path_on_cpu(tiny_checkpoint: Path) -> None:
    """The dtype logic of the CUDA configuration (bf16 weights, fp32 features and softmax), exercised on the CPU."""
    import torch

    model = load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR, dtype=torch.bfloat16)
    for options in (CAUSAL, WINDOWED):
        events, session = _run(model, _audio(5.0, seed=6), 4000, options)
        assert events[-1].kind == "final" and session.token_ids
        assert all(e.stats.positions_forwarded > 0 for e in events if e.stats)


@pytest.mark.parametrize("blocks", [2, 3])
def test_decoding_every_few_blocks_loses_no_audio_and_stays_deterministic(model: ASRModel, blocks: int) -> None:
    options = replace(CAUSAL, blocks_per_update=blocks)
    audio = _audio(17.0, seed=7)
    events, session = _run(model, audio, 3000, options)
    updates = [e for e in events if e.kind == "update"]
    every_block, _ = _run(model, audio, 3000, CAUSAL)
    # Fewer decoder updates, but every encoded frame reaches one: the last update ends at the stream's end.
    assert len(updates) < sum(e.kind == "update" for e in every_block)
    assert updates[-1].audio_sec == pytest.approx(audio.size // 160 / 100)
    # Updates fall every `blocks` blocks unless a roll (cap 60 steps: 2 blocks fit) or the end forces one sooner.
    per_segment = {}
    for event in updates:
        per_segment.setdefault(event.segment_index, []).append(event.audio_sec)
    assert all(len(times) == 1 for times in list(per_segment.values())[:-1])
    # Deterministic whatever the chunking, and restorable at every roll.
    again, _ = _run(model, audio, [7000, 123, 16000], options)
    assert _comparable(again) == _comparable(events)
    roll = next(i for i, e in enumerate(events) if e.kind == "segment")
    restored = StreamingSession.restore(model, events[roll].checkpoint)
    rest = restored.push_audio(audio[checkpoint_offset(events[roll].checkpoint) :]) + restored.finish()
    assert _comparable(rest) == _comparable(events[roll + 1 :])


def test_blocks_per_update_must_be_positive() -> None:
    with pytest.raises(ValueError, match="blocks_per_update is 0"):
        SessionOptions(blocks_per_update=0)


def test_options_compose_and_round_trip_through_their_json_form() -> None:
    for options in (CAUSAL, WINDOWED, SessionOptions(), replace(CAUSAL, language=None, blocks_per_update=2)):
        assert SessionOptions.from_dict(json.loads(json.dumps(asdict(options)))) == options
    assert WINDOWED.decode.max_new_tokens == 12 and WINDOWED.decode.repetition_penalty == 1.0  # merged, not replaced
    assert not WINDOWED.segment.punctuation_rollover and WINDOWED.commit.stable_iterations == 2
    with pytest.raises(ValueError, match=r"session options.decode have no field 'max_tokens'"):
        SessionOptions().merged({"decode": {"max_tokens": 3}})
    with pytest.raises(ValueError, match="block_frames=100"):
        SessionOptions.from_dict({"encoder": {"block_frames": 100}})


def test_a_version_2_checkpoint_with_flat_options_still_restores(model: ASRModel) -> None:
    """Sessions saved before the options were nested resume after a rolling upgrade."""
    audio = _audio(12.0, seed=1)
    events, _ = _run(model, audio, 7000, CAUSAL)
    roll = next(i for i, e in enumerate(events) if e.kind == "segment")
    payload = json.loads(events[roll].checkpoint)
    nested = payload["options"]
    flat = {name: value for name, value in nested.items() if not isinstance(value, dict)}
    flat |= {
        "block_frames": nested["encoder"]["block_frames"],
        "max_new_tokens": nested["decode"]["max_new_tokens"],
        "repetition_penalty": nested["decode"]["repetition_penalty"],
        "no_repeat_ngram_size": nested["decode"]["no_repeat_ngram_size"],
        "hold_back_words": nested["commit"]["hold_back_words"],
        "stable_iterations": nested["commit"]["stable_iterations"],
        "segment_max_steps": nested["segment"]["segment_max_steps"],
        "segment_punct_min_steps": nested["segment"]["segment_punct_min_steps"],
        "punctuation_rollover": nested["segment"]["punctuation_rollover"],
        "windowed_update_frames": nested["window"]["update_frames"],
        "windowed_left_frames": nested["window"]["left_frames"],
        "windowed_right_frames": nested["window"]["right_frames"],
    }
    old = json.dumps(payload | {"version": 2, "options": flat}).encode()
    assert checkpoint_options(old) == CAUSAL
    restored = StreamingSession.restore(model, old)
    rest = restored.push_audio(audio[checkpoint_offset(old) :]) + restored.finish()
    assert _comparable(rest) == _comparable(events[roll + 1 :])


def test_the_frames_left_after_a_block_do_not_keep_the_block_alive(model: ASRModel) -> None:
    """After 1.5 blocks of audio one block is encoded; the rest of the pending mel is its own (smaller) storage,
    not a view that would hold the encoded block's frames until the next block."""
    session = StreamingSession(model, CAUSAL)
    block_samples = CAUSAL.encoder.block_frames * SAMPLE_RATE // 100
    session.push_audio(_audio(1.5 * block_samples / SAMPLE_RATE))
    assert session.blocks_encoded == 1
    pending = session.pending_mel
    assert 0 < pending.shape[0] < CAUSAL.encoder.block_frames
    assert pending.untyped_storage().nbytes() == pending.numel() * pending.element_size()
