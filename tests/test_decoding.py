"""Decode controls: each filter by hand and against transformers' processors, their chain, stops,
and draft verification (by hand, and as a property: any draft gives the sequential greedy tokens)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from pipeline.decoding import (
    DecodeControls,
    DecodeOptions,
    NoRepeatNGram,
    Pick,
    RepetitionPenalty,
    SuppressTokens,
    TokenHistories,
    Verdict,
)
from pipeline.prompt import SpecialTokenIds
from tests.decoding_reference import banned_ngram_followers

INF = float("inf")
NO_FILTERS = DecodeOptions(repetition_penalty=1.0, no_repeat_ngram_size=0)


def applied(logit_filter, logits: list[list[float]], histories: list[list[int]]) -> torch.Tensor:
    """The filter on a batch: scores with the sink column, histories as padded ids; the real columns after."""
    vocab = len(logits[0])
    scores = torch.cat([torch.tensor(logits), torch.zeros(len(logits), 1)], dim=1)
    logit_filter.apply(scores, TokenHistories.of(histories, vocab, torch.device("cpu")))
    return scores[:, :vocab]


def test_suppress_tokens() -> None:
    out = applied(SuppressTokens([1, 2]), [[1.0, 5.0, 2.0, 3.0], [0.0, 1.0, 9.0, 2.0]], [[], [3]])
    assert torch.equal(out, torch.tensor([[1.0, -INF, -INF, 3.0], [0.0, -INF, -INF, 2.0]]))


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    out = applied(RepetitionPenalty(2.0), [[2.0, -1.0, 0.5, 4.0], [2.0, -1.0, 0.5, 4.0]], [[0, 1, 1], []])
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 4.0], [2.0, -1.0, 0.5, 4.0]]))
    out = applied(RepetitionPenalty(1.15), [[2.3, -1.0, -INF]], [[0, 1, 2]])
    assert torch.allclose(out[0, :2], torch.tensor([2.0, -1.15])) and out[0, 2] == -INF


@pytest.mark.parametrize(
    ("size", "history", "banned"),
    [
        (3, [1, 2, 3, 1, 2, 4, 1, 2], {3, 4}),
        (3, [5, 6, 7, 5, 6], {7}),
        (3, [5, 6], set()),
        (3, [5], set()),
        (3, [], set()),
        (2, [1, 2, 1], {2}),
        (1, [4, 4, 7], {4, 7}),
    ],
)
def test_no_repeat_ngram_bans(size: int, history: list[int], banned: set[int]) -> None:
    assert banned_ngram_followers(history, size) == banned
    out = applied(NoRepeatNGram(size), [[1.0] * 8], [history])
    assert {i for i in range(8) if out[0, i] == -INF} == banned


@pytest.mark.parametrize("seed", range(5))
def test_penalty_and_ngram_match_transformers_processors(seed: int) -> None:
    """Same semantics as transformers when the processor's input_ids are exactly the history."""
    generator = torch.Generator().manual_seed(seed)
    histories = torch.randint(0, 6, (4, 12), generator=generator)  # small vocab: many repeats
    logits = torch.randn(4, 10, generator=generator) * 3
    for ours, theirs in (
        (RepetitionPenalty(1.15), RepetitionPenaltyLogitsProcessor(1.15)),
        (NoRepeatNGram(3), NoRepeatNGramLogitsProcessor(3)),
    ):
        expected = theirs(histories, logits.clone())
        assert torch.equal(applied(ours, logits.tolist(), histories.tolist()), expected)


