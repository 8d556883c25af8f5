"""Streaming log-mel front-end: chunking invariance, equality with transformers' extractors, floor
policy, input validation, resampling and state round-trips."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.models.qwen3_asr.feature_extraction_qwen3_asr import Qwen3ASRFeatureExtractor

from pipeline.features import (
    GROUPS_PER_CALL,
    HOP_LENGTH,
    N_MELS,
    SAMPLE_RATE,
    LogMelState,
    StreamingLogMel,
    extract_log_mel,
    log_mel,
    prepare_pcm,
)


def speech_like_noise(num_samples: int, seed: int) -> np.ndarray:
    """Noise under a syllable-rate envelope that never goes quiet, so no frame is 80 dB below the peak."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / SAMPLE_RATE
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 2 * np.pi))
    noise = np.convolve(rng.standard_normal(num_samples + 7), np.ones(8) / 8, mode="valid")  # tilt to low frequencies
    return (0.2 * envelope * noise[:num_samples]).astype(np.float32)


def push_all(extractor: StreamingLogMel, samples: np.ndarray, chunk_sizes: list[int]) -> torch.Tensor:
    """Push `samples` in chunks, cycling through `chunk_sizes`; return the frames emitted meanwhile."""
    frames, position, i = [torch.zeros(0, N_MELS)], 0, 0
    while position < len(samples):
        size = chunk_sizes[i % len(chunk_sizes)]
        frames.append(extractor.push(samples[position : position + size]))
        position, i = position + size, i + 1
    return torch.cat(frames)


def stream(samples: np.ndarray, chunk_sizes: list[int], extractor: StreamingLogMel | None = None) -> torch.Tensor:
    """Push `samples` in chunks, flush, return all frames."""
    extractor = extractor or StreamingLogMel()
    return torch.cat([push_all(extractor, samples, chunk_sizes), extractor.flush()])


def unfloored_reference_log_mel(samples: np.ndarray) -> torch.Tensor:
    """Independent reference formula (reference §3) on explicitly reflect-padded audio, before the floor."""
    padded = torch.from_numpy(np.pad(samples, 200, mode="reflect"))
    spectrum = torch.stft(padded, 400, HOP_LENGTH, window=torch.hann_window(400), center=False, return_complex=True)
    power = spectrum[..., :-1].abs() ** 2
    filters = torch.from_numpy(WhisperFeatureExtractor(feature_size=N_MELS).mel_filters).float()
    return torch.clamp(filters.T @ power, min=1e-10).log10().T


# ---- chunking invariance -------------------------------------------------------------------------


