"""Many streams in one engine: every stream's events equal the single-stream session's; admission by slots."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoint import ASRModel, load_model
from pipeline.commit import SegmentOptions
from pipeline.decoding import DecodeOptions
from pipeline.engine import AsyncStreamingEngine, EngineAtCapacity, EngineFailed, EngineOptions, StreamingEngine
from pipeline.kv_pool import EncoderKVPool
from pipeline.rolling import RollingDecoder
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession, TranscriptEvent
from pipeline.stages import FeatureRequest, FeatureResult, FeatureStage
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR
from tests.test_session import CAUSAL, SAMPLE_RATE, _audio, _comparable


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> ASRModel:
    return load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR)


@dataclass(frozen=True)
class StreamPlan:
    """One synthetic stream: its audio, the step it opens at, and how much audio arrives per step."""

    audio: np.ndarray
    open_step: int
    samples_per_step: int


def _plans(count: int) -> list[StreamPlan]:
    """Streams of 3-20 s opening at different steps; some arrive slower than a block per step, some faster
    (a backlog then drains one block per step after the end is signalled)."""
    plans = []
    for index in range(count):
        seconds = 20.0 - (index * 7.3) % 17.0
        per_step = (0.6, 1.3, 2.5, 4.1)[index % 4]
        audio = _audio(seconds, seed=100 + index)
        plans.append(StreamPlan(audio, open_step=(index * 5) % 9, samples_per_step=int(per_step * SAMPLE_RATE)))
    return plans


def _single_stream_events(model: ASRModel, audio: np.ndarray, options: SessionOptions) -> list[TranscriptEvent]:
    session = StreamingSession(model, options)
    return session.push_audio(audio) + session.finish()


def _engine_events(engine: StreamingEngine, plans: list[StreamPlan]) -> dict[str, list[TranscriptEvent]]:
    """Drive the engine: each step, open due streams, push one chunk per open stream (or finish it), then step."""
    events: dict[str, list[TranscriptEvent]] = {}
    pushed = {str(index): 0 for index in range(len(plans))}
    finished: set[str] = set()
    step = 0
    while step <= max(plan.open_step for plan in plans) or engine.active_streams:
        for index, plan in enumerate(plans):
            stream_id = str(index)
            if plan.open_step == step:
                engine.open_stream(stream_id)
                events[stream_id] = []
            if stream_id not in events or stream_id in finished:
                continue
            start = pushed[stream_id]
            if start < plan.audio.size:
                engine.push_audio(stream_id, plan.audio[start : start + plan.samples_per_step])
                pushed[stream_id] = start + plan.samples_per_step
            else:
                engine.finish_stream(stream_id)
                finished.add(stream_id)
        for stream_id, new_events in engine.step().items():
            events[stream_id] += new_events
        step += 1
        assert step < 1000, "the engine stopped making progress"
    return events


@pytest.mark.parametrize(
    "count, decode_step", [(1, "dynamic"), (1, "static"), (4, "dynamic"), (4, "static"), (12, "static"), (32, "dynamic"), (32, "static")]
)
def test_every_stream_gets_the_single_stream_events(
    model: ASRModel, count: int, decode_step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_sizes: dict[str, list[int]] = {"encoder": [], "decoder": []}

    def recorded(name: str, method, per_stream_arg: int):  # noqa: ANN001, ANN202 - a spy around the batched forwards
        def call(self, *args):  # noqa: ANN001, ANN202
            batch_sizes[name].append(len(args[per_stream_arg]))  # this argument has one entry per stream
            return method(self, *args)

        return call

    monkeypatch.setattr(EncoderKVPool, "encode_blocks", recorded("encoder", EncoderKVPool.encode_blocks, 1))
    monkeypatch.setattr(RollingDecoder, "update", recorded("decoder", RollingDecoder.update, 0))
    plans = _plans(count)
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=count, decode_step=decode_step))
    events = _engine_events(engine, plans)
    assert engine.free_slots == count
    # Each block went through one encoder and one decoder call shared by all streams ready at that step.
    sizes = list(batch_sizes["encoder"])
    assert sizes == batch_sizes["decoder"]
    assert sum(sizes) == sum(event.kind == "update" for stream_events in events.values() for event in stream_events)
    assert max(sizes) == 1 if count == 1 else max(sizes) > 2
    for index, plan in enumerate(plans):
        expected = _single_stream_events(model, plan.audio, CAUSAL)
        assert _comparable(events[str(index)]) == _comparable(expected), f"stream {index}"
    kinds = [event.kind for stream_events in events.values() for event in stream_events]
    assert "segment" in kinds and kinds.count("final") == count


def test_streams_with_different_decoder_settings_share_steps(model: ASRModel) -> None:
    plans = _plans(3)
    other = replace(CAUSAL, speculative=False, decode=DecodeOptions(max_new_tokens=5))
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=3))
    engine.open_stream("odd", other)
    engine.push_audio("odd", plans[0].audio)
    engine.finish_stream("odd")
    engine.open_stream("even")
    engine.push_audio("even", plans[1].audio)
    engine.finish_stream("even")
    events: dict[str, list[TranscriptEvent]] = {"odd": [], "even": []}
    while engine.has_work:
        for stream_id, new_events in engine.step().items():
            events[stream_id] += new_events
    assert _comparable(events["odd"]) == _comparable(_single_stream_events(model, plans[0].audio, other))
    assert _comparable(events["even"]) == _comparable(_single_stream_events(model, plans[1].audio, CAUSAL))
    assert engine.active_streams == []


def test_admission_is_refused_at_capacity_and_slots_are_reused(model: ASRModel) -> None:
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=2))
    engine.open_stream("a")
    engine.open_stream("b")
    with pytest.raises(EngineAtCapacity, match="all 2 stream slots"):
        engine.open_stream("c")
    with pytest.raises(ValueError, match="already open"):
        engine.open_stream("a")
    engine.push_audio("a", _audio(0.5))
    engine.finish_stream("a")
    events = engine.step()
    assert [event.kind for event in events["a"]] == ["update", "final"]
    assert engine.active_streams == ["b"] and engine.free_slots == 1
    engine.open_stream("c")  # the finished stream's slot
    with pytest.raises(KeyError, match="no open stream 'a'"):
        engine.push_audio("a", _audio(0.5))


def test_bad_requests_get_clear_errors(model: ASRModel) -> None:
    with pytest.raises(ValueError, match="'windowed'"):
        StreamingEngine(model, SessionOptions.windowed())
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=1))
    with pytest.raises(ValueError, match="'windowed'"):
        engine.open_stream("w", SessionOptions.windowed())
    engine.open_stream("a")
    engine.finish_stream("a")
    with pytest.raises(RuntimeError, match="end of the stream"):
        engine.push_audio("a", _audio(0.5))
    assert engine.has_work
    assert [event.kind for event in engine.step()["a"]] == ["final"]
    assert not engine.has_work


def test_streams_queued_for_slots_reuse_them_and_stay_exact(model: ASRModel) -> None:
    # 6 streams through 3 slots: a stream is admitted when a slot frees, into memory a finished stream used.
    plans = _plans(6)
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=3))
    waiting = list(range(len(plans)))
    events: dict[str, list[TranscriptEvent]] = {}
    slots_used: dict[str, int] = {}
    while waiting or engine.active_streams:
        while waiting:
            stream_id = str(waiting[0])
            try:
                engine.open_stream(stream_id)
            except EngineAtCapacity:
                break
            waiting.pop(0)
            plan = plans[int(stream_id)]
            engine.push_audio(stream_id, plan.audio)
            engine.finish_stream(stream_id)
            events[stream_id] = []
        for stream_id, new_events in engine.step().items():
            events[stream_id] += new_events
        for stream_id in engine.active_streams:  # the caches write into their slots; nothing was reallocated
            slot, state = engine.decoder.slot_of(stream_id), engine.decoder.state_of(stream_id)
            if slot is None:  # admitted while another stream stepped: its first block is still in the front end
                continue
            slots_used.setdefault(stream_id, slot)
            if state is not None and state.cache.length:
                assert state.cache.layer(0)[0].data_ptr() == engine.decoder.pool.keys[0, slot].data_ptr()
    assert sorted(set(slots_used.values())) == [0, 1, 2]  # six streams, three slots: each slot reused
    for index, plan in enumerate(plans):
        assert _comparable(events[str(index)]) == _comparable(_single_stream_events(model, plan.audio, CAUSAL))


def test_a_stream_that_needs_longer_slots_is_refused(model: ASRModel) -> None:
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=2))
    longer = replace(CAUSAL, decode=DecodeOptions(max_new_tokens=64))
    with pytest.raises(ValueError, match="decoder positions per segment"):
        engine.open_stream("long", longer)
    assert engine.free_slots == 2
    roomy = StreamingEngine(
        model, CAUSAL, EngineOptions(max_streams=1, decoder_capacity=engine.decoder.capacity + 52)
    )
    roomy.open_stream("long", longer)


def test_closing_a_stream_frees_its_slot(model: ASRModel) -> None:
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=1))
    engine.open_stream("a")
    engine.push_audio("a", _audio(2.5))
    assert engine.step()["a"][0].kind == "update"
    engine.close_stream("a")
    assert engine.free_slots == 1 and engine.step() == {}
    engine.open_stream("b")


async def _stream_through(front: AsyncStreamingEngine, stream_id: str, audio: np.ndarray) -> list[TranscriptEvent]:
    """A client of an open stream: push its audio in 9000-sample chunks, finish it, and collect its events."""
    received: list[TranscriptEvent] = []

    async def read() -> None:
        async for event in front.events(stream_id):
            received.append(event)

    reader = asyncio.create_task(read())
    for start in range(0, audio.size, 9000):
        await front.push_audio(stream_id, audio[start : start + 9000])
    await front.finish_stream(stream_id)
    await reader
    return received


def test_async_engine_serves_concurrent_clients(model: ASRModel) -> None:
    plans = _plans(3)

    async def serve() -> list[list[TranscriptEvent]]:
        engine = AsyncStreamingEngine(StreamingEngine(model, CAUSAL, EngineOptions(max_streams=3)))
        driver = asyncio.create_task(engine.run())

        async def client(stream_id: str, audio: np.ndarray) -> list[TranscriptEvent]:
            await engine.open_stream(stream_id)
            return await _stream_through(engine, stream_id, audio)

        results = await asyncio.gather(*(client(str(i), plan.audio) for i, plan in enumerate(plans)))
        for stream_id in "abc":
            await engine.open_stream(stream_id)
        with pytest.raises(EngineAtCapacity):
            await engine.open_stream("d")
        with pytest.raises(KeyError, match="no open stream 'd'"):
            await engine.push_audio("d", _audio(0.1))
        await engine.close_stream("a")
        assert [event async for event in engine.events("a")] == []
        await engine.open_stream("d")
        driver.cancel()
        return results

    results = asyncio.run(serve())
    for plan, received in zip(plans, results):
        assert _comparable(received) == _comparable(_single_stream_events(model, plan.audio, CAUSAL))


class _RecordingFeatureStage(FeatureStage):
    """The real front end, noting the thread and the number of streams of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []  # (thread ident, requests)

    def extract(self, requests: Sequence[FeatureRequest]) -> list[FeatureResult]:
        self.calls.append((threading.get_ident(), len(requests)))
        return super().extract(requests)


