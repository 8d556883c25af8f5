"""The `qwen3-stream` command: a thin dispatcher over `pipeline` (and, lazily, `deployments`).

All argument parsing lives here. Each subcommand is one `_add_<name>` function (its parser) plus one `_run_<name>`
handler that imports what it needs when it runs: `--help` must answer at once, and torch takes seconds to import.
Flags shared by several subcommands are defined once (`_add_model_arguments`, `_add_device_argument`, ...), so they
mean the same and default the same everywhere.

User errors (a missing or unreadable file, a device this machine lacks, an unknown language, an unreachable model
id, a bad count) end in one line `qwen3-stream: error: ...` on stderr and exit status 2; `--debug` adds the
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:  # annotations only: importing these loads torch
    from pipeline.checkpoint import ASRModel
    from pipeline.options import SessionOptions

PROG = "qwen3-stream"

# The published model ids, as in pipeline.checkpoint (not imported here: it loads torch). tests/test_cli.py pins
# them equal.
DEFAULT_MODEL_ID = "Qwen/Qwen3-ASR-0.6B"
DEFAULT_TOWER_ID = "qfuxa/qwen3-asr-0.6b-streaming"
DTYPES = ("auto", "float32", "bfloat16")
DECODE_STEPS = ("auto", "dynamic", "static", "cuda_graph")
HOST_POLICIES = ("default", "settled")  # pipeline.host_policy.POLICIES


class UsageError(Exception):
    """A request these inputs or this machine cannot satisfy, found once the arguments parsed: one line, exit 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the user asked for something impossible", not "the program is wrong".

    Called only from an `except` clause, i.e. while an exception is being handled, so the pipeline modules that
    define these types are imported only then (never for `--help`).
    """
    from deployments.embedded_store import ServerStartError
    from deployments.session_store import StoreUnavailable
    from pipeline.audio_io import AudioFileError
    from pipeline.checkpoint import CheckpointError
    from pipeline.scoring import ManifestError

    paths = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
    stores = (StoreUnavailable, ServerStartError)  # an unreachable --redis, an embedded store that cannot start
    return (UsageError, AudioFileError, CheckpointError, ManifestError, *stores, *paths)


# ---------------------------------------------------------------------------------------------
# Parsing: one-line errors, global flags, validators
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors have the one-line form of every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _add_global_flags(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    """`--debug` and `--verbose`, accepted before or after the subcommand.

    Subcommand parsers default to SUPPRESS: a subparser's defaults would otherwise overwrite a flag given before
    the subcommand name.
    """
    default = False if top_level else argparse.SUPPRESS
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks, also for user errors")
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="log at INFO level")


Handler = Callable[[argparse.Namespace], int]


def _command(
    commands: argparse._SubParsersAction, name: str, run: Handler | None, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand parser that takes the global flags and dispatches to `run` (None: to its own subcommands)."""
    parser = commands.add_parser(name, help=help, description=description or help)
    _add_global_flags(parser, top_level=False)
    if run is not None:
        parser.set_defaults(run=run)
    return parser


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


_count = _whole_number(1)  # streams, blocks, threads, tokens
_seed = _whole_number(0)


def _count_list(text: str) -> str:
    """An argparse type: comma-separated counts >= 1, returned normalized as the same comma-separated text
    (the form `pipeline.bench_engine.run_bench_engine_command` reads)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
    return ",".join(str(_count(part)) for part in parts)


def _choice_list(*choices: str) -> Callable[[str], str]:
    """An argparse type: comma-separated values, each one of `choices`, returned normalized."""

    def parse(text: str) -> str:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [part for part in parts if part not in choices]
        if unknown or not parts:
            raise argparse.ArgumentTypeError(f"got {text!r}; expected comma-separated values of {', '.join(choices)}")
        return ",".join(parts)

    return parse


def _minutes(allow_zero: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of minutes, > 0 (>= 0 with `allow_zero`)."""
    bound = ">= 0" if allow_zero else "> 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not ((value >= 0 if allow_zero else value > 0) and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a number of minutes {bound}, got {text!r}")
        return value

    return parse


# ---------------------------------------------------------------------------------------------
# Shared flags: each defined once
# ---------------------------------------------------------------------------------------------


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="torch device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N"
    )


