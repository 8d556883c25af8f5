"""`qwen3-stream bench engine`: real-time capacity of the multi-stream engine at full size, random weights.

What is measured: the real `StreamingEngine` (front-end, causal encoder over K/V slot pools, rolling decoder with
speculative verification, commit and segment policy) on the full-size Qwen3-ASR-0.6B geometry with random weights,
for N streams whose blocks arrive together (aligned: the best case for batching, the worst for queueing).

What is synthetic: the **decode budget**. Random weights decode garbage (up to 256 tokens per update), so the
token *choices* are scripted while every forward pass, logit filter and verification still runs for real:
`SyntheticDecodeBudget` picks tokens so that, in steady state, each update verifies a 30-token draft, accepts
21 of it and appends 9 tokens with 9 sequential steps (the published steady state, causal_runtime.md §5); the
first updates of a segment build the hypothesis up 9 tokens at a time. The output says so.

Per N it reports per-update latency p50/p95 (= the step time, since every stream's update ends with the step),
aggregate real-time factor (audio seconds per wall second), whether N streams keep up with real time, the K/V
memory per stream slot, and the per-stream cost at batch N relative to batch 1, all measured in one run.

Two more arrival patterns: `staggered` (live streams on a simulated clock: latency with queueing) and
`staggered-starts` (streams starting at spread steps, so every step updates scattered slots of unequal lengths:
host time per phase and per stream, split from the time inside tensor operators, and a step's peak memory next to
the pools). With `--checkpoint` (e.g. the tiny one) a local checkpoint replaces the random full-size model: on the
tiny one the tensor work shrinks and the host work around it shows.
"""

from __future__ import annotations

import heapq
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from pipeline.checkpoint import ASRModel, default_dtype, dtype_from_name, load_model
from pipeline.config import QWEN3_ASR_0_6B, Qwen3ASRConfig
from pipeline.decoder import TextDecoder
from pipeline.decoding import DecodeControls, Pick, Verdict
from pipeline.encoder import AudioTower
from pipeline.engine import EngineOptions, StepTiming, StreamingEngine
from pipeline.features import FRAMES_PER_SECOND, HOP_LENGTH, N_FFT, SAMPLE_RATE
from pipeline.host_policy import POLICIES as HOST_POLICIES
from pipeline.options import SessionOptions
from pipeline.step_probes import CollectorClock, OpClock, PeakTensorBytes, PythonCalls
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR, build_tiny_tokenizer

log = logging.getLogger(__name__)

DRAFT_TOKENS = 30
NEW_TOKENS_PER_UPDATE = 9  # per block of audio; the steady draft is accepted up to DRAFT_TOKENS - new tokens


class SyntheticDecodeBudget(DecodeControls):
    """Decode controls whose filter chain runs on the real logits but whose picks follow a fixed budget.

    New tokens come in runs (9 per block of audio the update hears) of one of three words; verification accepts
    at most `DRAFT_TOKENS` minus that many draft tokens and then starts a run of a word that differs from both the
    last accepted token and the rejected draft token, so the budget holds whatever the logits say.
    """

    def __init__(self, base: DecodeControls, words: tuple[int, int, int], blocks_per_update: int = 1) -> None:
        super().__init__(base.options)
        self.words = words
        self.stop = base.options.stop_token_ids[0]
        self.hear(blocks_per_update)

    def hear(self, blocks: int) -> None:
        """Budget the coming updates for `blocks` blocks of new speech each: k blocks re-decode k times as many
        tokens (capped by the draft: the steady hypothesis stays DRAFT_TOKENS long)."""
        self.new_tokens = min(NEW_TOKENS_PER_UPDATE * blocks, DRAFT_TOKENS)
        self.accepted = DRAFT_TOKENS - self.new_tokens

    def pick(self, logits: Tensor, histories: Sequence[Sequence[int]]) -> list[Pick]:
        super().pick(logits, histories)  # the real cost of the filter chain; the choice is scripted
        return [Pick(self._continue(history), 0.0) for history in histories]

    def verify_drafts(
        self,
        logits: Tensor,
        drafts: Sequence[Sequence[int]],
        histories: Sequence[Sequence[int]] | None = None,
    ) -> list[Verdict]:
        super().verify_drafts(logits, drafts, histories)  # the real cost: filter chain over every draft prefix
        return [self._scripted_verdict(draft) for draft in drafts]

    def _scripted_verdict(self, draft: Sequence[int]) -> Verdict:
        accepted = min(len(draft), self.accepted)
        taken = {*draft[max(0, accepted - 1) : accepted + 1]}
        return Verdict(accepted, next(word for word in self.words if word not in taken), (0.0,) * (accepted + 1))

    def _continue(self, history: Sequence[int]) -> int:
        """The run's word again, or a stop once the history ends in `new_tokens` of it (compared in one slice:
        the script stands in for an argmax and should cost the host as little)."""
        if not history:
            return self.stop
        last = history[-1]
        run_done = len(history) >= self.new_tokens and list(history[-self.new_tokens :]).count(last) == self.new_tokens
        return self.stop if run_done else last


