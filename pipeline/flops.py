"""Compute per audio second of the causal and windowed backends, counted on the full-size model.

`torch.utils.flop_counter.FlopCounterMode` counts the real modules (`AudioTower`, `CausalAudioEncoder`,
`TextDecoder`) at the full Qwen3-ASR-0.6B geometry, built on the **meta device**: tensors there have
shapes but no storage, so nothing is computed and no memory is used, yet every matmul and convolution
reaches the counter with its true shape. Where the runtime needs real values (lengths read back with
`int()`, argmax of logits) the benchmark drives the components with explicit shapes instead, and
those shapes come from walking the update schedule of a stream:

* **causal**: one block of 192 frames per update; the segment rolls before a block would pass the
  200-step cap. Random weights write no punctuation, so the punctuation roll never fires: the walk
  is cap-only. The rolling pass forwards `[head at a segment start] + block + tail + draft`, then
  sequential one-token steps finish the hypothesis (`HypothesisBudget`).
* **windowed**: every 2 s the offline tower re-encodes the last 12 s + 640 ms of mel and the decoder
  re-prefills `[head + all segment audio + tail]` from scratch, then decodes the whole hypothesis.

Counts are memoised by shape, so an hour of stream costs a few hundred distinct counted calls.

Accounting. Counted FLOPs fall into three classes, by the module they run in: `linear` (every nn.Linear,
and the tied lm_head), `conv` (the conv stem) and `attention` (the score and value matmuls of the attention
code itself). The published
ledger (causal_runtime.md §2, §5) counts what the counter saw in the reference runtime: the text model's
linears, never the lm_head, and attention only where it ran as eager matmuls (the causal tower), not
where it ran through CPU SDPA (the text model, the offline tower), which the counter does not see.
Our eager attention is always counted (also on meta), so it is reported as its own column.

`probe_session_memory` runs a long stream through a real (tiny) `StreamingSession` and samples the
process memory, to show that per-stream state stays bounded; `full_size_state_bound` gives the same
bound analytically at full size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.causal_encoder import CausalAudioEncoder, CausalEncoderState
from pipeline.checkpoint import load_model
from pipeline.commit import SegmentPolicy
from pipeline.config import QWEN3_ASR_0_6B, Qwen3ASRConfig
from pipeline.decoder import TextDecoder, ragged_causal_mask
from pipeline.decoding import DecodeOptions
from pipeline.encoder import CAUSAL_LEFT_CONTEXT_STEPS, STEP_FRAMES, AudioTower, offline_output_steps
from pipeline.features import FRAMES_PER_SECOND
from pipeline.prompt import MAX_CONTEXT_TOKENS
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession, offline_step_end_frames
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR, make_tiny_checkpoint

log = logging.getLogger(__name__)

GIGA = 1e9


# ---------------------------------------------------------------------------------------------
# Counting on the meta device
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of some work, by class (see the module docstring)."""

    linear: int = 0
    conv: int = 0
    attention: int = 0

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.linear + other.linear, self.conv + other.conv, self.attention + other.attention)

    @property
    def weights(self) -> int:
        """Matmuls against weights (linear + conv): 2 x parameters x rows, whatever the context length."""
        return self.linear + self.conv

    @property
    def total(self) -> int:
        return self.weights + self.attention


def count_flops(run: Callable[[], object], modules: Sequence[nn.Module]) -> FlopCount:
    """Count what `run` computes with `modules`, by class.

    The counter names each module by its call path: the class of the module called first, then
    attribute names (`AudioEncoderLayer.fc1`, or `Linear` for a Linear called by a method). Resolving a
    path gives the module's type: FLOPs inside nn.Linear are `linear`, inside nn.Conv2d `conv`, and the
    rest - the matmuls of the attention code itself - `attention`. (Ops alone cannot tell: a Linear on a
    non-contiguous 3-D input runs as bmm, like attention does.)
    """
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        run()
    by_class = {type(module).__name__: module for root in modules for module in root.modules()}
    flops = {"linear": 0, "conv": 0}
    for path, by_op in counter.get_flop_counts().items():
        kind = _WEIGHT_KINDS.get(type(_resolve(path, by_class)))
        if kind is not None:
            flops[kind] += sum(by_op.values())
    total = counter.get_total_flops()
    return FlopCount(linear=flops["linear"], conv=flops["conv"], attention=total - flops["linear"] - flops["conv"])


_WEIGHT_KINDS = {nn.Linear: "linear", nn.Conv2d: "conv"}


def _resolve(path: str, by_class: dict[str, nn.Module]) -> nn.Module | None:
    """The module a counter path names (None for `Global`); every instance of a class has the same children."""
    root, *attributes = path.split(".")
    module = by_class.get(root)
    for attribute in attributes:
        module = getattr(module, attribute)
    return module


