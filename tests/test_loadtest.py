"""`qwen3-stream loadtest`: the latency bookkeeping without a server, and one short run against a real one.

The unit tests pin the offset -> send-time lookup, percentiles, the fell-behind rules, the summary's shape, target
validation, the capacity search's levels and the metrics parsing. The integration test starts Ray Serve on the
tiny checkpoint (like tests/test_served.py, once for this module, stopped at its end so the next module can start
its own) and runs 3 realtime streams of ~4 s synthetic espeak-ng speech through `run_loadtest`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest

from deployments import loadtest
from deployments.loadtest import (
    LatencyTracker,
    LiveStats,
    LoadPlan,
    LoadTestError,
    ProgressLine,
    SharedAudio,
    StreamRecord,
    batch_size_delta,
    capacity_from_curve,
    capacity_levels,
    format_summary,
    level_held,
    parse_metrics_text,
    parse_metrics_url,
    parse_target,
    percentiles,
    summarize,
)

CHUNK = 1600  # 100 ms at 16 kHz


def _tracker(chunks: int, t0: float = 100.0, chunk: int = CHUNK, every: float = 0.1) -> LatencyTracker:
    tracker = LatencyTracker()
    for k in range(chunks):
        tracker.chunk_sent((k + 1) * chunk, t0 + k * every)
    return tracker


# ---------------------------------------------------------------------------------------------
# Offset -> send time
# ---------------------------------------------------------------------------------------------


def test_offset_maps_to_the_chunk_that_held_the_last_sample_heard() -> None:
    tracker = _tracker(30)
    assert tracker.send_time_of(0) is None  # heard nothing
    assert tracker.send_time_of(1) == 100.0  # sample 0: chunk 0
    assert tracker.send_time_of(CHUNK) == 100.0  # sample 1599: still chunk 0
    assert tracker.send_time_of(CHUNK + 1) == pytest.approx(100.1)  # sample 1600: chunk 1
    # One 192-frame block = 1.92 s = 30720 samples: its last sample sits in chunk 19 (30400..31999).
    assert tracker.send_time_of(30720) == pytest.approx(101.9)
    assert tracker.sent_samples == 30 * CHUNK and tracker.first_sent_at == 100.0


def test_offsets_past_the_audio_sent() -> None:
    tracker = _tracker(3)
    # Within a millisecond (rounding of audio_processed_ms): the last chunk.
    assert tracker.send_time_of(3 * CHUNK + 16) == pytest.approx(100.2)
    assert tracker.send_time_of(3 * CHUNK + 17) is None  # audio never sent: no latency
    assert LatencyTracker().send_time_of(1600) is None


def test_uneven_chunks_and_a_short_last_chunk() -> None:
    tracker = LatencyTracker()
    for end, when in ((640, 1.0), (4000, 2.0), (4001, 3.0), (5000, 4.0)):
        tracker.chunk_sent(end, when)
    assert [tracker.send_time_of(x) for x in (640, 641, 4000, 4001, 4002, 5000)] == [1.0, 2.0, 2.0, 3.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="before the previous chunk's end"):
        tracker.chunk_sent(4999, 5.0)


def test_forward_lookups_drop_old_entries_and_stay_exact() -> None:
    tracker = _tracker(20_000, t0=0.0, every=0.1)
    for k in range(0, 20_000, 7):
        assert tracker.send_time_of((k + 1) * CHUNK) == pytest.approx(k * 0.1)
    assert len(tracker._ends) < 20_000  # compacted behind the lookups
    assert tracker.send_time_of(20_000 * CHUNK) == pytest.approx(19_999 * 0.1)


# ---------------------------------------------------------------------------------------------
# Percentiles, one stream's record, the fell-behind rules
# ---------------------------------------------------------------------------------------------


def test_percentiles_match_numpy_linear() -> None:
    values = np.random.default_rng(0).exponential(100.0, size=537)
    got = percentiles(values, (50, 95, 99, 99.9))
    for q in (50, 95, 99):
        assert got[f"p{q}"] == pytest.approx(np.percentile(values, q))
    assert got["p99_9"] == pytest.approx(np.percentile(values, 99.9))
    assert got["count"] == 537 and got["max"] == pytest.approx(values.max()) and got["mean"] == pytest.approx(values.mean())
    assert percentiles([]) == {"count": 0, "mean": None, "min": None, "max": None, "p50": None, "p95": None, "p99": None}
    assert percentiles([7.0])["p99"] == 7.0
    with pytest.raises(ValueError):
        percentiles([1.0], (101,))


def _stream(index: int, *, seconds: float = 4.0, latency: float = 0.3, t0: float = 1000.0, block_ms: int = 1920,
            final_after: float | None = 0.4, error: str | None = None, stop_results_after_ms: int | None = None) -> StreamRecord:
    """A stream that sent `seconds` of audio on schedule and got an update per block `latency` s after its audio."""
    record = StreamRecord(index=index, scheduled_start=t0, audio_samples=round(seconds * 16000), opened_at=t0)
    n_chunks = math.ceil(seconds * 10)
    results = []
    for k in range(n_chunks):
        end = min((k + 1) * CHUNK, record.audio_samples)
        record.on_chunk_sent(end, t0 + k * 0.1)
        sent_ms = end // 16
        for block_end in range(block_ms, sent_ms + 1, block_ms):
            if block_end > sent_ms - 100 and (stop_results_after_ms is None or block_end <= stop_results_after_ms):
                results.append((block_end, t0 + k * 0.1 + latency))
    results.sort(key=lambda r: r[1])
    half_close = t0 + n_chunks * 0.1
    for audio_ms, when in results:
        if when <= half_close:
            record.on_result(audio_ms, when)
    record.on_half_close(half_close)
    for audio_ms, when in results:
        if when > half_close:
            record.on_result(audio_ms, when)
    if error is not None:
        record.error = error
    elif final_after is not None:
        record.on_result(round(seconds * 1000), half_close + final_after - 0.05)  # the flush update
        record.final_at = half_close + final_after
        record.got_final = True
    return record


def test_a_stream_record_measures_first_result_updates_and_final() -> None:
    record = _stream(0, seconds=4.0, latency=0.25, final_after=0.5)
    # Blocks end at 1920 and 3840 ms: chunks 19 (sent at +1.9 s) and 38 (+3.8 s), results 0.25 s later.
    assert list(record.updates.audio_ms) == [1920, 3840, 4000]
    assert record.updates.latencies()[:2] == pytest.approx([0.25, 0.25])
    assert record.time_to_first_result_s == pytest.approx(1.9 + 0.25)
    assert record.final_latency_s == pytest.approx(0.5)
    # The flush update heard the last chunk (sent at +3.9 s) and came 0.45 s after the half-close (+4.0 s).
    assert record.updates.latencies()[2] == pytest.approx(0.55)
    # At the half-close (+4.0 s) the 3840 ms update was still 50 ms away: the latest one had heard 1920 ms.
    assert record.trailing_ms_at_end() == 4000 - 1920
    assert record.behind_reasons(3840, 3840) == [] and record.ok
    assert record.pacing_lag_s == pytest.approx(0.0, abs=1e-9)


def test_results_that_hear_no_new_audio_are_counted_not_timed() -> None:
    # A segment roll's closing Result comes with the next block but reports the audio of the previous one: its
    # "latency" would be a block of roll policy, not server time.
    record = _tracker_record(seconds=6.0)
    assert record.on_result(1920, 102.0) == pytest.approx(0.1)
    assert record.on_result(3840, 103.9) == pytest.approx(0.1)
    assert record.on_result(3840, 105.85) is None  # segment_final, emitted when block 3 arrived
    assert record.on_result(5760, 105.86) == pytest.approx(0.16)
    assert record.on_result(99_000, 106.0) is None  # audio never sent
    assert (len(record.updates), record.repeats, record.unmatched) == (5, 1, 1)
    assert record.updates.latencies() == pytest.approx([0.1, 0.1, 0.16])
    per = summarize([record])["per_stream"][0]
    assert (per["updates"], per["timed_updates"], per["repeat_updates"], per["unmatched_updates"]) == (5, 3, 1, 1)


def _tracker_record(seconds: float, t0: float = 100.0) -> StreamRecord:
    record = StreamRecord(index=0, audio_samples=round(seconds * 16000), opened_at=t0, scheduled_start=t0)
    for k in range(round(seconds * 10)):
        record.on_chunk_sent((k + 1) * CHUNK, t0 + k * 0.1)
    return record


def test_fell_behind_by_latency_or_by_trailing_audio() -> None:
    slow = _stream(1, seconds=8.0, latency=4.5)
    reasons = slow.behind_reasons(3840, 3840)
    assert reasons[0] == "4 update(s) over 3840 ms (worst 4500 ms)"  # each block's update, 4.5 s late
    assert reasons[1:] == ["processed audio trailed sent audio by 6080 ms at the half-close"]  # 8000 - 1920
    # The server stopped answering after 1.92 s of an 8 s stream: 6+ s of audio unprocessed at the half-close.
    stuck = _stream(2, seconds=8.0, latency=0.2, stop_results_after_ms=1920)
    assert stuck.trailing_ms_at_end() == 8000 - 1920
    assert any("trailed sent audio by 6080 ms" in r for r in stuck.behind_reasons(3840, 3840))
    # Trailing by less than 2 blocks (one block in flight) is normal.
    assert _stream(3, seconds=8.0, latency=1.0).behind_reasons(3840, 3840) == []


def test_pacing_lag_counts_chunks_written_late() -> None:
    record = StreamRecord(index=0)
    for k, late in enumerate([0, 0, 0.05, 0.4, 0]):
        record.on_chunk_sent((k + 1) * CHUNK, 10.0 + k * 0.1 + late)
    assert record.pacing_lag_s == pytest.approx(0.4)


def test_summarize_counts_errors_finals_and_streams_behind() -> None:
    records = [
        _stream(0, latency=0.2),
        _stream(1, seconds=8.0, latency=4.5),
        _stream(2, error="UNAVAILABLE"),
        _stream(3, error="UNAVAILABLE"),
        _stream(4, final_after=None),  # closed without Final
        StreamRecord(index=5, error=loadtest.CLIENT_DEADLINE),  # never started
    ]
    summary = summarize(records, block_frames=192, run_started_at=1000.0, run_ended_at=1010.0)
    json.dumps(summary, allow_nan=False)  # JSON as is
    assert summary["streams"] == {
        "requested": 6, "opened": 5, "with_final": 2, "with_error": 3, "fell_behind": 1, "fell_behind_ids": [1],
        "client_pacing_behind": 0, "client_pacing_behind_ids": [],
    }
    assert summary["errors"] == {"CLIENT_DEADLINE": 1, "NO_FINAL": 1, "UNAVAILABLE": 2}
    assert summary["block_ms"] == 1920 and summary["behind_threshold_ms"] == 3840
    latencies = [x * 1000 for r in records for x in r.updates.latencies()]
    assert summary["update_latency_ms"]["p95"] == pytest.approx(np.percentile(latencies, 95))
    assert summary["final_latency_ms"]["count"] == 2
    assert summary["updates"]["total"] == sum(len(r.updates) for r in records)
    assert summary["update_samples"]["columns"] == ["stream", "sent_s", "received_s", "audio_ms", "latency_ms"]
    assert len(summary["update_samples"]["rows"]) == summary["updates"]["total"]
    per = {p["stream"]: p for p in summary["per_stream"]}
    assert per[1]["fell_behind"] and per[1]["update_latency_ms"]["max"] == pytest.approx(4500)
    assert per[0]["time_to_first_result_ms"] == pytest.approx(2100)
    # A lower threshold (--behind-ms) flags the 200 ms stream too; 96-frame blocks halve the trailing limit.
    assert summarize(records, behind_ms=150)["streams"]["fell_behind"] >= 2
    assert summarize(records, block_frames=96)["trailing_limit_ms"] == 1920
    text = format_summary({**summary, "server_metrics": "not reachable (http://127.0.0.1:8080/metrics)"})
    assert "UNAVAILABLE x2" in text and "fell behind" in text and "not reachable" in text


def test_server_stage_timings_from_final_stats() -> None:
    from protos.qwen3stream.v1 import asr_pb2

    stats = asr_pb2.FinalStats(audio_ms=4000, segments=1, updates=3, words=7)
    if "stage_timings" not in asr_pb2.FinalStats.DESCRIPTOR.fields_by_name:
        pytest.skip("this FinalStats has no stage timings")
    stats.stage_timings.add(stage="encoder", calls=3, total_ms=30.0, p50_ms=9.0, p95_ms=14.0)
    first = _stream(0)
    first.final_stats = loadtest.final_stats_dict(stats)
    assert first.final_stats["audio_ms"] == 4000 and first.final_stats["stage_timings"][0]["calls"] == 3
    second = _stream(1)
    second.final_stats = {"stage_timings": [{"stage": "encoder", "calls": 1, "total_ms": 50.0, "p50_ms": 50.0, "p95_ms": 50.0}]}
    summary = summarize([first, second, _stream(2, error="INTERNAL")])
    assert summary["server_stage_timings"] == {"encoder": {"calls": 4, "mean_ms": 20.0, "max_stream_p95_ms": 50.0}}
    assert "encoder 4 calls, mean 20 ms, worst stream p95 50 ms" in format_summary({**summary, "server_metrics": "not requested"})


# ---------------------------------------------------------------------------------------------
# Targets, capacity search, metrics, audio, progress, the command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["127.0.0.1:50051", "localhost:9", "[::1]:50051", "asr.internal.example:443"])
def test_literal_targets_are_accepted(text: str) -> None:
    assert parse_target(text) == text


@pytest.mark.parametrize(
    "text",
    ["dns:///asr:443", "unix:/tmp/sock", "http://127.0.0.1:1", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536",
     "::1:50051", "a:1,b:2", " 127.0.0.1:1", "xds:1", "[nope]:1", "-x:1", ""],
)
def test_anything_but_a_literal_host_port_is_refused(text: str) -> None:
    with pytest.raises(LoadTestError):
        parse_target(text)


def test_metrics_url_must_be_on_the_server_host_or_loopback() -> None:
    assert parse_metrics_url("http://127.0.0.1:8080/metrics", "asr.example:50051")
    assert parse_metrics_url("http://asr.example:8080/metrics", "asr.example:50051")
    for url in ("http://elsewhere.example:8080/metrics", "file:///etc/passwd", "ftp://127.0.0.1/x"):
        with pytest.raises(LoadTestError):
            parse_metrics_url(url, "asr.example:50051")


def test_capacity_levels_and_result() -> None:
    assert capacity_levels(1, 20) == [1, 2, 4, 8, 16, 20]
    assert capacity_levels(4, 16) == [4, 8, 16]
    assert capacity_levels(2, 9, step=3) == [2, 5, 8, 9]
    assert len(capacity_levels(1, 2000, step=1)) == loadtest.MAX_CAPACITY_LEVELS
    with pytest.raises(LoadTestError):
        capacity_levels(8, 4)
    curve = [{"streams": n, "held": held} for n, held in ((1, True), (2, True), (4, False), (8, True))]
    assert capacity_from_curve(curve) == 2
    assert capacity_from_curve([{"streams": 1, "held": False}]) == 0
    ok = {"errors": {}, "update_latency_ms": {"p95": 400.0}}
    assert level_held(ok, 500)[0] and not level_held(ok, 300)[0]
    assert not level_held({**ok, "errors": {"UNAVAILABLE": 1}}, 500)[0]
    assert not level_held({"errors": {}, "update_latency_ms": {"p95": None}}, 500)[0]


PROMETHEUS = """\
# HELP ray_qwen3_stream_decoder_batch_size streams per decoder update
# TYPE ray_qwen3_stream_decoder_batch_size histogram
ray_qwen3_stream_decoder_batch_size_bucket{Component="core_worker",deployment="Decoder",le="1.0",replica="a"} 3.0
ray_qwen3_stream_decoder_batch_size_bucket{Component="core_worker",deployment="Decoder",le="2.0",replica="a"} 7.0
ray_qwen3_stream_decoder_batch_size_bucket{Component="core_worker",deployment="Decoder",le="4.0",replica="a"} 9.0
ray_qwen3_stream_decoder_batch_size_bucket{Component="core_worker",deployment="Decoder",le="+Inf",replica="a"} 10.0
ray_qwen3_stream_decoder_batch_size_count{deployment="Decoder",replica="a"} 10.0
ray_qwen3_stream_decoder_batch_size_sum{deployment="Decoder",replica="a"} 99.5
ray_qwen3_stream_decoder_batch_size_bucket{deployment="Decoder",le="1.0",replica="b"} 2.0
ray_qwen3_stream_decoder_batch_size_bucket{deployment="Decoder",le="2.0",replica="b"} 2.0
ray_qwen3_stream_decoder_batch_size_bucket{deployment="Decoder",le="4.0",replica="b"} 2.0
ray_qwen3_stream_decoder_batch_size_bucket{deployment="Decoder",le="+Inf",replica="b"} 2.0
ray_qwen3_stream_decoder_batch_size_count{deployment="Decoder",replica="b"} 2.0
ray_qwen3_stream_encoder_batch_size_bucket{deployment="CausalEncoder",le="1.0"} 2.0
ray_qwen3_stream_encoder_batch_size_bucket{deployment="CausalEncoder",le="2.0"} 4.0
ray_qwen3_stream_encoder_batch_size_bucket{deployment="CausalEncoder",le="4.0"} 4.0
ray_qwen3_stream_encoder_batch_size_bucket{deployment="CausalEncoder",le="+Inf"} 4.0
ray_qwen3_stream_encoder_batch_size_count{deployment="CausalEncoder"} 4.0
ray_qwen3_stream_encoder_batch_size_sum{deployment="CausalEncoder"} 4.0
ray_qwen3_stream_active_streams{deployment="Ingress"} 3.0
"""


def test_batch_sizes_from_prometheus_buckets() -> None:
    after = parse_metrics_text(PROMETHEUS)  # summed over replicas
    assert after["decoder"]["count"] == 12
    assert after["decoder"]["buckets"] == {"1.0": 5.0, "2.0": 9.0, "4.0": 11.0, "+Inf": 12.0}
    assert "active" not in str(after)
    before = {"decoder": {"count": 1.0, "sum": 0.5, "buckets": {"1.0": 1.0, "2.0": 1.0, "4.0": 1.0, "+Inf": 1.0}}}
    delta = batch_size_delta(before, after)
    # Whole-number sizes: bucket (1, 2] is exactly 2, (2, 4] is 3 or 4; Ray's midpoint-estimated _sum is not used.
    assert delta["decoder"] == {"batches": 11.0, "by_size": {"1": 4.0, "2": 4.0, "3-4": 2.0, ">4": 1.0},
                                "mean_batch_size_range": None}  # one batch above the last finite bucket
    assert delta["encoder"] == {"batches": 4.0, "by_size": {"1": 2.0, "2": 2.0}, "mean_batch_size_range": [1.5, 1.5]}
    only_small = batch_size_delta({}, parse_metrics_text(PROMETHEUS.replace('le="+Inf",replica="a"} 10.0', 'le="+Inf",replica="a"} 9.0').replace('replica="a"} 10.0', 'replica="a"} 9.0')))
    assert only_small["decoder"]["mean_batch_size_range"] == pytest.approx([(5 + 2 * 4 + 3 * 2) / 11, (5 + 2 * 4 + 4 * 2) / 11])
    assert parse_metrics_text("no metrics here\n") == {}
    assert loadtest.scrape_metrics(None) is None
    text = format_summary({**summarize([_stream(0)]), "server_metrics": {"url": "http://127.0.0.1:1/metrics", "batch_sizes": delta}})
    assert "encoder 4 batches, mean 1.50 (1: 2, 2: 2)" in text and "decoder 11 batches, mean -" in text


def test_shared_audio_windows_start_at_different_pieces() -> None:
    pieces = [np.full(1000, 0.1, np.float32), np.full(500, -0.2, np.float32)]
    audio = SharedAudio.build(pieces, duration_s=0.25)  # 4000 samples, looped
    first, second = audio.for_stream(0), audio.for_stream(1)
    assert len(first) == len(second) == 2 * 4000
    a = np.frombuffer(first, "<i2")
    b = np.frombuffer(second, "<i2")
    assert a[0] == round(0.1 * 32767) and b[0] == round(-0.2 * 32767)
    assert a[1500] == a[0]  # looped
    assert bytes(audio.for_stream(2)) == bytes(first)


def test_progress_line() -> None:
    stats = LiveStats(streams=4)
    stats.up, stats.done = 3, 1
    for k in range(20):
        stats.add_update(10.0 + k * 0.05, 0.1 + k * 0.01)
    out = io.StringIO()
    line = ProgressLine(stats, stream=out)
    first = line.line(10.0, 0.0)
    stats.add_update(11.0, 0.5)
    second = line.line(11.0, 0.0)
    assert "3 up / 1 done of 4" in first and "errors 0" in first
    assert "updates    1.0/s" in second and "p95(10s)" in second
    assert percentiles([0.1 + k * 0.01 for k in range(20)] + [0.5], (95,))["p95"] * 1000 == pytest.approx(
        float(second.split("p95(10s) ")[1].split(" ms")[0]), abs=1
    )


def test_plan_bounds() -> None:
    for bad in (dict(streams=0), dict(streams=loadtest.MAX_STREAMS + 1), dict(streams=1, duration_s=0),
                dict(streams=1, duration_s=3601), dict(streams=1, ramp_s=-1), dict(streams=1, block_frames=100),
                dict(streams=1, channels=65), dict(streams=1, chunk_ms=0)):
        with pytest.raises(LoadTestError):
            LoadPlan(**bad)
    plan = LoadPlan(streams=250, duration_s=60, ramp_s=10)
    assert plan.channel_count == 3 and LoadPlan(streams=2, channels=8).channel_count == 2
    assert plan.start_offset(0) == 0 and plan.start_offset(125) == 5.0
    assert plan.deadline_s == 10 + 60 + 60


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3-stream")
    loadtest.add_loadtest_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_command_line_flags() -> None:
    args = _parser().parse_args(
        ["loadtest", "--server", "127.0.0.1:6000", "--streams", "8", "--ramp", "2", "--duration", "10", "--synthetic",
         "--channels", "2", "--block-frames", "96", "--chunk-ms", "40", "--out", "/tmp/x", "--find-capacity",
         "--p95-ms", "800", "--max-streams", "64", "--step", "8"]
    )
    assert (args.server, args.streams, args.ramp, args.duration, args.channels) == ("127.0.0.1:6000", 8, 2.0, 10.0, 2)
    assert (args.block_frames, args.chunk_ms, args.out, args.find_capacity) == (96, 40, Path("/tmp/x"), True)
    assert (args.p95_ms, args.max_streams, args.step, args.run) == (800.0, 64, 8, loadtest.run_loadtest_command)
    defaults = _parser().parse_args(["loadtest"])
    assert defaults.server == "127.0.0.1:50051" and defaults.streams == 1 and defaults.audio is None
    for bad in (["--server", "dns:///x:1"], ["--streams", "2001"], ["--duration", "0"], ["--duration", "4000"],
                ["--block-frames", "100"], ["--audio", "a.wav", "--synthetic"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["loadtest", *bad])


def test_command_refuses_inconsistent_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert loadtest.run_loadtest_command(_parser().parse_args(["loadtest", "--find-capacity"])) == 2
    assert "--find-capacity needs --p95-ms" in capsys.readouterr().err
    assert loadtest.run_loadtest_command(_parser().parse_args(["loadtest", "--p95-ms", "5"])) == 2
    args = _parser().parse_args(["loadtest", "--find-capacity", "--p95-ms", "5", "--streams", "9", "--max-streams", "4"])
    assert loadtest.run_loadtest_command(args) == 2
    args = _parser().parse_args(["loadtest", "--audio", "/nonexistent/x.wav", "--metrics-url", "none"])
    assert loadtest.run_loadtest_command(args) == 2
    assert "does not exist" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_server_is_one_clear_error() -> None:
    audio = SharedAudio.build([np.zeros(1600, np.float32)], 0.1)
    plan = LoadPlan(streams=1, duration_s=0.1, ramp_s=0, connect_timeout_s=0.5)
    with pytest.raises(LoadTestError, match="no gRPC server answered"):
        asyncio.run(loadtest.run_load(f"127.0.0.1:{_free_port()}", plan, audio))


# ---------------------------------------------------------------------------------------------
# Against a real server
# ---------------------------------------------------------------------------------------------

SESSION = {"decode": {"max_new_tokens": 12}, "segment": {"segment_max_steps": 60, "segment_punct_min_steps": 40}}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path):  # noqa: ANN201
    import ray

    from deployments import server
    from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR

    # tests/test_served.py starts its own Ray in this process; module fixtures stop theirs at the module's end,
    # so one is never running here. Fail loudly rather than stopping another module's server.
    assert not ray.is_initialized(), "a Ray started elsewhere in this process is still running"
    one_cpu = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}
    settings = server.ServerSettings(
        args={"model": str(tiny_checkpoint), "tower": str(tiny_checkpoint / TOWER_OVERLAY_DIR), "slots": 8, "session": SESSION},
        port=_free_port(),
        num_cpus=8,
        deployment_options={name: one_cpu for name in ("Ingress", "FeatureExtractor", "CausalEncoder", "Decoder")},
    )
    address = server.start(settings)
    try:
        yield address
    finally:
        server.stop()
    assert not ray.is_initialized()


def _ray_metrics_url() -> str | None:
    try:
        import ray

        port = ray._private.worker.global_worker.node.metrics_export_port
    except Exception:  # noqa: BLE001 (a private attribute: optional)
        return None
    return f"http://127.0.0.1:{port}/metrics" if port else None


def test_three_realtime_streams_against_a_served_pipeline(server: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tests.speech import require_espeak

    require_espeak()
    plan = LoadPlan(streams=3, duration_s=4.0, ramp_s=0.6, channels=2, grace_s=30.0)
    summary = loadtest.run_loadtest(server, plan, out=tmp_path, metrics_url=_ray_metrics_url(), progress=False,
                                    metrics_wait_s=0)
    (tmp_path / "summary.txt").write_text(format_summary(summary))

    assert summary["errors"] == {}
    assert summary["streams"]["with_final"] == summary["streams"]["opened"] == 3
    for stream in summary["per_stream"]:
        assert stream["got_final"] and stream["audio_sent_s"] == pytest.approx(4.0)
        # 4 s of audio: blocks complete at 1.92 and 3.84 s, then the half-close flushes the last 160 ms.
        # One timed update per block heard plus the flush; a roll's closing Result may add an untimed repeat.
        assert stream["timed_updates"] == 3 and stream["unmatched_updates"] == 0, stream
        assert stream["updates"] == 3 + stream["repeat_updates"] <= 5, stream
        assert stream["final_stats"]["audio_ms"] == 4000
        assert 0 < stream["time_to_first_result_ms"] < 20_000
        assert 0 < stream["final_latency_ms"] < 20_000
    rows = summary["update_samples"]["rows"]
    heard = {}
    for stream, _sent, _received, audio_ms, latency_ms in rows:
        heard.setdefault(stream, []).append(audio_ms)
        if latency_ms is not None:
            assert 0 < latency_ms < 20_000  # positive (arrival after the audio was sent) and loosely bounded
    assert sorted(heard) == [0, 1, 2]
    for audio in heard.values():
        assert sorted(set(audio)) == [1920, 3840, 4000] and audio == sorted(audio)
    u = summary["update_latency_ms"]
    assert 0 < u["p50"] <= u["p95"] <= u["p99"] <= u["max"]
    assert summary["server_metrics"]  # a report or a "not reachable" line, either way stated
    # Checked against the server's own timings: an update's client-side latency contains its encoder and decoder
    # calls as the ingress timed them, so on average it cannot be shorter than they were.
    server = summary["server_stage_timings"]
    timed = [latency_ms for *_, latency_ms in rows if latency_ms is not None]
    assert sum(timed) / len(timed) >= 0.9 * (server["encoder"]["mean_ms"] + server["decoder"]["mean_ms"])

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["streams"]["with_final"] == 3 and saved["mode"] == "single"
    png = (tmp_path / "latency_over_time.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
