"""Audio files in, stream-ready PCM out: what the evaluation harness and the CLI feed to a session.

Files are decoded with `soundfile` (libsndfile: WAV, FLAC, OGG/Vorbis and more), then passed through
`pipeline.features.prepare_pcm`: several channels are averaged, other sample rates are resampled to 16 kHz,
non-finite samples are refused. Whole files are resampled at once (never chunk by chunk), as `prepare_pcm`
requires.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.features import prepare_pcm


class AudioFileError(ValueError):
    """An audio file exists but cannot be decoded into usable PCM; the message names the file."""


def read_audio(path: str | os.PathLike) -> np.ndarray:
    """Decode `path` to 1-D float32 PCM at 16 kHz, mono (channels averaged)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file {path} does not exist")
    if not path.is_file():
        raise AudioFileError(f"audio path {path} is not a file; expected a WAV, FLAC or OGG file")
    try:
        samples, sample_rate = sf.read(path, dtype="float32", always_2d=False)
    except sf.LibsndfileError as error:
        raise AudioFileError(
            f"cannot decode audio file {path}: {error.error_string}; expected a WAV, FLAC or OGG file"
        ) from error
    try:
        return prepare_pcm(samples, sample_rate, downmix=True)
    except ValueError as error:  # empty, or non-finite samples (a float file can hold NaN)
        raise AudioFileError(f"audio file {path}: {error}") from error
