"""The served pipeline for real: Ray Serve (started once for this module), the gRPC API, the tiny checkpoint.

Served streams must equal the in-process engine's, also when a stage loses a stream's state mid-segment; bad
requests get INVALID_ARGUMENT with one-line messages while other streams go on; health answers.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from deployments.client import RecognizerClient, StreamOptions, encode_pcm, wait_until_serving
from deployments.grpc_api import ResponseWriter
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pipeline.checkpoint import load_model
from pipeline.engine import EngineOptions, StreamingEngine
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession
from pipeline.transcribe import stream_recording
from pipeline.voice_gate import VadOptions
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR
from protos.qwen3stream.v1 import asr_pb2, asr_pb2_grpc
from tests.speech import synthesize
from tests.test_session import _audio

# Short segments and a small token budget: the tiny random model decodes to its budget every update.
SESSION = {"decode": {"max_new_tokens": 12}, "segment": {"segment_max_steps": 60, "segment_punct_min_steps": 40}}
OPTIONS = SessionOptions.from_dict(SESSION)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_SETTINGS: list = []  # the running server's settings (a rolling upgrade redeploys them changed)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path):  # noqa: ANN201
    from deployments import server

    one_cpu = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}
    two = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1}}  # long streams' segments spread over both
    settings = server.ServerSettings(
        args={"model": str(tiny_checkpoint), "tower": str(tiny_checkpoint / TOWER_OVERLAY_DIR), "slots": 8, "session": SESSION},
        port=_free_port(),
        num_cpus=8,  # a scheduling label: every replica still runs torch on one thread
        deployment_options={"Ingress": one_cpu, "FeatureExtractor": one_cpu, "CausalEncoder": two, "Decoder": two},
    )
    address = server.start(settings)
    _SETTINGS.append(settings)
    store = server._embedded  # the embedded session store `serve` started (no --redis)
    assert store is not None and store.running
    pid, data_dir = store.pid, store.data_dir
    yield address
    server.stop()
    # Stopping the server stops its store: no process and no data directory left behind.
    assert not Path(f"/proc/{pid}").exists(), f"the embedded store (pid {pid}) outlived the server"
    assert not data_dir.exists()


def _expected_results(tiny_checkpoint: Path, recordings: dict[str, np.ndarray]) -> dict[str, tuple[list, asr_pb2.Final]]:
    """What the in-process engine gives, as the API's messages."""
    model = load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR)
    engine = StreamingEngine(model, OPTIONS, EngineOptions(max_streams=len(recordings)))
    writers = {name: ResponseWriter() for name in recordings}
    results: dict[str, list] = {name: [] for name in recordings}
    finals = {}
    for name, audio in recordings.items():
        engine.open_stream(name)
        engine.push_audio(name, audio)
        engine.finish_stream(name)
    sessions = {name: engine.session(name) for name in recordings}
    while engine.has_work:
        for name, events in engine.step().items():
            results[name] += [writers[name].response(event).result for event in events]
    for name, session in sessions.items():
        final = writers[name].final(session.transcript, session.token_ids, session.final_hypothesis_text, asr_pb2.FinalStats())
        finals[name] = final.final
    return {name: (results[name], finals[name]) for name in recordings}


def _comparable(result: asr_pb2.Result) -> tuple:
    return (
        tuple((w.index, w.text, w.start_ms, w.end_ms) for w in result.committed),
        result.interim,
        result.segment_index,
        result.audio_processed_ms,
        result.segment_final,
    )


