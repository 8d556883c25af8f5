"""FLOP accounting on the meta device against the published ledger, the update-schedule walkers against the
real `StreamingSession`, and the memory probe."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cli import main as cli_main
from pipeline import flops
from pipeline.checkpoint import load_model
from pipeline.config import QWEN3_ASR_0_6B, TINY_AUDIO, TINY_TEXT, Qwen3ASRConfig
from pipeline.flops import (
    CAUSAL_PUBLISHED_BUDGET,
    GIGA,
    ModelFlopCounter,
    PromptShape,
    causal_schedule,
    compare_with_published,
    cost_update,
    probe_session_memory,
    windowed_schedule,
)
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession, decoder_positions_needed
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR

TINY = Qwen3ASRConfig(audio=TINY_AUDIO, text=TINY_TEXT)


@pytest.fixture(scope="module")
def full_size() -> ModelFlopCounter:
    return ModelFlopCounter(QWEN3_ASR_0_6B)


@pytest.fixture(scope="module")
def tiny() -> ModelFlopCounter:
    return ModelFlopCounter(TINY, device="cpu")


def relative(ours: float, published: float) -> float:
    return abs(ours - published) / published


def test_meta_tensors_are_counted_and_cpu_sdpa_is_not():
    # What the module docstring relies on: the counter sees meta matmuls and SDPA's meta (math) path,
    # but not the fused CPU SDPA kernel, which is why the published ledger has no text-model attention.
    def attention_flops(device: str) -> int:
        query, key = torch.ones(1, 2, 5, 8, device=device), torch.ones(1, 2, 7, 8, device=device)
        with FlopCounterMode(display=False) as counter:
            torch.nn.functional.scaled_dot_product_attention(query, key, key)
        return counter.get_total_flops()

    assert attention_flops("meta") == 2 * (2 * 2 * 5 * 7 * 8)
    assert attention_flops("cpu") == 0


def test_published_components_reproduced(full_size):
    comparison = compare_with_published(full_size)
    block, rolling, step, window, average, peak = comparison.components

    # Counted as the published runtime's counter saw them, within 0.5 %.
    for row in (block, rolling, step, average, peak):
        assert relative(row.ours_as_published, row.published) < 0.005, row.name
    for row in (rolling, step):
        with_lm_head = row.ours_as_published + row.lm_head.total / GIGA
        assert relative(with_lm_head, row.published_with_lm_head) < 0.005, row.name
    published = {name: (pub, ours) for name, pub, ours, _ in comparison.per_audio_second}
    assert relative(published["causal, per audio second"][1], 41.5) < 0.005

    # The offline tower over the 1264-frame window: 164 steps in a whole 104-step window and a 60-step one, each
    # run at its own size, so the weights' FLOPs are the published ones.
    assert relative(window.ours.weights / GIGA, 114.47) < 0.005
    assert window.ours.attention > 0 and not window.counts_attention


def test_classes_match_parameter_counts(full_size):
    # Linear FLOPs = 2 x weights x rows; attention = layers x (QK^T + PV) x heads x keys x head_dim.
    text = QWEN3_ASR_0_6B.text
    layer_weights = sum(
        module.weight.numel() for module in full_size.decoder.layers.modules() if isinstance(module, torch.nn.Linear)
    )
    past = 250
    step = full_size.text_model(1, past)
    assert step.linear == 2 * layer_weights
    assert step.conv == 0
    assert step.attention == text.num_hidden_layers * 2 * 2 * text.num_attention_heads * (past + 1) * text.head_dim
    assert full_size.lm_head(3).linear == 3 * 2 * text.vocab_size * text.hidden_size


def test_causal_cost_is_flat_and_windowed_grows_within_a_segment(tiny):
    frames = 20 * 100
    causal = [cost_update(shape, tiny) for shape in causal_schedule(frames)]
    regular = [cost for cost in causal if not cost.shape.is_flush]
    # The published budget forwards the same positions every update (a segment start trades its missing
    # draft for sequential steps), so matmuls against weights cost the same for every block.
    assert len({cost.weights for cost in regular}) == 1
    assert {cost.shape.segment_index for cost in regular} == {0, 1}
    assert [cost.shape.segment_steps for cost in regular[:9]] == [24 * k for k in range(1, 9)] + [24]

    windowed = [cost_update(shape, tiny) for shape in windowed_schedule(frames)]
    first = [cost.weights for cost in windowed if cost.shape.segment_index == 0]
    second = [cost.weights for cost in windowed if cost.shape.segment_index == 1]
    assert len(first) >= 6 and all(later > earlier for earlier, later in zip(first, first[1:]))
    assert second[0] < first[-1]  # the saw-tooth resets at the roll


def test_growing_hypothesis_makes_causal_saw_tooth(tiny):
    growing = replace(CAUSAL_PUBLISHED_BUDGET, fixed_tokens=None)
    costs = [cost_update(shape, tiny) for shape in causal_schedule(8 * 192, budget=growing)]
    assert [cost.shape.text.draft_tokens for cost in costs] == [0, 6, 12, 18, 24, 30, 36, 42]
    assert costs[-1].weights > costs[1].weights


def session_updates(model, options: SessionOptions, seconds: float):
    session = StreamingSession(model, options)
    noise = np.random.default_rng(0)
    events = []
    for start in range(0, round(seconds * 16_000), 16_000):
        size = min(16_000, round(seconds * 16_000) - start)
        events += session.push_audio((0.1 * noise.standard_normal(size)).astype(np.float32))
    events += session.finish()
    updates = [event for event in events if event.kind == "update"]
    prompt = PromptShape(head=len(session.prompt.head_ids), tail=len(session.prompt.tail_ids))
    return session, updates, prompt


@pytest.mark.parametrize("backend", ["causal", "windowed"])
def test_schedules_follow_the_session(tiny_checkpoint, backend):
    # The walkers predict the real session's updates: segment of each, and the positions forwarded
    # apart from the (random-weight) hypothesis.
    model = load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR)
    if backend == "causal":
        options = SessionOptions.from_dict({"decode": {"max_new_tokens": 8}, "segment": {"punctuation_rollover": False}})
    else:
        options = SessionOptions.windowed(decode={"max_new_tokens": 8})
    session, updates, prompt = session_updates(model, options, seconds=37.3)
    walk = (causal_schedule if backend == "causal" else windowed_schedule)(session.frames_encoded, options, prompt)

    def forwarded_without_hypothesis(event) -> int:
        return event.stats.positions_forwarded - event.stats.decode_steps - event.stats.draft_tokens

    assert [event.segment_index for event in updates] == [shape.segment_index for shape in walk]
    assert [forwarded_without_hypothesis(event) for event in updates] == [
        shape.text.pass_positions - shape.text.draft_tokens for shape in walk
    ]
    assert max(event.segment_index for event in updates) >= 1
    assert walk[-1].is_flush


def test_memory_probe_runs_on_a_short_stream():
    samples = probe_session_memory(0.5, sample_at_min=(0.25,))
    assert [sample.stream_min for sample in samples] == [0, 0.25, 0.5]
    for sample in samples:
        assert 0 < sample.rss_mib <= sample.peak_rss_mib
        assert sample.encoder_cached_steps <= 195
        # Between updates the decoder keeps head + segment audio only (cap 200 steps).
        assert sample.decoder_cached_positions <= 9 + 200


def test_state_bound_agrees_with_the_session(tiny_checkpoint):
    model = load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR)
    options = SessionOptions.from_dict({"decode": {"max_new_tokens": 40}})
    prompt = StreamingSession(model, options).prompt
    shape = PromptShape(head=len(prompt.head_ids), tail=len(prompt.tail_ids))
    bound = flops.full_size_state_bound(options=options, prompt=shape)
    assert bound.decoder_positions == decoder_positions_needed(prompt, options)


def test_state_bound_of_the_full_size_model():
    bound = flops.full_size_state_bound()
    assert bound.encoder_values == 18 * 2 * 195 * 896
    assert bound.decoder_values_per_position == 28 * 2 * 8 * 128
    assert bound.decoder_positions == 9 + 64 + 200 + 9 + 256  # head, context room, segment cap, tail, token budget
    assert bound.mib(4)["total"] == pytest.approx((18 * 2 * 195 * 896 + 538 * 28 * 2 * 8 * 128) * 4 / 2**20)
    assert bound.mib(2)["total"] == pytest.approx(bound.mib(4)["total"] / 2)


def test_published_shapes_are_the_default_session_options():
    # Derived from SessionOptions: the published ledger was measured at these (1.92 s blocks, 2 s windowed updates
    # over 12 s + 640 ms of mel).
    assert (flops.CAUSAL_BLOCK_FRAMES, flops.CAUSAL_BLOCK_STEPS, flops.CAUSAL_BLOCK_SEC) == (192, 24, 1.92)
    assert (flops.WINDOWED_UPDATE_SEC, flops.WINDOW_FRAMES) == (2.0, 1264)


def test_bench_flops_command_writes_its_report(tmp_path, monkeypatch, capsys):
    # The command end to end on the tiny geometry (the full-size walks take minutes).
    monkeypatch.setattr(flops, "ModelFlopCounter", lambda: ModelFlopCounter(TINY, device="cpu"))
    assert cli_main(["bench", "flops", "--minutes", "0.2", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert capsys.readouterr().out == report
    assert "| 12 s | causal |" in report and "| 12 s | windowed |" in report
    assert (tmp_path / "flops.json").exists()
    pytest.importorskip("matplotlib")
    assert (tmp_path / flops.PLOT_NAME).stat().st_size > 10_000
