"""Streaming Whisper log-mel front-end of Qwen3-ASR.

The features are those of the reference extractor (`WhisperFeatureExtractor` with 128 bins, reference
§3): 16 kHz audio, STFT with n_fft 400, hop 160, periodic Hann window, centred frames with reflect
padding at both ends of the stream, power spectrum, 128 slaney mel filters over 0-8 kHz, log10 of the
mel energies clamped at 1e-10, a floor at (max - 8), then (x + 4) / 4. A stream of n samples gives
n // 160 frames (the reference drops the last STFT frame).

Streaming. Frame t covers samples [160 t - 200, 160 t + 200). It is emitted by `push` as soon as those
samples have arrived; the last frames, which need the reflect padding at the end of the stream, come
out of `flush`. Only the samples still needed by future frames are buffered (fewer than 400 after
each `push`).

Bit-identical output whatever the chunking. FFT and BLAS results may depend on how many rows one call
computes. So frames are always computed in calls of one fixed shape, one group of `FRAMES_PER_GROUP`
frames (one 80 ms encoder step) aligned to absolute frame indices; rows of the group whose samples
are not known yet (or were already emitted) are zero and their results dropped. Every frame is thus
computed from the same row, at the same position, in the same call shape, however the audio arrived.

Dynamic-range floor. The reference floors every value at (max over the whole clip) - 8, which a stream
cannot know. Here frame t is floored at (running max of the log-mel over all frames of the stream so
far, frame t included) - 8. This is causal, depends only on frame indices (never on chunking), and
equals the reference on any clip where the reference floor is inactive (then no value is below
(global max - 8), hence none below (running max - 8) either). It differs where the clip has values
more than 80 dB below its loudest point: early quiet frames keep their own dynamic range instead of
being lifted to the level of a later loud part. The running max lasts for the whole stream (never
restarted at segment rolls); `reset()` starts a new stream.

Short streams. With n <= 200 samples a single reflection cannot pad 200 samples; the padding then
repeats the reflection (numpy's `np.pad(mode="reflect")`), which gives one frame for 160 <= n <= 200
and none below 160. From n = 201 on this is the reference padding.

Many streams at once. `extract_log_mel` advances many extractors in one go: each stream's frames are laid out
in their fixed-shape groups as above, and the groups of many streams go through one stacked FFT and one stacked
matmul (each group still its own [8, 400] row block of the same call shapes, so every frame is bit-identical to
the one-stream path), in calls of at most `GROUPS_PER_CALL` groups to bound their memory. `push` and `flush` are
that call for one stream.

The extractor state (`LogMelState`) is plain data, so a session can be saved at a segment boundary and
resumed elsewhere with identical frames.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.signal
import torch
from transformers.audio_utils import mel_filter_bank

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
N_MELS = 128
FRAMES_PER_GROUP = 8  # one conv-stem step of the causal tower (80 ms)
#: Most groups one stacked FFT call takes (~3 MB of windows; 21 streams' 1.92 s blocks): batching beyond this
#: saves no per-call overhead worth the memory.
GROUPS_PER_CALL = 512
LOG_MEL_EPS = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units: 80 dB below the (running) max
_HALF_WINDOW = N_FFT // 2


@functools.cache
def _analysis_constants() -> tuple[np.ndarray, np.ndarray]:
    """Periodic Hann window [N_FFT] and mel filters [N_FFT // 2 + 1, N_MELS], float32, built like the reference."""
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32).numpy()
    filters = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return window, np.ascontiguousarray(filters, dtype=np.float32)


def _groups_log_mel(groups: np.ndarray) -> np.ndarray:
    """Unfloored log10 mel of groups: [groups, FRAMES_PER_GROUP, N_FFT] samples -> [groups, FRAMES_PER_GROUP, N_MELS].

    The FFT is per row, and the stacked matmul is one [FRAMES_PER_GROUP, bins] x [bins, N_MELS] product per group,
    so a group's result does not depend on how many groups share the call. numpy rather than torch: numpy's FFT
    is single-threaded and its small GEMM stays on one thread, whereas torch's intra-op threads cost far more than
    the work at this size and may vary the result.
    """
    window, filters = _analysis_constants()
    power = np.abs(np.fft.rfft(groups * window)) ** 2
    return np.log10(np.maximum(power @ filters, np.float32(LOG_MEL_EPS)))


