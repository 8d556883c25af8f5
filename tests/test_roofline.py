"""The roofline estimate: monotone step times, exact bisection, memory accounting equal to the pool's."""

from __future__ import annotations

from cli import main as cli_main
from pipeline import roofline
from pipeline.config import Qwen3ASRConfig, TINY_AUDIO, TINY_TEXT
from pipeline.roofline import CPU_2_CORES, H100_SXM, format_roofline, step_model

TINY = Qwen3ASRConfig(audio=TINY_AUDIO, text=TINY_TEXT)


def test_step_time_grows_with_streams_and_bisection_is_exact() -> None:
    model = step_model(TINY, bytes_per_value=4)
    times = [model.step_sec(n, CPU_2_CORES) for n in (1, 2, 8, 64)]
    assert times == sorted(times) and times[0] > 0
    for latency in (0.01, 0.1, 1.0):
        best = model.max_streams(CPU_2_CORES, latency, limit=100_000)
        assert model.step_sec(best, CPU_2_CORES) <= latency < model.step_sec(best + 1, CPU_2_CORES)


def test_memory_bound_phase_is_flat_until_compute_takes_over() -> None:
    """On a GPU the sequential steps read the weights once for the whole batch: adding streams is nearly free."""
    model = step_model(TINY, bytes_per_value=2)
    one, two = model.step_sec(1, H100_SXM), model.step_sec(2, H100_SXM)
    assert two < 1.01 * one


def test_slot_bytes_equal_the_pool_slot() -> None:
    from pipeline.decoder import TextDecoder
    from pipeline.encoder import AudioTower
    from pipeline.kv_pool import DecoderKVPool, EncoderKVPool

    model = step_model(TINY, bytes_per_value=4, slot_positions=300)
    encoder, decoder = EncoderKVPool(AudioTower(TINY_AUDIO), slots=2), DecoderKVPool(TextDecoder(TINY_TEXT), 2, 300)
    pools = (encoder.keys, encoder.values, decoder.keys, decoder.values)
    assert model.slot_bytes == sum(t.numel() * t.element_size() for t in pools) // 2


def test_report_is_labelled_an_estimate() -> None:
    assert "ESTIMATE" in format_roofline(devices=(H100_SXM,), calibration=(1,)).splitlines()[0]


def test_block_shapes_come_from_the_default_session_options() -> None:
    assert (roofline.BLOCK_SEC, roofline.BLOCK_STEPS) == (1.92, 24)
    assert (roofline.SEGMENT_BLOCKS, roofline.MEAN_ENCODER_CACHED) == (8, 84)  # mean of 0, 24, ..., 168


def test_bench_roofline_prints_the_estimate(monkeypatch, capsys) -> None:
    one_device = format_roofline(devices=(H100_SXM,), calibration=(1,))  # all of them take seconds
    monkeypatch.setattr(roofline, "format_roofline", lambda: one_device)
    assert cli_main(["bench", "roofline"]) == 0
    out = capsys.readouterr().out
    assert out == one_device + "\n" and out.startswith("Roofline ESTIMATE") and "by step <= 1.92 s" in out


def test_measured_host_time_lowers_the_capacity_and_is_labelled_measured() -> None:
    from pipeline.roofline import MEASURED_HOST, HostCost

    model = step_model(TINY, bytes_per_value=2)
    without = model.max_streams(H100_SXM, 0.5, limit=100_000)
    slow_host = HostCost(fixed_sec=0.01, per_stream_sec=0.001, source="test")
    with_host = model.max_streams(H100_SXM, 0.5, limit=100_000, host=slow_host)
    assert with_host < without and with_host <= 490  # 10 ms + 1 ms per stream alone caps it at 490
    best = with_host
    assert model.step_sec(best, H100_SXM) + slow_host.step_sec(best) <= 0.5
    assert model.step_sec(best + 1, H100_SXM) + slow_host.step_sec(best + 1) > 0.5
    assert "measured here" in MEASURED_HOST.source
    report = format_roofline(devices=(H100_SXM,), calibration=(1,))
    assert "by step + host <= 0.5 s" in report and MEASURED_HOST.source in report
