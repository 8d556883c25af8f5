"""`qwen3-stream loadtest`: many realtime streams against a running server, latency measured on the client.

N concurrent Recognize calls (the client library's `recognize`, paced like microphones: chunk k is written at
t0 + k * chunk on the loop clock) spread over C `grpc.aio` channels and started evenly over a ramp. Every Result
says how much audio the update heard (`audio_processed_ms`); the client knows when it sent the chunk holding that
sample (`LatencyTracker`), so

    update latency = Result arrival - send time of the chunk that held the last sample the update heard
    final latency  = Final arrival - half-close
    time to first result = first Result arrival - first chunk sent

A stream *fell behind* real time when an update latency passed the threshold (2 blocks by default) or when, at
its half-close, the audio the server had processed trailed the audio sent by more than 2 blocks. The client's
own pacing lag (a chunk written later than its schedule) is reported apart: it means the load generator, not the
server, could not keep up.

The measurement (`LatencyTracker`, `StreamRecord`, `summarize`, `percentiles`, `capacity_from_curve`) is plain
Python, separate from the gRPC driver (`run_load`) and from argparse (`add_loadtest_parser`,
`run_loadtest_command`). Importing this module loads only the standard library (the CLI's `--help` stays fast).

Bounds: at most 2000 streams, 3600 s of audio per stream, 600 s of ramp and 64 channels; each run ends by an
overall deadline (ramp + duration + a grace) whatever the server does, and a capacity search by a total budget.
The target is a literal HOST:PORT (an IP address or host name, nothing else: no scheme, no gRPC resolver URI),
127.0.0.1:50051 unless given.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import ipaddress
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "LatencyTracker",
    "LoadPlan",
    "LoadTestError",
    "LiveStats",
    "SharedAudio",
    "StreamRecord",
    "add_loadtest_parser",
    "capacity_from_curve",
    "capacity_levels",
    "final_stats_dict",
    "find_capacity",
    "format_summary",
    "load_audio_files",
    "parse_metrics_text",
    "parse_target",
    "percentiles",
    "run_load",
    "run_loadtest",
    "run_loadtest_command",
    "stage_timing_summary",
    "summarize",
    "synthetic_speech",
    "write_capacity_plot",
    "write_latency_plot",
]

PROG = "qwen3-stream"
SAMPLE_RATE = 16000
FRAME_MS = 10  # one mel frame: 160 samples at 16 kHz
BLOCK_FRAMES = (192, 96)
DEFAULT_SERVER = "127.0.0.1:50051"

# Hard caps: a load test is bounded in size and time whatever its flags say.
MAX_STREAMS = 2000
MAX_DURATION_S = 3600.0
MAX_RAMP_S = 600.0
MAX_CHANNELS = 64
MAX_CHUNK_MS = 2000
MAX_CAPACITY_LEVELS = 32
MAX_CAPACITY_TOTAL_S = 4 * 3600.0
# Streams per HTTP/2 connection when --channels is not given (many servers cap concurrent streams near 100).
STREAMS_PER_CHANNEL = 100
# Raw per-update samples go into results.json only up to this many (the plot subsamples likewise).
MAX_RAW_UPDATES = 100_000
MAX_PLOT_POINTS = 200_000

DEFAULT_NOISE_DBFS = -60.0
CLIENT_DEADLINE = "CLIENT_DEADLINE"  # the error label of a stream cut by the run's overall deadline

SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Streaming speech recognition turns every block of audio into words as it arrives.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A large language model listens to the meeting and writes the minutes.",
    "The weather tomorrow will be cloudy in the morning with some rain in the afternoon.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
    "We measured the latency of each update from the moment its audio was sent.",
    "The train to the airport leaves every fifteen minutes from platform three.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Numbers like forty two and nineteen eighty four are spoken as words.",
    "When the server falls behind, the transcript arrives later than the speech.",
    "Our capacity search doubles the number of streams until the latency target is missed.",
)


class LoadTestError(ValueError):
    """A load test these arguments cannot run (bad target, over a cap, unreadable audio): one line, exit 2."""


# ---------------------------------------------------------------------------------------------
# Targets: literal HOST:PORT only
# ---------------------------------------------------------------------------------------------

_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*$")


def _split_host_port(text: str) -> tuple[str, int]:
    if not isinstance(text, str) or not text or text != text.strip() or any(c in text for c in "/\\@?#, \t"):
        raise LoadTestError(f"server {text!r} is not a literal HOST:PORT (e.g. 127.0.0.1:50051)")
    if text.startswith("["):  # [IPv6]:PORT
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise LoadTestError(f"server {text!r} is not a literal [IPv6]:PORT")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise LoadTestError(f"server {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise LoadTestError(f"server {text!r} is not a literal HOST:PORT (e.g. 127.0.0.1:50051)")
        if ":" in host:
            raise LoadTestError(f"server {text!r}: write an IPv6 address in brackets, [::1]:50051")
        if not _HOSTNAME.match(host) or len(host) > 253:
            raise LoadTestError(f"server {text!r}: {host!r} is not an IP address or host name")
        if host.lower() in ("dns", "unix", "ipv4", "ipv6", "unix-abstract", "vsock", "http", "https", "xds", "google-c2p"):
            raise LoadTestError(f"server {text!r} looks like a URI; give a literal HOST:PORT")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise LoadTestError(f"server {text!r}: port {port_text!r} is not a number in 1..65535")
    return host, int(port_text)


def parse_target(text: str) -> str:
    """A literal HOST:PORT (IPv4, [IPv6], or a host name) normalized for gRPC; LoadTestError otherwise.

    No scheme, no resolver URI (``dns:///``, ``unix:``), no path, no list: the load goes exactly where the
    user said, which is loopback unless they named another host.
    """
    host, port = _split_host_port(text)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def target_host(target: str) -> str:
    host, _ = _split_host_port(target)
    return host


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_metrics_url(url: str, server: str) -> str:
    """An http(s) URL of a Prometheus endpoint on the server's host or on loopback; LoadTestError otherwise."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise LoadTestError(f"metrics URL {url!r} is not an http(s)://HOST:PORT/PATH URL")
    host = parsed.hostname
    if not (is_loopback(host) or host.lower() == target_host(server).lower()):
        raise LoadTestError(f"metrics URL {url!r} is neither on loopback nor on the server's host")
    return url


# ---------------------------------------------------------------------------------------------
# Measurement: per-stream bookkeeping (no gRPC, no clock of its own)
# ---------------------------------------------------------------------------------------------


def percentiles(values: Iterable[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float | int | None]:
    """count, mean, min, max and the given percentiles (linear interpolation, numpy's default); None if empty."""
    data = sorted(float(v) for v in values)
    out: dict[str, float | int | None] = {"count": len(data)}
    if not data:
        out.update({"mean": None, "min": None, "max": None})
        out.update({f"p{_q_name(q)}": None for q in qs})
        return out
    out.update({"mean": sum(data) / len(data), "min": data[0], "max": data[-1]})
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} is outside 0..100")
        rank = (len(data) - 1) * q / 100.0
        low = math.floor(rank)
        high = min(low + 1, len(data) - 1)
        out[f"p{_q_name(q)}"] = data[low] + (data[high] - data[low]) * (rank - low)
    return out


def _q_name(q: float) -> str:
    return str(int(q)) if float(q).is_integer() else str(q).replace(".", "_")


class LatencyTracker:
    """One stream's send log: sample offset -> when the chunk holding that sample was handed to gRPC.

    ``chunk_sent(end_sample, sent_at)`` per chunk, in order (``end_sample`` exclusive). ``send_time_of(offset)``
    answers for an update that heard ``offset`` samples: the send time of the chunk that held sample
    ``offset - 1``, the last one it heard. Lookups move forward with the stream (a stream's updates hear
    ever more audio), so entries behind the latest lookup are dropped now and then: memory stays bounded
    by the audio in flight, not the stream's length.
    """

    #: How far past the last sent sample an offset may be and still map to the last chunk (ms rounding).
    TOLERANCE_SAMPLES = SAMPLE_RATE // 1000

    def __init__(self) -> None:
        self._ends = array("q")
        self._times = array("d")
        self._floor = 0  # entries before this index are no longer looked up
        self.first_sent_at: float | None = None
        self.sent_samples = 0
        self.chunks = 0

    def chunk_sent(self, end_sample: int, sent_at: float) -> None:
        if end_sample < self.sent_samples:
            raise ValueError(f"chunk ends at sample {end_sample}, before the previous chunk's end {self.sent_samples}")
        if self.first_sent_at is None:
            self.first_sent_at = sent_at
        self._ends.append(end_sample)
        self._times.append(sent_at)
        self.sent_samples = end_sample
        self.chunks += 1

    def send_time_of(self, sample_offset: int) -> float | None:
        """When the chunk holding sample ``sample_offset - 1`` was sent; None for offset <= 0 or unsent audio."""
        if sample_offset <= 0 or not self._ends:
            return None
        if sample_offset > self.sent_samples:
            if sample_offset - self.sent_samples > self.TOLERANCE_SAMPLES:
                return None
            sample_offset = self.sent_samples
        index = bisect.bisect_left(self._ends, sample_offset, lo=self._floor)
        if index >= len(self._ends):  # an offset behind the dropped entries: cannot happen for monotone lookups
            return None
        self._floor = index
        if self._floor > 4096:
            del self._ends[: self._floor]
            del self._times[: self._floor]
            self._floor = 0
            index = 0
        return self._times[index]


class Updates:
    """One stream's Results, compactly: arrival time, audio heard (ms), latency (s; NaN when unmatched)."""

    __slots__ = ("received_at", "audio_ms", "latency_s", "sent_at")

    def __init__(self) -> None:
        self.received_at = array("d")
        self.audio_ms = array("q")
        self.latency_s = array("d")
        self.sent_at = array("d")

    def __len__(self) -> int:
        return len(self.received_at)

    def add(self, received_at: float, audio_ms: int, sent_at: float | None) -> float | None:
        latency = None if sent_at is None else received_at - sent_at
        self.received_at.append(received_at)
        self.audio_ms.append(audio_ms)
        self.sent_at.append(math.nan if sent_at is None else sent_at)
        self.latency_s.append(math.nan if latency is None else latency)
        return latency

    def latencies(self) -> list[float]:
        return [x for x in self.latency_s if not math.isnan(x)]


@dataclass
class StreamRecord:
    """Everything the client measured for one stream (times are ``time.monotonic()`` seconds)."""

    index: int
    channel: int = 0
    scheduled_start: float = 0.0
    audio_samples: int = 0
    sample_rate: int = SAMPLE_RATE
    chunk_ms: int = 100
    tracker: LatencyTracker = field(default_factory=LatencyTracker)
    updates: Updates = field(default_factory=Updates)
    opened_at: float | None = None
    started_at: float | None = None  # Started arrived
    half_closed_at: float | None = None
    final_at: float | None = None
    closed_at: float | None = None
    got_final: bool = False
    final_stats: dict[str, int] | None = None
    error: str | None = None  # a gRPC status code name, CLIENT_DEADLINE, or CLIENT_<ExceptionType>
    error_details: str | None = None
    # The last update received before the half-close: audio heard then (for the trailing check).
    processed_ms_at_half_close: int = 0
    sent_ms_at_half_close: int = 0
    # The most delayed chunk write against the realtime schedule (chunk k due at first + k * chunk).
    pacing_lag_s: float = 0.0
    repeats: int = 0  # Results that heard no new audio (not timed)
    unmatched: int = 0  # Results whose audio was never sent (not timed; a server or clock bug)

    # -- callbacks (the gRPC driver wires these to `recognize`) --

    def on_chunk_sent(self, end_sample: int, sent_at: float) -> None:
        k = self.tracker.chunks
        self.tracker.chunk_sent(end_sample, sent_at)
        due = self.tracker.first_sent_at + k * self.chunk_ms / 1000.0
        self.pacing_lag_s = max(self.pacing_lag_s, sent_at - due)

    def on_half_close(self, sent_at: float) -> None:
        self.half_closed_at = sent_at
        self.sent_ms_at_half_close = self.tracker.sent_samples * 1000 // self.sample_rate
        self.processed_ms_at_half_close = self.updates.audio_ms[-1] if len(self.updates) else 0

    def on_result(self, audio_processed_ms: int, received_at: float) -> float | None:
        """Fold one Result in; returns its latency in seconds, or None when it is not timed.

        Only a Result that heard new audio (``audio_processed_ms`` above the previous Result's) is timed. One
        that repeats the previous amount -- the closing Result of a segment roll, which the server emits when
        the *next* block arrives, or the end-of-stream companion of the flush -- is counted (``repeats``) but
        its "latency" would measure the roll policy, not the server. A Result claiming audio never sent
        counts as ``unmatched``.
        """
        audio_ms = int(audio_processed_ms)
        if len(self.updates) and audio_ms <= self.updates.audio_ms[-1]:
            self.repeats += 1
            return self.updates.add(received_at, audio_ms, None)
        sent_at = self.tracker.send_time_of(audio_ms * self.sample_rate // 1000)
        if sent_at is None:
            self.unmatched += 1
        return self.updates.add(received_at, audio_ms, sent_at)

    # -- derived --

    @property
    def ok(self) -> bool:
        return self.error is None and self.got_final

    @property
    def time_to_first_result_s(self) -> float | None:
        if not len(self.updates) or self.tracker.first_sent_at is None:
            return None
        return self.updates.received_at[0] - self.tracker.first_sent_at

    @property
    def final_latency_s(self) -> float | None:
        if self.final_at is None or self.half_closed_at is None:
            return None
        return self.final_at - self.half_closed_at

    def trailing_ms_at_end(self) -> int | None:
        """Audio sent but not yet processed (per the latest Result) at the half-close; None before it."""
        if self.half_closed_at is None:
            return None
        return max(0, self.sent_ms_at_half_close - self.processed_ms_at_half_close)

    def behind_reasons(self, behind_ms: float, trailing_limit_ms: float) -> list[str]:
        reasons = []
        latencies = self.updates.latencies()
        worst = max(latencies, default=0.0) * 1000
        if worst > behind_ms:
            over = sum(1 for x in latencies if x * 1000 > behind_ms)
            reasons.append(f"{over} update(s) over {behind_ms:.0f} ms (worst {worst:.0f} ms)")
        trailing = self.trailing_ms_at_end()
        if trailing is not None and trailing > trailing_limit_ms:
            reasons.append(f"processed audio trailed sent audio by {trailing} ms at the half-close")
        return reasons


def block_ms(block_frames: int) -> int:
    return block_frames * FRAME_MS


def summarize(
    records: Sequence[StreamRecord],
    *,
    block_frames: int = 192,
    behind_ms: float | None = None,
    trailing_blocks: float = 2.0,
    run_started_at: float | None = None,
    run_ended_at: float | None = None,
    include_updates: bool | None = None,
) -> dict[str, Any]:
    """The run's report as a JSON-able dict (latencies in ms; times relative to the run's start).

    ``behind_ms`` (default 2 blocks) is the update latency above which a stream counts as having fallen behind
    real time; so does processed audio trailing sent audio by more than ``trailing_blocks`` blocks at the
    half-close.
    """
    block = block_ms(block_frames)
    behind = float(2 * block if behind_ms is None else behind_ms)
    trailing_limit = trailing_blocks * block
    t0 = run_started_at if run_started_at is not None else min((r.scheduled_start for r in records), default=0.0)
    ended = run_ended_at if run_ended_at is not None else t0

    errors: dict[str, int] = {}
    per_stream = []
    update_latencies: list[float] = []
    ttfr: list[float] = []
    finals: list[float] = []
    fell_behind: list[int] = []
    client_behind: list[int] = []
    total_updates = 0
    for record in records:
        if record.error is not None:
            errors[record.error] = errors.get(record.error, 0) + 1
        elif record.opened_at is not None and not record.got_final:
            errors["NO_FINAL"] = errors.get("NO_FINAL", 0) + 1
        latencies = [x * 1000 for x in record.updates.latencies()]
        update_latencies += latencies
        total_updates += len(record.updates)
        first = record.time_to_first_result_s
        final = record.final_latency_s
        if first is not None:
            ttfr.append(first * 1000)
        if final is not None:
            finals.append(final * 1000)
        reasons = record.behind_reasons(behind, trailing_limit)
        if reasons:
            fell_behind.append(record.index)
        lag = record.pacing_lag_s * 1000
        if lag > block:
            client_behind.append(record.index)
        per_stream.append(
            {
                "stream": record.index,
                "channel": record.channel,
                "start_s": _rel(record.opened_at, t0),
                "audio_s": record.audio_samples / record.sample_rate,
                "audio_sent_s": record.tracker.sent_samples / record.sample_rate,
                "updates": len(record.updates),
                "timed_updates": len(latencies),
                "repeat_updates": record.repeats,
                "unmatched_updates": record.unmatched,
                "got_final": record.got_final,
                "error": record.error,
                "error_details": record.error_details,
                "time_to_first_result_ms": None if first is None else first * 1000,
                "update_latency_ms": {k: v for k, v in percentiles(latencies).items() if k in ("p50", "p95", "max")},
                "final_latency_ms": None if final is None else final * 1000,
                "trailing_ms_at_half_close": record.trailing_ms_at_end(),
                "pacing_lag_ms": lag,
                "fell_behind": bool(reasons),
                "behind_reasons": reasons,
                "final_stats": record.final_stats,
            }
        )
    opened = sum(1 for r in records if r.opened_at is not None)
    wall = max(ended - t0, 0.0)
    if include_updates is None:
        include_updates = total_updates <= MAX_RAW_UPDATES
    summary: dict[str, Any] = {
        "streams": {
            "requested": len(records),
            "opened": opened,
            "with_final": sum(1 for r in records if r.ok),
            "with_error": sum(1 for r in records if r.error is not None),
            "fell_behind": len(fell_behind),
            "fell_behind_ids": fell_behind,
            "client_pacing_behind": len(client_behind),
            "client_pacing_behind_ids": client_behind,
        },
        "block_ms": block,
        "behind_threshold_ms": behind,
        "trailing_limit_ms": trailing_limit,
        "wall_s": wall,
        "audio_sent_s": sum(r.tracker.sent_samples for r in records) / SAMPLE_RATE,
        "updates": {
            "total": total_updates,
            "timed": len(update_latencies),
            "repeats": sum(r.repeats for r in records),
            "unmatched": sum(r.unmatched for r in records),
            "per_stream_mean": total_updates / len(records) if records else 0.0,
            "per_s": total_updates / wall if wall > 0 else None,
        },
        "time_to_first_result_ms": percentiles(ttfr),
        "update_latency_ms": percentiles(update_latencies),
        "final_latency_ms": percentiles(finals),
        "errors": dict(sorted(errors.items())),
        "server_stage_timings": stage_timing_summary(records),
        "per_stream": per_stream,
    }
    if include_updates:
        summary["update_samples"] = {
            "columns": ["stream", "sent_s", "received_s", "audio_ms", "latency_ms"],
            "rows": [
                [r.index, _rel(s, t0), _rel(rx, t0), a, None if math.isnan(lat) else lat * 1000]
                for r in records
                for s, rx, a, lat in zip(r.updates.sent_at, r.updates.received_at, r.updates.audio_ms, r.updates.latency_s)
            ],
        }
    return summary


def _rel(when: float | None, t0: float) -> float | None:
    if when is None or math.isnan(when):
        return None
    return when - t0


def capacity_levels(start: int, max_streams: int, step: int | None = None) -> list[int]:
    """The stream counts a capacity search tries: start, 2*start, 4*start, ... (or start + k*step), up to max."""
    if start < 1 or max_streams < start:
        raise LoadTestError(f"capacity search from {start} to {max_streams} streams is empty")
    levels = [start]
    while len(levels) < MAX_CAPACITY_LEVELS:
        following = levels[-1] + step if step else levels[-1] * 2
        if following > max_streams:
            if levels[-1] < max_streams:
                levels.append(max_streams)
            break
        levels.append(following)
    return levels


def level_held(summary: dict[str, Any], p95_ms: float) -> tuple[bool, str]:
    """Whether one run met the target: no errors, every stream got Final, update p95 <= p95_ms."""
    if summary["errors"]:
        return False, "errors: " + ", ".join(f"{k} x{v}" for k, v in summary["errors"].items())
    p95 = summary["update_latency_ms"]["p95"]
    if p95 is None:
        return False, "no updates measured"
    if p95 > p95_ms:
        return False, f"update p95 {p95:.0f} ms > {p95_ms:.0f} ms"
    return True, f"update p95 {p95:.0f} ms <= {p95_ms:.0f} ms"


def capacity_from_curve(curve: Sequence[dict[str, Any]]) -> int:
    """The largest stream count that held, before the first level that did not (0 when the first failed)."""
    best = 0
    for point in curve:
        if not point["held"]:
            break
        best = point["streams"]
    return best


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------


def _to_16k_mono(samples, rate: int, name: str):  # noqa: ANN001, ANN202
    import numpy as np
    from scipy.signal import resample_poly

    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.ndim != 1 or x.size == 0:
        raise LoadTestError(f"{name}: no audio")
    if not np.all(np.isfinite(x)):
        raise LoadTestError(f"{name}: holds NaN or Inf samples")
    if rate != SAMPLE_RATE:
        g = math.gcd(int(rate), SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, int(rate) // g)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def load_audio_files(paths: Sequence[str | Path]) -> list:
    """Each file as 16 kHz mono float32 (soundfile; multi-channel averaged; other rates resampled)."""
    import soundfile as sf

    pieces = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise LoadTestError(f"audio file {str(path)!r} does not exist")
        try:
            samples, rate = sf.read(str(path), dtype="float32", always_2d=False)
        except Exception as error:  # soundfile raises its own LibsndfileError / RuntimeError types
            raise LoadTestError(f"cannot read audio file {str(path)!r}: {error}") from None
        pieces.append(_to_16k_mono(samples, rate, str(path)))
    return pieces


def synthetic_speech(
    sentences: Sequence[str] = SENTENCES, *, seed: int = 0, noise_dbfs: float = DEFAULT_NOISE_DBFS, gap_s: float = 0.3
) -> list:
    """Each sentence spoken by espeak-ng, as 16 kHz float32 with a seeded noise floor at ``noise_dbfs`` RMS
    and ``gap_s`` of (noise-only) pause after it."""
    import numpy as np
    import soundfile as sf

    executable = shutil.which("espeak-ng")
    if executable is None:
        raise LoadTestError("--synthetic needs espeak-ng (apt-get install espeak-ng), or give --audio FILE")
    rng = np.random.default_rng(seed)
    pieces = []
    with tempfile.TemporaryDirectory(prefix="qwen3-loadtest-") as folder:
        for k, text in enumerate(sentences):
            wav = Path(folder) / f"s{k}.wav"
            subprocess.run([executable, "-w", str(wav), "--", text], check=True, capture_output=True, timeout=60)
            samples, rate = sf.read(str(wav), dtype="float32", always_2d=False)
            speech = _to_16k_mono(samples, rate, f"espeak-ng sentence {k}")
            speech = np.concatenate([speech, np.zeros(round(gap_s * SAMPLE_RATE), np.float32)])
            noise = rng.standard_normal(len(speech)) * 10 ** (noise_dbfs / 20)
            pieces.append(np.clip(speech + noise, -1.0, 1.0).astype(np.float32))
    return pieces


def looped(pieces: Sequence, n_samples: int):  # noqa: ANN201
    """The pieces concatenated, repeated as needed, cut to ``n_samples``."""
    import numpy as np

    material = np.concatenate(list(pieces))
    if material.size == 0:
        raise LoadTestError("the audio holds no samples")
    reps = -(-n_samples // material.size)
    return np.tile(material, reps)[:n_samples]


@dataclass(frozen=True)
class SharedAudio:
    """One PCM16 buffer every stream reads a window of (no per-stream copy): stream i starts at the beginning
    of piece i mod len(pieces), so neighbouring streams say different things at the same moment."""

    pcm: bytes
    stream_samples: int
    piece_starts: tuple[int, ...]

    @classmethod
    def build(cls, pieces: Sequence, duration_s: float) -> SharedAudio:
        import numpy as np

        from deployments.client import encode_pcm

        n = max(1, round(duration_s * SAMPLE_RATE))
        lengths = [len(p) for p in pieces]
        starts = tuple(int(s) for s in np.cumsum([0, *lengths[:-1]]))
        total = n + (starts[-1] if starts else 0)
        return cls(encode_pcm(looped(pieces, total), "pcm_s16le"), n, starts)

    def for_stream(self, index: int) -> memoryview:
        start = self.piece_starts[index % len(self.piece_starts)]
        return memoryview(self.pcm)[2 * start : 2 * (start + self.stream_samples)]


# ---------------------------------------------------------------------------------------------
# The gRPC driver
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    """One load run: how many streams, how paced, how bounded."""

    streams: int
    duration_s: float = 30.0
    ramp_s: float = 5.0
    channels: int | None = None  # None: one per STREAMS_PER_CHANNEL streams
    block_frames: int = 192
    chunk_ms: int = 100
    language: str = "English"
    behind_ms: float | None = None  # None: 2 blocks
    grace_s: float | None = None  # after ramp + duration, before the deadline cuts streams (None: max(30, duration))
    connect_timeout_s: float = 10.0
    tls_ca: Path | None = None  # connect with TLS, trusting servers this CA (a PEM file) signed; None: plaintext

    def __post_init__(self) -> None:
        if not 1 <= self.streams <= MAX_STREAMS:
            raise LoadTestError(f"streams is {self.streams}; expected 1..{MAX_STREAMS}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise LoadTestError(f"duration is {self.duration_s} s; expected more than 0 and at most {MAX_DURATION_S:.0f}")
        if not 0 <= self.ramp_s <= MAX_RAMP_S:
            raise LoadTestError(f"ramp is {self.ramp_s} s; expected 0..{MAX_RAMP_S:.0f}")
        if self.channels is not None and not 1 <= self.channels <= MAX_CHANNELS:
            raise LoadTestError(f"channels is {self.channels}; expected 1..{MAX_CHANNELS}")
        if self.block_frames not in BLOCK_FRAMES:
            raise LoadTestError(f"block frames is {self.block_frames}; expected one of {BLOCK_FRAMES}")
        if not 1 <= self.chunk_ms <= MAX_CHUNK_MS or SAMPLE_RATE * self.chunk_ms // 1000 == 0:
            raise LoadTestError(f"chunk is {self.chunk_ms} ms; expected 1..{MAX_CHUNK_MS}")

    @property
    def channel_count(self) -> int:
        if self.channels is not None:
            return min(self.channels, self.streams)
        return min(MAX_CHANNELS, max(1, -(-self.streams // STREAMS_PER_CHANNEL)))

    @property
    def deadline_s(self) -> float:
        grace = self.grace_s if self.grace_s is not None else max(30.0, self.duration_s)
        return self.ramp_s + self.duration_s + grace

    def start_offset(self, index: int) -> float:
        """Stream ``index`` starts ``index * ramp / streams`` seconds into the run (evenly over the ramp)."""
        return index * self.ramp_s / self.streams


class LiveStats:
    """Counters the progress line reads: streams up, updates per second, p95 over the last window."""

    def __init__(self, streams: int, window_s: float = 10.0) -> None:
        self.streams = streams
        self.window_s = window_s
        self.up = 0
        self.done = 0
        self.errors = 0
        self.updates = 0
        self.recent: deque[tuple[float, float]] = deque()  # (received_at, latency_s)

    def add_update(self, received_at: float, latency_s: float | None) -> None:
        self.updates += 1
        if latency_s is not None:
            self.recent.append((received_at, latency_s))

    def window_p95_ms(self, now: float) -> float | None:
        while self.recent and self.recent[0][0] < now - self.window_s:
            self.recent.popleft()
        return percentiles([x * 1000 for _, x in self.recent], (95,))["p95"]


class ProgressLine:
    """About once a second on stderr: elapsed, streams up/done, updates/s, windowed p95, errors."""

    def __init__(self, stats: LiveStats, stream=None, label: str = "loadtest") -> None:  # noqa: ANN001
        self.stats = stats
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_updates = 0
        self._last_time: float | None = None
        self._last_print = -math.inf

    def line(self, now: float, started: float) -> str:
        s = self.stats
        rate = 0.0
        if self._last_time is not None and now > self._last_time:
            rate = (s.updates - self._last_updates) / (now - self._last_time)
        self._last_updates, self._last_time = s.updates, now
        p95 = s.window_p95_ms(now)
        p95_text = "-" if p95 is None else f"{p95:.0f} ms"
        return (
            f"{self.label} {now - started:6.1f}s  streams {s.up} up / {s.done} done of {s.streams}  "
            f"updates {rate:6.1f}/s  p95(10s) {p95_text}  errors {s.errors}"
        )

    def show(self, now: float, started: float) -> None:
        text = self.line(now, started)
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        elif now - self._last_print >= 10.0:  # not a terminal (a log file): every 10 s
            self.stream.write(text + "\n")
            self._last_print = now
        self.stream.flush()

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _channel(target: str, tls_ca: Path | None):  # noqa: ANN202
    import grpc

    from deployments.client import DEFAULT_MAX_MESSAGE_BYTES, tls_credentials

    options = [
        ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        # Its own connection: channels with equal arguments would otherwise share one subchannel.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if tls_ca is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls_credentials(tls_ca), options=options)


async def _one_stream(record: StreamRecord, channel, audio: memoryview, plan: LoadPlan, live: LiveStats) -> None:  # noqa: ANN001
    import grpc

    from deployments.client import StreamOptions, recognize

    options = StreamOptions(
        language=plan.language, block_frames=plan.block_frames, chunk_ms=plan.chunk_ms, realtime=True
    )
    delay = record.scheduled_start - time.monotonic()
    if delay > 0:
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            record.error = CLIENT_DEADLINE
            record.error_details = "the run's overall deadline came before this stream started"
            live.errors += 1
            return
    record.opened_at = time.monotonic()
    live.up += 1

    def on_result(result) -> None:  # noqa: ANN001
        now = time.monotonic()
        live.add_update(now, record.on_result(result.audio_processed_ms, now))

    def on_started(_started) -> None:  # noqa: ANN001 (an asr_pb2.Started)
        record.started_at = time.monotonic()

    try:
        outcome = await recognize(
            channel,
            audio,
            options,
            on_result=on_result,
            on_started=on_started,
            on_chunk_sent=record.on_chunk_sent,
            on_half_close=record.on_half_close,
        )
        record.got_final = outcome.final is not None
        record.final_at = outcome.final_received_at
        if outcome.final is not None:
            record.final_stats = final_stats_dict(outcome.final.stats)
    except grpc.aio.AioRpcError as error:
        record.error = error.code().name
        record.error_details = error.details()
    except asyncio.CancelledError:
        record.error = CLIENT_DEADLINE
        record.error_details = "cut by the run's overall deadline"
    except Exception as error:  # noqa: BLE001 (any client-side failure is one stream's error, not the run's)
        record.error = f"CLIENT_{type(error).__name__}"
        record.error_details = str(error)
    finally:
        record.closed_at = time.monotonic()
        live.up -= 1
        live.done += 1
        if record.error is not None:
            live.errors += 1


def final_stats_dict(stats) -> dict[str, Any]:  # noqa: ANN001 (an asr_pb2.FinalStats)
    """FinalStats as JSON: the counters, and the server's own per-stage call timings when it sends them."""
    out: dict[str, Any] = {}
    for name in ("audio_ms", "segments", "updates", "words", "replays", "revised_words"):
        if hasattr(stats, name):
            out[name] = int(getattr(stats, name))
    timings = getattr(stats, "stage_timings", None)
    if timings:
        out["stage_timings"] = [
            {"stage": t.stage, "calls": t.calls, "total_ms": t.total_ms, "p50_ms": t.p50_ms, "p95_ms": t.p95_ms}
            for t in timings
        ]
    return out


def stage_timing_summary(records: Sequence[StreamRecord]) -> dict[str, dict[str, float]]:
    """The server's per-stage call timings (FinalStats) over all streams: calls, mean ms per call, worst
    per-stream p95 -- where the server's side of the latency went."""
    totals: dict[str, dict[str, float]] = {}
    for record in records:
        for timing in (record.final_stats or {}).get("stage_timings", []):
            entry = totals.setdefault(timing["stage"], {"calls": 0, "total_ms": 0.0, "max_stream_p95_ms": 0.0})
            entry["calls"] += timing["calls"]
            entry["total_ms"] += timing["total_ms"]
            entry["max_stream_p95_ms"] = max(entry["max_stream_p95_ms"], timing["p95_ms"])
    return {
        stage: {"calls": e["calls"], "mean_ms": e["total_ms"] / e["calls"] if e["calls"] else None,
                "max_stream_p95_ms": e["max_stream_p95_ms"]}
        for stage, e in totals.items()
    }


async def run_load(
    target: str,
    plan: LoadPlan,
    audio: SharedAudio,
    *,
    progress: ProgressLine | None = None,
    live: LiveStats | None = None,
) -> tuple[list[StreamRecord], float, float]:
    """Run one load: ``plan.streams`` realtime streams against ``target``; returns the records and the run's
    start and end (``time.monotonic()``). Raises LoadTestError when the server cannot be reached at all."""
    target = parse_target(target)
    live = live or LiveStats(plan.streams)
    channels = [_channel(target, plan.tls_ca) for _ in range(plan.channel_count)]
    try:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(c.channel_ready() for c in channels)), timeout=plan.connect_timeout_s
            )
        except asyncio.TimeoutError:
            raise LoadTestError(f"no gRPC server answered at {target} within {plan.connect_timeout_s:.0f} s") from None
        started = time.monotonic()
        records = [
            StreamRecord(
                index=i,
                channel=i % len(channels),
                scheduled_start=started + plan.start_offset(i),
                audio_samples=audio.stream_samples,
                chunk_ms=plan.chunk_ms,
            )
            for i in range(plan.streams)
        ]
        tasks = [
            asyncio.create_task(_one_stream(r, channels[r.channel], audio.for_stream(r.index), plan, live))
            for r in records
        ]
        deadline = started + plan.deadline_s
        pending = set(tasks)
        while pending:
            now = time.monotonic()
            if now >= deadline:
                break
            _, pending = await asyncio.wait(pending, timeout=min(1.0, deadline - now))
            if progress is not None:
                progress.show(time.monotonic(), started)
        for task in pending:  # the overall deadline: whatever is still open is cut
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        ended = time.monotonic()
        if progress is not None:
            progress.show(ended, started)
            progress.end()
        return records, started, ended
    finally:
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# Server metrics (optional): batch sizes from Ray's Prometheus endpoint
# ---------------------------------------------------------------------------------------------

_SAMPLE_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LE = re.compile(r'le="([^"]+)"')
METRICS_EXPORT_INTERVAL_S = 10.0  # Ray's default metrics report interval
BATCH_METRICS = {"encoder": "qwen3_stream_encoder_batch_size", "decoder": "qwen3_stream_decoder_batch_size"}


def parse_metrics_text(text: str) -> dict[str, dict[str, Any]]:
    """Batch-size histograms from Prometheus text, summed over replicas: {stage: {count, sum, buckets{le: n}}}."""
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_LINE.match(line)
        if not match:
            continue
        name, labels, value_text = match.groups()
        for stage, metric in BATCH_METRICS.items():
            if metric not in name:
                continue
            try:
                value = float(value_text)
            except ValueError:
                continue
            entry = out.setdefault(stage, {"count": 0.0, "sum": 0.0, "buckets": {}})
            if name.endswith("_count"):
                entry["count"] += value
            elif name.endswith("_sum"):
                entry["sum"] += value
            elif name.endswith("_bucket"):
                le = _LE.search(labels or "")
                if le:
                    entry["buckets"][le.group(1)] = entry["buckets"].get(le.group(1), 0.0) + value
    return out


def batch_size_delta(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The batches of this run (after - before), per stage: count, sizes by bucket, mean size bounds.

    Batch sizes are whole numbers, so the bucket (lo, hi] holds sizes lo+1..hi: exact for the buckets 1 and 2,
    a range above. The mean is given as [low, high] from those ranges; the exported ``_sum`` is not used (Ray's
    export estimates it from bucket midpoints).
    """
    report: dict[str, Any] = {}
    for stage, now in after.items():
        then = before.get(stage, {"count": 0.0, "sum": 0.0, "buckets": {}})
        cumulative = sorted(
            ((float(le), now["buckets"][le] - then["buckets"].get(le, 0.0)) for le in now["buckets"]),
            key=lambda item: item[0],
        )
        count = now["count"] - then["count"]
        by_size: dict[str, float] = {}
        low_total = high_total = 0.0
        previous_edge, previous_count = 0.0, 0.0
        for edge, running in cumulative:
            n = running - previous_count
            if n > 0:
                lo = math.floor(previous_edge) + 1
                if math.isinf(edge):
                    label, hi = f">{int(previous_edge)}", math.nan
                else:
                    label, hi = (str(lo) if lo >= edge else f"{lo}-{int(edge)}"), edge
                by_size[label] = n
                low_total += n * lo
                high_total += n * hi
            previous_edge, previous_count = edge, running
        known = count > 0 and not math.isnan(high_total)
        report[stage] = {
            "batches": count,
            "by_size": by_size,
            "mean_batch_size_range": [low_total / count, high_total / count] if known else None,
        }
    return report


def scrape_metrics(url: str | None, timeout_s: float = 3.0) -> dict[str, dict[str, Any]] | None:
    """The batch-size histograms at ``url``; None when it is not reachable or has none."""
    if url is None:
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (checked http(s) URL)
            text = response.read(64 * 1024 * 1024).decode("utf-8", "replace")
    except (OSError, ValueError) as error:
        log.info("metrics at %s not reachable: %s", url, error)
        return None
    return parse_metrics_text(text)


def _server_metrics_report(url: str | None, before, after, waited_s: float) -> Any:  # noqa: ANN001
    if url is None:
        return "not requested"
    if after is None:
        return f"not reachable ({url})"
    if not after:
        return f"reachable, but no qwen3_stream batch-size metrics yet ({url})"
    report = {"url": url, "batch_sizes": batch_size_delta(before or {}, after), "waited_s": waited_s}
    if waited_s < METRICS_EXPORT_INTERVAL_S:
        report["note"] = (f"scraped {waited_s:.0f} s after the run; Ray exports every ~{METRICS_EXPORT_INTERVAL_S:.0f} s, "
                          "so the batches of the run's last seconds may be missing")
    return report


# ---------------------------------------------------------------------------------------------
# Runs, plots, reports
# ---------------------------------------------------------------------------------------------


async def _measured_run(
    target: str, plan: LoadPlan, audio: SharedAudio, metrics_url: str | None, show_progress: bool, label: str,
    metrics_wait_s: float = 0.0,
) -> tuple[dict[str, Any], list[StreamRecord], float]:
    before = await asyncio.to_thread(scrape_metrics, metrics_url)
    live = LiveStats(plan.streams)
    progress = ProgressLine(live, label=label) if show_progress else None
    records, started, ended = await run_load(target, plan, audio, progress=progress, live=live)
    after = await asyncio.to_thread(scrape_metrics, metrics_url)
    waited = 0.0
    if after is not None and metrics_wait_s > 0:  # reachable: let Ray export the run's last batches
        await asyncio.sleep(metrics_wait_s)
        waited = metrics_wait_s
        after = await asyncio.to_thread(scrape_metrics, metrics_url) or after
    summary = summarize(records, block_frames=plan.block_frames, behind_ms=plan.behind_ms,
                        run_started_at=started, run_ended_at=ended)
    summary["server_metrics"] = _server_metrics_report(metrics_url, before, after, waited)
    summary["plan"] = {**asdict(plan), "channels": plan.channel_count, "deadline_s": plan.deadline_s}
    return summary, records, started


def write_latency_plot(records: Sequence[StreamRecord], started: float, path: Path, *, behind_ms: float | None = None,
                       title: str = "") -> Path:
    """Scatter of update latency against the send time of the audio it heard (plus final latencies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs: list[float] = []
    ys: list[float] = []
    for record in records:
        for sent, latency in zip(record.updates.sent_at, record.updates.latency_s):
            if not math.isnan(latency):
                xs.append(sent - started)
                ys.append(latency * 1000)
    stride = max(1, -(-len(xs) // MAX_PLOT_POINTS))
    finals = [(r.half_closed_at - started, r.final_latency_s * 1000) for r in records if r.final_latency_s is not None]
    figure, axis = plt.subplots(figsize=(10, 5))
    axis.scatter(xs[::stride], ys[::stride], s=6, alpha=0.5, label=f"update latency ({len(xs)} updates)")
    if finals:
        axis.scatter(*zip(*finals), s=18, marker="x", color="tab:red", label="final latency (half-close -> Final)")
    if behind_ms is not None:
        axis.axhline(behind_ms, color="tab:orange", linestyle="--", linewidth=1, label=f"fell-behind threshold {behind_ms:.0f} ms")
    axis.set_xlabel("send time of the audio heard (s since run start)")
    axis.set_ylabel("latency (ms)")
    axis.set_ylim(bottom=0)
    axis.grid(True, alpha=0.3)
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title(title or f"update latency, {len(records)} streams")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_capacity_plot(curve: Sequence[dict[str, Any]], path: Path, *, p95_ms: float) -> Path:
    """Update latency p50/p95/p99 against streams, with the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = [p["streams"] for p in curve]
    figure, axis = plt.subplots(figsize=(8, 5))
    for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^--")):
        axis.plot(streams, [p[key] if p[key] is not None else math.nan for p in curve], style, label=f"update {key}")
    axis.axhline(p95_ms, color="tab:red", linestyle=":", label=f"p95 target {p95_ms:.0f} ms")
    for p in curve:
        if not p["held"]:
            axis.axvline(p["streams"], color="tab:gray", alpha=0.3)
    if streams and streams[-1] >= 8 * streams[0]:  # doubling levels: even spacing
        axis.set_xscale("log", base=2)
    axis.set_xticks(streams)
    axis.set_xticklabels([str(n) for n in streams])
    axis.minorticks_off()
    axis.set_xlabel("concurrent streams")
    axis.set_ylabel("update latency (ms)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(f"capacity: {capacity_from_curve(curve)} streams held p95 <= {p95_ms:.0f} ms")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable report of one run."""
    s = summary["streams"]
    u = summary["update_latency_ms"]
    f = summary["final_latency_ms"]
    t = summary["time_to_first_result_ms"]
    rate = summary["updates"]["per_s"]
    lines = [
        f"streams: {s['requested']} requested, {s['opened']} opened, {s['with_final']} with Final, "
        f"{s['with_error']} with errors, {s['fell_behind']} fell behind real time",
        f"updates: {summary['updates']['total']} ({summary['updates']['per_stream_mean']:.1f} per stream, "
        f"{0 if rate is None else rate:.1f}/s; {summary['updates']['timed']} timed, {summary['updates']['repeats']} "
        f"repeating earlier audio) over {summary['wall_s']:.1f} s, {summary['audio_sent_s']:.1f} s of audio sent",
        f"time to first result: p50 {_ms(t['p50'])}  p95 {_ms(t['p95'])}  max {_ms(t['max'])}",
        f"update latency:       p50 {_ms(u['p50'])}  p95 {_ms(u['p95'])}  p99 {_ms(u['p99'])}  max {_ms(u['max'])}",
        f"final latency:        p50 {_ms(f['p50'])}  p95 {_ms(f['p95'])}  p99 {_ms(f['p99'])}  max {_ms(f['max'])}",
        f"fell behind (update > {summary['behind_threshold_ms']:.0f} ms or trailing > "
        f"{summary['trailing_limit_ms']:.0f} ms at half-close): {s['fell_behind']}"
        + (f" {s['fell_behind_ids'][:20]}" if s["fell_behind"] else ""),
        "errors: " + (", ".join(f"{k} x{v}" for k, v in summary["errors"].items()) or "none"),
    ]
    if s["client_pacing_behind"]:
        lines.append(f"warning: the client wrote audio late (> 1 block behind schedule) on {s['client_pacing_behind']} "
                     "stream(s): the load generator, not the server, was the bottleneck there")
    stages = summary.get("server_stage_timings") or {}
    if stages:
        lines.append("server stage calls (ingress-timed, from Final): " + "; ".join(
            f"{stage} {e['calls']:.0f} calls, mean {_ms(e['mean_ms'])}, worst stream p95 {_ms(e['max_stream_p95_ms'])}"
            for stage, e in stages.items()
        ))
    metrics = summary.get("server_metrics")
    if isinstance(metrics, dict):
        parts = []
        for stage, entry in metrics["batch_sizes"].items():
            mean = entry["mean_batch_size_range"]
            mean_text = "-" if mean is None else (f"{mean[0]:.2f}" if mean[0] == mean[1] else f"{mean[0]:.2f}..{mean[1]:.2f}")
            sizes = ", ".join(f"{size}: {n:.0f}" for size, n in entry["by_size"].items())
            parts.append(f"{stage} {entry['batches']:.0f} batches, mean {mean_text} ({sizes})")
        lines.append("server batch sizes: " + "; ".join(parts) + f" [{metrics['url']}]")
    else:
        lines.append(f"server batch sizes: {metrics}")
    return "\n".join(lines)


def _write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, allow_nan=False, default=str) + "\n")
    return path


def _prepare_audio(audio_files: Sequence[str] | None, duration_s: float, seed: int) -> tuple[SharedAudio, dict[str, Any]]:
    if audio_files:
        pieces = load_audio_files(audio_files)
        source = {"kind": "files", "files": [str(p) for p in audio_files]}
    else:
        pieces = synthetic_speech(seed=seed)
        source = {"kind": "synthetic", "engine": "espeak-ng", "sentences": len(pieces), "noise_dbfs": DEFAULT_NOISE_DBFS}
    source["material_s"] = sum(len(p) for p in pieces) / SAMPLE_RATE
    return SharedAudio.build(pieces, duration_s), source


def run_loadtest(
    server: str,
    plan: LoadPlan,
    *,
    audio_files: Sequence[str] | None = None,
    out: Path | None = None,
    metrics_url: str | None = None,
    progress: bool = True,
    seed: int = 0,
    metrics_wait_s: float = METRICS_EXPORT_INTERVAL_S + 2,
) -> dict[str, Any]:
    """One load run end to end (audio, streams, summary, files under ``out``); returns the summary."""
    target = parse_target(server)
    if metrics_url is not None:
        metrics_url = parse_metrics_url(metrics_url, target)
    audio, source = _prepare_audio(audio_files, plan.duration_s, seed)
    summary, records, started = asyncio.run(
        _measured_run(target, plan, audio, metrics_url, progress, "loadtest", metrics_wait_s)
    )
    summary = {"mode": "single", "server": target, "audio": source, **summary}
    if out is not None:
        out = Path(out)
        plot = write_latency_plot(records, started, out / "latency_over_time.png",
                                  behind_ms=summary["behind_threshold_ms"], title=f"update latency, {plan.streams} streams")
        summary["files"] = {"results": str(out / "results.json"), "latency_plot": str(plot)}
        _write_json(out / "results.json", summary)
    return summary


def find_capacity(
    server: str,
    plan: LoadPlan,
    *,
    p95_ms: float,
    max_streams: int,
    step: int | None = None,
    audio_files: Sequence[str] | None = None,
    out: Path | None = None,
    metrics_url: str | None = None,
    progress: bool = True,
    seed: int = 0,
    pause_s: float = 2.0,
    say: Callable[[str], None] | None = None,
    metrics_wait_s: float = METRICS_EXPORT_INTERVAL_S + 2,
) -> dict[str, Any]:
    """Raise the stream count level by level (``capacity_levels``) until the update p95 passes ``p95_ms`` or
    errors appear; returns the curve and the largest count that held."""
    target = parse_target(server)
    if metrics_url is not None:
        metrics_url = parse_metrics_url(metrics_url, target)
    if not 0 < p95_ms:
        raise LoadTestError(f"p95 target is {p95_ms} ms; expected more than 0")
    if not 1 <= max_streams <= MAX_STREAMS:
        raise LoadTestError(f"max streams is {max_streams}; expected 1..{MAX_STREAMS}")
    levels = capacity_levels(plan.streams, max_streams, step)
    audio, source = _prepare_audio(audio_files, plan.duration_s, seed)
    budget_end = time.monotonic() + MAX_CAPACITY_TOTAL_S
    curve: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    stopped = "reached the largest level"
    for n in levels:
        level_plan = LoadPlan(**{**asdict(plan), "streams": n})
        if time.monotonic() + level_plan.deadline_s > budget_end:
            stopped = f"the capacity search's time budget ({MAX_CAPACITY_TOTAL_S:.0f} s) would be exceeded"
            break
        summary, records, started = asyncio.run(
            _measured_run(target, level_plan, audio, metrics_url, progress, f"loadtest N={n}", metrics_wait_s)
        )
        held, why = level_held(summary, p95_ms)
        u = summary["update_latency_ms"]
        point = {"streams": n, "p50": u["p50"], "p95": u["p95"], "p99": u["p99"], "held": held, "why": why,
                 "errors": sum(summary["errors"].values()), "fell_behind": summary["streams"]["fell_behind"]}
        curve.append(point)
        summary.pop("update_samples", None)
        summaries.append(summary)
        if say is not None:
            say(f"N={n}: p50 {_ms(u['p50'])}, p95 {_ms(u['p95'])}: {'held' if held else 'missed'} ({why})")
        if out is not None:
            write_latency_plot(records, started, Path(out) / f"latency_over_time_n{n}.png",
                               behind_ms=summary["behind_threshold_ms"], title=f"update latency, {n} streams")
        if not held:
            stopped = f"N={n} missed the target: {why}"
            break
        if n != levels[-1] and not (isinstance(summary["server_metrics"], dict) and metrics_wait_s >= pause_s):
            time.sleep(pause_s)  # let the server drain before the next level
    result = {
        "mode": "find-capacity",
        "server": target,
        "audio": source,
        "p95_target_ms": p95_ms,
        "levels_planned": levels,
        "capacity_streams": capacity_from_curve(curve),
        "stopped": stopped,
        "curve": curve,
        "levels": summaries,
    }
    if out is not None:
        out = Path(out)
        plot = write_capacity_plot(curve, out / "capacity.png", p95_ms=p95_ms) if curve else None
        result["files"] = {"results": str(out / "results.json"), "capacity_plot": None if plot is None else str(plot)}
        _write_json(out / "results.json", result)
    return result


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number in {low}..{high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number in {low}..{high}, got {text!r}")
        return value

    return parse


def _bounded_seconds(low: float, high: float, *, open_low: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value > high or value < low or (open_low and value == low):
            bound = f"{'more than' if open_low else 'at least'} {low:g} and at most {high:g}"
            raise argparse.ArgumentTypeError(f"expected seconds, {bound}, got {text!r}")
        return value

    return parse


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected milliseconds > 0, got {text!r}")
    return value


def _target(text: str) -> str:
    try:
        return parse_target(text)
    except LoadTestError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_loadtest_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `loadtest` and its flags to ``subparsers``; it dispatches to `run_loadtest_command` (``run``)."""
    parser = subparsers.add_parser(
        "loadtest",
        help="many realtime gRPC streams against a running server: latency percentiles, capacity",
        description=(
            "Open N concurrent realtime Recognize streams against a running qwen3-stream server and measure, on "
            "the client, time to first result, update latency (Result arrival - send time of the last audio the "
            "update heard) and final latency (half-close -> Final); with --find-capacity, raise N until the "
            "update p95 passes a target."
        ),
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks, also for user errors")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")
    parser.add_argument("--server", type=_target, default=DEFAULT_SERVER, metavar="HOST:PORT",
                        help=f"the server's gRPC address, a literal HOST:PORT (default {DEFAULT_SERVER})")
    parser.add_argument("--streams", type=_bounded_int(1, MAX_STREAMS), default=1, metavar="N",
                        help=f"concurrent streams (1..{MAX_STREAMS}; the first level with --find-capacity; default 1)")
    parser.add_argument("--ramp", type=_bounded_seconds(0, MAX_RAMP_S), default=5.0, metavar="S",
                        help="start the streams evenly over S seconds (default 5)")
    parser.add_argument("--duration", type=_bounded_seconds(0, MAX_DURATION_S, open_low=True), default=30.0, metavar="S",
                        help=f"audio per stream in seconds, looped (at most {MAX_DURATION_S:.0f}; default 30)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--audio", nargs="+", metavar="FILE",
                        help="speech files (any rate/channels soundfile reads; 16 kHz mono after conversion), concatenated and looped")
    source.add_argument("--synthetic", action="store_true",
                        help="espeak-ng sentences with a -60 dBFS noise floor (the default without --audio)")
    parser.add_argument("--channels", type=_bounded_int(1, MAX_CHANNELS), default=None, metavar="C",
                        help=f"gRPC channels (connections) the streams spread over (default: one per {STREAMS_PER_CHANNEL} streams)")
    parser.add_argument("--block-frames", type=int, choices=BLOCK_FRAMES, default=192,
                        help="causal block size in mel frames")
    parser.add_argument("--chunk-ms", type=_bounded_int(1, MAX_CHUNK_MS), default=100, metavar="MS",
                        help="audio per AudioChunk message, sent every MS ms (default 100)")
    parser.add_argument("--behind-ms", type=_positive_ms, default=None, metavar="MS",
                        help="an update latency above this means the stream fell behind real time (default 2 blocks)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write DIR/results.json and PNG plots (latency over time; capacity curve)")
    parser.add_argument("--metrics-url", default=None, metavar="URL",
                        help="Ray's Prometheus endpoint for the server's batch sizes, on the server's host or loopback "
                             "(default http://SERVER_HOST:8080/metrics, KubeRay's; 'none' to skip)")
    parser.add_argument("--metrics-wait", type=_bounded_seconds(0, 120), default=METRICS_EXPORT_INTERVAL_S + 2,
                        metavar="S", help="when the metrics are reachable, wait S seconds after a run for Ray to "
                        f"export its last batches (default {METRICS_EXPORT_INTERVAL_S + 2:.0f})")
    parser.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                        help="connect with TLS, trusting servers this CA signed (default: plaintext)")
    parser.add_argument("--seed", type=_bounded_int(0, 2**31 - 1), default=0, help="noise seed of --synthetic (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line on stderr")
    capacity = parser.add_argument_group("capacity search")
    capacity.add_argument("--find-capacity", action="store_true",
                          help="raise the streams level by level until the update p95 passes --p95-ms or errors appear")
    capacity.add_argument("--p95-ms", type=_positive_ms, default=None, metavar="X", help="the update-latency p95 target (ms)")
    capacity.add_argument("--max-streams", type=_bounded_int(1, MAX_STREAMS), default=256, metavar="M",
                          help="the last level tried (default 256)")
    capacity.add_argument("--step", type=_bounded_int(1, MAX_STREAMS), default=None, metavar="K",
                          help="add K streams per level (default: double)")
    parser.set_defaults(run=run_loadtest_command)
    return parser


def _metrics_url_from_args(args: argparse.Namespace) -> str | None:
    if args.metrics_url is None:
        return f"http://{args.server.rsplit(':', 1)[0]}:8080/metrics"
    if args.metrics_url.lower() == "none":
        return None
    return args.metrics_url


def run_loadtest_command(args: argparse.Namespace) -> int:
    """`qwen3-stream loadtest`: 0 when every stream got its Final without error (capacity search: when some
    level held), 1 otherwise, 2 for arguments it cannot run."""
    try:
        if args.find_capacity and args.p95_ms is None:
            raise LoadTestError("--find-capacity needs --p95-ms X")
        if not args.find_capacity and args.p95_ms is not None:
            raise LoadTestError("--p95-ms only applies with --find-capacity")
        if args.find_capacity and args.max_streams < args.streams:
            raise LoadTestError(f"--max-streams {args.max_streams} is below --streams {args.streams}")
        plan = LoadPlan(
            streams=args.streams,
            duration_s=args.duration,
            ramp_s=args.ramp,
            channels=args.channels,
            block_frames=args.block_frames,
            chunk_ms=args.chunk_ms,
            behind_ms=args.behind_ms,
            tls_ca=args.tls_ca,
        )
        common = dict(audio_files=args.audio, out=args.out, metrics_url=_metrics_url_from_args(args),
                      progress=not args.no_progress, seed=args.seed, metrics_wait_s=args.metrics_wait)
        if args.find_capacity:
            result = find_capacity(args.server, plan, p95_ms=args.p95_ms, max_streams=args.max_streams, step=args.step,
                                   say=lambda line: print(f"{PROG}: loadtest: {line}", file=sys.stderr), **common)
            for point in result["curve"]:
                print(f"streams {point['streams']:5d}  p50 {_ms(point['p50']):>8}  p95 {_ms(point['p95']):>8}  "
                      f"p99 {_ms(point['p99']):>8}  {'held' if point['held'] else 'MISSED'}  ({point['why']})")
            print(f"capacity: {result['capacity_streams']} streams held update p95 <= {args.p95_ms:.0f} ms "
                  f"({result['stopped']})")
            if args.out is not None:
                print(f"wrote {result['files']['results']}")
            return 0 if result["capacity_streams"] > 0 else 1
        summary = run_loadtest(args.server, plan, **common)
        print(format_summary(summary))
        if args.out is not None:
            print(f"wrote {summary['files']['results']} and {summary['files']['latency_plot']}")
        s = summary["streams"]
        return 0 if s["with_final"] == s["requested"] and not summary["errors"] else 1
    except LoadTestError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
