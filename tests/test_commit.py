"""Output-contract policies: stable-prefix commit, append-only emission, word timing, segment rolls.

Every expected value below was worked out by hand from the rules in `pipeline/commit.py`.
"""

from __future__ import annotations

import json

import pytest

from pipeline.commit import (
    CommitOptions,
    SegmentCommitState,
    SegmentOptions,
    SegmentPolicy,
    TranscriptCommitState,
    TranscriptCommitter,
    advance_stable_prefix,
    ends_with_sentence_punctuation,
)


def _words(first: int, last: int) -> str:
    return " ".join(f"w{i}" for i in range(first, last + 1))


def _commits(hypotheses: list[str], options: CommitOptions) -> list[str]:
    """Newly committed words after each hypothesis, joined."""
    state = SegmentCommitState()
    return [" ".join(advance_stable_prefix(state, h.split(), options)) for h in hypotheses]


# --- stable-prefix commit ---------------------------------------------------------------------


def test_hold_back_six_stable_one_commits_agreed_prefix_minus_six() -> None:
    hypotheses = [
        _words(1, 8),  # nothing agreed yet
        _words(1, 10),  # agree 8 -> candidate 2
        _words(1, 12),  # agree 10 -> 4
        _words(1, 12),  # agree 12 -> 6
        _words(1, 5) + " X " + _words(7, 13),  # revises committed w6: no progress
        _words(1, 14),  # agreement with the previous hypothesis stops at 5 -> stays at 6
        _words(1, 16),  # agree 14 -> 8
    ]
    assert _commits(hypotheses, CommitOptions()) == ["", "w1 w2", "w3 w4", "w5 w6", "", "", "w7 w8"]


def test_hold_back_six_stable_two_needs_the_same_candidate_twice() -> None:
    hypotheses = [
        _words(1, 8),  # candidate [] (seen once: nothing to commit)
        _words(1, 10),  # candidate 2, seen once
        _words(1, 11),  # candidate 4, seen once
        _words(1, 11),  # candidate 5, seen once
        _words(1, 12),  # candidate 5, seen twice -> commit
        _words(1, 12),  # candidate 6, seen once
        _words(1, 13),  # candidate 6, seen twice -> commit
    ]
    options = CommitOptions(hold_back_words=6, stable_iterations=2)
    assert _commits(hypotheses, options) == ["", "", "", "", "w1 w2 w3 w4 w5", "", "w6"]


def test_hold_back_two_stable_one_never_retracts() -> None:
    hypotheses = [
        "a b c d e",
        "a b c d e f",  # agree 5 -> 3
        "a b c d x f g",  # agree 4 -> 2, but never below the 3 committed
        "a b c d x f g h",  # agree 7 -> 5
        "a b Q d x f g h",  # revises committed c
        "a b Q d x f g h i",
        "a b c d x f g h i j",  # agrees with the previous hypothesis on 2 words only
        "a b c d x f g h i j k",  # agree 10 -> 8
    ]
    assert _commits(hypotheses, CommitOptions(hold_back_words=2)) == ["", "a b c", "", "d x", "", "", "", "f g h"]


def test_hold_back_two_stable_two() -> None:
    hypotheses = ["a b c", "a b c", "a b c", "a b c d e", "a b c d e", "a b c d e f"]
    options = CommitOptions(hold_back_words=2, stable_iterations=2)
    # h2: agree 3 -> candidate "a" (once); h3: "a" twice -> commit; h4: agree 3 -> "a" again;
    # h5: agree 5 -> "a b c" (once); h6: agree 5 -> "a b c" twice -> commit "b c".
    assert _commits(hypotheses, options) == ["", "", "a", "", "", "b c"]


def test_revision_of_committed_words_resets_the_candidate() -> None:
    options = CommitOptions(hold_back_words=1, stable_iterations=2)
    state = SegmentCommitState()
    for hypothesis in ["a b c", "a b c", "a b c", "a b c d e"]:
        advance_stable_prefix(state, hypothesis.split(), options)
    assert state.committed_words == ["a", "b"]
    assert (state.candidate_words, state.candidate_count) == (["a", "b"], 3)

    assert advance_stable_prefix(state, "a b c d e".split(), options) == []
    assert (state.candidate_words, state.candidate_count) == (["a", "b", "c", "d"], 1)

    assert advance_stable_prefix(state, "a Y c d e f".split(), options) == []
    assert state.committed_words == ["a", "b"]
    assert (state.candidate_words, state.candidate_count) == (["a", "b"], 0)
    assert state.previous_hypothesis_words == "a Y c d e f".split()

    # Agreement restarts from the revised hypothesis, so "a b c d e" (agreed before) is not enough.
    assert advance_stable_prefix(state, "a b c d e f".split(), options) == []
    assert (state.candidate_words, state.candidate_count) == (["a", "b"], 1)
    assert advance_stable_prefix(state, "a b c d e f".split(), options) == []
    assert advance_stable_prefix(state, "a b c d e f g".split(), options) == ["c", "d", "e"]


