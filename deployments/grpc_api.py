"""The public gRPC API's rules, apart from any server: what a request may be, and how events become responses.

`qwen3stream.v1.Recognizer/Recognize` is one bidirectional stream per audio stream: a `StreamConfig` first
(exactly once), then `AudioChunk`s; the client's half-close ends the audio, and the server answers with a
`Final` and closes. Every bad request is an `InvalidRequest` with a one-line message (INVALID_ARGUMENT).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from pipeline.causal_encoder import TRAINED_BLOCK_FRAMES
from pipeline.commit import CommittedWord
from pipeline.features import SAMPLE_RATE
from pipeline.prompt import MAX_CONTEXT_TOKENS, canonical_language
from pipeline.options import SessionOptions
from pipeline.session import TranscriptEvent
from pipeline.voice_gate import VadOptions
from protos.qwen3stream.v1 import asr_pb2

#: The most audio one chunk may carry (seconds): a live source sends far less; more is a client bug.
MAX_CHUNK_SECONDS = 10.0
#: The longest language name accepted (the longest supported is far shorter; longer is never echoed back).
MAX_LANGUAGE_CHARS = 64
#: Block size of a config that leaves it unset (0).
DEFAULT_BLOCK_FRAMES = 192
#: The longest context accepted before it is tokenized (its real bound is MAX_CONTEXT_TOKENS tokens).
MAX_CONTEXT_CHARS = 1024
#: Bytes per sample of each accepted encoding.
SAMPLE_BYTES = {asr_pb2.PCM_S16LE: 2, asr_pb2.F32LE: 4}


class InvalidRequest(ValueError):
    """A request the API does not accept; the message is what the client is told."""


def session_options(config: asr_pb2.StreamConfig, defaults: SessionOptions) -> SessionOptions:
    """The session options a stream's config asks for (checked), over the server's defaults."""
    if config.sample_rate_hz != SAMPLE_RATE:
        raise InvalidRequest(f"sample_rate_hz is {config.sample_rate_hz}; expected {SAMPLE_RATE} (16 kHz mono)")
    if config.encoding not in SAMPLE_BYTES:
        raise InvalidRequest(
            f"encoding is {asr_pb2.Encoding.Name(config.encoding) if config.encoding in asr_pb2.Encoding.values() else config.encoding}; "
            "expected PCM_S16LE or F32LE"
        )
    block_frames = config.block_frames or DEFAULT_BLOCK_FRAMES
    if block_frames not in TRAINED_BLOCK_FRAMES:
        raise InvalidRequest(f"block_frames is {config.block_frames}; expected one of {TRAINED_BLOCK_FRAMES}")
    language = defaults.language
    if len(config.language) > MAX_LANGUAGE_CHARS:
        raise InvalidRequest(f"language has {len(config.language)} characters; expected a name or code of at most {MAX_LANGUAGE_CHARS}")
    if config.language:
        try:
            language = canonical_language(config.language)
        except ValueError as error:
            raise InvalidRequest(str(error)) from None
    check_context(config.context)
    gate = config.voice_activity
    try:
        vad = VadOptions(
            enabled=gate.enabled,
            threshold=gate.threshold or VadOptions.threshold,
            end_silence_ms=gate.end_silence_ms or VadOptions.end_silence_ms,
        )
        return replace(
            defaults,
            language=language,
            context=config.context,
            encoder=replace(defaults.encoder, block_frames=block_frames),
            vad=vad,
            allow_untrained_language=config.allow_untrained_language,
        )
    except ValueError as error:  # the options' own checks: a language the tower was not trained on, a bad gate
        raise InvalidRequest(str(error)) from None


def check_context(context: str) -> None:
    """A context's length before it is tokenized (the session checks its token count)."""
    if len(context) > MAX_CONTEXT_CHARS:
        raise InvalidRequest(
            f"context has {len(context)} characters; expected at most {MAX_CONTEXT_CHARS} ({MAX_CONTEXT_TOKENS} tokens)"
        )


