"""The engine benchmark's mechanics on the tiny checkpoint: the synthetic decode budget and the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline.bench_engine import (
    SyntheticDecodeBudget,
    format_engine_table,
    format_live_table,
    format_staggered_table,
    run_engine_bench,
    run_live_engine_bench,
    run_staggered_start_bench,
    samples_completing,
)
from pipeline.checkpoint import load_model
from pipeline.decoding import DecodeControls, DecodeOptions
from pipeline.engine import EngineOptions
from pipeline.features import HOP_LENGTH, StreamingLogMel, frames_complete
from pipeline.options import SessionOptions
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR


def test_budget_accepts_21_of_a_30_token_draft_then_takes_9_steps() -> None:
    budget = SyntheticDecodeBudget(DecodeControls(DecodeOptions(stop_token_ids=(99,))), words=(5, 6, 7))
    logits = torch.zeros(31, 100)
    draft = [5] * 9 + [6] * 9 + [5] * 9 + [6] * 3
    [(accepted, token, _)] = budget.verify_drafts(logits, [draft])
    assert (accepted, token) == (21, 6)  # draft[20:22] is [5, 5]: the new run is of another word
    hypothesis = draft[:21] + [token]
    while (pick := budget.pick(torch.zeros(1, 100), [hypothesis])[0].token) != 99:
        hypothesis.append(pick)
    assert hypothesis == draft[:21] + [6] * 9
    assert budget.verify_drafts(torch.zeros(1, 100), [[]]) == [(0, 5, (0.0,))]
    # A full accept of a short draft continues with a word other than its last one.
    assert budget.verify_drafts(torch.zeros(10, 100), [[5] * 9]) == [(9, 6, (0.0,) * 10)]


@given(st.lists(st.sampled_from([5, 6, 7]), max_size=40), st.integers(1, 4))
def test_budget_continues_a_run_until_it_is_new_tokens_long(history: list[int], blocks: int) -> None:
    budget = SyntheticDecodeBudget(DecodeControls(DecodeOptions(stop_token_ids=(99,))), words=(5, 6, 7))
    budget.hear(blocks)
    run = 0  # the length of the run the history ends in
    while run < len(history) and history[-1 - run] == history[-1]:
        run += 1
    expected = 99 if not history or run >= budget.new_tokens else history[-1]
    [pick] = budget.pick(torch.zeros(1, 100), [history])
    assert pick.token == expected


def test_engine_bench_runs_the_real_engine_with_the_budget(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR)
    results = [
        result
        for decode_step in ("dynamic", "static")
        for result in run_engine_bench(
            model, [1, 3], 6, SessionOptions(language="English"), EngineOptions(decode_step=decode_step)
        )
    ]
    assert [r.decode_step for r in results] == ["dynamic", "dynamic", "static", "static"]
    for result in results:
        assert result.steps == 6
        # Drafts grow 0, 9, 18, 27, 30, 30; accepted 0, 9, 18, 21, 21, 21; always 9 sequential steps.
        assert result.mean_draft == pytest.approx(19.0)
        assert result.mean_accepted == pytest.approx(15.0)
        assert result.mean_decode_steps == pytest.approx(9.0)
        assert result.step_p50_sec > 0 and result.rtfx > 0 and result.kv_bytes_per_stream > 0
    table = format_engine_table(results, "cpu")
    assert "| 3 | static | 6 |" in table and "synthetic" in table and "vs N=1" in table


def test_budget_for_two_blocks_per_update_re_decodes_18_tokens() -> None:
    budget = SyntheticDecodeBudget(DecodeControls(DecodeOptions(stop_token_ids=(99,))), words=(5, 6, 7), blocks_per_update=2)
    draft = [5] * 12 + [6] * 18
    [(accepted, token, _)] = budget.verify_drafts(torch.zeros(31, 100), [draft])
    assert (accepted, token) == (12, 7)
    hypothesis = draft[:12] + [token]
    while (pick := budget.pick(torch.zeros(1, 100), [hypothesis])[0].token) != 99:
        hypothesis.append(pick)
    assert hypothesis == draft[:12] + [7] * 18


def test_live_bench_batches_only_the_streams_whose_blocks_have_arrived(tiny_checkpoint: Path) -> None:
    """Staggered phases on the simulated clock: the tiny model steps far faster than blocks arrive, so each
    step finds about one stream ready, and every update comes out within a step of its block's arrival."""
    model = load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR)
    (result,) = run_live_engine_bench(model, [4], blocks_per_stream=3, options=SessionOptions(language="English"))
    assert result.streams == 4 and result.steps >= 4 * 3
    assert 1.0 <= result.mean_batch < 2.0
    assert 0.0 <= result.latency_p50_sec <= result.latency_p95_sec <= result.latency_max_sec < 1.0
    assert 0.0 < result.busy_fraction < 0.5
    table = format_live_table([result], "cpu")
    assert "| 4 | dynamic | 1 |" in table and "simulated real-time clock" in table


def test_staggered_starts_update_every_other_slot_and_split_host_from_kernels(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR)
    small, large = run_staggered_start_bench(model, [6, 12], blocks_per_stream=10)
    for result in (small, large):
        assert result.steps >= 4 and result.probe_streams > 0
        assert result.streams / 2 - 1 <= result.mean_batch <= result.streams / 2 + 1  # every other slot per step
        assert result.step_mean_sec > 0 and result.probe_kernel_sec > 0 and result.probe_ops > 0
        assert result.python_calls_per_stream > 0
        assert 0 < result.peak_step_bytes and 0 < result.pool_bytes
        assert result.features_sec > 0  # blocks arrive in every measured step
    table = format_staggered_table([small, large], "cpu")
    assert "| 12 |" in table and "host ms/stream" in table and "mean step at N=12 / at N=6" in table


def test_samples_completing_is_the_fewest_samples_with_that_many_frames_complete() -> None:
    for frames in range(0, 600):
        samples = samples_completing(frames)
        assert frames_complete(samples) == frames
        assert frames == 0 or frames_complete(samples - 1) == frames - 1
    assert samples_completing(192) == 192 * HOP_LENGTH + 40  # a 1.92 s block and 40 samples of the next
    assert StreamingLogMel().push(np.full(samples_completing(192), 0.1, np.float32)).shape[0] == 192
