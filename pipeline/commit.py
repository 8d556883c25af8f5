"""The output contract: which words a stream commits, when a segment rolls, and word timing.

Three policies, all pure Python and plain data so a session can checkpoint them anywhere:

- **Stable-prefix commit** (a LocalAgreement variant) on whitespace-separated words. After each
  decoder update, the candidate is the agreed prefix of the previous and current hypotheses minus
  `hold_back_words`, never shorter than what is already committed; it is committed once the same
  candidate has been seen `stable_iterations` times in a row. Committed words are never retracted.
- **Append-only emission** across segments. At a segment roll the segment's last hypothesis becomes
  its final text; words past the already-emitted count are emitted, and a final text that disagrees
  with already-emitted words is dropped from the output (logged and counted), never rewritten.
  Emission is by index, as in the reference runtime: a finalization that changes the word count
  shifts (drops or repeats) words of the output. The reference measured 0 such retractions on 21
  long talks; `dropped_revision_words` makes them visible here.
- **Segment rolls**: by sentence punctuation once the segment is long enough, and before an update
  that would overflow the segment cap.

Word times are **interpolated estimates**: the decoder emits text only, so each batch of newly
emitted words is spread evenly over `[last commit time, audio time - commit lag]`. Expect errors of
about a second; use a forced aligner where exact timing matters.
"""

from __future__ import annotations

import logging
import string
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Sequence

logger = logging.getLogger(__name__)

# Commit-lag model of the reference runtime: hold-back words are spoken at about 2.4 words/s, and
# each decode adds about 0.3 s before its words can be committed.
_SPEECH_WORDS_PER_SEC = 2.4
_DECODE_OVERHEAD_SEC = 0.3

# Closing quotes and brackets that may follow the sentence-final mark ('done!")' ends a sentence).
_TRAILING_CLOSERS = "\"')]}\u00bb\u2019\u201d"
_SENTENCE_END_MARKS = ".!?"


# ---------------------------------------------------------------------------------------------
# Stable-prefix commit within one segment
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitOptions:
    """Stable-prefix commit and word-timing settings (reference causal defaults)."""

    hold_back_words: int = 6
    stable_iterations: int = 1
    # Shortest span an interpolated word gets (unless that would pass the audio heard so far).
    min_word_sec: float = 0.05
    # None derives the lag from the settings above (`commit_lag_sec`).
    commit_lag_override_sec: float | None = None

    def __post_init__(self) -> None:
        if self.hold_back_words < 0:
            raise ValueError(f"hold_back_words is {self.hold_back_words}; expected >= 0")
        if self.stable_iterations < 1:
            raise ValueError(f"stable_iterations is {self.stable_iterations}; expected >= 1")
        if self.min_word_sec < 0:
            raise ValueError(f"min_word_sec is {self.min_word_sec}; expected >= 0")
        if self.commit_lag_override_sec is not None and self.commit_lag_override_sec < 0:
            raise ValueError(f"commit_lag_override_sec is {self.commit_lag_override_sec}; expected >= 0")

    def commit_lag_sec(self, update_interval_sec: float) -> float:
        """Expected distance from the audio head back to the words being committed, with decoder updates
        every `update_interval_sec` seconds of audio.

        The held-back words take `hold_back_words / 2.4` s to speak, each extra stability
        iteration waits one more update, a word lands on average half an update before the
        update that sees it, and decoding adds about 0.3 s: 3.8 s for the causal defaults at 2 s updates.
        """
        if self.commit_lag_override_sec is not None:
            return self.commit_lag_override_sec
        return (
            self.hold_back_words / _SPEECH_WORDS_PER_SEC
            + update_interval_sec * (self.stable_iterations - 1)
            + update_interval_sec / 2
            + _DECODE_OVERHEAD_SEC
        )


@dataclass
class SegmentCommitState:
    """Stable-prefix commit state of the current segment."""

    committed_words: list[str] = field(default_factory=list)
    # The last hypothesis seen; it also becomes the segment's final text at a roll.
    previous_hypothesis_words: list[str] = field(default_factory=list)
    candidate_words: list[str] = field(default_factory=list)
    candidate_count: int = 0