def _reflect(index: np.ndarray, length: int) -> np.ndarray:
    """Map sample indices outside [0, length) into it by (repeated) reflection without edge repeat."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    folded = np.mod(index, period)
    return np.where(folded > length - 1, period - folded, folded)


def _first_needed_sample(frames_emitted: int) -> int:
    """Earliest sample any frame from `frames_emitted` on can read (the left reflection reads x[1..200])."""
    return max(0, HOP_LENGTH * frames_emitted - _HALF_WINDOW)


def _first_non_finite(samples: np.ndarray) -> tuple[int, ...] | None:
    bad = np.flatnonzero(~np.isfinite(samples))
    if bad.size == 0:
        return None
    return tuple(int(i) for i in np.unravel_index(bad[0], samples.shape))


@dataclass(frozen=True, eq=False)  # eq=False: comparing the ndarray field elementwise has no truth value
class LogMelState:
    """Everything a `StreamingLogMel` needs to continue a stream.

    `pending` holds samples [first needed sample, samples_received) as float32; `running_max` is the
    running log10-mel max of the stream (None: no frame yet).
    """

    samples_received: int
    frames_emitted: int
    pending: np.ndarray
    running_max: float | None
    flushed: bool


class StreamingLogMel:
    """Incremental log-mel extractor for one 16 kHz mono stream (see the module docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new stream: no samples, no frames, no running max."""
        self._samples_received = 0
        self._frames_emitted = 0
        self._pending = np.zeros(0, dtype=np.float32)
        self._running_max: float | None = None
        self._flushed = False

    @property
    def samples_received(self) -> int:
        return self._samples_received

    @property
    def flushed(self) -> bool:
        return self._flushed

    @property
    def frames_emitted(self) -> int:
        return self._frames_emitted

    def push(self, chunk: np.ndarray) -> torch.Tensor:
        """Append 16 kHz float32 samples (checked: `check_pcm`); return the frames completed by them, [n, N_MELS]
        float32."""
        if self._flushed:
            raise RuntimeError("stream already flushed; call reset() to start a new one")
        check_pcm(chunk, self._samples_received)
        return extract_log_mel([self], [chunk], [False])[0]

    def frames_after(self, more_samples: int) -> int:
        """How many frames `push` would have emitted in all after `more_samples` more samples (no work done)."""
        return max(self._frames_emitted, frames_complete(self._samples_received + more_samples))

    def flush(self) -> torch.Tensor:
        """End the stream: return the last frames (end-reflect padded); the total is then samples // 160."""
        return extract_log_mel([self], [np.zeros(0, dtype=np.float32)], [True])[0]

    def state(self) -> LogMelState:
        return LogMelState(
            samples_received=self._samples_received,
            frames_emitted=self._frames_emitted,
            pending=self._pending.copy(),
            running_max=self._running_max,
            flushed=self._flushed,
        )

    @classmethod
    def from_state(cls, state: LogMelState) -> StreamingLogMel:
        expected = state.samples_received - _first_needed_sample(state.frames_emitted)
        if state.pending.dtype != np.float32 or state.pending.shape != (expected,):
            raise ValueError(
                f"state holds pending samples of dtype {state.pending.dtype} and shape {state.pending.shape}; "
                f"expected float32 of shape ({expected},) for {state.samples_received} samples and "
                f"{state.frames_emitted} frames"
            )
        extractor = cls()
        extractor._samples_received = state.samples_received
        extractor._frames_emitted = state.frames_emitted
        extractor._pending = state.pending.copy()
        extractor._running_max = state.running_max
        extractor._flushed = state.flushed
        return extractor

    def _accept(self, chunk: np.ndarray, flush: bool) -> int:
        """Append `chunk`; return the frame index this call emits up to (flush: the end of the stream)."""
        if self._flushed:
            raise RuntimeError("stream already flushed; call reset() to start a new one")
        self._pending = np.concatenate([self._pending, chunk])
        self._samples_received += chunk.size
        stop = self._samples_received // HOP_LENGTH if flush else frames_complete(self._samples_received)
        return max(stop, self._frames_emitted)

    def _windows(self, stop: int) -> np.ndarray:
        """Samples of frames [frames_emitted, stop) in their groups, [groups, FRAMES_PER_GROUP, N_FFT]: each frame
        at its row of the group aligned to absolute frame indices, the group's other rows zero."""
        first = self._frames_emitted
        group_start = first - first % FRAMES_PER_GROUP
        groups = -(-(stop - group_start) // FRAMES_PER_GROUP) if stop > first else 0
        windows = np.zeros((groups * FRAMES_PER_GROUP, N_FFT), dtype=np.float32)
        if stop > first:
            # The frames' span of samples, reflected only where it passes an end of the stream (its first
            # frames, or the last ones at a flush); frame t is the span's window at (t - first) hops.
            low, high = HOP_LENGTH * first - _HALF_WINDOW, HOP_LENGTH * (stop - 1) + _HALF_WINDOW
            if low >= 0 and high <= self._samples_received:
                span = self._pending[low - self._pending_start() : high - self._pending_start()]
            else:
                span = self._pending[_reflect(np.arange(low, high), self._samples_received) - self._pending_start()]
            frames = np.lib.stride_tricks.sliding_window_view(span, N_FFT)[::HOP_LENGTH]
            windows[first - group_start : stop - group_start] = frames
        return windows.reshape(groups, FRAMES_PER_GROUP, N_FFT)

    def _emit(self, group_log_mel: np.ndarray, stop: int, flush: bool) -> torch.Tensor:
        """Floor the frames [frames_emitted, stop) out of their groups' log-mel, advance, drop spent samples."""
        first = self._frames_emitted
        offset = first % FRAMES_PER_GROUP
        frames = group_log_mel.reshape(-1, N_MELS)[offset : offset + stop - first]
        if stop > first:
            frames = self._floor(frames)
        self._frames_emitted = stop
        self._pending = self._pending[_first_needed_sample(stop) - self._pending_start() :].copy()
        self._flushed = flush
        return torch.from_numpy(frames)

    def _pending_start(self) -> int:
        return self._samples_received - self._pending.size

    def _floor(self, log_mel: np.ndarray) -> np.ndarray:
        """Apply the running-max floor and the (x + 4) / 4 scaling to the next frames of the stream."""
        previous = -math.inf if self._running_max is None else self._running_max
        running_max = np.maximum(np.maximum.accumulate(log_mel.max(axis=1)), np.float32(previous))
        self._running_max = float(running_max[-1])
        floor = running_max - np.float32(DYNAMIC_RANGE)
        return (np.maximum(log_mel, floor[:, None]) + np.float32(4.0)) / np.float32(4.0)


def extract_log_mel(
    extractors: Sequence[StreamingLogMel], chunks: Sequence[np.ndarray], flush: Sequence[bool]
) -> list[torch.Tensor]:
    """`push` chunks[i] to extractors[i] (then `flush` it where flush[i]), for many streams in stacked calls:
    returns each stream's new frames [n, N_MELS], bit-identical to its own `push` / `flush`.

    The chunks are PCM already checked as it arrived (`check_pcm`: `StreamingSession.hold_audio`, `push`), so
    every sample is scanned once, not again here."""
    if not len(extractors) == len(chunks) == len(flush):
        raise ValueError(f"got {len(extractors)} extractors, {len(chunks)} chunks and {len(flush)} flush flags")
    if len({id(extractor) for extractor in extractors}) != len(extractors):
        raise ValueError("an extractor appears twice; its frames depend on each other and must go in order")
    stops = [extractor._accept(chunk, end) for extractor, chunk, end in zip(extractors, chunks, flush)]
    frames: list[torch.Tensor] = []
    batch: list[np.ndarray] = []  # windows of the streams frames[len(frames):], not computed yet

    def compute_batch() -> None:
        log_mel = _groups_log_mel(np.concatenate(batch)) if batch else None
        offset = 0
        for windows in batch:
            index = len(frames)
            groups = windows.shape[0]
            frames.append(extractors[index]._emit(log_mel[offset : offset + groups], stops[index], flush[index]))
            offset += groups
        batch.clear()

    for extractor, stop, end in zip(extractors, stops, flush):
        batch.append(extractor._windows(stop))
        if sum(windows.shape[0] for windows in batch) >= GROUPS_PER_CALL:
            compute_batch()
    compute_batch()
    return frames


def check_pcm(chunk: np.ndarray, stream_offset: int = 0) -> None:
    """Raise unless `chunk` is what a stream takes: a 1-D float32 numpy array of finite 16 kHz samples
    (`stream_offset`: the stream sample of chunk[0], named in the error)."""
    if not isinstance(chunk, np.ndarray) or chunk.dtype != np.float32 or chunk.ndim != 1:
        described = (
            f"{chunk.dtype} array of shape {chunk.shape}" if isinstance(chunk, np.ndarray) else type(chunk).__name__
        )
        raise TypeError(
            f"chunk is a {described}; expected a 1-D float32 numpy array of 16 kHz samples (convert with prepare_pcm)"
        )
    bad = _first_non_finite(chunk)
    if bad is not None:
        raise ValueError(
            f"chunk sample {bad[0]} (stream sample {stream_offset + bad[0]}) is {chunk[bad[0]]}; expected finite PCM"
        )


def frames_complete(samples: int) -> int:
    """Frames a stream of `samples` samples has complete: frame t needs samples up to 160 t + 199 (frame 0 also
    reflects x[200])."""
    return (samples - _HALF_WINDOW) // HOP_LENGTH + 1 if samples > _HALF_WINDOW else 0


def log_mel(samples: np.ndarray) -> torch.Tensor:
    """Log-mel of a whole 16 kHz float32 clip under the streaming floor policy: [len // 160, N_MELS]."""
    extractor = StreamingLogMel()
    frames = extractor.push(samples)
    return torch.cat([frames, extractor.flush()])


def prepare_pcm(samples: np.ndarray, sample_rate: int, *, downmix: bool = False) -> np.ndarray:
    """Convert decoded audio to what the extractor takes: 1-D float32 at 16 kHz.

    - dtype: float32 / float64 (nominally in [-1, 1]; kept as they are, no peak normalisation, since
      that would depend on the whole clip), or int16 PCM, scaled by 1 / 32768. Others are rejected.
    - channels: 1-D, or 2-D laid out (samples, channels) as soundfile returns. One channel is taken as
      is; several are averaged when `downmix` is set (as the reference does for files), else rejected.
    - NaN / Inf are rejected, naming the first bad index.
    - other sample rates are resampled with `scipy.signal.resample_poly` (polyphase FIR, Kaiser window,
      up/down = 16000/rate reduced by their gcd), giving ceil(n * 16000 / rate) samples. It filters the
      whole array at once: resample whole files, not stream chunks (chunk edges would differ).
    """
    if not isinstance(samples, np.ndarray):
        raise TypeError(f"audio is a {type(samples).__name__}; expected a numpy array")
    if samples.dtype not in (np.float32, np.float64, np.int16):
        raise TypeError(f"audio has dtype {samples.dtype}; expected float32, float64 or int16")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample rate is {sample_rate!r}; expected a positive integer (Hz)")
    if samples.size == 0:
        raise ValueError(f"audio of shape {samples.shape} is empty")
    if samples.ndim == 2:
        channels = samples.shape[1]
        if channels > 1 and not downmix:
            raise ValueError(
                f"audio has {channels} channels (shape {samples.shape}, read as samples x channels); "
                "expected mono, or pass downmix=True to average the channels"
            )
    elif samples.ndim != 1:
        raise ValueError(f"audio has shape {samples.shape}; expected 1-D or (samples, channels)")
    if samples.dtype != np.int16:
        bad = _first_non_finite(samples)
        if bad is not None:
            where = bad if len(bad) > 1 else bad[0]
            raise ValueError(f"audio sample at index {where} is {samples[bad]}; expected finite PCM")

    audio = samples.astype(np.float32) / np.float32(32768.0) if samples.dtype == np.int16 else samples
    if audio.ndim == 2:
        audio = audio.mean(axis=1, dtype=np.float64)
    if sample_rate != SAMPLE_RATE:
        divisor = math.gcd(int(sample_rate), SAMPLE_RATE)
        up, down = SAMPLE_RATE // divisor, int(sample_rate) // divisor
        audio = scipy.signal.resample_poly(audio.astype(np.float64), up, down)
    return np.ascontiguousarray(audio, dtype=np.float32)
