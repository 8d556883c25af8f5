"""Regenerate the checked-in Python modules of the public API from ``asr.proto``.

The modules are checked in so that users (and the vendorable client) need no protoc at runtime;
``tests/test_protos.py`` regenerates into a temporary directory and compares byte for byte, so the
check-in cannot go stale. Run from anywhere: ``python protos/generate.py [OUT_DIR]``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Relative to REPO_ROOT, so the modules import as ``protos.qwen3stream.v1.asr_pb2``.
PROTO_FILES = ("protos/qwen3stream/v1/asr.proto",)
GENERATED_FILES = tuple(
    str(Path(p).with_name(Path(p).stem + suffix))
    for p in PROTO_FILES
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)

log = logging.getLogger(__name__)


def generate(out_dir: Path | str = REPO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) on PROTO_FILES, writing under ``out_dir``; returns the files."""
    from grpc_tools import protoc  # only needed to regenerate, not at runtime

    out = Path(out_dir).resolve()
    for rel in GENERATED_FILES:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(REPO_ROOT / p) for p in PROTO_FILES),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    written = [out / rel for rel in GENERATED_FILES]
    log.info("generated %s", ", ".join(str(p) for p in written))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(REPO_ROOT), help="default: in place")
    args = parser.parse_args(argv)
    generate(args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
