"""Client library for the public ``qwen3stream.v1.Recognizer`` gRPC API.

Vendorable on purpose: it imports only the standard library, numpy, grpcio and the generated modules
under ``protos/`` (no torch, no Ray, nothing from ``pipeline``), so users can copy this file and
``protos/`` into their own code.

One call is one stream: config first, then audio chunks, then half-close; the server answers with
Started, Results (append-only committed words + an interim tail) and, after the half-close, Final.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import grpc
import numpy as np

from protos.qwen3stream.v1 import asr_pb2, asr_pb2_grpc

__all__ = [
    "CommittedWord",
    "RecognizerClient",
    "StreamOptions",
    "StreamOutcome",
    "TimedResult",
    "encode_pcm",
    "recognize",
    "tls_credentials",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

EncodingName = Literal["pcm_s16le", "f32le"]

_ENCODINGS: dict[str, tuple[int, int]] = {
    # name -> (proto enum value, bytes per sample)
    "pcm_s16le": (asr_pb2.PCM_S16LE, 2),
    "f32le": (asr_pb2.F32LE, 4),
}

# Large enough for any single chunk or Final of a long stream; gRPC's default receive limit is 4 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class StreamOptions:
    """What the client sends in StreamConfig, plus how it chunks and paces the audio."""

    language: str = "English"
    sample_rate_hz: int = 16000
    encoding: EncodingName = "pcm_s16le"
    # Mel frames per encoder block (server-side latency/throughput trade-off).
    block_frames: int = 192
    interim_results: bool = True
    # Audio per AudioChunk message.
    chunk_ms: int = 100
    # Send chunks at the pace of the audio (like a microphone) instead of as fast as possible.
    realtime: bool = False
    # Biasing text (names, terms) for the decoder's prompt, at most 64 tokens.
    context: str = ""
    # The server's voice activity gate: skip silence, end utterances after end_silence_ms of it (0: 800).
    voice_activity: bool = False
    end_silence_ms: int = 0
    # Let a causal stream run a language other than English (the server then sends a warning in Started).
    allow_untrained_language: bool = False
    # Send a Control.finalize after every this much audio (0: never); the server answers each with Finalized.
    finalize_every_ms: int = 0
    # (seconds, text): send Control.update_context once this much audio is sent.
    context_updates: tuple[tuple[float, str], ...] = ()

    def __post_init__(self) -> None:
        if self.encoding not in _ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(_ENCODINGS)}, got {self.encoding!r}")
        if self.sample_rate_hz <= 0:
            raise ValueError(f"sample_rate_hz must be positive, got {self.sample_rate_hz}")
        if self.chunk_ms <= 0 or self.chunk_samples == 0:
            raise ValueError(f"chunk_ms={self.chunk_ms} holds no whole sample at {self.sample_rate_hz} Hz")

    @property
    def chunk_samples(self) -> int:
        """Samples per AudioChunk (the last chunk of a stream may be shorter)."""
        return self.sample_rate_hz * self.chunk_ms // 1000

    def to_proto(self) -> asr_pb2.StreamConfig:
        return asr_pb2.StreamConfig(
            language=self.language,
            sample_rate_hz=self.sample_rate_hz,
            encoding=_ENCODINGS[self.encoding][0],
            block_frames=self.block_frames,
            interim_results=self.interim_results,
            context=self.context,
            voice_activity=asr_pb2.VoiceActivity(enabled=True, end_silence_ms=self.end_silence_ms)
            if self.voice_activity
            else None,
            allow_untrained_language=self.allow_untrained_language,
        )

    def controls_after(self, start_sample: int, end_sample: int) -> list[asr_pb2.Control]:
        """The controls due once the audio [start_sample, end_sample) is sent (context updates, then Finalize)."""
        rate = self.sample_rate_hz
        controls = [
            asr_pb2.Control(update_context=asr_pb2.UpdateContext(context=text))
            for seconds, text in self.context_updates
            if start_sample < round(seconds * rate) <= end_sample
        ]
        every = self.finalize_every_ms * rate // 1000
        if every and end_sample // every > start_sample // every:
            controls.append(asr_pb2.Control(finalize=asr_pb2.Finalize()))
        return controls


def encode_pcm(samples: np.ndarray, encoding: EncodingName) -> bytes:
    """Mono float samples in [-1, 1] -> the raw little-endian bytes AudioChunk.data carries.

    ``pcm_s16le`` clips to [-1, 1] and rounds ``x * 32767`` to the nearest integer (so +1.0 does not
    overflow); ``f32le`` passes the values through unchanged.
    """
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono samples of shape (n,), got shape {x.shape}")
    if encoding == "pcm_s16le":
        return np.rint(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    if encoding == "f32le":
        return x.astype("<f4").tobytes()
    raise ValueError(f"encoding must be one of {sorted(_ENCODINGS)}, got {encoding!r}")


class CommittedWord(NamedTuple):
    index: int
    text: str
    start_ms: int
    end_ms: int


class TimedResult(NamedTuple):
    """A Result with the client's ``time.monotonic()`` when it arrived (for latency measurements)."""

    received_at: float
    result: asr_pb2.Result


