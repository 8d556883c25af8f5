"""TLS and mutual TLS on the public port, for real: certificates made in the test, Ray Serve started once.

`serve` with TLS files puts Serve's proxy on an internal port and the TLS front (`deployments/tls_front.py`) on the
public one; API keys are on, so the client's `authorization` metadata must pass through the front and the server's
statuses must come back through it. A second front with a client CA (mutual TLS) runs before the same proxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from deployments.client import RecognizerClient, StreamOptions, StreamOutcome, tls_credentials, wait_until_serving
from deployments.tls_front import FrontThread, TlsFiles, TlsFront
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR
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
    mutual = FrontThread(TlsFront(plaintext, TlsFiles(pki.server.cert, pki.server.key, client_ca=pki.ca), _free_port()))
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


async def _stream(address: str, credentials: grpc.ChannelCredentials | None, **keywords) -> StreamOutcome:  # noqa: ANN003
    async with RecognizerClient(address, credentials=credentials) as client:
        await wait_until_serving(client.channel, 60)
        return await client.recognize(AUDIO, StreamOptions(chunk_ms=200), metadata=AUTH, **keywords)


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