def random_full_size_model(
    config: Qwen3ASRConfig = QWEN3_ASR_0_6B, device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0
) -> ASRModel:
    """The full-size architecture with random weights (compute does not depend on weight values).

    The tokenizer is the tiny checkpoint's (its ids fit the full vocabulary); the prompt it builds is a few
    tokens longer than the official one (head 11 vs 9, tail 12 vs 9 positions).
    """
    torch.manual_seed(seed)
    dtype = dtype or default_dtype(device)
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["<|audio_pad|>", "<|audio_start|>", "<|audio_end|>"])
    config = replace(config, audio_token_id=ids[0], audio_start_token_id=ids[1], audio_end_token_id=ids[2])
    with torch.device(device):
        tower = AudioTower(config.audio).to(dtype).eval()
        decoder = TextDecoder(config.text).to(dtype).eval()
    return ASRModel(config, tower, decoder, tokenizer, model_source="random full-size", tower_source=None)


@dataclass(frozen=True)
class EngineBenchResult:
    streams: int
    decode_step: str
    steps: int
    step_p50_sec: float
    step_p95_sec: float
    step_mean_sec: float
    encoder_mean_sec: float
    decoder_mean_sec: float
    audio_per_step_sec: float
    kv_bytes_per_stream: int
    mean_draft: float
    mean_accepted: float
    mean_decode_steps: float

    @property
    def rtfx(self) -> float:
        """Aggregate audio seconds processed per wall-clock second."""
        return self.streams * self.audio_per_step_sec / self.step_mean_sec

    @property
    def keeps_up(self) -> bool:
        """Real time: on average a step (one block of every stream) takes less than a block of audio."""
        return self.step_mean_sec <= self.audio_per_step_sec

    @property
    def per_stream_sec(self) -> float:
        return self.step_mean_sec / self.streams


def run_engine_bench(
    model: ASRModel,
    stream_counts: Sequence[int],
    blocks_per_stream: int = 9,
    options: SessionOptions | None = None,
    engine_options: EngineOptions = EngineOptions(),
) -> list[EngineBenchResult]:
    """Measure each N in `stream_counts` in turn (same process, same model), aligned arrivals.

    `engine_options`: how the engine runs (decode step, catch-up); `max_streams` is set to each N.

    With `options.blocks_per_update` = k > 1 a decoder update follows every k-th block, so steps alternate
    between encoder-only and encoder + decoder; the update latency is then the p95 step plus up to k − 1 blocks
    of waiting."""
    options = options or SessionOptions(language="English")
    results = []
    for count in stream_counts:
        log.info("bench engine: N=%d aligned streams, %d blocks each ...", count, blocks_per_stream)
        engine = StreamingEngine(model, options, replace(engine_options, max_streams=count))
        for stream_id, audio in _budgeted_streams(engine, count, blocks_per_stream)[0].items():
            engine.push_audio(stream_id, audio)
            engine.finish_stream(stream_id)
        timings: list[StepTiming] = []
        stats = []
        while engine.has_work:
            events = engine.step()
            timing = engine.last_step_timing
            if timing is not None and timing.streams == count:
                timings.append(timing)
                stats += [e.stats for stream_events in events.values() for e in stream_events if e.stats]
        totals = [t.total_sec for t in timings]
        results.append(
            EngineBenchResult(
                streams=count,
                decode_step=engine.engine_options.decode_step_on(model.device),
                steps=len(timings),
                step_p50_sec=float(np.percentile(totals, 50)),
                step_p95_sec=float(np.percentile(totals, 95)),
                step_mean_sec=statistics.fmean(totals),
                encoder_mean_sec=statistics.fmean(t.encoder_sec for t in timings),
                decoder_mean_sec=statistics.fmean(t.decoder_sec for t in timings),
                audio_per_step_sec=options.encoder.block_frames / FRAMES_PER_SECOND,
                kv_bytes_per_stream=engine.kv_bytes_per_stream,
                mean_draft=statistics.fmean(s.draft_tokens for s in stats),
                mean_accepted=statistics.fmean(s.draft_accepted for s in stats),
                mean_decode_steps=statistics.fmean(s.decode_steps for s in stats),
            )
        )
        log.info("bench engine: N=%d done (%.2f s per step)", count, results[-1].step_mean_sec)
    return results