def test_options_validate() -> None:
    with pytest.raises(ValueError, match="stable_iterations is 0"):
        CommitOptions(stable_iterations=0)
    with pytest.raises(ValueError, match="hold_back_words is -1"):
        CommitOptions(hold_back_words=-1)


def test_commit_lag_matches_the_reference_model() -> None:
    assert CommitOptions().commit_lag_sec(2.0) == pytest.approx(6 / 2.4 + 1.0 + 0.3)  # 3.8 s
    assert CommitOptions(stable_iterations=2).commit_lag_sec(2.0) == pytest.approx(5.8)
    assert CommitOptions(hold_back_words=2).commit_lag_sec(2.0) == pytest.approx(2 / 2.4 + 1.3)
    assert CommitOptions(commit_lag_override_sec=1.5).commit_lag_sec(2.0) == 1.5


# --- whole stream: segments and append-only emission ------------------------------------------


def _texts(words) -> str:
    return " ".join(word.text for word in words)


def test_segments_finalize_and_emission_is_by_index() -> None:
    committer = TranscriptCommitter(CommitOptions(hold_back_words=2, commit_lag_override_sec=1.0))

    # Segment 1: commits "a b c"; its final text agrees with them and adds four words.
    assert _texts(committer.update("a b c d e", 2.0).new_words) == ""
    update = committer.update("a b c d e f", 4.0)
    assert _texts(update.new_words) == "a b c"
    assert update.tentative_text == "d e f"
    assert update.global_hypothesis == "a b c d e f"
    assert _texts(committer.update("a b c D e f g.", 6.0).new_words) == ""
    assert _texts(committer.finalize_segment(6.0)) == "D e f g."
    assert committer.state.dropped_revisions == 0

    # Segment 2: commits "h i"; the final text revises "i" -> "I": dropped, the rest is emitted.
    assert committer.update("h i j k", 8.0).global_hypothesis == "a b c D e f g. h i j k"
    assert _texts(committer.update("h i j k l", 10.0).new_words) == "h i"
    assert committer.committed_text == "a b c D e f g. h i"
    update = committer.update("h I j k l m", 12.0)
    assert (_texts(update.new_words), update.tentative_text) == ("", "j k l m")
    assert _texts(committer.finalize_segment(12.0)) == "j k l m"
    assert (committer.state.dropped_revisions, committer.state.dropped_revision_words) == (1, 1)

    # Segment 3: commits "n o", then its final text shrinks to "n": the emitted "o" stays.
    committer.update("n o p q", 14.0)
    assert _texts(committer.update("n o p q r", 16.0).new_words) == "n o"
    committer.update("n", 18.0)
    assert committer.finalize_segment(18.0) == ()
    assert (committer.state.dropped_revisions, committer.state.dropped_revision_words) == (2, 2)

    # Segment 4: by index, the first committed word "s" lands on the position "o" already holds.
    committer.update("s t u v", 20.0)
    assert _texts(committer.update("s t u v w", 22.0).new_words) == "t"
    assert _texts(committer.finish(24.0)) == "u v w"
    assert (committer.state.dropped_revisions, committer.state.dropped_revision_words) == (3, 3)

    assert committer.transcript == "a b c D e f g. h I j k l m n s t u v w"
    assert committer.emitted_text == "a b c D e f g. h i j k l m n o t u v w"


def test_word_times_are_interpolated_after_the_commit_lag() -> None:
    committer = TranscriptCommitter(
        CommitOptions(hold_back_words=0, commit_lag_override_sec=2.0, min_word_sec=0.25)
    )
    committer.update("a b", 4.0)
    words = committer.update("a b", 5.0).new_words  # spread over [0, 5 - 2]
    assert [(w.text, w.start_sec, w.end_sec, w.committed_at_sec) for w in words] == [
        ("a", 0.0, 1.5, 5.0),
        ("b", 1.5, 3.0, 5.0),
    ]
    committer.update("a b c d", 5.5)
    words = committer.update("a b c d", 6.0).new_words  # [3, 4]
    assert [(w.start_sec, w.end_sec) for w in words] == [(3.0, 3.5), (3.5, 4.0)]

    # Four words after 4.0 but only 0.5 s to the lagged time: each still gets 0.25 s.
    committer.update("a b c d e f g h", 6.0)
    words = committer.update("a b c d e f g h", 6.5).new_words
    assert [(w.start_sec, w.end_sec) for w in words] == [(4.0, 4.25), (4.25, 4.5), (4.5, 4.75), (4.75, 5.0)]

    # Sixteen words would need 4 s from 5.0, but no word may end after the audio heard (7.0).
    long_hypothesis = "a b c d e f g h " + _words(1, 16)
    committer.update(long_hypothesis, 6.5)
    words = committer.update(long_hypothesis, 7.0).new_words
    assert len(words) == 16
    assert [w.end_sec for w in words] == [5.0 + 0.125 * (i + 1) for i in range(16)]

    # End of stream: no lag, the remainder is timed up to the end of the audio.
    committer.update(long_hypothesis + " y z", 7.5)
    words = committer.finish(8.0)
    assert [(w.text, w.start_sec, w.end_sec, w.committed_at_sec) for w in words] == [
        ("y", 7.0, 7.5, 8.0),
        ("z", 7.5, 8.0, 8.0),
    ]


