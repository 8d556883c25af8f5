"""The owner of one stream, driving its session against asynchronous stages (possibly in other processes).

A `StreamDriver` is what a served pipeline's ingress runs per stream: the stream's `StreamingSession` (state and
policy) stays here, and every piece of model work is a request to a stage behind the `AsyncStages` interface
(Ray Serve deployment handles in `deployments/`, or the in-process stages in `LocalStages`). The blocks go
through the very same session halves as in `pipeline.engine.StreamingEngine`, so the events are the same.

Stage state is soft. A stage that answers with a `StageMiss` (it restarted, or routing moved the stream) gets
the request again with a replay of the current segment, which the session keeps (`keep_replay`), and the answer
is the one it would have given. At a segment roll the stream's state on the old segment's replicas is released:
the next segment starts fresh and may run anywhere.

Encoding ahead: while a stream's decoder update is in flight, the driver puts audio held meanwhile through the
front end and encodes the stream's next block, when that block is certain unless the update rolls the segment
(`StreamingSession.encode_ahead_request`). The causal encoder does not depend on the decoder, so a stream with a
backlog (audio sent faster than real time, or a stream the decoder fell behind) keeps both stages busy, and its
next update can go as soon as this one returns: without it, a decoder that runs several streams' updates would
find only the streams whose next block was encoded during its forward, and streams in step would split into
groups that alternate on the decoder, each forward nearly as costly as one over all of them (on a CPU, where a
forward's cost is its weights). After a roll the block encoded ahead belongs to the old segment: it is dropped
and the block is encoded in the new one (once per segment at most).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from collections.abc import Awaitable
from typing import Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from pipeline.rolling import UpdateResult
from pipeline.session import CausalBlock, StreamingSession, TranscriptEvent
from pipeline.stages import (
    DecoderStage,
    DecodeRequest,
    EncoderStage,
    EncodeRequest,
    FeatureRequest,
    FeatureResult,
    FeatureStage,
    StageAtCapacity,
    StageMiss,
    answer_of,
)

log = logging.getLogger(__name__)

Answer = TypeVar("Answer")


class AsyncStages(Protocol):
    """The stages as one stream's owner sees them: one request at a time, answered asynchronously."""

    async def extract(self, request: FeatureRequest) -> FeatureResult: ...

    async def encode(self, request: EncodeRequest) -> Tensor | StageMiss | StageAtCapacity: ...

    async def update(self, request: DecodeRequest) -> UpdateResult | StageMiss | StageAtCapacity: ...

    async def release(self, stream_id: str, segment_index: int) -> None:
        """Forget the stream's state for that segment on whichever replica holds it."""


class LocalStages:
    """`AsyncStages` over stage objects in this process (tests, and a single-process server)."""

    def __init__(self, features: FeatureStage, encoder: EncoderStage, decoder: DecoderStage) -> None:
        self.features, self.encoder, self.decoder = features, encoder, decoder

    async def extract(self, request: FeatureRequest) -> FeatureResult:
        return self.features.extract([request])[0]

    async def encode(self, request: EncodeRequest) -> Tensor | StageMiss | StageAtCapacity:
        return self.encoder.encode([request])[0]

    async def update(self, request: DecodeRequest) -> UpdateResult | StageMiss | StageAtCapacity:
        return self.decoder.update([request])[0]

    async def release(self, stream_id: str, segment_index: int) -> None:
        self.encoder.release(stream_id, segment_index)
        self.decoder.release(stream_id, segment_index)


@dataclass
class DriverStats:
    """What one stream cost its owner beyond the model work, and how long it waited for each stage."""

    encoder_replays: int = 0
    decoder_replays: int = 0
    updates: int = 0
    encoded_ahead: int = 0  # blocks encoded while the stream's previous update ran, and used
    # Per stage ("features", "encoder", "decoder"): the wall time of each call, in seconds.
    stage_seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


