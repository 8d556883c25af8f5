"""Streaming WER harness scoring: every expected value below is worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.commit import CommittedWord
from pipeline.scoring import (
    AlignedWord,
    HypothesisEvent,
    ManifestEntry,
    ManifestError,
    StreamOutput,
    WordErrors,
    cut_live_tail,
    format_report,
    hypothesis_word_end_times,
    percentile,
    read_manifest,
    score_file,
    simulate_real_streaming,
    summarize,
    summarize_wer,
    word_errors,
)

# "the cat sat on the mat today", with a pause before "today".
ALIGNMENTS = tuple(
    AlignedWord(word, start, end)
    for word, start, end in [
        ("the", 0.0, 0.25),
        ("cat", 0.25, 0.5),
        ("sat", 0.5, 1.0),
        ("on", 1.0, 1.25),
        ("the", 1.25, 1.5),
        ("mat", 1.5, 2.0),
        ("today", 2.25, 2.75),
    ]
)


# --- word error rate --------------------------------------------------------------------------


def test_word_errors_counts_substitutions_deletions_insertions() -> None:
    assert word_errors("the cat sat on the mat", "the cat sat on a mat") == WordErrors(1, 6)
    assert word_errors("the cat sat on the mat", "the cat sat on the big red mat") == WordErrors(2, 6)
    assert word_errors("hello world", "") == WordErrors(2, 2)
    assert word_errors("hello world", "").rate == 1.0


def test_whisper_normalizer_is_applied() -> None:
    # Case, punctuation, "Mr." -> "mister" and "two" -> "2": no errors left.
    assert word_errors("Mister Smith has two cats.", "mr smith has 2 Cats") == WordErrors(0, 5)
    # "Smith's" becomes "smith is": one substitution against "has".
    assert word_errors("Mister Smith has two cats.", "Mr. Smith's 2 cats").errors == 1


def test_empty_reference_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty after normalization"):
        word_errors("Um, hmm.", "hello")  # fillers only


def test_macro_and_corpus_aggregation_differ() -> None:
    short_file = WordErrors(errors=1, reference_words=2)  # 50 %
    long_file = WordErrors(errors=1, reference_words=6)  # 16.7 %
    summary = summarize_wer([short_file, long_file])
    assert summary.macro == pytest.approx((1 / 2 + 1 / 6) / 2)  # 1/3
    assert summary.corpus == pytest.approx(2 / 8)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([4.0, 1.0, 3.0, 2.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 95, 3.85),  # rank 2.85: 3 + 0.85 * (4 - 3)
        ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
        ([4.0, 1.0, 3.0, 2.0], 100, 4.0),
        ([7.0], 95, 7.0),
        ([0.25, 1.0, 1.5, 1.5, 1.75, 1.75, 2.0], 95, 1.925),  # rank 5.7
    ],
)
def test_percentile_interpolates_between_ranks(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q is 101"):
        percentile([1.0], 101)


# --- word timing from alignments and the live-tail cut ----------------------------------------


def test_hypothesis_words_take_their_reference_slot_times() -> None:
    # "a" replaces "the" one-to-one; punctuation and case do not stop a match.
    ends = hypothesis_word_end_times("The cat sat on a mat today.".split(), ALIGNMENTS)
    assert ends == [0.25, 0.5, 1.0, 1.25, 1.5, 2.0, 2.75]
    # Equal-length replacements pair up word by word, not spread evenly.
    assert hypothesis_word_end_times("the bat hat on".split(), ALIGNMENTS[:4]) == [0.25, 0.5, 1.0, 1.25]


def test_unequal_replacement_is_spread_over_the_reference_span() -> None:
    # "sat" (0.5-1.0) heard as "sit down": two words share its span.
    ends = hypothesis_word_end_times("the cat sit down on".split(), ALIGNMENTS[:4])
    assert ends == [0.25, 0.5, 0.75, 1.0, 1.25]


def test_insertions_are_interpolated_between_neighbours() -> None:
    # Two extra words between "mat" (ends 2.0) and "today" (starts 2.25).
    ends = hypothesis_word_end_times("the cat sat on the mat oh well today".split(), ALIGNMENTS)
    assert ends == pytest.approx([0.25, 0.5, 1.0, 1.25, 1.5, 2.0, 2.125, 2.25, 2.75])
    # Overlapping neighbours leave no gap: insertions end where the previous word ends.
    overlapping = [AlignedWord("a", 0.0, 1.0), AlignedWord("b", 0.75, 1.5)]
    assert hypothesis_word_end_times("a x b".split(), overlapping) == [1.0, 1.0, 1.5]
    # Past the last reference word: 0.2 s per word after its end.
    ends = hypothesis_word_end_times("the cat sat on the".split(), ALIGNMENTS[:4])
    assert ends == pytest.approx([0.25, 0.5, 1.0, 1.25, 1.45])


def test_uniform_cut_keeps_the_floor_of_the_audio_fraction() -> None:
    words = "a b c d e f g h".split()
    assert cut_live_tail(words, 2.0, 0.25) == words[:7]  # floor(8 * 1.75 / 2) = 7
    assert cut_live_tail(words, 1.0, 0.25) == words[:6]  # floor(8 * 0.75) = 6
    assert cut_live_tail(words, 0.25, 0.25) == []
    assert cut_live_tail(words, 1.0, 0.0) == words


def test_aligned_cut_keeps_words_that_ended_before_the_tail() -> None:
    words = "the cat sat on the".split()
    assert cut_live_tail(words, 1.7, 0.25, ALIGNMENTS) == words[:4]  # the second "the" ends 1.5 > 1.45
    assert cut_live_tail(words, 1.0, 0.25, ALIGNMENTS) == words[:2]  # cutoff 0.75
    assert cut_live_tail(words, 1.0, 0.0, ALIGNMENTS) == words


def test_aligned_cut_matches_only_reference_words_already_heard() -> None:
    alignments = [AlignedWord("yes", 0.0, 0.5), AlignedWord("no", 0.5, 1.0), AlignedWord("yes", 3.0, 3.5)]
    # At 2 s the second reference "yes" (3.0-3.5) is not heard yet, so the hypothesis's second
    # "yes" is a trailing insertion ending 1.0 + 0.2 = 1.2 <= 1.75 and is kept.
    assert cut_live_tail("yes no yes".split(), 2.0, 0.25, alignments) == ["yes", "no", "yes"]
    assert cut_live_tail("yes no yes".split(), 3.2, 0.25, alignments) == ["yes", "no"]  # now it ends 3.5


# --- real-streaming simulation ----------------------------------------------------------------


def test_real_streaming_without_alignments() -> None:
    events = [
        HypothesisEvent(1.0, "a b c d"),  # keep floor(4 * 0.75) = 3: "a b c"
        HypothesisEvent(2.0, "a b c d e f g h"),  # keep 7: extends
        HypothesisEvent(3.0, "a b X d e f g h i j k l"),  # keep 11: rewrites 5 published words
        HypothesisEvent(4.0, "a b c d e f g h i j k l m n o p"),  # keep 15: extends
        HypothesisEvent(4.0, "a b c d e f"),  # shorter but agreeing: nothing published or blocked
        HypothesisEvent(4.5, "a b c d e f g h i j k l m n o p q", is_final=True),  # no cut
    ]
    result = simulate_real_streaming(events, final_text="a b c d e f g h i j k l m n o p q r")
    assert result.text == "a b c d e f g h i j k l m n o p q r"  # end of stream appends uncut
    assert (result.published_updates, result.blocked_updates, result.blocked_revision_words) == (5, 1, 5)
    assert result.timestamp_source == "uniform"


def test_real_streaming_does_not_cut_the_final_update() -> None:
    assert simulate_real_streaming([HypothesisEvent(1.0, "a b c d", is_final=True)], "").text == "a b c d"
    assert simulate_real_streaming([HypothesisEvent(1.0, "a b c d")], "").text == "a b c"


def test_real_streaming_end_of_stream_cannot_rewrite() -> None:
    events = [HypothesisEvent(2.0, "a b c d e f g h")]  # publishes 7 words
    result = simulate_real_streaming(events, final_text="a b c d e f G h i")
    assert result.text == "a b c d e f g"  # the final text disagrees: nothing of it is appended
    assert (result.published_updates, result.blocked_updates, result.blocked_revision_words) == (1, 1, 1)


def test_real_streaming_with_alignments() -> None:
    events = [
        HypothesisEvent(1.0, "the cat sat"),  # ends .25 .5 1.0, cutoff .75: "the cat"
        # "a" replaces the heard "the mat" (1.25-2.0) and ends 2.0; cutoff 1.5
        HypothesisEvent(1.75, "the cat sat on a"),
        HypothesisEvent(2.5, "the cat sad on the mat today"),  # "sad" rewrites "sat": blocked
        HypothesisEvent(2.6, "the cat sat on the mat today"),  # "today" ends 2.75 > 2.35
    ]
    result = simulate_real_streaming(events, "the cat sat on the mat today", word_alignments=ALIGNMENTS)
    assert result.text == "the cat sat on the mat today"
    assert (result.published_updates, result.blocked_updates, result.blocked_revision_words) == (4, 1, 2)
    assert result.timestamp_source == "word_alignments"

    # The same updates scored without alignments keep different prefixes.
    uniform = simulate_real_streaming(events[:2], "")
    assert uniform.text == "the cat sat on"  # floor(3 * 0.75) = 2, then floor(5 * 1.5 / 1.75) = 4


# --- per-file scores and the report -----------------------------------------------------------


def _word(text: str, end_sec: float, committed_at_sec: float) -> CommittedWord:
    return CommittedWord(text=text, start_sec=end_sec - 0.25, end_sec=end_sec, committed_at_sec=committed_at_sec)


def _cat_stream() -> StreamOutput:
    return StreamOutput(
        events=(HypothesisEvent(2.0, "the cat sat on the"), HypothesisEvent(3.0, "the cat sat on the mat today")),
        committed_words=(_word("the", 0.5, 2.0), _word("cat", 1.0, 2.0), _word("sat", 1.5, 3.0)),
        flushed_words=(_word("on", 2.0, 3.0), _word("a", 2.25, 3.0), _word("mat", 2.5, 3.0), _word("today", 3.0, 3.0)),
        final_text="the cat sat on a mat today",
        audio_sec=3.0,
        compute_sec=0.75,
    )


def test_score_file_with_alignments() -> None:
    entry = ManifestEntry(audio=Path("talks/cat.wav"), text="The cat sat on the mat today.", word_alignments=ALIGNMENTS)
    score = score_file(entry, _cat_stream())
    assert score.final == WordErrors(1, 7)
    # Real streaming: at 2.0 s keep words ending by 1.75 ("the cat sat on the"), at 3.0 s all
    # seven; the final text's "a" would rewrite the published "the": blocked.
    assert score.real_streaming == WordErrors(0, 7)
    assert score.real_streaming_blocked_words == 3
    assert score.committed_only == WordErrors(4, 7)  # "the cat sat": four deletions
    # Emission time minus reference word end ("a" takes the end of "the", 1.5).
    assert score.latency_source == "word_alignments"
    assert score.commit_latencies_sec == pytest.approx((1.75, 1.5, 2.0, 1.75, 1.5, 1.0, 0.25))
    assert score.rtf == 0.25


def test_score_file_without_alignments_uses_interpolated_word_times() -> None:
    entry = ManifestEntry(audio=Path("cat.wav"), text="the cat sat on the mat today")
    score = score_file(entry, _cat_stream())
    assert score.latency_source == "interpolated"
    assert score.commit_latencies_sec == pytest.approx((1.5, 1.0, 1.5, 1.0, 0.75, 0.5, 0.0))
    # Uniform cut: at 2.0 s floor(5 * 1.75 / 2) = 4 words, at 3.0 s floor(7 * 2.75 / 3) = 6.
    assert score.real_streaming == WordErrors(1, 7)  # "the cat sat on the mat": the final text is blocked


def test_summarize_pools_latencies_and_totals_compute() -> None:
    cat = score_file(
        ManifestEntry(audio=Path("cat.wav"), text="the cat sat on the mat today", word_alignments=ALIGNMENTS),
        _cat_stream(),
    )
    hello = score_file(
        ManifestEntry(audio=Path("hello.wav"), text="hello world"),
        StreamOutput(
            events=(),
            committed_words=(),
            flushed_words=(_word("hello", 1.0, 1.0),),
            final_text="hello",
            audio_sec=1.0,
            compute_sec=0.5,
        ),
    )
    report = summarize([cat, hello])
    assert report.final.macro == pytest.approx((1 / 7 + 1 / 2) / 2)
    assert report.final.corpus == pytest.approx(2 / 9)
    assert report.committed_only.corpus == pytest.approx((4 + 2) / 9)
    assert report.latency_p50_sec == pytest.approx(1.5)  # cat's 7 latencies plus hello's 0.0
    assert report.rtf == pytest.approx(1.25 / 4.0)

    table = format_report(report)
    lines = table.splitlines()
    assert lines[0].split() == ["file", "words", "final", "real", "commit", "blocked", "lat50", "lat95", "RTF"]
    assert lines[2].split() == ["cat.wav", "7", "14.29", "0.00", "57.14", "3", "1.50", "1.93", "0.250"]
    assert lines[3].split()[:3] == ["hello.wav", "2", "50.00"]
    assert lines[-2].startswith("macro") and "32.14" in lines[-2]
    assert lines[-1].startswith("corpus") and "22.22" in lines[-1]


# --- manifest ---------------------------------------------------------------------------------


def _write_manifest(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_manifest(tmp_path: Path) -> None:
    aligned = {"audio": "/data/b.wav", "text": "hi there", "word_alignments": [
        {"word": "hi", "start": 0.1, "end": 0.4}, {"word": "there", "start": 0.4, "end": 0.9}]}
    path = _write_manifest(
        tmp_path, [json.dumps({"audio": "a.wav", "text": "hello"}), "", json.dumps(aligned)]
    )
    first, second = read_manifest(path)
    assert first == ManifestEntry(audio=tmp_path / "a.wav", text="hello", word_alignments=None)
    assert second.audio == Path("/data/b.wav")
    assert second.word_alignments == (AlignedWord("hi", 0.1, 0.4), AlignedWord("there", 0.4, 0.9))


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "line is a JSON list; expected an object"),
        (json.dumps({"text": "hi"}), "'audio' is None; expected a non-empty string"),
        (json.dumps({"audio": "a.wav", "text": ""}), "'text' is ''; expected a non-empty string"),
        (json.dumps({"audio": "a.wav", "text": "hi", "word_alignments": {}}), "'word_alignments' is a dict"),
        (
            json.dumps({"audio": "a.wav", "text": "hi", "word_alignments": [{"word": "hi", "start": 0.5}]}),
            r"word_alignments\[0\] has start 0.5, end None",
        ),
        (
            json.dumps({"audio": "a.wav", "text": "hi", "word_alignments": [{"word": "hi", "start": 0.5, "end": 0.2}]}),
            r"word_alignments\[0\] spans 0.5..0.2 s",
        ),
        (
            json.dumps({"audio": "a.wav", "text": "a b", "word_alignments": [
                {"word": "a", "start": 0.5, "end": 0.6}, {"word": "b", "start": 0.1, "end": 0.2}]}),
            r"word_alignments\[1\] spans 0.1..0.2 s; expected start <= end, and start >= 0.5",
        ),
    ],
)
def test_manifest_errors_name_the_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = _write_manifest(tmp_path, [json.dumps({"audio": "a.wav", "text": "fine"}), "", bad_line])
    with pytest.raises(ManifestError, match=rf"manifest.jsonl:3: .*{message}"):
        read_manifest(path)


def test_empty_manifest_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no entries"):
        read_manifest(_write_manifest(tmp_path, [""]))