def _budgeted_streams(
    engine: StreamingEngine, count: int, blocks_per_stream: int
) -> tuple[dict[str, np.ndarray], SyntheticDecodeBudget]:
    """Open `count` streams on one shared synthetic decode budget (a batched update runs its first stream's
    controls for all); returns each stream's audio (noise, whole blocks) and the budget."""
    options = engine.options
    words = tuple(engine.model.tokenizer.encode(word)[0] for word in (" the", " a", " one"))
    rng = np.random.default_rng(count)
    samples = blocks_per_stream * options.encoder.block_frames * SAMPLE_RATE // FRAMES_PER_SECOND
    streams, budget = {}, None
    for index in range(count):
        stream_id = f"stream-{index}"
        engine.open_stream(stream_id)
        session = engine.session(stream_id)
        budget = budget or SyntheticDecodeBudget(session.controls, words, options.blocks_per_update)
        session.decoder_settings = replace(session.decoder_settings, controls=budget)
        session.controls = budget
        streams[stream_id] = (0.1 * rng.standard_normal(samples)).astype(np.float32)
    return streams, budget


#: Live streams send audio in chunks of this many seconds (a block completes at most one chunk after its end).
LIVE_CHUNK_SEC = 0.04


class _ChunkArrivals:
    """Live streams' audio chunks in order of the moment they were spoken (a heap: a thousand streams stay cheap)."""

    def __init__(
        self, engine: StreamingEngine, audio: dict[str, np.ndarray], phase: dict[str, float], chunk_samples: int
    ) -> None:
        self.engine, self.audio, self.phase, self.chunk_samples = engine, audio, phase, chunk_samples
        self.sent = dict.fromkeys(audio, 0)
        self.heap = [(self._arrival(stream_id), stream_id) for stream_id in audio]
        heapq.heapify(self.heap)

    def deliver_until(self, clock: float) -> None:
        while self.heap and self.heap[0][0] <= clock:
            self._deliver_next()

    def deliver_until_a_stream_is_ready(self) -> float:
        """The engine is idle: deliver chunks in time order until one makes its stream ready; returns that time."""
        while True:
            arrival, stream_id = self._deliver_next()
            if self.engine.session(stream_id).ready_for_step:
                return arrival

    def _deliver_next(self) -> tuple[float, str]:
        arrival, stream_id = heapq.heappop(self.heap)
        start = self.sent[stream_id] * self.chunk_samples
        self.engine.push_audio(stream_id, self.audio[stream_id][start : start + self.chunk_samples])
        self.sent[stream_id] += 1
        if start + self.chunk_samples < self.audio[stream_id].size:
            heapq.heappush(self.heap, (self._arrival(stream_id), stream_id))
        else:
            self.engine.finish_stream(stream_id)
        return arrival, stream_id

    def _arrival(self, stream_id: str) -> float:
        """When the stream's next chunk's last sample has been spoken."""
        end = min((self.sent[stream_id] + 1) * self.chunk_samples, self.audio[stream_id].size)
        return self.phase[stream_id] + end / SAMPLE_RATE


@dataclass(frozen=True)
class LiveBenchResult:
    """N live streams with staggered block phases, on a simulated real-time clock."""

    streams: int
    decode_step: str
    catch_up_blocks: int
    steps: int  # steps that advanced some stream
    mean_batch: float  # blocks advanced per such step
    latency_p50_sec: float  # a block's last sample arriving -> its update's events
    latency_p95_sec: float
    latency_max_sec: float
    busy_fraction: float  # share of the simulated time spent stepping