def _add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights dtype (auto: bf16 on CUDA, fp32 on CPU; bf16 pays on CPUs with AVX512-BF16/AMX)",
    )


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """Which weights: the base model and its tower."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL_ID, help=f"base model: HF id or local directory (default {DEFAULT_MODEL_ID})"
    )
    parser.add_argument(
        "--tower",
        default=None,
        help=f"causal tower overlay: HF id, .safetensors file or directory; 'none': the base model's offline tower "
        f"(default: {DEFAULT_TOWER_ID} with --backend causal, none with --backend windowed)",
    )


def _add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """What a stream asks for: block size and language (for a session, or in a served stream's config)."""
    parser.add_argument(
        "--block-frames", type=int, choices=(192, 96), default=192, help="causal block size in mel frames"
    )
    parser.add_argument(
        "--language", default="en", help="forced output language, name or ISO code, or 'auto' to let the model name it"
    )
    parser.add_argument(
        "--allow-untrained-language",
        action="store_true",
        help="run a language other than English in causal mode (the causal tower was distilled on English only)",
    )
    parser.add_argument("--context", default="", help="biasing text for the decoder's prompt: names, terms (<= 64 tokens)")
    parser.add_argument(
        "--update-context",
        action="append",
        default=[],
        metavar="SECONDS=TEXT",
        help="replace the context once this much audio is sent (from the next segment on); repeatable",
    )
    parser.add_argument(
        "--vad", action="store_true", help="voice activity gate: skip silence, end utterances at pauses (causal)"
    )
    parser.add_argument(
        "--end-silence-ms", type=_count, default=800, help="with --vad: the pause that ends an utterance (default 800)"
    )
    parser.add_argument(
        "--finalize-every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="commit the tail every this much audio and keep going (a Finalize control)",
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, its tower, the backend and the session settings: everything that runs real weights."""
    _add_checkpoint_arguments(parser)
    parser.add_argument("--backend", choices=("causal", "windowed"), default="causal")
    _add_stream_arguments(parser)
    _add_device_argument(parser)
    _add_dtype_argument(parser)


# ---------------------------------------------------------------------------------------------
# Shared handler steps
# ---------------------------------------------------------------------------------------------


def _device(name: str) -> str:
    """`--device` as a device this machine has; 'auto': CUDA when available, else CPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return name
    if device.type != "cuda":
        raise UsageError(f"--device {name!r}: this runtime supports auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UsageError(f"--device {name}: {why}; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _session_options(args: argparse.Namespace) -> SessionOptions:
    """SessionOptions from the shared flags (`--max-new-tokens` where the subcommand has it)."""
    from pipeline.prompt import canonical_language
    from pipeline.options import SessionOptions

    language = None
    if args.language.strip().lower() != "auto":
        try:
            language = canonical_language(args.language)
        except ValueError as error:
            raise UsageError(f"--language: {error}") from None
    settings: dict = {
        "encoder": {"block_frames": args.block_frames},
        "language": language,
        "context": args.context,
        "allow_untrained_language": args.allow_untrained_language,
        "vad": {"enabled": args.vad, "end_silence_ms": args.end_silence_ms},
    }
    if getattr(args, "max_new_tokens", None) is not None:
        settings["decode"] = {"max_new_tokens": args.max_new_tokens}
    try:
        return SessionOptions.windowed(**settings) if args.backend == "windowed" else SessionOptions.from_dict(settings)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _context_updates(args: argparse.Namespace) -> list[tuple[float, str]]:
    """`--update-context SECONDS=TEXT` flags as (seconds, text), in time order."""
    updates = []
    for value in args.update_context:
        seconds, separator, text = value.partition("=")
        try:
            at = float(seconds)
        except ValueError:
            at = -1.0
        if not separator or at < 0:
            raise UsageError(f"--update-context {value!r}: expected SECONDS=TEXT, e.g. 12.5='Kubernetes, KubeRay'")
        updates.append((at, text))
    return sorted(updates)


def _finalize_every(args: argparse.Namespace) -> float | None:
    if args.finalize_every is not None and args.finalize_every <= 0:
        raise UsageError(f"--finalize-every {args.finalize_every}: expected a positive number of seconds")
    return args.finalize_every


def _tower(args: argparse.Namespace) -> str | None:
    """The overlay to load, or None for the base model's offline tower."""
    if args.tower is None:
        return DEFAULT_TOWER_ID if args.backend == "causal" else None
    return None if args.tower.lower() == "none" else args.tower


def _load(args: argparse.Namespace, device: str) -> ASRModel:
    from pipeline.checkpoint import dtype_from_name, load_model

    return load_model(args.model, tower=_tower(args), device=device, dtype=dtype_from_name(args.dtype))


def _show_progress() -> None:
    """Long commands report progress (per file, per stream count, per stream length) at INFO: show it."""
    logging.getLogger("pipeline").setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------


def _add_make_tiny_checkpoint(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "make-tiny-checkpoint",
        _run_make_tiny_checkpoint,
        help="write a tiny random model in the official Qwen3-ASR layout (tests, demos)",
    )
    parser.add_argument("out", help="output directory")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument(
        "--with-tower", action="store_true", help="also write a causal tower overlay in OUT/causal_tower"
    )


def _run_make_tiny_checkpoint(args: argparse.Namespace) -> int:
    from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR, make_tiny_checkpoint

    out = make_tiny_checkpoint(args.out, seed=args.seed, with_tower=args.with_tower)
    print(f"tiny Qwen3-ASR checkpoint written to {out}")
    if args.with_tower:
        print(f"causal tower overlay: {out / TOWER_OVERLAY_DIR}")
    return 0


def _add_transcribe(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "transcribe",
        _run_transcribe,
        help="stream audio files (WAV/FLAC/OGG): one through a session, several through the engine",
    )
    parser.add_argument("audio", nargs="+", help="audio files; resampled to 16 kHz mono")
    _add_model_arguments(parser)
    parser.add_argument("--realtime", action="store_true", help="pace the audio like a live source (one file)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per event, then {text, token_ids}; with several files every event names its file",
    )
    parser.add_argument(
        "--max-streams", type=_count, default=16, help="several files: how many the engine transcribes at once"
    )


def _run_transcribe(args: argparse.Namespace) -> int:
    import json

    from pipeline.audio_io import read_audio
    from pipeline.features import SAMPLE_RATE
    from pipeline.session import StreamingSession
    from pipeline.transcribe import StatusLine, stream_recording, terminal_text

    if len(args.audio) > 1:
        return _transcribe_many(args)
    options = _session_options(args)
    updates, finalize_every = _context_updates(args), _finalize_every(args)
    device = _device(args.device)
    audio = read_audio(args.audio[0])
    try:
        session = StreamingSession(_load(args, device), options)
    except ValueError as error:  # the context's token count
        raise UsageError(f"--context: {error}") from None
    status = None if args.json else StatusLine(duration_sec=audio.size / SAMPLE_RATE)
    events = stream_recording(
        session, audio, realtime=args.realtime, finalize_every_sec=finalize_every, context_updates=updates
    )
    for event in events:
        if status is None:
            print(json.dumps(event.to_dict()), flush=True)
        else:
            status.update(event)
    if status is None:
        print(json.dumps(_final_object(session)))
    else:
        status.close()
        print(terminal_text(session.transcript))
    return 0


def _final_object(session) -> dict:  # noqa: ANN001 (a StreamingSession; annotated lazily)
    """The final JSON object of a stream: the transcript of record, the model's final tokens and text, counts."""
    return {
        "text": session.transcript,
        "token_ids": session.token_ids,
        "final_hypothesis_text": session.final_hypothesis_text,
        "stats": {"revised_words": session.revised_words, "segments": session.segment_index + 1},
    }


def _transcribe_many(args: argparse.Namespace) -> int:
    """Several files: all through one multi-stream engine; each file's output equals a run on it alone."""
    import json

    from pipeline.audio_io import read_audio
    from pipeline.transcribe import terminal_text, transcribe_recordings

    if args.realtime or args.backend != "causal" or args.finalize_every or args.update_context:
        raise UsageError(
            "several files run through the multi-stream engine: causal backend, no --realtime, --finalize-every "
            "or --update-context"
        )
    options = _session_options(args)
    device = _device(args.device)
    recordings = {path: read_audio(path) for path in dict.fromkeys(args.audio)}
    for path, event in transcribe_recordings(_load(args, device), options, recordings, args.max_streams):
        if args.json:
            print(json.dumps({"file": path, **event.to_dict()}), flush=True)
        elif event.kind == "final":
            print(f"{terminal_text(path)}\t{terminal_text(event.transcript)}", flush=True)
    return 0


def _add_eval(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "eval",
        _run_eval,
        help="streaming WER harness: replay a JSONL manifest, report WER, commit latency and RTF",
        description="Replay every file of a JSONL manifest ({'audio', 'text', 'word_alignments'?} per line) "
        "through a streaming session and report final, real-streaming and committed-only WER "
        "(macro and corpus), commit latency p50/p95 and RTF, per file and overall. Progress on stderr.",
    )
    parser.add_argument("manifest", type=Path, help="JSONL manifest; audio paths relative to its folder")
    _add_model_arguments(parser)
    parser.add_argument(
        "--max-new-tokens", type=_count, default=None, help="decoder token budget per update (default 256)"
    )
    parser.add_argument("--json", type=Path, dest="json_out", metavar="OUT", help="also write the full results as JSON")


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from pipeline.evaluation import evaluate_manifest, read_checked_manifest
    from pipeline.scoring import format_report

    options = _session_options(args)
    device = _device(args.device)
    read_checked_manifest(args.manifest)  # a bad manifest fails before the (slow) model load
    _show_progress()
    evaluation = evaluate_manifest(_load(args, device), args.manifest, options)
    print(format_report(evaluation.report))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(evaluation.to_json_dict(), indent=2, allow_nan=False) + "\n")
        print(f"results written to {args.json_out}")
    return 0


def _add_bench(commands: argparse._SubParsersAction) -> None:
    parser = _command(commands, "bench", None, help="benchmarks (full-size architecture, random weights)")
    benches = parser.add_subparsers(dest="bench", required=True)
    for add in (_add_bench_flops, _add_bench_engine, _add_bench_roofline, _add_bench_serve, _add_bench_store, _add_bench_vad):
        add(benches)


def _add_bench_flops(benches: argparse._SubParsersAction) -> None:
    parser = _command(
        benches,
        "flops",
        _run_bench_flops,
        help="GFLOPs per audio second of both backends on the full-size model (meta device, no download)",
    )
    parser.add_argument(
        "--minutes",
        type=_minutes(allow_zero=False),
        nargs="+",
        default=None,
        help="stream lengths for the cost-vs-length table (default: 10 s, 30 s, 1, 5, 10, 60 min)",
    )
    parser.add_argument("--out", type=Path, help="write report.md, flops.json and the plot here")
    parser.add_argument(
        "--memory-minutes",
        type=_minutes(allow_zero=True),
        default=0.0,
        help="also stream this many minutes through a tiny causal session and sample process memory (0: skip)",
    )


def _run_bench_flops(args: argparse.Namespace) -> int:
    from pipeline.flops import DEFAULT_STREAM_MINUTES, run_flops_benchmark

    args.minutes = list(args.minutes or DEFAULT_STREAM_MINUTES)
    _show_progress()
    return run_flops_benchmark(args)


def _add_bench_engine(benches: argparse._SubParsersAction) -> None:
    parser = _command(
        benches, "engine", _run_bench_engine, help="multi-stream engine capacity at full size (random weights)"
    )
    parser.add_argument(
        "--streams", type=_count_list, default="1,2,4,8", help="comma-separated stream counts, measured in turn"
    )
    parser.add_argument("--blocks", type=_count, default=9, help="blocks per stream (9 x 1.92 s spans a segment roll)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a local checkpoint with its causal tower in CHECKPOINT/causal_tower (as make-tiny-checkpoint "
        "--with-tower writes) instead of the random full-size model; the tiny one makes the host work visible",
    )
    _add_device_argument(parser)
    parser.add_argument("--threads", type=_count, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--dtypes",
        type=_choice_list(*DTYPES),
        default="auto",
        help="comma-separated: auto (per device), float32, bfloat16; each measured in turn",
    )
    parser.add_argument("--blocks-per-update", type=_count, default=1, help="decoder update every k blocks")
    parser.add_argument(
        "--host-policy",
        type=_choice_list(*HOST_POLICIES),
        default="settled",
        help="comma-separated, each measured in turn: the process's garbage collector and allocator as CPython and "
        "glibc set them (default) or as serving processes settle them (settled: what the model load left frozen, a "
        "higher young-generation threshold, freed memory kept for reuse; pipeline.host_policy)",
    )
    parser.add_argument(
        "--arrivals",
        type=_choice_list("aligned", "staggered", "staggered-starts"),
        default="aligned",
        help="comma-separated: aligned (every stream's audio buffered, every step full: throughput), "
        "staggered (live streams at spread phases on a simulated real-time clock: latency with queueing) and/or "
        "staggered-starts (streams start at spread steps, a block every 2 steps: every step updates scattered "
        "slots; host time per phase and per stream, peak step memory)",
    )
    parser.add_argument(
        "--catch-up-blocks",
        type=_count_list,
        default="1",
        help="staggered runs, comma-separated: most blocks a lagging stream advances per step, decoded once",
    )
    parser.add_argument(
        "--decode-steps",
        type=_choice_list(*DECODE_STEPS),
        default="auto",
        help="comma-separated: how sequential steps run (auto, dynamic, static, cuda_graph), each measured in turn",
    )


def _run_bench_engine(args: argparse.Namespace) -> int:
    from pipeline.bench_engine import run_bench_engine_command

    args.device = _device(args.device)
    _show_progress()
    return run_bench_engine_command(args)


def _add_bench_roofline(benches: argparse._SubParsersAction) -> None:
    _command(benches, "roofline", _run_bench_roofline, help="ESTIMATED GPU capacity from counted FLOPs and bytes")


def _run_bench_roofline(args: argparse.Namespace) -> int:
    from pipeline.roofline import format_roofline

    print(format_roofline())
    return 0


def _add_bench_serve(benches: argparse._SubParsersAction) -> None:
    parser = _command(
        benches,
        "serve",
        _run_bench_serve,
        help="the served pipeline against the in-process engine: throughput, added latency, per-stage hops, transports",
    )
    parser.add_argument("--streams", type=_count_list, default="1,4,8", help="comma-separated stream counts")
    parser.add_argument("--full-size", action="store_true", help="a full-size random fp32 checkpoint (default: tiny)")
    parser.add_argument("--seconds", type=float, default=7.68, help="audio per stream (7.68 s = 4 blocks)")
    parser.add_argument("--max-new-tokens", type=_count, default=16, help="tokens each update decodes (same both sides)")
    parser.add_argument(
        "--transports", type=_choice_list("grpc", "by_reference"), default="grpc,by_reference", help="comma-separated"
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=2.0,
        help="how long a call to an idle stage waits for company, and a stage after a batch for callers that come straight back (CPU: ~200)",
    )  # fmt: skip
    parser.add_argument("--decoder-threads", type=_count, default=1, help="CPUs (torch threads) of the Decoder")
    parser.add_argument("--json", type=Path, help="also write the results here")


def _run_bench_serve(args: argparse.Namespace) -> int:
    import json

    from deployments.bench_serve import format_serve_table, run_serve_bench, summary_dicts

    _show_progress()
    logging.getLogger("deployments").setLevel(logging.INFO)
    streams = [int(n) for n in args.streams.split(",")]
    results = run_serve_bench(
        args.full_size, streams, args.seconds, args.max_new_tokens, args.transports.split(","),
        batch_wait_ms=args.batch_wait_ms, decoder_threads=args.decoder_threads,
    )  # fmt: skip
    print(format_serve_table(results, args.max_new_tokens, args.batch_wait_ms, args.decoder_threads))
    if args.json is not None:
        args.json.write_text(json.dumps(summary_dicts(results), indent=2))
    return 0


def _add_bench_store(benches: argparse._SubParsersAction) -> None:
    parser = _command(
        benches, "store", _run_bench_store, help="session store cost: round trips per stream-minute, roll latency"
    )
    parser.add_argument("--redis", default=None, metavar="URL", help="a Redis to measure (default: the embedded one)")
    parser.add_argument("--rolls", type=_count, default=200, help="segment rolls to write")


def _run_bench_store(args: argparse.Namespace) -> int:
    from deployments.bench_store import format_store_result, run_store_bench

    print(format_store_result(run_store_bench(args.redis, args.rolls)))
    return 0


def _add_bench_vad(benches: argparse._SubParsersAction) -> None:
    parser = _command(
        benches, "vad", _run_bench_vad, help="what the voice gate saves on a recording: model work with it off and on"
    )
    parser.add_argument("audio", help="a recording with pauses (WAV/FLAC/OGG)")
    _add_model_arguments(parser)


def _run_bench_vad(args: argparse.Namespace) -> int:
    from pipeline.audio_io import read_audio
    from pipeline.bench_vad import format_gate_bench, run_gate_bench
    from pipeline.features import SAMPLE_RATE

    options = _session_options(args)  # the gate is switched off and on whatever --vad says
    audio = read_audio(args.audio)
    runs = run_gate_bench(_load(args, _device(args.device)), audio, options)
    print(format_gate_bench(runs, audio.size / SAMPLE_RATE))
    return 0


def _add_loadtest(commands: argparse._SubParsersAction) -> None:
    # Its flags live beside their bounds and validators (deployments.loadtest imports only the standard library
    # until it runs, so --help stays instant).
    from deployments.loadtest import add_loadtest_parser

    add_loadtest_parser(commands)


def _add_soak(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "soak",
        _run_soak,
        help="long streams through a local served pipeline (tiny model), sampling memory, store keys and slots",
    )
    parser.add_argument("--streams", type=_count, default=4, help="concurrent streams")
    parser.add_argument("--minutes", type=_minutes(allow_zero=False), default=60.0, help="audio per stream")
    parser.add_argument("--interval", type=float, default=10.0, metavar="SECONDS", help="sampling interval")
    parser.add_argument(
        "--churn", type=int, default=0, metavar="N", help="meanwhile open and drop N more streams (leak check)"
    )
    parser.add_argument("--out", type=Path, default=Path("soak"), help="where soak.json, soak.md and soak.png go")


def _run_soak(args: argparse.Namespace) -> int:
    from deployments.soak import run_soak, write_report

    logging.getLogger("deployments").setLevel(logging.INFO)
    if args.churn < 0:
        raise UsageError(f"--churn {args.churn}: expected 0 or more streams")
    result = run_soak(args.streams, args.minutes, args.interval, churn=args.churn)
    print(write_report(result, args.out))
    clean = result.churn == 0 or (result.leases_left == 0 and result.keys_without_ttl == 0 and result.settle_s >= 0)
    return 0 if not result.errors and result.finals == args.streams and clean else 1


#: One function per subcommand, in `--help` order. A new subcommand is one `_add_<name>` (and its handler) here.
def _add_serve(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "serve",
        _run_serve,
        help="start a local Ray and the served pipeline (gRPC on --port); Ctrl-C stops it",
    )
    parser.add_argument("--config", default=None, help="Serve config YAML (default: deployments/serve_config.yaml)")
    _add_checkpoint_arguments(parser)
    _add_device_argument(parser)
    _add_dtype_argument(parser)
    parser.add_argument("--port", type=_count, default=None, help="gRPC port (default: the config's, 50051)")
    parser.add_argument(
        "--transport",
        choices=("grpc", "by_reference"),
        default=None,
        help="how stage calls travel between deployments (default: the faster one measured, see BENCHMARKS.md)",
    )
    parser.add_argument(
        "--max-new-tokens", type=_count, default=None, help="the streams' token budget per update (default 256)"
    )
    parser.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="session store redis://[:password@]host:port/db (rediss:// for TLS); default: an embedded server",
    )
    parser.add_argument(
        "--api-keys",
        default=None,
        metavar="FILE",
        help="require `authorization: Bearer <key>`: one name:key[:max_streams] per line (default: open, or the "
        "QWEN3_STREAM_API_KEYS variable)",
    )
    _add_server_tls_arguments(parser, "serve TLS on --port (Serve's proxy then listens on a free internal port)")


def _add_server_tls_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """A TLS server's files: certificate and key, and for mutual TLS the CA of its clients' certificates."""
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help=f"{what}: the certificate chain")
    parser.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="its private key (with --tls-cert)")
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        metavar="PEM",
        help="mutual TLS: require client certificates signed by this CA",
    )


