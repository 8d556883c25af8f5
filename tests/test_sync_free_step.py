"""On a GPU, a stage call synchronises with the device only where it reads its results: once per verification
chunk and once per sequential decode step (`pipeline.device_io.read_to_host`). Everything else runs under
`torch.cuda.set_sync_debug_mode("error")`, which raises on any other blocking copy or synchronisation. Without a
GPU only the read counts are checked, on the CPU (`scripts/gpu_check.sh` runs the CUDA cases)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_model
from pipeline.decoding import DecodeControls, DecodeOptions
from pipeline.device_io import host_reads
from pipeline.prompt import build_causal_prompt
from pipeline.stages import DecodeRequest, DecoderSettings, DecoderStage, EncodeRequest, EncoderStage, answer_of
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR

SLOTS = 4
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="sync debug mode needs a GPU")


@pytest.fixture(scope="module")
def models(tiny_checkpoint: Path) -> dict:
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    return {d: load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR, device=d) for d in devices}


class _SyncErrors:
    """Inside, on a GPU: any synchronisation but `read_to_host` raises."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def __enter__(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    "device, decode_step",
    [("cpu", "dynamic"), ("cpu", "static")] + [pytest.param("cuda", kind, marks=needs_cuda) for kind in
                                               ("dynamic", "static", "cuda_graph")],
)
def test_decoder_update_reads_once_per_verification_and_per_sequential_step(
    models: dict, device: str, decode_step: str
) -> None:
    model = models[device]
    prompt = build_causal_prompt(model.tokenizer, language="English")
    controls = DecodeControls(replace(DecodeOptions.causal(prompt.special), max_new_tokens=24))
    settings = DecoderSettings(prompt, controls)
    stage = DecoderStage(model.text_decoder, SLOTS, capacity=len(prompt.head_ids) + 200 + 64, decode_step=decode_step)
    generator = torch.Generator().manual_seed(0)
    hidden = model.config.text.hidden_size
    done = dict.fromkeys(range(SLOTS), 0)

    def update(streams: list[int], steps: list[int]) -> list:
        requests = [
            DecodeRequest(f"s{s}", 0, done[s], (0.1 * torch.randn(n, hidden, generator=generator)).to(device), settings)
            for s, n in zip(streams, steps)
        ]
        for s in streams:
            done[s] += 1
        return [answer_of(result) for result in stage.update(requests)]

    update(list(range(SLOTS)), [24, 24, 12, 24])  # every slot taken; kernels and graphs warmed up
    for streams, steps in (([0, 2, 3], [24, 5, 24]), ([3, 1], [24, 0]), ([0, 1, 2, 3], [24, 24, 24, 12])):
        before = host_reads()
        with _SyncErrors(device):
            results = update(streams, steps)  # scattered slots, unequal lengths
        sequential = max(result.stats.decode_steps for result in results)
        assert host_reads() - before == 1 + sequential  # one verification read, one per sequential step


@needs_cuda
def test_encoder_blocks_on_scattered_slots_never_synchronise(models: dict) -> None:
    model = models["cuda"]
    stage = EncoderStage(model.audio_tower, SLOTS)
    bins = model.config.audio.num_mel_bins
    mel = lambda frames: torch.randn(frames, bins, device="cuda")  # noqa: E731
    stage.encode([EncodeRequest(f"s{s}", 0, 0, mel(192), 192) for s in range(SLOTS)])
    with _SyncErrors("cuda"):
        stage.encode([EncodeRequest("s0", 0, 1, mel(192), 192), EncodeRequest("s2", 0, 1, mel(96), 192)])
        stage.encode([EncodeRequest(f"s{s}", 0, 1 + (s in (0, 2)), mel(192), 192) for s in range(SLOTS)])
