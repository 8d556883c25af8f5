"""Live semantics of a session (issue 14): the voice gate and endpointing, Finalize, context, language, stability
and exact audio-time spans. The served path's plumbing of the same features is tested in tests/test_served.py."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.grpc_api import ResponseWriter
from pipeline.checkpoint import ASRModel
from pipeline.features import HOP_LENGTH
from pipeline.prompt import MAX_CONTEXT_TOKENS
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession, TranscriptEvent, checkpoint_offset
from pipeline.vad import VadState, load_silero_vad, score_streams
from pipeline.voice_gate import VadOptions
from tests.speech import synthesize
from tests.test_session import CAUSAL, SAMPLE_RATE, WINDOWED, _audio, _comparable, _run, model  # noqa: F401  (fixture)

GATED = replace(CAUSAL, vad=VadOptions(enabled=True))


def _noise(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (10 ** (dbfs / 20) * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def _speech(text: str = "the quick brown fox jumps over the lazy dog") -> np.ndarray:
    return synthesize(text)


def _kinds(events: list[TranscriptEvent], kind: str) -> list[TranscriptEvent]:
    return [e for e in events if e.kind == kind]


# ---------------------------------------------------------------------------------------------- the detector


def test_the_detector_equals_the_shipped_silero_model_batched_and_chunked() -> None:
    from silero_vad import load_silero_vad as load_shipped  # the package's TorchScript model (reference only)

    audio = np.concatenate([_noise(1.0, -50), _speech(), _noise(1.0, -50), _speech("hello again")])
    shipped = load_shipped()
    windows = audio.size // 512
    with torch.inference_mode():
        expected = np.array([float(shipped(torch.from_numpy(audio[k * 512 : (k + 1) * 512]), 16000)) for k in range(windows)])
    ours, states, got, position = load_silero_vad(), [VadState.initial(), VadState.initial()], [[], []], [0, 0]
    rng = np.random.default_rng(0)
    while min(position) < audio.size:  # two streams, pushed in different random chunks, one forward per window
        pcm = []
        for i in range(2):
            size = int(rng.integers(1, 4000))
            pcm.append(audio[position[i] : position[i] + size])
            position[i] += size
        scored = score_streams(ours, states, pcm)
        states = [state for state, _ in scored]
        for i, (_, speech) in enumerate(scored):
            got[i] += speech.tolist()
    for stream in got:
        np.testing.assert_allclose(stream[:windows], expected, atol=1e-4)
    assert (expected > 0.5).any() and (expected[: 16000 // 512] < 0.5).all()


# ---------------------------------------------------------------------------------------------- the gate


@pytest.mark.parametrize(
    "signal",
    [
        np.zeros(8 * SAMPLE_RATE, dtype=np.float32),
        _noise(8.0, -50),
        (0.1 * np.sin(2 * np.pi * 440 * np.arange(8 * SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32),
        np.where(np.arange(8 * SAMPLE_RATE) % 4000 == 0, 0.9, 0.0).astype(np.float32),
    ],
    ids=["digital-silence", "noise-50dBFS", "tone-440Hz", "clicks"],
)
def test_no_speech_means_no_text_and_no_model_work(model: ASRModel, signal: np.ndarray) -> None:
    events, session = _run(model, signal, 3000, GATED)
    assert session.transcript == "" and not _kinds(events, "update")
    assert session.blocks_encoded == 0 and session.blocks_skipped == -(-signal.size // HOP_LENGTH // 192)
    assert session.audio_sec == pytest.approx(signal.size / SAMPLE_RATE, abs=0.01)  # time still counts
    ungated, plain = _run(model, signal, 3000, CAUSAL)
    assert _kinds(ungated, "update") and plain.blocks_encoded > 0  # what the gate saves


def test_an_utterance_ends_at_a_pause_and_the_next_starts_fresh(model: ASRModel) -> None:
    first, second = _speech(), _speech("hello again my friend")
    pause = _noise(4.0, -50, seed=1)
    audio = np.concatenate([_noise(1.0, -50), first, pause, second, _noise(2.0, -50, seed=2)])
    events, session = _run(model, audio, 4000, GATED)
    kinds = [e.kind for e in events]
    begins, ends = _kinds(events, "speech_begin"), _kinds(events, "speech_end")
    assert len(begins) == len(ends) == 2, kinds
    ends_of_utterances = [e for e in events if e.kind == "segment" and e.reason == "utterance_end"]
    assert len(ends_of_utterances) == 2
    onset_2 = (SAMPLE_RATE + first.size + pause.size)
    # Boundaries are exact stream samples, within a detector window (32 ms) and the block they fall in.
    assert begins[0].span[0] <= SAMPLE_RATE + 512 * 4 and abs(begins[1].span[0] - onset_2) <= 2 * 192 * HOP_LENGTH
    # No model work inside the pause: no update decodes audio there, and the second utterance is a new segment.
    pause_blocks = [(e.span[0], e.span[1]) for e in _kinds(events, "update") if ends[0].span[0] + 1 * SAMPLE_RATE < e.span[0] < onset_2 - 2 * 192 * HOP_LENGTH]
    assert pause_blocks == []
    assert begins[1].segment_index > begins[0].segment_index
    assert session.blocks_skipped > 0


def test_gated_output_does_not_depend_on_chunking_and_restores_from_every_roll(model: ASRModel) -> None:
    audio = np.concatenate([_noise(2.5, -50), _speech(), _noise(3.0, -50, seed=3), _speech("one two three")])
    whole, _ = _run(model, audio, audio.size, GATED)
    for chunking in (1600, [1, 7000, 333, 16000]):
        events, _ = _run(model, audio, chunking, GATED)
        assert _comparable(events) == _comparable(whole)
    rolls = [i for i, e in enumerate(whole) if e.kind == "segment"]
    assert rolls
    for roll in rolls:
        restored = StreamingSession.restore(model, whole[roll].checkpoint)
        rest = restored.push_audio(audio[checkpoint_offset(whole[roll].checkpoint) :]) + restored.finish()
        assert _comparable(rest) == _comparable(whole[roll + 1 :])


def test_an_hour_of_audio_keeps_exact_sample_times(model: ASRModel) -> None:
    """60 minutes of near-silence, then speech: its boundary lands on the exact stream sample (no drift)."""
    options = replace(GATED, encoder=replace(GATED.encoder, block_frames=192))
    session = StreamingSession(model, options)
    quiet, events = _noise(60.0, -60, seed=4), []
    for _ in range(60):
        events += session.push_audio(quiet)
    onset = session.sample_offset
    events += session.push_audio(_speech()) + session.finish()
    assert _kinds(events, "speech_begin")[0].span[0] - onset in range(0, 4 * 512)
    assert session.blocks_encoded <= 6 and session.audio_sec == pytest.approx(onset / SAMPLE_RATE + 2.5, abs=1.0)
    updates = _kinds(events, "update")
    assert all(e.span[0] % HOP_LENGTH == 0 and e.span[1] - e.span[0] <= 192 * HOP_LENGTH for e in updates)


# ---------------------------------------------------------------------------------------------- Finalize


def test_finalize_commits_the_tail_now_and_the_stream_goes_on(model: ASRModel) -> None:
    audio = _audio(9.0, seed=5)
    session, events = StreamingSession(model, CAUSAL), []
    events += session.push_audio(audio[: 3 * SAMPLE_RATE + 1234])
    finalized = session.finalize_now()
    roll = finalized[-1]
    assert roll.kind == "segment" and roll.reason == "finalize" and roll.tentative == ""
    assert roll.span[1] == session.frames_encoded * HOP_LENGTH  # the whole audio so far, short last block included
    assert session.transcript == session.committer.committed_text  # nothing left uncommitted
    assert session.finalize_now() == []  # nothing new to finalize
    events += finalized + session.push_audio(audio[3 * SAMPLE_RATE + 1234 :]) + session.finish()
    assert events[-1].kind == "final" and session.transcript == " ".join(w.text for e in events for w in e.new_words)
    restored = StreamingSession.restore(model, roll.checkpoint)  # a Finalize is a durable boundary like any roll
    rest = restored.push_audio(audio[checkpoint_offset(roll.checkpoint) :]) + restored.finish()
    after = events[events.index(roll) + 1 :]
    assert _comparable(rest) == _comparable(after)


# ---------------------------------------------------------------------------------------------- context


def test_context_changes_at_the_next_segment_and_is_bounded(model: ASRModel) -> None:
    session = StreamingSession(model, CAUSAL)
    assert session.update_context("Qwen, Kubernetes") == 0  # no audio yet: at once
    assert session.options.context == "Qwen, Kubernetes"
    events = session.push_audio(_audio(3.0, seed=6))
    head = session.prompt.head_ids
    assert session.update_context("KubeRay") == session.segment_index + 1
    assert session.prompt.head_ids == head  # the current segment keeps its prompt
    events += session.push_audio(_audio(6.0, seed=7))
    roll = next(e for e in events if e.kind == "segment")
    assert session.options.context == "KubeRay" and session.prompt.head_ids != head
    assert StreamingSession.restore(model, roll.checkpoint).options.context == "KubeRay"
    with pytest.raises(ValueError, match=f"expected at most {MAX_CONTEXT_TOKENS}"):
        session.update_context("names " * 200)


def test_context_reaches_the_decoder(model: ASRModel) -> None:
    audio = _audio(4.0, seed=8)
    plain, _ = _run(model, audio, audio.size, CAUSAL)
    biased, _ = _run(model, audio, audio.size, replace(CAUSAL, context="Zanzibar Quetzalcoatl"))
    assert [e.hypothesis for e in plain] != [e.hypothesis for e in biased]


# ---------------------------------------------------------------------------------------------- language


def test_an_untrained_language_is_refused_in_causal_mode_unless_allowed() -> None:
    with pytest.raises(ValueError, match="language 'French': the causal tower was distilled on English only"):
        SessionOptions(language="fr")
    assert SessionOptions.windowed(language="fr").untrained_language is None
    assert SessionOptions(language=None).untrained_language is None  # the model picks: not refused
    assert SessionOptions(language="fr", allow_untrained_language=True).untrained_language == "French"


def test_an_allowed_untrained_language_carries_a_warning(model: ASRModel) -> None:
    session = StreamingSession(model, replace(CAUSAL, language="German", allow_untrained_language=True))
    assert session.warnings == ["language German: the causal tower was distilled on English only; expect lower accuracy"]
    assert StreamingSession(model, CAUSAL).warnings == []


# ---------------------------------------------------------------------------------------------- stability, spans


def test_updates_carry_stability_and_contiguous_exact_spans(model: ASRModel) -> None:
    events, session = _run(model, _audio(12.0, seed=9), 5000, CAUSAL)
    updates = _kinds(events, "update")
    for event in updates:
        assert len(event.stability) == len(event.tentative.split()) and all(age >= 1 for age in event.stability)
    assert any(max(e.stability, default=0) > 1 for e in updates)
    spans = [e.span for e in updates]
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    segments = [e.span for e in events if e.kind == "segment"]
    assert segments[0][0] == 0 and all(a[1] == b[0] for a, b in zip(segments, segments[1:]))


# ---------------------------------------------------------------------------------------------- the contract


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [_speech("hello there"), _speech("the quick brown fox"), _speech("seven eight nine ten")]


def _feed(session: StreamingSession, audio: np.ndarray, cuts: list[int], finalize_at: set[int], start: int = 0) -> list[TranscriptEvent]:
    """Push `audio[start:]` in pieces ending at `cuts` (absolute samples), `finalize_now` after those in
    `finalize_at`, then finish. A session resumed at a Finalize's sample gets the Finalize again first: it may
    have been taken before it, and a second one with nothing to finalize does nothing (the client library
    re-sends controls at its resume point for this)."""
    events = session.finalize_now() if start in finalize_at else []
    for end in [cut for cut in cuts if cut > start] + [audio.size]:
        events += session.push_audio(audio[start:end])
        if end in finalize_at:
            events += session.finalize_now()
        start = end
    return events + session.finish()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(st.tuples(st.sampled_from(["speech", "noise", "silence"]), st.integers(0, 2), st.floats(0.2, 2.5)), min_size=1, max_size=5),
    cut_fractions=st.lists(st.floats(0.0, 1.0), max_size=8),
    finalize_picks=st.lists(st.integers(0, 7), max_size=2),
    gate=st.booleans(),
    block_frames=st.sampled_from([96, 192]),
)
def test_results_contract(model: ASRModel, clips: list[np.ndarray], pieces, cut_fractions, finalize_picks, gate, block_frames) -> None:  # noqa: ANN001
    """Over random audio, chunkings, Finalize points and options: committed words carry contiguous indices and
    never change, their concatenation is the transcript, the interim's stability has one entry per interim
    word, spans are exact and ordered, and a session restored at any roll re-emits the same words with the
    same indices."""
    parts = []
    for kind, which, seconds in pieces:
        if kind == "speech":
            parts.append(clips[which])
        else:
            parts.append(_noise(seconds, -50, seed=which) if kind == "noise" else np.zeros(int(seconds * SAMPLE_RATE), np.float32))
    audio = np.concatenate(parts)
    cuts = sorted({int(f * audio.size) for f in cut_fractions} - {0, audio.size})
    finalize_at = {cuts[i] for i in finalize_picks if i < len(cuts)}
    options = replace(CAUSAL, encoder=replace(CAUSAL.encoder, block_frames=block_frames), vad=VadOptions(enabled=gate))
    events = _feed(StreamingSession(model, options), audio, cuts, finalize_at)

    writer = ResponseWriter()
    words = [w for e in events for w in writer.response(e).result.committed] if events else []
    assert [w.index for w in words] == list(range(len(words)))
    assert events[-1].kind == "final" and events[-1].transcript == " ".join(w.text for w in words)
    for before, event in zip(events, events[1:]):
        assert event.transcript.startswith(before.transcript)  # append-only
    updates = [e for e in events if e.kind == "update"]
    for event in updates:
        assert len(event.stability) == len(event.tentative.split())
    spans = [e.span for e in updates if e.span is not None]
    assert all(a[1] <= b[0] and a[0] % HOP_LENGTH == 0 for a, b in zip(spans, spans[1:]))
    for roll in (i for i, e in enumerate(events) if e.checkpoint is not None):
        checkpoint = events[roll].checkpoint
        restored = StreamingSession.restore(model, checkpoint)
        rest = _feed(restored, audio, cuts, finalize_at, start=checkpoint_offset(checkpoint))
        assert _comparable(rest) == _comparable(events[roll + 1 :])
        before = sum(len(e.new_words) for e in events[: roll + 1])
        rewriter = ResponseWriter(next_index=before)
        again = [w for e in rest for w in rewriter.response(e).result.committed]
        assert [(w.index, w.text) for w in again] == [(w.index, w.text) for w in words[before:]]


def test_gate_bench_counts_the_work_it_saves(model: ASRModel) -> None:
    from pipeline.bench_vad import format_gate_bench, run_gate_bench

    audio = np.concatenate([_speech(), _noise(4.0, -50), _speech("one more time")])
    off, on = run_gate_bench(model, audio, CAUSAL)
    assert (off.gate, on.gate) == (False, True) and off.blocks_skipped == 0
    assert on.blocks_encoded + on.blocks_skipped == off.blocks_encoded and on.blocks_skipped >= 1
    assert on.updates < off.updates and on.detector_seconds > 0
    assert "| on |" in format_gate_bench([off, on], audio.size / SAMPLE_RATE)


# ---------------------------------------------------------------------------------------------- confidence


@pytest.mark.parametrize("options", [CAUSAL, WINDOWED], ids=["causal", "windowed"])
def test_committed_words_carry_the_confidence_of_their_tokens(model: ASRModel, options: SessionOptions) -> None:
    events, session = _run(model, _audio(9.0, seed=11), 4000, options)
    words = [w for e in events for w in e.new_words]
    assert words and all(w.confidence is None or 0.0 < w.confidence <= 1.0 for w in words)
    assert sum(w.confidence is not None for w in words) >= len(words) // 2
    # The decoder's per-token log-probabilities are those of greedy decoding from scratch (the speculative pass
    # and the sequential steps score the same tokens alike).
    updates = [e for e in events if e.kind == "update"]
    assert updates and all(e.stats is not None for e in updates)
    response = ResponseWriter().response(next(e for e in events if e.new_words)).result
    assert all(word.HasField("confidence") == (source.confidence is not None)
               for word, source in zip(response.committed, next(e for e in events if e.new_words).new_words))  # fmt: skip


def test_word_confidence_groups_tokens_at_word_starts(model: ASRModel) -> None:
    from pipeline.prompt import word_confidences

    tokenizer, special = model.tokenizer, StreamingSession(model, CAUSAL).prompt.special
    ids = tokenizer.encode(" hello wor ld", add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    logprobs = [math.log(0.5)] * len(ids)
    confidences = word_confidences(tokenizer, ids, logprobs, special, ["hello", "wor", "ld"])
    assert confidences == pytest.approx((0.5, 0.5, 0.5)) and len(pieces) >= 3
    assert word_confidences(tokenizer, ids, logprobs, special, ["hello", "world"]) == (None, None)
    with_preamble = [*tokenizer.encode("language English", add_special_tokens=False), special.asr_text, *ids]
    scores = [math.log(0.9)] * (len(with_preamble) - len(ids)) + logprobs
    assert word_confidences(tokenizer, with_preamble, scores, special, ["hello", "wor", "ld"]) == pytest.approx((0.5,) * 3)


def _grouped_by_pieces(tokenizer, token_ids: list[int], logprobs: list[float], asr_text: int) -> list[float]:
    """The word grouping spelled out from the tokenizer's pieces: a word starts at a piece marked with leading
    whitespace or after a whitespace-only piece; special ids are left out."""
    start = token_ids.index(asr_text) + 1 if asr_text in token_ids else 0
    special_ids = set(tokenizer.all_special_ids)
    groups: list[list[float]] = []
    new_word = True
    for token_id, score in zip(token_ids[start:], logprobs[start:]):
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if not piece or token_id in special_ids:
            continue
        text = piece.lstrip("\u0120\u010a\u0109")
        if not text:
            new_word = True
        elif new_word or text != piece:
            groups.append([score])
            new_word = False
        else:
            groups[-1].append(score)
    return [math.exp(sum(group) / len(group)) for group in groups]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_word_confidences_match_the_tokenizers_pieces(model: ASRModel, data: st.DataObject) -> None:
    from pipeline.prompt import word_confidences

    tokenizer, special = model.tokenizer, StreamingSession(model, CAUSAL).prompt.special
    token_ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=40))
    logprobs = data.draw(st.lists(st.floats(-20.0, 0.0), min_size=len(token_ids), max_size=len(token_ids)))
    expected = _grouped_by_pieces(tokenizer, token_ids, logprobs, special.asr_text)
    assert word_confidences(tokenizer, token_ids, logprobs, special, ["w"] * len(expected)) == tuple(expected)
    assert word_confidences(tokenizer, token_ids, logprobs, special, ["w"] * (len(expected) + 1)) == (None,) * (
        len(expected) + 1
    )