def test_served_streams_equal_the_in_process_engine(server: str, tiny_checkpoint: Path) -> None:
    recordings = {"short": _audio(3.0, seed=21), "rolls": _audio(9.0, seed=22), "odd": _audio(4.3, seed=23)}
    chunking = {"short": StreamOptions(chunk_ms=40), "rolls": StreamOptions(chunk_ms=250, encoding="f32le"), "odd": StreamOptions(chunk_ms=1000)}

    async def run_all():  # noqa: ANN202
        async with RecognizerClient(server) as client:
            return await asyncio.gather(*(client.recognize(recordings[n], chunking[n]) for n in recordings))

    outcomes = dict(zip(recordings, asyncio.run(run_all())))
    # The reference hears the audio the server heard: PCM16 quantised where the stream used it.
    heard = {n: np.frombuffer(encode_pcm(a, chunking[n].encoding), "<i2").astype(np.float32) / 32768.0
             if chunking[n].encoding == "pcm_s16le" else a for n, a in recordings.items()}
    expected = _expected_results(tiny_checkpoint, heard)
    assert any(r.segment_final for r in expected["rolls"][0])  # the long stream crosses a segment roll
    for name, outcome in outcomes.items():
        results, final = expected[name]
        assert [_comparable(r) for _, r in outcome.results] == [_comparable(r) for r in results], name
        assert list(outcome.final.token_ids) == list(final.token_ids)
        assert outcome.final.text == final.text == outcome.text
        assert outcome.final.final_hypothesis_text == final.final_hypothesis_text
        outcome.check_append_only()
        assert outcome.final.stats.replays == 0


def test_live_controls_and_the_voice_gate_served_equal_a_session(server: str, tiny_checkpoint: Path) -> None:
    """Voice gate, Finalize every 2.5 s and a context update, through gRPC: the same results as a session."""
    quiet = np.random.default_rng(5).standard_normal(3 * 16000).astype(np.float32) * 10 ** (-50 / 20)
    speech = synthesize("the quick brown fox jumps over the lazy dog")
    audio = np.concatenate([quiet[:16000], speech, quiet, speech])
    options = StreamOptions(
        encoding="f32le", voice_activity=True, finalize_every_ms=2500, context_updates=((1.5, "KubeRay"),)
    )

    async def run():  # noqa: ANN202
        async with RecognizerClient(server) as client:
            return await client.recognize(audio, options)

    outcome = asyncio.run(run())
    model = load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR)
    session = StreamingSession(model, replace(OPTIONS, vad=VadOptions(enabled=True)))
    writer = ResponseWriter()
    responses = [
        writer.response(event)
        for event in stream_recording(session, audio, finalize_every_sec=2.5, context_updates=[(1.5, "KubeRay")])
    ]
    expected = [r.result for r in responses if r.WhichOneof("response") == "result"]
    assert [_live(r) for _, r in outcome.results] == [_live(r) for r in expected]
    assert list(outcome.speech) == [r.speech for r in responses if r.WhichOneof("response") == "speech"]
    assert len(outcome.speech) == 4  # two utterances, each begins and ends
    assert len(outcome.finalized) == audio.size // 40000 and [u.effective_segment_index for u in outcome.context_updates] == [0]  # no block before 1.5 s
    assert "utterance_end" in {r.segment_end_reason for _, r in outcome.results}
    assert "finalize" in {r.segment_end_reason for _, r in outcome.results}
    assert outcome.final.text == session.transcript == outcome.text
    outcome.check_append_only()


def _live(result: asr_pb2.Result) -> tuple:
    return (*_comparable(result), tuple(result.interim_stability), result.start_sample, result.end_sample,
            result.segment_end_reason)  # fmt: skip


def test_a_stage_that_loses_a_stream_mid_segment_is_replayed(server: str, tiny_checkpoint: Path) -> None:
    from ray import serve

    audio = _audio(6.0, seed=31)
    dropped: list[int] = []

    async def run():  # noqa: ANN202
        encoder = serve.get_deployment_handle("CausalEncoder", "qwen3-stream")
        decoder = serve.get_deployment_handle("Decoder", "qwen3-stream")
        session_id: list[str] = []
        drops: list[asyncio.Task] = []

        def on_result(result: asr_pb2.Result) -> None:
            # After the first update of segment 0 (mid-segment): both stages forget the stream.
            if not dropped and result.audio_processed_ms and not result.segment_final:
                route = f"{session_id[0]}/{result.segment_index}"
                dropped.append(result.segment_index)
                for handle in (encoder, decoder):
                    call = handle.options(session_id=route).release.remote(session_id[0], result.segment_index)
                    drops.append(asyncio.ensure_future(_resolved(call)))

        async with RecognizerClient(server) as client:
            options = StreamOptions(chunk_ms=500, realtime=True)  # paced, so the drop lands mid-stream
            outcome = await client.recognize(
                audio, options, on_result=on_result, on_started=lambda started: session_id.append(started.session_id)
            )
        await asyncio.gather(*drops)
        return outcome

    outcome = asyncio.run(run())
    heard = np.frombuffer(encode_pcm(audio, "pcm_s16le"), "<i2").astype(np.float32) / 32768.0
    results, final = _expected_results(tiny_checkpoint, {"s": heard})["s"]
    assert dropped and outcome.final.stats.replays >= 1
    assert [_comparable(r) for _, r in outcome.results] == [_comparable(r) for r in results]
    assert list(outcome.final.token_ids) == list(final.token_ids)


