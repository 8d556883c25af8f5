"""The three stages of a causal stream, each owning its runner and its per-stream state, batched across streams.

A stream's session (`pipeline.session`) is request state plus policy: it cuts its mel into blocks, decides
segments, commits words and makes events. The model work happens here, in stages that serve many streams:

* `FeatureStage`: streaming log-mel. Stateless: a request carries the stream's front-end and gets it back
  advanced, with the mel frames its audio completed (a CPU stage that any replica can serve).
* `EncoderStage`: the causal tower's K/V slot pool; one `encode` call runs every request's block in one batched
  forward on the streams' slots.
* `DecoderStage`: the text decoder's K/V slot pool; one `update` call runs every request's rolling update
  (one parallel pass, batched verification, batched greedy steps).

The in-process engine (`pipeline.engine`) composes the three in one process; the Ray Serve deployments
(`deployments/`) host the very same objects, one per replica. Every request names its stream, its segment and
how far into the segment it is (`block_index`, `update_index`). The encoder and decoder stages keep K/V only
for the current segment of each stream (a segment roll empties it, which is where a stream may move to another
replica); a stage that does not hold the state a request continues (the replica restarted, routing moved the
stream) answers with a `StageMiss`, and the stream's owner sends the request again with `replay`: the segment's
earlier blocks (encoder) or earlier updates' audio (decoder), at most 16 s. The stage rebuilds the state by
running exactly the forwards it missed, in order, so the answer equals the one it would have given.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from pipeline.causal_encoder import CausalAudioEncoder, CausalEncoderOptions, CausalEncoderState
from pipeline.decode_step import DecodeStep, DynamicDecodeStep, StaticDecodeStep
from pipeline.decoder import TextDecoder
from pipeline.decoding import DecodeControls
from pipeline.encoder import AudioTower
from pipeline.features import N_MELS, StreamingLogMel, extract_log_mel
from pipeline.kv_pool import DecoderKVPool, EncoderKVPool
from pipeline.prompt import CausalPrompt
from pipeline.rolling import RollingDecoder, RollingDecoderState, UpdateResult
from pipeline.vad import SileroVAD, VadState, load_silero_vad, score_streams

Answer = TypeVar("Answer")

log = logging.getLogger(__name__)

#: How the sequential greedy steps run (see `pipeline.decode_step`).
DECODE_STEP_KINDS = ("dynamic", "static", "cuda_graph")


class StageAtCapacity(RuntimeError):
    """Every K/V slot of a stage is taken: the stream must wait or go to another replica."""


@dataclass(frozen=True)
class StageMiss:
    """The stage does not hold the state this request continues; resend it with `replay`."""

    stream_id: str
    segment_index: int
    reason: str


def answer_of(answer: Answer | StageMiss | StageAtCapacity) -> Answer:
    """A stage's answer to a request that cannot miss (its stages are in-process): raise what is not a result."""
    if isinstance(answer, StageAtCapacity):
        raise answer
    if isinstance(answer, StageMiss):
        raise RuntimeError(f"stream {answer.stream_id!r} missed its in-process stage state: {answer.reason}")
    return answer


# ---------------------------------------------------------------------------------------------------- features


@dataclass
class FeatureRequest:
    frontend: StreamingLogMel  # the stream's front-end; comes back advanced
    pcm: np.ndarray  # 16 kHz mono float32
    flush: bool = False  # end of stream: also emit the last (end-padded) frames
    vad: VadState | None = None  # the stream's voice activity detector, if its gate is on; comes back advanced


@dataclass
class FeatureResult:
    frontend: StreamingLogMel
    mel: Tensor  # [frames, mel_bins] completed by this request's audio
    vad: VadState | None = None
    speech: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # new windows' probabilities