class ModelFlopCounter:
    """The real modules of one geometry, counted once per distinct shape of work.

    On the meta device (the default) nothing is computed and no memory is used, so the full-size model
    costs nothing but Python time (about 0.3 s per decoder call); small geometries count faster on CPU,
    where their values are uninitialised memory that no count depends on.
    """

    def __init__(self, config: Qwen3ASRConfig = QWEN3_ASR_0_6B, device: str = "meta") -> None:
        self.config = config
        self.device = torch.device(device)
        with self.device:
            self.tower = AudioTower(config.audio)
            self.decoder = TextDecoder(config.text)
        self.encoder = CausalAudioEncoder(self.tower)
        self._memo: dict[tuple, FlopCount] = {}

    def causal_block(self, block_steps: int, cached_steps: int) -> FlopCount:
        """`CausalAudioEncoder.encode_blocks` on one block of `block_steps` steps over `cached_steps` of K/V."""
        return self._memoised(("causal_block", block_steps, cached_steps), self._causal_block)

    def offline_window(self, frames: int) -> FlopCount:
        """`AudioTower.forward_offline` over a mel window of `frames` frames."""
        return self._memoised(("offline_window", frames), self._offline_window)

    def text_model(self, new_positions: int, cached_positions: int) -> FlopCount:
        """`TextDecoder.forward` on `new_positions` on top of `cached_positions` (one stream)."""
        return self._memoised(("text_model", new_positions, cached_positions), self._text_model)

    def lm_head(self, rows: int) -> FlopCount:
        """The tied output matrix (`TextDecoder.logits`) on `rows` hidden states."""
        return self._memoised(("lm_head", rows), self._lm_head)

    def _memoised(self, key: tuple, count: Callable[..., FlopCount]) -> FlopCount:
        if key not in self._memo:
            self._memo[key] = count(*key[1:])
        return self._memo[key]

    def _causal_block(self, block_steps: int, cached_steps: int) -> FlopCount:
        audio = self.config.audio
        cache_shape = (audio.encoder_layers, audio.encoder_attention_heads, cached_steps, audio.head_dim)
        state = CausalEncoderState(
            keys=torch.empty(cache_shape, device=self.device),
            values=torch.empty(cache_shape, device=self.device),
            next_position=cached_steps,
            pending_mel=torch.empty(0, audio.num_mel_bins, device=self.device),
        )
        block = torch.empty(block_steps * STEP_FRAMES, audio.num_mel_bins, device=self.device)
        return count_flops(lambda: self.encoder.encode_blocks([state], [block]), [self.tower])

    def _offline_window(self, frames: int) -> FlopCount:
        mel = torch.empty(frames, self.config.audio.num_mel_bins, device=self.device)
        return count_flops(lambda: self.tower.forward_offline(mel), [self.tower])

    def _text_model(self, new_positions: int, cached_positions: int) -> FlopCount:
        text = self.config.text
        kv_shape = (1, text.num_key_value_heads, cached_positions, text.head_dim)
        past = [(torch.empty(kv_shape, device=self.device),) * 2 for _ in range(text.num_hidden_layers)]
        mask = ragged_causal_mask(
            torch.tensor([cached_positions]), torch.tensor([new_positions]), cached_positions, new_positions
        )
        positions = torch.arange(cached_positions, cached_positions + new_positions)[None]
        embeds = torch.empty(1, new_positions, text.hidden_size, device=self.device)
        return count_flops(
            lambda: self.decoder(
                embeds, positions.to(self.device), mask.to(self.device), past if cached_positions else None
            ),
            [self.decoder],
        )

    def _lm_head(self, rows: int) -> FlopCount:
        hidden = torch.empty(rows, self.config.text.hidden_size, device=self.device)
        # A functional matmul against the tied embedding, outside any nn.Linear: all of it is weights.
        return FlopCount(linear=count_flops(lambda: self.decoder.logits(hidden), [self.decoder]).total)


# ---------------------------------------------------------------------------------------------
# Update schedules: the shapes a stream's updates run on
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptShape:
    """Prompt lengths around the audio. The real Qwen tokenizer gives 9 + 9 with a forced language:
    `<|im_start|> system \\n <|im_end|> \\n <|im_start|> user \\n <|audio_start|>` and
    `<|audio_end|> <|im_end|> \\n <|im_start|> assistant \\n language ␣English <asr_text>`."""

    head: int = 9
    tail: int = 9