def test_the_front_end_runs_in_the_step_batched_not_on_the_driver_thread(model: ASRModel) -> None:
    """Pushing audio only holds it (checked at once); the log-mel of every stream whose audio completes a block
    runs inside `step`, one call for all of them, in the async engine's worker thread, and events stay exact."""
    plans = _plans(3)
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=3))
    engine.features = recorder = _RecordingFeatureStage()
    front = AsyncStreamingEngine(engine)

    async def serve() -> tuple[int, list[list[TranscriptEvent]]]:
        driver = asyncio.create_task(front.run())
        for stream_id in map(str, range(len(plans))):
            await front.open_stream(stream_id)
        with pytest.raises(TypeError, match="float32"):
            await front.push_audio("0", np.zeros(100, dtype=np.float64))
        with pytest.raises(ValueError, match="stream sample 7"):
            await front.push_audio("0", np.array([0.0] * 7 + [np.nan], dtype=np.float32))

        results = await asyncio.gather(*(_stream_through(front, str(i), plan.audio) for i, plan in enumerate(plans)))
        driver.cancel()
        return threading.get_ident(), results

    loop_thread, results = asyncio.run(serve())
    for plan, received in zip(plans, results):
        assert _comparable(received) == _comparable(_single_stream_events(model, plan.audio, CAUSAL))
    assert recorder.calls and all(thread != loop_thread for thread, _ in recorder.calls)
    assert max(streams for _, streams in recorder.calls) > 1  # streams' blocks share a call
    # One call per block of each stream at most (audio is held until it completes a block), plus the ends.
    blocks = sum(plan.audio.size // (CAUSAL.encoder.block_frames * SAMPLE_RATE // 100) + 1 for plan in plans)
    assert sum(streams for _, streams in recorder.calls) <= blocks


def test_a_step_with_blocks_to_work_on_extracts_the_next_ones_on_the_front_end_thread(model: ASRModel) -> None:
    """Stream a has a block ready; stream b's held audio completes one: the step advances a while b's front end
    runs on the engine's front-end thread, and the next step takes b's block. Audio in flight is not in b's
    `sample_offset` yet (a checkpoint taken meanwhile leaves it to the replay). Both streams stay exact."""
    block = CAUSAL.encoder.block_frames * SAMPLE_RATE // 100
    audio = {"a": _audio(6.0, seed=7), "b": _audio(6.0, seed=8)}
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=2))
    engine.features = recorder = _RecordingFeatureStage()
    events: dict[str, list[TranscriptEvent]] = {"a": [], "b": []}
    for stream_id in audio:
        engine.open_stream(stream_id)
    engine.push_audio("a", audio["a"][: 2 * block + 500])
    for stream_id, new in engine.step().items():  # a's front end, here (nothing else to do), and a's first block
        events[stream_id] += new
    assert engine.session("a").whole_blocks_buffered == 1
    engine.push_audio("b", audio["b"][: block + 500])
    first = engine.step()  # a's second block; b's front end in the background
    assert "b" not in first and engine.last_step_timing.streams == 1
    assert engine.session("b").sample_offset == 0 and engine.has_work
    assert threading.current_thread().ident != recorder.calls[-1][0]
    second = engine.step()  # takes b's frames and advances b
    assert "b" in second and engine.last_step_timing.streams == 1
    for stream_id, new in [*first.items(), *second.items()]:
        events[stream_id] += new
    _finish_and_compare(model, engine, audio, {"a": 2 * block + 500, "b": block + 500}, events)