def test_chain_order_and_each_filter_matters() -> None:
    """suppress -> penalty -> n-gram -> argmax; removing any filter changes this pick."""
    logits = torch.tensor([[3.0, 2.0, 9.0, -0.5, 0.2, 10.0]])
    history = [[0, 2, 0]]
    # id 5: suppressed. id 2: 9.0 / 2 = 4.5 would win, but (0, 2) already occurred -> banned.
    # id 0: 3.0 / 2 = 1.5 after the penalty, so id 1 (2.0, never generated) wins.
    options = DecodeOptions(suppress_token_ids=(5,), repetition_penalty=2.0, no_repeat_ngram_size=2)
    controls = DecodeControls(options)
    assert [type(f) for f in controls.filters] == [SuppressTokens, RepetitionPenalty, NoRepeatNGram]
    assert _tokens(controls.pick(logits, history)) == [1]
    without = {
        "suppress": DecodeOptions(repetition_penalty=2.0, no_repeat_ngram_size=2),
        "penalty": DecodeOptions(suppress_token_ids=(5,), repetition_penalty=1.0, no_repeat_ngram_size=2),
        "ngram": DecodeOptions(suppress_token_ids=(5,), repetition_penalty=2.0, no_repeat_ngram_size=0),
    }
    assert {name: DecodeControls(o).pick(logits, history)[0].token for name, o in without.items()} == {
        "suppress": 5,
        "penalty": 0,
        "ngram": 2,
    }
    assert torch.equal(logits, torch.tensor([[3.0, 2.0, 9.0, -0.5, 0.2, 10.0]]))  # input untouched


def test_rows_use_their_own_histories() -> None:
    controls = DecodeControls(DecodeOptions(no_repeat_ngram_size=0))
    logits = torch.tensor([[2.0, 1.9], [2.0, 1.9], [2.0, 1.9]])
    # 2.0 / 1.15 = 1.739 < 1.9 once id 0 was generated.
    assert _tokens(controls.pick(logits, [[0], [1], []])) == [1, 0, 0]
    with pytest.raises(ValueError, match=r"expected \[2, vocab\]"):
        controls.pick(logits, [[0], [1]])


def test_causal_defaults_from_prompt_ids() -> None:
    special = SpecialTokenIds(
        end_of_text=10, im_start=11, im_end=12, audio_start=13, audio_end=14, audio_pad=15, asr_text=16
    )
    options = DecodeOptions.causal(special)
    assert set(options.suppress_token_ids) == {13, 15, 14, 11}
    assert options.stop_token_ids == (12,)  # not <|endoftext|>
    assert (options.repetition_penalty, options.no_repeat_ngram_size, options.max_new_tokens) == (1.15, 3, 256)


def test_invalid_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_new_tokens is 0"):
        DecodeOptions(max_new_tokens=0)
    with pytest.raises(ValueError, match="repetition_penalty is 0"):
        DecodeOptions(repetition_penalty=0)


def test_stops_budget_and_draft_trimming() -> None:
    controls = DecodeControls(DecodeOptions(stop_token_ids=(0,), max_new_tokens=4))
    assert controls.is_stop(0) and not controls.is_stop(1)
    assert controls.continues(3, 1)
    assert not controls.continues(3, 0)  # a stop is never appended
    assert not controls.continues(4, 1)  # budget spent
    assert controls.trim_draft([5, 6, 0, 7]) == [5, 6]
    assert controls.trim_draft([5, 6, 7, 8, 9]) == [5, 6, 7, 8]
    assert controls.trim_draft([5, 6, 7], history_length=2) == [5, 6]


def rows_favouring(tokens: Sequence[int], vocab: int = 6, runner_up: int = 3) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    logits[:, runner_up] = 1.0
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 2.0
    return logits


@pytest.mark.parametrize(
    ("row_picks", "draft", "expected"),
    [
        ([2, 4, 5], [2, 4], (2, 5)),  # full accept, then the continuation
        ([1, 4, 5], [2, 4], (0, 1)),  # reject at 0
        ([2, 5, 1], [2, 4], (1, 5)),  # reject in the middle: the correction
        ([1], [], (0, 1)),  # empty draft: one plain greedy step
    ],
)
def test_verify_a_single_draft(row_picks: list[int], draft: list[int], expected: tuple[int, int]) -> None:
    controls = DecodeControls(NO_FILTERS)
    assert _verdicts(controls.verify_drafts(rows_favouring(row_picks), [draft])) == [expected]


