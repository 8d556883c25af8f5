"""TLS and mutual TLS on the public port, for real: certificates made in the test, Ray Serve started once.

`serve` with TLS files puts Serve's proxy on an internal port and the TLS front (`deployments/tls_front.py`) on the
public one; API keys are on, so the client's `authorization` metadata must pass through the front and the server's
statuses must come back through it. A second front with a client CA (mutual TLS) runs before the same proxy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from deployments.client import (
    RecognizerClient,
    StreamOptions,
    StreamOutcome,
    _FirstStatus,
    encode_pcm,
    tls_credentials,
    wait_until_serving,
)
from deployments.tls_front import FrontThread, TlsFiles, GrpcFront
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR
from protos.qwen3stream.v1 import asr_pb2
from tests.test_served import SESSION, _comparable, _free_port
from tests.test_session import _audio
from tests.tls_certs import Pair, TestCA

KEY = "tls-test-key-0123456789"
AUTH = [("authorization", f"Bearer {KEY}")]
AUDIO = _audio(6.5, seed=171)  # crosses a segment roll (5.76 s with these session options)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Pair
    client: Pair
    stranger_ca: Path  # a CA nobody trusts
    stranger: Pair  # a client certificate that CA signed


@dataclass(frozen=True)
class Served:
    tls: str  # the public port: the TLS front
    plaintext: str  # Serve's proxy behind it
    mutual: str  # a second front that requires client certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, stranger_ca = TestCA(directory), TestCA(directory, "stranger CA")
    return Pki(
        ca.pem,
        ca.issue("server", "qwen3-stream", server=True),
        ca.issue("client", "client-a", server=False),
        stranger_ca.pem,
        stranger_ca.issue("stranger", "client-b", server=False),
    )


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from deployments import server

    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(f"tls-test:{KEY}\n")
    one = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}
    settings = server.ServerSettings(
        args={"model": str(tiny_checkpoint), "tower": str(tiny_checkpoint / TOWER_OVERLAY_DIR), "slots": 8,
              "session": SESSION, "api_keys_file": str(keys)},  # fmt: skip
        port=_free_port(),
        num_cpus=4,
        deployment_options={name: one for name in ("Ingress", "FeatureExtractor", "CausalEncoder", "Decoder")},
        tls=TlsFiles(pki.server.cert, pki.server.key),
    )
    address = server.start(settings)
    assert server._front is not None
    plaintext = server._front.front.upstream
    mutual = FrontThread(GrpcFront(plaintext, TlsFiles(pki.server.cert, pki.server.key, client_ca=pki.ca), _free_port()))
    port = mutual.start()
    try:
        yield Served(address, plaintext, f"127.0.0.1:{port}")
    finally:
        mutual.stop()
        server.stop()


def _run(coroutine_factory: Callable) -> object:  # noqa: ANN001
    return asyncio.run(coroutine_factory())


@pytest.fixture(scope="module")
def plain(served: Served) -> StreamOutcome:
    """The recording streamed to Serve's proxy directly, in plaintext: what every TLS run must equal."""
    return _run(lambda: _stream(served.plaintext, None))


async def _stream(
    address: str, credentials: grpc.ChannelCredentials | None, options: StreamOptions = StreamOptions(chunk_ms=200), **keywords
) -> StreamOutcome:  # noqa: ANN003
    async with RecognizerClient(address, credentials=credentials) as client:
        await wait_until_serving(client.channel, 60)
        return await client.recognize(AUDIO, options, metadata=AUTH, **keywords)


async def _check(address: str, credentials: grpc.ChannelCredentials | None) -> health_pb2.HealthCheckResponse:
    channel = grpc.aio.insecure_channel(address) if credentials is None else grpc.aio.secure_channel(address, credentials)
    async with channel:
        return await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)


def test_a_stream_through_tls_equals_the_plaintext_run(served: Served, pki: Pki, plain: StreamOutcome) -> None:
    secure = _run(lambda: _stream(served.tls, tls_credentials(pki.ca)))
    assert secure.final is not None and plain.final is not None
    assert any(r.segment_final for _, r in secure.results)  # the forwarded stream crossed a roll (an Ack too)
    assert [_comparable(r) for _, r in secure.results] == [_comparable(r) for _, r in plain.results]
    assert secure.final.text == plain.final.text == secure.text
    assert list(secure.final.token_ids) == list(plain.final.token_ids)
    assert [a.durable_sample_offset for a in secure.acks] == [a.durable_sample_offset for a in plain.acks]
    secure.check_append_only()


def test_a_dropped_connection_through_tls_resumes_identically(served: Served, pki: Pki, plain: StreamOutcome) -> None:
    """The client's cancel passes through the front (the session stays resumable), and the resume too."""
    sessions: list[str] = []
    resumed = _run(
        lambda: _stream(
            served.tls, tls_credentials(pki.ca), reconnect_after_s=4.5, on_started=lambda s: sessions.append(s.session_id)
        )
    )
    assert len(sessions) == 2 and sessions[0] == sessions[1]  # the second connection resumed the first's session
    assert resumed.final is not None
    assert resumed.text == resumed.final.text == plain.final.text
    resumed.check_append_only()


