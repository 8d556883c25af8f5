"""bf16 on the CPU is deterministic: the same model on the same input gives the same tokens, run after run.

It once was not, on CPUs with AVX512-BF16 / AMX: oneDNN's bf16 convolution computes an output width of 1 (the
causal conv stem's third conv, whose 8-frame pieces arrive 2 time columns wide) from uninitialised memory where
the left zero padding should be, so the audio embeddings, and from them the tokens, changed from call to call
(sometimes to inf/NaN). `pipeline.encoder.stem_conv` folds that conv into an equivalent 1-D conv.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.checkpoint import ASRModel, load_model
from pipeline.encoder import STEP_FRAMES, stem_conv
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR

SAMPLE_RATE = 16000
OPTIONS = SessionOptions.from_dict({"decode": {"max_new_tokens": 12}, "segment": {"segment_max_steps": 60, "segment_punct_min_steps": 40}})


def _scribble_heap() -> list[torch.Tensor]:
    """Fill freshly freed memory with huge values, so that a kernel reading uninitialised memory shows it."""
    return [torch.full((4096 + 64 * i,), 1e30) for i in range(4)]


def _reference_conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The same conv in fp32 (bf16 weights and inputs widened exactly), without oneDNN's bf16 kernels."""
    return F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), stride=conv.stride, padding=conv.padding)


@pytest.mark.parametrize("channels", [16, 480])
@pytest.mark.parametrize("width", [1, 2, 4])
def test_bf16_stem_conv_is_right_and_repeatable(channels: int, width: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1).to(torch.bfloat16)
    x = F.gelu(torch.randn(6, channels, 32, width)).to(torch.bfloat16)
    expected = _reference_conv(conv, x)
    first = stem_conv(conv, x)
    assert first.shape == expected.shape
    for _ in range(5):
        scribbled = _scribble_heap()
        again = stem_conv(conv, x)
        del scribbled
        assert torch.equal(again, first)
    torch.testing.assert_close(first.float(), expected, atol=0.02, rtol=0.02)


def test_stem_conv_leaves_fp32_alone() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)
    x = torch.randn(6, 16, 32, 2)
    assert torch.equal(stem_conv(conv, x), conv(x))


@pytest.fixture(scope="module")
def bf16_model(tiny_checkpoint: Path) -> ASRModel:
    return load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR, dtype=torch.bfloat16)


def test_bf16_conv_stem_matches_fp32(bf16_model: ASRModel) -> None:
    """The causal conv stem (8-frame pieces: widths 8 -> 4 -> 2 -> 1) in bf16 is the fp32 stem, rounded."""
    tower = bf16_model.audio_tower
    torch.manual_seed(1)
    mel = torch.randn(24 * STEP_FRAMES, tower.config.num_mel_bins)
    steps = tower.conv_steps(mel)
    for _ in range(3):
        scribbled = _scribble_heap()
        assert torch.equal(tower.conv_steps(mel), steps)
        del scribbled
    fp32_tower = type(tower)(tower.config)
    fp32_tower.load_state_dict({name: value.float() for name, value in tower.state_dict().items()})
    expected = fp32_tower.conv_steps(mel)
    assert torch.isfinite(steps.float()).all()
    torch.testing.assert_close(steps.float(), expected, atol=0.05, rtol=0.05)


def _audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = 0.05 + 0.2 * (1 + np.sin(2 * np.pi * 0.3 * t)) / 2
    return (envelope * rng.standard_normal(t.size)).astype(np.float32)


def _events(model: ASRModel, audio: np.ndarray) -> list[tuple]:
    session = StreamingSession(model, OPTIONS)
    events = session.push_audio(audio) + session.finish()
    return [(e.kind, e.tentative, e.transcript, e.segment_index, e.audio_sec) for e in events]


def test_bf16_session_is_deterministic(bf16_model: ASRModel) -> None:
    audio = _audio(6.0, seed=100)
    first = _events(bf16_model, audio)
    assert first
    for _ in range(2):
        assert _events(bf16_model, audio) == first