async def _resolved(response) -> None:  # noqa: ANN001
    await response


def _raw_call(server: str, requests: list[asr_pb2.RecognizeRequest]) -> grpc.RpcError | list:
    """Send exactly these messages, half-close, and collect the answers or the error."""

    async def run():  # noqa: ANN202
        async with grpc.aio.insecure_channel(server) as channel:
            call = asr_pb2_grpc.RecognizerStub(channel).Recognize(iter(requests))
            try:
                return [response async for response in call]
            except grpc.aio.AioRpcError as error:
                return error

    return asyncio.run(run())


GOOD = asr_pb2.StreamConfig(language="en", sample_rate_hz=16000, encoding=asr_pb2.PCM_S16LE)


def _config(**changes) -> asr_pb2.RecognizeRequest:  # noqa: ANN003
    config = asr_pb2.StreamConfig()
    config.CopyFrom(GOOD)
    for field, value in changes.items():
        if isinstance(value, asr_pb2.Resume):
            config.resume.CopyFrom(value)
        else:
            setattr(config, field, value)
    return asr_pb2.RecognizeRequest(config=config)


def _chunk(data: bytes) -> asr_pb2.RecognizeRequest:
    return asr_pb2.RecognizeRequest(audio=asr_pb2.AudioChunk(data=data))


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([_chunk(b"\0\0")], "the first message must be a StreamConfig"),
        ([_config(), _config()], "a second StreamConfig"),
        ([_config(encoding=asr_pb2.ENCODING_UNSPECIFIED)], "encoding is ENCODING_UNSPECIFIED; expected PCM_S16LE or F32LE"),
        ([_config(encoding=7)], "encoding is 7; expected PCM_S16LE or F32LE"),
        ([_config(sample_rate_hz=8000)], "sample_rate_hz is 8000; expected 16000"),
        ([_config(block_frames=100)], "block_frames is 100; expected one of (96, 192)"),
        ([_config(language="Klingon")], "language"),
        ([_config(), _chunk(b"\0\0\0")], "audio chunk has 3 bytes; expected a multiple of 2"),
    ],
)
def test_bad_requests_get_invalid_argument_with_one_line(server: str, requests: list, message: str) -> None:
    answer = _raw_call(server, requests)
    assert isinstance(answer, grpc.aio.AioRpcError), answer
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in answer.details() and "\n" not in answer.details()


def test_health_service_answers_serving(server: str) -> None:
    async def check():  # noqa: ANN202
        async with grpc.aio.insecure_channel(server) as channel:
            return await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    assert asyncio.run(check()).status == health_pb2.HealthCheckResponse.SERVING


def test_the_readme_client_example_runs_against_the_server(server: str) -> None:
    from tests.test_readme_examples import block_with, run_block

    namespace: dict = {"__name__": "readme"}
    run_block(block_with("RecognizerClient").replace("127.0.0.1:50051", server), namespace, "README.md client block")
    text = asyncio.run(namespace["transcribe"](_audio(2.5, seed=41)))
    assert isinstance(text, str) and text


# ---------------------------------------------------------------------------------------------------- resume

RESUME_AUDIO_SEC = 9.5  # rolls when the 3rd block of a segment is taken: at 5.76 s and 9.6 s of audio


def _heard(audio: np.ndarray) -> np.ndarray:
    return np.frombuffer(encode_pcm(audio, "pcm_s16le"), "<i2").astype(np.float32) / 32768.0


