"""A roofline estimate of engine capacity on a device we could not measure (an ESTIMATE, not a measurement).

One engine step advances the streams whose blocks arrived by one block each: one encoder forward, one rolling
pass, then the sequential decode steps. Each forward is bounded below by its arithmetic (FLOPs / sustained FLOP/s)
and by its memory traffic (its weights, read once for the whole batch; the K/V each attention row reads; its
activations, `pipeline.activations`; / sustained bandwidth); it costs the larger of the two plus its kernel
launches. FLOPs are counted once per position, per attended (query, key) pair and per output row by
`pipeline.flops.ModelFlopCounter` on the full-size geometry, and sized by the engine's rules:

* **step count**: the decode steps of an update run until its slowest stream stops (streams leave as they stop,
  the batch does not shrink until the last one does), so a step runs the slowest stream's count: 9 when every
  stream decodes `bench engine`'s synthetic budget (9 new tokens per block, drafts 0, 9, 18, 27, then 30);
* **rows and spans**: on CUDA the decode steps are `StaticDecodeStep`s, `rows` = the row bucket above the highest
  stepping slot and `span` = the span bucket above the longest stepping stream (`decode_step.bucket_for`); the
  rolling pass (and on the CPU the dynamic step) attends over the pool's slot range, every row over the longest
  stream's span;
* **arrivals**: *aligned* streams all update in every step, at the same block of their segments (the step time
  then depends on the block; latency = the slowest block's step); *live* streams' blocks arrive spread evenly over
  a block interval (`bench engine --arrivals staggered`): steps run back to back, each advancing the streams whose
  blocks arrived during the last one, across every block of the segment, and an update waits for the running
  step and then its own (latency <= 2 steps).

Calibrate the model on a device we can measure (the CPU, `qwen3-stream bench engine`) before trusting it on another.
The host's work per step (Python, scheduling, bookkeeping: what a GPU does not shorten) is not estimated but
measured (`HostCost`, from `bench engine --arrivals staggered-starts` on the tiny checkpoint) and added to the
device's step time for the capacity that counts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.activations import ActivationModel, ForwardShape, decoder_activations, encoder_activations
from pipeline.bench_engine import DRAFT_TOKENS, NEW_TOKENS_PER_UPDATE
from pipeline.config import QWEN3_ASR_0_6B, Qwen3ASRConfig
from pipeline.decode_step import SMALLEST_SPAN, bucket_for, bucket_sizes
from pipeline.encoder import CAUSAL_LEFT_CONTEXT_STEPS, STEP_FRAMES
from pipeline.flops import ModelFlopCounter, PromptShape
from pipeline.kv_pool import ENCODER_SLOT_COLUMNS
from pipeline.options import SessionOptions
from pipeline.session import decoder_slot_positions

_OPTIONS = SessionOptions()  # the published causal operating point: one default block per update
BLOCK_SEC = _OPTIONS.update_interval_sec
BLOCK_STEPS = _OPTIONS.encoder.block_frames // STEP_FRAMES
SEGMENT_MAX_STEPS = _OPTIONS.segment.segment_max_steps
SEGMENT_BLOCKS = SEGMENT_MAX_STEPS // BLOCK_STEPS  # blocks of a segment (cap-only rolls)
PROMPT = PromptShape()  # the real tokenizer's head and tail
SEQUENTIAL_STEPS = NEW_TOKENS_PER_UPDATE  # each new token of the synthetic budget is one step (the last picks the stop)
LATENCY_SEC = 0.5  # the p95 update latency the capacity is for


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    flops_per_sec: float  # sustained, in the working dtype
    bytes_per_sec: float  # sustained memory bandwidth
    memory_bytes: float  # for weights and K/V slots
    bytes_per_value: int  # 2 for bf16, 4 for fp32
    launch_sec_per_forward: float  # kernel launches of one eager forward
    cuda: bool  # the engine's CUDA paths: fused attention, static decode steps replayed as one CUDA graph each


KERNEL_LAUNCH_SEC = 5e-6
EAGER_LAUNCH_SEC = QWEN3_ASR_0_6B.text.num_hidden_layers * 15 * KERNEL_LAUNCH_SEC  # about 15 kernels per layer

# Published datasheet figures (NVIDIA H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 80 GB; H200 SXM: 989
# TFLOP/s dense bf16, 4.8 TB/s HBM3e, 141 GB). Sustained = datasheet x an efficiency we consider reachable by eager
# PyTorch (50 % of dense bf16 tensor-core peak, 80 % of HBM bandwidth). Memory for weights and slots: 90 % of the
# card; the rest holds the CUDA context and the step's transient activations, which the engine bounds (batch-wide
# intermediates in row chunks, `pipeline.row_chunks`: verification logits up to the output matrix's size).
H100_SXM = DeviceSpec("H100 SXM (estimate)", 0.5 * 989e12, 0.8 * 3.35e12, 0.9 * 80e9, 2, EAGER_LAUNCH_SEC, True)
H200 = DeviceSpec("H200 (estimate)", 0.5 * 989e12, 0.8 * 4.8e12, 0.9 * 141e9, 2, EAGER_LAUNCH_SEC, True)
# The machine the benchmarks ran on, as measured (seed_cpu_cost.md: sgemm 2048^3 at 107-124 GFLOP/s, decode steps
# stream weights at 11-13 GB/s; our gemv reaches 17 GB/s): used to check the model against `bench engine`.
CPU_2_CORES = DeviceSpec("2-core CPU, fp32 (calibration)", 110e9, 14e9, 20e9, 4, 0.0, False)


@dataclass(frozen=True)
class HostCost:
    """Host (CPU) time of one engine step: Python, scheduling, bookkeeping and kernel launches, which a GPU does
    not shorten. Measured, not estimated: `bench engine --arrivals staggered-starts` on the tiny checkpoint, where
    the kernels are small enough for the host work to show (the probed step's time outside tensor operators)."""

    fixed_sec: float  # per step, whatever the streams
    per_stream_sec: float  # per stream advanced
    source: str

    def step_sec(self, streams: int) -> float:
        return self.fixed_sec + streams * self.per_stream_sec


#: Measured here (BENCHMARKS.md, "A thousand streams in one step"): host time outside tensor operators at
#: N = 10 and N = 1000 staggered-start streams, fitted as fixed + per stream.
MEASURED_HOST = HostCost(
    fixed_sec=7.6e-3,
    per_stream_sec=0.19e-3,
    source="measured here, 2-vCPU Intel Xeon, tiny checkpoint (bench engine --arrivals staggered-starts)",
)
NO_HOST = HostCost(fixed_sec=0.0, per_stream_sec=0.0, source="device only")


@dataclass(frozen=True)
class SegmentBlock:
    """One stream's update at block `index` of its segment, under `bench engine`'s synthetic decode budget."""

    index: int

    @property
    def encoder_cached(self) -> int:
        return min(self.index * BLOCK_STEPS, CAUSAL_LEFT_CONTEXT_STEPS)

    @property
    def draft(self) -> int:
        return min(self.index * NEW_TOKENS_PER_UPDATE, DRAFT_TOKENS)

    @property
    def accepted(self) -> int:
        return min(self.draft, DRAFT_TOKENS - NEW_TOKENS_PER_UPDATE)

    @property
    def pass_end(self) -> int:
        """Cache length after the rolling pass: head + segment audio + tail + draft."""
        return PROMPT.head + (self.index + 1) * BLOCK_STEPS + PROMPT.tail + self.draft

    @property
    def pass_positions(self) -> int:
        """Positions the pass forwards: the block, tail and draft (and the head, at a segment's first block)."""
        cached = PROMPT.head + self.index * BLOCK_STEPS if self.index else 0
        return self.pass_end - cached

    def step_length(self, step: int) -> int:
        """Cache length under sequential step `step` (from 0): the pass cropped to its accepted draft, + the steps."""
        return self.pass_end - self.draft + self.accepted + step


ALL_BLOCKS = tuple(SegmentBlock(index) for index in range(SEGMENT_BLOCKS))


@dataclass(frozen=True)
class Batch:
    """What one engine step advances: `stepping` streams of the `resident` ones holding slots 0..resident - 1 of a
    pool of `pool_slots`, at segment blocks spread evenly over `blocks`; decode steps until the slowest stream's
    `sequential_steps`; decoder slots of `capacity` positions."""

    stepping: int
    resident: int
    pool_slots: int
    capacity: int
    blocks: tuple[SegmentBlock, ...] = ALL_BLOCKS
    sequential_steps: int = SEQUENTIAL_STEPS


def encoder_forward(batch: Batch) -> ForwardShape:
    """Every stepping stream's block over its own slot's K/V (mean cached steps over the batch's blocks)."""
    cached = sum(block.encoder_cached for block in batch.blocks) // len(batch.blocks)
    return ForwardShape(batch.stepping * BLOCK_STEPS, batch.stepping, BLOCK_STEPS, cached + BLOCK_STEPS)


def rolling_forward(batch: Batch) -> ForwardShape:
    """One padded pass (the widest stream's width) whose queries attend in the slot range over the longest span;
    verification logits on each stream's draft + 1 rows."""
    width = max(block.pass_positions for block in batch.blocks)
    verify = batch.stepping * sum(block.draft + 1 for block in batch.blocks) // len(batch.blocks)
    span = max(block.pass_end for block in batch.blocks)
    return ForwardShape(batch.stepping * width, batch.resident, width, span, verify, verify)


def sequential_forwards(batch: Batch, static: bool) -> list[ForwardShape]:
    """The decode steps, until the slowest stream's last: static (CUDA) steps run the row bucket above the highest
    stepping slot over the span bucket above the longest cache; dynamic (CPU) steps run exactly the stepping streams,
    attending in the slot range over the longest cache."""
    span_buckets = bucket_sizes(batch.capacity, SMALLEST_SPAN)
    rows = bucket_for(batch.resident - 1, bucket_sizes(batch.pool_slots))
    forwards = []
    for step in range(batch.sequential_steps):
        longest = max(block.step_length(step) for block in batch.blocks)
        if static:
            forwards.append(ForwardShape(rows, rows, 1, bucket_for(longest, span_buckets), rows, batch.stepping))
        else:
            forwards.append(
                ForwardShape(batch.stepping, batch.resident, 1, longest + 1, batch.stepping, batch.stepping)
            )
    return forwards


@dataclass(frozen=True)
class ModelCost:
    """One model's forward, per unit of a `ForwardShape`: counted FLOPs, the weights it reads, K/V per attended key
    of one row (all layers), and its activations."""

    flops_per_position: float
    flops_per_pair: float
    flops_per_logit_row: float
    weight_bytes: float
    kv_bytes_per_key: float
    activations: ActivationModel

    def flops(self, shape: ForwardShape) -> float:
        return (
            shape.positions * self.flops_per_position
            + shape.pairs * self.flops_per_pair
            + shape.logit_rows * self.flops_per_logit_row
        )

    def traffic_bytes(self, shape: ForwardShape) -> float:
        kv = shape.attention_rows * shape.span * self.kv_bytes_per_key
        return self.weight_bytes + kv + self.activations.bytes_of(shape)

    def forward_sec(self, shape: ForwardShape, device: DeviceSpec, launch_sec: float) -> float:
        compute = self.flops(shape) / device.flops_per_sec
        memory = self.traffic_bytes(shape) / device.bytes_per_sec
        return max(compute, memory) + launch_sec


@dataclass(frozen=True)
class EngineCost:
    """The full model's forwards on one device, and what an engine step of a `Batch` costs there."""

    encoder: ModelCost
    decoder: ModelCost
    device: DeviceSpec

    def step_sec(self, batch: Batch) -> float:
        """Device time of one engine step (no host time)."""
        device = self.device
        eager = device.launch_sec_per_forward
        replay = KERNEL_LAUNCH_SEC if device.cuda else eager
        encoder = self.encoder.forward_sec(encoder_forward(batch), device, eager)
        rolling = self.decoder.forward_sec(rolling_forward(batch), device, eager)
        steps = sum(self.decoder.forward_sec(s, device, replay) for s in sequential_forwards(batch, device.cuda))
        return encoder + rolling + steps

    def slot_bytes(self, capacity: int) -> float:
        """One stream's K/V slots, as the pools allocate them (+ the decoder's scratch column)."""
        return ENCODER_SLOT_COLUMNS * self.encoder.kv_bytes_per_key + (capacity + 1) * self.decoder.kv_bytes_per_key

    def streams_by_memory(self, capacity: int) -> int:
        weights = self.encoder.weight_bytes + self.decoder.weight_bytes
        return int((self.device.memory_bytes - weights) // self.slot_bytes(capacity))


def engine_cost(device: DeviceSpec, config: Qwen3ASRConfig = QWEN3_ASR_0_6B) -> EngineCost:
    """Per-unit costs counted on the meta device: one position (no cache) gives the weights' FLOPs per position and
    the attention's per (query, key) pair; one row of the output matrix its FLOPs per row."""
    counter = ModelFlopCounter(config)
    audio, text, value = config.audio, config.text, device.bytes_per_value
    step, position = counter.causal_block(1, 0), counter.text_model(1, 0)
    encoder_params = sum(p.numel() for p in counter.tower.parameters())
    decoder_params = sum(p.numel() for p in counter.decoder.parameters())  # layers + the tied output matrix
    return EngineCost(
        encoder=ModelCost(
            flops_per_position=step.weights,
            flops_per_pair=step.attention,
            flops_per_logit_row=0.0,
            weight_bytes=encoder_params * value,
            kv_bytes_per_key=2 * audio.encoder_layers * audio.d_model * value,
            activations=encoder_activations(audio, value, fused_attention=device.cuda),
        ),
        decoder=ModelCost(
            flops_per_position=position.weights,
            flops_per_pair=position.attention,
            flops_per_logit_row=counter.lm_head(1).total,
            weight_bytes=decoder_params * value,
            kv_bytes_per_key=2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * value,
            activations=decoder_activations(text, value, fused_attention=device.cuda),
        ),
        device=device,
    )


def decoder_capacity(max_new_tokens: int) -> int:
    """Decoder slot positions for a token budget, as the engine sizes them (`session.decoder_slot_positions`): head
    with room for the longest context + the segment's audio cap + tail + the token budget."""
    options = _OPTIONS.merged({"decode": {"max_new_tokens": max_new_tokens}})
    return decoder_slot_positions(PROMPT.head, PROMPT.tail, options)


def largest(fits: Callable[[int], bool], limit: int) -> int:
    """The largest n in [0, limit] with fits(n), for `fits` true up to some n and false after it (bisection)."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


#: Most streams the latency-only capacities search (far beyond any card's memory).
SEARCH_LIMIT = 100_000


def aligned_latency_sec(cost: EngineCost, streams: int, pool_slots: int, capacity: int, steps: int,
                        host: HostCost) -> float:
    """`streams` aligned streams' update latency: the step at their segment's slowest block, + host time."""
    device_sec = max(
        cost.step_sec(Batch(streams, streams, pool_slots, capacity, (block,), steps)) for block in ALL_BLOCKS
    )
    return device_sec + host.step_sec(streams)


def live_step_sec(cost: EngineCost, streams: int, period_sec: float, pool_slots: int, capacity: int, steps: int,
                  host: HostCost) -> float:
    """Device + host time of a live step of `streams` resident streams when a step starts every `period_sec`: it
    advances the blocks that arrived in that time, at every block of the segment."""
    stepping = min(streams, math.ceil(streams * period_sec / BLOCK_SEC))
    return cost.step_sec(Batch(stepping, streams, pool_slots, capacity, ALL_BLOCKS, steps)) + host.step_sec(stepping)


def aligned_capacity(cost: EngineCost, capacity: int, steps: int = SEQUENTIAL_STEPS, host: HostCost = NO_HOST,
                     pool_slots: int | None = None, latency_sec: float = LATENCY_SEC) -> int:
    """Most aligned streams whose update latency fits `latency_sec`, in a pool of `pool_slots` (at most that many
    streams) or, without one, a pool sized to the streams (rows = streams)."""
    def fits(streams: int) -> bool:
        pool = pool_slots or streams
        return aligned_latency_sec(cost, streams, pool, capacity, steps, host) <= latency_sec

    return largest(fits, pool_slots or SEARCH_LIMIT)


def live_capacity(cost: EngineCost, capacity: int, steps: int = SEQUENTIAL_STEPS, host: HostCost = NO_HOST,
                  pool_slots: int | None = None, latency_sec: float = LATENCY_SEC) -> int:
    """Most live streams whose steps keep up at half the latency (an update waits for the running step, then runs
    in its own), in a pool as for `aligned_capacity`."""
    period = latency_sec / 2

    def fits(streams: int) -> bool:
        return live_step_sec(cost, streams, period, pool_slots or streams, capacity, steps, host) <= period

    return largest(fits, pool_slots or SEARCH_LIMIT)


def format_roofline(
    devices: tuple[DeviceSpec, ...] = (H100_SXM, H200),
    calibration: tuple[int, ...] = (1, 8, 16),
    host: HostCost = MEASURED_HOST,
    budgets: tuple[int, ...] = (256, 64),
    slowest_steps: tuple[int, ...] = (SEQUENTIAL_STEPS, 2 * SEQUENTIAL_STEPS),
) -> str:
    """Markdown: the model's prediction on the CPU (to compare with `bench engine`) and capacity on GPUs."""
    cpu = engine_cost(CPU_2_CORES)
    cpu_capacity = decoder_capacity(_OPTIONS.decode.max_new_tokens)
    lines = [
        "Roofline ESTIMATE (not a measurement): per forward, max(FLOPs / sustained FLOP/s, (weights + K/V +",
        "activations) / sustained bandwidth) + launches; the engine's step-count, row and span rules.",
        "",
        f"Calibration on {CPU_2_CORES.name}: predicted step time, aligned streams, mean over a segment's blocks",
        "(compare `qwen3-stream bench engine`)",
        "",
        "| N | predicted step (s) | predicted RTFx |",
        "|---:|---:|---:|",
    ]
    for streams in calibration:
        seconds = sum(
            cpu.step_sec(Batch(streams, streams, streams, cpu_capacity, (block,))) for block in ALL_BLOCKS
        ) / len(ALL_BLOCKS)
        lines.append(f"| {streams} | {seconds:.2f} | {streams * BLOCK_SEC / seconds:.2f} |")
    lines += [
        "",
        f"Capacity at p95 update latency <= {LATENCY_SEC:g} s (estimated, roofline). Aligned: every stream updates in",
        "every step; latency = the step at the segment's slowest block. Live: blocks arrive spread over each 1.92 s,",
        "steps run back to back; latency <= 2 steps. Decode steps per update = the slowest stream's (9: every stream",
        "on the synthetic budget; 18: some stream decoding two blocks' worth). Slot positions: head + 64 context +",
        "200-step segment + tail + max_new_tokens (256 = the reference budget; 64 covers 16 s of speech at ~4",
        "tokens/s). 'by step' columns: a pool sized to the streams; 'capacity': the pool the card's memory holds (its",
        "size sets the row buckets), with host time. Host time per step, " + host.source + ":",
        f"{1e3 * host.fixed_sec:.1f} ms + {1e3 * host.per_stream_sec:.3f} ms per stream advanced (at 1000 streams "
        f"{host.step_sec(1000):.2f} s), added to the device's step (no overlap: the safe side).",
        "",
        "| device | max_new_tokens | decode steps | K/V slot MB/stream | streams by memory | aligned by step | "
        "aligned by step + host | live by step | live by step + host | capacity, aligned | capacity, live |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for device in devices:
        cost = engine_cost(device)
        for budget in budgets:
            capacity = decoder_capacity(budget)
            slots = cost.streams_by_memory(capacity)
            for steps in slowest_steps:
                by_step = [
                    count(cost, capacity, steps, measured)
                    for count in (aligned_capacity, live_capacity)
                    for measured in (NO_HOST, host)
                ]
                deployed = [count(cost, capacity, steps, host, slots) for count in (aligned_capacity, live_capacity)]
                slot_mb = f"{cost.slot_bytes(capacity) / 1e6:.1f}"
                cells = [device.name, budget, steps, slot_mb, slots, *by_step, *deployed]
                lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)
