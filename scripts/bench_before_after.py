"""Mean engine step before and after a change, side by side in one run: `bench engine`'s staggered-starts driver
(`pipeline.bench_engine.run_staggered_start_bench`) on the engine of a git revision and on this checkout.

Two versions of `pipeline` cannot share one process, so each (version, N) runs in its own Python process, the
versions interleaved N by N (both see the same machine load over the run). The earlier revision is exported with
`git archive` and gets this checkout's benchmark driver (`bench_engine.py`, `step_probes.py`, `host_policy.py`), so
both engines are driven and timed by the same code.

    OMP_NUM_THREADS=1 python scripts/bench_before_after.py --before ace1842 --checkpoint /tmp/tiny \\
        --streams 10,100,1000 [--check-events 200]

`--check-events N` first decodes N streams for real on the same schedule with both versions and compares a digest
of all their events: the change must not change a single event.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER_FILES = ("pipeline/bench_engine.py", "pipeline/step_probes.py", "pipeline/host_policy.py")

MEASURE = """
import dataclasses, json, sys, torch
from pathlib import Path
from pipeline.bench_engine import run_staggered_start_bench
from pipeline.checkpoint import load_model
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR
torch.set_num_threads(1)
checkpoint, count, blocks = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model = load_model(checkpoint, tower=checkpoint / TOWER_OVERLAY_DIR)
(result,) = run_staggered_start_bench(model, [count], blocks)
print(json.dumps(dataclasses.asdict(result)))
"""

# Real decoding (no synthetic budget) on the same schedule: a digest of every stream's events.
EVENTS = """
import hashlib, json, sys, numpy as np, torch
from pathlib import Path
from pipeline.bench_engine import StaggeredStarts
from pipeline.checkpoint import load_model
from pipeline.engine import EngineOptions, StreamingEngine
from pipeline.features import FRAMES_PER_SECOND, SAMPLE_RATE
from pipeline.session import SessionOptions
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR
torch.set_num_threads(1)
checkpoint, count, blocks = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model = load_model(checkpoint, tower=checkpoint / TOWER_OVERLAY_DIR)
try:  # options nested by layer (since 2a521f1)
    from pipeline.decoding import DecodeOptions
    options = SessionOptions(language="English", decode=DecodeOptions(max_new_tokens=24))
    block_frames = options.encoder.block_frames
except TypeError:  # a revision with flat options
    options = SessionOptions(language="English", max_new_tokens=24)
    block_frames = options.block_frames
engine = StreamingEngine(model, options, EngineOptions(max_streams=count))
block_samples = block_frames * SAMPLE_RATE // FRAMES_PER_SECOND
rng = np.random.default_rng(0)
audio = {f"s{i}": (0.1 * rng.standard_normal(blocks * block_samples)).astype(np.float32) for i in range(count)}
for stream_id in audio:
    engine.open_stream(stream_id)
schedule, events, step = StaggeredStarts(engine, audio, block_samples), {s: [] for s in audio}, 0
while engine.active_streams:
    schedule.push_due(step)
    for stream_id, new in engine.step().items():
        events[stream_id] += [(e.kind, e.transcript, e.hypothesis, e.segment_index, e.audio_sec, repr(e.stats))
                              for e in new]
    step += 1
digest = hashlib.sha256(json.dumps(events, sort_keys=True).encode()).hexdigest()
print(json.dumps({"digest": digest, "events": sum(map(len, events.values()))}))
"""


def export_revision(revision: str, into: Path) -> Path:
    """`pipeline/` of `revision`, with this checkout's benchmark driver files."""
    archive = into / "before.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), revision, "pipeline"], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "before", filter="data")
    for name in DRIVER_FILES:
        (into / "before" / name).write_text((ROOT / name).read_text())
    return into / "before"


def measure(tree: Path, checkpoint: Path, count: int, blocks: int, program: str = MEASURE) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(
        [sys.executable, "-c", program, str(checkpoint), str(count), str(blocks)],
        env=env, cwd=tree, check=True, capture_output=True, text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def host_ms(result: dict) -> float:
    """Host work per stream (`StaggeredStartResult.host_ms_per_stream`, from the result's fields)."""
    return 1e3 * result["probe_host_sec"] / result["probe_streams"]


def table(rows: list[tuple[str, dict]]) -> str:
    lines = [
        "| version | N | streams/step | mean step (s) | encoder | decoder | policy | step ms/stream | "
        "host ms/stream | calls/stream | ops in step | peak step MiB | pools MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for version, r in rows:
        lines.append(
            f"| {version} | {r['streams']} | {r['mean_batch']:.0f} | {r['step_mean_sec']:.3f} | {r['encoder_sec']:.3f} "
            f"| {r['decoder_sec']:.3f} | {r['policy_sec']:.3f} | {1e3 * r['step_mean_sec'] / r['mean_batch']:.3f} | "
            f"{host_ms(r):.3f} | {r['python_calls_per_stream']:.0f} | {r['probe_ops']} | "
            f"{r['peak_step_bytes'] / 2**20:.1f} | "
            f"{r['pool_bytes'] / 2**20:.1f} |"
        )
    by_version: dict[str, list[dict]] = {}
    for version, r in rows:
        by_version.setdefault(version, []).append(r)
    lines.append("")
    for version, results in by_version.items():
        small, large = min(results, key=lambda r: r["streams"]), max(results, key=lambda r: r["streams"])
        lines.append(
            f"{version}: mean step at N={large['streams']} / N={small['streams']} = "
            f"{large['step_mean_sec'] / small['step_mean_sec']:.1f}x; host work per step "
            f"{large['probe_host_sec'] / small['probe_host_sec']:.1f}x"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the engine to compare with this checkout")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint dir with a causal tower overlay")
    parser.add_argument("--streams", default="10,100,1000", help="comma-separated stream counts")
    parser.add_argument("--blocks", type=int, default=8, help="blocks per stream")
    parser.add_argument(
        "--check-events",
        type=int,
        default=0,
        help="first: this many streams decoded for real (24-token budget) on the same schedule by both versions; "
        "their events must be identical",
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        before = export_revision(args.before, Path(scratch))
        if args.check_events:
            checkpoint = args.checkpoint.resolve()
            digests = [measure(tree, checkpoint, args.check_events, args.blocks, EVENTS) for tree in (before, ROOT)]
            same = digests[0] == digests[1]
            print(f"events of {args.check_events} streams: before {digests[0]}, after {digests[1]}: "
                  f"{'identical' if same else 'DIFFERENT'}")
            if not same:
                return 1
        for count in (int(part) for part in args.streams.split(",")):
            for version, tree in ((f"before ({args.before})", before), ("after", ROOT)):
                result = measure(tree, args.checkpoint.resolve(), count, args.blocks)
                print(f"{version} N={count}: {result['step_mean_sec']:.3f} s per step", file=sys.stderr, flush=True)
                rows.append((version, result))
    print(table(sorted(rows, key=lambda row: (not row[0].startswith("before"), row[1]["streams"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
