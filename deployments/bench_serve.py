"""`qwen3-stream bench serve`: what serving costs, measured against the in-process engine in one run.

For one checkpoint (the tiny one: the serving machinery's own overhead; or a full-size random one: the model's
compute as published), with the same streams and the same session options on both sides:

* throughput: N streams' audio pushed as fast as possible, through the in-process `StreamingEngine` and through
  the served pipeline (N gRPC streams at once); "real-time streams' worth" = audio seconds / wall seconds;
* update latency added by serving: one stream paced in real time, the time from sending the chunk that completes
  a block to receiving its result, served against the same stream driven in process (`StreamDriver` over
  in-process stages, the same code the ingress runs);
* per-hop latency per stage: the ingress's own timing of each stage call (`Final.stats.stage_timings`) against
  the same calls in process;
* the transport between deployments: Serve's gRPC transport against Ray object references.

Random weights never stop by themselves, so every update decodes to the session's token budget on both sides
(same work); the budget is part of the setup and is printed with the results.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deployments import server
from deployments.client import RecognizerClient, StreamOptions, encode_pcm, wait_until_serving
from pipeline.checkpoint import load_model
from pipeline.engine import EngineOptions, StreamingEngine
from pipeline.features import SAMPLE_RATE
from pipeline.decoding import DecodeOptions
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession
from pipeline.stages import FeatureStage
from pipeline.stream_driver import LocalStages, StreamDriver
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR, make_random_checkpoint

log = logging.getLogger(__name__)

#: Audio per message of the throughput runs (one block: fewest messages) and of the latency run (live-like).
THROUGHPUT_CHUNK_MS = 1920
LATENCY_CHUNK_MS = 100


@dataclass
class ServeBenchResult:
    model: str
    transport: str
    streams: int
    audio_sec: float  # per stream
    in_process_rtf_streams: float  # real-time streams' worth of throughput, in process
    served_rtf_streams: float
    # Latency run (one paced stream), and per-stage call time: p50 / p95 in ms.
    added_latency_ms: tuple[float, float] | None = None
    stage_ms: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)  # served p50/p95, local p50/p95

    @property
    def ratio(self) -> float:
        return self.served_rtf_streams / self.in_process_rtf_streams


def synthetic_audio(seconds: float, seed: int) -> np.ndarray:
    """Noise with a slow loudness envelope, as PCM16 would carry it (both sides hear exactly the same)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    audio = ((0.05 + 0.1 * (1 + np.sin(2 * np.pi * 0.3 * t))) * rng.standard_normal(t.size)).astype(np.float32)
    return np.frombuffer(encode_pcm(audio, "pcm_s16le"), "<i2").astype(np.float32) / 32768.0


def in_process_throughput(model, options: SessionOptions, recordings: list[np.ndarray]) -> float:  # noqa: ANN001
    """Real-time streams' worth of the in-process engine on these recordings, all buffered at once."""
    engine = StreamingEngine(model, options, EngineOptions(max_streams=len(recordings)))
    started = time.perf_counter()
    for index, audio in enumerate(recordings):
        engine.open_stream(str(index))
        engine.push_audio(str(index), audio)
        engine.finish_stream(str(index))
    while engine.has_work:
        engine.step()
    return sum(a.size for a in recordings) / SAMPLE_RATE / (time.perf_counter() - started)


async def served_throughput(address: str, recordings: list[np.ndarray]) -> tuple[float, list]:
    """Real-time streams' worth through the served pipeline (N streams at once), and the streams' finals."""
    options = StreamOptions(chunk_ms=THROUGHPUT_CHUNK_MS)
    async with RecognizerClient(address) as client:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(client.recognize(audio, options) for audio in recordings))
        elapsed = time.perf_counter() - started
    return sum(a.size for a in recordings) / SAMPLE_RATE / elapsed, [outcome.final for outcome in outcomes]