@dataclass
class StreamOutcome:
    """Everything one stream returned."""

    session_id: str = ""
    # The effective config the server echoed in Started.
    config: asr_pb2.StreamConfig | None = None
    committed: list[CommittedWord] = field(default_factory=list)
    # The interim tail of the latest Result.
    interim: str = ""
    results: list[TimedResult] = field(default_factory=list)
    # None when the server closed without sending Final.
    final: asr_pb2.Final | None = None
    # The client's ``time.monotonic()`` when Started and Final arrived (None: not received).
    started_received_at: float | None = None
    final_received_at: float | None = None
    # Resume: the secret from the first Started, and the last durable boundary the server acknowledged.
    resume_token: str = ""
    durable_sample_offset: int = 0
    acked_words: int = 0
    # The sample from which this connection sent audio (0, or where a resume restarted).
    resumed_from_sample: int = 0
    # The connection was dropped on purpose (`drop_after_samples`) before the stream ended.
    dropped: bool = False
    # Every Ack received (durable segment boundaries), in order.
    acks: list[asr_pb2.Ack] = field(default_factory=list)
    # Live semantics: Started's warnings, the voice gate's speech boundaries, the answers to Finalize and
    # UpdateContext controls, in order.
    warnings: list[str] = field(default_factory=list)
    speech: list[asr_pb2.SpeechEvent] = field(default_factory=list)
    finalized: list[asr_pb2.Finalized] = field(default_factory=list)
    context_updates: list[asr_pb2.ContextUpdated] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The transcript per the API contract: committed words joined by single spaces."""
        return " ".join(w.text for w in self.committed)

    def check_append_only(self) -> None:
        """Raise ValueError unless committed word indices are exactly 0, 1, 2, ... in order."""
        for expected, word in enumerate(self.committed):
            if word.index != expected:
                raise ValueError(
                    f"committed word #{expected} ({word.text!r}) has index {word.index}, expected {expected}"
                )

    def add(self, response: asr_pb2.RecognizeResponse, received_at: float) -> asr_pb2.Result | None:
        """Fold one response in; returns the Result if it was one."""
        kind = response.WhichOneof("response")
        if kind == "started":
            started = response.started
            self.session_id = started.session_id
            self.config = started.config
            self.started_received_at = received_at
            self.resume_token = started.resume_token or self.resume_token
            self.resumed_from_sample = started.resume_from_sample
            self.warnings = list(started.warnings)
        elif kind == "result":
            result = response.result
            # After a resume the server may send words again with their original indices: keep one of each.
            self.committed.extend(
                CommittedWord(w.index, w.text, w.start_ms, w.end_ms)
                for w in result.committed
                if w.index >= len(self.committed)
            )
            self.interim = result.interim
            self.results.append(TimedResult(received_at, result))
            return result
        elif kind == "ack":
            self.acks.append(response.ack)
            self.durable_sample_offset = response.ack.durable_sample_offset
            self.acked_words = response.ack.committed_words
        elif kind == "final":
            self.final = response.final
            self.final_received_at = received_at
        elif kind == "speech":
            self.speech.append(response.speech)
        elif kind == "finalized":
            self.finalized.append(response.finalized)
        elif kind == "context_updated":
            self.context_updates.append(response.context_updated)
        else:  # a newer server's message kind: ignore, per proto3 forward compatibility
            log.debug("ignoring unknown response kind %r", kind)
        return None


#: ``on_chunk_sent(end_sample, sent_at)``: a chunk ending at this sample offset of the stream (exclusive) was
#: handed to gRPC at ``time.monotonic()`` ``sent_at``.
ChunkSent = Callable[[int, float], None]
#: ``on_half_close(sent_at)``: the client half-closed the stream at ``time.monotonic()`` ``sent_at``.
HalfClosed = Callable[[float], None]


async def _send(
    call: grpc.aio.StreamStreamCall,
    options: StreamOptions,
    audio: bytes,
    on_chunk_sent: ChunkSent | None = None,
    on_half_close: HalfClosed | None = None,
    resume: asr_pb2.Resume | None = None,
    started: asyncio.Future[int] | None = None,
    drop_after_samples: int | None = None,
) -> bool:
    """Config, then the chunks (paced on a fixed schedule when realtime), then half-close. With `resume`, the
    audio restarts where the server's Started says. Returns False if it stopped at `drop_after_samples`
    without half-closing (a dropped connection, on purpose)."""
    config = options.to_proto()
    if resume is not None:
        config.resume.CopyFrom(resume)
    await call.write(asr_pb2.RecognizeRequest(config=config))
    width = _ENCODINGS[options.encoding][1]
    first = await started if resume is not None and started is not None else 0  # the sample to resend from
    step = options.chunk_samples * width
    chunk_s = options.chunk_ms / 1000.0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for k, start in enumerate(range(first * width, len(audio), step)):
        if drop_after_samples is not None and start // width >= drop_after_samples:
            if started is not None:
                await started  # drop only once the session exists (its id and token are what a resume needs)
            return False
        if options.realtime:
            # Chunk k at t0 + k * chunk: an absolute schedule, so write/sleep overheads never accumulate.
            delay = t0 + k * chunk_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        data = audio[start : start + step]
        await call.write(asr_pb2.RecognizeRequest(audio=asr_pb2.AudioChunk(data=bytes(data))))
        end = min(start + step, len(audio)) // width
        if on_chunk_sent is not None:
            on_chunk_sent(end, time.monotonic())
        # A resumed stream sends the controls due exactly at its resume point again: the server's checkpoint may
        # precede them, and a Finalize or UpdateContext that was already applied does nothing the second time.
        resent = 1 if k == 0 and first > 0 else 0
        for control in options.controls_after(start // width - resent, end):
            await call.write(asr_pb2.RecognizeRequest(control=control))
    await call.done_writing()
    if on_half_close is not None:
        on_half_close(time.monotonic())
    return True


async def recognize(
    channel: grpc.aio.Channel,
    samples: np.ndarray | bytes | memoryview,
    options: StreamOptions = StreamOptions(),
    on_result: Callable[[asr_pb2.Result], None] | None = None,
    metadata: Sequence[tuple[str, str]] | None = None,
    on_started: Callable[[asr_pb2.Started], None] | None = None,
    on_chunk_sent: ChunkSent | None = None,
    on_half_close: HalfClosed | None = None,
    resume_from: StreamOutcome | None = None,
    drop_after_samples: int | None = None,
    max_resumes: int = 0,
) -> StreamOutcome:
    """Stream ``samples`` (mono float in [-1, 1] at ``options.sample_rate_hz``) through one Recognize call.

    Writing and reading run concurrently, so Results arrive (and ``on_result`` fires) while audio is
    still being sent. Returns when the server closes the call. A gRPC error status raises the
    ``grpc.aio.AioRpcError`` carrying the server's code and details.

    ``on_chunk_sent(end_sample, sent_at)`` fires after each AudioChunk is written (``end_sample``: the
    stream's sample offset where that chunk ends) and ``on_half_close(sent_at)`` after the half-close,
    both with ``time.monotonic()`` (the clock of ``TimedResult.received_at``): latency measurements.

    ``samples`` may also be audio already encoded in ``options.encoding`` (``bytes`` or a ``memoryview``,
    a whole number of samples): many streams can then share one buffer without a copy each.

    Resume: ``resume_from`` is the outcome of an earlier connection of the same stream (same ``samples``):
    the call continues that session, resends the audio from the server's durable boundary on, and drops the
    words the client already holds (they come back with the same indices), so the returned outcome is the
    whole stream's. ``drop_after_samples`` ends the connection without half-closing once the audio before
    that sample is sent (for demos and tests of resume); the outcome then has ``dropped`` set and no Final.
    ``max_resumes``: when the connection fails with a status a resume can mend (the ingress replica died, the
    network dropped, the server timed the stream out), resume the session this many times at most.
    """
    audio = _audio_bytes(samples, options.encoding)  # before the call: a bad input never opens a stream
    callbacks = dict(on_result=on_result, metadata=metadata, on_started=on_started, on_chunk_sent=on_chunk_sent,
                     on_half_close=on_half_close)  # fmt: skip
    for attempt in range(max_resumes + 1):
        try:
            return await _recognize_once(channel, audio, options, resume_from, drop_after_samples, **callbacks)
        except _StreamBroken as broken:
            if attempt == max_resumes or not broken.outcome.resume_token:
                raise broken.error from None
            log.warning("stream %s broke (%s); resuming", broken.outcome.session_id, broken.error.code().name)
            resume_from, drop_after_samples = broken.outcome, None
            await asyncio.sleep(RESUME_BACKOFF_S * (attempt + 1))
    raise AssertionError("unreachable")


#: Statuses after which the same session can continue on a new connection.
RESUMABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
)
RESUME_BACKOFF_S = 0.5


class _StreamBroken(Exception):
    """A call failed with a resumable status; carries what the stream had received so far."""

    def __init__(self, error: grpc.aio.AioRpcError, outcome: StreamOutcome) -> None:
        super().__init__(str(error))
        self.error, self.outcome = error, outcome


async def _recognize_once(
    channel: grpc.aio.Channel,
    audio: bytes | memoryview,
    options: StreamOptions,
    resume_from: StreamOutcome | None,
    drop_after_samples: int | None,
    on_result: Callable[[asr_pb2.Result], None] | None,
    metadata: Sequence[tuple[str, str]] | None,
    on_started: Callable[[asr_pb2.Started], None] | None,
    on_chunk_sent: ChunkSent | None,
    on_half_close: HalfClosed | None,
) -> StreamOutcome:
    """One Recognize call (see `recognize`); a resumable failure raises `_StreamBroken`."""
    call = asr_pb2_grpc.RecognizerStub(channel).Recognize(metadata=metadata)
    first_status = _FirstStatus(call)
    outcome = StreamOutcome()
    resume = None
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    if resume_from is not None:
        if not resume_from.session_id or not resume_from.resume_token:
            raise ValueError("resume_from has no session id and resume token (the server keeps no session state?)")
        resume = asr_pb2.Resume(session_id=resume_from.session_id, resume_token=resume_from.resume_token)
        outcome.committed = list(resume_from.committed)
        outcome.results = list(resume_from.results)
        outcome.resume_token = resume_from.resume_token
        outcome.session_id = resume_from.session_id

    writer = asyncio.create_task(
        _send(call, options, audio, on_chunk_sent, on_half_close, resume, started, drop_after_samples)
    )

    def _on_writer_done(task: asyncio.Task[None]) -> None:
        # A failed writer would leave the reader waiting for a server that waits for audio: end the call.
        if _unexpected_writer_error(task) is not None:
            call.cancel()

    def _on_writer_stopped(task: asyncio.Task[bool]) -> None:
        if not task.cancelled() and task.exception() is None and task.result() is False:
            outcome.dropped = True
            call.cancel()

    writer.add_done_callback(_on_writer_done)
    writer.add_done_callback(_on_writer_stopped)
    try:
        async for response in call:
            result = outcome.add(response, time.monotonic())
            if result is not None and on_result is not None:
                on_result(result)
            if response.WhichOneof("response") == "started":
                if not started.done():
                    started.set_result(response.started.resume_from_sample)
                if on_started is not None:
                    on_started(response.started)
    except grpc.aio.AioRpcError as error:
        if outcome.dropped:
            return outcome
        real = await first_status.unmask(error)
        if real is not None:
            if real.code() in RESUMABLE_CODES and outcome.session_id:
                raise _StreamBroken(real, outcome) from None
            raise real from None
        # The server had closed the call with OK; only a late write failed. The stream ended normally.
    except asyncio.CancelledError as cancelled:
        if outcome.dropped:
            return outcome
        # The writer's own failure cancelled the call: report that, not the resulting cancellation.
        writer_error = _unexpected_writer_error(writer)
        if writer_error is not None:
            raise writer_error from cancelled
        raise
    finally:
        if not writer.done():
            writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        if not call.done():
            call.cancel()
    writer_error = _unexpected_writer_error(writer)
    if writer_error is not None:
        raise writer_error
    return outcome


def _audio_bytes(samples: np.ndarray | bytes | memoryview, encoding: EncodingName) -> bytes | memoryview:
    """What the writer slices into AudioChunks: encoded bytes (pre-encoded input is checked, not copied)."""
    if isinstance(samples, (bytes, bytearray, memoryview)):
        view = memoryview(samples).cast("B")
        width = _ENCODINGS[encoding][1]
        if len(view) % width:
            raise ValueError(f"encoded audio has {len(view)} bytes; expected a multiple of {width} for {encoding}")
        return view
    return encode_pcm(samples, encoding)


def _unexpected_writer_error(writer: asyncio.Task[None]) -> BaseException | None:
    """The writer's exception unless it only says the call had ended (the reader reports the status)."""
    if not writer.done() or writer.cancelled():
        return None
    error = writer.exception()
    if isinstance(error, (grpc.aio.AioRpcError, asyncio.InvalidStateError)):
        return None
    return error


# What grpc.aio reports when a write fails because the call has just ended (grpc/grpc#36066).
_CORE_WRITE_FAILURE = (grpc.StatusCode.INTERNAL, "Internal error from Core")


def _is_core_write_failure(error: grpc.aio.AioRpcError) -> bool:
    return (error.code(), error.details()) == _CORE_WRITE_FAILURE


def _resolved(awaitable: Coroutine[Any, Any, T]) -> T | None:
    """The value of a status getter of a finished call, without awaiting (it never suspends then)."""
    try:
        awaitable.send(None)
    except StopIteration as stop:
        return stop.value
    awaitable.close()
    return None


def _status_now(call: grpc.aio.Call) -> grpc.aio.AioRpcError | None:
    """A finished call's status: None for OK, else the AioRpcError a reader would raise."""
    code = _resolved(call.code())
    if code is None or code == grpc.StatusCode.OK:
        return None
    return grpc.aio.AioRpcError(
        code,
        _resolved(call.initial_metadata()),
        _resolved(call.trailing_metadata()),
        _resolved(call.details()),
        _resolved(call.debug_error_string()),
    )


class _FirstStatus:
    """Keeps the first status a call reports, to recover the server's status when a write masks it.

    grpc.aio bug grpc/grpc#36066: when the server ends the call (abort, or early OK) while a client
    write is in flight, the failed write overwrites the server's status with INTERNAL "Internal error
    from Core". The server's status usually arrives first (kept here); when the write failure wins,
    the server's status overwrites it shortly after (read from the call again).
    """

    def __init__(self, call: grpc.aio.Call) -> None:
        self._call = call
        self._seen = False
        self._first: grpc.aio.AioRpcError | None = None
        call.add_done_callback(self._on_done)

    def _on_done(self, call: grpc.aio.Call) -> None:
        if not self._seen:
            self._seen = True
            self._first = _status_now(call)

    async def unmask(self, error: grpc.aio.AioRpcError, grace_s: float = 0.1) -> grpc.aio.AioRpcError | None:
        """The call's real status for the reader's ``error``: an AioRpcError, or None for OK."""
        if not _is_core_write_failure(error):
            return error
        if self._seen and (self._first is None or not _is_core_write_failure(self._first)):
            return self._first
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while True:
            current = _status_now(self._call) if self._call.done() else error
            if current is None or not _is_core_write_failure(current):
                return current
            if loop.time() >= deadline:
                return error  # a genuine internal failure
            await asyncio.sleep(0.005)


async def recognize_reconnecting(
    channel: grpc.aio.Channel,
    samples: np.ndarray | bytes | memoryview,
    options: StreamOptions,
    reconnect_after_s: float,
    **callbacks: Any,
) -> StreamOutcome:
    """`recognize`, but the connection is dropped once after `reconnect_after_s` of audio and the stream resumed
    on a new call (the server restores the session from its last durable boundary): the outcome equals an
    uninterrupted run's. For demos and tests of resume; a real client resumes after a real drop the same way."""
    dropped = await recognize(
        channel, samples, options, drop_after_samples=round(reconnect_after_s * options.sample_rate_hz), **callbacks
    )
    if not dropped.dropped:
        return dropped  # the stream ended before the drop point
    return await recognize(channel, samples, options, resume_from=dropped, **callbacks)  # max_resumes passes on


async def wait_until_serving(channel: grpc.aio.Channel, timeout_s: float) -> None:
    """Wait until the server's `grpc.health.v1` service says SERVING (a server that is still starting refuses
    connections or answers UNAVAILABLE); raises TimeoutError after `timeout_s`."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = asyncio.get_running_loop().time() + timeout_s
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError(f"the server did not report SERVING within {timeout_s:g} s")
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=min(remaining, 5.0))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
        await asyncio.sleep(min(0.5, max(0.0, deadline - asyncio.get_running_loop().time())))


def tls_credentials(ca: str | Path, cert: str | Path | None = None, key: str | Path | None = None) -> grpc.ChannelCredentials:
    """Channel credentials that trust the server certificates `ca` (a PEM file) signed; with `cert` and `key` (PEM
    files, both or neither), the client's own certificate for a server that requires mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError(f"client certificate {cert} and key {key}: give both for mutual TLS, or neither")

    def pem(path: str | Path) -> bytes:
        data = Path(path).read_bytes()
        if b"-----BEGIN " not in data:
            raise ValueError(f"{path} holds no PEM block; expected a PEM file (-----BEGIN ...)")
        return data

    return grpc.ssl_channel_credentials(
        root_certificates=pem(ca),
        private_key=None if key is None else pem(key),
        certificate_chain=None if cert is None else pem(cert),
    )


class RecognizerClient:
    """A channel to one Recognizer endpoint; ``async with RecognizerClient(target) as c``. Plaintext, or TLS with
    ``credentials`` (:func:`tls_credentials`)."""

    def __init__(
        self,
        target: str,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.max_message_bytes = max_message_bytes
        self.credentials = credentials
        self._channel: grpc.aio.Channel | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            raise RuntimeError("RecognizerClient is not open: use `async with RecognizerClient(target) as client`")
        return self._channel

    async def __aenter__(self) -> RecognizerClient:
        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        if self.credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(self.target, self.credentials, options=options)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def recognize(
        self,
        samples: np.ndarray | bytes | memoryview,
        options: StreamOptions = StreamOptions(),
        *,
        reconnect_after_s: float | None = None,
        **keywords: Any,
    ) -> StreamOutcome:
        """One stream over this client's channel: :func:`recognize` with the same keyword arguments (callbacks,
        metadata, ``resume_from``, ``max_resumes``), or :func:`recognize_reconnecting` with
        ``reconnect_after_s``."""
        if reconnect_after_s is not None:
            return await recognize_reconnecting(self.channel, samples, options, reconnect_after_s, **keywords)
        return await recognize(self.channel, samples, options, **keywords)
