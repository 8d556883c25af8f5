"""The voice activity gate of a causal stream: which blocks carry speech, and where an utterance ends.

The front-end stage scores every 32 ms window of a stream's audio (`pipeline.vad`). Each window belongs to the
block that holds its last sample, so every window is judged once and the decision for a block depends only on
the audio, never on how it arrived. A block with a speech window is encoded and decoded. A block without one
is skipped (neither encoded nor decoded; the stream's sample count still advances, so times stay exact) unless
it is a short pause inside an utterance. Once the silence after the last speech window reaches
`end_silence_ms`, the utterance ends: the session rolls its segment, so the words become final and the next
speech starts from a fresh decoder context (it cannot repeat the previous utterance).

State is plain data and goes into the session's checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline.features import SAMPLE_RATE
from pipeline.vad import WINDOW_SAMPLES


@dataclass(frozen=True)
class VadOptions:
    """The gate's settings. Off by default: the reference decodes every block, speech or not."""

    enabled: bool = False
    threshold: float = 0.5  # a 32 ms window is speech when its probability reaches this
    end_silence_ms: int = 800  # this much silence after speech ends the utterance (its segment rolls)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"vad threshold is {self.threshold}; expected between 0 and 1")
        if self.end_silence_ms < 1:
            raise ValueError(f"vad end_silence_ms is {self.end_silence_ms}; expected at least 1")


@dataclass
class VoiceGateState:
    probabilities: list[float] = field(default_factory=list)  # scored windows not yet judged with a block
    first_window: int = 0  # stream index of probabilities[0]
    in_utterance: bool = False
    last_speech_end: int = 0  # sample after the last speech window seen
    decided_until: int = 0  # sample where the last judged block ended


@dataclass(frozen=True)
class BlockVoice:
    """The gate's verdict on one block. Samples are stream sample indices."""

    encode: bool  # encode and decode the block (else skip it)
    speech_begin: int | None = None  # an utterance starts in this block, at this sample
    # The utterance ends (speech stopped at this sample): before this block when it is skipped, else after
    # its update (the block ends in enough silence).
    speech_end: int | None = None


class VoiceGate:
    """Judges a stream's blocks from the window probabilities the front-end stage adds."""

    def __init__(self, options: VadOptions, state: VoiceGateState | None = None) -> None:
        self.options = options
        self.state = state or VoiceGateState()

    def add(self, probabilities: Any) -> None:
        """Append the next windows' speech probabilities (in stream order)."""
        self.state.probabilities.extend(float(p) for p in probabilities)

    def judge(self, start: int, end: int) -> tuple[BlockVoice, VoiceGateState]:
        """The verdict for the block of samples [start, end), and the gate's state after it (the caller adopts
        it with `self.state = ...` once the block is taken: a checkpoint taken before must not include it).

        The block's windows are those whose last sample lies in it (those scored so far: a stream's last block
        may end before its last window is whole)."""
        state = replace(self.state, probabilities=list(self.state.probabilities))
        if start != state.decided_until:
            raise ValueError(f"block starts at sample {start}; expected {state.decided_until}, where the last ended")
        state.decided_until = end
        count = max(0, min(len(state.probabilities), end // WINDOW_SAMPLES - state.first_window))
        windows, state.probabilities = state.probabilities[:count], state.probabilities[count:]
        first = state.first_window
        state.first_window += count
        speech = [first + i for i, p in enumerate(windows) if p >= self.options.threshold]
        end_silence = self.options.end_silence_ms * SAMPLE_RATE // 1000
        if speech:
            begin = None if state.in_utterance else max(start, speech[0] * WINDOW_SAMPLES)
            state.in_utterance = True
            state.last_speech_end = (speech[-1] + 1) * WINDOW_SAMPLES
            if end - state.last_speech_end >= end_silence:
                state.in_utterance = False
                return BlockVoice(encode=True, speech_begin=begin, speech_end=state.last_speech_end), state
            return BlockVoice(encode=True, speech_begin=begin), state
        if not state.in_utterance:
            return BlockVoice(encode=False), state
        if end - state.last_speech_end >= end_silence:
            state.in_utterance = False
            return BlockVoice(encode=False, speech_end=state.last_speech_end), state
        return BlockVoice(encode=True), state  # a pause inside the utterance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    @classmethod
    def from_dict(cls, options: VadOptions, data: dict[str, Any]) -> "VoiceGate":
        return cls(options, VoiceGateState(**data))
