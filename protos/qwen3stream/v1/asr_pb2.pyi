from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    PCM_S16LE: _ClassVar[Encoding]
    F32LE: _ClassVar[Encoding]
ENCODING_UNSPECIFIED: Encoding
PCM_S16LE: Encoding
F32LE: Encoding

class RecognizeRequest(_message.Message):
    __slots__ = ("config", "audio", "control")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    config: StreamConfig
    audio: AudioChunk
    control: Control
    def __init__(self, config: _Optional[_Union[StreamConfig, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., control: _Optional[_Union[Control, _Mapping]] = ...) -> None: ...

class StreamConfig(_message.Message):
    __slots__ = ("language", "sample_rate_hz", "encoding", "block_frames", "interim_results", "resume", "context", "voice_activity", "allow_untrained_language")
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FRAMES_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    VOICE_ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_UNTRAINED_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    language: str
    sample_rate_hz: int
    encoding: Encoding
    block_frames: int
    interim_results: bool
    resume: Resume
    context: str
    voice_activity: VoiceActivity
    allow_untrained_language: bool
    def __init__(self, language: _Optional[str] = ..., sample_rate_hz: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., block_frames: _Optional[int] = ..., interim_results: _Optional[bool] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., context: _Optional[str] = ..., voice_activity: _Optional[_Union[VoiceActivity, _Mapping]] = ..., allow_untrained_language: _Optional[bool] = ...) -> None: ...

class VoiceActivity(_message.Message):
    __slots__ = ("enabled", "threshold", "end_silence_ms")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    END_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    threshold: float
    end_silence_ms: int
    def __init__(self, enabled: _Optional[bool] = ..., threshold: _Optional[float] = ..., end_silence_ms: _Optional[int] = ...) -> None: ...

class Resume(_message.Message):
    __slots__ = ("session_id", "resume_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    resume_token: str
    def __init__(self, session_id: _Optional[str] = ..., resume_token: _Optional[str] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("finalize", "keep_alive", "update_context")
    FINALIZE_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    finalize: Finalize
    keep_alive: KeepAlive
    update_context: UpdateContext
    def __init__(self, finalize: _Optional[_Union[Finalize, _Mapping]] = ..., keep_alive: _Optional[_Union[KeepAlive, _Mapping]] = ..., update_context: _Optional[_Union[UpdateContext, _Mapping]] = ...) -> None: ...

class Finalize(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeepAlive(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateContext(_message.Message):
    __slots__ = ("context",)
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: str
    def __init__(self, context: _Optional[str] = ...) -> None: ...

class RecognizeResponse(_message.Message):
    __slots__ = ("started", "result", "final", "ack", "finalized", "context_updated", "speech")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    FINALIZED_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_UPDATED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_FIELD_NUMBER: _ClassVar[int]
    started: Started
    result: Result
    final: Final
    ack: Ack
    finalized: Finalized
    context_updated: ContextUpdated
    speech: SpeechEvent
    def __init__(self, started: _Optional[_Union[Started, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., final: _Optional[_Union[Final, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., finalized: _Optional[_Union[Finalized, _Mapping]] = ..., context_updated: _Optional[_Union[ContextUpdated, _Mapping]] = ..., speech: _Optional[_Union[SpeechEvent, _Mapping]] = ...) -> None: ...

class Finalized(_message.Message):
    __slots__ = ("first_word_index", "end_word_index", "through_sample")
    FIRST_WORD_INDEX_FIELD_NUMBER: _ClassVar[int]
    END_WORD_INDEX_FIELD_NUMBER: _ClassVar[int]
    THROUGH_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    first_word_index: int
    end_word_index: int
    through_sample: int
    def __init__(self, first_word_index: _Optional[int] = ..., end_word_index: _Optional[int] = ..., through_sample: _Optional[int] = ...) -> None: ...

class ContextUpdated(_message.Message):
    __slots__ = ("effective_segment_index",)
    EFFECTIVE_SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    effective_segment_index: int
    def __init__(self, effective_segment_index: _Optional[int] = ...) -> None: ...

class SpeechEvent(_message.Message):
    __slots__ = ("kind", "sample")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[SpeechEvent.Kind]
        SPEECH_BEGIN: _ClassVar[SpeechEvent.Kind]
        SPEECH_END: _ClassVar[SpeechEvent.Kind]
    KIND_UNSPECIFIED: SpeechEvent.Kind
    SPEECH_BEGIN: SpeechEvent.Kind
    SPEECH_END: SpeechEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    kind: SpeechEvent.Kind
    sample: int
    def __init__(self, kind: _Optional[_Union[SpeechEvent.Kind, str]] = ..., sample: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("durable_sample_offset", "committed_words", "segment_index")
    DURABLE_SAMPLE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_WORDS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    durable_sample_offset: int
    committed_words: int
    segment_index: int
    def __init__(self, durable_sample_offset: _Optional[int] = ..., committed_words: _Optional[int] = ..., segment_index: _Optional[int] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("session_id", "config", "resume_token", "resume_from_sample", "next_word_index", "warnings")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    NEXT_WORD_INDEX_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: StreamConfig
    resume_token: str
    resume_from_sample: int
    next_word_index: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[StreamConfig, _Mapping]] = ..., resume_token: _Optional[str] = ..., resume_from_sample: _Optional[int] = ..., next_word_index: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class Word(_message.Message):
    __slots__ = ("index", "text", "start_ms", "end_ms", "time_precision_ms", "confidence")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_PRECISION_MS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    start_ms: int
    end_ms: int
    time_precision_ms: int
    confidence: float
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., time_precision_ms: _Optional[int] = ..., confidence: _Optional[float] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("committed", "interim", "segment_index", "audio_processed_ms", "segment_final", "interim_stability", "start_sample", "end_sample", "segment_end_reason")
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    INTERIM_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PROCESSED_MS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FINAL_FIELD_NUMBER: _ClassVar[int]
    INTERIM_STABILITY_FIELD_NUMBER: _ClassVar[int]
    START_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    END_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_END_REASON_FIELD_NUMBER: _ClassVar[int]
    committed: _containers.RepeatedCompositeFieldContainer[Word]
    interim: str
    segment_index: int
    audio_processed_ms: int
    segment_final: bool
    interim_stability: _containers.RepeatedScalarFieldContainer[int]
    start_sample: int
    end_sample: int
    segment_end_reason: str
    def __init__(self, committed: _Optional[_Iterable[_Union[Word, _Mapping]]] = ..., interim: _Optional[str] = ..., segment_index: _Optional[int] = ..., audio_processed_ms: _Optional[int] = ..., segment_final: _Optional[bool] = ..., interim_stability: _Optional[_Iterable[int]] = ..., start_sample: _Optional[int] = ..., end_sample: _Optional[int] = ..., segment_end_reason: _Optional[str] = ...) -> None: ...

class Final(_message.Message):
    __slots__ = ("text", "token_ids", "stats", "final_hypothesis_text")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    FINAL_HYPOTHESIS_TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    stats: FinalStats
    final_hypothesis_text: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., stats: _Optional[_Union[FinalStats, _Mapping]] = ..., final_hypothesis_text: _Optional[str] = ...) -> None: ...

class FinalStats(_message.Message):
    __slots__ = ("audio_ms", "segments", "updates", "words", "replays", "revised_words", "stage_timings")
    AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    REPLAYS_FIELD_NUMBER: _ClassVar[int]
    REVISED_WORDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    audio_ms: int
    segments: int
    updates: int
    words: int
    replays: int
    revised_words: int
    stage_timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, audio_ms: _Optional[int] = ..., segments: _Optional[int] = ..., updates: _Optional[int] = ..., words: _Optional[int] = ..., replays: _Optional[int] = ..., revised_words: _Optional[int] = ..., stage_timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "calls", "total_ms", "p50_ms", "p95_ms", "replicas")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    calls: int
    total_ms: float
    p50_ms: float
    p95_ms: float
    replicas: int
    def __init__(self, stage: _Optional[str] = ..., calls: _Optional[int] = ..., total_ms: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., replicas: _Optional[int] = ...) -> None: ...
