"""One live stream end to end: PCM in, transcript events out.

A `StreamingSession` owns everything per stream: the log-mel front-end, the audio backend, the decoder state,
the segment policy and the commit policy. Two backends:

* **causal** (default): each completed mel block is encoded exactly once by the causal tower against its K/V
  cache, then one rolling decoder update runs with speculative re-decoding (`pipeline/rolling.py`). Cost per
  block is constant.
* **windowed** (for comparison, the published "recompute" backend): every 2 s the offline tower re-encodes a
  12 s + 640 ms mel window and the decoder re-prefills `[head + all segment audio + tail]` from scratch.

Segments roll at a sentence end once they hold >= 150 steps (12 s), or before an update would push them past
200 steps (16 s). A roll finalizes the segment's text and drops the encoder and decoder state; only the partial
mel block, the front-end state and the transcript carry over. At every roll the session also produces a
**checkpoint**: plain bytes (JSON) from which `StreamingSession.restore` rebuilds a session that, fed the audio
from `checkpoint.sample_offset` on, emits exactly the events the uninterrupted session emits after the roll.

The dynamic-range clamp of the front-end keeps one running maximum for the whole stream (never reset at a
segment roll): a reset would have to happen at a frame index that depends on how audio arrived.

The session is request state plus policy; the model work runs in stages (`pipeline.stages`) that own the
K/V. The causal path is split into halves (`next_block`, then the stage requests, then `complete_block`) so that
`pipeline.engine.StreamingEngine` runs many sessions' blocks through one batched stage call each, and the
served pipeline's ingress runs the same halves against stage replicas. A session on its own runs its blocks
through private one-slot stages. Its settings are `pipeline.options.SessionOptions`.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from pipeline.checkpoint import ASRModel
from pipeline.commit import (
    CommittedWord,
    HypothesisStability,
    SegmentPolicy,
    TranscriptCommitState,
    TranscriptCommitter,
)
from pipeline.decoding import DecodeControls, DecodeOptions
from pipeline.encoder import OFFLINE_CHUNK_FRAMES, STEP_FRAMES, offline_output_steps
from pipeline.features import FRAMES_PER_SECOND, HOP_LENGTH, N_MELS, LogMelState, StreamingLogMel, check_pcm
from pipeline.prompt import (
    MAX_CONTEXT_TOKENS,
    CausalPrompt,
    build_causal_prompt,
    decode_asr_output,
    word_confidences,
)
from pipeline.options import SessionOptions
from pipeline.rolling import UpdateResult, UpdateStats, decode_from_scratch
from pipeline.stages import (
    DecoderSettings,
    DecoderStage,
    DecodeRequest,
    EncoderStage,
    EncodeRequest,
    FeatureRequest,
    FeatureResult,
    FeatureStage,
    answer_of,
)
from pipeline.vad import VadState
from pipeline.voice_gate import BlockVoice, VoiceGate

log = logging.getLogger(__name__)

# 2: per-segment final tokens; front-end state without a clamp restart. 3: options nested by layer (version 2
# checkpoints are still read, so that sessions outlive a rolling upgrade).
CHECKPOINT_VERSION = 3


EventKind = Literal["update", "segment", "final", "speech_begin", "speech_end"]


@dataclass(frozen=True)
class TranscriptEvent:
    """What a client sees after one decoder update, a segment roll, or the end of the stream."""

    kind: EventKind
    new_words: tuple[CommittedWord, ...]  # append-only; times are interpolated estimates
    tentative: str  # the uncommitted tail of the current hypothesis, for display only
    # The transcript of record: every word committed so far, as the client received them (never contradicted).
    transcript: str
    # The model's current text: finalized segments' final hypotheses + the current segment's hypothesis (what
    # the published runtime shows; it may disagree with words already committed).
    hypothesis: str
    segment_index: int
    audio_sec: float  # audio encoded so far
    stats: UpdateStats | None = None
    checkpoint: bytes | None = None  # at segment rolls: restore point (see StreamingSession.restore)
    # The stream samples [start, end) the event is about: an update's block(s), a segment's encoded audio, the
    # sample of a speech boundary (start == end). Exact: counted in samples, never in wall time.
    span: tuple[int, int] | None = None
    # "segment" events: why it rolled: "cap" (16 s), "sentence" (a sentence end past 12 s), "utterance_end"
    # (the voice gate heard enough silence) or "finalize" (the client asked).
    reason: str | None = None
    # Per word of `tentative`: how many consecutive updates (this one included) have agreed on it and the words
    # before it. Committed words are not in it: they never change.
    stability: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (the checkpoint bytes are left out: they go to a session store, not to clients)."""
        return {
            "kind": self.kind,
            "new_words": [asdict(word) for word in self.new_words],
            "tentative": self.tentative,
            "transcript": self.transcript,
            "hypothesis": self.hypothesis,
            "segment_index": self.segment_index,
            "audio_sec": self.audio_sec,
            "span": None if self.span is None else list(self.span),
            "reason": self.reason,
            "stability": list(self.stability),
            "stats": None if self.stats is None else asdict(self.stats),
        }