def run_live_engine_bench(
    model: ASRModel,
    stream_counts: Sequence[int],
    blocks_per_stream: int = 9,
    options: SessionOptions | None = None,
    engine_options: EngineOptions = EngineOptions(),
) -> list[LiveBenchResult]:
    """Live streams whose blocks complete at staggered phases (stream i is i/N of a block behind stream 0).

    A simulated clock stands for real time: audio is delivered when the clock passes the moment its block would
    have been spoken, each engine step advances the clock by its measured wall time, and an idle engine jumps to
    the next arrival. So queueing is real (a step only batches the streams whose blocks have arrived; blocks
    arriving during a step wait for the next) without waiting out the audio on the wall clock. With
    `engine_options.catch_up_blocks` > 1 a stream that falls behind is caught up several blocks per update.
    Audio arrives in `LIVE_CHUNK_SEC` chunks, as from a client. An update's latency runs from the moment the last
    audio it decodes was spoken to the end of the step that emits it (so it includes the front-end's 2.5 ms
    look-ahead and up to one chunk of delivery).
    """
    options = options or SessionOptions(language="English")
    block_sec = options.encoder.block_frames / FRAMES_PER_SECOND
    chunk_samples = round(LIVE_CHUNK_SEC * SAMPLE_RATE)
    catch_up = engine_options.catch_up_blocks
    results = []
    for count in stream_counts:
        log.info("bench engine (live): N=%d staggered streams, %d blocks each ...", count, blocks_per_stream)
        engine = StreamingEngine(model, options, replace(engine_options, max_streams=count))
        audio, budget = _budgeted_streams(engine, count, blocks_per_stream)
        phase = {stream_id: index * block_sec / count for index, stream_id in enumerate(audio)}
        arrivals = _ChunkArrivals(engine, audio, phase, chunk_samples)
        clock, busy, batches, latencies = 0.0, 0.0, [], []
        while engine.active_streams:
            arrivals.deliver_until(clock)
            if not engine.has_work:
                clock = arrivals.deliver_until_a_stream_is_ready()
                continue
            # A caught-up update hears several blocks and re-decodes as many times the tokens: budget the step for
            # the most any stream advances in it (pessimistic for the streams that advance less).
            lag = max(min(catch_up, engine.session(s).whole_blocks_buffered) for s in engine.active_streams)
            budget.hear(max(options.blocks_per_update, lag))
            events = engine.step()
            timing = engine.last_step_timing
            clock += timing.total_sec
            busy += timing.total_sec
            if timing.streams:
                batches.append(timing.streams)
            for stream_id, stream_events in events.items():
                latencies += [clock - phase[stream_id] - e.audio_sec for e in stream_events if e.kind == "update"]
        results.append(
            LiveBenchResult(
                streams=count,
                decode_step=engine.engine_options.decode_step_on(model.device),
                catch_up_blocks=engine.engine_options.catch_up_blocks,
                steps=len(batches),
                mean_batch=statistics.fmean(batches),
                latency_p50_sec=float(np.percentile(latencies, 50)),
                latency_p95_sec=float(np.percentile(latencies, 95)),
                latency_max_sec=max(latencies),
                busy_fraction=busy / clock,
            )
        )
        log.info("bench engine (live): N=%d done (p95 latency %.2f s)", count, results[-1].latency_p95_sec)
    return results


def format_live_table(results: Sequence[LiveBenchResult], device: str, latency_target_sec: float = 0.5) -> str:
    """A Markdown table of live runs, plus the largest N within the latency target."""
    lines = [
        f"device: {device}; live streams at staggered block phases on a simulated real-time clock (each step takes "
        "its measured wall time); decode budget synthetic, as in the aligned runs",
        "",
        "| N | decode step | catch-up | steps | blocks per step | update latency p50 (s) | p95 (s) | max (s) | "
        "engine busy |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.streams} | {r.decode_step} | {r.catch_up_blocks} | {r.steps} | {r.mean_batch:.1f} | "
            f"{r.latency_p50_sec:.2f} | "
            f"{r.latency_p95_sec:.2f} | {r.latency_max_sec:.2f} | {100 * r.busy_fraction:.0f} % |"
        )
    within = [r.streams for r in results if r.latency_p95_sec <= latency_target_sec]
    largest = max(within) if within else "none measured"
    lines += ["", f"largest live N with p95 update latency <= {latency_target_sec:.1f} s: {largest}"]
    return "\n".join(lines)