def test_frames_are_bit_identical_for_any_chunking():
    clip = speech_like_noise(11_237, seed=0)
    clip[4000:6000] *= 30.0  # a loud stretch so the running max (and the floor) moves mid-stream
    clip[8000:] *= 1e-4  # and a quiet tail so the floor is active there
    whole = stream(clip, [len(clip)])
    assert whole.shape == (len(clip) // HOP_LENGTH, N_MELS)
    assert whole.dtype == torch.float32
    for chunking in ([1], [160], [2192], [7, 333, 1, 160, 999], [200, 1, 1]):
        assert torch.equal(stream(clip, chunking), whole), chunking
    assert torch.equal(log_mel(clip), whole)


def test_each_frame_is_emitted_once_its_window_is_complete():
    clip = speech_like_noise(1_000, seed=2)
    extractor = StreamingLogMel()
    for n in range(1, len(clip) + 1):
        extractor.push(clip[n - 1 : n])
        # frame t reads samples up to 160 t + 199; frame 0 also reflects sample 200
        expected = (n - 200) // HOP_LENGTH + 1 if n > 200 else 0
        assert extractor.frames_emitted == expected, n
    assert len(extractor.flush()) == len(clip) // HOP_LENGTH - expected


# ---- equality with transformers' extractors ------------------------------------------------------


@pytest.mark.parametrize("num_samples", [201, 250, 399, 400, 1_000, 4_321, 16_000, 16_037, 48_123])
def test_matches_transformers_extractors_when_floor_inactive(num_samples):
    clip = speech_like_noise(num_samples, seed=num_samples)
    frames = num_samples // HOP_LENGTH
    qwen = Qwen3ASRFeatureExtractor(min_length=0)
    qwen_features = qwen(clip, sampling_rate=SAMPLE_RATE, padding="longest", n_window=0)["input_features"][0].T
    whisper = WhisperFeatureExtractor(feature_size=N_MELS)
    whisper_features = whisper(clip, sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="pt")
    whisper_features = whisper_features["input_features"][0].T
    # The offline floor is inactive: nothing sits at (max - 8 + 4) / 4 = max_feature - 2.
    assert whisper_features.min() > whisper_features.max() - 2.0
    ours = log_mel(clip)
    assert ours.shape == (frames, N_MELS)
    assert (ours - qwen_features[:frames]).abs().max() < 1e-4
    assert (ours - whisper_features[:frames]).abs().max() < 1e-4


@pytest.mark.parametrize("num_samples", [0, 1, 2, 159, 160, 161, 200])
def test_short_streams_use_repeated_reflection(num_samples):
    # torch.stft cannot reflect-pad 200 samples here; the defined behaviour is np.pad(mode="reflect").
    clip = speech_like_noise(max(num_samples, 1), seed=3)[:num_samples]
    ours = log_mel(clip)
    assert ours.shape == (num_samples // HOP_LENGTH, N_MELS)
    if num_samples >= HOP_LENGTH:
        expected_log = unfloored_reference_log_mel(clip)  # one frame: running max == clip max
        expected = (torch.maximum(expected_log, expected_log.max() - 8.0) + 4.0) / 4.0
        assert (ours - expected).abs().max() < 1e-4
        assert torch.equal(stream(clip, [1]), ours)


# ---- floor policy --------------------------------------------------------------------------------


# Feature of digital silence whose floor is inactive: (log10(1e-10) + 4) / 4 in float32, about -1.5.
SILENCE = float((np.log10(np.float32(1e-10)) + np.float32(4.0)) / np.float32(4.0))


def burst_between_silences() -> np.ndarray:
    """0.5 s digital silence, 0.5 s of a 1 kHz tone at 0.5, 0.5 s digital silence."""
    t = np.arange(8_000) / SAMPLE_RATE
    tone = 0.5 * np.sin(2 * np.pi * 1000.0 * t)
    return np.concatenate([np.zeros(8_000), tone, np.zeros(8_000)]).astype(np.float32)


def test_floor_follows_running_max_of_the_stream():
    clip = burst_between_silences()
    ours = log_mel(clip)
    burst_max = unfloored_reference_log_mel(clip).max().item()
    # Silence before the burst (frames 0..48 see only zeros): log10(1e-10) ~ -10 is its own max,
    # so the floor (-18) is inactive and the value is (-10 + 4) / 4.
    assert torch.equal(ours[:49], torch.full((49, N_MELS), SILENCE))
    # Silence after the burst (frames 102..149): floored at burst max - 8.
    lifted = torch.full((48, N_MELS), (burst_max - 8.0 + 4.0) / 4.0)
    assert torch.allclose(ours[102:], lifted, atol=1e-5)
    # The offline extractor lifts the leading silence to that level too. The policies differ there and
    # at the burst onset (frames 49..51, whose running max is still rising), and agree from frame 52 on.
    offline = torch.from_numpy(WhisperFeatureExtractor(feature_size=N_MELS)._torch_extract_fbank_features(clip)).T
    assert torch.allclose(offline[:49], lifted[:1].expand(49, -1), atol=1e-5)
    assert (offline[:49] - ours[:49]).abs().min() > 0.9  # (burst max + 2) / 4, burst max ~ 1.9
    assert (offline[52:] - ours[52:]).abs().max() < 1e-4


def test_reset_starts_a_new_stream():
    clip = speech_like_noise(3_000, seed=5)
    extractor = StreamingLogMel()
    stream(burst_between_silences(), [4_000], extractor)
    extractor.reset()
    assert extractor.samples_received == 0 and extractor.frames_emitted == 0
    assert torch.equal(stream(clip, [500], extractor), log_mel(clip))


# ---- input validation ----------------------------------------------------------------------------


def test_push_rejects_bad_chunks():
    extractor = StreamingLogMel()
    extractor.push(np.zeros(10, dtype=np.float32))
    with pytest.raises(TypeError, match="float64 array of shape \\(4,\\); expected a 1-D float32"):
        extractor.push(np.zeros(4))
    with pytest.raises(TypeError, match="float32 array of shape \\(4, 1\\)"):
        extractor.push(np.zeros((4, 1), dtype=np.float32))
    with pytest.raises(TypeError, match="list"):
        extractor.push([0.0, 0.1])
    bad = np.zeros(8, dtype=np.float32)
    bad[3] = np.inf
    with pytest.raises(ValueError, match="chunk sample 3 \\(stream sample 13\\) is inf"):
        extractor.push(bad)
    assert extractor.samples_received == 10  # a rejected chunk changes nothing
    assert len(extractor.push(np.zeros(0, dtype=np.float32))) == 0
    extractor.flush()
    with pytest.raises(RuntimeError, match="already flushed"):
        extractor.push(np.zeros(4, dtype=np.float32))
    with pytest.raises(RuntimeError, match="already flushed"):
        extractor.flush()


def test_prepare_pcm_converts_dtypes_and_channels():
    int_pcm = np.array([-32768, 0, 16384, 32767], dtype=np.int16)
    assert np.array_equal(prepare_pcm(int_pcm, SAMPLE_RATE), np.array([-1.0, 0.0, 0.5, 32767 / 32768], np.float32))
    doubles = np.array([0.25, -0.5, 1.5])  # out-of-range floats pass unchanged (no peak normalisation)
    converted = prepare_pcm(doubles, SAMPLE_RATE)
    assert converted.dtype == np.float32 and np.array_equal(converted, doubles.astype(np.float32))
    column = np.array([[0.1], [0.2]], np.float32)
    assert np.array_equal(prepare_pcm(column, SAMPLE_RATE), np.array([0.1, 0.2], np.float32))
    stereo = np.array([[0.2, 0.4], [-1.0, 0.0]], np.float32)
    assert np.allclose(prepare_pcm(stereo, SAMPLE_RATE, downmix=True), [0.3, -0.5])


@pytest.mark.parametrize(
    ("samples", "sample_rate", "error", "message"),
    [
        ([0.0, 0.1], SAMPLE_RATE, TypeError, "audio is a list; expected a numpy array"),
        (np.zeros(4, np.int32), SAMPLE_RATE, TypeError, "dtype int32; expected float32, float64 or int16"),
        (np.zeros(4, np.float16), SAMPLE_RATE, TypeError, "dtype float16"),
        (np.zeros(0, np.float32), SAMPLE_RATE, ValueError, "audio of shape \\(0,\\) is empty"),
        (np.zeros((4, 2), np.float32), SAMPLE_RATE, ValueError, "2 channels .* pass downmix=True"),
        (np.zeros((2, 2, 2), np.float32), SAMPLE_RATE, ValueError, "shape \\(2, 2, 2\\); expected 1-D"),
        (np.array([0.0, 0.1, np.nan], np.float32), SAMPLE_RATE, ValueError, "index 2 is nan"),
        (np.array([[0.0], [0.1], [-np.inf]]), SAMPLE_RATE, ValueError, "index \\(2, 0\\) is -inf"),
        (np.zeros(4, np.float32), 0, ValueError, "sample rate is 0; expected a positive integer"),
        (np.zeros(4, np.float32), 16000.0, ValueError, "sample rate is 16000.0"),
    ],
)
def test_prepare_pcm_rejects_bad_input(samples, sample_rate, error, message):
    with pytest.raises(error, match=message):
        prepare_pcm(samples, sample_rate)


@pytest.mark.parametrize(
    ("sample_rate", "num_samples"), [(8_000, 8_000), (44_100, 44_100), (48_000, 4_801), (22_050, 3_333)]
)
def test_prepare_pcm_resamples_to_16_khz(sample_rate, num_samples):
    t = np.arange(num_samples) / sample_rate
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    resampled = prepare_pcm(tone, sample_rate)
    assert resampled.dtype == np.float32
    assert len(resampled) == math.ceil(num_samples * SAMPLE_RATE / sample_rate)
    # Away from the edges (filter transients) the tone is the same 1 kHz tone sampled at 16 kHz.
    expected = 0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(len(resampled)) / SAMPLE_RATE)
    assert np.abs(resampled - expected)[100:-100].max() < 2e-3


# ---- state round-trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 150, 201, 777, 1_337, 5_000])
def test_restored_state_continues_bit_identically(cut):
    clip = speech_like_noise(7_003, seed=6)
    clip[2000:2500] *= 40.0
    clip[4000:] *= 1e-5
    first = StreamingLogMel()
    head = push_all(first, clip[:cut], [97])
    saved = pickle.loads(pickle.dumps(first.state()))  # plain data: survives serialisation
    assert isinstance(saved, LogMelState) and len(saved.pending) < 400  # bounded tail
    resumed = StreamingLogMel.from_state(saved)
    assert dataclasses.asdict(resumed.state()).keys() == dataclasses.asdict(saved).keys()
    tail = stream(clip[cut:], [211], resumed)
    assert torch.equal(torch.cat([head, tail]), log_mel(clip))


def test_from_state_rejects_inconsistent_pending_samples():
    extractor = StreamingLogMel()
    extractor.push(speech_like_noise(1_000, seed=7))
    state = extractor.state()
    with pytest.raises(ValueError, match="expected float32 of shape \\(240,\\) for 1000 samples and 6 frames"):
        StreamingLogMel.from_state(dataclasses.replace(state, pending=state.pending[1:]))
    with pytest.raises(ValueError, match="dtype float64"):
        StreamingLogMel.from_state(dataclasses.replace(state, pending=state.pending.astype(np.float64)))


def test_many_streams_in_stacked_calls_equal_each_stream_alone():
    """`extract_log_mel` over many streams (ragged chunks, some flushing, more groups than one call takes) gives
    every stream exactly the frames its own push/flush sequence gives."""
    rng = np.random.default_rng(7)
    streams = 40
    clips = [speech_like_noise(int(rng.integers(200, 40_000)), seed) for seed in range(streams)]
    alone = [StreamingLogMel() for _ in range(streams)]
    together = [StreamingLogMel() for _ in range(streams)]
    expected, got = [[] for _ in range(streams)], [[] for _ in range(streams)]
    positions = [0] * streams
    for round_index in range(4):
        last = round_index == 3
        chunks = []
        for i, clip in enumerate(clips):
            size = len(clip) - positions[i] if last else int(rng.integers(0, len(clip) // 2))
            chunks.append(clip[positions[i] : positions[i] + size])
            positions[i] += size
        flush = [last and i % 3 != 0 for i in range(streams)]
        for i in range(streams):
            expected[i].append(alone[i].push(chunks[i]))
            if flush[i]:
                expected[i].append(alone[i].flush())
        got_now = extract_log_mel(together, chunks, flush)
        for i in range(streams):
            got[i].append(got_now[i])
    assert sum(len(clip) for clip in clips) // (HOP_LENGTH * 8) > GROUPS_PER_CALL  # several stacked calls
    for i in range(streams):
        assert torch.equal(torch.cat(got[i]), torch.cat(expected[i])), f"stream {i}"
        assert together[i].state().frames_emitted == alone[i].state().frames_emitted


def test_many_streams_reject_an_extractor_twice():
    extractor = StreamingLogMel()
    with pytest.raises(ValueError, match="appears twice"):
        extract_log_mel([extractor, extractor], [np.zeros(10, np.float32)] * 2, [False, False])