def test_the_servers_status_and_details_come_back_through_the_front(served: Served, pki: Pki) -> None:
    async def without_key(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.AioRpcError:
        async with RecognizerClient(address, credentials=credentials) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.recognize(_audio(0.5, seed=172), StreamOptions())
            return caught.value

    plain = _run(lambda: without_key(served.plaintext, None))
    secure = _run(lambda: without_key(served.tls, tls_credentials(pki.ca)))
    assert secure.code() == plain.code() == grpc.StatusCode.UNAUTHENTICATED
    assert secure.details() == plain.details()
    assert _run(lambda: _check(served.tls, tls_credentials(pki.ca))).status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("who", ["plaintext-client", "client-trusting-another-ca"])
def test_a_client_without_tls_or_trust_gets_nothing_from_the_tls_port(served: Served, pki: Pki, who: str) -> None:
    credentials = None if who == "plaintext-client" else tls_credentials(pki.stranger_ca)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _run(lambda: _check(served.tls, credentials))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("who", ["no-certificate", "certificate-of-another-ca"])
def test_mutual_tls_refuses_a_client_without_a_trusted_certificate(served: Served, pki: Pki, who: str) -> None:
    stranger = None if who == "no-certificate" else pki.stranger
    credentials = tls_credentials(pki.ca, *((stranger.cert, stranger.key) if stranger else ()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _run(lambda: _check(served.mutual, credentials))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_a_client_with_a_certificate(served: Served, pki: Pki, plain: StreamOutcome) -> None:
    credentials = tls_credentials(pki.ca, pki.client.cert, pki.client.key)
    mutual = _run(lambda: _stream(served.mutual, credentials))
    assert mutual.final is not None and mutual.final.text == plain.final.text
    assert list(mutual.final.token_ids) == list(plain.final.token_ids)


def test_the_front_refuses_missing_or_non_pem_files(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ValueError, match="holds no PEM block"):
        TlsFiles(tmp_path / "junk.pem", pki.server.key).credentials()
    with pytest.raises(ValueError, match="expected a readable PEM file"):
        TlsFiles(pki.server.cert, tmp_path / "absent.key").credentials()


#: The slow-consumer front's bound: responses a stream may leave unread beyond its HTTP/2 window.
SLOW_BACKLOG = 8
#: The most audio the slow consumer sends before the test calls the bound missing (an hour: far past the bound).
SLOW_LIMIT_S = 3600.0
#: The slow consumer takes a write that has not completed for this long as the server no longer taking audio.
STALL_S = 5.0


async def _slow_consumer(address: str, ca: Path) -> tuple[grpc.StatusCode, str, float]:
    """Config, then audio as fast as the server takes it, reading nothing until the server stops taking audio (no
    write completes for STALL_S); then it reads what is there: the status and the seconds of audio sent. A small
    receive window (no BDP growth), so the front's bound is reached after few responses."""
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.secure_channel(address, tls_credentials(ca), options=options) as channel:
        call = channel.stream_stream("/qwen3stream.v1.Recognizer/Recognize")(metadata=AUTH)
        first_status = _FirstStatus(call)  # the server's status, should the write in flight mask it (grpc#36066)
        await call.write(asr_pb2.RecognizeRequest(config=StreamOptions().to_proto()).SerializeToString())
        chunk = asr_pb2.RecognizeRequest(audio=asr_pb2.AudioChunk(data=encode_pcm(AUDIO[:8000], "pcm_s16le")))
        sent = [0.0, time.monotonic()]  # seconds of audio, when the last write completed

        async def send() -> None:
            while sent[0] < SLOW_LIMIT_S:
                await call.write(chunk.SerializeToString())
                sent[:] = [sent[0] + 0.5, time.monotonic()]

        writer = asyncio.create_task(send())
        while not writer.done() and time.monotonic() - sent[1] < STALL_S:
            await asyncio.sleep(0.5)
        status = None
        try:
            async for _ in call:  # reading again: the responses in the window, then the status
                pass
        except grpc.aio.AioRpcError as error:
            status = await first_status.unmask(error)
        await asyncio.gather(writer, return_exceptions=True)
        if status is None:
            return grpc.StatusCode.OK, "", sent[0]
        return status.code(), status.details(), sent[0]


def test_a_client_that_stops_reading_is_ended_and_others_are_unaffected(
    served: Served, pki: Pki, plain: StreamOutcome
) -> None:
    """Issue 16 fault 9. Upstream of the front nothing stops a stream whose client reads nothing (Serve queues the
    responses), so the front ends it once SLOW_BACKLOG responses wait beyond its window; a healthy stream through
    the same front, in flight meanwhile, keeps its exact transcript."""
    front = FrontThread(GrpcFront(served.plaintext, TlsFiles(pki.server.cert, pki.server.key), _free_port(),
                                 max_backlog=SLOW_BACKLOG))  # fmt: skip
    address = f"127.0.0.1:{front.start()}"

    async def both() -> tuple[tuple[grpc.StatusCode, str, float], StreamOutcome]:
        slow = asyncio.create_task(_slow_consumer(address, pki.ca))
        healthy = asyncio.create_task(_stream(address, tls_credentials(pki.ca), options=StreamOptions(chunk_ms=200, realtime=True)))
        return await slow, await healthy

    try:
        (code, details, sent), healthy = asyncio.run(both())
    finally:
        front.stop()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert details.startswith(f"the client left {SLOW_BACKLOG} responses unread"), details
    assert sent < SLOW_LIMIT_S
    assert front.front.peak_backlog == SLOW_BACKLOG  # the queue filled to its bound, never past it
    assert healthy.final is not None and healthy.text == plain.text
    assert list(healthy.final.token_ids) == list(plain.final.token_ids)