def test_verify_stops_at_a_stop_even_when_the_draft_agrees() -> None:
    controls = DecodeControls(DecodeOptions(stop_token_ids=(0,), repetition_penalty=1.0, no_repeat_ngram_size=0))
    assert _verdicts(controls.verify_drafts(rows_favouring([2, 0, 4, 5]), [[2, 0, 4]])) == [(1, 0)]


def test_verify_row_j_sees_history_plus_draft_prefix() -> None:
    controls = DecodeControls(DecodeOptions(repetition_penalty=1.0, no_repeat_ngram_size=2))
    # History [4], draft [1, 2, 1, 2]: rows 0-2 agree; row 3 continues [4, 1, 2, 1], where the
    # bigram (1, 2) already occurred, so 2 is banned and the runner-up 3 is the correction.
    logits = rows_favouring([1, 2, 1, 2, 5])
    assert _verdicts(controls.verify_drafts(logits, [[1, 2, 1, 2]], [[4]])) == [(3, 3)]
    with pytest.raises(ValueError, match="expected sum\\(len\\(draft\\) \\+ 1\\) = 5"):
        controls.verify_drafts(logits[:4], [[1, 2, 1, 2]])
    small_budget = DecodeControls(DecodeOptions(max_new_tokens=3))
    with pytest.raises(ValueError, match="trim the draft"):
        small_budget.verify_drafts(logits, [[1, 2, 1, 2]])


def test_batched_verification_equals_one_stream_at_a_time() -> None:
    """Drafts of several streams (with their own histories) checked in one call give each stream's own verdict."""
    controls = DecodeControls(DecodeOptions(stop_token_ids=(0,), repetition_penalty=1.3, no_repeat_ngram_size=2))
    generator = torch.Generator().manual_seed(5)
    drafts = [[1, 2, 1, 2], [], [3, 3, 4], [2, 0, 4]]
    histories = [[4], [1, 2], [], [5]]
    per_stream = [torch.randn(len(draft) + 1, 8, generator=generator) for draft in drafts]
    for logits, draft in zip(per_stream, drafts):  # make most of each draft the favourite, so verdicts vary
        for j, token in enumerate(draft[:-1]):
            logits[j, token] += 4.0
    expected = [controls.verify_drafts(l, [d], [h])[0] for l, d, h in zip(per_stream, drafts, histories)]
    batched = controls.verify_drafts(torch.cat(per_stream), drafts, histories)
    assert _verdicts(batched) == _verdicts(expected)
    for together, alone in zip(batched, expected):
        assert together.logprobs == pytest.approx(alone.logprobs, abs=1e-6)
    assert len({verdict[0] for verdict in expected}) > 1
    with pytest.raises(ValueError, match="expected sum\\(len\\(draft\\) \\+ 1\\) = 14"):
        controls.verify_drafts(torch.cat(per_stream)[:-1], drafts, histories)


# --- property: speculative == sequential -------------------------------------------------------

VOCAB, STOP, SUPPRESSED = 8, 0, 1
PROPERTY_OPTIONS = DecodeOptions(suppress_token_ids=(SUPPRESSED,), max_new_tokens=12, stop_token_ids=(STOP,))


def fake_model(seed: int) -> Callable[[Sequence[int]], torch.Tensor]:
    """A deterministic 'language model': history -> next-token logits [VOCAB].

    Markov in the last token (so greedy loops appear and the penalty and n-gram ban fire), with a
    length-dependent term and a stop logit that grows with length.
    """
    generator = torch.Generator().manual_seed(seed)
    transitions = torch.randn(VOCAB + 1, VOCAB, generator=generator) * 2  # row VOCAB: empty history
    by_length = torch.randn(3, VOCAB, generator=generator) * 0.5

    def logits(history: Sequence[int]) -> torch.Tensor:
        row = transitions[history[-1] if history else VOCAB] + by_length[len(history) % 3]
        row[STOP] += 0.5 * len(history) - 4.0
        return row

    return logits


