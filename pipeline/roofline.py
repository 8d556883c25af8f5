"""A roofline estimate of engine capacity on a device we could not measure (an ESTIMATE, not a measurement).

One engine step advances N streams by one block each: one encoder forward, one rolling pass, then the sequential
decode steps. Each phase is bounded below by its arithmetic (counted FLOPs / sustained FLOP/s) and by its memory
traffic (weights read once per forward for the whole batch + each stream's K/V read by each forward, / sustained
bandwidth); a phase costs the larger of the two plus a fixed per-forward launch overhead. FLOPs come from
`pipeline.flops.ModelFlopCounter` on the full-size geometry, at the mean shapes of a segment under the published
steady-state budget (24-step block, 30-token draft, 9 sequential steps). Calibrate the model on a device we can
measure (the CPU, `qwen3-stream bench engine`) before trusting it on another.

The host's work per step (Python, scheduling, bookkeeping: what a GPU does not shorten) is not estimated but
measured (`HostCost`, from `bench engine --arrivals staggered-starts` on the tiny checkpoint) and added to the
device's step time for the capacity that counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import QWEN3_ASR_0_6B, Qwen3ASRConfig
from pipeline.encoder import STEP_FRAMES
from pipeline.flops import ModelFlopCounter
from pipeline.kv_pool import ENCODER_SLOT_COLUMNS
from pipeline.options import SessionOptions

_OPTIONS = SessionOptions()  # the published causal operating point: one default block per update
BLOCK_SEC = _OPTIONS.update_interval_sec
BLOCK_STEPS = _OPTIONS.encoder.block_frames // STEP_FRAMES
TAIL_AND_DRAFT = 9 + 30  # official tail + published draft
SEQUENTIAL_STEPS = 9
HEAD = 9
# Mean fill over a segment (segment_max_steps) of whole blocks: the k-th block (k = 0, 1, ...) sees k blocks cached.
SEGMENT_BLOCKS = _OPTIONS.segment.segment_max_steps // BLOCK_STEPS
MEAN_ENCODER_CACHED = BLOCK_STEPS * (SEGMENT_BLOCKS - 1) // 2
MEAN_AUDIO_CACHED = MEAN_ENCODER_CACHED


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    flops_per_sec: float  # sustained, in the working dtype
    bytes_per_sec: float  # sustained memory bandwidth
    memory_bytes: float  # for weights and K/V slots
    bytes_per_value: int  # 2 for bf16, 4 for fp32
    launch_sec_per_forward: float  # kernel launches of one forward (0 with CUDA graphs)


# Sustained = datasheet x an efficiency we consider reachable by eager PyTorch (50 % of dense bf16 tensor-core
# peak, 80 % of HBM bandwidth); launches: about 15 kernels per layer at 5 us. Memory for weights and slots: 90 % of
# the card; the rest holds the CUDA context and the step's transient activations, which the engine bounds
# (conv stem in 2048-piece calls, verification logits in 2048-row chunks: a few GB whatever N).
H100_SXM = DeviceSpec("H100 SXM (estimate)", 0.5 * 989e12, 0.8 * 3.35e12, 0.9 * 80e9, 2, 28 * 15 * 5e-6)
H200 = DeviceSpec("H200 (estimate)", 0.5 * 989e12, 0.8 * 4.8e12, 0.9 * 141e9, 2, 28 * 15 * 5e-6)


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


@dataclass(frozen=True)
class StepModel:
    """Per-stream FLOPs and bytes of one engine step, and the weights every forward reads once."""

    encoder_flops: float
    pass_flops: float
    step_flops: float  # one sequential step
    encoder_weight_bytes: float
    decoder_weight_bytes: float  # layers + tied output matrix
    encoder_kv_bytes: float  # per stream, read by the encoder forward
    decoder_kv_bytes: float  # per stream, read by each decoder forward
    slot_bytes: float  # per stream K/V slot (pool capacity)

    def step_sec(self, streams: int, device: DeviceSpec) -> float:
        def phase(flops: float, weights: float, kv: float) -> float:
            compute = streams * flops / device.flops_per_sec
            memory = (weights + streams * kv) / device.bytes_per_sec
            return max(compute, memory) + device.launch_sec_per_forward

        encoder = phase(self.encoder_flops, self.encoder_weight_bytes, self.encoder_kv_bytes)
        rolling = phase(self.pass_flops, self.decoder_weight_bytes, self.decoder_kv_bytes)
        steps = SEQUENTIAL_STEPS * phase(self.step_flops, self.decoder_weight_bytes, self.decoder_kv_bytes)
        return encoder + rolling + steps

    def max_streams(
        self, device: DeviceSpec, latency_sec: float, limit: int = 1_000_000, host: HostCost | None = None
    ) -> int:
        """Most aligned streams (up to `limit`) whose step, i.e. their update latency, fits `latency_sec`; with
        `host`, the host's time is added to the device's (no overlap: the bound on the safe side)."""
        low, high = 0, limit
        while low < high:  # the step time grows with N: bisect
            middle = (low + high + 1) // 2
            host_sec = host.step_sec(middle) if host is not None else 0.0
            if self.step_sec(middle, device) + host_sec <= latency_sec:
                low = middle
            else:
                high = middle - 1
        return low


def step_model(config: Qwen3ASRConfig = QWEN3_ASR_0_6B, bytes_per_value: int = 2, slot_positions: int = 474) -> StepModel:
    counter = ModelFlopCounter(config)
    audio, text = config.audio, config.text
    decoder_cached = HEAD + MEAN_AUDIO_CACHED
    encoder = counter.causal_block(BLOCK_STEPS, MEAN_ENCODER_CACHED).total
    rolling = counter.text_model(BLOCK_STEPS + TAIL_AND_DRAFT, decoder_cached).total + counter.lm_head(31).total
    step = counter.text_model(1, decoder_cached + BLOCK_STEPS + TAIL_AND_DRAFT).total + counter.lm_head(1).total
    encoder_params = sum(p.numel() for p in counter.tower.parameters())
    decoder_params = sum(p.numel() for p in counter.decoder.parameters())
    encoder_kv_per_step = 2 * audio.encoder_layers * audio.d_model
    decoder_kv_per_position = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim
    return StepModel(
        encoder_flops=encoder,
        pass_flops=rolling,
        step_flops=step,
        encoder_weight_bytes=encoder_params * bytes_per_value,
        decoder_weight_bytes=decoder_params * bytes_per_value,
        encoder_kv_bytes=MEAN_ENCODER_CACHED * encoder_kv_per_step * bytes_per_value,
        decoder_kv_bytes=(decoder_cached + BLOCK_STEPS + TAIL_AND_DRAFT) * decoder_kv_per_position * bytes_per_value,
        slot_bytes=(ENCODER_SLOT_COLUMNS * encoder_kv_per_step + (slot_positions + 1) * decoder_kv_per_position)
        * bytes_per_value,
    )


# The machine the benchmarks ran on, as measured (seed_cpu_cost.md: sgemm 2048^3 at 107-124 GFLOP/s, decode steps
# stream weights at 11-13 GB/s; our gemv reaches 17 GB/s): used to check the model against `bench engine`.
CPU_2_CORES = DeviceSpec("2-core CPU, fp32 (calibration)", 110e9, 14e9, 20e9, 4, 0.0)


def format_roofline(
    devices: tuple[DeviceSpec, ...] = (H100_SXM, H200),
    calibration: tuple[int, ...] = (1, 8, 16),
    host: HostCost = MEASURED_HOST,
) -> str:
    """Markdown: the model's prediction on the CPU (to compare with `bench engine`) and capacity on GPUs."""
    cpu = step_model(bytes_per_value=4)
    lines = [
        "Roofline ESTIMATE (not a measurement): per engine step, each phase costs max(FLOPs / sustained FLOP/s,",
        "bytes / sustained bandwidth) + launch overhead; mean segment shapes, published decode budget.",
        "",
        f"Calibration on {CPU_2_CORES.name}: predicted step time (compare `qwen3-stream bench engine`)",
        "",
        "| N | predicted step (s) | predicted RTFx |",
        "|---:|---:|---:|",
    ]
    for streams in calibration:
        seconds = cpu.step_sec(streams, CPU_2_CORES)
        lines.append(f"| {streams} | {seconds:.2f} | {streams * BLOCK_SEC / seconds:.2f} |")
    lines += [
        "",
        "Capacity = min(streams whose K/V slots fit memory, streams whose aligned step fits the latency). Slot",
        "positions: head + 200-step segment + tail + max_new_tokens (256 = the reference budget; 64 covers 16 s of",
        "speech at ~4 tokens/s). Host time per step, " + host.source + ":",
        f"{1e3 * host.fixed_sec:.1f} ms + {1e3 * host.per_stream_sec:.3f} ms per stream (at 1000 streams "
        f"{host.step_sec(1000):.2f} s), added to the device's step (no overlap: the safe side).",
        "",
        "| device | max_new_tokens | K/V slot MB/stream | streams by memory | by step <= 0.5 s | "
        f"by step <= {BLOCK_SEC:g} s | by step + host <= 0.5 s | "
        "capacity at p95 <= 0.5 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for device in devices:
        for budget in (256, 64):
            model = step_model(bytes_per_value=device.bytes_per_value, slot_positions=HEAD + 200 + 9 + budget)
            weights = model.encoder_weight_bytes + model.decoder_weight_bytes
            by_memory = int((device.memory_bytes - weights) // model.slot_bytes)
            fast, real_time = model.max_streams(device, 0.5), model.max_streams(device, BLOCK_SEC)
            with_host = model.max_streams(device, 0.5, host=host)
            lines.append(
                f"| {device.name} | {budget} | {model.slot_bytes / 1e6:.1f} | {by_memory} | {fast} | {real_time} | "
                f"{with_host} | {min(by_memory, with_host)} |"
            )
    return "\n".join(lines)