def test_a_step_with_nothing_else_to_do_splits_its_front_end_between_the_driver_and_the_front_end_thread(
    model: ASRModel,
) -> None:
    """Four streams' held audio completes a block and nothing else is ready: the step extracts two streams on its
    own thread and two on the front-end thread at the same time, then advances all four, exactly."""
    block = CAUSAL.encoder.block_frames * SAMPLE_RATE // 100
    audio = {str(i): _audio(4.0, seed=20 + i) for i in range(4)}
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=4))
    engine.features = recorder = _RecordingFeatureStage()
    events: dict[str, list[TranscriptEvent]] = {stream_id: [] for stream_id in audio}
    for stream_id, samples in audio.items():
        engine.open_stream(stream_id)
        engine.push_audio(stream_id, samples[: block + 500])
    for stream_id, new in engine.step().items():
        events[stream_id] += new
    assert engine.last_step_timing.streams == 4
    assert sorted(streams for _, streams in recorder.calls) == [2, 2]
    assert {thread for thread, _ in recorder.calls} - {threading.get_ident()}  # one part off the driver's thread
    assert threading.get_ident() in {thread for thread, _ in recorder.calls}
    _finish_and_compare(model, engine, audio, dict.fromkeys(audio, block + 500), events)


def _finish_and_compare(
    model: ASRModel,
    engine: StreamingEngine,
    audio: dict[str, np.ndarray],
    sent: dict[str, int],
    events: dict[str, list[TranscriptEvent]],
) -> None:
    """Push each stream's audio after its first `sent` samples, end it, step until every stream is final, and
    check each stream's events (`events` holds those so far) against its single-stream session's."""
    for stream_id, samples in audio.items():
        engine.push_audio(stream_id, samples[sent[stream_id] :])
        engine.finish_stream(stream_id)
    while engine.active_streams:
        for stream_id, new in engine.step().items():
            events[stream_id] += new
    for stream_id, samples in audio.items():
        assert _comparable(events[stream_id]) == _comparable(_single_stream_events(model, samples, CAUSAL))


