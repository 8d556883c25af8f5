"""Streaming WER harness end to end: espeak-ng speech, the tiny checkpoint, real sessions.

The tiny model's transcripts are noise, so WER values mean nothing here; what is checked is the mechanics:
each file's figures are the scores of the texts the session emitted (checked against a direct session run),
overall figures follow from per-file ones, word alignments are used when the manifest has them, JSON
round-trips, and `qwen3-stream eval` runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

import cli
from cli import main as cli_main
from pipeline.audio_io import AudioFileError, read_audio
from pipeline.checkpoint import ASRModel, load_model
from pipeline.evaluation import (
    PUSH_SAMPLES,
    FileResult,
    ManifestEvaluation,
    evaluate_manifest,
    read_checked_manifest,
)
from pipeline.features import SAMPLE_RATE, prepare_pcm
from pipeline.scoring import (
    HypothesisEvent,
    hypothesis_word_end_times,
    read_manifest,
    simulate_real_streaming,
    word_errors,
)
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR
from tests.speech import SpokenAudio, speak, speak_words

SENTENCES = (
    "The quick brown fox jumps over the lazy dog. "
    "Streaming speech recognition turns live audio into text. Thank you very much."
)
WORDS = "hello world how are you today".split()

# Small decode budget keeps the test fast. Without the repetition controls and hold-back, the random tiny
# model settles into repeating one token as audio accumulates, so consecutive hypotheses agree and words
# are committed mid-stream (the committed-only path is exercised, not just the end-of-stream flush).
OPTIONS = SessionOptions.from_dict({
    "encoder": {"block_frames": 96},
    "decode": {"max_new_tokens": 8, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0},
    "commit": {"hold_back_words": 0},
})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SpokenAudio]]:
    """A manifest of two espeak-ng files: sentences without alignments, words with exact alignments."""
    folder = tmp_path_factory.mktemp("corpus")
    spoken = [
        speak(SENTENCES, folder / "audio" / "sentences.wav", seed=1),
        speak_words(WORDS, folder / "audio" / "words.wav", seed=2),
    ]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(audio.manifest_row(folder)) + "\n" for audio in spoken))
    return manifest, spoken


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> ASRModel:
    return load_model(tiny_checkpoint, tiny_checkpoint / TOWER_OVERLAY_DIR)


@pytest.fixture(scope="module")
def evaluation(model: ASRModel, corpus: tuple[Path, list[SpokenAudio]]) -> ManifestEvaluation:
    return evaluate_manifest(model, corpus[0], OPTIONS)


# --- the speech helper and audio files --------------------------------------------------------------


def test_spoken_audio_is_16k_speech_with_exact_word_spans(corpus: tuple[Path, list[SpokenAudio]]) -> None:
    _, (sentences, words) = corpus
    for audio in (sentences, words):
        info = sf.info(audio.path)
        assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1)
        assert info.frames / SAMPLE_RATE == pytest.approx(audio.duration_sec)
    assert 5.0 < sentences.duration_sec < 12.0  # three short sentences
    pcm = read_audio(words.path)
    # The noise floor: no digital silence before the first word, but quiet (-50 dBFS RMS).
    gap = pcm[: int(words.word_alignments[0].start_sec * SAMPLE_RATE)]
    assert 20 * np.log10(np.sqrt(np.mean(gap**2))) == pytest.approx(-50, abs=0.5)
    for word in words.word_alignments:
        inside = pcm[int(word.start_sec * SAMPLE_RATE) : int(word.end_sec * SAMPLE_RATE)]
        assert np.max(np.abs(inside)) > 0.05, f"no speech inside the span of {word.word!r}"
    assert [word.word for word in words.word_alignments] == WORDS


def test_read_audio_downmixes_and_resamples(tmp_path: Path) -> None:
    stereo = (np.random.default_rng(0).uniform(-0.5, 0.5, size=(22050, 2)) * 32767).astype(np.int16)
    sf.write(tmp_path / "stereo.flac", stereo, 22050, subtype="PCM_16")
    pcm = read_audio(tmp_path / "stereo.flac")
    np.testing.assert_array_equal(pcm, prepare_pcm(stereo, 22050, downmix=True))
    assert pcm.dtype == np.float32 and pcm.shape == (SAMPLE_RATE,)

    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32)
    sf.write(tmp_path / "tone.ogg", tone, SAMPLE_RATE, format="OGG", subtype="VORBIS")
    decoded = read_audio(tmp_path / "tone.ogg")
    assert decoded.shape == tone.shape
    assert np.corrcoef(decoded, tone)[0, 1] > 0.99  # lossy, but the same tone


def test_read_audio_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.wav does not exist"):
        read_audio(tmp_path / "nothing.wav")
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all" * 8)
    with pytest.raises(AudioFileError, match="cannot decode audio file .*garbage.wav.*expected a WAV, FLAC or OGG"):
        read_audio(tmp_path / "garbage.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioFileError, match="empty.wav: audio of shape .* is empty"):
        read_audio(tmp_path / "empty.wav")
    with pytest.raises(AudioFileError, match="is not a file"):
        read_audio(tmp_path)


def test_missing_audio_is_reported_before_any_replay(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        json.dumps({"audio": "a.wav", "text": "hello"}) + "\n" + json.dumps({"audio": "b.wav", "text": "hi"}) + "\n"
    )
    sf.write(tmp_path / "a.wav", np.zeros(1600, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(FileNotFoundError, match=r"1 of 2 audio files do not exist: .*b\.wav"):
        read_checked_manifest(manifest)


# --- the evaluation ---------------------------------------------------------------------------------


def direct_run(model: ASRModel, audio: SpokenAudio) -> tuple[list, list]:
    """The reference: one session fed the whole file in one push (pacing must not matter), then finish."""
    session = StreamingSession(model, OPTIONS)
    live = session.push_audio(read_audio(audio.path))
    return live, session.finish()


def test_each_file_reports_what_its_session_emitted(
    evaluation: ManifestEvaluation, model: ASRModel, corpus: tuple[Path, list[SpokenAudio]]
) -> None:
    _, spoken = corpus
    assert [Path(result.score.audio).name for result in evaluation.files] == ["sentences.wav", "words.wav"]
    for result, audio in zip(evaluation.files, spoken):
        live, at_end = direct_run(model, audio)
        updates = [event for event in live + at_end if event.kind == "update"]
        assert result.committed_words == tuple(word for event in live for word in event.new_words)
        assert result.flushed_words == tuple(word for event in at_end for word in event.new_words)
        assert result.final_text == at_end[-1].hypothesis
        assert result.updates == len(updates)
        assert result.segments == 1
        expected_real = simulate_real_streaming(
            [HypothesisEvent(event.audio_sec, event.hypothesis) for event in updates],
            at_end[-1].hypothesis,
            audio.word_alignments,
            tail_ms=250,
        )
        assert result.real_streaming == expected_real
        assert result.score.audio_sec == pytest.approx(audio.duration_sec)
        assert result.score.compute_sec > 0 and result.score.rtf > 0
        # The evaluation pushed several PUSH_SAMPLES pieces, the reference one: outputs must not depend on it.
        assert audio.duration_sec * SAMPLE_RATE > 2 * PUSH_SAMPLES


def test_file_scores_are_the_scores_of_its_texts(evaluation: ManifestEvaluation) -> None:
    for result in evaluation.files:
        score = result.score
        assert score.final == word_errors(result.reference, result.final_text)
        assert score.committed_only == word_errors(result.reference, result.committed_text)
        assert score.real_streaming == word_errors(result.reference, result.real_streaming.text)
        assert score.real_streaming_blocked_words == result.real_streaming.blocked_revision_words
        assert len(score.commit_latencies_sec) == len(result.committed_words) + len(result.flushed_words)


def test_committed_text_is_a_prefix_of_the_emitted_text(evaluation: ManifestEvaluation) -> None:
    for result in evaluation.files:
        emitted = result.emitted_text.split()
        assert emitted[: len(result.committed_words)] == result.committed_text.split()
        assert emitted, f"{result.score.audio}: nothing emitted"
        # Nothing was revised, so the emitted words are the final transcript.
        assert result.emitted_text == result.final_text
    assert any(result.committed_words for result in evaluation.files), (
        "no file committed a word before end of stream: the committed-only path went untested"
    )


def test_overall_figures_follow_from_the_files(evaluation: ManifestEvaluation) -> None:
    report, files = evaluation.report, evaluation.files
    for kind in ("final", "real_streaming", "committed_only"):
        errors = [getattr(result.score, kind) for result in files]
        summary = getattr(report, kind)
        assert summary.corpus == sum(e.errors for e in errors) / sum(e.reference_words for e in errors)
        assert summary.macro == pytest.approx(np.mean([e.errors / e.reference_words for e in errors]))
    latencies = [latency for result in files for latency in result.score.commit_latencies_sec]
    assert report.latency_p50_sec == pytest.approx(np.percentile(latencies, 50))
    assert report.latency_p95_sec == pytest.approx(np.percentile(latencies, 95))
    total_compute = sum(result.score.compute_sec for result in files)
    assert report.rtf == pytest.approx(total_compute / sum(result.score.audio_sec for result in files))
    assert report.rtf > 0
    # Reference word counts are those of the normalized references.
    assert [result.score.final.reference_words for result in files] == [21, len(WORDS)]


def test_alignments_are_used_when_the_manifest_has_them(evaluation: ManifestEvaluation) -> None:
    sentences, words = evaluation.files
    assert (sentences.real_streaming.timestamp_source, sentences.score.latency_source) == ("uniform", "interpolated")
    assert (words.real_streaming.timestamp_source, words.score.latency_source) == ("word_alignments", "word_alignments")
    alignments = read_manifest(evaluation.manifest)[1].word_alignments
    emitted = words.committed_words + words.flushed_words
    ends = hypothesis_word_end_times([word.text for word in emitted], alignments)
    assert words.score.commit_latencies_sec == tuple(word.committed_at_sec - end for word, end in zip(emitted, ends))
    emitted = sentences.committed_words + sentences.flushed_words
    assert sentences.score.commit_latencies_sec == tuple(word.committed_at_sec - word.end_sec for word in emitted)


def test_json_round_trips(evaluation: ManifestEvaluation) -> None:
    data = json.loads(json.dumps(evaluation.to_json_dict(), allow_nan=False))
    assert ManifestEvaluation.from_json_dict(data) == evaluation
    overall, report = data["overall"], evaluation.report
    real = report.real_streaming
    assert overall["wer"]["real_streaming"] == {"macro": real.macro, "corpus": real.corpus}
    assert overall["rtf"] == report.rtf
    assert overall["commit_latency_sec"] == {"p50": report.latency_p50_sec, "p95": report.latency_p95_sec}
    first = data["files"][0]
    assert first["wer"]["final"]["rate"] == evaluation.files[0].score.final.rate
    assert first["committed_text"] == evaluation.files[0].committed_text
    with pytest.raises(ValueError, match="format_version 0; expected 1"):
        ManifestEvaluation.from_json_dict(data | {"format_version": 0})


# --- the CLI subcommand -----------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    """`qwen3-stream ARGV`'s exit status, also when argparse exits."""
    try:
        return cli_main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def test_cli_eval_prints_the_table_and_writes_json(
    tiny_checkpoint: Path, corpus: tuple[Path, list[SpokenAudio]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, _ = corpus
    out_json = tmp_path / "results" / "eval.json"
    argv = ["eval", str(manifest), "--model", str(tiny_checkpoint), "--tower", str(tiny_checkpoint / TOWER_OVERLAY_DIR)]
    argv += ["--block-frames", "96", "--max-new-tokens", "4", "--device", "cpu", "--json", str(out_json)]
    assert cli_main(argv) == 0
    table = capsys.readouterr().out
    for row in ("sentences.wav", "words.wav", "macro (mean of files)", "corpus (errors / words)"):
        assert row in table
    loaded = ManifestEvaluation.from_json_dict(json.loads(out_json.read_text()))
    assert loaded.options == SessionOptions.from_dict({"encoder": {"block_frames": 96}, "decode": {"max_new_tokens": 4}})
    assert loaded.tower_source == str(tiny_checkpoint / TOWER_OVERLAY_DIR / "model.safetensors")
    assert all(isinstance(result, FileResult) for result in loaded.files) and len(loaded.files) == 2


def test_cli_eval_options(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The session options `qwen3-stream eval` runs with; nothing read or loaded (the handler's steps are faked)."""
    seen: list[SessionOptions] = []

    def evaluate(model: None, manifest: Path, options: SessionOptions) -> SimpleNamespace:
        seen.append(options)
        return SimpleNamespace(report=None)

    monkeypatch.setattr(cli, "_load", lambda args, device: None)
    monkeypatch.setattr("pipeline.evaluation.read_checked_manifest", lambda path: [])
    monkeypatch.setattr("pipeline.evaluation.evaluate_manifest", evaluate)
    monkeypatch.setattr("pipeline.scoring.format_report", lambda report: "")

    assert cli_main(["eval", "m.jsonl", "--device", "cpu"]) == 0
    assert cli_main(["eval", "m.jsonl", "--device", "cpu", "--backend", "windowed", "--language", "auto"]) == 0
    defaults, windowed = seen
    assert defaults == SessionOptions(language="English")
    assert windowed == SessionOptions.windowed(language=None)
    capsys.readouterr()
    for flags, named in ((["--language", "klingon"], "--language"), (["--block-frames", "100"], "--block-frames")):
        assert _run(["eval", "m.jsonl", "--device", "cpu", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("qwen3-stream: error: ") and err.count("\n") == 1 and named in err, err
    assert len(seen) == 2


def test_cli_eval_reports_a_bad_manifest_without_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"audio": "gone.wav", "text": "hello"}) + "\n")
    assert cli_main(["eval", str(manifest), "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen3-stream: error: ") and err.count("\n") == 1
    assert "gone.wav" in err and "no-model" not in err