def sequential_greedy(model: Callable, controls: DecodeControls) -> list[int]:
    hypothesis: list[int] = []
    token = controls.pick(model(hypothesis)[None], [hypothesis])[0].token
    while controls.continues(len(hypothesis), token):
        hypothesis.append(token)
        token = controls.pick(model(hypothesis)[None], [hypothesis])[0].token
    return hypothesis


def speculative_greedy(model: Callable, controls: DecodeControls, draft: Sequence[int]) -> list[int]:
    """Verify the draft against one 'parallel pass', then continue greedily from the correction."""
    draft = controls.trim_draft(draft)
    logits = torch.stack([model(draft[:j]) for j in range(len(draft) + 1)])
    [(accepted, token, _)] = controls.verify_drafts(logits, [draft])
    hypothesis = list(draft[:accepted])
    while controls.continues(len(hypothesis), token):
        hypothesis.append(token)
        token = controls.pick(model(hypothesis)[None], [hypothesis])[0].token
    return hypothesis


def random_drafts(expected: list[int], generator: torch.Generator, count: int) -> list[list[int]]:
    """Random token lists of 0-16 ids; every other one starts with a prefix of the true output
    (the steady state, where the previous hypothesis mostly agrees)."""
    drafts = []
    for index in range(count):
        length = int(torch.randint(0, 17, (1,), generator=generator))
        draft = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        if index % 2:
            keep = int(torch.randint(0, len(expected) + 1, (1,), generator=generator))
            draft = expected[:keep] + draft[keep:]
        drafts.append(draft)
    return drafts + [expected, expected + [STOP], []]


@pytest.mark.parametrize("seed", range(40))
def test_verify_with_any_draft_equals_sequential_greedy(seed: int) -> None:
    controls = DecodeControls(PROPERTY_OPTIONS)
    model = fake_model(seed)
    expected = sequential_greedy(model, controls)
    for draft in random_drafts(expected, torch.Generator().manual_seed(seed), count=12):
        assert speculative_greedy(model, controls, draft) == expected, f"draft {draft}"


def test_batched_decoding_across_streams_equals_each_alone() -> None:
    controls = DecodeControls(PROPERTY_OPTIONS)
    models = [fake_model(seed) for seed in (1, 2, 3)]
    hypotheses: list[list[int]] = [[] for _ in models]
    active = list(range(len(models)))
    while active:
        picks = controls.pick(torch.stack([models[s](hypotheses[s]) for s in active]), [hypotheses[s] for s in active])
        for stream, (token, _) in zip(list(active), picks):
            if controls.continues(len(hypotheses[stream]), token):
                hypotheses[stream].append(token)
            else:
                active.remove(stream)
    assert hypotheses == [sequential_greedy(model, controls) for model in models]
    assert len({len(h) for h in hypotheses}) == 3  # the streams finish at different steps


# --- property: the batched filters equal the per-row reference and transformers' processors ---------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.decoding_reference import reference_pick, reference_verify  # noqa: E402

SMALL_VOCAB = 7  # few ids: repeats, n-gram hits and ties everywhere


def _rows(draw, count: int, vocab: int) -> torch.Tensor:
    values = draw(st.lists(st.sampled_from([-3.0, -1.5, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0]), min_size=count * vocab,
                           max_size=count * vocab))
    return torch.tensor(values).view(count, vocab)


@st.composite
def batches(draw, max_rows: int = 5, max_history: int = 14):
    """Logit rows over a small vocabulary, each with its own (ragged) history, and decode options."""
    count = draw(st.integers(1, max_rows))
    histories = [draw(st.lists(st.integers(0, SMALL_VOCAB - 1), max_size=max_history)) for _ in range(count)]
    options = DecodeOptions(
        suppress_token_ids=tuple(draw(st.sets(st.integers(0, SMALL_VOCAB - 1), max_size=2))),
        repetition_penalty=draw(st.sampled_from([1.0, 1.15, 2.0, 0.7])),
        no_repeat_ngram_size=draw(st.integers(0, 4)),
        stop_token_ids=(0,),
        max_new_tokens=64,
    )
    return _rows(draw, count, SMALL_VOCAB), histories, options