@pytest.mark.parametrize("drop_at_sec", [1.0, 4.5, 6.0, 7.3], ids=["before-first-roll", "mid-segment", "after-roll", "late"])
def test_a_dropped_connection_resumes_with_an_identical_transcript(
    server: str, tiny_checkpoint: Path, drop_at_sec: float
) -> None:
    audio = _audio(RESUME_AUDIO_SEC, seed=51)

    async def run():  # noqa: ANN202
        async with RecognizerClient(server) as client:
            return await client.recognize(audio, StreamOptions(chunk_ms=100), reconnect_after_s=drop_at_sec)

    outcome = asyncio.run(run())
    _, final = _expected_results(tiny_checkpoint, {"s": _heard(audio)})["s"]
    outcome.check_append_only()  # no word lost, repeated or re-indexed across the reconnection
    assert outcome.text == final.text == outcome.final.text
    assert list(outcome.final.token_ids) == list(final.token_ids)


def test_resume_with_a_wrong_token_or_an_unknown_session_is_refused_alike(server: str) -> None:
    async def started_session() -> asr_pb2.Started:
        started: list = []
        async with RecognizerClient(server) as client:
            await client.recognize(_audio(0.5, seed=61), StreamOptions(), on_started=started.append)
        return started[0]

    first = asyncio.run(started_session())
    assert len(first.resume_token) >= 22  # >= 128 bits, URL-safe base64
    answers = [
        _raw_call(server, [_config(resume=asr_pb2.Resume(session_id=first.session_id, resume_token="x" * 43))]),
        _raw_call(server, [_config(resume=asr_pb2.Resume(session_id="f" * 32, resume_token=first.resume_token))]),
    ]
    for answer in answers:
        assert isinstance(answer, grpc.aio.AioRpcError) and answer.code() == grpc.StatusCode.NOT_FOUND
    assert answers[0].details() == answers[1].details()


def test_two_owners_of_a_session_only_the_newest_writes(server: str, tiny_checkpoint: Path) -> None:
    """A (paced in real time) is taken over by B (a resume with A's token) before A's first roll: A's roll write
    is refused and A stops with ABORTED; B finishes the stream with the uninterrupted transcript."""
    audio = _audio(7.0, seed=71)

    async def run():  # noqa: ANN202
        async with RecognizerClient(server) as client:
            started: asyncio.Future = asyncio.get_running_loop().create_future()
            a = asyncio.create_task(
                client.recognize(audio, StreamOptions(chunk_ms=100, realtime=True), on_started=started.set_result)
            )
            first = await started
            await asyncio.sleep(1.0)
            from deployments.client import StreamOutcome

            b = await client.recognize(  # paced too: B is still streaming when A reaches its first roll
                audio,
                StreamOptions(chunk_ms=100, realtime=True),
                resume_from=StreamOutcome(session_id=first.session_id, resume_token=first.resume_token),
            )
            a_error = None
            try:
                await a
            except grpc.aio.AioRpcError as error:
                a_error = error
            return a_error, b

    a_error, b = asyncio.run(run())
    assert a_error is not None and a_error.code() == grpc.StatusCode.ABORTED, a_error
    assert "newer connection" in a_error.details()
    _, final = _expected_results(tiny_checkpoint, {"s": _heard(audio)})["s"]
    assert b.final.text == final.text and list(b.final.token_ids) == list(final.token_ids)


def test_a_long_streams_segments_spread_over_the_replicas(server: str, tiny_checkpoint: Path) -> None:
    audio = _audio(45.0, seed=81)

    async def run():  # noqa: ANN202
        async with RecognizerClient(server) as client:
            return await client.recognize(audio, StreamOptions(chunk_ms=1000))

    outcome = asyncio.run(run())
    replicas = {timing.stage: timing.replicas for timing in outcome.final.stats.stage_timings}
    assert replicas["encoder"] == 2 and replicas["decoder"] == 2, replicas
    _, final = _expected_results(tiny_checkpoint, {"s": _heard(audio)})["s"]
    assert outcome.final.text == final.text and list(outcome.final.token_ids) == list(final.token_ids)


# ---------------------------------------------------------------------------------------------------- faults


def _kill_replicas(deployment: str) -> int:
    """Kill every live replica actor of a deployment (the controller starts replacements); returns how many."""
    import ray

    prefix = f"SERVE_REPLICA::qwen3-stream#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
    return len(names)