class FeatureStage:
    """Streaming log-mel, and voice activity for the streams that gate on it, for many streams. Holds no stream
    state: the front-end and the detector travel with the request. The log-mel groups of all requests go through
    stacked FFT calls (`pipeline.features.extract_log_mel`), the detector's windows through one batched forward."""

    def __init__(self) -> None:
        self._vad_model: SileroVAD | None = None  # loaded on the first request that needs it
        self._vad_loading = threading.Lock()  # two threads may call `extract` at once (the engine splits a call)

    def extract(self, requests: Sequence[FeatureRequest]) -> list[FeatureResult]:
        working = [request for request in requests if request.pcm.size or request.flush]  # (a flushed front-end
        # takes no audio: a request with neither is a no-op, e.g. a session restored after its flush)
        mels = extract_log_mel(
            [request.frontend for request in working],
            [request.pcm for request in working],
            [request.flush for request in working],
        )
        mel_of = {id(request): mel for request, mel in zip(working, mels)}
        results = [
            FeatureResult(request.frontend, mel_of.get(id(request), torch.zeros(0, N_MELS))) for request in requests
        ]
        gated = [i for i, request in enumerate(requests) if request.vad is not None]
        if gated:
            with self._vad_loading:
                if self._vad_model is None:
                    self._vad_model = load_silero_vad()
            scored = score_streams(self._vad_model, [requests[i].vad for i in gated], [requests[i].pcm for i in gated])
            for i, (state, speech) in zip(gated, scored):
                results[i].vad, results[i].speech = state, speech
        return results


# ---------------------------------------------------------------------------------------------------- slots


class _Slots:
    """Slot admission for one stage: the lowest free slot first (live streams stay packed at the low slots that
    batches and fixed-shape steps cover)."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"slots is {count}; expected at least 1")
        self.count = count
        self._free = list(range(count))

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self, stream_id: str) -> int:
        if not self._free:
            raise StageAtCapacity(f"all {self.count} slots are taken; stream {stream_id!r} has none")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)


#: A stream's state that no request has touched for this long is dropped, its slot freed. Its owner may have died,
#: or its release may have overtaken its last request (a client that went away mid-block); a stream that was only
#: quiet gets a `StageMiss` and replays, so dropping is always safe.
IDLE_STATE_S = 120.0


@dataclass
class _StreamEntry:
    """What a stage holds for one stream: its current segment's state in one slot."""

    segment_index: int
    slot: int
    state: CausalEncoderState | RollingDecoderState
    done: int = 0  # blocks encoded / updates run in this segment
    used_at: float = 0.0  # monotonic time of its last request