def _server_tls(args: argparse.Namespace):  # noqa: ANN202 (deployments.tls_front.TlsFiles, imported lazily)
    """The TLS files the flags name (None: no TLS), each read and checked now: a bad one is one line."""
    from deployments.tls_front import TlsFiles

    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise UsageError("--tls-cert and --tls-key go together: give both, or neither for plaintext")
    files = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
    try:
        files.credentials()
    except ValueError as error:
        raise UsageError(str(error)) from None
    return files


def _run_serve(args: argparse.Namespace) -> int:
    from deployments import server
    from pipeline.checkpoint import resolve_model_dir, resolve_tower_file

    tower = _tower(argparse.Namespace(tower=args.tower, backend="causal"))
    # Resolve the weights here, so that a missing or offline checkpoint is one line, not a replica's traceback.
    model = str(resolve_model_dir(args.model))
    tower = None if tower is None else str(resolve_tower_file(tower))
    settings = server.ServerSettings(
        args={"model": model, "tower": tower or "none"},
        port=args.port,
        transport=args.transport or server.DEFAULT_TRANSPORT,
        redis=args.redis,
    )
    settings.args["device"] = _device(args.device)
    if settings.args["device"].startswith("cuda"):  # the GPU stages share the GPU; Ray hides it from the others
        gpu = {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0.5}}
        settings.deployment_options = {"CausalEncoder": gpu, "Decoder": gpu}
    if args.dtype != "auto":
        settings.args["dtype"] = args.dtype
    if args.max_new_tokens is not None:
        settings.args["session"] = {"decode": {"max_new_tokens": args.max_new_tokens}}
    if args.api_keys is not None:
        from deployments.auth import load_keys

        try:  # a missing or malformed file is one line here, not a replica's traceback
            load_keys(args.api_keys)
        except ValueError as error:
            raise UsageError(f"--api-keys {args.api_keys}: {error}") from None
        settings.args["api_keys_file"] = str(Path(args.api_keys).resolve())
    if args.config is not None:
        settings.config = Path(args.config)
    settings.tls = _server_tls(args)
    server.serve_until_interrupted(settings, announce=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def _add_stream(commands: argparse._SubParsersAction) -> None:
    parser = _command(commands, "stream", _run_stream, help="stream audio files to a server over gRPC, concurrently")
    parser.add_argument("audio", nargs="+", help="audio files; resampled to 16 kHz mono")
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of a qwen3-stream server")
    _add_stream_arguments(parser)
    parser.add_argument("--realtime", action="store_true", help="pace each file like a live source")
    parser.add_argument("--chunk-ms", type=_count, default=100, help="audio per message")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per result, then per file {text, token_ids, ...}"
    )
    parser.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS", help="wait up to this long for the server to be ready"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="the API key to send (default: the QWEN3_STREAM_API_KEY variable; none: no authorization)",
    )
    parser.add_argument(
        "--max-resumes",
        type=_whole_number(0),
        default=3,
        help="resume a stream whose connection broke (ingress lost, network) at most this many times",
    )
    parser.add_argument(
        "--reconnect-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="drop the connection once after this much audio and resume the session (demos, tests)",
    )
    parser.add_argument(
        "--tls-ca", type=Path, default=None, metavar="PEM", help="connect with TLS, trusting servers this CA signed"
    )
    parser.add_argument(
        "--tls-cert", type=Path, default=None, metavar="PEM", help="mutual TLS: this client's certificate (with --tls-ca)"
    )
    parser.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="mutual TLS: its private key")


