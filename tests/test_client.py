"""deployments.client against a real in-process grpc.aio Recognizer server on loopback.

The servicer here is a framing echo, not ASR: for each audio chunk it commits one word, the chunk's
byte count; on half-close it sends Final with the joined words. It records what it received, and
when, so the tests can check the client's framing and pacing.
"""

from __future__ import annotations

import ast
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest

from deployments.client import (
    CommittedWord,
    RecognizerClient,
    StreamOptions,
    StreamOutcome,
    encode_pcm,
    recognize,
)
from protos.qwen3stream.v1 import asr_pb2, asr_pb2_grpc

T = TypeVar("T")


@dataclass
class EchoRecognizer(asr_pb2_grpc.RecognizerServicer):
    requests: list[tuple[float, asr_pb2.RecognizeRequest]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    # End the call with OK right after the config, without reading the audio.
    close_after_config: bool = False

    async def Recognize(
        self, request_iterator: AsyncIterator[asr_pb2.RecognizeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[asr_pb2.RecognizeResponse]:
        self.metadata = {k: v for k, v in context.invocation_metadata() or ()}
        words: list[str] = []
        first = True
        async for request in request_iterator:
            self.requests.append((time.monotonic(), request))
            kind = request.WhichOneof("request")
            if first:
                if kind != "config":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be config")
                if request.config.language == "Klingon":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unsupported language: Klingon")
                first = False
                yield asr_pb2.RecognizeResponse(started=asr_pb2.Started(session_id="s-1", config=request.config))
                if self.close_after_config:
                    break
                continue
            if kind == "audio":
                word = asr_pb2.Word(index=len(words), text=str(len(request.audio.data)), start_ms=0, end_ms=0)
                words.append(word.text)
                yield asr_pb2.RecognizeResponse(
                    result=asr_pb2.Result(committed=[word], interim=f"~{len(words)}", audio_processed_ms=len(words))
                )
        yield asr_pb2.RecognizeResponse(
            final=asr_pb2.Final(text=" ".join(words), stats=asr_pb2.FinalStats(words=len(words)))
        )

    def audio_chunks(self) -> list[bytes]:
        return [r.audio.data for _, r in self.requests if r.WhichOneof("request") == "audio"]


def serve_and_run(servicer: EchoRecognizer, client_fn: Callable[[str], Awaitable[T]]) -> T:
    """Start a real grpc.aio server on a free loopback port, run ``client_fn(target)``, stop the server."""

    async def main() -> T:
        server = grpc.aio.server()
        asr_pb2_grpc.add_RecognizerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await asyncio.wait_for(client_fn(f"127.0.0.1:{port}"), timeout=30)
        finally:
            await server.stop(grace=None)

    return asyncio.run(main())


def clip(seconds: float, sample_rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def run_client(servicer: EchoRecognizer, samples: np.ndarray, options: StreamOptions, **kwargs) -> StreamOutcome:
    async def client(target: str) -> StreamOutcome:
        async with RecognizerClient(target) as c:
            return await c.recognize(samples, options, **kwargs)

    return serve_and_run(servicer, client)


@pytest.mark.parametrize(("encoding", "width"), [("pcm_s16le", 2), ("f32le", 4)])
def test_framing_config_first_then_chunks_then_final(encoding: str, width: int) -> None:
    servicer = EchoRecognizer()
    samples = clip(1.05)  # 16800 samples: 10 chunks of 1600 and one of 800
    options = StreamOptions(encoding=encoding, chunk_ms=100, block_frames=96, interim_results=False)
    seen: list[asr_pb2.Result] = []
    outcome = run_client(servicer, samples, options, on_result=seen.append, metadata=[("x-tenant", "t1")])

    kinds = [r.WhichOneof("request") for _, r in servicer.requests]
    assert kinds == ["config"] + ["audio"] * 11
    config = servicer.requests[0][1].config
    assert config == options.to_proto()
    assert config.encoding == (asr_pb2.PCM_S16LE if encoding == "pcm_s16le" else asr_pb2.F32LE)
    assert (config.language, config.sample_rate_hz, config.block_frames, config.interim_results) == (
        "English", 16000, 96, False
    )
    chunks = servicer.audio_chunks()
    assert [len(c) for c in chunks] == [1600 * width] * 10 + [800 * width]
    assert b"".join(chunks) == encode_pcm(samples, encoding)
    assert servicer.metadata.get("x-tenant") == "t1"

    assert outcome.session_id == "s-1" and outcome.config == options.to_proto()
    expected_words = [str(1600 * width)] * 10 + [str(800 * width)]
    assert outcome.text == " ".join(expected_words)
    assert outcome.committed[0] == CommittedWord(0, str(1600 * width), 0, 0)
    outcome.check_append_only()
    assert outcome.interim == "~11"
    assert [r.result for r in outcome.results] == seen and len(seen) == 11
    assert all(a.received_at <= b.received_at for a, b in zip(outcome.results, outcome.results[1:]))
    # Half-close -> Final, whose text is the same transcript.
    assert outcome.final is not None and outcome.final.text == outcome.text and outcome.final.stats.words == 11


def test_empty_audio_still_gets_final() -> None:
    servicer = EchoRecognizer()
    outcome = run_client(servicer, np.zeros(0, np.float32), StreamOptions())
    assert [r.WhichOneof("request") for _, r in servicer.requests] == ["config"]
    assert outcome.text == "" and outcome.final is not None and outcome.final.text == ""


def test_realtime_pacing_follows_a_fixed_schedule() -> None:
    servicer = EchoRecognizer()
    chunk_ms, seconds = 20, 0.4  # 20 chunks, the last one sent at 380 ms
    options = StreamOptions(chunk_ms=chunk_ms, realtime=True)

    async def client(target: str) -> tuple[float, float, StreamOutcome]:
        async with RecognizerClient(target) as c:
            start = time.monotonic()
            outcome = await c.recognize(clip(seconds), options)
            return start, time.monotonic(), outcome

    start, end, outcome = serve_and_run(servicer, client)
    arrivals = [t for t, r in servicer.requests if r.WhichOneof("request") == "audio"]
    assert len(arrivals) == 20
    offsets = np.array(arrivals) - arrivals[0]
    schedule = np.arange(20) * chunk_ms / 1000
    # Loose bounds (shared CI cores): never early by more than scheduling jitter, never drifting late.
    assert np.all(offsets >= schedule - 0.01), offsets
    assert offsets[-1] < schedule[-1] + 0.15, offsets
    assert seconds - chunk_ms / 1000 - 0.01 <= end - start < seconds + 1.0
    # Reading ran while writing: the first Result arrived long before the last chunk was sent.
    assert outcome.results[0].received_at < arrivals[-1] - 0.1
    assert outcome.final is not None and len(outcome.committed) == 20


def test_not_realtime_sends_as_fast_as_possible() -> None:
    servicer = EchoRecognizer()
    options = StreamOptions(chunk_ms=20)  # 10 s of audio in 500 chunks

    async def client(target: str) -> tuple[float, StreamOutcome]:
        async with RecognizerClient(target) as c:
            start = time.monotonic()
            outcome = await c.recognize(clip(10.0), options)
            return time.monotonic() - start, outcome

    elapsed, outcome = serve_and_run(servicer, client)
    assert elapsed < 5.0
    assert len(outcome.committed) == 500
    outcome.check_append_only()


@pytest.mark.parametrize("realtime", [False, True])
def test_server_error_propagates_as_aio_rpc_error(realtime: bool) -> None:
    """The server's status surfaces, also when it races in-flight writes (grpc/grpc#36066 masks it)."""
    options = StreamOptions(language="Klingon", realtime=realtime, chunk_ms=20)

    async def client(target: str) -> list[grpc.aio.AioRpcError]:
        errors = []
        async with RecognizerClient(target) as c:
            for _ in range(10 if not realtime else 1):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await c.recognize(clip(2.0), options)
                errors.append(info.value)
        return errors

    for error in serve_and_run(EchoRecognizer(), client):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Klingon" in (error.details() or "")


def test_server_closing_early_with_ok_ends_the_stream_normally() -> None:
    """A server that closes while audio is still being written: the outcome, not a write error."""

    async def client(target: str) -> list[StreamOutcome]:
        async with RecognizerClient(target) as c:
            return [await c.recognize(clip(2.0), StreamOptions(chunk_ms=20)) for _ in range(10)]

    for outcome in serve_and_run(EchoRecognizer(close_after_config=True), client):
        assert outcome.session_id == "s-1"
        assert outcome.final is not None and outcome.final.text == "" and outcome.text == ""


def test_recognize_function_on_a_bare_channel() -> None:
    async def client(target: str) -> StreamOutcome:
        async with grpc.aio.insecure_channel(target) as channel:
            return await recognize(channel, clip(0.25), StreamOptions(encoding="f32le"))

    outcome = serve_and_run(EchoRecognizer(), client)
    assert outcome.text == "6400 6400 3200"


def test_check_append_only() -> None:
    StreamOutcome().check_append_only()
    good = StreamOutcome(committed=[CommittedWord(0, "a", 0, 1), CommittedWord(1, "b", 1, 2)])
    good.check_append_only()
    assert good.text == "a b"
    for indices in ([1], [0, 2], [0, 1, 1], [1, 0]):
        bad = StreamOutcome(committed=[CommittedWord(i, "w", 0, 0) for i in indices])
        with pytest.raises(ValueError):
            bad.check_append_only()


def test_encode_pcm() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0, 1 / 32767 * 0.6], np.float32)
    pcm = np.frombuffer(encode_pcm(x, "pcm_s16le"), dtype="<i2")
    assert pcm.tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767, 1]
    f32 = np.frombuffer(encode_pcm(x, "f32le"), dtype="<f4")
    np.testing.assert_array_equal(f32, x)
    assert encode_pcm(x.astype(np.float64), "f32le") == x.astype("<f4").tobytes()
    with pytest.raises(ValueError):
        encode_pcm(np.zeros((2, 3), np.float32), "pcm_s16le")
    with pytest.raises(ValueError):
        encode_pcm(x, "mulaw")  # type: ignore[arg-type]


def test_stream_options_validation() -> None:
    assert StreamOptions().chunk_samples == 1600
    with pytest.raises(ValueError):
        StreamOptions(encoding="mp3")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        StreamOptions(chunk_ms=0)
    with pytest.raises(FrozenInstanceError):
        StreamOptions().chunk_ms = 50  # type: ignore[misc]


def test_client_imports_only_stdlib_numpy_grpc_and_generated_modules() -> None:
    """The client must stay vendorable: no torch, Ray or pipeline imports (grpc_health ships with grpcio's
    health-checking package: the standard health protocol)."""
    import sys

    source = Path(__file__).resolve().parent.parent / "deployments" / "client.py"
    tree = ast.parse(source.read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    third_party = {r for r in roots if r not in sys.stdlib_module_names}
    assert third_party == {"grpc", "grpc_health", "numpy", "protos"}, third_party