def test_streams_decoding_every_few_blocks_match_their_sessions(model: ASRModel) -> None:
    """Streams that hold encoded blocks for a later decoder update share steps with every-block streams."""
    plans = _plans(4)
    slow = replace(CAUSAL, blocks_per_update=2, segment=SegmentOptions(segment_max_steps=100, segment_punct_min_steps=80))
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=4, decoder_capacity=400))
    events: dict[str, list[TranscriptEvent]] = {}
    for index, plan in enumerate(plans):
        stream_id = str(index)
        engine.open_stream(stream_id, slow if index % 2 else None)
        engine.push_audio(stream_id, plan.audio)
        engine.finish_stream(stream_id)
        events[stream_id] = []
    while engine.has_work:
        for stream_id, new_events in engine.step().items():
            events[stream_id] += new_events
    for index, plan in enumerate(plans):
        expected = _single_stream_events(model, plan.audio, slow if index % 2 else CAUSAL)
        assert _comparable(events[str(index)]) == _comparable(expected), f"stream {index}"


def test_streams_restored_from_roll_checkpoints_continue_exactly(model: ASRModel) -> None:
    """Streams move between engines at segment rolls (as replicas hand sessions over): the new engine, with other
    streams in its other slots, produces exactly the events the stream would have produced where it was."""
    plans = _plans(3)
    original = {str(i): _single_stream_events(model, plan.audio, CAUSAL) for i, plan in enumerate(plans)}
    target = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=4))
    target.open_stream("resident")  # keeps slot 0 busy, so the restored streams land in other slots
    target.push_audio("resident", plans[0].audio)
    events: dict[str, list[TranscriptEvent]] = {"resident": []}
    expected = {}
    for stream_id, stream_events in original.items():
        roll = [i for i, e in enumerate(stream_events) if e.kind == "segment"][int(stream_id) % 2]
        offset = target.restore_stream(stream_id, stream_events[roll].checkpoint)
        rest = plans[int(stream_id)].audio[offset:]
        if rest.size:  # a roll during the end-of-stream flush leaves no audio to replay
            target.push_audio(stream_id, rest)
        target.finish_stream(stream_id)
        events[stream_id], expected[stream_id] = [], stream_events[roll + 1 :]
    target.finish_stream("resident")
    while target.has_work:
        for stream_id, new_events in target.step().items():
            events[stream_id] += new_events
    for stream_id, want in expected.items():
        assert _comparable(events[stream_id]) == _comparable(want), f"stream {stream_id}"
    assert _comparable(events["resident"]) == _comparable(original["0"])
    with pytest.raises(ValueError, match="checkpoint version"):
        target.restore_stream("bad", b'{"version": 0}')
    assert target.free_slots == 4