def effective_config(config: asr_pb2.StreamConfig, options: SessionOptions) -> asr_pb2.StreamConfig:
    """The config as the server runs it (defaults filled in), for `Started`."""
    return asr_pb2.StreamConfig(
        language=options.language or "",
        sample_rate_hz=SAMPLE_RATE,
        encoding=config.encoding,
        block_frames=options.encoder.block_frames,
        interim_results=config.interim_results,
        context=options.context,
        voice_activity=asr_pb2.VoiceActivity(
            enabled=options.vad.enabled, threshold=options.vad.threshold, end_silence_ms=options.vad.end_silence_ms
        )
        if options.vad.enabled
        else None,
        allow_untrained_language=options.allow_untrained_language,
    )


def decode_audio(data: bytes, encoding: int) -> np.ndarray:
    """An `AudioChunk`'s bytes as float32 samples in [-1, 1]."""
    width = SAMPLE_BYTES[encoding]
    if len(data) % width:
        raise InvalidRequest(f"audio chunk has {len(data)} bytes; expected a multiple of {width} for this encoding")
    if len(data) > MAX_CHUNK_SECONDS * SAMPLE_RATE * width:
        raise InvalidRequest(
            f"audio chunk holds {len(data) // width / SAMPLE_RATE:.1f} s; expected at most {MAX_CHUNK_SECONDS:g} s"
        )
    if encoding == asr_pb2.PCM_S16LE:
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(samples))
    if bad.size:
        raise InvalidRequest(f"audio chunk has a non-finite sample at index {bad[0]}; expected finite floats")
    return samples


class ResponseWriter:
    """Turns a stream's events into responses, numbering committed words (an index is never reused)."""

    def __init__(self, next_index: int = 0, time_precision_sec: float = 0.0) -> None:
        """`next_index`: how many committed words a resumed stream already has (the next index follows them).
        `time_precision_sec`: how far word times may be off (`StreamingSession.word_time_precision_sec`)."""
        self.next_index = next_index
        self.time_precision_ms = round(time_precision_sec * 1000)

    def response(self, event: TranscriptEvent) -> asr_pb2.RecognizeResponse:
        """A `SpeechEvent` for a speech boundary, else a `Result`."""
        if event.kind in ("speech_begin", "speech_end"):
            kind = asr_pb2.SpeechEvent.SPEECH_BEGIN if event.kind == "speech_begin" else asr_pb2.SpeechEvent.SPEECH_END
            return asr_pb2.RecognizeResponse(speech=asr_pb2.SpeechEvent(kind=kind, sample=event.span[0]))
        start, end = event.span or (0, 0)
        return asr_pb2.RecognizeResponse(
            result=asr_pb2.Result(
                committed=[self._word(word) for word in event.new_words],
                interim=event.tentative,
                segment_index=event.segment_index,
                audio_processed_ms=round(event.audio_sec * 1000),
                segment_final=event.kind == "segment",
                interim_stability=event.stability,
                start_sample=start,
                end_sample=end,
                segment_end_reason=event.reason or "",
            )
        )

    @staticmethod
    def final(
        transcript: str, token_ids: list[int], final_hypothesis_text: str, stats: asr_pb2.FinalStats
    ) -> asr_pb2.RecognizeResponse:
        """`transcript`: the transcript of record (the session's committed words, as the client received them)."""
        return asr_pb2.RecognizeResponse(
            final=asr_pb2.Final(
                text=transcript,
                token_ids=token_ids,
                stats=stats,
                final_hypothesis_text=final_hypothesis_text,
            )
        )

    def _word(self, word: CommittedWord) -> asr_pb2.Word:
        message = asr_pb2.Word(
            index=self.next_index,
            text=word.text,
            start_ms=round(word.start_sec * 1000),
            end_ms=round(word.end_sec * 1000),
            time_precision_ms=self.time_precision_ms,
            confidence=word.confidence,
        )
        self.next_index += 1
        return message


def stage_timings(
    seconds: Mapping[str, Sequence[float]], replicas: Mapping[str, int] | None = None
) -> list[asr_pb2.StageTiming]:
    """A stream's stage-call durations (seconds, per stage) and replica counts as `FinalStats.stage_timings`."""
    timings = []
    for stage, durations in seconds.items():
        ms = np.asarray(durations) * 1000
        timings.append(
            asr_pb2.StageTiming(
                stage=stage,
                calls=len(ms),
                total_ms=float(ms.sum()),
                p50_ms=float(np.percentile(ms, 50)),
                p95_ms=float(np.percentile(ms, 95)),
                replicas=(replicas or {}).get(stage, 0),
            )
        )
    return timings
