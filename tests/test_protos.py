"""The public API's generated modules: never stale, and they round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (the `test` extra) regenerates the modules")

from protos import generate  # noqa: E402
from protos.qwen3stream.v1 import asr_pb2, asr_pb2_grpc  # noqa: E402


def test_checked_in_modules_equal_fresh_generation(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == list(generate.GENERATED_FILES)
    for rel in generate.GENERATED_FILES:
        fresh = (tmp_path / rel).read_bytes()
        checked_in = (generate.REPO_ROOT / rel).read_bytes()
        assert fresh == checked_in, f"{rel} is stale: run `python protos/generate.py` and commit the result"


def test_main_regenerates_into_a_given_directory(tmp_path: Path) -> None:
    assert generate.main([str(tmp_path)]) == 0
    assert all((tmp_path / rel).is_file() for rel in generate.GENERATED_FILES)


def test_recognize_request_round_trip() -> None:
    config = asr_pb2.RecognizeRequest(
        config=asr_pb2.StreamConfig(
            language="English", sample_rate_hz=16000, encoding=asr_pb2.F32LE, block_frames=192, interim_results=True
        )
    )
    audio = asr_pb2.RecognizeRequest(audio=asr_pb2.AudioChunk(data=b"\x00\x01\xff" * 100))
    for message in (config, audio):
        parsed = asr_pb2.RecognizeRequest.FromString(message.SerializeToString())
        assert parsed == message
    parsed = asr_pb2.RecognizeRequest.FromString(config.SerializeToString())
    assert parsed.WhichOneof("request") == "config"
    assert parsed.config.encoding == asr_pb2.F32LE and parsed.config.block_frames == 192
    assert asr_pb2.RecognizeRequest.FromString(audio.SerializeToString()).WhichOneof("request") == "audio"


def test_response_round_trip_and_service_shape() -> None:
    response = asr_pb2.RecognizeResponse(
        result=asr_pb2.Result(
            committed=[asr_pb2.Word(index=0, text="hello", start_ms=0, end_ms=400)],
            interim="wor",
            segment_index=1,
            audio_processed_ms=2000,
            segment_final=True,
        )
    )
    assert asr_pb2.RecognizeResponse.FromString(response.SerializeToString()) == response
    service = asr_pb2.DESCRIPTOR.services_by_name["Recognizer"]
    method = service.methods_by_name["Recognize"]
    assert method.client_streaming and method.server_streaming
    assert service.full_name == "qwen3stream.v1.Recognizer"
    assert hasattr(asr_pb2_grpc, "RecognizerStub") and hasattr(asr_pb2_grpc, "add_RecognizerServicer_to_server")
    # Field 6 is resume, 7..9 live semantics; 10..15 of StreamConfig stay free.
    numbers = {f.name: f.number for f in asr_pb2.StreamConfig.DESCRIPTOR.fields}
    assert max(numbers.values()) == 9 and numbers["resume"] == 6
    assert (numbers["context"], numbers["voice_activity"], numbers["allow_untrained_language"]) == (7, 8, 9)
    controls = {f.name for f in asr_pb2.Control.DESCRIPTOR.oneofs_by_name["control"].fields}
    assert controls == {"finalize", "keep_alive", "update_context"}