def test_async_clients_hear_an_engine_failure_instead_of_waiting_forever(
    model: ASRModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=2))

    def broken_step() -> dict[str, list[TranscriptEvent]]:
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "step", broken_step)

    async def serve() -> None:
        front = AsyncStreamingEngine(engine)
        driver = asyncio.create_task(front.run())
        await front.open_stream("a")
        await front.push_audio("a", _audio(2.5))
        with pytest.raises(EngineFailed, match="device lost"):
            async for _ in front.events("a"):
                pass
        with pytest.raises(RuntimeError, match="device lost"):
            await driver
        with pytest.raises(EngineFailed, match="device lost"):
            await front.open_stream("b")

    asyncio.run(asyncio.wait_for(serve(), timeout=60))


def test_bf16_engine_with_static_steps_matches_bf16_sessions(tiny_checkpoint: Path) -> None:
    """The CUDA configuration's dtype logic (bf16 pools, static steps into the scratch column), on the CPU."""
    model = load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR, dtype=torch.bfloat16)
    plans = _plans(4)
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=4, decode_step="static"))
    assert engine.decoder.pool.keys.dtype == torch.bfloat16
    events = _engine_events(engine, plans)
    for index, plan in enumerate(plans):
        assert _comparable(events[str(index)]) == _comparable(_single_stream_events(model, plan.audio, CAUSAL))


def _drain(engine: StreamingEngine, audio: dict[str, np.ndarray]) -> dict[str, list[TranscriptEvent]]:
    """Open every stream with all its audio buffered and its end signalled, then step until all are final."""
    events: dict[str, list[TranscriptEvent]] = {}
    for stream_id, samples in audio.items():
        engine.open_stream(stream_id)
        engine.push_audio(stream_id, samples)
        engine.finish_stream(stream_id)
        events[stream_id] = []
    while engine.has_work:
        for stream_id, new_events in engine.step().items():
            events[stream_id] += new_events
    return events


