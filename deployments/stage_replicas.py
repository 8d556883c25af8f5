"""Ray Serve deployments hosting the pipeline's stages: thin classes that own a stage and batch calls into it.

Each replica loads the model it needs, sets torch's thread count to the CPUs Ray reserved for it (two torch
processes spinning on the same cores slow each other 5-10x), and runs its stage on one worker thread, so the
replica's event loop keeps collecting the next batch while a forward runs. All three batch concurrent calls of
many streams (`deployments.batching.StageBatcher`, not `@serve.batch`, which would run calls arriving during a
long forward as batches of one): every call that arrived while the previous forward ran goes into the next one
(that is the stage's own step loop, fed by concurrent calls). Encoder and decoder are routed sticky per stream
and segment (`session_id`, consistent hashing; see `deployments.app`), because they hold K/V; a call that lands
on a replica without the stream's state gets a `StageMiss` and the ingress replays the segment.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray
import torch
from ray import serve
from ray.serve.metrics import Histogram
from torch import Tensor

from deployments.batching import StageBatcher
from pipeline.checkpoint import ASRModel, dtype_from_name, load_model
from pipeline.engine import EngineOptions
from pipeline.host_policy import settle_host
from pipeline.options import SessionOptions
from pipeline.prompt import SUPPORTED_LANGUAGES, build_causal_prompt
from pipeline.rolling import UpdateResult
from pipeline.session import decoder_positions_needed
from pipeline.stages import (
    DecoderStage,
    DecodeRequest,
    EncoderStage,
    EncodeRequest,
    FeatureRequest,
    FeatureResult,
    FeatureStage,
    StageAtCapacity,
    StageMiss,
)

log = logging.getLogger(__name__)

#: Batch sizes observed by the GPU stages (Prometheus, through Ray's metrics export).
_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@dataclass(frozen=True)
class ModelSpec:
    """Which checkpoint every replica loads, where, and in which dtype."""

    model: str
    tower: str | None
    device: str = "cpu"
    dtype: str | None = None  # None: the device's default

    def load(self) -> ASRModel:
        return load_model(self.model, tower=self.tower, device=self.device, dtype=dtype_from_name(self.dtype))


def reserve_threads() -> int:
    """Set torch's threads to the CPUs Ray reserved for this replica (at least one); returns the count."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    return threads


class _StageHost:
    """One worker thread that runs every call into the stage, in arrival order; answers name this replica."""

    def __init__(self) -> None:
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def run(self, function, *args):  # noqa: ANN001, ANN002, ANN201 (a thin pass-through)
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)


class _KVStageHost(_StageHost):
    """A host of a stage with per-stream K/V slots (encoder, decoder)."""

    async def release(self, stream_id: str, segment_index: int) -> None:
        await self.run(self.stage.release, stream_id, segment_index)

    async def slots_in_use(self) -> tuple[str, int]:
        """(this replica, K/V slots holding a stream): for soak runs and operators."""
        return self.replica, await self.run(self.stage.streams.in_use)


@serve.deployment
class FeatureExtractor(_StageHost):
    """Streaming log-mel (CPU); stateless, so any replica serves any stream."""

    def __init__(self) -> None:
        super().__init__()
        reserve_threads()
        self.stage = FeatureStage()
        # No wait for a batch to fill: the calls queued while the last batch ran go together (stacked FFTs).
        self.batcher = StageBatcher(self._extract_batch, max_batch_size=64, wait_s=0.0)
        settle_host()

    async def extract(self, request: FeatureRequest) -> FeatureResult:
        return await self.batcher.submit(request)

    async def _extract_batch(self, requests: list[FeatureRequest]) -> list[FeatureResult]:
        return await self.run(self.stage.extract, requests)


@serve.deployment
class CausalEncoder(_KVStageHost):
    """The causal tower over a K/V slot pool; one batched forward per batch of streams' blocks."""

    def __init__(self, spec: ModelSpec, slots: int, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        super().__init__()
        threads = reserve_threads()
        self.stage = EncoderStage(spec.load().audio_tower, slots)
        self.batcher = StageBatcher(self._encode_batch, max_batch_size, batch_wait_timeout_s)
        self.batch_size = Histogram("qwen3_stream_encoder_batch_size", "blocks per encoder forward", _BATCH_BOUNDARIES)
        log.info("CausalEncoder: %d slots, %d torch threads", slots, threads)
        settle_host()  # its model and pool are kept for its life

    async def encode(self, request: EncodeRequest) -> tuple[str, Tensor | StageMiss | StageAtCapacity]:
        return await self.batcher.submit(request, request.stream_id)

    async def _encode_batch(
        self, requests: list[EncodeRequest]
    ) -> list[tuple[str, Tensor | StageMiss | StageAtCapacity]]:
        self.batch_size.observe(len(requests))
        return [(self.replica, answer) for answer in await self.run(self.stage.encode, requests)]


@serve.deployment
class Decoder(_KVStageHost):
    """The text decoder over a K/V slot pool; one batched rolling update per batch of streams."""

    def __init__(
        self, spec: ModelSpec, slots: int, max_batch_size: int, batch_wait_timeout_s: float, options: SessionOptions
    ) -> None:
        """`options`: the streams' default session options (slots hold a segment under them, in any language)."""
        super().__init__()
        threads = reserve_threads()
        model = spec.load()
        decode_step = EngineOptions().decode_step_on(model.device)
        self.stage = DecoderStage(model.text_decoder, slots, _decoder_capacity(model, options), decode_step)
        self.batcher = StageBatcher(self._update_batch, max_batch_size, batch_wait_timeout_s)
        self.batch_size = Histogram("qwen3_stream_decoder_batch_size", "streams per decoder update", _BATCH_BOUNDARIES)
        log.info("Decoder: %d slots of %d positions, %d torch threads", slots, self.stage.capacity, threads)
        settle_host()

    async def update(self, request: DecodeRequest) -> tuple[str, UpdateResult | StageMiss | StageAtCapacity]:
        return await self.batcher.submit(request, request.stream_id)

    async def _update_batch(
        self, requests: list[DecodeRequest]
    ) -> list[tuple[str, UpdateResult | StageMiss | StageAtCapacity]]:
        self.batch_size.observe(len(requests))
        return [(self.replica, answer) for answer in await self.run(self.stage.update, requests)]


def _decoder_capacity(model: ASRModel, options: SessionOptions) -> int:
    """Positions per slot: what a segment needs under the session options, in any language."""
    prompts = [build_causal_prompt(model.tokenizer, language=language) for language in (None, *SUPPORTED_LANGUAGES)]
    return max(decoder_positions_needed(prompt, options) for prompt in prompts)
