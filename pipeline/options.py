"""Per-stream settings: `SessionOptions`, composed of each layer's own options.

Each layer keeps its options beside its code (`CausalEncoderOptions`, `DecodeOptions`, `CommitOptions`,
`SegmentOptions`, `VadOptions`); a session's options hold one of each, plus what belongs to the stream itself
(backend, language, context). Their JSON/YAML form is the nested mapping `dataclasses.asdict` gives, read back by
`SessionOptions.from_dict` (the form checkpoints, replay files and a served app's `session` argument use).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Literal

from pipeline.causal_encoder import CausalEncoderOptions
from pipeline.commit import CommitOptions, SegmentOptions
from pipeline.decoding import DecodeOptions
from pipeline.encoder import CAUSAL_LEFT_CONTEXT_STEPS
from pipeline.features import FRAMES_PER_SECOND
from pipeline.prompt import canonical_language
from pipeline.voice_gate import VadOptions


@dataclass(frozen=True)
class WindowOptions:
    """The windowed backend: every `update_frames` re-encode `left_frames` of history + `right_frames` of
    look-ahead (causal_runtime.md §2)."""

    update_frames: int = 200
    left_frames: int = 1200
    right_frames: int = 64


@dataclass(frozen=True)
class SessionOptions:
    """Per-stream settings, composed of each layer's own options. Defaults are the published causal operating
    point. The decode options' token rules (suppressed and stop ids) come from the tokenizer, not from here."""

    backend: Literal["causal", "windowed"] = "causal"
    language: str | None = "English"
    context: str = ""
    speculative: bool = True
    # causal backend: run the decoder once per this many encoded blocks (1 = every block, the reference). More
    # blocks per update amortise the decoder over more audio (it dominates the cost) at the price of latency.
    blocks_per_update: int = 1
    encoder: CausalEncoderOptions = CausalEncoderOptions()
    decode: DecodeOptions = DecodeOptions()
    commit: CommitOptions = CommitOptions()
    segment: SegmentOptions = SegmentOptions()
    window: WindowOptions = WindowOptions()  # windowed backend only
    vad: VadOptions = VadOptions()  # causal backend only: skip silence, end utterances at pauses
    # The causal tower was distilled on English only: another forced language is refused unless this is set
    # (then the session carries a warning). The windowed backend accepts every language.
    allow_untrained_language: bool = False

    @property
    def update_interval_sec(self) -> float:
        """Seconds of audio between decoder updates (word-time estimates depend on it)."""
        if self.backend == "windowed":
            return self.window.update_frames / FRAMES_PER_SECOND
        return self.encoder.block_frames * self.blocks_per_update / FRAMES_PER_SECOND

    @property
    def untrained_language(self) -> str | None:
        """The forced language, when the causal tower was not trained on it (None otherwise)."""
        if self.backend != "causal" or self.language is None:
            return None
        language = canonical_language(self.language)
        return None if language == TRAINED_LANGUAGE else language

    @classmethod
    def windowed(cls, **changes: Any) -> "SessionOptions":
        """The reference defaults of the recompute backend (causal_runtime.md §2), then `changes` (as in `merged`)."""
        return cls().merged(_WINDOWED_DEFAULTS).merged(changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SessionOptions":
        """From the JSON/YAML form (`dataclasses.asdict`): sub-options as nested mappings."""
        return cls().merged(data)

    @classmethod
    def from_v2_dict(cls, flat: Mapping[str, Any]) -> "SessionOptions":
        """From the flat form of version 2 checkpoints (before the options were nested)."""
        return cls.from_dict(_nested_v2_options(flat))

    def merged(self, changes: Mapping[str, Any]) -> "SessionOptions":
        """A copy with `changes` applied: a field's new value, or for a sub-option a mapping of its fields
        to change (the rest kept), e.g. `{"decode": {"max_new_tokens": 64}, "language": None}`."""
        return _merged(self, changes, "session options")

    def __post_init__(self) -> None:
        if self.backend not in ("causal", "windowed"):
            raise ValueError(f"backend is {self.backend!r}; expected 'causal' or 'windowed'")
        if self.blocks_per_update < 1:
            raise ValueError(f"blocks_per_update is {self.blocks_per_update}; expected at least 1")
        if self.vad.enabled and (self.backend != "causal" or self.blocks_per_update != 1):
            raise ValueError(
                f"the voice activity gate needs the causal backend with one block per update; got backend "
                f"{self.backend!r}, blocks_per_update {self.blocks_per_update}"
            )
        if self.untrained_language and not self.allow_untrained_language:
            raise ValueError(
                f"language {self.untrained_language!r}: the causal tower was distilled on English only; use the "
                "windowed backend, or allow an untrained language explicitly (expect lower accuracy)"
            )
        if self.encoder.left_context_steps > CAUSAL_LEFT_CONTEXT_STEPS:
            raise ValueError(
                f"encoder.left_context_steps is {self.encoder.left_context_steps}; the encoder's K/V holds at most "
                f"{CAUSAL_LEFT_CONTEXT_STEPS} steps"
            )


TRAINED_LANGUAGE = "English"  # the causal tower's distillation data

_WINDOWED_DEFAULTS: dict[str, Any] = {
    "backend": "windowed",
    "decode": {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0},
    "commit": {"stable_iterations": 2},
    "segment": {"punctuation_rollover": False},
}


def _merged(options: Any, changes: Mapping[str, Any], where: str) -> Any:
    known = {item.name: item for item in fields(options)}
    updates = {}
    for name, value in changes.items():
        if name not in known:
            raise ValueError(f"{where} have no field {name!r}; expected one of {sorted(known)}")
        current = getattr(options, name)
        if is_dataclass(current) and isinstance(value, Mapping):
            value = _merged(current, value, f"{where}.{name}")
        elif isinstance(value, list):  # JSON has no tuples
            value = tuple(value)
        updates[name] = value
    return replace(options, **updates)


# Version 2 checkpoints held the options flat: where each flat field lives now.
_V2_OPTION_HOMES = {
    "block_frames": ("encoder", "block_frames"),
    "max_new_tokens": ("decode", "max_new_tokens"),
    "repetition_penalty": ("decode", "repetition_penalty"),
    "no_repeat_ngram_size": ("decode", "no_repeat_ngram_size"),
    "hold_back_words": ("commit", "hold_back_words"),
    "stable_iterations": ("commit", "stable_iterations"),
    "segment_max_steps": ("segment", "segment_max_steps"),
    "segment_punct_min_steps": ("segment", "segment_punct_min_steps"),
    "punctuation_rollover": ("segment", "punctuation_rollover"),
    "windowed_update_frames": ("window", "update_frames"),
    "windowed_left_frames": ("window", "left_frames"),
    "windowed_right_frames": ("window", "right_frames"),
}


def _nested_v2_options(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        if name in _V2_OPTION_HOMES:
            group, field_name = _V2_OPTION_HOMES[name]
            nested.setdefault(group, {})[field_name] = value
        else:
            nested[name] = value
    return nested