async def served_update_latency(address: str, audio: np.ndarray) -> tuple[list[float], dict[str, list[float]]]:
    """One stream paced in real time: per update, seconds from sending the chunk that completed its block to
    its result; and the ingress's stage timings (p50, p95 per stage)."""
    sent_at: list[tuple[int, float]] = []  # (samples sent so far, time)
    latencies: list[float] = []
    chunk = LATENCY_CHUNK_MS * SAMPLE_RATE // 1000

    def on_result(result) -> None:  # noqa: ANN001
        heard = result.audio_processed_ms * SAMPLE_RATE // 1000
        if result.segment_final or heard == 0:
            return
        # The chunk that completed the block: the first whose end reaches the audio this update heard.
        completed = next((at for samples, at in sent_at if samples >= heard), None)
        if completed is not None:
            latencies.append(time.perf_counter() - completed)

    async with RecognizerClient(address) as client:
        outcome_task = asyncio.create_task(
            client.recognize(audio, StreamOptions(chunk_ms=LATENCY_CHUNK_MS, realtime=True), on_result=on_result)
        )
        # The client paces chunk k at t0 + k * chunk; record the same schedule here.
        started = time.perf_counter()
        for index in range(-(-audio.size // chunk)):  # chunk k (k = 0, 1, ...) goes at t0 + k * chunk
            sent_at.append((min((index + 1) * chunk, audio.size), started + index * chunk / SAMPLE_RATE))
        outcome = await outcome_task
    stages = {t.stage: [t.p50_ms, t.p95_ms] for t in outcome.final.stats.stage_timings}
    return latencies, stages


async def local_update_latency(model, options: SessionOptions, audio: np.ndarray) -> tuple[list[float], dict]:  # noqa: ANN001
    """The same stream driven in process (the ingress's code over in-process stages): per update, the seconds
    from receiving the chunk that completed its block to its events; and the stage timings."""
    session = StreamingSession(model, options, stream_id="local", keep_replay=True)
    driver = StreamDriver(session, LocalStages(FeatureStage(), *session.own_stages))  # one-slot stages of its own
    chunk = LATENCY_CHUNK_MS * SAMPLE_RATE // 1000
    latencies = []
    for start in range(0, audio.size, chunk):
        began = time.perf_counter()
        events = await driver.push_audio(audio[start : start + chunk])
        if any(event.kind == "update" for event in events):
            latencies.append(time.perf_counter() - began)
    await driver.finish()
    per_stage = {
        stage: [1000 * float(np.percentile(seconds, q)) for q in (50, 95)]
        for stage, seconds in driver.stats.stage_seconds.items()
    }
    return latencies, per_stage


def run_serve_bench(
    full_size: bool,
    stream_counts: list[int],
    seconds: float,
    max_new_tokens: int,
    transports: list[str],
    work_dir: Path | None = None,
    batch_wait_ms: float = 2.0,
    decoder_threads: int = 1,
) -> list[ServeBenchResult]:
    """Both sides in one run; see the module docstring."""
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
        kind = "full-size random fp32" if full_size else "tiny"
        log.info("bench serve: writing the %s checkpoint", kind)
        checkpoint = make_random_checkpoint(Path(scratch) / "model", seed=0, with_tower=True, full_size=full_size)
        tower = checkpoint / TOWER_OVERLAY_DIR
        options = SessionOptions(language="English", decode=DecodeOptions(max_new_tokens=max_new_tokens))
        recordings = [synthetic_audio(seconds, seed=index) for index in range(max(stream_counts))]
        torch.set_num_threads(2)  # the in-process engine uses the whole machine
        model = load_model(checkpoint, tower=tower, dtype=torch.float32)
        in_process = {}
        for count in stream_counts:
            in_process[count] = in_process_throughput(model, options, recordings[:count])
            log.info("bench serve: in process, N=%d: %.2f real-time streams", count, in_process[count])
        local_latency, local_stages = asyncio.run(local_update_latency(model, options, recordings[0]))
        del model
        torch.set_num_threads(1)

        results = []
        for transport in transports:
            settings = server.ServerSettings(
                args={"model": str(checkpoint), "tower": str(tower), "dtype": "float32", "slots": max(stream_counts),
                      "session": {"decode": {"max_new_tokens": max_new_tokens}}, "batch_wait_ms": batch_wait_ms},
                transport=transport,
                deployment_options={
                    name: {"num_replicas": 1, "ray_actor_options": {"num_cpus": decoder_threads if name == "Decoder" else 1}}
                    for name in ("Ingress", "FeatureExtractor", "CausalEncoder", "Decoder")
                },
            )
            address = server.start(settings)
            try:
                asyncio.run(_wait(address))
                latency, served_stages = asyncio.run(served_update_latency(address, recordings[0]))
                added = tuple(
                    1000 * (float(np.percentile(latency, q)) - float(np.percentile(local_latency, q))) for q in (50, 95)
                )
                stage_ms = {
                    stage: (*served_stages[stage], *local_stages[stage]) for stage in served_stages if stage in local_stages
                }
                for count in stream_counts:
                    rtf, _ = asyncio.run(served_throughput(address, recordings[:count]))
                    log.info("bench serve: served (%s), N=%d: %.2f real-time streams", transport, count, rtf)
                    results.append(
                        ServeBenchResult(kind, transport, count, seconds, in_process[count], rtf, added, stage_ms)
                    )
            finally:
                server.stop()
        return results


async def _wait(address: str) -> None:
    async with RecognizerClient(address) as client:
        await wait_until_serving(client.channel, 300)


def format_serve_table(
    results: list[ServeBenchResult], max_new_tokens: int, batch_wait_ms: float, decoder_threads: int
) -> str:
    lines = [
        f"Serving cost (measured here; in process: one engine, 2 torch threads; served: one replica per stage, "
        f"{decoder_threads} torch thread(s) for the decoder, 1 for the others, batch wait {batch_wait_ms:g} ms; "
        f"random weights, every update decodes {max_new_tokens} tokens)",
        "",
        "| model | transport | N | in-process RT streams | served RT streams | served / in-process |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.transport} | {r.streams} | {r.in_process_rtf_streams:.2f} | "
            f"{r.served_rtf_streams:.2f} | {r.ratio:.2f}x |"
        )
    lines += ["", "| model | transport | added update latency p50 / p95 (ms) | stage: served p50/p95 vs in-process p50/p95 (ms) |",
              "|---|---|---:|---|"]
    seen = set()
    for r in results:
        if (r.model, r.transport) in seen or r.added_latency_ms is None:
            continue
        seen.add((r.model, r.transport))
        stages = "; ".join(
            f"{stage} {sp50:.1f}/{sp95:.1f} vs {lp50:.1f}/{lp95:.1f}" for stage, (sp50, sp95, lp50, lp95) in r.stage_ms.items()
        )
        lines.append(f"| {r.model} | {r.transport} | {r.added_latency_ms[0]:.1f} / {r.added_latency_ms[1]:.1f} | {stages} |")
    return "\n".join(lines)


def summary_dicts(results: list[ServeBenchResult]) -> list[dict[str, Any]]:
    return [r.__dict__ | {"ratio": r.ratio} for r in results]
