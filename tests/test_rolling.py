"""Rolling decoder updates: speculative re-decoding is lossless, and batching streams changes nothing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_model
from pipeline.decoding import DecodeControls, DecodeOptions
from pipeline.prompt import build_causal_prompt
from pipeline.rolling import RollingDecoder, decode_from_scratch


@pytest.fixture(scope="module")
def parts(tiny_checkpoint: Path):
    model = load_model(tiny_checkpoint, tower=None)
    prompt = build_causal_prompt(model.tokenizer, language="English")
    controls = DecodeControls(replace(DecodeOptions.causal(prompt.special), max_new_tokens=40))
    return model, prompt, controls


def _audio_updates(seed: int, hidden: int, scale: float) -> list[torch.Tensor]:
    """A stream's audio deltas: mostly 24-step blocks, some empty or short (a flush), small magnitude so
    consecutive hypotheses share prefixes and drafts are partly accepted."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [24, 24, 0, 24, 12, 24, 24, 5][: 4 + seed % 5]
    return [scale * torch.randn(size, hidden, generator=generator) for size in sizes]


@pytest.mark.parametrize("seed", range(6))
def test_speculative_rolling_equals_greedy_from_a_fresh_prefill(parts, seed: int) -> None:
    model, prompt, controls = parts
    rolling = RollingDecoder(model.text_decoder, prompt, controls, speculative=True)
    state = rolling.new_state()
    seen = []
    accepted = drafted = 0
    for delta in _audio_updates(seed, model.config.text.hidden_size, scale=0.05 + 0.1 * (seed % 3)):
        seen.append(delta)
        result = rolling.update([state], [delta])[0]
        expected = list(decode_from_scratch(model.text_decoder, prompt, torch.cat(seen), controls).tokens)
        assert list(result.tokens) == expected
        # Between updates the cache holds exactly [head + all audio so far].
        assert state.cache.length == len(prompt.head_ids) + sum(d.shape[0] for d in seen)
        accepted += result.stats.draft_accepted
        drafted += result.stats.draft_tokens
        assert result.stats.positions_forwarded == (
            delta.shape[0] + len(prompt.tail_ids) + result.stats.draft_tokens + result.stats.decode_steps
            + (len(prompt.head_ids) if len(seen) == 1 else 0)
        )
    assert drafted > 0


def test_drafts_are_accepted_when_the_audio_barely_changes(parts) -> None:
    """An update with no new audio must accept the whole previous hypothesis and stop right after it."""
    model, prompt, controls = parts
    rolling = RollingDecoder(model.text_decoder, prompt, controls)
    state = rolling.new_state()
    audio = 0.1 * torch.randn(24, model.config.text.hidden_size, generator=torch.Generator().manual_seed(0))
    first = rolling.update([state], [audio])[0]
    again = rolling.update([state], [torch.zeros(0, model.config.text.hidden_size)])[0]
    assert again.tokens == first.tokens
    assert again.stats.draft_accepted == again.stats.draft_tokens == len(first.tokens)
    assert again.stats.decode_steps <= 1


@pytest.mark.parametrize("chunk_bytes", [2**30, 1], ids=["one-chunk", "chunked"])
def test_batched_streams_equal_each_stream_alone(parts, chunk_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also with verification split into the smallest chunks of logit rows (as large as the output matrix; a
    stream never splits) and every other batch-wide intermediate in chunks of one row."""
    monkeypatch.setattr("pipeline.row_chunks.CHUNK_BYTES", chunk_bytes)
    model, prompt, controls = parts
    rolling = RollingDecoder(model.text_decoder, prompt, controls)
    streams = [_audio_updates(seed, model.config.text.hidden_size, 0.1) for seed in (1, 2, 3)]
    alone = []
    for updates in streams:
        state = rolling.new_state()
        alone.append([rolling.update([state], [delta])[0].tokens for delta in updates])
    states = [rolling.new_state() for _ in streams]
    together: list[list[tuple[int, ...]]] = [[] for _ in streams]
    # Streams start at different times and have different lengths: batch whoever has an update.
    for step in range(max(len(u) for u in streams) + 2):
        ready = [i for i, updates in enumerate(streams) if 0 <= step - i < len(updates)]
        if not ready:
            continue
        results = rolling.update([states[i] for i in ready], [streams[i][step - i] for i in ready])
        for i, result in zip(ready, results):
            together[i].append(result.tokens)
    assert together == alone


def test_non_speculative_mode_forwards_no_draft(parts) -> None:
    model, prompt, controls = parts
    rolling = RollingDecoder(model.text_decoder, prompt, controls, speculative=False)
    state = rolling.new_state()
    for delta in _audio_updates(0, model.config.text.hidden_size, 0.1):
        assert rolling.update([state], [delta])[0].stats.draft_tokens == 0


def test_mismatched_batch_is_refused(parts) -> None:
    model, prompt, controls = parts
    rolling = RollingDecoder(model.text_decoder, prompt, controls)
    with pytest.raises(ValueError, match="2 decoder states but 1 audio deltas"):
        rolling.update([rolling.new_state(), rolling.new_state()], [torch.zeros(1, model.config.text.hidden_size)])


@pytest.mark.parametrize("agree", [0, 1, 7, 20])
def test_draft_diverging_mid_way_is_corrected_and_continued(parts, agree: int) -> None:
    """A draft that agrees with greedy decoding for `agree` tokens then goes wrong: exactly `agree` tokens are
    accepted, the pick at the divergence replaces the draft's token, and greedy decoding continues from there."""
    model, prompt, controls = parts
    hidden = model.config.text.hidden_size
    generator = torch.Generator().manual_seed(agree)
    first, second = (0.1 * torch.randn(24, hidden, generator=generator) for _ in range(2))
    expected = list(decode_from_scratch(model.text_decoder, prompt, torch.cat([first, second]), controls).tokens)
    assert len(expected) > agree
    rolling = RollingDecoder(model.text_decoder, prompt, controls)
    state = rolling.new_state()
    rolling.update([state], [first])
    wrong = next(t for t in range(100, 200) if t != expected[agree])
    state.hypothesis = expected[:agree] + [wrong] + expected[agree + 1 :]
    result = rolling.update([state], [second])[0]
    assert list(result.tokens) == expected
    assert result.stats.draft_accepted == agree
    assert result.stats.decode_steps == len(expected) - agree - 1 + (len(expected) < controls.options.max_new_tokens)
