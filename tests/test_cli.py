"""The `qwen3-stream transcribe` command on speech made by espeak-ng and the tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli import main as cli_main
from pipeline.audio_io import read_audio
from pipeline.checkpoint import load_model
from pipeline.session import SessionOptions, StreamingSession
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR
from tests.speech import speak


def _transcribe(tiny_checkpoint: Path, *args: Path | str) -> int:
    """`transcribe` with the tiny checkpoint; args are audio paths and extra flags."""
    model = ["--model", str(tiny_checkpoint), "--tower", str(tiny_checkpoint / TOWER_OVERLAY_DIR)]
    return cli_main(["transcribe", *map(str, args), *model])


def test_transcribe_json_streams_events_then_the_whole_transcript(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    wav = speak("Streaming speech recognition, one block at a time.", tmp_path / "speech.wav", seed=0).path
    assert _transcribe(tiny_checkpoint, wav, "--json") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    events, final = lines[:-1], lines[-1]
    assert [e["kind"] for e in events][-1] == "final" and {e["kind"] for e in events} <= {"update", "segment", "final"}
    assert [e["audio_sec"] for e in events] == sorted(e["audio_sec"] for e in events)
    words = [w["text"] for e in events for w in e["new_words"]]
    assert final["text"] == " ".join(words) and final["token_ids"]
    assert all(isinstance(t, int) for t in final["token_ids"])


def test_transcribe_text_mode_prints_the_transcript(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    wav = speak("Hello world.", tmp_path / "hello.wav", seed=1).path
    assert _transcribe(tiny_checkpoint, wav, "--backend", "windowed", "--block-frames", "96") == 0
    captured = capsys.readouterr()
    assert "s]" in captured.err  # the progress line
    assert captured.out.endswith("\n")


def test_transcribe_in_bf16_gives_the_bf16_session_transcript(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    wav = speak("Brief words in bf16.", tmp_path / "bf16.wav", seed=3).path
    assert _transcribe(tiny_checkpoint, wav, "--json", "--dtype", "bfloat16") == 0
    final = json.loads(capsys.readouterr().out.splitlines()[-1])
    model = load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR, dtype=torch.bfloat16)
    session = StreamingSession(model, SessionOptions(language="en"))
    session.push_audio(read_audio(wav))
    session.finish()
    assert final["token_ids"] == session.token_ids


def test_several_files_go_through_the_engine_and_match_single_runs(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    texts = ["First file, a short one.", "The second file says a little more than the first.", "Third."]
    wavs = [str(speak(text, tmp_path / f"{index}.wav", seed=10 + index).path) for index, text in enumerate(texts)]
    alone = []
    for wav in wavs:
        assert _transcribe(tiny_checkpoint, Path(wav), "--json") == 0
        alone.append([json.loads(line) for line in capsys.readouterr().out.splitlines()][:-1])
    assert _transcribe(tiny_checkpoint, *map(Path, wavs), "--json", "--max-streams", "2") == 0
    together = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for wav, expected in zip(wavs, alone):
        events = [{key: value for key, value in e.items() if key != "file"} for e in together if e["file"] == wav]
        assert events == expected
    assert _transcribe(tiny_checkpoint, *map(Path, wavs)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(wavs)


def test_offline_without_the_published_model_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    wav = speak("Hi.", tmp_path / "hi.wav", seed=2).path
    assert cli_main(["transcribe", str(wav)]) == 2
    err = capsys.readouterr().err
    assert "Qwen/Qwen3-ASR-0.6B" in err and "--model DIR" in err and "Traceback" not in err
