"""The roofline estimate: the engine's step-count, row and span rules, activation traffic, host time, exact
bisection, memory accounting equal to the pool's, and a case computed by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cli import main as cli_main
from pipeline import roofline
from pipeline.activations import ActivationModel, ForwardShape, decoder_activations, encoder_activations
from pipeline.config import TINY_AUDIO, TINY_TEXT, Qwen3ASRConfig
from pipeline.decode_step import StaticDecodeStep, bucket_for
from pipeline.decoder import TextDecoder
from pipeline.roofline import (
    ALL_BLOCKS,
    CPU_2_CORES,
    H100_SXM,
    MEASURED_HOST,
    NO_HOST,
    Batch,
    DeviceSpec,
    HostCost,
    ModelCost,
    SegmentBlock,
    aligned_capacity,
    aligned_latency_sec,
    decoder_capacity,
    engine_cost,
    format_roofline,
    live_capacity,
    sequential_forwards,
)

TINY = Qwen3ASRConfig(audio=TINY_AUDIO, text=TINY_TEXT)
SLOW_HOST = HostCost(fixed_sec=0.01, per_stream_sec=0.001, source="test")


@pytest.fixture(scope="module")
def one_device_report() -> str:
    return format_roofline(devices=(H100_SXM,), calibration=(1,))  # all of them take seconds


def test_a_forward_costs_what_is_computed_by_hand() -> None:
    """flops 4 x 10 + 32 pairs x 1 + 4 rows x 100 = 472 (0.472 s); bytes 1000 weights + 4 rows x 8 keys x 10 +
    activations 4 x 2 + 4 x 5 + 2 x 1 = 1350 (1.35 s): memory bound, + 0.01 s of launches."""
    activations = ActivationModel(per_position=2, per_pair=0, per_logit_row=5, per_picked_row=1)
    cost = ModelCost(10, 1, 100, 1000, 10, activations)
    device = DeviceSpec("round numbers", 1000, 1000, 1e9, 2, 0.01, True)
    shape = ForwardShape(positions=4, attention_rows=4, queries=1, span=8, logit_rows=4, picked_rows=2)
    assert (cost.flops(shape), cost.traffic_bytes(shape)) == (472, 1350)
    assert cost.forward_sec(shape, device, 0.01) == pytest.approx(1.36)


@pytest.mark.parametrize("fused", [False, True])
def test_activation_bytes_grow_linearly_in_rows(fused: bool) -> None:
    decoder, encoder = decoder_activations(TINY_TEXT, 2, fused), encoder_activations(TINY_AUDIO, 2, fused)
    for model in (decoder, encoder):
        def step(rows: int) -> float:
            return model.bytes_of(ForwardShape(rows, rows, 1, 256, rows, rows))

        assert step(1) > 0 and step(8) == 8 * step(1) and step(64) == 8 * step(8)


def test_eager_attention_scores_cost_more_than_a_fused_kernels_mask() -> None:
    pass_shape = ForwardShape(positions=63, attention_rows=1, queries=63, span=240)
    eager, fused = (decoder_activations(TINY_TEXT, 2, fused).bytes_of(pass_shape) for fused in (False, True))
    assert eager > fused


def test_segment_blocks_follow_the_bench_budget_and_default_options() -> None:
    assert (roofline.BLOCK_SEC, roofline.BLOCK_STEPS, roofline.SEGMENT_BLOCKS) == (1.92, 24, 8)
    first, last = SegmentBlock(0), ALL_BLOCKS[-1]
    assert (first.draft, first.pass_positions, first.step_length(0)) == (0, 9 + 24 + 9, 42)  # head forwarded
    assert (last.draft, last.accepted, last.pass_positions) == (30, 21, 24 + 9 + 30)
    assert (last.pass_end, last.step_length(0), last.step_length(8)) == (240, 231, 239)
    assert last.encoder_cached == 168


def test_sequential_steps_use_decode_steps_bucket_rule() -> None:
    """Rows: the bucket above the highest stepping slot; span: the bucket above the longest cache, as the
    `StaticDecodeStep` of the same pool buckets them."""
    from pipeline.kv_pool import DecoderKVPool

    capacity = decoder_capacity(64)
    decoder = TextDecoder(TINY_TEXT)
    static = StaticDecodeStep(decoder, DecoderKVPool(decoder, slots=5, capacity=capacity))
    batch = Batch(stepping=2, resident=3, pool_slots=5, capacity=capacity)
    forwards = sequential_forwards(batch, static=True)
    assert len(forwards) == roofline.SEQUENTIAL_STEPS
    for step, forward in enumerate(forwards):
        longest = max(block.step_length(step) for block in batch.blocks)
        assert forward.span == bucket_for(longest, static.span_buckets) == 256
        assert forward.logit_rows == forward.attention_rows == bucket_for(2, static.row_buckets) == 4
        assert forward.picked_rows == 2
    dynamic = sequential_forwards(batch, static=False)
    assert [(f.positions, f.attention_rows, f.span) for f in dynamic[:1]] == [(2, 3, 232)]


def test_the_slowest_stream_sets_the_step_count() -> None:
    cost = engine_cost(H100_SXM, TINY)
    capacity = decoder_capacity(256)
    nine, eighteen = (
        Batch(64, 64, 64, capacity, ALL_BLOCKS, steps) for steps in (roofline.SEQUENTIAL_STEPS, 18)
    )
    assert len(sequential_forwards(eighteen, True)) == 18
    assert cost.step_sec(eighteen) > cost.step_sec(nine)


def test_step_time_grows_with_streams_and_bisection_is_exact() -> None:
    cost, capacity = engine_cost(CPU_2_CORES, TINY), decoder_capacity(256)
    times = [cost.step_sec(Batch(n, n, n, capacity)) for n in (1, 2, 8, 64)]
    assert times == sorted(times) and times[0] > 0
    for latency in (0.05, 0.5):
        best = aligned_capacity(cost, capacity, latency_sec=latency)
        assert aligned_latency_sec(cost, best, best, capacity, 9, NO_HOST) <= latency
        assert aligned_latency_sec(cost, best + 1, best + 1, capacity, 9, NO_HOST) > latency


def test_memory_bound_decode_steps_are_nearly_free_to_batch() -> None:
    """On a GPU a static step reads the weights once for the whole batch: a second row costs almost nothing."""
    cost, capacity = engine_cost(H100_SXM, TINY), decoder_capacity(256)
    one, two = (cost.step_sec(Batch(n, n, n, capacity)) for n in (1, 2))
    assert two < 1.01 * one


def test_measured_host_time_lowers_the_capacity_and_is_labelled_measured(one_device_report: str) -> None:
    cost, capacity = engine_cost(H100_SXM, TINY), decoder_capacity(256)
    for count in (aligned_capacity, live_capacity):
        assert count(cost, capacity, host=SLOW_HOST) < count(cost, capacity)
    with_host = aligned_capacity(cost, capacity, host=SLOW_HOST)
    assert with_host <= 490  # 10 ms + 1 ms per stream alone caps a 0.5 s step at 490
    assert aligned_latency_sec(cost, with_host, with_host, capacity, 9, SLOW_HOST) <= 0.5
    assert aligned_latency_sec(cost, with_host + 1, with_host + 1, capacity, 9, SLOW_HOST) > 0.5
    assert "measured here" in MEASURED_HOST.source
    assert "live by step + host" in one_device_report and MEASURED_HOST.source in one_device_report


def test_a_pool_sized_by_memory_caps_the_streams_and_sets_the_row_buckets() -> None:
    cost, capacity = engine_cost(H100_SXM, TINY), decoder_capacity(256)
    unbounded = aligned_capacity(cost, capacity)
    assert aligned_capacity(cost, capacity, pool_slots=100) == min(100, unbounded)
    # 65 streams in a pool of 1000 slots run the 1000-row bucket: slower than in a pool of 65
    in_big_pool, in_own_pool = (cost.step_sec(Batch(65, 65, pool, capacity)) for pool in (1000, 65))
    assert in_big_pool > in_own_pool


def test_slot_bytes_equal_the_pool_slot() -> None:
    from pipeline.encoder import AudioTower
    from pipeline.kv_pool import DecoderKVPool, EncoderKVPool

    cost = engine_cost(CPU_2_CORES, TINY)
    encoder, decoder = EncoderKVPool(AudioTower(TINY_AUDIO), slots=2), DecoderKVPool(TextDecoder(TINY_TEXT), 2, 300)
    pools = (encoder.keys, encoder.values, decoder.keys, decoder.values)
    assert cost.slot_bytes(300) == sum(t.numel() * t.element_size() for t in pools) // 2


def test_decoder_capacity_is_the_sessions() -> None:
    from pipeline.options import SessionOptions
    from pipeline.session import decoder_positions_needed

    prompt = SimpleNamespace(head_ids=(0,) * 9, tail_ids=(0,) * 9, context_tokens=0)
    assert decoder_capacity(256) == decoder_positions_needed(prompt, SessionOptions()) == 9 + 64 + 200 + 9 + 256


def test_bench_roofline_prints_the_labelled_estimate(monkeypatch, capsys, one_device_report: str) -> None:
    monkeypatch.setattr(roofline, "format_roofline", lambda: one_device_report)
    assert cli_main(["bench", "roofline"]) == 0
    out = capsys.readouterr().out
    assert out == one_device_report + "\n" and out.startswith("Roofline ESTIMATE")
    assert "(estimated, roofline)" in out and "| H100 SXM (estimate) | 256 | 18 |" in out