@pytest.mark.parametrize("deployment", ["CausalEncoder", "Decoder"])
def test_a_stage_replica_killed_mid_segment_is_replayed_elsewhere(
    server: str, tiny_checkpoint: Path, deployment: str
) -> None:
    """Every replica of the stage dies mid-stream (mid-segment): the ingress retries on the replacements, which
    miss the stream's state, replays the segment, and the transcript is the undisturbed one."""
    audio = _audio(8.0, seed=91)
    killed: list[int] = []

    async def run():  # noqa: ANN202
        async with RecognizerClient(server) as client:
            task = asyncio.create_task(client.recognize(audio, StreamOptions(chunk_ms=100, realtime=True)))
            await asyncio.sleep(6.6)  # segment 1 began with the block at 5.76 s; its next block comes at 7.68 s
            killed.append(await asyncio.to_thread(_kill_replicas, deployment))
            return await task

    outcome = asyncio.run(run())
    assert killed[0] >= 1
    _, final = _expected_results(tiny_checkpoint, {"s": _heard(audio)})["s"]
    outcome.check_append_only()
    assert outcome.final.text == final.text and list(outcome.final.token_ids) == list(final.token_ids)
    assert outcome.final.stats.replays >= 1
    gaps = np.diff([received for received, _ in outcome.results])
    assert gaps.max() < 30.0  # a bounded stall: replacements start within seconds


def test_the_ingress_replica_killed_mid_stream_the_client_resumes(server: str, tiny_checkpoint: Path) -> None:
    """The replica that owns the stream dies: the client library reconnects with the session id and resume
    token, resends from the durable offset, and the transcript is the undisturbed one."""
    audio = _audio(9.0, seed=101)
    killed: list[int] = []

    async def run():  # noqa: ANN202
        async with RecognizerClient(server) as client:
            task = asyncio.create_task(
                client.recognize(audio, StreamOptions(chunk_ms=100, realtime=True), max_resumes=8)
            )
            await asyncio.sleep(6.6)  # past the first roll (5.76 s): a durable boundary exists
            killed.append(await asyncio.to_thread(_kill_replicas, "Ingress"))
            return await task

    outcome = asyncio.run(run())
    assert killed[0] == 1
    _, final = _expected_results(tiny_checkpoint, {"s": _heard(audio)})["s"]
    outcome.check_append_only()
    assert outcome.final.text == final.text and list(outcome.final.token_ids) == list(final.token_ids)
    assert outcome.resumed_from_sample > 0  # it continued from the durable roll, not from the start


def test_a_rolling_upgrade_under_load_keeps_every_stream(server: str, tiny_checkpoint: Path) -> None:
    """The application is redeployed with a changed config (the encoder and decoder batch sizes) while three
    streams run: Serve replaces those replicas; the streams retry onto the new ones, replay their segments, and
    finish with the undisturbed transcripts. The stall is the longest gap between results."""
    from dataclasses import replace

    from deployments import server as serving

    recordings = [_audio(8.0, seed=111 + index) for index in range(3)]
    stalls: list[float] = []

    async def run():  # noqa: ANN202
        async with RecognizerClient(server) as client:
            tasks = [
                asyncio.create_task(client.recognize(audio, StreamOptions(chunk_ms=100, realtime=True), max_resumes=8))
                for audio in recordings
            ]
            await asyncio.sleep(2.5)
            changed = replace(_SETTINGS[0], args={**_SETTINGS[0].args, "encoder_batch": 32, "decoder_batch": 32})
            await asyncio.to_thread(serving.deploy, changed)
            return await asyncio.gather(*tasks)

    outcomes = asyncio.run(run())
    expected = _expected_results(tiny_checkpoint, {str(i): _heard(a) for i, a in enumerate(recordings)})
    for index, outcome in enumerate(outcomes):
        _, final = expected[str(index)]
        outcome.check_append_only()
        assert outcome.final.text == final.text and list(outcome.final.token_ids) == list(final.token_ids)
        stalls.append(float(np.diff([received for received, _ in outcome.results]).max()))
    print(f"rolling upgrade: longest gap between results {max(stalls):.2f} s (a block is 1.92 s)")


