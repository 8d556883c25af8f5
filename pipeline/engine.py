"""Many causal streams advanced together: one batched encoder forward and one batched decoder update per step.

A `StreamingEngine` owns up to `max_streams` `StreamingSession`s (one slot each). Audio is buffered per stream
(only the cheap log-mel front-end runs on arrival); `step()` then advances every stream that has a whole block
buffered, or whose end was signalled, by exactly one block:

1. scheduling: each session's `next_block` rolls its segment if the block would pass the cap and hands out the
   block (the same code the single-stream session runs);
2. one `CausalAudioEncoder.encode_blocks` over all those blocks (ragged caches, one forward);
3. one `RollingDecoder.update` over all those streams (one parallel pass, batched verification, batched
   greedy steps with streams leaving as they stop);
4. per stream, `complete_block` applies the commit and segment policy and makes the events; a stream whose end
   was signalled and whose last block is decoded is finalized and its slot freed.

Because every phase is the session's own code and the batched forwards give each stream what it gets alone,
each stream's events equal those of a `StreamingSession` fed the same audio, whatever the other streams do.
Streams whose options change the model inputs (block size; prompt or decode controls) cannot share a forward;
they are batched in groups of equal settings, one forward per group.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Hashable

import numpy as np

from pipeline.checkpoint import ASRModel
from pipeline.session import CausalBlock, SessionOptions, StreamingSession, TranscriptEvent

log = logging.getLogger(__name__)


class EngineAtCapacity(RuntimeError):
    """Every stream slot is taken: retry once a stream has finished, or send the stream elsewhere."""


class StreamingEngine:
    """Advance many causal streams in lock-step batches. Not thread-safe: drive it from one task or thread."""

    def __init__(self, model: ASRModel, options: SessionOptions | None = None, max_streams: int = 32) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams is {max_streams}; expected at least 1")
        self.model = model
        self.options = options or SessionOptions()
        _check_backend(self.options)
        self.max_streams = max_streams
        self._sessions: dict[str, StreamingSession] = {}

    # ------------------------------------------------------------------ admission

    @property
    def active_streams(self) -> list[str]:
        return list(self._sessions)

    @property
    def free_slots(self) -> int:
        return self.max_streams - len(self._sessions)

    def open_stream(self, stream_id: str, options: SessionOptions | None = None) -> None:
        """Admit a new stream, with the engine's options unless given; raises `EngineAtCapacity` when full."""
        if stream_id in self._sessions:
            raise ValueError(f"stream {stream_id!r} is already open")
        stream_options = options or self.options
        _check_backend(stream_options)
        if self.free_slots == 0:
            raise EngineAtCapacity(f"all {self.max_streams} stream slots are taken; stream {stream_id!r} was not admitted")
        self._sessions[stream_id] = StreamingSession(self.model, stream_options)

    # ------------------------------------------------------------------ input

    def push_audio(self, stream_id: str, pcm: np.ndarray) -> None:
        """Buffer 16 kHz mono float32 PCM for a stream; it is encoded by later `step` calls."""
        self._session(stream_id).buffer_audio(pcm)

    def finish_stream(self, stream_id: str) -> None:
        """Signal the end of a stream's audio; later steps decode what is left, then finalize it."""
        self._session(stream_id).begin_finish()

    @property
    def has_work(self) -> bool:
        """Whether a `step` now would advance some stream (a whole block buffered, or an end to process)."""
        return any(session.block_ready or session.done_encoding for session in self._sessions.values())

    # ------------------------------------------------------------------ the step

    def step(self) -> dict[str, list[TranscriptEvent]]:
        """Advance every ready stream by one block; returns the new events of each stream that produced any."""
        blocks: dict[str, CausalBlock] = {}
        for stream_id, session in self._sessions.items():
            block = session.next_block()
            if block is not None:
                blocks[stream_id] = block

        embeddings = {}
        for group in _grouped(blocks, lambda stream_id: self._sessions[stream_id].encoder.options):
            encoder = self._sessions[group[0]].encoder
            encoded = encoder.encode_blocks([blocks[s].encoder for s in group], [blocks[s].mel for s in group])
            embeddings.update(zip(group, encoded))

        events: dict[str, list[TranscriptEvent]] = {}
        for group in _grouped(blocks, lambda stream_id: _decoder_settings(self._sessions[stream_id])):
            rolling = self._sessions[group[0]].rolling
            results = rolling.update([blocks[s].decoder for s in group], [embeddings[s] for s in group])
            for stream_id, result in zip(group, results):
                events[stream_id] = self._sessions[stream_id].complete_block(blocks[stream_id], result)

        for stream_id, session in list(self._sessions.items()):
            if session.done_encoding:
                events.setdefault(stream_id, []).extend(session.finalize())
                del self._sessions[stream_id]  # frees the slot
        if blocks:
            log.debug("step: %d blocks over %d open streams", len(blocks), len(self._sessions))
        return events

    def _session(self, stream_id: str) -> StreamingSession:
        session = self._sessions.get(stream_id)
        if session is None:
            raise KeyError(f"no open stream {stream_id!r}; open it first (finished streams are closed)")
        return session


def _check_backend(options: SessionOptions) -> None:
    if options.backend != "causal":
        raise ValueError(f"backend is {options.backend!r}; the engine batches only the 'causal' backend")


def _decoder_settings(session: StreamingSession) -> Hashable:
    """What must agree for streams to share a decoder update: the prompt, the decode controls, speculation."""
    return session.prompt, session.controls.options, session.rolling.speculative


def _grouped(stream_ids: dict[str, CausalBlock], key: Callable[[str], Hashable]) -> list[list[str]]:
    groups: dict[Hashable, list[str]] = defaultdict(list)
    for stream_id in stream_ids:
        groups[key(stream_id)].append(stream_id)
    return list(groups.values())
