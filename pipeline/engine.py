"""Many causal streams advanced together: one batched encoder forward and one batched decoder update per step.

A `StreamingEngine` owns up to `max_streams` `StreamingSession`s (state and policy) and one of each stage
(`pipeline.stages`: features, encoder, decoder), the same stage objects the served pipeline's deployments host.
The encoder and decoder stages keep the streams' K/V in preallocated slot pools (`pipeline.kv_pool`), one slot
per stream, so admission is a free-slot check (a clear `EngineAtCapacity` otherwise) and no cache memory is
allocated per update: the streams write their new K/V into their slots and attend over the pool wherever their
slots are (the encoder's scattered batches read their slots' windows chunk by chunk, see `audio_attention`);
activations are per-step tensors (the CUDA caching allocator recycles them; the decode steps run in fixed
buffers), and batch-wide ones run in row chunks within one bound (`pipeline.row_chunks.CHUNK_BYTES`). The end
of a stream frees its slots; at a segment roll, when its K/V starts empty, a stream's next segment starts in the
lowest free slot, so the live streams stay packed at the low slots that batches and fixed-shape steps cover.
Audio is held per stream as it arrives (checked, nothing computed: the caller's thread, e.g. an asyncio
driver's, does no signal work);
`step()` then advances every stream that has a whole block, or whose end was signalled, by one block (a stream
that has fallen behind by up to `EngineOptions.catch_up_blocks`, see below):

0. the front end: one `FeatureStage.extract` over every stream whose held audio completes a block (or ends the
   stream): log-mel groups of all of them in stacked FFT calls, voice activity in one batched forward. When the
   step has blocks to work on already, that call runs on the engine's front-end thread while the step's model
   work runs (numpy and torch release the GIL), and the next step takes its frames: the front end leaves the
   driver's critical path at the price of at most one step's wait for those blocks. With nothing else to do the
   step runs it at once, half its streams on the driver's thread and half on the front-end thread, so an idle
   engine adds no latency;
1. scheduling: each session's `next_block` rolls its segment if the block would pass the cap and hands out the
   block (the same code the single-stream session runs);
2. one `EncoderStage.encode`: one forward over all those blocks, on their slots' K/V;
3. one `DecoderStage.update`: one `RollingDecoder.update` over all those streams (one parallel pass, batched
   verification, batched greedy steps with streams leaving as they stop, run by the engine's `DecodeStep`: a dynamic batch on CPU,
   fixed-shape steps over the pool replayed as CUDA graphs on a GPU; `EngineOptions.decode_step`);
4. per stream, `complete_block` applies the commit and segment policy and makes the events; a stream whose end
   was signalled and whose last block is decoded is finalized and its slot freed.

`AsyncStreamingEngine` is the asyncio front: client coroutines submit audio and read their stream's events;
one driver task owns the engine, applying submissions between steps and running each step in a worker thread.

Catch-up: when a stream has several whole blocks waiting (the engine fell behind it), steps 1-2 repeat up to
`catch_up_blocks` times in one step, each round one batched encoder forward over the streams still catching up,
and the stream's blocks are held (`next_block(more_to_come=True)`) for ONE decoder update over all of them. The
decoder dominates the cost, so a lagging stream then pays about one update per step whatever its backlog,
which is what lets it catch up instead of falling further behind (the reference's pacing coalesces the same way).
Rolls and the end of a stream still force their updates, so no audio goes undecoded.

Because every phase is the session's own code and the batched forwards give each stream what it gets alone,
each stream's events equal those of a `StreamingSession` fed the same audio, whatever the other streams do
(with catch-up, as long as the stream never has two whole blocks waiting; a caught-up stream decodes less often).
Streams whose options change the model inputs (block size; prompt or decode controls) cannot share a forward;
they are batched in groups of equal settings, one forward per group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.checkpoint import ASRModel
from pipeline.options import SessionOptions
from pipeline.prompt import build_causal_prompt
from pipeline.session import (
    CausalBlock,
    StreamingSession,
    TranscriptEvent,
    checkpoint_offset,
    checkpoint_options,
    decoder_positions_needed,
)
from pipeline.stages import (
    DECODE_STEP_KINDS,
    DecodeRequest,
    DecoderStage,
    EncoderStage,
    FeatureResult,
    FeatureStage,
    answer_of,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepTiming:
    """Wall time of one `step`, by phase (seconds on the host's clock; CUDA work is not waited for per phase)."""

    streams: int  # blocks advanced in this step
    features_sec: float  # the front end of the audio held since the last step
    schedule_sec: float
    encoder_sec: float
    decoder_sec: float
    policy_sec: float  # commit/segment policy, events, finalization

    @property
    def total_sec(self) -> float:
        return self.features_sec + self.schedule_sec + self.encoder_sec + self.decoder_sec + self.policy_sec


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs its streams; what each stream decodes is its `SessionOptions`."""

    max_streams: int = 32  # stream slots, i.e. the K/V memory preallocated on the model's device
    # Decoder K/V positions per slot; by default what a segment needs under the engine's session options.
    decoder_capacity: int | None = None
    # One of DECODE_STEP_KINDS, or "auto": CUDA graphs on a GPU (launch-bound steps), a dynamic batch on CPU
    # (no padding rows: the CPU pays for every row).
    decode_step: str = "auto"
    # The most blocks one step advances a stream that has fallen behind: its ready blocks are encoded in order
    # and decoded once, so a lagging stream pays for one decoder update instead of one per block and can catch
    # up. 1 = one block per step, exactly a single session's schedule; a stream that keeps up is never affected.
    catch_up_blocks: int = 1

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"max_streams is {self.max_streams}; expected at least 1")
        if self.catch_up_blocks < 1:
            raise ValueError(f"catch_up_blocks is {self.catch_up_blocks}; expected at least 1")
        if self.decode_step not in ("auto", *DECODE_STEP_KINDS):
            raise ValueError(f"decode_step is {self.decode_step!r}; expected 'auto' or one of {DECODE_STEP_KINDS}")

    def decode_step_on(self, device: torch.device) -> str:
        if self.decode_step != "auto":
            return self.decode_step
        return "cuda_graph" if device.type == "cuda" else "dynamic"


class EngineAtCapacity(RuntimeError):
    """Every stream slot is taken: retry once a stream has finished, or send the stream elsewhere."""


@dataclass
class _FrontEndCall:
    """One `FeatureStage.extract` over several sessions' held audio, in parts running on the engine's front-end
    thread (and the driver's, see `StreamingEngine._run_front_end`).

    Each request carries a copy of its session's front end (`take_feature_request`), so the session stays
    readable, and checkpointable, while the call runs: audio in flight is not in its `sample_offset` yet, and
    a stream restored from a checkpoint taken meanwhile is fed that audio again."""

    sessions: list[StreamingSession]
    ends: list[bool]  # whether each session's request carries the end of audio
    parts: list[Future[list[FeatureResult]]]  # the results of consecutive runs of the sessions, in order

    def accept(self) -> None:
        """Wait for the call; hand each session its frames."""
        results = [result for part in self.parts for result in part.result()]
        for session, end, result in zip(self.sessions, self.ends, results):
            session.accept_features(result, end=end)


class EngineFailed(RuntimeError):
    """The engine's driver stopped on an error: its streams are lost here; restore them elsewhere from their last
    roll checkpoint."""


class StreamingEngine:
    """Advance many causal streams in lock-step batches. Not thread-safe: drive it from one task or thread.

    The composition of the three stages in one process: each stream's `StreamingSession` (state and policy)
    sends its requests to one shared `FeatureStage`, `EncoderStage` and `DecoderStage` (`pipeline.stages`),
    which the served pipeline's deployments host as they are."""

    def __init__(
        self, model: ASRModel, options: SessionOptions | None = None, engine_options: EngineOptions | None = None
    ) -> None:
        """`options`: the session options of streams opened without their own."""
        self.model = model
        self.options = options or SessionOptions()
        _check_backend(self.options)
        self.engine_options = engine_options or EngineOptions()
        slots = self.engine_options.max_streams
        decoder_capacity = self.engine_options.decoder_capacity or self._decoder_positions(self.options)
        self.features = FeatureStage()
        self.encoder = EncoderStage(model.audio_tower, slots)
        self.decoder = DecoderStage(
            model.text_decoder, slots, decoder_capacity, self.engine_options.decode_step_on(model.device)
        )
        self._sessions: dict[str, StreamingSession] = {}
        self._front_end_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="front-end")
        self._front_end_call: _FrontEndCall | None = None  # started by the last step, taken by the next
        self.last_step_timing: StepTiming | None = None  # for metrics and benchmarks

    # ------------------------------------------------------------------ admission

    @property
    def active_streams(self) -> list[str]:
        return list(self._sessions)

    @property
    def free_slots(self) -> int:
        return self.engine_options.max_streams - len(self._sessions)

    @property
    def kv_bytes_per_stream(self) -> int:
        """Encoder + decoder K/V memory one stream's slots hold, whatever its segment's fill."""
        pools = (self.encoder.pool.keys, self.encoder.pool.values, self.decoder.pool.keys, self.decoder.pool.values)
        return sum(t.numel() * t.element_size() for t in pools) // self.engine_options.max_streams

    def open_stream(self, stream_id: str, options: SessionOptions | None = None) -> None:
        """Admit a new stream, with the engine's options unless given; raises `EngineAtCapacity` when full."""
        options = options or self.options
        self._admit(stream_id, options)
        self._sessions[stream_id] = StreamingSession(self.model, options, stream_id=stream_id)

    def restore_stream(self, stream_id: str, checkpoint: bytes) -> int:
        """Admit a stream that continues from a segment-roll checkpoint (e.g. taken on another replica).

        Returns the stream sample offset to resume from: push the audio from there on. The events that follow
        equal those the original stream produced after the checkpoint."""
        self._admit(stream_id, checkpoint_options(checkpoint))
        self._sessions[stream_id] = StreamingSession.restore(self.model, checkpoint, stream_id=stream_id)
        return checkpoint_offset(checkpoint)

    def _admit(self, stream_id: str, options: SessionOptions) -> None:
        if stream_id in self._sessions:
            raise ValueError(f"stream {stream_id!r} is already open")
        _check_backend(options)
        needed = self._decoder_positions(options)
        if needed > self.decoder.capacity:
            raise ValueError(
                f"stream {stream_id!r} needs {needed} decoder positions per segment; the engine's slots hold "
                f"{self.decoder.capacity} (shorter segments or token budget, or a larger decoder_capacity)"
            )
        if not self.free_slots:
            raise EngineAtCapacity(
                f"all {self.engine_options.max_streams} stream slots are taken; stream {stream_id!r} was not admitted"
            )

    def close_stream(self, stream_id: str) -> None:
        """Drop a stream without finalizing it (e.g. its client went away) and free its slots."""
        self._close(stream_id)

    # ------------------------------------------------------------------ input

    def push_audio(self, stream_id: str, pcm: np.ndarray) -> None:
        """Hold 16 kHz mono float32 PCM for a stream (checked now); later `step` calls extract and encode it."""
        self.session(stream_id).hold_audio(pcm)

    def finish_stream(self, stream_id: str) -> None:
        """Signal the end of a stream's audio; later steps decode what is left, then finalize it."""
        self.session(stream_id).hold_end()

    @property
    def has_work(self) -> bool:
        """Whether a `step` now would advance some stream (a whole block held, being extracted or buffered, or an
        end to process)."""
        return self._front_end_call is not None or any(session.ready_for_step for session in self._sessions.values())

    # ------------------------------------------------------------------ the step

    def step(self) -> dict[str, list[TranscriptEvent]]:
        """Advance every ready stream (by up to `catch_up_blocks` blocks); returns the new events per stream."""
        clock = _PhaseClock()
        self._run_front_end()
        features_sec = clock.lap()
        events: dict[str, list[TranscriptEvent]] = defaultdict(list)
        updates: dict[str, tuple[CausalBlock, DecodeRequest]] = {}  # per stream: the block its update follows
        advanced, schedule_sec, encoder_sec = 0, 0.0, 0.0
        takers = list(self._sessions)
        rounds = self.engine_options.catch_up_blocks
        for round_index in range(rounds):  # a lagging stream's further blocks, each round one batched forward
            blocks = self._next_blocks(takers, last_round=round_index == rounds - 1, events=events)
            schedule_sec += clock.lap()
            if not blocks:
                break
            answers = self.encoder.encode([self._sessions[s].encode_request(block) for s, block in blocks.items()])
            encoder_sec += clock.lap()
            advanced += len(blocks)
            for (stream_id, block), answer in zip(blocks.items(), answers):
                session, embeddings = self._sessions[stream_id], answer_of(answer)
                if block.decode:
                    updates[stream_id] = block, session.decode_request(block, embeddings)
                else:  # its update comes after a later block (catching up, or blocks_per_update > 1)
                    events[stream_id] += session.hold_block(block, embeddings)
            takers = [stream_id for stream_id, block in blocks.items() if not block.decode]

        results = self.decoder.update([request for _, request in updates.values()])
        decoder_sec = clock.lap()
        for (stream_id, (block, _)), result in zip(updates.items(), results):
            events[stream_id] += self._sessions[stream_id].complete_block(block, answer_of(result))

        for stream_id, session in list(self._sessions.items()):
            if session.done_encoding:
                events[stream_id] += session.finalize()
                self._close(stream_id)
        self.last_step_timing = StepTiming(advanced, features_sec, schedule_sec, encoder_sec, decoder_sec, clock.lap())
        if advanced:
            log.debug("step: %d blocks over %d open streams", advanced, len(self._sessions))
        return {stream_id: stream_events for stream_id, stream_events in events.items() if stream_events}

    def _run_front_end(self) -> None:
        """Take the front-end call the last step started, then start one for every stream whose held audio now
        completes a block or ends the stream: in the background if this step has blocks to work on meanwhile,
        otherwise here, its streams split between the driver and the front-end thread (the driver would only
        wait, and the log-mel is numpy work that runs in parallel)."""
        if self._front_end_call is not None:
            self._front_end_call.accept()
            self._front_end_call = None
        due = [session for session in self._sessions.values() if session.front_end_due]
        if not due:
            return
        requests, ends = zip(*(session.take_feature_request() for session in due))
        if any(session.block_ready or session.done_encoding for session in self._sessions.values()):
            background = self._front_end_thread.submit(self.features.extract, list(requests))
            self._front_end_call = _FrontEndCall(due, list(ends), [background])
            return
        half = len(requests) // 2
        background = self._front_end_thread.submit(self.features.extract, list(requests[half:]))
        here: Future[list[FeatureResult]] = Future()
        here.set_result(self.features.extract(list(requests[:half])))
        _FrontEndCall(due, list(ends), [here, background]).accept()

    def _next_blocks(
        self, stream_ids: list[str], last_round: bool, events: dict[str, list[TranscriptEvent]]
    ) -> dict[str, CausalBlock]:
        """Scheduling: the next block of each stream that has one; a stream with more ready is asked to hold
        this one for a joint update unless this is the step's last round. Blocks the voice gate skips need no
        forward: their events go to `events` and the stream's next block is taken instead."""
        blocks = {}
        for stream_id in stream_ids:
            session = self._sessions[stream_id]
            while True:
                block = session.next_block(more_to_come=not last_round and session.whole_blocks_buffered >= 2)
                if block is None or not block.skipped:
                    break
                events[stream_id] += block.roll_events
            if block is not None:
                blocks[stream_id] = block
        return blocks

    def _close(self, stream_id: str) -> None:
        self.session(stream_id)
        del self._sessions[stream_id]
        self.encoder.release(stream_id)
        self.decoder.release(stream_id)

    def _decoder_positions(self, options: SessionOptions) -> int:
        prompt = build_causal_prompt(self.model.tokenizer, language=options.language, context=options.context)
        return decoder_positions_needed(prompt, options)

    def session(self, stream_id: str) -> StreamingSession:
        """The session of an open stream (for inspection: drive it through the engine, not directly)."""
        session = self._sessions.get(stream_id)
        if session is None:
            raise KeyError(f"no open stream {stream_id!r}; open it first (finished streams are closed)")
        return session


class AsyncStreamingEngine:
    """asyncio front of a `StreamingEngine`: many client coroutines, one driver task (`run`) that owns the engine.

    Every call that touches the engine is queued and applied by the driver between steps, so the engine is never
    used from two places at once, and awaiting a call is the answer to it (e.g. `EngineAtCapacity` from
    `open_stream`). Each step runs in a worker thread, so the event loop keeps serving clients meanwhile.
    """

    def __init__(self, engine: StreamingEngine) -> None:
        self.engine = engine
        self._requests: list[tuple[Callable[[], None], asyncio.Future[None]]] = []
        # None: the stream is over; EngineFailed: the driver stopped.
        self._queues: dict[str, asyncio.Queue[TranscriptEvent | EngineFailed | None]] = {}
        self._wake = asyncio.Event()
        self._failure: EngineFailed | None = None

    async def open_stream(self, stream_id: str, options: SessionOptions | None = None) -> None:
        def open_() -> None:
            self.engine.open_stream(stream_id, options)
            self._queues[stream_id] = asyncio.Queue()

        await self._call(open_)

    async def push_audio(self, stream_id: str, pcm: np.ndarray) -> None:
        await self._call(lambda: self.engine.push_audio(stream_id, pcm))

    async def finish_stream(self, stream_id: str) -> None:
        await self._call(lambda: self.engine.finish_stream(stream_id))

    async def close_stream(self, stream_id: str) -> None:
        def close() -> None:
            self.engine.close_stream(stream_id)
            self._queues[stream_id].put_nowait(None)

        await self._call(close)

    async def events(self, stream_id: str) -> AsyncIterator[TranscriptEvent]:
        """A stream's events as they come, ending after its final event (or when it is closed)."""
        queue = self._queues.get(stream_id)
        if queue is None:
            raise KeyError(f"no open stream {stream_id!r}; await open_stream first")
        while (event := await queue.get()) is not None:
            if isinstance(event, EngineFailed):
                raise event
            yield event
        del self._queues[stream_id]

    async def run(self) -> None:
        """The driver: apply submissions, step while some stream is ready, otherwise wait. Run it as a task.

        If a step raises, every client hears `EngineFailed` (their event iterators and later calls raise it)
        instead of waiting forever, and `run` re-raises the error."""
        while True:
            self._apply_requests()
            if not self.engine.has_work:
                await self._wake.wait()
                self._wake.clear()
                continue
            try:
                stepped = await asyncio.to_thread(self.engine.step)
            except Exception as error:  # re-raised: this only tells the clients before the driver dies
                self._fail(EngineFailed(f"the engine stopped: {error}"))
                raise
            for stream_id, new_events in stepped.items():
                queue = self._queues[stream_id]
                for event in new_events:
                    queue.put_nowait(event)
                if new_events[-1].kind == "final":
                    queue.put_nowait(None)

    def _fail(self, failure: EngineFailed) -> None:
        self._failure = failure
        for queue in self._queues.values():
            queue.put_nowait(failure)
        for _, done in self._requests:
            done.set_exception(failure)
        self._requests = []

    async def _call(self, apply: Callable[[], None]) -> None:
        if self._failure is not None:
            raise self._failure
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._requests.append((apply, done))
        self._wake.set()
        await done

    def _apply_requests(self) -> None:
        requests, self._requests = self._requests, []
        for apply, done in requests:
            try:
                apply()
            except (TypeError, ValueError, KeyError, RuntimeError) as error:  # a bad request: its caller's answer
                done.set_exception(error)
            else:
                done.set_result(None)


class _PhaseClock:
    """Successive phase durations on the host's clock. It does not wait for the device: on a GPU a phase is
    charged the host time to queue its kernels (and any read that waits for them), which is what bounds how many
    streams one driver thread can serve; the device time shows in the step's total through its reads."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def _check_backend(options: SessionOptions) -> None:
    if options.backend != "causal":
        raise ValueError(f"backend is {options.backend!r}; the engine batches only the 'causal' backend")
