"""What the voice gate saves: one recording through a session with the gate off and on, side by side.

Work is counted in the units the model runs (encoder blocks, decoder updates, decoder positions forwarded), so
the counts hold for any model size; wall time is measured too, including the detector's own share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from pipeline.checkpoint import ASRModel
from pipeline.features import SAMPLE_RATE
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession
from pipeline.vad import VadState, load_silero_vad, score_streams
from pipeline.voice_gate import VadOptions


@dataclass(frozen=True)
class GateRun:
    gate: bool
    blocks_encoded: int
    blocks_skipped: int
    updates: int
    positions_forwarded: int
    words: int
    seconds: float  # the whole run: front-end, detector, encoder, decoder, policy
    detector_seconds: float  # the detector alone (0 without the gate)


def run_gate_bench(model: ASRModel, audio: np.ndarray, options: SessionOptions, chunk_sec: float = 0.1) -> list[GateRun]:
    """The recording with the gate off, then on (`options` otherwise), each as fast as possible in `chunk_sec`
    pieces. The detector's share is timed on its own over the same pieces (the session runs it inside the
    front-end stage)."""
    chunk = max(1, round(chunk_sec * SAMPLE_RATE))
    pieces = [audio[start : start + chunk] for start in range(0, audio.size, chunk)]
    runs = []
    for gate in (False, True):
        session = StreamingSession(model, replace(options, vad=VadOptions(enabled=gate)))
        started = time.perf_counter()
        events = [event for piece in pieces for event in session.push_audio(piece)] + session.finish()
        seconds = time.perf_counter() - started
        updates = [e for e in events if e.kind == "update"]
        runs.append(
            GateRun(
                gate=gate,
                blocks_encoded=session.blocks_encoded,
                blocks_skipped=session.blocks_skipped,
                updates=len(updates),
                positions_forwarded=sum(e.stats.positions_forwarded for e in updates if e.stats is not None),
                words=len(session.transcript.split()),
                seconds=seconds,
                detector_seconds=_detector_seconds(pieces) if gate else 0.0,
            )
        )
    return runs


def _detector_seconds(pieces: list[np.ndarray]) -> float:
    model, state = load_silero_vad(), VadState.initial()
    started = time.perf_counter()
    for piece in pieces:
        ((state, _),) = score_streams(model, [state], [piece])
    return time.perf_counter() - started


def format_gate_bench(runs: list[GateRun], audio_sec: float) -> str:
    off, on = runs
    lines = [
        f"recording: {audio_sec:.1f} s",
        "",
        "| gate | encoder blocks | skipped | decoder updates | positions forwarded | words | wall s | detector s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {'on' if run.gate else 'off'} | {run.blocks_encoded} | {run.blocks_skipped} | {run.updates} | "
            f"{run.positions_forwarded} | {run.words} | {run.seconds:.2f} | {run.detector_seconds:.2f} |"
        )
    lines += [
        "",
        f"gate on / off: encoder blocks {on.blocks_encoded / max(1, off.blocks_encoded):.2f}, decoder updates "
        f"{on.updates / max(1, off.updates):.2f}, positions {on.positions_forwarded / max(1, off.positions_forwarded):.2f}",
    ]
    return "\n".join(lines)