def _run_stream(args: argparse.Namespace) -> int:
    import asyncio
    import json

    import grpc

    from deployments.client import RecognizerClient, StreamOptions, tls_credentials, wait_until_serving
    from pipeline.audio_io import read_audio
    from pipeline.transcribe import terminal_text

    credentials = None
    if args.tls_ca is None and (args.tls_cert is not None or args.tls_key is not None):
        raise UsageError("--tls-cert/--tls-key need --tls-ca (the CA that signed the server's certificate)")
    if args.tls_ca is not None:
        try:
            credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        except (OSError, ValueError) as error:
            raise UsageError(f"TLS files: {error}") from None

    language = "" if args.language.strip().lower() == "auto" else args.language
    finalize_every = _finalize_every(args)
    options = StreamOptions(
        language=language,
        block_frames=args.block_frames,
        chunk_ms=args.chunk_ms,
        realtime=args.realtime,
        context=args.context,
        voice_activity=args.vad,
        end_silence_ms=args.end_silence_ms,
        allow_untrained_language=args.allow_untrained_language,
        finalize_every_ms=0 if finalize_every is None else round(finalize_every * 1000),
        context_updates=tuple(_context_updates(args)),
    )
    recordings = {path: read_audio(path) for path in dict.fromkeys(args.audio)}
    key = args.api_key or os.environ.get("QWEN3_STREAM_API_KEY")
    metadata = [("authorization", f"Bearer {key}")] if key else None

    def show(path: str):  # noqa: ANN202
        def on_result(result) -> None:  # noqa: ANN001
            if args.json:
                print(json.dumps({"file": path, **_message_dict(result)}), flush=True)
            elif result.committed:
                words = " ".join(word.text for word in result.committed)
                print(f"{terminal_text(path)}: {terminal_text(words)}", file=sys.stderr, flush=True)

        return on_result

    async def run_all():  # noqa: ANN202
        async with RecognizerClient(args.server, credentials=credentials) as client:
            if args.wait > 0:
                await wait_until_serving(client.channel, args.wait)
            return await asyncio.gather(
                *(
                    client.recognize(
                        audio,
                        options,
                        on_result=show(path),
                        reconnect_after_s=args.reconnect_after,
                        max_resumes=args.max_resumes,
                        metadata=metadata,
                    )
                    for path, audio in recordings.items()
                )
            )

    try:
        outcomes = asyncio.run(run_all())
    except grpc.aio.AioRpcError as error:
        raise UsageError(f"{args.server}: {error.code().name}: {error.details()}") from None
    except TimeoutError as error:
        raise UsageError(f"{args.server}: {error}") from None
    for path, outcome in zip(recordings, outcomes):
        final = outcome.final
        if args.json:
            live = {
                "warnings": outcome.warnings,
                "speech": [_message_dict(event) for event in outcome.speech],
                "finalized": [_message_dict(answer) for answer in outcome.finalized],
                "context_updated": [_message_dict(answer) for answer in outcome.context_updates],
            }
            print(json.dumps({"file": path, "text": outcome.text, **live, **_message_dict(final)}), flush=True)
        else:
            print(f"{terminal_text(path)}\t{terminal_text(outcome.text)}", flush=True)
    return 0


