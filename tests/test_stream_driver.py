"""A stream's owner driving its session through asynchronous stages: same events as a session on its own, also
when a stage loses the stream's state mid-segment (replay)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline.checkpoint import ASRModel
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