@pytest.mark.parametrize("down_s", [0.5, 4.0], ids=["restart", "unreachable-across-a-roll"])
def test_the_session_store_restarting_mid_stream_loses_nothing(
    server: str, tiny_checkpoint: Path, down_s: float
) -> None:
    """The store (append-only, as the k8s manifest runs Redis) goes down 3 s into a paced stream and comes back
    after `down_s`: the stream goes on meanwhile, a roll whose write failed is retried (never skipped: its Ack
    arrives late), and the transcript is the undisturbed one. New streams meanwhile get UNAVAILABLE."""
    from deployments import server as serving

    audio = _audio(9.0, seed=121)
    refused: list = []

    async def run():  # noqa: ANN202
        async with RecognizerClient(server) as client:
            task = asyncio.create_task(client.recognize(audio, StreamOptions(chunk_ms=100, realtime=True)))
            await asyncio.sleep(3.0)
            outage = asyncio.create_task(asyncio.to_thread(serving._embedded.restart, down_s))
            if down_s > 1:
                await asyncio.sleep(1.0)
                refused.append(_raw_call_async(client.channel))
                refused[-1] = await refused[-1]
            await outage
            return await task

    outcome = asyncio.run(run())
    _, final = _expected_results(tiny_checkpoint, {"s": _heard(audio)})["s"]
    assert outcome.final.text == final.text and list(outcome.final.token_ids) == list(final.token_ids)
    assert [ack.segment_index for ack in outcome.acks][-1] >= 1  # the roll at 5.76 s was stored, late or not
    if refused:
        assert isinstance(refused[0], grpc.aio.AioRpcError) and refused[0].code() == grpc.StatusCode.UNAVAILABLE


async def _raw_call_async(channel: grpc.aio.Channel):  # noqa: ANN202
    call = asr_pb2_grpc.RecognizerStub(channel).Recognize(iter([_config(), _chunk(b"\0\0" * 1600)]))
    try:
        return [response async for response in call]
    except grpc.aio.AioRpcError as error:
        return error


def test_api_keys_guard_the_api_when_configured(server: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Last in this module: the app is redeployed with API keys. No key or an unknown one: UNAUTHENTICATED; a
    key past its stream quota: RESOURCE_EXHAUSTED; a good key streams."""
    from dataclasses import replace

    from deployments import server as serving

    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text("team-a:team-a-key-0123456789:1\nteam-b:team-b-key-0123456789\n")
    args = {**_SETTINGS[0].args, "api_keys_file": str(keys), "max_streams_per_ingress": 2}
    serving.deploy(replace(_SETTINGS[0], args=args))
    good = [("authorization", "Bearer team-a-key-0123456789")]
    other = [("authorization", "Bearer team-b-key-0123456789")]

    async def run():  # noqa: ANN202
        async with RecognizerClient(server) as client:
            await wait_until_serving(client.channel, 60)
            answers = {}
            for name, metadata in (("none", None), ("wrong", [("authorization", "Bearer nope-nope-nope-nope")])):
                try:
                    await client.recognize(_audio(0.5, seed=131), StreamOptions(), metadata=metadata)
                except grpc.aio.AioRpcError as error:
                    answers[name] = error
            held = asyncio.create_task(
                client.recognize(_audio(4.0, seed=132), StreamOptions(realtime=True), metadata=good)
            )
            await asyncio.sleep(1.5)
            try:
                await client.recognize(_audio(0.5, seed=133), StreamOptions(), metadata=good)
            except grpc.aio.AioRpcError as error:
                answers["quota"] = error
            also_held = asyncio.create_task(
                client.recognize(_audio(3.0, seed=134), StreamOptions(realtime=True), metadata=other)
            )
            await asyncio.sleep(1.0)
            try:  # a third stream on an ingress that admits two
                await client.recognize(_audio(0.5, seed=135), StreamOptions(), metadata=other)
            except grpc.aio.AioRpcError as error:
                answers["admission"] = error
            answers["good"], answers["other"] = await held, await also_held
            return answers

    answers = asyncio.run(run())
    for name in ("none", "wrong"):
        assert answers[name].code() == grpc.StatusCode.UNAUTHENTICATED
        assert answers[name].details().startswith("missing or unknown API key")
    assert answers["quota"].code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota is 1" in answers["quota"].details()
    admission = answers["admission"]
    assert admission.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "holds 2 streams; retry in" in admission.details()
    assert answers["good"].final is not None and answers["other"].final is not None
