"""The `qwen3-stream` command: a thin dispatcher over `pipeline` (and, lazily, `deployments`).

Each subcommand parses its arguments here and calls one library function; no logic lives in this module.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _make_tiny_checkpoint(args: argparse.Namespace) -> int:
    from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR, make_tiny_checkpoint

    out = make_tiny_checkpoint(args.out, seed=args.seed, with_tower=args.with_tower)
    print(f"tiny Qwen3-ASR checkpoint written to {out}")
    if args.with_tower:
        print(f"causal tower overlay: {out / TOWER_OVERLAY_DIR}")
    return 0


def _session_options(args: argparse.Namespace):
    from pipeline.session import SessionOptions

    overrides = {"block_frames": args.block_frames, "language": args.language}
    if args.backend == "windowed":
        return SessionOptions.windowed(**overrides)
    return SessionOptions(**overrides)


def _load(args: argparse.Namespace):
    from pipeline.checkpoint import dtype_from_name, load_model

    tower = None if args.backend == "windowed" or args.tower.lower() == "none" else args.tower
    return load_model(args.model, tower=tower, device=args.device, dtype=dtype_from_name(args.dtype))


def _transcribe(args: argparse.Namespace) -> int:
    if len(args.audio) > 1:
        return _transcribe_many(args)
    import json

    from pipeline.audio_io import read_audio
    from pipeline.session import StreamingSession
    from pipeline.transcribe import stream_recording

    audio = read_audio(args.audio[0])
    session = StreamingSession(_load(args), _session_options(args))
    duration = audio.size / 16000
    committed = ""
    for event in stream_recording(session, audio, realtime=args.realtime):
        if args.json:
            print(json.dumps(event.to_dict()), flush=True)
            continue
        committed += "".join(" " + word.text for word in event.new_words)
        # One status line, rewritten in place: progress, committed text, then the tentative tail.
        progress = f"[{event.audio_sec:6.1f}/{duration:.1f}s]"
        line = f"{progress}{committed[-60:]} \033[2m{event.tentative[:40]}\033[0m"
        print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"text": session.transcript, "token_ids": session.token_ids}))
    else:
        print(file=sys.stderr)
        print(session.transcript)
    return 0


def _transcribe_many(args: argparse.Namespace) -> int:
    """Several files: all through one multi-stream engine; each file's output equals a run on it alone."""
    import json

    from pipeline.audio_io import read_audio
    from pipeline.transcribe import transcribe_recordings

    if args.realtime or args.backend != "causal":
        raise SystemExit("several files run through the multi-stream engine: causal backend, no --realtime")
    recordings = {path: read_audio(path) for path in dict.fromkeys(args.audio)}
    for path, event in transcribe_recordings(_load(args), _session_options(args), recordings, args.max_streams):
        if args.json:
            print(json.dumps({"file": path, **event.to_dict()}), flush=True)
        elif event.kind == "final":
            print(f"{path}\t{event.transcript}", flush=True)
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.checkpoint import DEFAULT_MODEL_ID, DEFAULT_TOWER_ID

    parser.add_argument("--model", default=DEFAULT_MODEL_ID, help="base model: HF id or local directory")
    parser.add_argument("--tower", default=DEFAULT_TOWER_ID, help="causal tower: HF id, .safetensors file or directory ('none': base tower)")
    parser.add_argument("--backend", choices=["causal", "windowed"], default="causal")
    parser.add_argument("--block-frames", type=int, choices=[192, 96], default=192)
    parser.add_argument("--language", default="en", help="forced output language (name or ISO code)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="weights dtype (auto: bf16 on CUDA, fp32 on CPU; bf16 pays on CPUs with AVX512-BF16/AMX)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3-stream", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser(
        "make-tiny-checkpoint", help="write a tiny random model in the official Qwen3-ASR layout (tests, demos)"
    )
    tiny.add_argument("out", help="output directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--with-tower", action="store_true", help="also write a causal tower overlay in OUT/causal_tower")
    tiny.set_defaults(run=_make_tiny_checkpoint)

    transcribe = commands.add_parser(
        "transcribe", help="stream audio files (WAV/FLAC/OGG): one through a session, several through the engine"
    )
    transcribe.add_argument("audio", nargs="+", help="audio files; resampled to 16 kHz mono")
    _add_model_arguments(transcribe)
    transcribe.add_argument("--realtime", action="store_true", help="pace the audio like a live source")
    transcribe.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per event, then {text, token_ids}; with several files every event names its file",
    )
    transcribe.add_argument(
        "--max-streams", type=int, default=16, help="several files: how many the engine transcribes at once"
    )
    transcribe.set_defaults(run=_transcribe)

    from pipeline.evaluation import add_eval_parser

    add_eval_parser(commands)

    from pipeline.bench_engine import add_bench_engine_parser
    from pipeline.flops import add_bench_flops_parser
    from pipeline.roofline import add_bench_roofline_parser

    bench = commands.add_parser("bench", help="benchmarks (full-size architecture, random weights)")
    benches = bench.add_subparsers(dest="bench", required=True)
    add_bench_flops_parser(benches)
    add_bench_engine_parser(benches)
    add_bench_roofline_parser(benches)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.checkpoint import CheckpointError

    try:
        return args.run(args)
    except CheckpointError as err:  # a user-facing configuration problem: one line, no traceback
        print(f"qwen3-stream: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
