"""The `qwen3-stream` command as users meet it: `transcribe` on espeak-ng speech and the tiny checkpoint, one-line
user errors, `--help` without torch, progress of the long commands, escaped terminal text, shared flags."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import cli
from cli import main as cli_main
from pipeline.audio_io import read_audio
from pipeline.checkpoint import load_model
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR
from tests.speech import speak

REPO = Path(__file__).resolve().parents[1]


def _model_flags(tiny_checkpoint: Path) -> list[str]:
    # --device cpu: the comparisons below are against CPU sessions, also on a machine with a GPU.
    return ["--model", str(tiny_checkpoint), "--tower", str(tiny_checkpoint / TOWER_OVERLAY_DIR), "--device", "cpu"]


def _transcribe(tiny_checkpoint: Path, *args: Path | str) -> int:
    """`transcribe` with the tiny checkpoint; args are audio paths and extra flags."""
    return cli_main(["transcribe", *map(str, args), *_model_flags(tiny_checkpoint)])


def _run(argv: list[str]) -> int:
    """`main(argv)`'s exit status, also when argparse exits."""
    try:
        return cli_main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


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
        (events, confidences), (expected, expected_confidences) = _without_confidence(events), _without_confidence(expected)
        assert events == expected
        # Batched with other streams, the same tokens' probabilities may differ in their last bits.
        assert confidences == pytest.approx(expected_confidences, abs=1e-4)
    assert _transcribe(tiny_checkpoint, *map(Path, wavs)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(wavs)


def _without_confidence(events: list[dict]) -> tuple[list[dict], list[float | None]]:
    """The events with their words' confidences taken out, and those confidences in order."""
    confidences = [word.pop("confidence") for event in events for word in event.get("new_words", [])]
    return events, confidences


def test_offline_without_the_published_model_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    wav = speak("Hi.", tmp_path / "hi.wav", seed=2).path
    assert cli_main(["transcribe", str(wav), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen3-stream: error: ") and err.count("\n") == 1
    assert "Qwen/Qwen3-ASR-0.6B" in err and "--model DIR" in err and "Traceback" not in err
    assert "`hf download Qwen/Qwen3-ASR-0.6B --local-dir DIR`" in err


def test_the_offline_hint_names_a_command_that_exists() -> None:
    """`huggingface-cli` is gone from recent huggingface_hub; `hf download REPO --local-dir DIR` is the command."""
    hf = shutil.which("hf") or pytest.skip("huggingface_hub's `hf` command is not on PATH")
    usage = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--local-dir" in usage.stdout


# --- user errors: one line, exit status 2, traceback only with --debug ---------------------------------------------


@pytest.fixture
def bad_audio(tmp_path: Path) -> dict[str, Path]:
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16_000)
    (tmp_path / "noise.wav").write_bytes(b"this is not audio")
    sf.write(tmp_path / "ok.wav", np.zeros(16_000, dtype=np.float32), 16_000)
    names = {"missing": "missing.wav", "empty": "empty.wav", "undecodable": "noise.wav", "ok": "ok.wav"}
    return {case: tmp_path / name for case, name in names.items()}


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing", [], "does not exist"),
        ("empty", [], "is empty"),
        ("undecodable", [], "cannot decode audio file"),
        ("ok", ["--device", "cuda:99"], "--device cuda:99"),
        ("ok", ["--device", "tpu"], "--device 'tpu'"),
        ("ok", ["--language", "klingon"], "unknown language 'klingon'"),
        ("ok", ["--max-streams", "0"], "argument --max-streams: expected a whole number >= 1, got '0'"),
        ("ok", ["--block-frames", "100"], "argument --block-frames"),
        ("ok", ["--realtime", "AGAIN"], "several files run through the multi-stream engine"),
    ],
)
def test_user_errors_are_one_line_with_exit_status_2(
    tiny_checkpoint: Path, bad_audio: dict[str, Path], capsys, case: str, extra: list[str], message: str
) -> None:
    audio = [str(bad_audio[case])] + ([str(bad_audio["ok"])] if "AGAIN" in extra else [])
    extra = [flag for flag in extra if flag != "AGAIN"]
    assert _run(["transcribe", *audio, *_model_flags(tiny_checkpoint), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("qwen3-stream: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "engine", "--streams", "1,0"], "argument --streams"),
        (["bench", "engine", "--blocks", "0"], "argument --blocks"),
        (["bench", "engine", "--arrivals", "sideways"], "argument --arrivals"),
        (["bench", "engine", "--decode-steps", "warp"], "argument --decode-steps"),
        (["bench", "flops", "--minutes", "0"], "argument --minutes"),
        (["eval", "m.jsonl", "--max-new-tokens", "0"], "argument --max-new-tokens"),
        (["make-tiny-checkpoint", "out", "--seed", "-1"], "argument --seed"),
        (["transcribe"], "the following arguments are required: audio"),
        (["bench"], "the following arguments are required"),
    ],
)
def test_bad_arguments_are_one_line_with_exit_status_2(capsys, argv: list[str], message: str) -> None:
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen3-stream: error: ") and err.count("\n") == 1 and message in err, err


def test_eval_manifest_errors_are_one_line(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"audio": "gone.wav", "text": "hello"}) + "\n")
    assert _run(["eval", str(manifest), "--model", str(tmp_path / "no-model"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen3-stream: error: ") and err.count("\n") == 1 and "gone.wav" in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(bad_audio: dict[str, Path], capsys, where: str) -> None:
    argv = ["transcribe", str(bad_audio["missing"])]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "FileNotFoundError" in err
    assert err.splitlines()[-1].startswith("qwen3-stream: error: ")


def test_global_flags_go_before_or_after_the_subcommand() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["-v", "transcribe", "a.wav"]).verbose
    assert parser.parse_args(["transcribe", "a.wav", "-v"]).verbose
    assert parser.parse_args(["bench", "roofline", "--debug"]).debug
    plain = parser.parse_args(["transcribe", "a.wav"])
    assert not plain.verbose and not plain.debug


# --- --help answers at once: no torch, transformers or pipeline import before a command runs --------------------------


def test_help_imports_no_heavy_module() -> None:
    commands = [[], ["make-tiny-checkpoint"], ["transcribe"], ["eval"], ["bench"]]
    commands += [["bench", name] for name in ("flops", "engine", "roofline")]
    script = f"""
import contextlib, io, sys
import cli
for command in {commands!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            cli.main([*command, "--help"])
        except SystemExit as exit_:
            assert exit_.code == 0 and "usage: qwen3-stream" in out.getvalue(), (command, exit_.code)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "numpy", "pipeline"))
print(heavy)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- shared flags -----------------------------------------------------------------------------------------------------


def _subcommand_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix}{name}"] = sub
                found |= _subcommand_parsers(sub, f"{prefix}{name} ")
    return found


SHARED_FLAGS = ["--device", "--tower", "--language", "--model", "--dtype", "--backend", "--block-frames"]


@pytest.mark.parametrize("flag", SHARED_FLAGS)
def test_a_flag_has_the_same_default_and_help_in_every_subcommand(flag: str) -> None:
    seen = {}
    for name, parser in _subcommand_parsers(cli.build_parser()).items():
        for action in parser._actions:
            if flag in action.option_strings:
                seen[name] = (action.default, action.help, action.choices, action.type)
    assert len(seen) >= 2, seen  # transcribe and eval (and bench engine: --device)
    assert len(set(map(repr, seen.values()))) == 1, seen


def test_cli_defaults_are_the_pipeline_defaults() -> None:
    from pipeline.checkpoint import DEFAULT_MODEL_ID, DEFAULT_TOWER_ID, DTYPES
    from pipeline.engine import DECODE_STEP_KINDS
    from pipeline.host_policy import POLICIES

    assert (cli.DEFAULT_MODEL_ID, cli.DEFAULT_TOWER_ID) == (DEFAULT_MODEL_ID, DEFAULT_TOWER_ID)
    assert cli.DTYPES == ("auto", *DTYPES) and cli.DECODE_STEPS == ("auto", *DECODE_STEP_KINDS)
    assert cli.HOST_POLICIES == tuple(POLICIES)
    eval_parser = _subcommand_parsers(cli.build_parser())["eval"]
    budget = next(action for action in eval_parser._actions if "--max-new-tokens" in action.option_strings)
    assert f"(default {SessionOptions().decode.max_new_tokens})" in budget.help


def test_device_auto_is_cuda_when_available_else_cpu() -> None:
    assert cli._device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cli._device("cpu") == "cpu"


# --- terminal text is escaped, JSON is exact ----------------------------------------------------------------------------

HOSTILE = "clear\x1b[2J the screen\rback\u202eevil\x07"


def _fake_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """transcribe without a model: a session whose events and transcript carry control characters."""

    class FakeEvent:  # what the command reads of a TranscriptEvent
        kind, new_words, tentative, transcript, audio_sec = "final", (), HOSTILE, HOSTILE, 1.0

        def to_dict(self) -> dict:
            return {"kind": self.kind, "tentative": self.tentative, "transcript": self.transcript}

    class FakeSession:
        transcript, token_ids, final_hypothesis_text, revised_words, segment_index = HOSTILE, [1, 2], HOSTILE, 0, 0

        def __init__(self, model, options) -> None:
            pass

    monkeypatch.setattr(cli, "_load", lambda args, device: None)
    monkeypatch.setattr("pipeline.session.StreamingSession", FakeSession)
    monkeypatch.setattr("pipeline.transcribe.stream_recording", lambda session, audio, **options: iter([FakeEvent()]))


def test_terminal_text_escapes_control_characters(bad_audio: dict[str, Path], monkeypatch, capsys) -> None:
    _fake_run(monkeypatch)
    assert cli_main(["transcribe", str(bad_audio["ok"]), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "clear\\x1b[2J the screen\\rback\\u202eevil\\x07\n"
    for raw in ("\x1b", "\r", "\u202e", "\x07"):
        assert raw not in captured.out and raw not in captured.err


def test_json_output_keeps_the_exact_text(bad_audio: dict[str, Path], monkeypatch, capsys) -> None:
    _fake_run(monkeypatch)
    assert cli_main(["transcribe", str(bad_audio["ok"]), "--device", "cpu", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["transcript"] == lines[0]["tentative"] == lines[1]["text"] == HOSTILE


# --- progress of the long commands on stderr ----------------------------------------------------------------------------


def test_eval_shows_progress_per_file(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    spoken = [speak(text, tmp_path / f"{index}.wav", seed=20 + index) for index, text in enumerate(["One.", "Two."])]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(audio.manifest_row(tmp_path)) + "\n" for audio in spoken))
    flags = [*_model_flags(tiny_checkpoint), "--max-new-tokens", "4", "--json", str(tmp_path / "r.json")]
    assert cli_main(["eval", str(manifest), *flags]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("qwen3-stream: [")]
    assert [line.split(":")[1].strip() for line in progress] == ["[1/2] 0.wav", "[2/2] 1.wav"]
    assert "macro (mean of files)" in captured.out and (tmp_path / "r.json").is_file()


def test_bench_flops_shows_progress_per_stream_length(monkeypatch, capsys) -> None:
    from pipeline import flops
    from pipeline.config import TINY_AUDIO, TINY_TEXT, Qwen3ASRConfig

    tiny, counter = Qwen3ASRConfig(audio=TINY_AUDIO, text=TINY_TEXT), flops.ModelFlopCounter
    monkeypatch.setattr(flops, "ModelFlopCounter", lambda: counter(tiny, device="cpu"))  # the full size takes minutes
    assert cli_main(["bench", "flops", "--minutes", "0.2", "0.3"]) == 0
    err = capsys.readouterr().err
    for length in ("12 s", "18 s"):
        for backend in flops.BACKENDS:
            assert f"qwen3-stream: bench flops: counting a {length} {backend} stream" in err


def test_bench_engine_shows_progress_per_stream_count(tiny_checkpoint: Path, monkeypatch, capsys) -> None:
    from pipeline import bench_engine

    tiny = load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR)
    monkeypatch.setattr(bench_engine, "random_full_size_model", lambda device, dtype: tiny)
    assert cli_main(["bench", "engine", "--streams", "1,2", "--blocks", "2", "--device", "cpu", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    for count in (1, 2):
        assert f"qwen3-stream: bench engine: N={count} aligned streams" in err
        assert f"qwen3-stream: bench engine: N={count} done" in err
