"""Streaming WER harness: what a replayed file is scored on, and how results aggregate.

Each file yields three word error rates, all on Whisper-normalized text (`EnglishTextNormalizer`
of the `whisper-normalizer` package, then jiwer):

- **final**: the final transcript after end of stream;
- **real streaming**: what a strictly append-only display would have shown if it published, after
  every update, only the hypothesis words older than the last `tail_ms` of audio
  (`simulate_real_streaming`), then appended the final text at end of stream;
- **committed only**: the words the output contract committed before the end-of-stream flush.

Aggregates are the macro average (mean of per-file WER: the reference's headline numbers) and the
corpus WER (total errors / total reference words). Commit latency is, per emitted word, the stream
time at which it was emitted minus the time its audio ended: the reference word's end when the
manifest carries word alignments, else the word's interpolated end time, which mostly restates the
commit-lag model (`pipeline.commit`) and is only an estimate. Replays run as fast as possible, so
latency is in stream time and excludes compute; RTF reports compute separately.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any, Iterable, Sequence

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

from pipeline.commit import CommittedWord, common_prefix_length

# A hypothesis word past the last reference word heard gets this much time per word.
_TRAILING_INSERT_WORD_SEC = 0.2
# Punctuation around a word does not stop it matching its reference slot ("mat." matches "mat").
_EDGE_PUNCTUATION = re.compile(r"^[^\w']+|[^\w']+$")


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignedWord:
    """One reference word with its audio span (forced-aligner timestamps)."""

    word: str
    start_sec: float
    end_sec: float


@dataclass(frozen=True)
class ManifestEntry:
    audio: Path
    text: str
    # None when the manifest line has no (or an empty) "word_alignments" list.
    word_alignments: tuple[AlignedWord, ...] | None = None


class ManifestError(ValueError):
    """A manifest line that is not a valid entry; the message names the file and line."""


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Read a JSONL manifest: {"audio": path, "text": reference, "word_alignments"?: [...]}.

    Relative audio paths are resolved against the manifest's folder. Each alignment item is
    {"word": str, "start": seconds, "end": seconds}, in spoken order. Blank lines are skipped.
    """
    path = Path(path)
    entries: list[ManifestEntry] = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ManifestError(f"{where}: invalid JSON ({error.msg}); expected one JSON object per line") from error
            entries.append(_manifest_entry(row, path.parent, where))
    if not entries:
        raise ManifestError(f"{path}: no entries; expected JSONL lines with 'audio' and 'text'")
    return entries


def _manifest_entry(row: Any, base_dir: Path, where: str) -> ManifestEntry:
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: line is a JSON {type(row).__name__}; expected an object")
    for key in ("audio", "text"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ManifestError(f"{where}: '{key}' is {row.get(key)!r}; expected a non-empty string")
    alignments = row.get("word_alignments")
    if alignments is not None and not isinstance(alignments, list):
        raise ManifestError(f"{where}: 'word_alignments' is a {type(alignments).__name__}; expected a list")
    return ManifestEntry(
        audio=base_dir / row["audio"],
        text=row["text"],
        word_alignments=tuple(_aligned_words(alignments, where)) if alignments else None,
    )


def _aligned_words(items: list[Any], where: str) -> Iterable[AlignedWord]:
    previous_start = 0.0
    for index, item in enumerate(items):
        at = f"{where}: word_alignments[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("word"), str):
            raise ManifestError(f"{at} is {item!r}; expected {{'word': str, 'start': s, 'end': s}}")
        start, end = item.get("start"), item.get("end")
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in (start, end)):
            raise ManifestError(f"{at} has start {start!r}, end {end!r}; expected numbers of seconds")
        if not previous_start <= start <= end:
            raise ManifestError(
                f"{at} spans {start}..{end} s; expected start <= end, "
                f"and start >= {previous_start} (0, or the previous word's start)"
            )
        previous_start = start
        yield AlignedWord(word=item["word"], start_sec=float(start), end_sec=float(end))


# ---------------------------------------------------------------------------------------------
# Word error rate
# ---------------------------------------------------------------------------------------------


@functools.cache
def _english_normalizer() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