class _SegmentStates:
    """Per-stream entries of a stage, keyed by stream; a request starting a segment replaces the old one."""

    def __init__(self, slots: int, idle_s: float = IDLE_STATE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = _Slots(slots)
        self.entries: dict[str, _StreamEntry] = {}
        self.idle_s = idle_s
        self.clock = clock
        self._swept_at = float("-inf")

    def resolve(
        self, stream_id: str, segment_index: int, position: int, new_state: Callable[[int], object]
    ) -> _StreamEntry | StageMiss | StageAtCapacity:
        """The entry a request at `position` (blocks or updates already done in its segment) continues.

        Position 0 starts the segment: a fresh state in the lowest free slot (the stream's old slot, if any, is
        released first, so a stream moves down at segment starts). Otherwise the entry must be this segment's,
        exactly `position` far."""
        now = self.clock()
        self._drop_idle(now)
        entry = self.entries.get(stream_id)
        if entry is not None:
            entry.used_at = now
        if position == 0:
            if entry is not None:
                self.release(stream_id)
            try:
                slot = self.slots.acquire(stream_id)
            except StageAtCapacity as full:
                return full
            entry = _StreamEntry(segment_index, slot, new_state(slot), used_at=now)  # type: ignore[arg-type]
            self.entries[stream_id] = entry
            return entry
        if entry is None:
            return StageMiss(stream_id, segment_index, "no state for this stream here")
        if entry.segment_index != segment_index or entry.done != position:
            return StageMiss(
                stream_id,
                segment_index,
                f"holds segment {entry.segment_index} after {entry.done}; asked to continue segment "
                f"{segment_index} after {position}",
            )
        return entry

    def in_use(self) -> int:
        """Slots holding a stream's state, once the idle ones are dropped."""
        self._drop_idle(self.clock())
        return self.slots.count - self.slots.free

    def _drop_idle(self, now: float) -> None:
        """Free the slots of states idle for `idle_s` (a sweep at most once a second)."""
        if now - self._swept_at < 1.0:
            return
        self._swept_at = now
        for stream_id in [s for s, entry in self.entries.items() if now - entry.used_at > self.idle_s]:
            log.info("dropping the idle state of stream %r (no request for %.0f s)", stream_id, self.idle_s)
            self.release(stream_id)

    def release(self, stream_id: str, segment_index: int | None = None) -> None:
        """Forget the stream (only its `segment_index` state, if given: a later segment's stays)."""
        entry = self.entries.get(stream_id)
        if entry is not None and segment_index in (None, entry.segment_index):
            del self.entries[stream_id]
            self.slots.release(entry.slot)


# ---------------------------------------------------------------------------------------------------- encoder


@dataclass(frozen=True)
class EncodeRequest:
    stream_id: str
    segment_index: int
    block_index: int  # blocks of this segment encoded before `mel`
    mel: Tensor  # [frames, mel_bins], a multiple of 8 frames up to the block size
    encoder: CausalEncoderOptions  # the stream's block size and attention window
    replay: tuple[Tensor, ...] = ()  # after a miss: the segment's blocks 0 .. block_index - 1

    def with_replay(self, blocks: Sequence[Tensor]) -> "EncodeRequest":
        if len(blocks) != self.block_index:
            raise ValueError(f"replay of {len(blocks)} blocks; expected the {self.block_index} before this one")
        return replace(self, replay=tuple(blocks))


class EncoderStage:
    """The causal tower over a slot pool: `encode` runs one block per request, all in one batched forward."""

    def __init__(self, tower: AudioTower, slots: int) -> None:
        self.tower = tower
        self.pool = EncoderKVPool(tower, slots)
        self.streams = _SegmentStates(slots)
        self._encoders: dict[CausalEncoderOptions, CausalAudioEncoder] = {}

    @property
    def free_slots(self) -> int:
        return self.streams.slots.free

    def release(self, stream_id: str, segment_index: int | None = None) -> None:
        """Forget a stream (it ended, or its next segment runs elsewhere) and free its slot; with
        `segment_index`, only that segment's state."""
        self.streams.release(stream_id, segment_index)

    def slot_of(self, stream_id: str) -> int | None:
        entry = self.streams.entries.get(stream_id)
        return None if entry is None else entry.slot

    def cached_steps(self, stream_id: str) -> int:
        entry = self.streams.entries.get(stream_id)
        return 0 if entry is None else entry.state.cached_steps  # type: ignore[union-attr]

    def encode(self, requests: Sequence[EncodeRequest]) -> list[Tensor | StageMiss | StageAtCapacity]:
        """Each request's block embeddings [steps, output_dim]; a miss; or `StageAtCapacity` (not raised: the
        other requests of the batch go on) when a new segment finds no free slot."""
        if len({r.stream_id for r in requests}) != len(requests):
            raise ValueError("a stream appears twice in one encode call; its blocks must go in order")
        return _serve(
            self.streams,
            requests,
            position=lambda r: r.block_index,
            new_state=lambda r: lambda slot: self.pool.new_state(self._encoder(r.encoder), slot),
            own_input=lambda r: r.mel,
            run=self._forward,
        )

    def _forward(self, requests: list[EncodeRequest], blocks: list[Tensor]) -> list[Tensor]:
        """One forward per encoder setting (streams of different block sizes cannot share one)."""
        out: dict[int, Tensor] = {}
        for group in _grouped(range(len(requests)), lambda i: requests[i].encoder):
            entries = [self.streams.entries[requests[i].stream_id] for i in group]
            encoded = self.pool.encode_blocks(
                self._encoder(requests[group[0]].encoder),
                [entry.slot for entry in entries],
                [entry.state for entry in entries],  # type: ignore[misc]
                [blocks[i] for i in group],
            )
            for i, entry, embeddings in zip(group, entries, encoded):
                entry.done += 1
                out[i] = embeddings
        return [out[i] for i in range(len(requests))]

    def _encoder(self, options: CausalEncoderOptions) -> CausalAudioEncoder:
        if options not in self._encoders:
            self._encoders[options] = CausalAudioEncoder(self.tower, options)
        return self._encoders[options]


# ---------------------------------------------------------------------------------------------------- decoder


@dataclass(frozen=True)
class DecoderSettings:
    """What must agree for streams to share a decoder update: the prompt, the decode controls, speculation."""

    prompt: CausalPrompt
    controls: DecodeControls = field(compare=False, hash=False)
    speculative: bool = True

    @property
    def key(self) -> Hashable:
        return self.prompt, self.controls.options, self.speculative


@dataclass(frozen=True)
class DecodeRequest:
    stream_id: str
    segment_index: int
    update_index: int  # updates of this segment run before this one
    audio: Tensor  # [steps, hidden]: the audio embeddings encoded since the last update
    settings: DecoderSettings
    replay: tuple[Tensor, ...] = ()  # after a miss: the audio of updates 0 .. update_index - 1

    def with_replay(self, audio: Sequence[Tensor]) -> "DecodeRequest":
        if len(audio) != self.update_index:
            raise ValueError(f"replay of {len(audio)} updates; expected the {self.update_index} before this one")
        return replace(self, replay=tuple(audio))


class DecoderStage:
    """The text decoder over a slot pool: `update` runs every request's rolling update in one batch."""

    def __init__(self, decoder: TextDecoder, slots: int, capacity: int, decode_step: str = "dynamic") -> None:
        if decode_step not in DECODE_STEP_KINDS:
            raise ValueError(f"decode_step is {decode_step!r}; expected one of {DECODE_STEP_KINDS}")
        self.decoder = decoder
        self.pool = DecoderKVPool(decoder, slots, capacity)
        self.streams = _SegmentStates(slots)
        self.decode_step: DecodeStep = (
            DynamicDecodeStep(decoder)
            if decode_step == "dynamic"
            else StaticDecodeStep(decoder, self.pool, cuda_graphs=decode_step == "cuda_graph")
        )

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    @property
    def free_slots(self) -> int:
        return self.streams.slots.free

    def release(self, stream_id: str, segment_index: int | None = None) -> None:
        self.streams.release(stream_id, segment_index)

    def slot_of(self, stream_id: str) -> int | None:
        entry = self.streams.entries.get(stream_id)
        return None if entry is None else entry.slot

    def state_of(self, stream_id: str) -> RollingDecoderState | None:
        entry = self.streams.entries.get(stream_id)
        return None if entry is None else entry.state  # type: ignore[return-value]

    def cached_positions(self, stream_id: str) -> int:
        state = self.state_of(stream_id)
        return 0 if state is None else state.cache.length

    def update(self, requests: Sequence[DecodeRequest]) -> list[UpdateResult | StageMiss | StageAtCapacity]:
        """Each request's update result; a miss; or `StageAtCapacity` when a new segment finds no free slot."""
        if len({r.stream_id for r in requests}) != len(requests):
            raise ValueError("a stream appears twice in one update call; its updates must go in order")
        return _serve(
            self.streams,
            requests,
            position=lambda r: r.update_index,
            new_state=lambda r: lambda slot: RollingDecoderState(cache=self.pool.new_cache(slot)),
            own_input=lambda r: r.audio,
            run=self._run,
        )

    def _run(self, requests: list[DecodeRequest], audio: list[Tensor]) -> list[UpdateResult]:
        """One batched rolling update per group of equal decoder settings."""
        out: dict[int, UpdateResult] = {}
        for group in _grouped(range(len(requests)), lambda i: requests[i].settings.key):
            settings = requests[group[0]].settings
            rolling = RollingDecoder(self.decoder, settings.prompt, settings.controls, speculative=settings.speculative)
            entries = [self.streams.entries[requests[i].stream_id] for i in group]
            results = rolling.update(
                [entry.state for entry in entries],  # type: ignore[misc]
                [audio[i] for i in group],
                self.decode_step,
            )
            for i, entry, result in zip(group, entries, results):
                entry.done += 1
                out[i] = result
        return [out[i] for i in range(len(requests))]


def _serve(
    streams: _SegmentStates,
    requests: Sequence[EncodeRequest | DecodeRequest],
    position: Callable,
    new_state: Callable,
    own_input: Callable,
    run: Callable,
) -> list:
    """The shape of every stateful stage call: resolve each request's stream state (a miss, no free slot, or the
    entry it continues: `position` forwards into its segment, less its replay), replay the missed forwards round by
    round (every replaying stream's k-th one in one batch), then run every live request's own input in one batch."""
    answers: list = [None] * len(requests)
    live: list[int] = []
    for index, request in enumerate(requests):
        entry = streams.resolve(
            request.stream_id, request.segment_index, position(request) - len(request.replay), new_state(request)
        )
        if isinstance(entry, _StreamEntry):
            live.append(index)
        else:
            answers[index] = entry
    replaying = [i for i in live if requests[i].replay]
    for round_index in range(max((len(requests[i].replay) for i in replaying), default=0)):
        batch = [i for i in replaying if round_index < len(requests[i].replay)]
        run([requests[i] for i in batch], [requests[i].replay[round_index] for i in batch])
    for index, answer in zip(live, run([requests[i] for i in live], [own_input(requests[i]) for i in live])):
        answers[index] = answer
    return answers


def _grouped(items: Iterable[int], key: Callable[[int], Hashable]) -> list[list[int]]:
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return list(groups.values())