class StreamDriver:
    """Drive one stream's session through `AsyncStages`: `push_audio` any chunks, then `finish`."""

    def __init__(self, session: StreamingSession, stages: AsyncStages) -> None:
        if not session.keep_replay:
            raise ValueError("the session must keep its replay (keep_replay=True): remote stages may lose state")
        self.session = session
        self.stages = stages
        self.stats = DriverStats()
        self._segment_on_stages: int | None = None  # the segment whose state the stages hold for this stream
        self._ahead: _EncodedAhead | None = None  # the next block, encoded while the last update ran
        self._audio_held = asyncio.Event()  # set by `hold_audio`: wakes an encoding ahead that waits for audio

    async def push_audio(self, pcm: np.ndarray) -> list[TranscriptEvent]:
        """Feed 16 kHz mono float32 PCM; returns the events of the blocks it completed."""
        self.hold_audio(pcm)
        return await self.process()

    def hold_audio(self, pcm: np.ndarray) -> None:
        """Keep 16 kHz mono float32 PCM without processing it: an owner that reads a client's audio while this
        driver is busy (`process` in flight) hands it over at once, so that the next block can be encoded ahead."""
        self.session.hold_audio(pcm)
        self._audio_held.set()

    async def process(self) -> list[TranscriptEvent]:
        """Run the blocks the audio held so far completes; returns their events.

        Audio is held by the session until it completes a block: then one front-end call takes all of it (see
        `StreamingSession.front_end_due`)."""
        if self.session.front_end_due:
            await self._extract()
        return await self._run_ready_blocks()

    async def finalize_now(self) -> list[TranscriptEvent]:
        """Commit the tail now and keep the stream open (`StreamingSession.finalize_now`): the audio held so far
        goes through the front-end first, so everything received is finalized."""
        if self.session.holds_audio:
            await self._extract()
        self.session.request_finalize()
        return await self._run_ready_blocks()

    async def finish(self) -> list[TranscriptEvent]:
        """End of audio: decode what is left, finalize, and release the stream's stage state."""
        self.session.hold_end()
        await self._extract()
        events = await self._run_ready_blocks()
        events += self.session.finalize()
        await self.close()
        return events

    async def _extract(self) -> None:
        request, end = self.session.take_feature_request()
        self.session.accept_features(await self._timed("features", self.stages.extract(request)), end=end)

    async def close(self) -> None:
        """Release the stream's state on the stages (also when the stream is abandoned)."""
        if self._ahead is not None:  # the stream ended before its next block: a late answer finds no state
            self._ahead.answer.cancel()
            self._ahead = None
        if self._segment_on_stages is not None:
            segment, self._segment_on_stages = self._segment_on_stages, None
            await self.stages.release(self.session.stream_id, segment)

    async def _run_ready_blocks(self) -> list[TranscriptEvent]:
        session, events = self.session, []
        while (block := session.next_block()) is not None:
            if block.skipped:  # silence the voice gate dropped: no stage work
                events += block.roll_events
                continue
            embeddings = await self._encoded(block)
            if not block.decode:
                events += session.hold_block(block, embeddings)
                continue
            update = asyncio.ensure_future(self._update(session.decode_request(block, embeddings)))
            try:
                await self._encode_ahead(update)
            except BaseException:
                update.cancel()
                raise
            result = await update
            self.stats.updates += 1
            events += session.complete_block(block, result)
        return events

    async def _encoded(self, block: CausalBlock) -> Tensor:
        """The block's embeddings: encoded ahead if that was this very block, else encoded now."""
        ahead, self._ahead = self._ahead, None
        # Awaited also when it is of no use (a roll came between): the old segment is released after it.
        answer = None if ahead is None else await ahead.answer
        await self._enter_segment(block)
        if isinstance(answer, Tensor) and _encodes(ahead.request, block):
            self.stats.encoded_ahead += 1
            return answer
        return await self._encode(block)

    async def _encode_ahead(self, update: asyncio.Future[UpdateResult]) -> None:
        """While `update` is in flight: put audio held meanwhile through the front end, and send the next block to
        the encoder if it is certain (its answer waits in `_ahead`; one block ahead at most)."""
        session = self.session
        while not update.done():
            if session.front_end_due:
                await self._extract()
                continue
            request = session.encode_ahead_request()
            if request is not None:
                answer = asyncio.ensure_future(self._timed("encoder", self.stages.encode(request)))
                answer.add_done_callback(_observe)
                self._ahead = _EncodedAhead(request, answer)
                return
            self._audio_held.clear()
            held = asyncio.ensure_future(self._audio_held.wait())
            try:
                await asyncio.wait((update, held), return_when=asyncio.FIRST_COMPLETED)
            finally:
                held.cancel()

    async def _enter_segment(self, block: CausalBlock) -> None:
        """A block of a new segment: the old segment's stage state is of no further use."""
        if self._segment_on_stages not in (None, block.segment_index):
            await self.stages.release(self.session.stream_id, self._segment_on_stages)
        self._segment_on_stages = block.segment_index

    async def _encode(self, block: CausalBlock) -> Tensor:
        request = self.session.encode_request(block)
        answer = await self._timed("encoder", self.stages.encode(request))
        if isinstance(answer, StageMiss):
            log.info("encoder miss for %s (%s): replaying %d blocks", request.stream_id, answer.reason, request.block_index)
            self.stats.encoder_replays += 1
            answer = await self._timed("encoder", self.stages.encode(self.session.encoder_replay(request)))
        return answer_of(answer)

    async def _update(self, request: DecodeRequest) -> UpdateResult:
        answer = await self._timed("decoder", self.stages.update(request))
        if isinstance(answer, StageMiss):
            log.info("decoder miss for %s (%s): replaying %d updates", request.stream_id, answer.reason, request.update_index)
            self.stats.decoder_replays += 1
            answer = await self._timed("decoder", self.stages.update(self.session.decoder_replay(request)))
        return answer_of(answer)

    async def _timed(self, stage: str, call: Awaitable[Answer]) -> Answer:
        started = time.perf_counter()
        answer = await call
        self.stats.stage_seconds[stage].append(time.perf_counter() - started)
        return answer


@dataclass(frozen=True)
class _EncodedAhead:
    request: EncodeRequest
    answer: asyncio.Future[Tensor | StageMiss | StageAtCapacity]


def _encodes(request: EncodeRequest, block: CausalBlock) -> bool:
    """Whether `request` (encoded ahead) is exactly `block`: same place in the same segment, same mel."""
    return (
        (request.segment_index, request.block_index) == (block.segment_index, block.block_index)
        and request.mel.shape == block.mel.shape
        and bool(torch.equal(request.mel, block.mel))
    )


def _observe(answer: asyncio.Future) -> None:
    """Mark an encoding ahead's failure as seen: it is raised where the answer is used, or dropped with it."""
    if not answer.cancelled():
        answer.exception()