@settings(max_examples=300, deadline=None)
@given(batches())
def test_batched_pick_equals_the_per_row_reference(batch) -> None:
    logits, histories, options = batch
    assert _tokens(DecodeControls(options).pick(logits, histories)) == reference_pick(options, logits, histories)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 4), st.integers(0, 12), st.sampled_from([1.15, 2.0, 0.5]), st.integers(1, 4))
def test_batched_filters_equal_transformers_processors(data, rows: int, length: int, penalty: float, size: int) -> None:
    """transformers' processors take equal-length input_ids: each row's history is all of its ids."""
    ids = torch.tensor(
        [data.draw(st.lists(st.integers(0, SMALL_VOCAB - 1), min_size=length, max_size=length)) for _ in range(rows)]
    ).view(rows, length)
    logits = _rows(data.draw, rows, SMALL_VOCAB)
    histories = ids.tolist()
    for ours, theirs in (
        (RepetitionPenalty(penalty), RepetitionPenaltyLogitsProcessor(penalty)),
        (NoRepeatNGram(size), NoRepeatNGramLogitsProcessor(size)),
    ):
        assert torch.equal(applied(ours, logits.tolist(), histories), theirs(ids, logits.clone()))


@st.composite
def verification_batches(draw):
    """Several streams' histories and drafts (often agreeing with the favourite picks) and their pass logits."""
    _, _, options = draw(batches(max_rows=1))
    streams = draw(st.integers(1, 4))
    histories = [draw(st.lists(st.integers(0, SMALL_VOCAB - 1), max_size=6)) for _ in range(streams)]
    drafts = [draw(st.lists(st.integers(0, SMALL_VOCAB - 1), max_size=10)) for _ in range(streams)]
    logits = _rows(draw, sum(len(draft) + 1 for draft in drafts), SMALL_VOCAB)
    row = 0
    for draft in drafts:  # make the draft the favourite of most of its rows, so acceptance runs deep
        for token in draft:
            if draw(st.booleans()) or draw(st.booleans()):
                logits[row, token] += 5.0
            row += 1
        row += 1
    return logits, drafts, histories, options


@settings(max_examples=300, deadline=None)
@given(verification_batches())
def test_batched_verification_equals_the_per_row_reference(batch) -> None:
    logits, drafts, histories, options = batch
    verdicts = DecodeControls(options).verify_drafts(logits, drafts, histories)
    assert _verdicts(verdicts) == reference_verify(options, logits, drafts, histories)


def _tokens(picks: Sequence[Pick]) -> list[int]:
    return [pick.token for pick in picks]


def _verdicts(verdicts: Sequence[Verdict]) -> list[tuple[int, int]]:
    return [(verdict.accepted, verdict.next_token) for verdict in verdicts]


def test_picks_and_verdicts_carry_the_raw_log_probabilities() -> None:
    """A pick's log-probability is under the model's raw logits (not the filtered ones); a verdict's are those of
    its accepted draft tokens and its next token, equal to what sequential picks give."""
    controls = DecodeControls(DecodeOptions(repetition_penalty=1.3, no_repeat_ngram_size=2, stop_token_ids=(0,)))
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(3))
    (pick,) = controls.pick(logits, [[2, 2]])
    assert pick.logprob == pytest.approx(torch.log_softmax(logits[0], -1)[pick.token].item(), abs=1e-6)
    model = fake_model(4)
    draft = sequential_greedy(model, DecodeControls(PROPERTY_OPTIONS))[:5]
    rows = torch.stack([model(draft[:j]) for j in range(len(draft) + 1)])
    (verdict,) = DecodeControls(PROPERTY_OPTIONS).verify_drafts(rows, [draft])
    sequential = [DecodeControls(PROPERTY_OPTIONS).pick(model(draft[:j])[None], [draft[:j]])[0].logprob
                  for j in range(verdict.accepted + 1)]  # fmt: skip
    assert verdict.accepted == len(draft) and verdict.logprobs == pytest.approx(sequential, abs=1e-6)