def common_prefix_length(left: Sequence[str], right: Sequence[str]) -> int:
    """Number of leading words that `left` and `right` share."""
    length = 0
    for left_word, right_word in zip(left, right):
        if left_word != right_word:
            break
        length += 1
    return length


def advance_stable_prefix(
    state: SegmentCommitState, hypothesis_words: Sequence[str], options: CommitOptions
) -> list[str]:
    """Feed one hypothesis to the segment's commit state; return the newly committed words."""
    words = list(hypothesis_words)
    committed_len = len(state.committed_words)
    newly_committed: list[str] = []
    if words[:committed_len] != state.committed_words:
        # The model revised words we already committed. Commits are never retracted, so make no
        # progress and restart the agreement count from the committed prefix.
        state.candidate_words = list(state.committed_words)
        state.candidate_count = 0
    else:
        agreed = common_prefix_length(state.previous_hypothesis_words, words)
        candidate = words[: max(committed_len, agreed - options.hold_back_words)]
        if candidate == state.candidate_words:
            state.candidate_count += 1
        else:
            state.candidate_words = candidate
            state.candidate_count = 1
        if state.candidate_count >= options.stable_iterations:
            newly_committed = candidate[committed_len:]
            state.committed_words = list(candidate)
    state.previous_hypothesis_words = words
    return newly_committed


# ---------------------------------------------------------------------------------------------
# Whole-stream view: segments, append-only emission, word timing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommittedWord:
    """One emitted word. `start_sec`/`end_sec` are interpolated estimates (module docstring);
    `committed_at_sec` is the stream's audio time when the word was emitted."""

    text: str
    start_sec: float
    end_sec: float
    committed_at_sec: float
    # Geometric-mean probability of the word's tokens in the hypothesis it was committed from (None: unknown).
    confidence: float | None = None


@dataclass(frozen=True)
class CommitUpdate:
    """What one decoder update changes in the output."""

    new_words: tuple[CommittedWord, ...]
    # Hypothesis words past the committed ones, by position: display only, may still change.
    tentative_text: str
    # Finalized segments followed by the current segment's hypothesis.
    global_hypothesis: str


@dataclass
class TranscriptCommitState:
    """Everything the committer carries between updates; JSON-serialisable via `to_dict`."""

    # Final texts of the rolled segments, concatenated: the stream's transcript so far.
    completed_words: list[str] = field(default_factory=list)
    segment: SegmentCommitState = field(default_factory=SegmentCommitState)
    # Words handed to the client, append-only. They differ from `completed_words` only where a
    # finalization revised already-emitted words.
    emitted_words: list[str] = field(default_factory=list)
    last_commit_sec: float = 0.0
    last_audio_sec: float = 0.0
    dropped_revisions: int = 0
    dropped_revision_words: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TranscriptCommitState:
        values = _checked_fields(cls, data, "commit state")
        values["segment"] = SegmentCommitState(**_checked_fields(SegmentCommitState, values["segment"], "segment"))
        return cls(**values)


def _checked_fields(cls: type, data: Any, what: str) -> dict[str, Any]:
    """Validate a `to_dict` payload against the dataclass `cls`; return a fresh copy of its values."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} is a {type(data).__name__}; expected a dict")
    expected = {f.name: f.type for f in fields(cls)}
    if set(data) != set(expected):
        raise ValueError(
            f"{what} has keys {sorted(data)}; expected {sorted(expected)} "
            f"(missing {sorted(set(expected) - set(data))}, unknown {sorted(set(data) - set(expected))})"
        )
    values: dict[str, Any] = {}
    # Annotations are strings here (postponed evaluation); nested dataclasses pass through as dicts.
    for name, annotation in expected.items():
        value = data[name]
        if annotation == "list[str]":
            if not isinstance(value, list) or not all(isinstance(word, str) for word in value):
                raise ValueError(f"{what}.{name} is {value!r}; expected a list of strings")
            value = list(value)
        elif annotation == "int":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{what}.{name} is {value!r}; expected a non-negative int")
        elif annotation == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{what}.{name} is {value!r}; expected a non-negative number")
            value = float(value)
        values[name] = value
    return values


class HypothesisStability:
    """How many consecutive updates have agreed on each word of a segment's hypothesis and the words before it
    (a word that changes, and every word after it, starts again at 1)."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.ages: list[int] = []

    def update(self, words: Sequence[str]) -> list[int]:
        """Feed the update's hypothesis words; returns their ages."""
        kept = common_prefix_length(self.words, words)
        self.ages = self.ages[:kept] + [0] * (len(words) - kept)
        self.ages = [age + 1 for age in self.ages]
        self.words = list(words)
        return list(self.ages)


