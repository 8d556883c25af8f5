"""A stream's owner driving its session through asynchronous stages: same events as a session on its own, also
when a stage loses the stream's state mid-segment (replay)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline.checkpoint import ASRModel
from pipeline.commit import SegmentPolicy
from pipeline.engine import StreamingEngine
from pipeline.session import StreamingSession, TranscriptEvent
from pipeline.stages import IDLE_STATE_S, DecoderStage, EncoderStage, FeatureStage, StageAtCapacity
from pipeline.stream_driver import LocalStages, StreamDriver
from tests.test_session import CAUSAL, _audio, _comparable, model  # noqa: F401  (model is a fixture)


def _stages(model: ASRModel, slots: int = 2) -> LocalStages:
    capacity = StreamingEngine(model, CAUSAL).decoder.capacity
    return LocalStages(FeatureStage(), EncoderStage(model.audio_tower, slots), DecoderStage(model.text_decoder, slots, capacity))


async def _drive(
    driver: StreamDriver, audio: np.ndarray, chunk: int, on_chunk=None  # noqa: ANN001
) -> list[TranscriptEvent]:
    events = []
    for index, start in enumerate(range(0, audio.size, chunk)):
        events += await driver.push_audio(audio[start : start + chunk])
        if on_chunk is not None:
            on_chunk(index)
    return events + await driver.finish()


def _alone(model: ASRModel, audio: np.ndarray) -> list[TranscriptEvent]:
    session = StreamingSession(model, CAUSAL)
    return session.push_audio(audio) + session.finish()


@pytest.mark.parametrize("chunk", [640, 3200, 16000])
def test_driven_stream_equals_the_session_across_rolls(model: ASRModel, chunk: int) -> None:
    audio = _audio(14.0, seed=7)
    stages = _stages(model)
    driver = StreamDriver(StreamingSession(model, CAUSAL, stream_id="s", keep_replay=True), stages)
    events = asyncio.run(_drive(driver, audio, chunk))
    assert "segment" in [event.kind for event in events]
    assert _comparable(events) == _comparable(_alone(model, audio))
    assert (driver.stats.encoder_replays, driver.stats.decoder_replays) == (0, 0)
    assert stages.encoder.free_slots == stages.decoder.free_slots == 2  # released at the end


@pytest.mark.parametrize("lose", ["encoder", "decoder", "both"])
def test_a_stage_that_loses_the_stream_mid_segment_is_replayed_and_the_output_is_unchanged(
    model: ASRModel, lose: str
) -> None:
    audio = _audio(14.0, seed=8)
    stages = _stages(model)
    driver = StreamDriver(StreamingSession(model, CAUSAL, stream_id="s", keep_replay=True), stages)

    drops = []

    def drop_state(chunk_index: int) -> None:
        # Every third chunk, when the segment already has a block and an update whose K/V the stage holds.
        if chunk_index % 3 == 2 and driver.session.segment.updates > 0:
            drops.append(chunk_index)
            if lose in ("encoder", "both"):
                stages.encoder.release("s")
            if lose in ("decoder", "both"):
                stages.decoder.release("s")

    events = asyncio.run(_drive(driver, audio, 6400, drop_state))
    assert _comparable(events) == _comparable(_alone(model, audio))
    assert len(drops) >= 3
    replays = (driver.stats.encoder_replays, driver.stats.decoder_replays)
    # A drop is replayed unless the segment rolled before the stream's next request (which starts afresh).
    assert {"encoder": replays[1] == 0, "decoder": replays[0] == 0, "both": True}[lose]
    assert max(replays) >= 2


def test_a_stage_without_a_free_slot_refuses_the_new_stream(model: ASRModel) -> None:
    stages = _stages(model, slots=1)
    first = StreamDriver(StreamingSession(model, CAUSAL, stream_id="a", keep_replay=True), stages)
    second = StreamDriver(StreamingSession(model, CAUSAL, stream_id="b", keep_replay=True), stages)
    asyncio.run(first.push_audio(_audio(2.0)))
    with pytest.raises(StageAtCapacity, match="stream 'b'"):
        asyncio.run(second.push_audio(_audio(2.0)))


def test_a_state_left_idle_frees_its_slot_and_replays_if_its_stream_comes_back(model: ASRModel) -> None:
    """A stream whose owner went silent (died, or its release overtook its last request) holds its slot only for
    IDLE_STATE_S: then another stream gets the slot, and the first one, if it ever comes back, replays."""
    now = [0.0]
    stages = _stages(model, slots=1)
    for stage in (stages.encoder, stages.decoder):
        stage.streams.clock = lambda: now[0]
    audio = _audio(6.0, seed=3)
    quiet = StreamDriver(StreamingSession(model, CAUSAL, stream_id="quiet", keep_replay=True), stages)
    events = asyncio.run(quiet.push_audio(audio[: 2 * 16000]))
    now[0] += IDLE_STATE_S + 1
    assert stages.encoder.streams.in_use() == stages.decoder.streams.in_use() == 0
    other = StreamDriver(StreamingSession(model, CAUSAL, stream_id="other", keep_replay=True), stages)
    asyncio.run(other.push_audio(_audio(2.0)))  # would be StageAtCapacity if the idle state kept its slot
    asyncio.run(other.close())
    events += asyncio.run(quiet.push_audio(audio[2 * 16000 :])) + asyncio.run(quiet.finish())
    assert quiet.stats.encoder_replays == 1 and quiet.stats.decoder_replays == 1
    assert _comparable(events) == _comparable(_alone(model, audio))


class _SlowDecoder(LocalStages):
    """In-process stages whose decoder answers only after `hold` other tasks had their turn: an update in flight
    that the driver's owner can hand audio to, as a remote decoder is."""

    hold = 40  # a decoder slower than the audio comes: 4 s of 100 ms chunks arrive during an update

    async def update(self, request):  # noqa: ANN001, ANN201
        for _ in range(self.hold):
            await asyncio.sleep(0)
        return await super().update(request)


