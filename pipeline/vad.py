"""Voice activity detection: the Silero VAD model (v5/v6, 16 kHz), as a small batched module with explicit state.

The `silero-vad` package ships its default model as TorchScript that keeps its recurrent state inside the module.
Here the same network, with the same weights (read from the package's `silero_vad.jit`), is a plain `nn.Module`
whose state (the LSTM's h and c, and the last 64 samples of context) is passed in and out, so that one forward serves many streams and a
stream's detector state travels with its requests and its checkpoints, like the log-mel front-end's.

Every 512 samples (32 ms) of a stream give one speech probability.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch import Tensor, nn

WINDOW_SAMPLES = 512  # one probability per 32 ms window at 16 kHz
CONTEXT_SAMPLES = 64  # each window is read with the last 64 samples of the previous one in front
HIDDEN = 128
WEIGHTS_PACKAGE, WEIGHTS_FILE = "silero_vad.data", "silero_vad.jit"
# Our parameter names -> the shipped TorchScript model's (its 16 kHz network, `_model`).
_SHIPPED_NAMES = {
    "stft_conv.weight": "stft.forward_basis_buffer",
    **{
        f"conv{i + 1}.{kind}": f"encoder.{i}.reparam_conv.{kind}"
        for i in range(4)
        for kind in ("weight", "bias")
    },
    **{f"lstm_cell.{name}": f"decoder.rnn.{name}" for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
    "final_conv.weight": "decoder.decoder.2.weight",
    "final_conv.bias": "decoder.decoder.2.bias",
}


class SileroVAD(nn.Module):
    """STFT by convolution, four convolutions, one LSTM cell, a sigmoid head."""

    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, HIDDEN)
        self.final_conv = nn.Conv1d(HIDDEN, 1, kernel_size=1)

    def forward(self, windows: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`windows` [batch, 64 + 512] (context, then the window); h, c [batch, 128].
        Returns the speech probability [batch] and the new h, c."""
        x = nn.functional.pad(windows, (0, 64), mode="reflect").unsqueeze(1)
        x = self.stft_conv(x)
        magnitude = (x[:, :129] ** 2 + x[:, 129:] ** 2).sqrt()
        x = self.conv1(magnitude).relu()
        x = self.conv2(x).relu()
        x = self.conv3(x).relu()
        x = self.conv4(x).relu().squeeze(-1)
        h, c = self.lstm_cell(x, (h, c))
        probability = self.final_conv(h.relu().unsqueeze(-1)).sigmoid().squeeze(1).mean(dim=1)
        return probability, h, c


def load_silero_vad() -> SileroVAD:
    """The model with the weights of the `silero-vad` package's default model (no download)."""
    try:
        path = resources.files(WEIGHTS_PACKAGE).joinpath(WEIGHTS_FILE)
    except ModuleNotFoundError:
        raise RuntimeError("voice activity detection needs the silero-vad package: pip install silero-vad") from None
    with warnings.catch_warnings():  # TorchScript is deprecated; we only read the weights out of it
        warnings.simplefilter("ignore", DeprecationWarning)
        shipped = torch.jit.load(str(path), map_location="cpu")._model.state_dict()
    model = SileroVAD()
    model.load_state_dict({ours: shipped[theirs] for ours, theirs in _SHIPPED_NAMES.items()})
    return model.eval()


@dataclass
class VadState:
    """One stream's detector state between calls: plain arrays, safe to send or serialise."""

    h: np.ndarray  # [128]
    c: np.ndarray  # [128]
    context: np.ndarray  # [64] the samples before the next window
    pending: np.ndarray  # [< 512] samples not yet in a whole window

    @classmethod
    def initial(cls) -> "VadState":
        zeros = np.zeros(HIDDEN, dtype=np.float32)
        return cls(zeros, zeros.copy(), np.zeros(CONTEXT_SAMPLES, dtype=np.float32), np.zeros(0, dtype=np.float32))


def score_streams(model: SileroVAD, states: list[VadState], pcm: list[np.ndarray]) -> list[tuple[VadState, np.ndarray]]:
    """Push each stream's new PCM through the detector; every whole 512-sample window gets a probability.

    All streams' k-th new windows go through one forward, so a batch of streams costs one forward per window
    of the longest push. Returns each stream's new state and its new probabilities (float32, in window order).
    """
    buffered = [np.concatenate([state.pending, samples.astype(np.float32)]) for state, samples in zip(states, pcm)]
    counts = [samples.size // WINDOW_SAMPLES for samples in buffered]
    probabilities = [np.zeros(count, dtype=np.float32) for count in counts]
    h = torch.from_numpy(np.stack([state.h for state in states])) if states else torch.zeros(0, HIDDEN)
    c = torch.from_numpy(np.stack([state.c for state in states])) if states else torch.zeros(0, HIDDEN)
    context = [state.context for state in states]
    with torch.inference_mode():
        for k in range(max(counts, default=0)):
            rows = [i for i, count in enumerate(counts) if count > k]
            windows = torch.from_numpy(
                np.stack([np.concatenate([context[i], buffered[i][k * WINDOW_SAMPLES : (k + 1) * WINDOW_SAMPLES]]) for i in rows])
            )
            index = torch.tensor(rows)
            speech, h_rows, c_rows = model(windows, h[index], c[index])
            h[index], c[index] = h_rows, c_rows
            for row, i in enumerate(rows):
                probabilities[i][k] = speech[row]
                context[i] = windows[row, -CONTEXT_SAMPLES:].numpy()
    results = []
    for i, state in enumerate(states):
        new_state = VadState(
            h=h[i].numpy().copy(),
            c=c[i].numpy().copy(),
            context=context[i].copy(),
            pending=buffered[i][counts[i] * WINDOW_SAMPLES :].copy(),
        )
        results.append((new_state, probabilities[i]))
    return results