@dataclass(frozen=True)
class CausalBlock:
    """One block a causal stream is ready to encode, and where it falls in its segment."""

    segment_index: int
    block_index: int  # blocks of the segment before this one
    mel: Tensor  # [frames, mel_bins], frames a multiple of 8 up to block_frames
    roll_events: list[TranscriptEvent]  # the segment roll that had to happen before this block, speech events
    decode: bool  # whether the decoder updates after this block (else its embeddings wait: `hold_block`)
    # The voice gate dropped this silent block: nothing to encode or decode; its events are `roll_events`.
    skipped: bool = False


@dataclass
class SegmentState:
    """The session's view of its current segment (the K/V lives in the stages): everything a roll drops."""

    steps: int = 0
    start_frame: int | None = None  # causal: stream mel frame where its first encoded block starts
    end_frame: int = 0  # ... and where its last one ends
    decoded_until: int = 0  # ... and where the audio of its last decoder update ends
    blocks: int = 0  # causal: blocks handed out for encoding
    updates: int = 0  # causal: decoder updates requested
    # windowed: the segment's audio steps; causal: encoded blocks waiting for the next decoder update
    embeddings: list[Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    # causal, when the owner may have to rebuild a stage's state (`keep_replay`): the segment's blocks and the
    # audio of each of its updates, at most one segment (16 s) of each
    mel_blocks: list[Tensor] = field(default_factory=list)
    update_audio: list[Tensor] = field(default_factory=list)


class StreamingSession:
    """Transcribe one stream: `push_audio` chunks of any size, then `finish`."""

    def __init__(
        self,
        model: ASRModel,
        options: SessionOptions | None = None,
        stream_id: str = "stream",
        keep_replay: bool = False,
    ) -> None:
        """`stream_id`: the name its stage requests carry. `keep_replay`: keep the current segment's blocks and
        update audio, so that a stage that lost this stream's state can be sent a replay (an owner whose
        stages run elsewhere needs it; an in-process engine does not)."""
        self.model = model
        self.options = options or SessionOptions()
        self.stream_id = stream_id
        self.keep_replay = keep_replay
        opts = self.options
        self._set_prompt(opts.context)
        self.policy = SegmentPolicy(opts.segment)
        self.committer = TranscriptCommitter(opts.commit, update_interval_sec=opts.update_interval_sec)
        self.stability = HypothesisStability()
        self.features = StreamingLogMel()
        self._held_pcm: list[np.ndarray] = []  # audio received since the last front-end request (`hold_audio`)
        self._held_samples = 0
        self._end_held = False  # the end of audio was signalled and waits for the next front-end request
        self._in_flight: _InFlight | None = None  # the front-end request taken and not yet accepted
        # The voice gate (off by default) and its detector's state, which travels with feature requests.
        self.gate = VoiceGate(opts.vad) if opts.vad.enabled else None
        self.vad = VadState.initial() if opts.vad.enabled else None
        self.finalize_at_frame: int | None = None  # a Finalize asked for: encode up to here, then roll
        self.next_context: str | None = None  # an UpdateContext waiting for the next segment
        self._end_after_update: tuple[str, int | None] | None = None  # roll after this update: reason, speech end
        # Work counters of this session object (not checkpointed): what the voice gate saves.
        self.blocks_encoded = 0
        self.blocks_skipped = 0
        self._own_stages: tuple[EncoderStage, DecoderStage] | None = None  # made on first use (`push_audio`)
        # Stream-level state that survives segment rolls.
        self.segment_index = 0
        self.frames_encoded = 0  # mel frames consumed by the audio backend (stream time)
        self.completed_segments: list[list[int]] = []  # each finalized segment's final hypothesis tokens
        self.pending_mel = torch.zeros(0, model.config.audio.num_mel_bins)  # mel not yet encoded (causal: < 1 block
        # unless a driver is behind; windowed: < 1 update)
        self.window_mel = torch.zeros(0, model.config.audio.num_mel_bins)  # windowed: mel history window
        self.window_start_frame = 0  # absolute frame index of window_mel[0]
        self.last_emitted_end_frame = -1  # windowed: last frame covered by an emitted step
        self.segment = SegmentState()
        self.finishing = False  # causal: the end of audio was signalled; the last blocks may still be pending
        self.final_update = False  # the end-of-stream update: no roll after it, `finish` finalizes anyway
        self.finished = False

    # ------------------------------------------------------------------ public API

    @property
    def audio_sec(self) -> float:
        return self.frames_encoded / FRAMES_PER_SECOND

    @property
    def sample_offset(self) -> int:
        """Samples of the stream consumed so far (the front-end has read them all)."""
        return self.features.samples_received

    def push_audio(self, samples: np.ndarray) -> list[TranscriptEvent]:
        """Feed 16 kHz mono float32 PCM (see `pipeline.features.prepare_pcm`); returns the new events."""
        self._check_open()
        if self.options.backend == "causal":
            self.hold_audio(samples)
            self._run_front_end()
            return self._run_ready_blocks()
        return self._consume_windowed(self.features.push(samples))

    def finish(self) -> list[TranscriptEvent]:
        """End of stream: encode the partial block once, decode, and finalize the transcript."""
        self._check_open()
        if self.options.backend == "causal":
            self.hold_end()
            self._run_front_end()
            events = self._run_ready_blocks()
        else:
            events = self._consume_windowed(self._flush_features())
            self.final_update = True
            events += self._flush_windowed()
        return events + self.finalize()

    @property
    def word_time_precision_sec(self) -> float:
        """How far a committed word's interpolated times may be off: the commit lag they are placed by."""
        return self.committer.options.commit_lag_sec(self.committer.update_interval_sec)

    @property
    def warnings(self) -> list[str]:
        """What the client should know about how its stream runs (e.g. an untrained language it allowed)."""
        language = self.options.untrained_language
        if language is None:
            return []
        return [f"language {language}: the causal tower was distilled on English only; expect lower accuracy"]

    def finalize_now(self) -> list[TranscriptEvent]:
        """Causal backend: commit the tail now and keep listening. The audio so far is encoded (a short last
        block if need be) and decoded, then the segment rolls; its last event is that roll (`reason`
        "finalize"), unless there was nothing to finalize (then there are no events)."""
        self.request_finalize()
        return self._run_ready_blocks()

    def request_finalize(self) -> None:
        """Causal backend: the next blocks end the segment at the audio buffered now (see `finalize_now`); an
        owner then runs `next_block` as usual."""
        self._check_open()
        self._check_causal()
        self.finalize_at_frame = self.frames_encoded + self.pending_mel.shape[0] // STEP_FRAMES * STEP_FRAMES

    def update_context(self, context: str) -> int:
        """Replace the biasing context (names, terms) from the next segment on (it changes the decoder's prompt,
        so the current segment keeps its own); at once if the segment holds no audio yet. Returns the index
        of the segment it takes effect in. Raises ValueError for a context that is too long."""
        self._check_open()
        build_causal_prompt(self.model.tokenizer, language=self.options.language, context=context)  # checks it
        if self.segment.blocks == 0:
            self._set_prompt(context)
            self.next_context = None
            return self.segment_index
        self.next_context = context
        return self.segment_index + 1

    # ------------------------------------------------------------------ causal blocks, in halves
    #
    # A causal block runs in three phases: `next_block` (scheduling, segment roll, taking the block out of the
    # pending mel), then the encoder and decoder stage requests, then `complete_block` (commit and segment
    # policy). A session on its own sends its requests to private stages, one stream at a time;
    # `pipeline.engine.StreamingEngine` sends many sessions' requests to shared stages in one batch each.

    def hold_audio(self, samples: np.ndarray) -> None:
        """Causal backend: keep new 16 kHz float32 PCM for the next front-end request. It is checked now, so a bad
        chunk is its sender's error, not a later step's."""
        self._check_accepting_audio()
        check_pcm(samples, self.features.samples_received + self._samples_not_extracted)
        self._held_pcm.append(samples)
        self._held_samples += samples.size

    def hold_end(self) -> None:
        """Causal backend: the end of audio, sent with the next front-end request."""
        self._check_accepting_audio()
        self._end_held = True

    @property
    def holds_audio(self) -> bool:
        """Whether audio (or the end of audio) waits for the front end."""
        return self._held_samples > 0 or self._end_held

    @property
    def front_end_due(self) -> bool:
        """Whether what is held should go through the front end now: it completes a block, or ends the stream. An
        owner calls the front end only then: a block cannot be encoded before its last sample, so earlier calls
        would only add work and hops."""
        if self._in_flight is not None:  # the next request goes after that one's result
            return False
        if self._end_held:
            return True
        if self._held_samples == 0:
            return False
        return self.pending_mel.shape[0] + self._held_frames >= self.options.encoder.block_frames

    @property
    def _samples_not_extracted(self) -> int:
        """Samples held, or in a front-end request not yet accepted."""
        return self._held_samples + (self._in_flight.samples if self._in_flight is not None else 0)

    @property
    def _held_frames(self) -> int:
        """Mel frames the audio not extracted yet completes."""
        return self.features.frames_after(self._samples_not_extracted) - self.features.frames_emitted

    def take_feature_request(self) -> tuple[FeatureRequest, bool]:
        """The front-end request for everything held, and whether it carries the end of audio; give its result to
        `accept_features` with that flag."""
        pcm = np.concatenate(self._held_pcm) if self._held_pcm else np.zeros(0, dtype=np.float32)
        end = self._end_held
        self._held_pcm, self._held_samples, self._end_held = [], 0, False
        # A copy of the front end goes: the session's own stays as it was until `accept_features`, so the request
        # may run elsewhere (another thread, a replica) while the session is read or checkpointed.
        frontend = StreamingLogMel.from_state(self.features.state())
        self._in_flight = _InFlight(pcm.size, end)
        return FeatureRequest(frontend, pcm, flush=end and not self.features.flushed, vad=self.vad), end

    def accept_features(self, result: FeatureResult, *, end: bool = False) -> None:
        """Buffer a front-end result (its mel waits for `next_block`); `end`: its request carried the end of audio."""
        self._in_flight = None
        self.features = result.frontend
        self._buffer_mel(result.mel)
        if self.gate is not None:
            self.vad = result.vad
            self.gate.add(result.speech)
        self.finishing = end

    def _run_front_end(self) -> None:
        """Everything held through this session's own front end (a session used on its own)."""
        request, end = self.take_feature_request()
        self.accept_features(_FEATURES.extract([request])[0], end=end)

    def next_block(self, more_to_come: bool = False) -> CausalBlock | None:
        """The next block to encode (rolling the segment first if the block would pass the cap), or None.

        A whole block is ready once `block_frames` are buffered. After `hold_end`, when no whole block is
        left, the pending frames rounded down to whole steps go as one last short block (fewer than 8 frames
        are dropped, as the reference does). After `request_finalize`, the blocks run up to the audio buffered
        then (the last one short if need be) and the segment rolls after its update. A block the voice gate
        finds silent comes back `skipped`, with the events of the utterance it may have ended.

        `more_to_come`: the caller takes the next ready block right after this one and wants one decoder update
        for both (an engine catching up a lagging stream): this block is held unless a roll or the end forces
        its update.
        """
        if not self.block_ready:
            return None
        pending = self.pending_mel.shape[0]
        block_frames = self.options.encoder.block_frames
        if self.finalize_at_frame is not None:
            wanted = min(block_frames, self.finalize_at_frame - self.frames_encoded)
            if wanted == 0:  # everything before the Finalize is encoded: roll now
                self.finalize_at_frame = None
                return self._skipped_block(self._roll_if(True, "finalize"))
            return self._take_block(wanted, more_to_come=False)
        if pending >= block_frames:
            return self._take_block(block_frames, more_to_come=more_to_come)
        self.final_update = True
        usable = pending // STEP_FRAMES * STEP_FRAMES
        if usable == 0:
            self.frames_encoded += pending
            self._drop_pending(pending)
            return None
        return self._take_block(usable, dropped_frames=pending - usable)

    @property
    def whole_blocks_buffered(self) -> int:
        """Whole blocks waiting to be encoded, the audio held for the front end included (a stream keeping up has
        at most one)."""
        return (self.pending_mel.shape[0] + self._held_frames) // self.options.encoder.block_frames

    def encode_request(self, block: CausalBlock) -> EncodeRequest:
        """The encoder stage request for `block`."""
        return EncodeRequest(self.stream_id, block.segment_index, block.block_index, block.mel, self.options.encoder)

    def encode_ahead_request(self) -> EncodeRequest | None:
        """The encoder request of the block `next_block` will give after the update in flight, if that update does
        not roll the segment; None unless that block is certain to be a whole block of this segment otherwise.

        An owner may encode it while the decoder works (the causal encoder does not depend on the decoder), and use
        the embeddings if `next_block` then gives a block at the same place with the same mel (`is_ahead_of`).
        Not with the voice gate (it judges a block when it is taken), nor around a Finalize, the end of audio or a
        roll that is already due."""
        block_frames = self.options.encoder.block_frames
        if (
            self.options.backend != "causal"
            or self.gate is not None
            or self.finalize_at_frame is not None
            or self._end_after_update is not None
            or self.final_update
            or self.pending_mel.shape[0] < block_frames
            or self._segment_full()
            or self.policy.should_roll_before(self.segment.steps, block_frames // STEP_FRAMES) is not None
        ):
            return None
        mel = self.pending_mel[:block_frames]
        return EncodeRequest(self.stream_id, self.segment_index, self.segment.blocks, mel, self.options.encoder)

    def encoder_replay(self, request: EncodeRequest) -> EncodeRequest:
        """`request` again with the segment's earlier blocks, for a stage that lost this stream's state."""
        self._check_replay(request.segment_index)
        return request.with_replay(self.segment.mel_blocks[: request.block_index])

    def hold_block(self, block: CausalBlock, embeddings: Tensor) -> list[TranscriptEvent]:
        """Keep an encoded block whose decoder update comes later (`block.decode` is False)."""
        self.segment.embeddings.append(embeddings)
        return block.roll_events

    def decode_request(self, block: CausalBlock, embeddings: Tensor) -> DecodeRequest:
        """The decoder stage request after `block`: its audio is every block encoded since the last update."""
        held, self.segment.embeddings = self.segment.embeddings, []
        audio = torch.cat([*held, embeddings]) if held else embeddings
        request = DecodeRequest(self.stream_id, block.segment_index, self.segment.updates, audio, self.decoder_settings)
        self.segment.updates += 1
        if self.keep_replay:
            self.segment.update_audio.append(audio)
        return request

    def decoder_replay(self, request: DecodeRequest) -> DecodeRequest:
        """`request` again with the audio of the segment's earlier updates, for a stage that lost its state."""
        self._check_replay(request.segment_index)
        return request.with_replay(self.segment.update_audio[: request.update_index])

    def _check_replay(self, segment_index: int) -> None:
        if not self.keep_replay:
            raise RuntimeError("this session keeps no replay (made with keep_replay=False)")
        if segment_index != self.segment_index:
            raise ValueError(f"replay asked for segment {segment_index}; the session is in {self.segment_index}")

    def complete_block(self, block: CausalBlock, result: UpdateResult) -> list[TranscriptEvent]:
        """Commit and segment policy after the decoder update of `block`; returns its events."""
        return block.roll_events + self._after_update(list(result.tokens), result.stats, result.logprobs)

    @property
    def block_ready(self) -> bool:
        """Whether `next_block` has something to do: a whole block buffered, or the end of audio to process."""
        pending = self.pending_mel.shape[0]
        if self.finalize_at_frame is not None:
            return True
        return pending >= self.options.encoder.block_frames or (self.finishing and not self.final_update)

    @property
    def ready_for_step(self) -> bool:
        """Whether an engine step would advance this stream: held audio completes a block, a block is buffered, or
        the end of audio is to be processed."""
        return self.front_end_due or self.block_ready or self.done_encoding

    @property
    def done_encoding(self) -> bool:
        """Whether `finalize` may run: the end of audio was signalled and every block has been decoded."""
        return self.finishing and self.final_update and self.pending_mel.shape[0] == 0

    def finalize(self) -> list[TranscriptEvent]:
        """Finalize the transcript after the last update; the session is finished afterwards."""
        self._check_open()
        self.finished = True
        speech_end = []
        if self.gate is not None and self.gate.state.in_utterance:  # the audio ended inside an utterance
            self.gate.state.in_utterance = False
            speech_end = self._speech_event("speech_end", self.gate.state.last_speech_end)
        new_words = self.committer.finish(self.audio_sec)
        self.completed_segments.append(list(self.segment.tokens))
        return speech_end + [self._event("final", new_words, tentative="", hypothesis=self.committer.transcript)]

    @property
    def transcript(self) -> str:
        """The transcript of record: every committed word, as emitted (see `TranscriptEvent.transcript`)."""
        return self.committer.emitted_text

    @property
    def revised_words(self) -> int:
        """Words where a segment's final hypothesis disagreed with words already committed (the commitment
        stands; the disagreement is counted)."""
        return self.committer.state.dropped_revision_words

    @property
    def token_ids(self) -> list[int]:
        """Token ids of the finalized segments (the whole transcript after `finish`)."""
        return [token for tokens in self.completed_segments for token in tokens]

    @property
    def final_hypothesis_text(self) -> str:
        """The finalized segments' final hypotheses, decoded per segment and joined: the model's own final text
        (the published runtime's), which may disagree with the transcript of record where words were already
        committed."""
        return " ".join(text for text in map(self._text, self.completed_segments) if text)

    # ------------------------------------------------------------------ blocks and updates

    def _run_ready_blocks(self) -> list[TranscriptEvent]:
        """Encode and decode every ready block of this stream through its own stages, one at a time."""
        encoder, decoder = self.own_stages
        events = []
        while (block := self.next_block()) is not None:
            if block.skipped:
                events += block.roll_events
                continue
            embeddings = answer_of(encoder.encode([self.encode_request(block)])[0])
            if not block.decode:
                events += self.hold_block(block, embeddings)
                continue
            result = answer_of(decoder.update([self.decode_request(block, embeddings)])[0])
            events += self.complete_block(block, result)
        return events

    @property
    def own_stages(self) -> tuple[EncoderStage, DecoderStage]:
        """The one-slot stages a session on its own runs its blocks through (an engine's sessions use the
        engine's)."""
        if self._own_stages is None:
            capacity = decoder_positions_needed(self.prompt, self.options)
            self._own_stages = (
                EncoderStage(self.model.audio_tower, slots=1),
                DecoderStage(self.model.text_decoder, slots=1, capacity=capacity),
            )
        return self._own_stages

    def _buffer_mel(self, mel: Tensor) -> None:
        mel = mel.to(self.pending_mel)
        self.pending_mel = torch.cat([self.pending_mel, mel]) if self.pending_mel.shape[0] else mel

    def _drop_pending(self, frames: int) -> None:
        """Drop the first `frames` pending frames. What is left (less than a block) is copied out, so that the
        storage of the frames taken is freed with the block that reads them, not kept by a view of the rest."""
        self.pending_mel = self.pending_mel[frames:].clone()

    def _take_block(self, frames: int, dropped_frames: int = 0, more_to_come: bool = False) -> CausalBlock:
        """Roll if the block would pass the cap (or the voice gate ended the utterance), then take the first
        `frames` pending frames as the next block, or skip them if the gate finds no speech.

        The block leaves the pending mel only now that its segment is decided, so a checkpoint taken at the
        roll still holds every frame not yet encoded (and the gate's state from before it judged them). A block
        the gate skips leaves first: a roll at the end of an utterance does not hold it.
        """
        steps = frames // STEP_FRAMES
        start = self.frames_encoded
        voice: BlockVoice | None = None
        if self.gate is not None:
            # The gate adopts its verdict's state only with the block: a checkpoint at a roll before the block
            # holds the block, and a restored session judges it again.
            voice, judged = self.gate.judge(start * HOP_LENGTH, (start + frames) * HOP_LENGTH)
            if not voice.encode:  # silence: the block goes before any roll, so a checkpoint does not hold it
                self.gate.state = judged
                self._drop_pending(frames + dropped_frames)
                self.frames_encoded += frames + dropped_frames
                self.blocks_skipped += 1
                events = [] if voice.speech_end is None else self._speech_event("speech_end", voice.speech_end)
                return self._skipped_block(events + self._roll_if(voice.speech_end is not None, "utterance_end"))
        events = self._roll_if(self.policy.should_roll_before(self.segment.steps, steps) is not None, "cap")
        if self.gate is not None:
            self.gate.state = judged
        mel = self.pending_mel[:frames]
        self._drop_pending(frames + dropped_frames)
        self.frames_encoded += frames + dropped_frames
        self.blocks_encoded += 1
        if voice is not None and voice.speech_begin is not None:
            events += self._speech_event("speech_begin", voice.speech_begin)
        if voice is not None and voice.speech_end is not None:
            self._end_after_update = ("utterance_end", voice.speech_end)
        if self.finalize_at_frame is not None and self.frames_encoded + STEP_FRAMES > self.finalize_at_frame:
            self.finalize_at_frame = None  # this block reaches the Finalize: roll after its update
            self._end_after_update = ("finalize", None)
        segment = self.segment
        if segment.start_frame is None:
            segment.start_frame = start
        segment.end_frame = start + frames
        segment.steps += steps
        block = CausalBlock(
            segment_index=self.segment_index,
            block_index=segment.blocks,
            mel=mel,
            roll_events=events,
            decode=self._update_due(more_to_come),
        )
        segment.blocks += 1
        if self.keep_replay:
            segment.mel_blocks.append(mel)
        return block

    def _skipped_block(self, events: list[TranscriptEvent]) -> CausalBlock:
        return CausalBlock(self.segment_index, self.segment.blocks, self.pending_mel[:0], events, decode=False, skipped=True)

    def _speech_event(self, kind: EventKind, sample: int) -> list[TranscriptEvent]:
        return [replace(self._event(kind, (), tentative="", hypothesis=self.committer.transcript), span=(sample, sample))]

    def _update_due(self, more_to_come: bool) -> bool:
        """Decode after this block? Every `blocks_per_update` blocks unless the caller takes the next block with
        it, and always at the end of the stream and before any roll, so that no encoded audio is dropped
        undecoded: a roll comes before a whole block that would pass the cap."""
        if self.final_update or self.gate is not None or self._end_after_update is not None:
            return True  # the end, or the voice gate or a Finalize may roll the segment after this block
        if self.finishing and self.pending_mel.shape[0] < STEP_FRAMES:
            return True  # no block comes after this one
        next_block_steps = self.options.encoder.block_frames // STEP_FRAMES
        if self.policy.should_roll_before(self.segment.steps, next_block_steps) is not None:
            return True
        return not more_to_come and len(self.segment.embeddings) + 1 >= self.options.blocks_per_update

    def _flush_features(self) -> Tensor:
        # A session restored from a checkpoint taken during `finish` has already flushed its front-end.
        if self.features.flushed:
            return torch.zeros(0, N_MELS)
        return self.features.flush()

    def _consume_windowed(self, mel: Tensor) -> list[TranscriptEvent]:
        events = []
        self.pending_mel = torch.cat([self.pending_mel, mel])
        update = self.options.window.update_frames
        while self.pending_mel.shape[0] >= update:
            chunk, self.pending_mel = self.pending_mel[:update], self.pending_mel[update:]
            events += self._windowed_update(chunk, right_context=self.options.window.right_frames)
        return events

    def _flush_windowed(self) -> list[TranscriptEvent]:
        chunk, self.pending_mel = self.pending_mel, self.pending_mel[:0]
        if chunk.shape[0] == 0 and self.window_mel.shape[0] == 0:
            return []
        # At the end there is no future audio: the right context is zero frames.
        return self._windowed_update(chunk, right_context=0, at_end=True)

    def _windowed_update(self, chunk: Tensor, right_context: int, at_end: bool = False) -> list[TranscriptEvent]:
        """Re-encode the window with the offline tower; append the steps that are now settled."""
        opts = self.options
        self.window_mel = torch.cat([self.window_mel, chunk])
        excess = self.window_mel.shape[0] - (opts.window.left_frames + opts.window.right_frames)
        if excess > 0:
            self.window_mel = self.window_mel[excess:]
            self.window_start_frame += excess
        frames_seen = self.window_start_frame + self.window_mel.shape[0]
        settled_until = frames_seen - right_context  # steps ending before this frame have their look-ahead
        with torch.inference_mode():
            steps = self.model.audio_tower.forward_offline(self.window_mel.to(device=self.model.device, dtype=self.model.dtype))
        end_frames = self.window_start_frame + offline_step_end_frames(self.window_mel.shape[0])
        fresh = (end_frames > self.last_emitted_end_frame) & (end_frames < settled_until)
        new_steps = steps[fresh]
        if fresh.any():
            self.last_emitted_end_frame = int(end_frames[fresh].max())
        self.frames_encoded = frames_seen if at_end else max(self.frames_encoded, settled_until)
        self.segment.steps += new_steps.shape[0]
        self.segment.embeddings.append(new_steps)
        audio = torch.cat(self.segment.embeddings)
        result = decode_from_scratch(self.model.text_decoder, self.prompt, audio, self.controls)
        return self._after_update(list(result.tokens), result.stats, result.logprobs)

    def _after_update(
        self, tokens: list[int], stats: UpdateStats, logprobs: Sequence[float] = ()
    ) -> list[TranscriptEvent]:
        segment = self.segment
        segment.tokens = tokens
        text = self._text(tokens)
        words = text.split()
        confidences = word_confidences(self.model.tokenizer, tokens, logprobs, self.prompt.special, words)
        update = self.committer.update(text, self.audio_sec, confidences)
        ages = self.stability.update(words)
        span = None
        if segment.start_frame is not None:  # causal: the blocks this update decoded
            span = (max(segment.start_frame, segment.decoded_until) * HOP_LENGTH, segment.end_frame * HOP_LENGTH)
            segment.decoded_until = segment.end_frame
        event = self._event("update", update.new_words, update.tentative_text, update.global_hypothesis, stats)
        tentative_ages = tuple(ages[len(ages) - len(update.tentative_text.split()) :]) if update.tentative_text else ()
        events = [replace(event, span=span, stability=tentative_ages)]
        end_after, self._end_after_update = self._end_after_update, None
        if end_after is not None and end_after[1] is not None:
            events += self._speech_event("speech_end", end_after[1])
        if self.final_update:
            return events
        if end_after is not None:
            return events + self._roll_if(True, end_after[0])
        if self.policy.should_roll_after(segment.steps, text):
            reason = "cap" if segment.steps > self.options.segment.segment_max_steps else "sentence"
            return events + self._roll_if(True, reason)
        return events + self._roll_if(self._segment_full(), "cap")

    def _segment_full(self) -> bool:
        """Whether the segment must roll now rather than before the next update.

        Causal: only when past the cap (roll-before-generate handles whole blocks). Windowed: when the next
        update's steps could cross the cap, so that its rolls, like the causal ones, fall between updates.
        """
        if self.options.backend == "causal":
            return self.segment.steps > self.options.segment.segment_max_steps
        upcoming = offline_output_steps(self.options.window.update_frames)
        return self.policy.should_roll_before(self.segment.steps, upcoming) is not None

    # ------------------------------------------------------------------ segments and checkpoints

    def _roll_if(self, condition: bool, reason: str) -> list[TranscriptEvent]:
        """Roll the segment (for `reason`, see `TranscriptEvent.reason`) if `condition` and it holds audio."""
        if not condition or self.segment.steps == 0:
            return []
        if self.options.backend == "causal" and self.segment.embeddings:
            raise RuntimeError("segment roll with encoded blocks not yet decoded; `_update_due` must prevent this")
        new_words = self.committer.finalize_segment(self.audio_sec)
        self.completed_segments.append(list(self.segment.tokens))
        rolled = self.segment
        span = None if rolled.start_frame is None else (rolled.start_frame * HOP_LENGTH, rolled.end_frame * HOP_LENGTH)
        self.segment_index += 1
        self.segment = SegmentState()
        self.stability = HypothesisStability()
        if self.next_context is not None:  # an UpdateContext takes effect with the new segment
            self._set_prompt(self.next_context)
            self.next_context = None
        event = self._event("segment", new_words, tentative="", hypothesis=self.committer.transcript)
        return [replace(event, checkpoint=self.checkpoint(), span=span, reason=reason)]

    def _set_prompt(self, context: str) -> None:
        """The decoder's prompt and controls for `context` (at the start, or at a segment roll)."""
        self.options = replace(self.options, context=context)
        self.prompt = build_causal_prompt(self.model.tokenizer, language=self.options.language, context=context)
        token_rules = DecodeOptions.causal(self.prompt.special)
        self.controls = DecodeControls(
            replace(
                self.options.decode,
                suppress_token_ids=token_rules.suppress_token_ids,
                stop_token_ids=token_rules.stop_token_ids,
            )
        )
        self.decoder_settings = DecoderSettings(self.prompt, self.controls, self.options.speculative)

    def checkpoint(self) -> bytes:
        """Plain-data restore point; valid only at a segment boundary (no segment audio encoded yet)."""
        if self.segment.steps != 0:
            raise ValueError(f"checkpoint taken {self.segment.steps} steps into a segment; expected a segment boundary")
        mel_state = self.features.state()
        pending = self.pending_mel
        payload = {
            "version": CHECKPOINT_VERSION,
            "options": asdict(self.options),
            "sample_offset": self.sample_offset,
            "segment_index": self.segment_index,
            "frames_encoded": self.frames_encoded,
            "completed_segments": self.completed_segments,
            "commit": self.committer.state.to_dict(),
            "features": asdict(mel_state) | {"pending": _encode_array(mel_state.pending)},
            "pending_mel": _encode_array(pending.float().cpu().numpy()),
            "window_mel": _encode_array(self.window_mel.float().cpu().numpy()),
            "window_start_frame": self.window_start_frame,
            "last_emitted_end_frame": self.last_emitted_end_frame,
            "finalize_at_frame": self.finalize_at_frame,
        }
        if self.gate is not None:
            payload["gate"] = self.gate.to_dict()
            payload["vad"] = _encode_vad(self.vad)
        return json.dumps(payload).encode()

    @classmethod
    def restore(
        cls, model: ASRModel, checkpoint: bytes, stream_id: str = "stream", keep_replay: bool = False
    ) -> "StreamingSession":
        """A session that continues from a checkpoint; feed it the audio from `checkpoint_offset(checkpoint)` on.

        `stream_id`, `keep_replay` as in the constructor."""
        session = cls(model, checkpoint_options(checkpoint), stream_id=stream_id, keep_replay=keep_replay)
        payload = json.loads(checkpoint)
        features = payload["features"]
        session.features = StreamingLogMel.from_state(
            LogMelState(**(features | {"pending": _decode_array(features["pending"])}))
        )
        session.segment_index = payload["segment_index"]
        session.frames_encoded = payload["frames_encoded"]
        session.completed_segments = [list(tokens) for tokens in payload["completed_segments"]]
        session.committer.state = TranscriptCommitState.from_dict(payload["commit"])
        session.pending_mel = torch.from_numpy(_decode_array(payload["pending_mel"]))
        session.window_mel = torch.from_numpy(_decode_array(payload["window_mel"]))
        session.window_start_frame = payload["window_start_frame"]
        session.last_emitted_end_frame = payload["last_emitted_end_frame"]
        session.finalize_at_frame = payload.get("finalize_at_frame")  # not in version 2
        if session.gate is not None:
            session.gate = VoiceGate.from_dict(session.options.vad, payload["gate"])
            session.vad = _decode_vad(payload["vad"])
        return session

    # ------------------------------------------------------------------ helpers

    def _text(self, tokens: list[int]) -> str:
        return decode_asr_output(self.model.tokenizer, tokens, self.prompt.special, self.prompt.language)[1]

    def _event(
        self,
        kind: EventKind,
        new_words: tuple[CommittedWord, ...],
        tentative: str,
        hypothesis: str,
        stats: UpdateStats | None = None,
    ) -> TranscriptEvent:
        return TranscriptEvent(
            kind=kind,
            new_words=new_words,
            tentative=tentative,
            transcript=self.committer.emitted_text,
            hypothesis=hypothesis,
            segment_index=self.segment_index,
            audio_sec=self.audio_sec,
            stats=stats,
        )

    def _check_open(self) -> None:
        if self.finished:
            raise RuntimeError("the session is finished; start a new one")

    def _check_causal(self) -> None:
        if self.options.backend != "causal":
            raise ValueError(f"backend is {self.options.backend!r}; block-wise calls need the 'causal' backend")

    def _check_accepting_audio(self) -> None:
        self._check_open()
        self._check_causal()
        if self.finishing or self._end_held or (self._in_flight is not None and self._in_flight.end):
            raise RuntimeError("the end of the stream was signalled; no more audio is accepted")


@dataclass(frozen=True)
class _InFlight:
    """A front-end request taken (`take_feature_request`) and not yet accepted."""

    samples: int
    end: bool  # it carries the end of audio


#: The front-end stage of every session on its own (it holds no state: the front-end travels in the request).
_FEATURES = FeatureStage()


def decoder_positions_needed(prompt: CausalPrompt, options: SessionOptions) -> int:
    """The most decoder K/V positions a causal segment can hold: head + audio cap + tail + token budget.

    A segment holds at most `segment_max_steps` audio steps (a roll comes first), or one block if that is
    longer; an update forwards the tail and a draft of at most `max_new_tokens`, and greedy steps never
    forward more than `max_new_tokens` tokens. The head has room for the longest context (`MAX_CONTEXT_TOKENS`),
    whatever `prompt` holds now: a stream's context may change at any segment.
    """
    return decoder_slot_positions(len(prompt.head_ids) - prompt.context_tokens, len(prompt.tail_ids), options)


def decoder_slot_positions(head: int, tail: int, options: SessionOptions) -> int:
    """`decoder_positions_needed` from the lengths of a prompt's head (without its context) and tail."""
    audio_steps = max(options.segment.segment_max_steps, options.encoder.block_frames // STEP_FRAMES)
    return head + MAX_CONTEXT_TOKENS + audio_steps + tail + options.decode.max_new_tokens


def checkpoint_options(checkpoint: bytes) -> SessionOptions:
    """The session options a checkpoint was taken under (checks its version)."""
    payload = json.loads(checkpoint)
    version = payload.get("version")
    if version == 2:
        return SessionOptions.from_v2_dict(payload["options"])
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {version!r}; expected {CHECKPOINT_VERSION} (or 2)")
    return SessionOptions.from_dict(payload["options"])


def checkpoint_offset(checkpoint: bytes) -> int:
    """The stream sample offset from which audio must be replayed into a restored session."""
    return int(json.loads(checkpoint)["sample_offset"])


def offline_step_end_frames(frames: int) -> Tensor:
    """Last mel frame (relative to the window start) covered by each step of the offline tower.

    The offline tower convolves 100-frame chunks into 13 steps; step i of a chunk covers frames up to
    8i + 7 of it (the 13th reaches the chunk's end), and a partial last chunk has ceil(len / 8) steps.
    """
    ends = []
    for chunk_start in range(0, frames, OFFLINE_CHUNK_FRAMES):
        length = min(OFFLINE_CHUNK_FRAMES, frames - chunk_start)
        for step in range(-(-length // STEP_FRAMES)):
            ends.append(chunk_start + min(STEP_FRAMES * step + STEP_FRAMES - 1, length - 1))
    return torch.tensor(ends, dtype=torch.long)


def _encode_vad(state: VadState) -> dict[str, Any]:
    return {name: _encode_array(value) for name, value in asdict(state).items()}


def _decode_vad(encoded: dict[str, Any]) -> VadState:
    return VadState(**{name: _decode_array(value) for name, value in encoded.items()})


def _encode_array(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return {"shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode("ascii")}


def _decode_array(encoded: dict[str, Any]) -> np.ndarray:
    data = np.frombuffer(base64.b64decode(encoded["data"]), dtype=np.float32)
    return data.reshape(encoded["shape"]).copy()