def normalize_for_wer(text: str) -> str:
    """Whisper's English normalization: case, punctuation, spellings, numbers, fillers."""
    return _english_normalizer()(text)


@dataclass(frozen=True)
class WordErrors:
    errors: int  # substitutions + deletions + insertions
    reference_words: int

    @property
    def rate(self) -> float:
        return self.errors / self.reference_words


def word_errors(reference: str, hypothesis: str) -> WordErrors:
    """Word errors of `hypothesis` against `reference`, both Whisper-normalized."""
    normalized_reference = normalize_for_wer(reference)
    if not normalized_reference.split():
        raise ValueError(f"reference {reference!r} is empty after normalization; expected at least one word")
    alignment = jiwer.process_words(normalized_reference, normalize_for_wer(hypothesis))
    return WordErrors(
        errors=alignment.substitutions + alignment.deletions + alignment.insertions,
        reference_words=alignment.substitutions + alignment.deletions + alignment.hits,
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, interpolating linearly between ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values; expected at least one")
    if not 0 <= q <= 100:
        raise ValueError(f"q is {q}; expected 0..100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


# ---------------------------------------------------------------------------------------------
# Real-streaming simulation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HypothesisEvent:
    """One decoder update as the harness sees it."""

    audio_sec: float  # stream time: audio consumed when the update ran
    hypothesis: str  # global hypothesis: finalized segments + current segment hypothesis
    # True for the end-of-stream flush update: its hypothesis is published without the tail cut.
    is_final: bool = False


def _match_key(word: str) -> str:
    return _EDGE_PUNCTUATION.sub("", word.lower())


def hypothesis_word_end_times(words: Sequence[str], alignments: Sequence[AlignedWord]) -> list[float]:
    """Estimated audio end time of each hypothesis word, from the reference's word timestamps.

    Hypothesis words are matched to reference slots (`difflib.SequenceMatcher` on lowercased,
    edge-punctuation-stripped words). Matched words, and one-to-one replacements, take their
    slot's end; an unequal replacement is spread uniformly over the replaced reference span; an
    insertion is interpolated between the neighbouring reference words (past the last one, 0.2 s
    per word).
    """
    ends = [0.0] * len(words)
    matcher = SequenceMatcher(
        None, [_match_key(a.word) for a in alignments], [_match_key(w) for w in words], autojunk=False
    )
    for tag, ref_start, ref_end, hyp_start, hyp_end in matcher.get_opcodes():
        count = hyp_end - hyp_start
        if tag == "delete":  # reference words the hypothesis missed: nothing to time
            continue
        if tag == "equal" or (tag == "replace" and ref_end - ref_start == count):
            for offset in range(count):
                ends[hyp_start + offset] = alignments[ref_start + offset].end_sec
            continue
        if tag == "replace":
            span_start, span_end = alignments[ref_start].start_sec, alignments[ref_end - 1].end_sec
        else:  # insert before reference slot ref_start
            span_start = alignments[ref_start - 1].end_sec if ref_start > 0 else 0.0
            if ref_start < len(alignments):
                span_end = alignments[ref_start].start_sec
            else:
                span_end = span_start + _TRAILING_INSERT_WORD_SEC * count
        span = max(0.0, span_end - span_start)
        for offset in range(count):
            ends[hyp_start + offset] = span_start + span * (offset + 1) / count
    return ends


def cut_live_tail(
    words: Sequence[str],
    audio_sec: float,
    tail_sec: float,
    alignments: Sequence[AlignedWord] | None = None,
) -> list[str]:
    """Keep the leading hypothesis words whose audio ended at least `tail_sec` before `audio_sec`.

    With reference word alignments, word end times come from `hypothesis_word_end_times`, matched
    only against reference words that had started by `audio_sec` (the hypothesis cannot contain
    later ones). Without them, words are assumed spread evenly over the audio so far:
    floor(n * (audio_sec - tail_sec) / audio_sec) words are kept.
    """
    if tail_sec < 0:
        raise ValueError(f"tail_sec is {tail_sec}; expected >= 0")
    if tail_sec == 0:
        return list(words)
    if audio_sec <= tail_sec:
        return []
    cutoff_sec = audio_sec - tail_sec
    if alignments is None:
        return list(words[: math.floor(len(words) * cutoff_sec / audio_sec)])
    heard = [a for a in alignments if a.start_sec <= audio_sec]
    kept = 0
    for end_sec in hypothesis_word_end_times(words, heard):
        if end_sec > cutoff_sec:
            break
        kept += 1
    return list(words[:kept])


@dataclass(frozen=True)
class RealStreamingResult:
    text: str
    published_updates: int  # updates (end of stream included) that extended the published text
    blocked_updates: int  # updates that would have rewritten published words
    blocked_revision_words: int  # published words those updates would have rewritten, summed
    timestamp_source: str  # "word_alignments" or "uniform"


def simulate_real_streaming(
    events: Iterable[HypothesisEvent],
    final_text: str,
    word_alignments: Sequence[AlignedWord] | None = None,
    tail_ms: int = 250,
) -> RealStreamingResult:
    """The text a strictly append-only display would end with (reference §5, "real streaming").

    Per update: cut the live tail (`cut_live_tail`; not for `is_final` updates), then publish the
    result only if it starts with everything already published; a result that disagrees with a
    published word is blocked whole. At end of stream `final_text` is offered the same way without
    the cut, so a final text that revises published words adds nothing. A result that is merely
    shorter than the published text (the cut moved back) revises nothing and is not counted as
    blocked.
    """
    tail_sec = tail_ms / 1000
    alignments = word_alignments or None
    published: list[str] = []
    published_updates = blocked_updates = blocked_words = 0
    offers = [
        event.hypothesis.split()
        if event.is_final
        else cut_live_tail(event.hypothesis.split(), event.audio_sec, tail_sec, alignments)
        for event in events
    ]
    offers.append(final_text.split())
    for words in offers:
        agreed = common_prefix_length(published, words)
        if agreed == len(published):
            if len(words) > len(published):
                published_updates += 1
            published = words
        elif agreed < len(words):
            blocked_updates += 1
            blocked_words += len(published) - agreed
    return RealStreamingResult(
        text=" ".join(published),
        published_updates=published_updates,
        blocked_updates=blocked_updates,
        blocked_revision_words=blocked_words,
        timestamp_source="word_alignments" if alignments else "uniform",
    )


# ---------------------------------------------------------------------------------------------
# Per-file and overall report
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamOutput:
    """What replaying one file produced."""

    events: tuple[HypothesisEvent, ...]
    committed_words: tuple[CommittedWord, ...]  # emitted before the end-of-stream finish
    flushed_words: tuple[CommittedWord, ...]  # emitted by the end-of-stream finish
    final_text: str
    audio_sec: float
    compute_sec: float  # wall time of featurizing and streaming, model load excluded


@dataclass(frozen=True)
class FileScore:
    audio: str
    final: WordErrors
    real_streaming: WordErrors
    committed_only: WordErrors
    real_streaming_blocked_words: int
    commit_latencies_sec: tuple[float, ...]  # one per emitted word
    latency_source: str  # "word_alignments" or "interpolated"
    audio_sec: float
    compute_sec: float

    @property
    def rtf(self) -> float:
        return self.compute_sec / self.audio_sec


def commit_latencies(
    words: Sequence[CommittedWord], alignments: Sequence[AlignedWord] | None
) -> tuple[tuple[float, ...], str]:
    """Per word: emission time minus audio end time (module docstring); returns the source too."""
    if alignments:
        ends = hypothesis_word_end_times([word.text for word in words], alignments)
        source = "word_alignments"
    else:
        ends = [word.end_sec for word in words]
        source = "interpolated"
    return tuple(word.committed_at_sec - end for word, end in zip(words, ends)), source


def score_file(
    entry: ManifestEntry,
    output: StreamOutput,
    tail_ms: int = 250,
    real_streaming: RealStreamingResult | None = None,
) -> FileScore:
    """Scores of one file; `real_streaming`: its simulation when the caller already ran it (same tail_ms)."""
    if output.audio_sec <= 0:
        raise ValueError(f"{entry.audio}: audio_sec is {output.audio_sec}; expected > 0")
    if real_streaming is None:
        real_streaming = simulate_real_streaming(output.events, output.final_text, entry.word_alignments, tail_ms)
    latencies, latency_source = commit_latencies(
        output.committed_words + output.flushed_words, entry.word_alignments
    )
    return FileScore(
        audio=str(entry.audio),
        final=word_errors(entry.text, output.final_text),
        real_streaming=word_errors(entry.text, real_streaming.text),
        committed_only=word_errors(entry.text, " ".join(word.text for word in output.committed_words)),
        real_streaming_blocked_words=real_streaming.blocked_revision_words,
        commit_latencies_sec=latencies,
        latency_source=latency_source,
        audio_sec=output.audio_sec,
        compute_sec=output.compute_sec,
    )


@dataclass(frozen=True)
class WerSummary:
    macro: float  # mean of per-file WER
    corpus: float  # total errors / total reference words


def summarize_wer(scores: Sequence[WordErrors]) -> WerSummary:
    if not scores:
        raise ValueError("no files to summarize; expected at least one")
    return WerSummary(
        macro=sum(score.rate for score in scores) / len(scores),
        corpus=sum(score.errors for score in scores) / sum(score.reference_words for score in scores),
    )


@dataclass(frozen=True)
class EvalReport:
    files: tuple[FileScore, ...]
    final: WerSummary
    real_streaming: WerSummary
    committed_only: WerSummary
    latency_p50_sec: float | None  # over every emitted word of every file; None if none
    latency_p95_sec: float | None
    rtf: float  # total compute / total audio


def summarize(files: Sequence[FileScore]) -> EvalReport:
    latencies = [latency for score in files for latency in score.commit_latencies_sec]
    return EvalReport(
        files=tuple(files),
        final=summarize_wer([score.final for score in files]),
        real_streaming=summarize_wer([score.real_streaming for score in files]),
        committed_only=summarize_wer([score.committed_only for score in files]),
        latency_p50_sec=percentile(latencies, 50) if latencies else None,
        latency_p95_sec=percentile(latencies, 95) if latencies else None,
        rtf=sum(score.compute_sec for score in files) / sum(score.audio_sec for score in files),
    )


def format_report(report: EvalReport) -> str:
    """A plain-text table: one row per file, then macro and corpus rows. WER in percent."""

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def row(name: str, words: str, wers: Sequence[float], blocked: str, p50: str, p95: str, rtf: str) -> str:
        cells = [f"{name:<32.32}", f"{words:>7}", *(f"{100 * w:>9.2f}" for w in wers)]
        return " ".join(cells + [f"{blocked:>7}", f"{p50:>7}", f"{p95:>7}", f"{rtf:>6}"])

    header = " ".join(
        [f"{'file':<32}", f"{'words':>7}", f"{'final':>9}", f"{'real':>9}", f"{'commit':>9}"]
        + [f"{'blocked':>7}", f"{'lat50':>7}", f"{'lat95':>7}", f"{'RTF':>6}"]
    )
    lines = [header, "-" * len(header)]
    for score in report.files:
        latencies = score.commit_latencies_sec
        lines.append(
            row(
                Path(score.audio).name,
                str(score.final.reference_words),
                [score.final.rate, score.real_streaming.rate, score.committed_only.rate],
                str(score.real_streaming_blocked_words),
                seconds(percentile(latencies, 50) if latencies else None),
                seconds(percentile(latencies, 95) if latencies else None),
                f"{score.rtf:.3f}",
            )
        )
    lines.append("-" * len(header))
    total_words = str(sum(score.final.reference_words for score in report.files))
    total_blocked = str(sum(score.real_streaming_blocked_words for score in report.files))
    summaries = (report.final, report.real_streaming, report.committed_only)
    p50, p95 = seconds(report.latency_p50_sec), seconds(report.latency_p95_sec)
    rtf = f"{report.rtf:.3f}"
    lines.append(row("macro (mean of files)", total_words, [s.macro for s in summaries], total_blocked, p50, p95, rtf))
    lines.append(row("corpus (errors / words)", total_words, [s.corpus for s in summaries], total_blocked, p50, p95, rtf))
    return "\n".join(lines)
