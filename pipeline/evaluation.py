"""Streaming WER harness: replay a manifest through streaming sessions and score what they emitted.

Each manifest file is decoded whole (`pipeline.audio_io.read_audio`) and pushed into a fresh
`StreamingSession` in 1 s pieces as fast as the machine allows: no wall-clock pacing, so latencies are in
stream time and compute shows up only in the RTF (causal_runtime.md §5). The session's events become a
`pipeline.scoring.StreamOutput`:

- every `update` event is one hypothesis for the real-streaming simulation (its global transcript at the
  audio time it was decoded); the end-of-stream final transcript is appended by the simulation itself;
- words emitted by `push_audio` are the committed-only text; words emitted by `finish` are the flush;
- compute time covers featurizing, encoding and decoding (session creation to `finish`), never decoding
  the file or loading the model.

`evaluate_manifest` returns a `ManifestEvaluation`: the per-file results (scores plus the texts and words
they were computed from) and the overall `EvalReport`. It converts to and from plain JSON.

The `eval` subcommand of `qwen3-stream` (parsing, model loading, printing) lives in `cli.py`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.audio_io import read_audio
from pipeline.checkpoint import ASRModel
from pipeline.commit import CommittedWord
from pipeline.features import SAMPLE_RATE
from pipeline.scoring import (
    EvalReport,
    FileScore,
    HypothesisEvent,
    ManifestEntry,
    RealStreamingResult,
    StreamOutput,
    WordErrors,
    percentile,
    read_manifest,
    score_file,
    simulate_real_streaming,
    summarize,
)
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession, TranscriptEvent

log = logging.getLogger(__name__)

# Audio handed to the session per push_audio call. Outputs do not depend on it (the session cuts blocks
# itself); it only bounds how much audio one call takes, as a live client would.
PUSH_SAMPLES = SAMPLE_RATE
DEFAULT_TAIL_MS = 250
JSON_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """What one file produced, as scoring sees it, plus counters."""

    output: StreamOutput
    updates: int  # decoder updates (end-of-stream flush included)
    segments: int  # segments the stream was cut into


def replay_audio(model: ASRModel, pcm: np.ndarray, options: SessionOptions) -> Replay:
    """Stream `pcm` (float32, 16 kHz mono) through a fresh session, as fast as possible."""
    if pcm.size == 0:
        raise ValueError("audio is empty; expected at least one sample")
    session = StreamingSession(model, options)
    started = time.perf_counter()
    live: list[TranscriptEvent] = []
    for offset in range(0, len(pcm), PUSH_SAMPLES):
        live += session.push_audio(pcm[offset : offset + PUSH_SAMPLES])
    at_end = session.finish()
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)  # kernels run asynchronously: count them before stopping the clock
    compute_sec = time.perf_counter() - started

    updates = [event for event in live + at_end if event.kind == "update"]
    output = StreamOutput(
        events=tuple(HypothesisEvent(audio_sec=event.audio_sec, hypothesis=event.hypothesis) for event in updates),
        committed_words=_emitted(live),
        flushed_words=_emitted(at_end),
        final_text=at_end[-1].hypothesis,  # the "final" event: every segment's final hypothesis
        audio_sec=len(pcm) / SAMPLE_RATE,
        compute_sec=compute_sec,
    )
    return Replay(output=output, updates=len(updates), segments=session.segment_index + 1)


def _emitted(events: list[TranscriptEvent]) -> tuple[CommittedWord, ...]:
    return tuple(word for event in events for word in event.new_words)


# ---------------------------------------------------------------------------------------------
# Per-file result and whole-manifest evaluation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileResult:
    """One replayed file: its scores and the texts and words they were computed from."""

    score: FileScore
    reference: str
    final_text: str
    committed_words: tuple[CommittedWord, ...]  # emitted before end of stream
    flushed_words: tuple[CommittedWord, ...]  # emitted by the end-of-stream flush
    real_streaming: RealStreamingResult
    updates: int
    segments: int

    @property
    def committed_text(self) -> str:
        return " ".join(word.text for word in self.committed_words)

    @property
    def emitted_text(self) -> str:
        """Everything the client received: committed words, then the flush."""
        return " ".join(word.text for word in self.committed_words + self.flushed_words)


def evaluate_file(
    model: ASRModel, entry: ManifestEntry, options: SessionOptions, tail_ms: int = DEFAULT_TAIL_MS
) -> FileResult:
    """Decode, replay and score one manifest entry."""
    replay = replay_audio(model, read_audio(entry.audio), options)
    output = replay.output
    # Simulated once: the score keeps only the WER of its text, the result keeps the text and its counters.
    real_streaming = simulate_real_streaming(output.events, output.final_text, entry.word_alignments, tail_ms)
    return FileResult(
        score=score_file(entry, output, tail_ms, real_streaming=real_streaming),
        reference=entry.text,
        final_text=output.final_text,
        committed_words=output.committed_words,
        flushed_words=output.flushed_words,
        real_streaming=real_streaming,
        updates=replay.updates,
        segments=replay.segments,
    )


@dataclass(frozen=True)
class ManifestEvaluation:
    """A whole manifest replayed with one model and one set of session options."""

    manifest: str
    model_source: str
    tower_source: str | None
    options: SessionOptions
    tail_ms: int
    files: tuple[FileResult, ...]

    @property
    def report(self) -> EvalReport:
        """Macro and corpus WER, commit latency percentiles and RTF over all files."""
        return summarize([result.score for result in self.files])

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON: inputs, per-file figures and texts, overall figures (derived ones for reading only)."""
        report = self.report
        return {
            "format_version": JSON_FORMAT_VERSION,
            "manifest": self.manifest,
            "model": self.model_source,
            "tower": self.tower_source,
            "options": asdict(self.options),
            "tail_ms": self.tail_ms,
            "overall": {
                "files": len(self.files),
                "reference_words": sum(result.score.final.reference_words for result in self.files),
                "audio_sec": sum(result.score.audio_sec for result in self.files),
                "compute_sec": sum(result.score.compute_sec for result in self.files),
                "rtf": report.rtf,
                "wer": {name: asdict(getattr(report, name)) for name in _WER_KINDS},
                "commit_latency_sec": {"p50": report.latency_p50_sec, "p95": report.latency_p95_sec},
            },
            "files": [_file_json(result) for result in self.files],
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> ManifestEvaluation:
        """Rebuild from `to_json_dict` output; derived figures are recomputed, not read."""
        version = data.get("format_version")
        if version != JSON_FORMAT_VERSION:
            raise ValueError(f"evaluation JSON has format_version {version!r}; expected {JSON_FORMAT_VERSION}")
        return cls(
            manifest=data["manifest"],
            model_source=data["model"],
            tower_source=data["tower"],
            options=SessionOptions.from_dict(data["options"]),
            tail_ms=data["tail_ms"],
            files=tuple(_file_from_json(item) for item in data["files"]),
        )


_WER_KINDS = ("final", "real_streaming", "committed_only")


def _file_json(result: FileResult) -> dict[str, Any]:
    score = result.score
    latencies = score.commit_latencies_sec
    return {
        "audio": score.audio,
        "reference": result.reference,
        "audio_sec": score.audio_sec,
        "compute_sec": score.compute_sec,
        "rtf": score.rtf,
        "updates": result.updates,
        "segments": result.segments,
        "wer": {name: asdict(getattr(score, name)) | {"rate": getattr(score, name).rate} for name in _WER_KINDS},
        "final_text": result.final_text,
        "committed_text": result.committed_text,
        "real_streaming": asdict(result.real_streaming),
        "commit_latency_sec": {
            "source": score.latency_source,
            "p50": percentile(latencies, 50) if latencies else None,
            "p95": percentile(latencies, 95) if latencies else None,
            "per_word": list(latencies),
        },
        "committed_words": [asdict(word) for word in result.committed_words],
        "flushed_words": [asdict(word) for word in result.flushed_words],
    }


def _file_from_json(item: dict[str, Any]) -> FileResult:
    def word_errors(name: str) -> WordErrors:
        figures = item["wer"][name]
        return WordErrors(errors=figures["errors"], reference_words=figures["reference_words"])

    real_streaming = RealStreamingResult(**item["real_streaming"])
    latency = item["commit_latency_sec"]
    return FileResult(
        score=FileScore(
            audio=item["audio"],
            final=word_errors("final"),
            real_streaming=word_errors("real_streaming"),
            committed_only=word_errors("committed_only"),
            real_streaming_blocked_words=real_streaming.blocked_revision_words,
            commit_latencies_sec=tuple(latency["per_word"]),
            latency_source=latency["source"],
            audio_sec=item["audio_sec"],
            compute_sec=item["compute_sec"],
        ),
        reference=item["reference"],
        final_text=item["final_text"],
        committed_words=tuple(CommittedWord(**word) for word in item["committed_words"]),
        flushed_words=tuple(CommittedWord(**word) for word in item["flushed_words"]),
        real_streaming=real_streaming,
        updates=item["updates"],
        segments=item["segments"],
    )


def read_checked_manifest(manifest_path: str | os.PathLike) -> list[ManifestEntry]:
    """The manifest's entries, after checking that every audio file exists (before hours of replay)."""
    entries = read_manifest(manifest_path)
    missing = [str(entry.audio) for entry in entries if not entry.audio.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{manifest_path}: {len(missing)} of {len(entries)} audio files do not exist: {shown} "
            "(relative paths are resolved against the manifest's folder)"
        )
    return entries


def evaluate_manifest(
    model: ASRModel,
    manifest_path: str | os.PathLike,
    options: SessionOptions | None = None,
    *,
    tail_ms: int = DEFAULT_TAIL_MS,
) -> ManifestEvaluation:
    """Replay every manifest file through its own session and score it (module docstring)."""
    options = options or SessionOptions()
    entries = read_checked_manifest(manifest_path)
    results = []
    for index, entry in enumerate(entries, start=1):
        result = evaluate_file(model, entry, options, tail_ms)
        log.info(
            "[%d/%d] %s: final WER %.3f, real-streaming WER %.3f, RTF %.3f",
            index,
            len(entries),
            entry.audio.name,
            result.score.final.rate,
            result.score.real_streaming.rate,
            result.score.rtf,
        )
        results.append(result)
    return ManifestEvaluation(
        manifest=str(manifest_path),
        model_source=model.model_source,
        tower_source=model.tower_source,
        options=options,
        tail_ms=tail_ms,
        files=tuple(results),
    )