def _slow_stages(model: ASRModel) -> _SlowDecoder:
    stages = _stages(model)
    return _SlowDecoder(stages.features, stages.encoder, stages.decoder)


def test_a_backlog_is_encoded_ahead_of_each_update_with_the_same_events(model: ASRModel) -> None:
    audio = _audio(14.0, seed=11)
    stages = _stages(model)
    driver = StreamDriver(StreamingSession(model, CAUSAL, stream_id="s", keep_replay=True), stages)
    events = asyncio.run(_drive(driver, audio, 4 * 16000))  # about two blocks per push
    assert "segment" in [event.kind for event in events]
    assert _comparable(events) == _comparable(_alone(model, audio))
    assert driver.stats.encoded_ahead >= 2
    assert (driver.stats.encoder_replays, driver.stats.decoder_replays) == (0, 0)
    assert stages.encoder.free_slots == stages.decoder.free_slots == 2


def test_audio_handed_over_during_an_update_is_encoded_before_the_update_returns(model: ASRModel) -> None:
    """As the ingress does: a reader hands each chunk to the driver as it arrives, while `process` runs."""
    audio = _audio(10.0, seed=12)
    chunk = 1600
    stages = _slow_stages(model)
    driver = StreamDriver(StreamingSession(model, CAUSAL, stream_id="s", keep_replay=True), stages)
    encodes_during_update = []

    async def run() -> list[TranscriptEvent]:
        events: list[TranscriptEvent] = []
        processing: asyncio.Task | None = None
        for start in range(0, audio.size, chunk):
            driver.hold_audio(audio[start : start + chunk])
            if processing is None or processing.done():
                if processing is not None:
                    events += processing.result()
                processing = asyncio.ensure_future(driver.process())
            await asyncio.sleep(0)
            if driver._ahead is not None and not processing.done():
                encodes_during_update.append(start)
        if processing is not None:
            events += await processing
        return events + await driver.process() + await driver.finish()

    events = asyncio.run(run())
    assert _comparable(events) == _comparable(_alone(model, audio))
    assert encodes_during_update and driver.stats.encoded_ahead >= 2
    assert stages.encoder.free_slots == stages.decoder.free_slots == 2


def test_a_roll_after_the_update_drops_the_block_encoded_ahead(model: ASRModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sentence end rolls the segment after an update: the next block, encoded ahead in the old segment, is
    encoded again as the new segment's first."""
    audio = _audio(12.0, seed=13)
    rolls = {"left": 1}

    def roll_after_the_first_update(policy, segment_steps: int, text: str):  # noqa: ANN001, ANN202
        if rolls["left"] > 0:  # the first segment's first update (its next block would fit the segment)
            rolls["left"] -= 1
            return True
        return None

    monkeypatch.setattr(SegmentPolicy, "should_roll_after", roll_after_the_first_update)
    stages = _stages(model)
    driver = StreamDriver(StreamingSession(model, CAUSAL, stream_id="s", keep_replay=True), stages)
    events = asyncio.run(_drive(driver, audio, 12 * 16000))  # every block buffered at once
    dropped = len(driver.stats.stage_seconds["encoder"]) - driver.session.blocks_encoded  # encode calls of no use
    rolls["left"] = 1
    alone = _alone(model, audio)
    assert [e.reason for e in events if e.kind == "segment"][0] == "sentence"
    assert _comparable(events) == _comparable(alone)
    assert dropped == 1 and driver.stats.encoded_ahead >= 2 and driver.stats.encoder_replays == 0
    assert stages.encoder.free_slots == stages.decoder.free_slots == 2