def test_lagging_streams_catch_up_with_one_update_per_step(model: ASRModel) -> None:
    """A stream with its whole audio buffered is as far behind as can be: with catch_up_blocks = 3 each step
    encodes up to three of its blocks and decodes once, which is the session's `blocks_per_update = 3` schedule
    (rolls and the end still force their updates), with every block's audio decoded. (Whole blocks of audio: a
    short last block is decoded on its own, where the session would hold the block before it.)"""
    block = CAUSAL.encoder.block_frames * SAMPLE_RATE // 100
    audio = {str(i): plan.audio[: plan.audio.size // block * block] for i, plan in enumerate(_plans(3))}
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=3, catch_up_blocks=3))
    events = _drain(engine, audio)
    every_third = replace(CAUSAL, blocks_per_update=3)

    def untimed(stream_events: list[TranscriptEvent]) -> list[tuple]:
        # Word times are estimates from each stream's own update interval, which catch-up does not change.
        return [(kind, tuple(w[0] for w in words), *rest) for kind, words, *rest in _comparable(stream_events)]

    for stream_id, samples in audio.items():
        expected = _single_stream_events(model, samples, every_third)
        assert untimed(events[stream_id]) == untimed(expected), f"stream {stream_id}"
        every_block = _single_stream_events(model, samples, CAUSAL)
        updates = [e for e in events[stream_id] if e.kind == "update"]
        assert len(updates) < sum(e.kind == "update" for e in every_block)
        assert updates[-1].audio_sec == every_block[-2].audio_sec  # the last update heard the whole stream


def test_streams_that_keep_up_are_not_affected_by_catch_up(model: ASRModel) -> None:
    """Streams that never have two blocks waiting get exactly the single-session events, catch-up or not."""
    plans = [plan for plan in _plans(8) if plan.samples_per_step < 1.92 * SAMPLE_RATE][:4]
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=len(plans), catch_up_blocks=4))
    events = _engine_events(engine, plans)
    for index, plan in enumerate(plans):
        assert _comparable(events[str(index)]) == _comparable(_single_stream_events(model, plan.audio, CAUSAL))


def test_catch_up_with_held_blocks_decodes_every_block(model: ASRModel) -> None:
    """Catch-up on streams that also decode every 2 blocks: fewer updates than either alone, and the last update of
    each stream still hears its whole audio (no block is dropped between held blocks and catch-up rounds)."""
    every_other = replace(CAUSAL, blocks_per_update=2)
    audio = {str(i): plan.audio for i, plan in enumerate(_plans(3))}
    engine = StreamingEngine(model, every_other, EngineOptions(max_streams=3, catch_up_blocks=3, decode_step="static"))
    events = _drain(engine, audio)
    for stream_id, samples in audio.items():
        alone = _single_stream_events(model, samples, every_other)
        updates = [e for e in events[stream_id] if e.kind == "update"]
        assert len(updates) <= sum(e.kind == "update" for e in alone)
        assert updates[-1].audio_sec == alone[-2].audio_sec
        assert events[stream_id][-1].kind == "final" and events[stream_id][-1].audio_sec == alone[-1].audio_sec


def test_streams_move_down_to_free_slots_at_segment_rolls(model: ASRModel) -> None:
    """Once the streams below it end, a stream moves into the lowest free slot at its next roll (its K/V is empty
    then), with its events unchanged."""
    plans = _plans(3)
    engine = StreamingEngine(model, CAUSAL, EngineOptions(max_streams=3))
    for stream_id in "abc":
        engine.open_stream(stream_id)
    engine.push_audio("a", _audio(2.0))
    engine.push_audio("b", _audio(2.0))
    engine.push_audio("c", plans[0].audio)
    engine.finish_stream("c")
    events: list[TranscriptEvent] = engine.step().get("c", [])  # one block each: slots 0, 1, 2 in order
    slots = [engine.decoder.slot_of("c")]
    engine.close_stream("a")
    engine.close_stream("b")
    while engine.has_work:
        events += engine.step().get("c", [])
        if "c" in engine.active_streams:
            slots.append(engine.decoder.slot_of("c"))
    assert slots[0] == 2 and slots[-1] == 0 and "segment" in [event.kind for event in events]
    assert _comparable(events) == _comparable(_single_stream_events(model, plans[0].audio, CAUSAL))
    assert engine.free_slots == 3