def test_audio_time_must_not_go_backwards() -> None:
    committer = TranscriptCommitter()
    committer.update("a", 3.0)
    with pytest.raises(ValueError, match="audio_sec is 2.0; expected >= 3.0"):
        committer.update("a", 2.0)


def test_state_round_trip_mid_stream_continues_identically() -> None:
    options = CommitOptions(hold_back_words=2, stable_iterations=2, commit_lag_override_sec=1.0)
    first_half = [
        ("a b c d", 2.0),
        ("a b c d e", 4.0),
        ("a b c d e f", 6.0),
        ("roll", 6.0),
        ("g h i j", 8.0),
        ("g h i j k", 10.0),
    ]
    second_half = [("g h i j", 12.0), ("g H i j k l m", 14.0), ("g h i j k l m n", 16.0)]

    def run(committer: TranscriptCommitter, calls) -> list:
        outputs = []
        for text, audio_sec in calls:
            if text == "roll":
                outputs.append(committer.finalize_segment(audio_sec))
            else:
                outputs.append(committer.update(text, audio_sec))
        return outputs

    original = TranscriptCommitter(options)
    run(original, first_half)
    # Mid-agreement: "g h" seen once; the next hypothesis confirms it only if the count survives.
    assert (original.state.segment.candidate_words, original.state.segment.candidate_count) == (["g", "h"], 1)
    payload = json.loads(json.dumps(original.state.to_dict()))
    resumed = TranscriptCommitter(options, TranscriptCommitState.from_dict(payload))

    expected = run(original, second_half) + [original.finish(17.0)]
    assert run(resumed, second_half) + [resumed.finish(17.0)] == expected
    assert resumed.state == original.state
    assert _texts(expected[0].new_words) == "g h"
    assert _texts(expected[-1]) == "i j k l m n"


def test_state_from_dict_rejects_bad_payloads() -> None:
    payload = TranscriptCommitState().to_dict()
    del payload["emitted_words"]
    with pytest.raises(ValueError, match=r"missing \['emitted_words'\]"):
        TranscriptCommitState.from_dict(payload)
    payload = TranscriptCommitState().to_dict()
    payload["segment"]["committed_words"] = ["a", 3]
    with pytest.raises(ValueError, match="segment.committed_words is"):
        TranscriptCommitState.from_dict(payload)
    payload = TranscriptCommitState().to_dict()
    payload["dropped_revisions"] = -1
    with pytest.raises(ValueError, match="dropped_revisions is -1"):
        TranscriptCommitState.from_dict(payload)


# --- segment policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello.", True),
        ('done!")', True),
        ("etc", False),
        ("Really?  ", True),
        ("(He said 'no.')", True),
        ("wait...", True),
        ("pi is 3.14", False),
        ("", False),
        ('"")', False),
    ],
)
def test_ends_with_sentence_punctuation(text: str, expected: bool) -> None:
    assert ends_with_sentence_punctuation(text) is expected


def test_punctuation_roll_needs_150_steps() -> None:
    policy = SegmentPolicy()
    assert policy.should_roll_after(149, "Hello.") is None
    assert policy.should_roll_after(150, "Hello.") is True
    assert policy.should_roll_after(150, "etc") is None
    assert policy.should_roll_after(200, "etc") is None
    assert policy.should_roll_after(201, "etc") is True


def test_roll_before_an_update_that_would_pass_200_steps() -> None:
    policy = SegmentPolicy()
    assert policy.should_roll_before(176, 24) is None  # exactly 200: allowed
    assert policy.should_roll_before(177, 24) is True
    assert policy.should_roll_before(0, 250) is None  # an empty segment cannot roll
    assert SegmentPolicy(SegmentOptions(roll_before_generate=False)).should_roll_before(177, 24) is None
    with pytest.raises(ValueError, match="incoming_steps is -1"):
        policy.should_roll_before(10, -1)


def test_segment_options_validate() -> None:
    with pytest.raises(ValueError, match="segment_punct_min_steps is 300"):
        SegmentOptions(segment_punct_min_steps=300)