@dataclass(frozen=True)
class HypothesisBudget:
    """Synthetic hypothesis lengths (random weights write no real text), tokens without the stop.

    `fixed_tokens`: every hypothesis has this many tokens (published causal steady state: 29, i.e. a
    29-token draft verified on 30 lm_head rows). Otherwise ceil(segment audio steps / audio_steps_per_token)
    (published windowed: 7 decode steps at 26 audio steps growing to 49 at 194, 28 at the average).
    With a draft, the last `steps_after_draft` tokens (published: 9) are decoded one by one; the last
    step picks the stop token.
    """

    fixed_tokens: int | None = None
    audio_steps_per_token: int = 4
    steps_after_draft: int = 9

    def tokens(self, segment_audio_steps: int, max_new_tokens: int) -> int:
        if self.fixed_tokens is not None:
            tokens = self.fixed_tokens
        else:
            tokens = -(-segment_audio_steps // self.audio_steps_per_token)
        return min(tokens, max_new_tokens)


#: The published per-update budgets (causal_runtime.md §2, §5; seed_cpu_cost.md).
CAUSAL_PUBLISHED_BUDGET = HypothesisBudget(fixed_tokens=29)
WINDOWED_PUBLISHED_BUDGET = HypothesisBudget(audio_steps_per_token=4)


@dataclass(frozen=True)
class TextWork:
    """The text decoder's work in one update."""

    pass_positions: int  # the one parallel pass (causal: [head] + new audio + tail + draft; windowed: prefill)
    pass_cached: int  # cached positions under it
    draft_tokens: int
    lm_head_rows: int  # draft verification rows of the pass + one per sequential step
    step_pasts: tuple[int, ...]  # cached positions under each sequential one-token step


@dataclass(frozen=True)
class CausalBlock:
    steps: int
    cached_steps: int

    def count(self, counter: ModelFlopCounter) -> FlopCount:
        return counter.causal_block(self.steps, self.cached_steps)


@dataclass(frozen=True)
class OfflineWindow:
    frames: int

    def count(self, counter: ModelFlopCounter) -> FlopCount:
        return counter.offline_window(self.frames)


@dataclass(frozen=True)
class UpdateShape:
    """One decoder update of a stream, as shapes."""

    stream_sec: float  # stream time when the update runs (audio received so far)
    audio_sec: float  # audio this update takes in (one block or one 2 s chunk; less at the end)
    segment_index: int
    segment_steps: int  # audio steps in the segment after this update
    encoder: CausalBlock | OfflineWindow
    text: TextWork
    is_flush: bool = False  # the end-of-stream update


def rolling_text_work(
    prompt: PromptShape, audio_before: int, audio_after: int, draft: int, hypothesis: int, steps_after_draft: int
) -> TextWork:
    """What `RollingDecoder.update` forwards for one stream (a from-scratch prefill when audio_before = draft = 0).

    The pass picks one token after the accepted draft prefix; each sequential step forwards the last
    pick and picks the next, the last one picking the stop token, so hypothesis = accepted + steps.
    """
    accepted = min(draft, max(0, hypothesis - steps_after_draft))
    cached = prompt.head + audio_before if audio_before else 0
    prefix = prompt.head + audio_after + prompt.tail
    steps = hypothesis - accepted
    return TextWork(
        pass_positions=prefix - cached + draft,
        pass_cached=cached,
        draft_tokens=draft,
        lm_head_rows=draft + 1 + steps,
        step_pasts=tuple(prefix + accepted + step for step in range(steps)),
    )


def causal_schedule(
    frames: int,
    options: SessionOptions = SessionOptions(),
    prompt: PromptShape = PromptShape(),
    budget: HypothesisBudget = CAUSAL_PUBLISHED_BUDGET,
) -> list[UpdateShape]:
    """The updates `StreamingSession` (causal) runs on a stream of `frames` mel frames, cap-only rolls."""
    policy = SegmentPolicy(options.segment)
    block = options.encoder.block_frames
    blocks = [(block, False)] * (frames // block)
    flush = frames % block // STEP_FRAMES * STEP_FRAMES
    if flush:
        blocks.append((flush, True))
    shapes: list[UpdateShape] = []
    segment_index, segment_steps, hypothesis, consumed = 0, 0, 0, 0
    for block_frames, is_flush in blocks:
        block_steps = block_frames // STEP_FRAMES
        if policy.should_roll_before(segment_steps, block_steps) is not None:
            segment_index, segment_steps, hypothesis = segment_index + 1, 0, 0
        encoder = CausalBlock(block_steps, min(segment_steps, CAUSAL_LEFT_CONTEXT_STEPS))
        new_hypothesis = budget.tokens(segment_steps + block_steps, options.decode.max_new_tokens)
        text = rolling_text_work(
            prompt, segment_steps, segment_steps + block_steps, hypothesis, new_hypothesis, budget.steps_after_draft
        )
        segment_steps, hypothesis = segment_steps + block_steps, new_hypothesis
        consumed = frames if is_flush else consumed + block_frames
        shapes.append(
            UpdateShape(
                stream_sec=consumed / FRAMES_PER_SECOND,
                audio_sec=block_frames / FRAMES_PER_SECOND,
                segment_index=segment_index,
                segment_steps=segment_steps,
                encoder=encoder,
                text=text,
                is_flush=is_flush,
            )
        )
        if segment_steps > options.segment.segment_max_steps:
            segment_index, segment_steps, hypothesis = segment_index + 1, 0, 0
    return shapes


def windowed_schedule(
    frames: int,
    options: SessionOptions = SessionOptions.windowed(),
    prompt: PromptShape = PromptShape(),
    budget: HypothesisBudget = WINDOWED_PUBLISHED_BUDGET,
) -> list[UpdateShape]:
    """The updates `StreamingSession` (windowed) runs on a stream of `frames` mel frames."""
    policy = SegmentPolicy(options.segment)
    update = options.window.update_frames
    window_cap = options.window.left_frames + options.window.right_frames
    upcoming_steps = offline_output_steps(update)  # the session's look-ahead for its cap roll
    chunks = [(update, options.window.right_frames, False)] * (frames // update)
    chunks.append((frames % update, 0, True))  # finish(): the rest, with no right context
    shapes: list[UpdateShape] = []
    segment_index, segment_steps = 0, 0
    window, window_start, last_emitted_end = 0, 0, -1
    for chunk, right_context, is_flush in chunks:
        if is_flush and chunk == 0 and window == 0:
            break
        window += chunk
        window_start += max(0, window - window_cap)
        window = min(window, window_cap)
        frames_seen = window_start + window
        end_frames = window_start + offline_step_end_frames(window)
        fresh = (end_frames > last_emitted_end) & (end_frames < frames_seen - right_context)
        if fresh.any():
            last_emitted_end = int(end_frames[fresh].max())
        segment_steps += int(fresh.sum())
        hypothesis = budget.tokens(segment_steps, options.decode.max_new_tokens)
        shapes.append(
            UpdateShape(
                stream_sec=frames_seen / FRAMES_PER_SECOND,
                audio_sec=chunk / FRAMES_PER_SECOND,
                segment_index=segment_index,
                segment_steps=segment_steps,
                encoder=OfflineWindow(window),
                text=rolling_text_work(prompt, 0, segment_steps, 0, hypothesis, budget.steps_after_draft),
                is_flush=is_flush,
            )
        )
        if segment_steps and policy.should_roll_before(segment_steps, upcoming_steps) is not None:
            segment_index, segment_steps = segment_index + 1, 0
    return shapes


# ---------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateCost:
    shape: UpdateShape
    encoder: FlopCount
    text_model: FlopCount  # the parallel pass and every sequential step, lm_head excluded
    lm_head: FlopCount

    @property
    def weights(self) -> int:
        """Encoder + text model matmuls against weights: the published ledger less attention (see module doc)."""
        return self.encoder.weights + self.text_model.weights

    @property
    def total(self) -> int:
        """Everything counted: weights, all attention, and the lm_head."""
        return self.encoder.total + self.text_model.total + self.lm_head.total


def cost_update(shape: UpdateShape, counter: ModelFlopCounter) -> UpdateCost:
    text = counter.text_model(shape.text.pass_positions, shape.text.pass_cached)
    for past in shape.text.step_pasts:
        text = text + counter.text_model(1, past)
    return UpdateCost(
        shape=shape,
        encoder=shape.encoder.count(counter),
        text_model=text,
        lm_head=counter.lm_head(shape.text.lm_head_rows),
    )


@dataclass(frozen=True)
class StreamCost:
    """GFLOPs per audio second of one stream: averages over the whole stream (end flush included),
    peaks over its regular updates (the end flush covers a fraction of a block and would dominate)."""

    backend: str
    stream_sec: float
    updates: int
    segments: int
    average_weights: float
    peak_weights: float
    average_total: float
    peak_total: float


def summarise_stream(backend: str, stream_sec: float, costs: Sequence[UpdateCost]) -> StreamCost:
    regular = [cost for cost in costs if not cost.shape.is_flush] or list(costs)

    def per_audio_second(flops: Callable[[UpdateCost], int]) -> tuple[float, float]:
        average = sum(flops(cost) for cost in costs) / stream_sec / GIGA
        peak = max(flops(cost) / cost.shape.audio_sec for cost in regular) / GIGA
        return average, peak

    average_weights, peak_weights = per_audio_second(lambda cost: cost.weights)
    average_total, peak_total = per_audio_second(lambda cost: cost.total)
    return StreamCost(
        backend=backend,
        stream_sec=stream_sec,
        updates=len(costs),
        segments=costs[-1].shape.segment_index + 1,
        average_weights=average_weights,
        peak_weights=peak_weights,
        average_total=average_total,
        peak_total=peak_total,
    )


Backend = Literal["causal", "windowed", "causal-growing"]


def stream_costs(backend: Backend, stream_sec: float, counter: ModelFlopCounter) -> list[UpdateCost]:
    """Per-update costs of one stream. `causal-growing`: the causal backend with the windowed budget's
    hypothesis that grows with the segment (so the draft, re-forwarded every update, grows too)."""
    frames = round(stream_sec * FRAMES_PER_SECOND)
    if backend == "causal":
        shapes = causal_schedule(frames)
    elif backend == "causal-growing":
        shapes = causal_schedule(frames, budget=WINDOWED_PUBLISHED_BUDGET)
    elif backend == "windowed":
        shapes = windowed_schedule(frames)
    else:
        raise ValueError(f"backend is {backend!r}; expected 'causal', 'causal-growing' or 'windowed'")
    log.info("bench flops: counting a %s %s stream (%d updates)", _duration(stream_sec), backend, len(shapes))
    return [cost_update(shape, counter) for shape in shapes]


# ---------------------------------------------------------------------------------------------
# The published steady-state accounting, reproduced component by component
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentRow:
    """One published component beside ours (GFLOP per call)."""

    name: str
    published: float  # the published ledger (no lm_head)
    published_with_lm_head: float | None
    ours: FlopCount
    lm_head: FlopCount
    counts_attention: bool  # whether the published counter saw this component's attention

    @property
    def ours_as_published(self) -> float:
        """Ours counted the way the published counter saw it (weights, plus attention where it was eager)."""
        return (self.ours.weights + (self.ours.attention if self.counts_attention else 0)) / GIGA


@dataclass(frozen=True)
class PublishedComparison:
    components: list[ComponentRow]
    per_audio_second: list[tuple[str, float, float, float]]  # (name, published, ours as published, ours total)


#: Published steady-state shapes (seed_cpu_cost.md, causal_runtime.md §2, §5). The block, the update interval
#: and the window are those of the default session options, i.e. of the published operating points.
_CAUSAL, _WINDOWED = SessionOptions(), SessionOptions.windowed()
CAUSAL_BLOCK_FRAMES = _CAUSAL.encoder.block_frames
CAUSAL_BLOCK_STEPS = CAUSAL_BLOCK_FRAMES // STEP_FRAMES
CAUSAL_BLOCK_SEC = _CAUSAL.update_interval_sec  # one block per update
WINDOWED_UPDATE_SEC = _WINDOWED.update_interval_sec
WINDOW_FRAMES = _WINDOWED.window.left_frames + _WINDOWED.window.right_frames
STEADY_PASS_POSITIONS, STEADY_PASS_CACHED, STEADY_DRAFT_ROWS = 62, 120, 30
STEADY_CAUSAL_STEPS, STEADY_STEP_PAST = 9, 250
PREFILL_AVERAGE, PREFILL_PEAK = 128, 212
WINDOWED_STEPS_AVERAGE, WINDOWED_STEPS_PEAK = 28, 49


def compare_with_published(counter: ModelFlopCounter) -> PublishedComparison:
    block = counter.causal_block(CAUSAL_BLOCK_STEPS, CAUSAL_LEFT_CONTEXT_STEPS)
    rolling = counter.text_model(STEADY_PASS_POSITIONS, STEADY_PASS_CACHED)
    step = counter.text_model(1, STEADY_STEP_PAST)
    window = counter.offline_window(WINDOW_FRAMES)
    prefill_average = counter.text_model(PREFILL_AVERAGE, 0)
    prefill_peak = counter.text_model(PREFILL_PEAK, 0)
    one_row, no_rows = counter.lm_head(1), FlopCount()
    rows = [
        ComponentRow(
            f"causal encoder: one {CAUSAL_BLOCK_FRAMES}-frame block, K/V full ({CAUSAL_LEFT_CONTEXT_STEPS} steps)",
            17.09,
            None,
            block,
            no_rows,
            True,
        ),
        ComponentRow(
            "rolling pass: 62 positions on 120 cached (+ lm_head on 30 rows)",
            54.6,
            63.94,
            rolling,
            counter.lm_head(STEADY_DRAFT_ROWS),
            False,
        ),
        ComponentRow("decode step: 1 position at past 250 (+ lm_head on 1 row)", 0.88, 1.19, step, one_row, False),
        ComponentRow(
            f"windowed encoder: offline tower over {WINDOW_FRAMES} frames", 114.5, None, window, no_rows, False
        ),
        ComponentRow("windowed prefill: 128 positions (average)", 112.7, None, prefill_average, one_row, False),
        ComponentRow("windowed prefill: 212 positions (peak)", 186.7, None, prefill_peak, one_row, False),
    ]
    causal, rolling_row, step_row, window_row, average_row, peak_row = rows

    def update_rate(parts: list[tuple[ComponentRow, int]], seconds: float) -> tuple[float, float]:
        as_published = sum(row.ours_as_published * times for row, times in parts) / seconds
        total = sum((row.ours.total + row.lm_head.total) * times for row, times in parts) / seconds / GIGA
        return as_published, total

    causal_parts = [(causal, 1), (rolling_row, 1), (step_row, STEADY_CAUSAL_STEPS)]
    average_parts = [(window_row, 1), (average_row, 1), (step_row, WINDOWED_STEPS_AVERAGE)]
    peak_parts = [(window_row, 1), (peak_row, 1), (step_row, WINDOWED_STEPS_PEAK)]
    per_second = [
        ("causal, per audio second", 41.5, *update_rate(causal_parts, CAUSAL_BLOCK_SEC)),
        ("windowed average, per audio second", 125.9, *update_rate(average_parts, WINDOWED_UPDATE_SEC)),
        ("windowed peak, per audio second", 172.2, *update_rate(peak_parts, WINDOWED_UPDATE_SEC)),
    ]
    return PublishedComparison(components=rows, per_audio_second=per_second)


# ---------------------------------------------------------------------------------------------
# Memory of a long stream
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySample:
    stream_min: float
    rss_mib: float  # VmRSS now
    peak_rss_mib: float  # VmHWM: the process's high-water mark so far
    encoder_cached_steps: int
    decoder_cached_positions: int
    transcript_chars: int


def process_memory_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB, from /proc/self/status (Linux)."""
    status = Path("/proc/self/status")
    if not status.exists():
        raise RuntimeError(f"{status} does not exist; the memory probe needs Linux procfs")
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    kib = [int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")]
    return kib[0] / 1024, kib[1] / 1024


def probe_session_memory(
    minutes: float, sample_at_min: Sequence[float] = (1, 10, 60), seed: int = 0, chunk_sec: float = 1.0
) -> list[MemorySample]:
    """Stream `minutes` of noise through a causal `StreamingSession` on the tiny checkpoint; sample memory.

    Samples once before any audio (the model loaded: the baseline), at each of `sample_at_min` within the
    stream, and at its end. Events are dropped as they come, as a client that consumes them would.
    """
    if minutes <= 0:
        raise ValueError(f"minutes={minutes}; expected a positive stream length")
    rate = 16_000
    marks = sorted({mark for mark in sample_at_min if 0 < mark < minutes} | {0, minutes})
    with tempfile.TemporaryDirectory() as work_dir:
        model_dir = make_tiny_checkpoint(Path(work_dir) / "tiny", seed=seed, with_tower=True)
        model = load_model(model_dir, tower=model_dir / TOWER_OVERLAY_DIR)
    session = StreamingSession(model, SessionOptions(decode=DecodeOptions(max_new_tokens=16)))
    noise = np.random.default_rng(seed)
    chunk = round(chunk_sec * rate)
    total = round(minutes * 60 * rate)
    samples: list[MemorySample] = []
    sent = 0
    for mark in marks:
        until = min(total, round(mark * 60 * rate))
        while sent < until:
            size = min(chunk, until - sent)
            session.push_audio((0.1 * noise.standard_normal(size)).astype(np.float32))
            sent += size
        if mark == minutes:
            session.finish()
        rss, peak = process_memory_mib()
        samples.append(
            MemorySample(
                stream_min=mark,
                rss_mib=rss,
                peak_rss_mib=peak,
                encoder_cached_steps=session.own_stages[0].cached_steps(session.stream_id),
                decoder_cached_positions=session.own_stages[1].cached_positions(session.stream_id),
                transcript_chars=len(session.transcript),
            )
        )
        log.info("memory at %.2f min of stream: %s", mark, samples[-1])
    return samples


@dataclass(frozen=True)
class StateBound:
    """Per-stream K/V state of the causal backend at full size, at its largest: live values, which is what
    a stage's pool slot holds (a growing `DecoderKVCache` may allocate up to twice its live length)."""

    encoder_values: int  # layers x (K, V) x 195 steps x d_model
    decoder_positions: int  # head + segment cap + tail + max_new_tokens
    decoder_values_per_position: int  # layers x (K, V) x kv_heads x head_dim

    def mib(self, bytes_per_value: int) -> dict[str, float]:
        encoder = self.encoder_values * bytes_per_value / 2**20
        decoder = self.decoder_positions * self.decoder_values_per_position * bytes_per_value / 2**20
        return {"encoder_kv": encoder, "decoder_kv": decoder, "total": encoder + decoder}


def full_size_state_bound(
    config: Qwen3ASRConfig = QWEN3_ASR_0_6B,
    options: SessionOptions = SessionOptions(),
    prompt: PromptShape = PromptShape(),
) -> StateBound:
    """The bound, analytically. The encoder keeps <= 195 steps. The decoder cache holds `head + audio`
    between updates; during one it holds at most `head + audio + tail + max_new_tokens` (the head with room
    for the longest biasing context, `MAX_CONTEXT_TOKENS`), since the draft
    is capped at max_new_tokens and, after the crop to the accepted prefix, the sequential steps add at
    most the rest of the hypothesis budget (as `pipeline.session.decoder_positions_needed`). Both are
    dropped at every segment roll."""
    audio, text = config.audio, config.text
    segment_audio = max(options.segment.segment_max_steps, options.encoder.block_frames // STEP_FRAMES)
    return StateBound(
        encoder_values=audio.encoder_layers * 2 * CAUSAL_LEFT_CONTEXT_STEPS * audio.d_model,
        decoder_positions=prompt.head + MAX_CONTEXT_TOKENS + segment_audio + prompt.tail + options.decode.max_new_tokens,
        decoder_values_per_position=text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim,
    )


# ---------------------------------------------------------------------------------------------
# Report, plot, command line
# ---------------------------------------------------------------------------------------------

DEFAULT_STREAM_MINUTES = (10 / 60, 0.5, 1, 5, 10, 60)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table; the first column left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


@dataclass
class FlopsReport:
    comparison: PublishedComparison
    streams: list[StreamCost]
    memory: list[MemorySample] = field(default_factory=list)
    bound: StateBound = field(default_factory=full_size_state_bound)

    def markdown(self) -> str:
        def gflop(flops: float) -> str:
            return f"{flops / GIGA:.2f}"

        components = _table(
            [
                "component (GFLOP per call)",
                "published",
                "ours, as published counts",
                "ours: attention",
                "ours: lm_head",
                "published + lm_head",
                "ours + lm_head",
            ],
            [
                [
                    row.name,
                    f"{row.published:.2f}",
                    f"{row.ours_as_published:.2f}",
                    gflop(row.ours.attention),
                    gflop(row.lm_head.total),
                ]
                + (
                    ["", ""]
                    if row.published_with_lm_head is None
                    else [
                        f"{row.published_with_lm_head:.2f}",
                        f"{row.ours_as_published + row.lm_head.total / GIGA:.2f}",
                    ]
                )
                for row in self.comparison.components
            ],
        )
        per_second = _table(
            ["GFLOPs per audio second", "published", "ours, as published counts", "ours, everything counted"],
            [
                [name, f"{pub:.1f}", f"{ours:.1f}", f"{total:.1f}"]
                for name, pub, ours, total in self.comparison.per_audio_second
            ],
        )
        streams = _table(
            [
                "stream",
                "backend",
                "updates",
                "segments",
                "average (weights)",
                "peak (weights)",
                "average (all)",
                "peak (all)",
            ],
            [
                [
                    _duration(s.stream_sec),
                    s.backend,
                    s.updates,
                    s.segments,
                    f"{s.average_weights:.1f}",
                    f"{s.peak_weights:.1f}",
                    f"{s.average_total:.1f}",
                    f"{s.peak_total:.1f}",
                ]
                for s in self.streams
            ],
        )
        memory = (
            _table(
                [
                    "stream time",
                    "VmRSS MiB",
                    "VmHWM MiB",
                    "encoder cached steps",
                    "decoder cached positions",
                    "transcript chars",
                ],
                [
                    [
                        f"{m.stream_min:g} min",
                        f"{m.rss_mib:.1f}",
                        f"{m.peak_rss_mib:.1f}",
                        m.encoder_cached_steps,
                        m.decoder_cached_positions,
                        m.transcript_chars,
                    ]
                    for m in self.memory
                ],
            )
            if self.memory
            else []
        )
        fp32, bf16 = self.bound.mib(4), self.bound.mib(2)
        bound = (
            f"Full-size per-stream K/V bound: encoder {self.bound.encoder_values:,} values + decoder "
            f"{self.bound.decoder_positions} positions x {self.bound.decoder_values_per_position:,} values = "
            f"fp32 {fp32['encoder_kv']:.1f} + {fp32['decoder_kv']:.1f} = {fp32['total']:.1f} MiB, "
            f"bf16 {bf16['total']:.1f} MiB."
        )
        sections = [components, per_second, streams, memory, [bound]]
        return "\n\n".join("\n".join(section) for section in sections if section) + "\n"

    def to_json(self) -> str:
        payload = {
            "components": [
                asdict(row) | {"ours_as_published_gflop": row.ours_as_published} for row in self.comparison.components
            ],
            "per_audio_second": [
                {"name": name, "published": pub, "ours_as_published": ours, "ours_total": total}
                for name, pub, ours, total in self.comparison.per_audio_second
            ],
            "streams": [asdict(stream) for stream in self.streams],
            "memory": [asdict(sample) for sample in self.memory],
            "state_bound": asdict(self.bound) | {"fp32_mib": self.bound.mib(4), "bf16_mib": self.bound.mib(2)},
        }
        return json.dumps(payload, indent=2)


def _duration(seconds: float) -> str:
    return f"{seconds:g} s" if seconds < 60 else f"{seconds / 60:g} min"


def plot_cost_vs_time(
    costs: dict[str, list[UpdateCost]], streams: Sequence[StreamCost], path: Path, first_sec: float, long_sec: float
) -> None:
    """Per-update and cumulative-average GFLOPs per audio second over the first minute and a longer view,
    and the average against stream length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("the flops plot needs matplotlib: pip install 'qwen3-stream[bench]'") from error

    colors = {"causal": "tab:blue", "windowed": "tab:red", "causal-growing": "tab:cyan"}
    figure, axes = plt.subplots(1, 3, figsize=(17, 5.6))
    for axis, horizon in zip(axes[:2], (first_sec, long_sec)):
        for backend, backend_costs in costs.items():
            shown = [c for c in backend_costs if c.shape.stream_sec <= horizon and not c.shape.is_flush]
            times = [c.shape.stream_sec for c in shown]
            per_update = [c.weights / c.shape.audio_sec / GIGA for c in shown]
            cumulative = np.cumsum([c.weights for c in shown]) / np.array(times) / GIGA
            # Each update's cost holds over the audio it took in: (stream_sec - audio_sec, stream_sec].
            start = shown[0].shape.stream_sec - shown[0].shape.audio_sec
            axis.step(
                [start, *times],
                [per_update[0], *per_update],
                where="pre",
                color=colors[backend],
                alpha=0.45,
                lw=1,
                label=f"{backend}: per update",
            )
            axis.plot(times, cumulative, color=colors[backend], lw=2.2, label=f"{backend}: cumulative average")
        axis.axhline(41.5, color="tab:blue", ls=":", lw=1, label="published causal 41.5")
        axis.axhline(125.9, color="tab:red", ls=":", lw=1, label="published windowed 125.9 avg")
        axis.set_xlabel("stream time (s)")
        axis.set_ylabel("GFLOPs per audio second")
        axis.set_title(f"first {_duration(horizon)}")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    for backend in dict.fromkeys(s.backend for s in streams):
        rows = [s for s in streams if s.backend == backend]
        lengths = [s.stream_sec for s in rows]
        axes[2].plot(
            lengths, [s.average_weights for s in rows], "o-", color=colors[backend], label=f"{backend}: average"
        )
        axes[2].plot(
            lengths, [s.peak_weights for s in rows], "x--", color=colors[backend], label=f"{backend}: peak update"
        )
    axes[2].set_xscale("log")
    axes[2].set_xlabel("stream length (s)")
    axes[2].set_ylabel("GFLOPs per audio second")
    axes[2].set_title("whole stream vs its length")
    axes[2].set_ylim(bottom=0)
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    figure.suptitle(
        "Qwen3-ASR-0.6B, FlopCounterMode on meta: encoder + text-model matmuls against weights "
        "(no attention, no lm_head; the published ledger's basis)",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.13, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


PLOT_NAME = "flops_per_audio_second.png"
BACKENDS: tuple[Backend, ...] = ("causal", "windowed", "causal-growing")
PLOT_FIRST_SEC, PLOT_LONG_SEC = 60.0, 300.0


def build_flops_report(
    stream_minutes: Sequence[float] = DEFAULT_STREAM_MINUTES,
    memory_minutes: float = 0,
    plot_path: Path | None = None,
    counter: ModelFlopCounter | None = None,
) -> FlopsReport:
    """The whole benchmark: published comparison, cost vs stream length, optional plot and memory probe."""
    counter = counter or ModelFlopCounter()
    streams = [
        summarise_stream(backend, minutes * 60, stream_costs(backend, minutes * 60, counter))
        for backend in BACKENDS
        for minutes in stream_minutes
    ]
    if plot_path is not None:
        # Both time panels come from one stream as long as the longer panel (or the longest stream asked for).
        long_sec = min(PLOT_LONG_SEC, 60 * max(stream_minutes))
        plot_costs = {backend: stream_costs(backend, long_sec, counter) for backend in BACKENDS}
        plot_cost_vs_time(plot_costs, streams, plot_path, first_sec=min(PLOT_FIRST_SEC, long_sec), long_sec=long_sec)
    memory = probe_session_memory(memory_minutes) if memory_minutes > 0 else []
    return FlopsReport(comparison=compare_with_published(counter), streams=streams, memory=memory)


def run_flops_benchmark(args: argparse.Namespace) -> int:
    """Handler body of `qwen3-stream bench flops` (cli.py parses the arguments): the report goes to stdout and,
    with --out, to files."""
    if any(minutes <= 0 for minutes in args.minutes):
        raise ValueError(f"--minutes {args.minutes}; expected positive stream lengths")
    plot_path = args.out / PLOT_NAME if args.out else None
    if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed, so no plot: pip install 'qwen3-stream[bench]'")
        plot_path = None
    report = build_flops_report(args.minutes, args.memory_minutes, plot_path)
    text = report.markdown()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(text)
        (args.out / "flops.json").write_text(report.to_json())
        log.info("flops report written to %s", args.out)
    sys.stdout.write(text)
    return 0