def _add_tls_front(commands: argparse._SubParsersAction) -> None:
    parser = _command(
        commands,
        "tls-front",
        _run_tls_front,
        help="a TLS front for a plaintext server (the Kubernetes sidecar); `serve --tls-cert` runs one itself",
    )
    parser.add_argument("--port", type=_count, default=50051, help="the public TLS port")
    parser.add_argument(
        "--upstream", default="127.0.0.1:50052", metavar="HOST:PORT", help="Serve's plaintext gRPC proxy"
    )
    _add_server_tls_arguments(parser, "required")


def _run_tls_front(args: argparse.Namespace) -> int:
    import asyncio

    from deployments.tls_front import GrpcFront

    tls = _server_tls(args)
    if tls is None:
        raise UsageError("tls-front needs --tls-cert and --tls-key")
    front = GrpcFront(args.upstream, tls, args.port)
    print(f"qwen3-stream: TLS on port {args.port} -> {args.upstream}; Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        asyncio.run(front.serve_until_cancelled())
    except KeyboardInterrupt:
        print("qwen3-stream: stopping", file=sys.stderr, flush=True)
    return 0


def _message_dict(message) -> dict:  # noqa: ANN001 (a protobuf message)
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


#: One function per subcommand, in `--help` order. A new subcommand is one `_add_<name>` (and its handler) here.
SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_make_tiny_checkpoint,
    _add_transcribe,
    _add_eval,
    _add_bench,
    _add_serve,
    _add_stream,
    _add_tls_front,
    _add_loadtest,
    _add_soak,
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; imports nothing beyond the standard library."""
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    _add_global_flags(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(commands)
    return parser


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever `sys.stderr` is when a record is written (tests swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LogFormatter(logging.Formatter):
    """Log lines in the form of the one-line errors: `qwen3-stream: [warning: ]message` (with --debug, the
    logger's name too)."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def formatMessage(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        where = f"[{record.name}] " if self.debug else ""
        return f"{PROG}: {level}{where}{record.message}"


def _configure_logging(verbose: bool, debug: bool) -> None:
    """Logs go to stderr at WARNING (INFO with --verbose); long commands raise `pipeline` to INFO for progress."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)  # main() may run several times in one process (tests)
    handler = _StderrHandler()
    handler.setFormatter(_LogFormatter(debug))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.NOTSET)


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, args.debug)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as error:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
