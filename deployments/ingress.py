"""The gRPC entry of the served pipeline: one `Recognize` call is one stream, owned here for its whole life.

The ingress runs on Serve's gRPC proxy (bidirectional streaming, Ray >= 2.55). Per stream it keeps the session
(state and policy: segments, commit, events) and drives it with a `StreamDriver` whose stages are the
`FeatureExtractor`, `CausalEncoder` and `Decoder` deployments, called through deployment handles. Encoder and
decoder calls carry `session_id = "<stream>/<segment>"`, which the consistent-hash router turns into a replica:
a stream's calls stay on one replica for a segment, and its next segment may land on any other (K/V is empty at
a roll). Errors become gRPC statuses with one-line messages; one stream's error never touches another's.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import grpc
from google.protobuf.message import DecodeError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.grpc_util import gRPCInputStream
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram
from torch import Tensor

from deployments.grpc_api import (
    SAMPLE_BYTES,
    InvalidRequest,
    ResponseWriter,
    check_context,
    decode_audio,
    effective_config,
    session_options,
    stage_timings,
)
from deployments.auth import KeyRing, QuotaExceeded, Unauthenticated, load_keys
from deployments.durability import DurableStream, StoreConnection, store_url
from deployments.session_store import SessionStore, StaleOwner, StoreUnavailable
from deployments.stage_replicas import ModelSpec, reserve_threads
from grpc_health.v1 import health_pb2
from pipeline.features import HOP_LENGTH, SAMPLE_RATE
from pipeline.options import SessionOptions
from pipeline.rolling import UpdateResult
from pipeline.session import StreamingSession
from pipeline.stages import DecodeRequest, EncodeRequest, FeatureRequest, FeatureResult, StageAtCapacity, StageMiss
from pipeline.stream_driver import StreamDriver
from protos.qwen3stream.v1 import asr_pb2

log = logging.getLogger(__name__)

_LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000, 10000]
#: Audio a stream's ingress reads ahead of what it has run (`ReadAhead`): two blocks of the default size, so that
#: the next block can be whole and encoded while an update is in flight.
READ_AHEAD_SECONDS = 4.0


class ServedStages:
    """`AsyncStages` over the stage deployments' handles; notes which replicas served each stream."""

    def __init__(self, features: DeploymentHandle, encoder: DeploymentHandle, decoder: DeploymentHandle) -> None:
        self.features, self.encoder, self.decoder = features, encoder, decoder
        self._replicas: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))

    async def extract(self, request: FeatureRequest) -> FeatureResult:
        return await self.features.extract.remote(request)

    async def encode(self, request: EncodeRequest) -> Tensor | StageMiss | StageAtCapacity:
        return await self._call("encoder", self.encoder, "encode", request)

    async def update(self, request: DecodeRequest) -> UpdateResult | StageMiss | StageAtCapacity:
        return await self._call("decoder", self.decoder, "update", request)

    async def _call(self, stage: str, handle: DeploymentHandle, method: str, request):  # noqa: ANN001, ANN202
        """One stage call, routed by stream and segment. A replica that dies (killed, node lost, replaced by an
        upgrade) is retried until the deadline: the call lands on a live replica, which answers with a miss
        unless it holds the stream's state, and the owner replays the segment there."""
        route = _route(request.stream_id, request.segment_index)
        deadline = time.monotonic() + REPLICA_LOSS_DEADLINE_S
        while True:
            try:
                replica, answer = await getattr(handle.options(session_id=route), method).remote(request)
                break
            except _REPLICA_LOST as error:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s replica lost during %s's call (%s); retrying", stage, request.stream_id, type(error).__name__)
                await asyncio.sleep(REPLICA_RETRY_S)
        self._replicas[request.stream_id][stage].add(replica)
        return answer

    def replicas_of(self, stream_id: str) -> dict[str, int]:
        """How many replicas of each stage served the stream (and forget it)."""
        return {stage: len(replicas) for stage, replicas in self._replicas.pop(stream_id, {}).items()}

    async def release(self, stream_id: str, segment_index: int) -> None:
        route = _route(stream_id, segment_index)
        await self.encoder.options(session_id=route).release.remote(stream_id, segment_index)
        await self.decoder.options(session_id=route).release.remote(stream_id, segment_index)


#: The retry hint of a refused stream.
RETRY_AFTER_MS = 1000


class Overloaded(RuntimeError):
    """This replica already holds as many streams as it admits."""