#: Staggered starts: stream i starts at step i mod (CADENCE x AGES) and gets one block every CADENCE steps, so each
#: step updates every CADENCE-th slot (scattered slots) from AGES different start steps (unequal cache lengths).
STAGGER_CADENCE = 2
STAGGER_AGES = 3
#: Steps the staggered-starts bench runs under `OpClock`; the one with the median host time per stream is
#: reported (one step's split into kernels and host work varies by tens of percent from step to step).
PROBED_STEPS = 3


def samples_completing(frames: int) -> int:
    """The fewest samples of a stream with `frames` log-mel frames complete (`features.frames_complete`'s inverse):
    a block's own samples plus N_FFT / 2 - HOP_LENGTH (40) of the next one's, which a live chunk boundary just
    after the block brings."""
    if frames <= 0:
        return 0
    return max(HOP_LENGTH * (frames - 1) + N_FFT // 2, N_FFT // 2 + 1)  # frame 0 also reflects sample 200


class StaggeredStarts:
    """The staggered-starts schedule: stream i (in `audio`'s order) starts at step i mod (`STAGGER_CADENCE` x
    `STAGGER_AGES`) and is pushed its next block of audio every `STAGGER_CADENCE` steps, its end with its last.

    A push ends where its block's frames are complete (`samples_completing`: 40 samples into the next block), as
    a live stream's chunk boundary just after the block would: the block is then due at the step it arrives for,
    not one push later with a whole block of frames waiting in the session."""

    def __init__(self, engine: StreamingEngine, audio: dict[str, np.ndarray], block_samples: int) -> None:
        self.engine, self.audio = engine, audio
        self.block_frames = block_samples // HOP_LENGTH
        period = STAGGER_CADENCE * STAGGER_AGES
        self.start = {stream_id: index % period for index, stream_id in enumerate(audio)}
        self.pushed = dict.fromkeys(audio, 0)  # blocks
        self.sent = dict.fromkeys(audio, 0)  # samples

    def push_due(self, step: int) -> None:
        """Push the blocks due before `step`."""
        for stream_id, samples in self.audio.items():
            start, sent = self.start[stream_id], self.sent[stream_id]
            if step < start or (step - start) % STAGGER_CADENCE or sent >= samples.size:
                continue
            self.pushed[stream_id] += 1
            end = min(samples_completing(self.pushed[stream_id] * self.block_frames), samples.size)
            self.engine.push_audio(stream_id, samples[sent:end])
            self.sent[stream_id] = end
            if end == samples.size:
                self.engine.finish_stream(stream_id)


@dataclass(frozen=True)
class StaggeredStartResult:
    """Host time of engine steps over N open streams with staggered starts (see `run_staggered_start_bench`)."""

    streams: int  # open streams
    steps: int  # measured steps: every stream started, none finished
    mean_batch: float  # streams advanced per measured step
    step_mean_sec: float
    features_sec: float  # phase means per measured step; features: the driver's time on the front end (running
    # it, or waiting for the call the last step started on the front-end thread)
    schedule_sec: float
    encoder_sec: float
    decoder_sec: float
    policy_sec: float
    collector_sec: float  # Python's garbage collector, within the phases above
    probe_streams: int  # streams advanced by the reported probed step (the median of `PROBED_STEPS`)
    probe_kernel_sec: float  # its time inside tensor operators (`OpClock`)
    # The rest of its wall time but the front end's (its own stage: the log-mel is numpy work on the engine's
    # front-end thread, or the feature deployment's), less the probe's own cost: Python, scheduling, bookkeeping.
    probe_host_sec: float
    probe_ops: int  # operators it ran (on a GPU, each one is also a kernel launch from the host)
    python_calls_per_stream: float  # function calls of one more probed step (`PythonCalls`) per stream it advanced
    peak_step_bytes: int  # tensors one step allocates beyond weights and pools (`PeakTensorBytes`)
    pool_bytes: int  # the encoder + decoder K/V pools

    @property
    def step_ms_per_stream(self) -> float:
        return 1e3 * self.step_mean_sec / self.mean_batch

    @property
    def kernel_ms_per_stream(self) -> float:
        return 1e3 * self.probe_kernel_sec / self.probe_streams

    @property
    def host_ms_per_stream(self) -> float:
        """Host work per stream advanced: the probed step's time outside tensor operators."""
        return 1e3 * self.probe_host_sec / self.probe_streams


def run_staggered_start_bench(
    model: ASRModel,
    stream_counts: Sequence[int],
    blocks_per_stream: int = 8,
    options: SessionOptions | None = None,
    engine_options: EngineOptions = EngineOptions(),
) -> list[StaggeredStartResult]:
    """N streams, all admitted at once, start speaking at staggered steps: stream i at step i mod
    (`STAGGER_CADENCE` x `STAGGER_AGES`), then one block every `STAGGER_CADENCE` steps (its audio is pushed when
    the block is due). Every step then updates every STAGGER_CADENCE-th slot, streams of `STAGGER_AGES` different
    ages with unequal cache lengths, and segments roll at different steps: the scattered batches a live engine
    sees, on a fixed schedule so that N = 10 and N = 1000 are compared at the same shape.

    Measured: the steps in which every stream has started and none has finished; their wall time by phase
    (`StepTiming`, the front end's log-mel included). The first `PROBED_STEPS` + 2 such steps are probes, not
    timed: `PROBED_STEPS` under `OpClock` (wall time but the front end's, split into tensor operators and host
    work; the step with the median host time per stream is reported), one under `PeakTensorBytes`
    (the bytes it allocates, next to the pools' bytes), one under `PythonCalls` (its calls per stream)."""
    options = options or SessionOptions(language="English")
    block_samples = options.encoder.block_frames * SAMPLE_RATE // FRAMES_PER_SECOND
    period = STAGGER_CADENCE * STAGGER_AGES
    OpClock.overhead_per_op()  # calibrated (and the dispatch mode initialised) outside the probed steps
    with PeakTensorBytes():
        torch.zeros(1).add_(1)
    results = []
    for count in stream_counts:
        log.info("bench engine (staggered starts): N=%d streams, %d blocks each ...", count, blocks_per_stream)
        engine = StreamingEngine(model, options, replace(engine_options, max_streams=count))
        audio, _ = _budgeted_streams(engine, count, blocks_per_stream)
        schedule = StaggeredStarts(engine, audio, block_samples)
        timings: list[StepTiming] = []
        step = 0
        probes: list[tuple[OpClock, StepTiming]] = []
        peak_bytes: int | None = None
        calls_per_stream: float | None = None
        collector = CollectorClock()
        while engine.active_streams:
            schedule.push_due(step)
            measured = step >= period and len(engine.active_streams) == count
            if measured and len(probes) < PROBED_STEPS:
                with OpClock() as clock:
                    engine.step()
                probes.append((clock, engine.last_step_timing))
            elif measured and peak_bytes is None:
                with PeakTensorBytes() as memory:
                    engine.step()
                peak_bytes = memory.peak
            elif measured and calls_per_stream is None:
                with PythonCalls() as calls:
                    engine.step()
                calls_per_stream = calls.calls / max(1, engine.last_step_timing.streams)
            elif measured:
                with collector:
                    engine.step()
                timings.append(engine.last_step_timing)
            else:
                engine.step()
            step += 1
        if not timings or peak_bytes is None or calls_per_stream is None:
            raise ValueError(f"blocks_per_stream={blocks_per_stream} leaves no step with every stream running")
        clock, probed = sorted(probes, key=lambda probe: _host_seconds(*probe) / probe[1].streams)[len(probes) // 2]
        results.append(
            StaggeredStartResult(
                streams=count,
                steps=len(timings),
                mean_batch=statistics.fmean(t.streams for t in timings),
                step_mean_sec=statistics.fmean(t.total_sec for t in timings),
                features_sec=statistics.fmean(t.features_sec for t in timings),
                schedule_sec=statistics.fmean(t.schedule_sec for t in timings),
                encoder_sec=statistics.fmean(t.encoder_sec for t in timings),
                decoder_sec=statistics.fmean(t.decoder_sec for t in timings),
                policy_sec=statistics.fmean(t.policy_sec for t in timings),
                collector_sec=collector.seconds / len(timings),
                probe_streams=probed.streams,
                probe_kernel_sec=clock.seconds,
                probe_host_sec=_host_seconds(clock, probed),
                probe_ops=clock.ops,
                python_calls_per_stream=calls_per_stream,
                peak_step_bytes=peak_bytes,
                pool_bytes=engine.kv_bytes_per_stream * count,
            )
        )
        log.info("bench engine (staggered starts): N=%d done (%.3f s per step)", count, results[-1].step_mean_sec)
    return results


def _host_seconds(clock: OpClock, timing: StepTiming) -> float:
    """A probed step's host time: its wall time outside tensor operators, the front end's time left out."""
    return clock.host_seconds(timing.total_sec - timing.features_sec)


def format_staggered_table(results: Sequence[StaggeredStartResult], device: str) -> str:
    """Markdown: mean step and its phases, host work per stream, peak step memory, the largest N against the
    smallest."""
    lines = [
        f"device: {device}; staggered starts (stream i starts at step i mod {STAGGER_CADENCE * STAGGER_AGES}, one "
        f"block every {STAGGER_CADENCE} steps: each step updates every {STAGGER_CADENCE}nd slot, streams of "
        f"{STAGGER_AGES} ages); decode budget synthetic. Features: the driver's time on the front end (a step's "
        "log-mel ran on the front-end thread during the step before: this is the wait for it). Kernels and host: "
        f"the median of {PROBED_STEPS} probed steps' time inside tensor operators and outside them (Python, "
        "scheduling, bookkeeping; the front end's time and the probe's own cost removed). GC: Python's garbage "
        "collector per step, within the phases. Calls/stream: the Python and C function calls of one more probed "
        "step per stream it advanced (`PythonCalls`: host work that machine load does not change).",
        "",
        "| N | steps | streams/step | mean step (s) | features | schedule | encoder | decoder | policy | GC | "
        "step ms/stream | kernels ms/stream | host ms/stream | calls/stream | ops in step | peak step MiB | "
        "pools MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.streams} | {r.steps} | {r.mean_batch:.0f} | {r.step_mean_sec:.3f} | {r.features_sec:.3f} | "
            f"{r.schedule_sec:.3f} | {r.encoder_sec:.3f} | {r.decoder_sec:.3f} | {r.policy_sec:.3f} | "
            f"{r.collector_sec:.3f} | {r.step_ms_per_stream:.3f} | {r.kernel_ms_per_stream:.3f} | "
            f"{r.host_ms_per_stream:.3f} | {r.python_calls_per_stream:.0f} | {r.probe_ops} | "
            f"{r.peak_step_bytes / 2**20:.1f} | "
            f"{r.pool_bytes / 2**20:.1f} |"
        )
    smallest, largest = min(results, key=lambda r: r.streams), max(results, key=lambda r: r.streams)
    if largest.streams > smallest.streams:
        lines += [
            "",
            f"mean step at N={largest.streams} / at N={smallest.streams}: "
            f"{largest.step_mean_sec / smallest.step_mean_sec:.1f}x; host work per step at N={largest.streams} / "
            f"at N={smallest.streams}: {largest.probe_host_sec / smallest.probe_host_sec:.1f}x",
        ]
    return "\n".join(lines)


def format_engine_table(
    results: Sequence[EngineBenchResult], device: str, latency_target_sec: float = 0.5, blocks_per_update: int = 1
) -> str:
    """A Markdown table, plus the capacity lines derived from it."""
    base = {r.decode_step: r for r in results if r.streams == 1}
    new_tokens = min(NEW_TOKENS_PER_UPDATE * blocks_per_update, DRAFT_TOKENS)
    lines = [
        f"device: {device}; decoder update every {blocks_per_update} block(s); decode budget per update: synthetic "
        f"(draft {DRAFT_TOKENS}, accept {DRAFT_TOKENS - new_tokens}, {new_tokens} sequential steps in steady state; "
        "random weights decode garbage)",
        "",
        "| N | decode step | steps | update p50 (s) | update p95 (s) | encoder (s) | decoder (s) | RTFx | real time | "
        "per-stream s/update | vs N=1 | K/V MiB/stream | draft/accepted/steps |",
        "|---:|---|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---|",
    ]
    for r in results:
        one = base.get(r.decode_step)
        ratio = f"{r.per_stream_sec / one.per_stream_sec:.2f}x" if one else "n/a"
        lines.append(
            f"| {r.streams} | {r.decode_step} | {r.steps} | {r.step_p50_sec:.2f} | {r.step_p95_sec:.2f} | "
            f"{r.encoder_mean_sec:.2f} | "
            f"{r.decoder_mean_sec:.2f} | {r.rtfx:.2f} | {'yes' if r.keeps_up else 'no'} | {r.per_stream_sec:.2f} | "
            f"{ratio} | {r.kv_bytes_per_stream / 2**20:.1f} | {r.mean_draft:.1f}/{r.mean_accepted:.1f}/"
            f"{r.mean_decode_steps:.1f} |"
        )
    real_time = [r.streams for r in results if r.keeps_up]
    within_target = [r.streams for r in results if r.keeps_up and r.step_p95_sec <= latency_target_sec]
    best = max(results, key=lambda r: r.rtfx)
    lines += [
        "",
        f"largest N in real time (mean step <= one block): {max(real_time) if real_time else 'none measured'}",
        f"largest N in real time with p95 update latency <= {latency_target_sec:.1f} s: "
        f"{max(within_target) if within_target else 'none measured'}",
        f"highest throughput: {best.rtfx:.2f} real-time streams' worth of audio at N={best.streams}",
    ]
    return "\n".join(lines)


def run_bench_engine_command(args) -> int:
    """Handler body of `qwen3-stream bench engine` (cli.py parses and checks the arguments): prints the tables."""
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(part) for part in args.streams.split(",") if part.strip()]
    decode_steps = [kind.strip() for kind in args.decode_steps.split(",")]
    arrivals = [kind.strip() for kind in args.arrivals.split(",")]
    unknown = set(arrivals) - {"aligned", "staggered", "staggered-starts"}
    if unknown:
        raise SystemExit(f"--arrivals {sorted(unknown)}: expected aligned, staggered and/or staggered-starts")
    dtypes = [dtype_from_name(name.strip()) for name in args.dtypes.split(",")]
    host_policies = [policy.strip() for policy in args.host_policy.split(",")]
    options = SessionOptions(language="English", blocks_per_update=args.blocks_per_update)
    for dtype in dtypes:  # one model per dtype, measured one after the other in this process
        started = time.perf_counter()
        if args.checkpoint is None:
            model = random_full_size_model(device=args.device, dtype=dtype)
        else:
            tower = args.checkpoint / TOWER_OVERLAY_DIR
            model = load_model(args.checkpoint, tower=tower, device=args.device, dtype=dtype)
        log.info("%s (%s) ready in %.1f s", model.model_source, model.dtype, time.perf_counter() - started)
        for host_policy in host_policies:  # each host policy in turn, on the same model
            HOST_POLICIES[host_policy]()
            device = f"{_describe(model)}, host policy {host_policy}"
            if "aligned" in arrivals:
                # Aligned runs buffer every stream's whole audio, so catch-up would only re-create blocks_per_update.
                aligned = [
                    result
                    for kind in decode_steps
                    for result in run_engine_bench(
                        model, counts, args.blocks, options, EngineOptions(decode_step=kind)
                    )
                ]
                print(format_engine_table(aligned, device, blocks_per_update=args.blocks_per_update), end="\n\n")
            if "staggered" in arrivals:
                live_options = [
                    EngineOptions(decode_step=kind, catch_up_blocks=int(blocks))
                    for kind in decode_steps
                    for blocks in args.catch_up_blocks.split(",")
                ]
                live = [
                    result
                    for engine_options in live_options
                    for result in run_live_engine_bench(model, counts, args.blocks, options, engine_options)
                ]
                print(format_live_table(live, device), end="\n\n")
            if "staggered-starts" in arrivals:
                for kind in decode_steps:
                    engine_options = EngineOptions(decode_step=kind)
                    starts = run_staggered_start_bench(model, counts, args.blocks, options, engine_options)
                    print(format_staggered_table(starts, f"{device}, decode step {kind}"), end="\n\n")
    return 0


def _describe(model: ASRModel) -> str:
    dtype = str(model.dtype).removeprefix("torch.")
    where = (
        torch.cuda.get_device_name(model.device)
        if model.device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    return f"{where} ({dtype}), {model.model_source}"