class TranscriptCommitter:
    """One stream's output contract: commit per update, finalize per segment, finish at the end.

    Call `update` after every decoder update with the current segment's hypothesis, then
    `finalize_segment` when the segment rolls and `finish` at the end of the stream. Each returns
    the words to emit; emitted words are never changed afterwards.
    """

    def __init__(
        self,
        options: CommitOptions | None = None,
        state: TranscriptCommitState | None = None,
        update_interval_sec: float = 2.0,
    ) -> None:
        """`update_interval_sec`: seconds of audio between decoder updates (the word-time estimates use it)."""
        if update_interval_sec <= 0:
            raise ValueError(f"update_interval_sec is {update_interval_sec}; expected > 0")
        self.options = options or CommitOptions()
        self.state = state or TranscriptCommitState()
        self.update_interval_sec = update_interval_sec
        # Per word of the current segment's last hypothesis (not checkpointed: at a roll the segment is empty).
        self._confidences: Sequence[float | None] = ()
        self._segment_start = len(self.state.completed_words)  # global position of the segment's first word

    @property
    def transcript(self) -> str:
        """The finalized segments' text (after `finish`, the whole stream's final transcript)."""
        return " ".join(self.state.completed_words)

    @property
    def committed_text(self) -> str:
        """Finalized segments followed by the current segment's committed words."""
        return " ".join(self.state.completed_words + self.state.segment.committed_words)

    @property
    def emitted_text(self) -> str:
        """Everything emitted so far, exactly as the client received it."""
        return " ".join(self.state.emitted_words)

    def update(
        self, hypothesis_text: str, audio_sec: float, confidences: Sequence[float | None] = ()
    ) -> CommitUpdate:
        """Feed the current segment's hypothesis after a decoder update at stream time `audio_sec`, with its
        words' confidences if known (the words committed from it carry them)."""
        self._advance_clock(audio_sec)
        words = hypothesis_text.split()
        self._confidences = confidences
        self._segment_start = len(self.state.completed_words)
        segment = self.state.segment
        advance_stable_prefix(segment, words, self.options)
        new_words = self._emit(audio_sec, at_end_of_stream=False)
        return CommitUpdate(
            new_words=new_words,
            tentative_text=" ".join(words[len(segment.committed_words) :]),
            global_hypothesis=" ".join(self.state.completed_words + words),
        )

    def finalize_segment(self, audio_sec: float) -> tuple[CommittedWord, ...]:
        """Roll the segment: its last hypothesis becomes final; emit the words not yet emitted."""
        self._advance_clock(audio_sec)
        self._complete_segment()
        words = self._emit(audio_sec, at_end_of_stream=False)
        self._confidences = ()  # the next segment's words come from its own hypotheses
        return words

    def finish(self, audio_sec: float) -> tuple[CommittedWord, ...]:
        """End of stream: finalize the last segment and emit the remainder, timed up to `audio_sec`."""
        self._advance_clock(audio_sec)
        self._complete_segment()
        return self._emit(audio_sec, at_end_of_stream=True)

    def _confidence(self, position: int) -> float | None:
        return self._confidences[position] if 0 <= position < len(self._confidences) else None

    def _advance_clock(self, audio_sec: float) -> None:
        if audio_sec < self.state.last_audio_sec:
            raise ValueError(
                f"audio_sec is {audio_sec}; expected >= {self.state.last_audio_sec}, the stream time of the last call"
            )
        self.state.last_audio_sec = audio_sec

    def _complete_segment(self) -> None:
        state = self.state
        final_words = state.segment.previous_hypothesis_words
        target = state.completed_words + final_words
        # Only positions from this segment on can disagree: earlier ones were checked when their
        # own segment was finalized and never change again.
        revised = [
            position
            for position in range(len(state.completed_words), len(state.emitted_words))
            if position >= len(target) or target[position] != state.emitted_words[position]
        ]
        if revised:
            state.dropped_revisions += 1
            state.dropped_revision_words += len(revised)
            logger.info(
                "segment final text revises %d already-emitted words (positions %d..%d); revision dropped",
                len(revised),
                revised[0],
                revised[-1],
            )
        state.completed_words = target
        state.segment = SegmentCommitState()

    def _emit(self, audio_sec: float, *, at_end_of_stream: bool) -> tuple[CommittedWord, ...]:
        """Emit global committed words past the emitted count, with interpolated times."""
        state = self.state
        target = state.completed_words + state.segment.committed_words
        new_texts = target[len(state.emitted_words) :]
        if not new_texts:
            return ()
        count = len(new_texts)
        start = state.last_commit_sec
        lagged_end = audio_sec if at_end_of_stream else audio_sec - self.options.commit_lag_sec(self.update_interval_sec)
        # At least min_word_sec per word, but never past the audio heard so far.
        end = max(start, min(max(lagged_end, start + self.options.min_word_sec * count), audio_sec))
        span = end - start
        first = len(state.emitted_words) - self._segment_start  # the first new word's place in the hypothesis
        words = tuple(
            CommittedWord(
                text=text,
                start_sec=start + span * index / count,
                end_sec=start + span * (index + 1) / count,
                committed_at_sec=audio_sec,
                confidence=self._confidence(first + index),
            )
            for index, text in enumerate(new_texts)
        )
        state.emitted_words.extend(new_texts)
        state.last_commit_sec = end
        return words


