"""Test helper: real (synthetic) speech from `espeak-ng`, with a seeded noise floor, as 16 kHz WAV files.

Tests that need speech-like audio call `speak` (a whole text, as espeak-ng phrases it) or `speak_words`
(word by word, so every word's audio span is known exactly: manifests with word alignments). Each adds
white noise at `noise_dbfs` RMS (-50 dBFS by default) so no sample is digital silence, and writes 16-bit
PCM at 16 kHz.

Without espeak-ng the calling test is skipped with a loud message; under CI (the `CI` environment variable
set, as GitHub Actions and most runners do) it fails instead, because CI installs espeak-ng (`.ci/run`) and
a silent skip there would hide the whole end-to-end evaluation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.features import SAMPLE_RATE, prepare_pcm
from pipeline.scoring import AlignedWord

ESPEAK = "espeak-ng"
# A sample counts as voiced above this magnitude (about -40 dBFS); espeak pads words with true silence.
_VOICED_LEVEL = 0.01
# Pause inserted between words spoken one by one.
_WORD_GAP_SEC = 0.12


@dataclass(frozen=True)
class SpokenAudio:
    path: Path
    text: str
    duration_sec: float
    # Exact word spans for `speak_words`; None for `speak` (espeak-ng does not report word timing).
    word_alignments: tuple[AlignedWord, ...] | None

    def manifest_row(self, relative_to: Path) -> dict:
        """The JSONL manifest line for this file, its audio path relative to the manifest's folder."""
        row: dict = {"audio": str(self.path.relative_to(relative_to)), "text": self.text}
        if self.word_alignments is not None:
            row["word_alignments"] = [
                {"word": word.word, "start": word.start_sec, "end": word.end_sec} for word in self.word_alignments
            ]
        return row


def require_espeak() -> str:
    """The espeak-ng executable; skips the test (fails it under CI) when it is not installed."""
    executable = shutil.which(ESPEAK)
    if executable is not None:
        return executable
    message = (
        f"\n{'!' * 78}\n!!! {ESPEAK} is NOT INSTALLED: the speech-based evaluation tests did NOT run.\n"
        f"!!! Install it (apt-get install espeak-ng) to run them.\n{'!' * 78}"
    )
    if os.environ.get("CI"):
        pytest.fail(message + f"\nCI is set, and CI must install {ESPEAK} (see .ci/run).")
    pytest.skip(message)


def synthesize(text: str) -> np.ndarray:
    """`text` as espeak-ng speaks it: float32 PCM at 16 kHz, no noise added."""
    if not text.strip():
        raise ValueError(f"text is {text!r}; expected words to speak")
    executable = require_espeak()
    with tempfile.TemporaryDirectory() as folder:
        wav = Path(folder) / "speech.wav"
        # "--" keeps a text starting with "-" from being read as an option.
        subprocess.run([executable, "-w", str(wav), "--", text], check=True, capture_output=True)
        samples, rate = sf.read(wav, dtype="float32")
    return prepare_pcm(samples, rate)


def speak(text: str, path: Path, *, seed: int = 0, noise_dbfs: float = -50.0) -> SpokenAudio:
    """Speak `text` into a 16 kHz WAV at `path`, with the noise floor added."""
    return _write(path, text, synthesize(text), None, seed, noise_dbfs)


def speak_words(words: list[str], path: Path, *, seed: int = 0, noise_dbfs: float = -50.0) -> SpokenAudio:
    """Speak `words` one at a time, trimmed to their voiced span and joined by short pauses.

    The returned alignments are the exact span of each word in the file: the reference timestamps a
    forced aligner would give for it.
    """
    gap = np.zeros(round(_WORD_GAP_SEC * SAMPLE_RATE), dtype=np.float32)
    pieces: list[np.ndarray] = [gap]
    alignments: list[AlignedWord] = []
    position = len(gap)
    for word in words:
        voiced = _voiced_span(synthesize(word), word)
        alignments.append(AlignedWord(word, position / SAMPLE_RATE, (position + len(voiced)) / SAMPLE_RATE))
        pieces += [voiced, gap]
        position += len(voiced) + len(gap)
    return _write(path, " ".join(words), np.concatenate(pieces), tuple(alignments), seed, noise_dbfs)


def _voiced_span(samples: np.ndarray, word: str) -> np.ndarray:
    voiced = np.flatnonzero(np.abs(samples) > _VOICED_LEVEL)
    if voiced.size == 0:
        raise ValueError(f"{ESPEAK} produced no audio above {_VOICED_LEVEL} for {word!r}")
    return samples[voiced[0] : voiced[-1] + 1]


def _write(
    path: Path,
    text: str,
    speech: np.ndarray,
    alignments: tuple[AlignedWord, ...] | None,
    seed: int,
    noise_dbfs: float,
) -> SpokenAudio:
    noise = np.random.default_rng(seed).standard_normal(len(speech)) * 10 ** (noise_dbfs / 20)
    mixed = np.clip(speech + noise, -1.0, 1.0).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, mixed, SAMPLE_RATE, subtype="PCM_16")
    return SpokenAudio(path=path, text=text, duration_sec=len(mixed) / SAMPLE_RATE, word_alignments=alignments)
