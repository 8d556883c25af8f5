"""The checks of `scripts/gpu_check.sh` that are not tests or benchmarks: run on one CUDA GPU.

    python scripts/gpu_checks.py engine-graphs CHECKPOINT   # CUDA-graph vs eager static steps, event for event
    python scripts/gpu_checks.py sync-count CHECKPOINT      # synchronisations per engine step beyond its reads
    python scripts/gpu_checks.py replay-times               # decode-step graph replay time per (rows, span)

CHECKPOINT: the tiny checkpoint with its causal tower (`qwen3-stream make-tiny-checkpoint DIR --with-tower`).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.bench_engine import random_full_size_model  # noqa: E402
from pipeline.checkpoint import load_model  # noqa: E402
from pipeline.decode_step import StaticDecodeStep  # noqa: E402
from pipeline.device_io import host_reads  # noqa: E402
from pipeline.engine import EngineOptions, StreamingEngine  # noqa: E402
from pipeline.kv_pool import DecoderKVPool  # noqa: E402
from pipeline.options import SessionOptions  # noqa: E402
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR  # noqa: E402
from tests.test_engine import _engine_events, _plans  # noqa: E402
from tests.test_session import _comparable  # noqa: E402

STREAMS = 12
#: The tiny checkpoint's random weights decode until the budget: a small one keeps each check well under a minute.
OPTIONS = SessionOptions.from_dict({"decode": {"max_new_tokens": 32}})


def _tiny(checkpoint: str):
    path = Path(checkpoint)
    return load_model(path, tower=path / TOWER_OVERLAY_DIR, device="cuda", dtype=torch.bfloat16)


def engine_graphs(checkpoint: str) -> int:
    """The same staggered streams through an engine with eager static steps and one with CUDA graphs."""
    model = _tiny(checkpoint)
    events = {
        kind: _engine_events(
            StreamingEngine(model, OPTIONS, EngineOptions(STREAMS, decode_step=kind)),
            _plans(STREAMS),
        )
        for kind in ("static", "cuda_graph")
    }
    same = [_comparable(events["static"][s]) == _comparable(events["cuda_graph"][s]) for s in events["static"]]
    print(f"engine-graphs: {sum(same)} of {len(same)} streams' events equal with CUDA graphs and eager static steps")
    return 0 if all(same) else 1


def sync_count(checkpoint: str) -> int:
    """Synchronisations per engine step beyond its sanctioned reads, under sync debug mode 'warn'."""
    model = _tiny(checkpoint)
    engine = StreamingEngine(model, OPTIONS, EngineOptions(STREAMS))
    per_step: list[tuple[int, int]] = []
    step = engine.step

    def counted_step():
        reads = host_reads()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        if engine.last_step_timing.streams:
            per_step.append((len(syncs), host_reads() - reads))
        for warning in syncs[:3] if len(per_step) == 3 else []:  # where, for one step
            print(f"  sync: {warning.filename}:{warning.lineno}: {warning.message}")
        return out

    engine.step = counted_step
    _engine_events(engine, _plans(STREAMS))
    syncs = [s for s, _ in per_step]
    reads = [r for _, r in per_step]
    print(
        f"sync-count: {len(per_step)} steps; other synchronisations per step mean {statistics.fmean(syncs):.1f} "
        f"max {max(syncs)}; sanctioned reads per step mean {statistics.fmean(reads):.1f} max {max(reads)}"
    )
    return 0


def replay_times(slots: int = 256, repeats: int = 20) -> int:
    """Full-size decoder (random bf16 weights): one decode-step graph replay per (rows, span) bucket."""
    model = random_full_size_model(device="cuda", dtype=torch.bfloat16)
    pool = DecoderKVPool(model.text_decoder, slots, capacity=474)
    started = time.perf_counter()
    step = StaticDecodeStep(model.text_decoder, pool, cuda_graphs=True)
    print(f"replay-times: {len(step._graphs)} graphs captured in {time.perf_counter() - started:.1f} s")
    print("| rows | " + " | ".join(f"span {span}" for span in step.span_buckets) + " |")
    print("|---:|" + "---:|" * len(step.span_buckets))
    for rows in step.row_buckets:
        cells = []
        for span in step.span_buckets:
            graph = step._graphs[rows, span]
            times = []
            for _ in range(repeats):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            cells.append(f"{statistics.median(times):.2f} ms")
        print(f"| {rows} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    checks = {"engine-graphs": engine_graphs, "sync-count": sync_count, "replay-times": replay_times}
    if command not in checks:
        raise SystemExit(f"unknown check {command!r}; expected one of {sorted(checks)}")
    sys.exit(checks[command](*rest))