# ---------------------------------------------------------------------------------------------
# Segment policy
# ---------------------------------------------------------------------------------------------


def ends_with_sentence_punctuation(text: str) -> bool:
    """True when `text` ends in `.`, `!` or `?`, ignoring trailing quotes, brackets and spaces."""
    return text.rstrip(_TRAILING_CLOSERS + string.whitespace).endswith(tuple(_SENTENCE_END_MARKS))


@dataclass(frozen=True)
class SegmentOptions:
    """When a segment rolls (steps are 80 ms audio steps; reference causal defaults)."""

    segment_max_steps: int = 200  # 16 s: the causal tower was trained on chains of at most 16 s
    segment_punct_min_steps: int = 150  # 12 s: roll at a sentence end once the segment is this long
    roll_before_generate: bool = True  # never spend an update on a cache that is about to be dropped
    # Roll after an update (at a sentence end, or past the cap). The windowed reference rolls only before one.
    punctuation_rollover: bool = True

    def __post_init__(self) -> None:
        if self.segment_max_steps < 1:
            raise ValueError(f"segment_max_steps is {self.segment_max_steps}; expected >= 1")
        if not 0 <= self.segment_punct_min_steps <= self.segment_max_steps:
            raise ValueError(
                f"segment_punct_min_steps is {self.segment_punct_min_steps}; "
                f"expected between 0 and segment_max_steps ({self.segment_max_steps})"
            )


class SegmentPolicy:
    """Decides segment rolls from step counts and the segment's hypothesis; holds no state."""

    def __init__(self, options: SegmentOptions | None = None) -> None:
        self.options = options or SegmentOptions()

    def should_roll_before(self, segment_steps: int, incoming_steps: int) -> Literal[True] | None:
        """Roll (True) before an update whose incoming steps would push the segment past the cap, else None.

        An empty segment never rolls: the caller must keep single appends within the cap.
        """
        _check_steps(segment_steps=segment_steps, incoming_steps=incoming_steps)
        if (
            self.options.roll_before_generate
            and segment_steps > 0
            and segment_steps + incoming_steps > self.options.segment_max_steps
        ):
            return True
        return None

    def should_roll_after(self, segment_steps: int, hypothesis_text: str) -> Literal[True] | None:
        """Roll (True) after an update at a sentence end once long enough, or when past the cap; else None."""
        _check_steps(segment_steps=segment_steps)
        if not self.options.punctuation_rollover:
            return None
        if segment_steps > self.options.segment_max_steps:
            return True
        if segment_steps >= self.options.segment_punct_min_steps and ends_with_sentence_punctuation(
            hypothesis_text
        ):
            return True
        return None


def _check_steps(**counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} is {value}; expected >= 0")