class Idle(TimeoutError):
    """The client sent nothing for too long."""


class UnknownSession(LookupError):
    """A resume names no session this store holds, or the wrong token (the two are not told apart)."""


class NoSessionStore(RuntimeError):
    """A resume reached a server that keeps no session state."""


#: A stage call whose replica died is retried for this long (the controller starts a replacement in seconds).
REPLICA_LOSS_DEADLINE_S = 60.0
REPLICA_RETRY_S = 0.5
_REPLICA_LOST = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError)


def _route(stream_id: str, segment_index: int) -> str:
    """The routing key of a stream's stage calls: one replica per segment."""
    return f"{stream_id}/{segment_index}"


@serve.deployment
class Ingress:
    """`qwen3stream.v1.Recognizer` and `grpc.health.v1.Health` on Serve's gRPC proxy."""

    def __init__(
        self,
        features: DeploymentHandle,
        encoder: DeploymentHandle,
        decoder: DeploymentHandle,
        spec: ModelSpec,
        defaults: SessionOptions | None = None,
        store: str | None = None,
        session_ttl_s: float = 3600.0,
        max_streams: int = 256,
        idle_timeout_s: float = 30.0,
        api_keys_file: str | None = None,
    ) -> None:
        """`store`: the session store's Redis URL (else `REDIS_URL`; neither: no resume). `session_ttl_s`: how
        long an idle session's state is kept for a resume. `max_streams`: streams this replica admits (more
        are refused with RESOURCE_EXHAUSTED at once, never queued). `idle_timeout_s`: a client silent this long
        is ended (its session stays resumable). `api_keys_file`: API keys (`deployments.auth`; else the
        `QWEN3_STREAM_API_KEYS` variable; neither: no authentication)."""
        reserve_threads()
        # The tokenizer and config for prompts and text (the stages hold the K/V and do the model work), on the
        # CPU whatever the stages' device: ingress replicas run on CPU nodes.
        self.model = replace(spec, device="cpu", dtype=None).load()
        self.defaults = defaults or SessionOptions()
        self.stages = ServedStages(features, encoder, decoder)
        self.store = StoreConnection(store_url(store), session_ttl_s)
        self.owner = f"ingress-{uuid.uuid4().hex[:12]}"  # this replica, in leases
        self.max_streams, self.idle_timeout_s = max_streams, idle_timeout_s
        keys = load_keys(api_keys_file)
        self.keys = None if keys is None else KeyRing(keys)
        self.active = Gauge("qwen3_stream_active_streams", "streams open on this ingress replica")
        self.update_latency = Histogram(
            "qwen3_stream_update_latency_ms",
            "from the chunk that completed a block to its result being sent",
            _LATENCY_BOUNDARIES_MS,
        )
        self.replays = Counter("qwen3_stream_replays", "stage calls answered by replaying a segment", ("stage",))
        self.lag = Gauge("qwen3_stream_lag_sec", "how far the newest result trails the audio received")
        self.errors = Counter("qwen3_stream_errors", "streams ended with an error status", ("code",))
        self._open = 0
        # No `settle_host()` here, unlike the stage replicas: a cancelled call's cleanup (its lease released) runs
        # when the collector finds the call's cycle, and a rarer young collection delayed that by seconds (200
        # dropped calls, tests/faults/test_hostile_input.py: 22.6 s instead of 8.4, mostly waiting for leases).

    async def Recognize(  # noqa: N802 (the RPC's name)
        self, stream: gRPCInputStream, grpc_context=None  # noqa: ANN001 (Serve's RayServegRPCContext)
    ) -> AsyncIterator[asr_pb2.RecognizeResponse]:
        driver: StreamDriver | None = None
        reader: ReadAhead | None = None
        durable: DurableStream | None = None
        key = None
        finished = False
        self._open += 1
        self.active.set(self._open)
        try:
            if self._open > self.max_streams:
                raise Overloaded(
                    f"this ingress replica holds {self.max_streams} streams; retry in {RETRY_AFTER_MS} ms "
                    "(another replica may have room)"
                )
            if self.keys is not None:
                key = self.keys.authenticate(grpc_context.invocation_metadata() if grpc_context is not None else [])
                self.keys.admit(key)
            first = await self._next(stream)
            if first is None or first.WhichOneof("request") != "config":
                raise InvalidRequest("the first message must be a StreamConfig")
            store = await self.store.get()
            if first.config.HasField("resume"):
                session, writer, durable, started = await self._resume(first.config.resume, store)
            else:
                session, writer, durable, started = await self._open_session(first.config, store)
            config = started.config
            driver = StreamDriver(session, self.stages)
            yield asr_pb2.RecognizeResponse(started=started)
            reader = ReadAhead(lambda: self._next(stream), driver, config.encoding)
            received = session.sample_offset
            while (arrival := await reader.next()) is not None:
                request, arrived = arrival.request, arrival.time
                kind = request.WhichOneof("request")
                if kind is None:
                    raise InvalidRequest("an empty RecognizeRequest (no config, audio or control); send audio or half-close")
                if kind == "config":
                    raise InvalidRequest("a second StreamConfig; the config is sent once, first")
                if kind == "audio":
                    received += arrival.samples
                    events = await driver.process()
                else:
                    control = request.control.WhichOneof("control")
                    if control is None:
                        raise InvalidRequest("an empty Control; set finalize, keep_alive or update_context")
                    if control == "keep_alive":  # any message resets the idle clock; nothing else to do
                        continue
                    if control == "update_context":
                        yield asr_pb2.RecognizeResponse(context_updated=self._update_context(session, request.control))
                        continue
                    first_word = writer.next_index
                    events = await driver.finalize_now()
                for event in events:
                    yield writer.response(event)
                    self.update_latency.observe(1000 * (time.perf_counter() - arrived))
                    self.lag.set(received / SAMPLE_RATE - event.audio_sec)
                    if event.checkpoint is not None and durable is not None:
                        ack = await durable.roll(event, session)
                        if ack is not None:
                            yield asr_pb2.RecognizeResponse(ack=ack)
                if durable is not None and (ack := await durable.flush()) is not None:
                    yield asr_pb2.RecognizeResponse(ack=ack)
                if kind == "control":  # the Finalize's answer, after the Results it caused
                    yield asr_pb2.RecognizeResponse(
                        finalized=asr_pb2.Finalized(
                            first_word_index=first_word,
                            end_word_index=writer.next_index,
                            through_sample=session.frames_encoded * HOP_LENGTH,
                        )
                    )
            if stream.is_cancelled():
                # The client went away (Serve's proxy ends the input as for a half-close, with this flag): no
                # end of audio, no Final; the session stays resumable (`finally` releases its lease).
                log.info("session %s: client gone; kept for a resume", session.stream_id)
                return
            for event in await driver.finish():
                yield writer.response(event)
            stats = self._stats(session, driver, writer)
            yield writer.final(session.transcript, session.token_ids, session.final_hypothesis_text, stats)
            # Only once the Final is out is the session over: a client that went away while it was being made
            # (its cancel can reach this replica after the end of its input) is cancelled before this point, and
            # its session stays resumable.
            finished = True
            if durable is not None:
                await durable.end(finished=True)
        except InvalidRequest as error:
            self._fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise
        except UnknownSession as error:
            self._fail(grpc_context, grpc.StatusCode.NOT_FOUND, str(error))
            raise
        except NoSessionStore as error:
            self._fail(grpc_context, grpc.StatusCode.FAILED_PRECONDITION, str(error))
            raise
        except StaleOwner as error:
            self._fail(grpc_context, grpc.StatusCode.ABORTED, f"{error}; this connection's stream stops here")
            raise
        except StoreUnavailable as error:
            self._fail(grpc_context, grpc.StatusCode.UNAVAILABLE, f"{error}; retry shortly")
            raise
        except StageAtCapacity as error:
            self._fail(grpc_context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{error}; retry in {RETRY_AFTER_MS} ms or elsewhere")
            raise
        except (Overloaded, QuotaExceeded, Unauthenticated) as error:
            # Refusals come in crowds (an overload, a client retrying without a key). Ending the call without an
            # exception costs Serve 3.7 ms instead of 58 (its error path pickles and logs the traceback twice);
            # its proxy passes on the status this call set only together with a message, so one empty
            # RecognizeResponse goes before the status (clients ignore it; the API says so).
            code = grpc.StatusCode.UNAUTHENTICATED if isinstance(error, Unauthenticated) else grpc.StatusCode.RESOURCE_EXHAUSTED
            self._fail(grpc_context, code, str(error))
            yield asr_pb2.RecognizeResponse()
            return
        except Idle as error:
            self._fail(grpc_context, grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
            raise
        finally:
            if reader is not None:
                reader.close()
            self._open -= 1
            self.active.set(self._open)
            if key is not None:
                self.keys.leave(key)
            if driver is not None:
                for stage, count in (("encoder", driver.stats.encoder_replays), ("decoder", driver.stats.decoder_replays)):
                    if count:
                        self.replays.inc(count, tags={"stage": stage})
                await driver.close()
                self.stages.replicas_of(driver.session.stream_id)  # forget the stream
            if durable is not None and not finished:
                await durable.end(finished=False)

    async def _open_session(
        self, config: asr_pb2.StreamConfig, store: SessionStore | None
    ) -> tuple[StreamingSession, ResponseWriter, DurableStream | None, asr_pb2.Started]:
        options = session_options(config, self.defaults)
        session_id = uuid.uuid4().hex
        effective = effective_config(config, options)
        try:
            session = StreamingSession(self.model, options, stream_id=session_id, keep_replay=True)
        except ValueError as error:  # what only the tokenizer can check: the context's token count
            raise InvalidRequest(str(error)) from None
        durable, token = None, ""
        if store is not None:
            lease = await store.create(session_id, self.owner, effective.SerializeToString())
            durable, token = DurableStream(store, lease), lease.resume_token or ""
        started = asr_pb2.Started(session_id=session_id, config=effective, resume_token=token, warnings=session.warnings)
        return session, ResponseWriter(time_precision_sec=session.word_time_precision_sec), durable, started

    async def _resume(
        self, resume: asr_pb2.Resume, store: SessionStore | None
    ) -> tuple[StreamingSession, ResponseWriter, DurableStream, asr_pb2.Started]:
        """Continue a session from its last durable boundary, taking it over from any earlier connection."""
        if store is None:
            raise NoSessionStore("this server keeps no session state (no Redis configured); start a new stream")
        well_formed = 0 < len(resume.session_id) <= 128 and not set("{}") & set(resume.session_id)
        resumed = await store.resume(resume.session_id, resume.resume_token, self.owner) if well_formed else None
        if resumed is None:  # an unknown (or expired) session, a malformed id and a wrong token answer alike
            raise UnknownSession("no session with that id and resume token (it may have expired)")
        lease, state = resumed
        config = asr_pb2.StreamConfig.FromString(state.config)
        options = session_options(config, self.defaults)
        if state.checkpoint is None:  # before the first roll: from the start
            session = StreamingSession(self.model, options, stream_id=lease.session_id, keep_replay=True)
        else:
            session = StreamingSession.restore(self.model, state.checkpoint, stream_id=lease.session_id, keep_replay=True)
        started = asr_pb2.Started(
            session_id=lease.session_id,
            config=config,
            resume_from_sample=state.sample_offset,
            next_word_index=state.emitted_words,
            warnings=session.warnings,
        )
        log.info("session %s resumed at sample %d (%d words)", lease.session_id, state.sample_offset, state.emitted_words)
        writer = ResponseWriter(next_index=state.emitted_words, time_precision_sec=session.word_time_precision_sec)
        return session, writer, DurableStream(store, lease), started

    @staticmethod
    def _update_context(session: StreamingSession, control: asr_pb2.Control) -> asr_pb2.ContextUpdated:
        context = control.update_context.context
        check_context(context)
        try:
            segment = session.update_context(context)
        except ValueError as error:  # too many tokens
            raise InvalidRequest(str(error)) from None
        return asr_pb2.ContextUpdated(effective_segment_index=segment)

    def _stats(self, session: StreamingSession, driver: StreamDriver, writer: ResponseWriter) -> asr_pb2.FinalStats:
        return asr_pb2.FinalStats(
            audio_ms=round(session.audio_sec * 1000),
            segments=session.segment_index + 1,
            updates=driver.stats.updates,
            words=writer.next_index,
            replays=driver.stats.encoder_replays + driver.stats.decoder_replays,
            revised_words=session.revised_words,
            stage_timings=stage_timings(driver.stats.stage_seconds, self.stages.replicas_of(session.stream_id)),
        )

    async def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:  # noqa: N802
        """`grpc.health.v1.Health/Check`: this replica answers, so the application is serving."""
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def _next(self, stream: gRPCInputStream) -> asr_pb2.RecognizeRequest | None:
        """The client's next message (None after its half-close); a client silent for `idle_timeout_s` ends.

        The proxy forwards requests as bytes (`deployments.grpc_service`): they are parsed here, so a message
        that does not parse is the client's INVALID_ARGUMENT, not a silent end of its stream."""
        try:
            message = await asyncio.wait_for(anext(stream, None), self.idle_timeout_s)
        except TimeoutError:
            raise Idle(
                f"no message for {self.idle_timeout_s:g} s; send audio (or resume the session later)"
            ) from None
        if not isinstance(message, bytes):
            return message
        try:
            return asr_pb2.RecognizeRequest.FromString(message)
        except DecodeError as error:
            raise InvalidRequest(f"a message does not parse as a RecognizeRequest ({error})") from None

    def _fail(self, grpc_context, code: grpc.StatusCode, message: str) -> None:  # noqa: ANN001
        log.info("stream refused: %s: %s", code.name, message)
        self.errors.inc(tags={"code": code.name})
        if grpc_context is not None:
            grpc_context.set_code(code)
            grpc_context.set_details(message)



@dataclass(frozen=True)
class Arrival:
    """A client's request as `ReadAhead` hands it on."""

    request: asr_pb2.RecognizeRequest
    time: float  # when it arrived (`time.perf_counter()`), for the update latency
    samples: int = 0  # audio samples it carries
    held: bool = False  # audio the driver holds already


class ReadAhead:
    """A stream's requests, read as they arrive, also while the ingress is busy with the earlier ones.

    Audio goes to the stream's driver at once (`StreamDriver.hold_audio`), so that the driver can put it through
    the front end and encode the next block while an update is in flight; the ingress then runs what it completes
    (`StreamDriver.process`). Any other request waits its turn, and audio behind it is held only once the ingress
    has taken that request, so a Finalize covers exactly the audio sent before it. An error reading or decoding a
    request is raised in its turn, after what came before it. Reading pauses while `READ_AHEAD_SECONDS` of audio
    wait for the ingress (a client sending faster than the stream is served is held back by gRPC's flow control,
    as without read-ahead, instead of filling this replica's memory).
    """

    def __init__(
        self, read: Callable[[], Awaitable[asr_pb2.RecognizeRequest | None]], driver: StreamDriver, encoding: int
    ) -> None:
        self._read, self._driver, self._encoding = read, driver, encoding
        self._arrivals: deque[Arrival | InvalidRequest | Idle | None] = deque()  # None: the client half-closed
        self._arrived = asyncio.Event()
        self._unheld = 0  # requests waiting here that are not held audio: audio behind them waits too
        self._waiting_samples = 0  # audio samples of the requests waiting here
        self._taken = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def next(self) -> Arrival | None:
        """The next request in order (None after the client's half-close). Audio held right behind held audio is
        taken with it: one `process` runs what all of it completes."""
        while not self._arrivals:
            self._arrived.clear()
            await self._arrived.wait()
        arrival = self._arrivals.popleft()
        if isinstance(arrival, BaseException):
            raise arrival
        if arrival is None:
            return None
        if not arrival.held:
            self._unheld -= 1
            if arrival.request.WhichOneof("request") == "audio":
                self._driver.hold_audio(decode_audio(arrival.request.audio.data, self._encoding))
        else:
            while self._arrivals and isinstance(self._arrivals[0], Arrival) and self._arrivals[0].held:
                later = self._arrivals.popleft()
                arrival = replace(later, samples=arrival.samples + later.samples)
        self._waiting_samples -= arrival.samples
        self._taken.set()
        return arrival

    def close(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        try:
            while True:
                while self._waiting_samples >= READ_AHEAD_SECONDS * SAMPLE_RATE:
                    self._taken.clear()
                    await self._taken.wait()
                if (request := await self._read()) is None:
                    break
                audio = request.WhichOneof("request") == "audio"
                samples = len(request.audio.data) // SAMPLE_BYTES[self._encoding] if audio else 0
                arrival = Arrival(request, time.perf_counter(), samples)
                if audio and self._unheld == 0:
                    self._driver.hold_audio(decode_audio(request.audio.data, self._encoding))
                    arrival = replace(arrival, held=True)
                else:
                    self._unheld += 1
                self._waiting_samples += samples
                self._put(arrival)
        except (InvalidRequest, Idle) as error:
            self._put(error)
            return
        self._put(None)

    def _put(self, arrival: Arrival | InvalidRequest | Idle | None) -> None:
        self._arrivals.append(arrival)
        self._arrived.set()
