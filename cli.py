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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
