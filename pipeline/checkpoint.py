"""Find and load Qwen3-ASR checkpoints in the official layout, plus the causal tower overlay.

Two artefacts make a streaming model:

* the **base model** (`Qwen/Qwen3-ASR-0.6B`): `config.json` (`model_type: qwen3_asr` with `thinker_config`),
  `model.safetensors` or shards with `model.safetensors.index.json` (keys `thinker.audio_tower.*`,
  `thinker.model.*`, `thinker.lm_head.weight`), the Qwen2 tokenizer files and `preprocessor_config.json`;
* the **causal tower overlay** (`qfuxa/qwen3-asr-0.6b-streaming`): one `.safetensors` file holding the *whole*
  audio-tower state dict with tower-relative keys, which replaces the base tower.

Either may be a local path or a Hugging Face repo id. Weights cannot be fetched without network access, so an
unreachable id fails with one message that names it and says how to pass a local path instead.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline.config import Qwen3ASRConfig
from pipeline.decoder import TextDecoder
from pipeline.encoder import AudioTower

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "Qwen/Qwen3-ASR-0.6B"
DEFAULT_TOWER_ID = "qfuxa/qwen3-asr-0.6b-streaming"

TOWER_PREFIX = "thinker.audio_tower."
DECODER_PREFIX = "thinker.model."
LM_HEAD_KEY = "thinker.lm_head.weight"

# The front-end this runtime implements (pipeline/features.py); a checkpoint asking for another is refused.
EXPECTED_FEATURES = {"feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400}

_MODEL_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "*.txt", "*.json"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreachable, or does not have the expected layout."""


@dataclass
class ASRModel:
    """Everything the streaming runtime needs from a checkpoint, on one device in one dtype."""

    config: Qwen3ASRConfig
    audio_tower: AudioTower
    text_decoder: TextDecoder
    tokenizer: PreTrainedTokenizerBase
    model_source: str
    tower_source: str | None  # None: the base (offline) tower is in use

    @property
    def device(self) -> torch.device:
        return self.text_decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_decoder.embed_tokens.weight.dtype


#: Working dtypes by name (the `--dtype` choices besides "auto").
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (what the model was trained and published in); fp32 elsewhere, the exact and portable choice.

    On CPUs with native bf16 arithmetic (AVX512-BF16, AMX) bf16 is much faster (2.3-2.7x engine throughput measured
    in BENCHMARKS.md) and worth choosing explicitly; without it, bf16 matmuls are emulated and slow.
    """
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """A `--dtype` value as a torch dtype; "auto" or None: the device's default (None)."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}; expected 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id, downloaded (or read from the HF cache)."""
    return _resolve(model, allow_patterns=_MODEL_FILES, what="model", flag="--model")


def resolve_tower_file(tower: str | os.PathLike) -> Path:
    """The overlay `.safetensors`: a file, a directory holding exactly one, or a Hugging Face repo id."""
    path = Path(tower)
    if not path.exists():
        path = _resolve(tower, allow_patterns=["*.safetensors"], what="causal tower", flag="--tower")
    if path.is_file():
        return path
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        raise CheckpointError(
            f"tower directory {path} holds {len(candidates)} .safetensors files; expected exactly one "
            "(the causal tower state dict)"
        )
    return candidates[0]


def _resolve(ref: str | os.PathLike, allow_patterns: list[str], what: str, flag: str) -> Path:
    path = Path(ref)
    if path.exists():
        return path
    ref = str(ref)
    if ref.count("/") != 1 or ref.startswith((".", "/")):
        raise CheckpointError(f"{what} {ref!r} is neither an existing path nor a Hugging Face repo id (owner/name)")
    try:
        return Path(snapshot_download(ref, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        raise CheckpointError(
            f"cannot load {what} {ref!r}: {why} and it is not in the local HF cache. Download it on a machine "
            f"with network access (`hf download {ref} --local-dir DIR`) and pass the local path "
            f"with {flag} DIR"
        ) from err
    except HfHubHTTPError as err:
        raise CheckpointError(f"cannot load {what} {ref!r} from the Hugging Face Hub: {err}") from err


def read_config(model_dir: Path) -> Qwen3ASRConfig:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; expected an official Qwen3-ASR checkpoint directory")
    return Qwen3ASRConfig.from_official_dict(json.loads(config_path.read_text()))


def check_preprocessor(model_dir: Path) -> None:
    """Refuse a checkpoint whose front-end differs from the log-mel this runtime computes."""
    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        log.warning("%s has no preprocessor_config.json; assuming the Whisper 128-mel front-end", model_dir)
        return
    raw = json.loads(path.read_text())
    for key, expected in EXPECTED_FEATURES.items():
        if key in raw and raw[key] != expected:
            raise CheckpointError(f"{path}: {key}={raw[key]!r}; this runtime computes {key}={expected}")


def read_official_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded (`model.safetensors.index.json`) checkpoint."""
    index_path = model_dir / "model.safetensors.index.json"
    single_path = model_dir / "model.safetensors"
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_state = load_file(model_dir / shard)
            wanted = {k for k, v in weight_map.items() if v == shard}
            if wanted - shard_state.keys():
                raise CheckpointError(f"shard {shard} lacks keys the index assigns to it: {sorted(wanted - shard_state.keys())[:5]}")
            state.update({k: shard_state[k] for k in wanted})
        return state
    if single_path.is_file():
        return load_file(single_path)
    raise CheckpointError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")


def split_official_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tower state, decoder state), both relative to their module; checks the tied output matrix."""
    tower = {k[len(TOWER_PREFIX):]: v for k, v in state.items() if k.startswith(TOWER_PREFIX)}
    decoder = {k[len(DECODER_PREFIX):]: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
    unknown = sorted(k for k in state if not k.startswith((TOWER_PREFIX, DECODER_PREFIX)) and k != LM_HEAD_KEY)
    if unknown:
        raise CheckpointError(f"unexpected keys in checkpoint (not thinker.audio_tower/model/lm_head): {unknown[:8]}")
    lm_head = state.get(LM_HEAD_KEY)
    embed = decoder.get("embed_tokens.weight")
    # The reference loaders tie lm_head to embed_tokens, so embed_tokens is the effective output matrix.
    if lm_head is not None and embed is not None and not torch.equal(lm_head, embed):
        log.warning("thinker.lm_head.weight differs from embed_tokens; using embed_tokens (tied), as the reference does")
    return tower, decoder


def load_tower_overlay(path: Path, base_tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The causal tower state dict, checked key by key and shape by shape against the base tower it replaces."""
    overlay = load_file(path)
    # Tolerate a module prefix: exports of the tower sometimes keep `audio_tower.` on every key.
    for prefix in ("thinker.audio_tower.", "audio_encoder.audio_tower.", "audio_tower."):
        if overlay and all(k.startswith(prefix) for k in overlay):
            overlay = {k[len(prefix):]: v for k, v in overlay.items()}
            break
    problems = _state_mismatch(overlay, base_tower, ("overlay", "base"))
    if problems:
        if "mis-shaped" in problems:
            problems += " (a tower made for another model size, e.g. the 0.6B causal tower under a 1.7B base?)"
        raise CheckpointError(f"causal tower {path} does not fit the base model: {problems}")
    return overlay


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


def load_model(
    model: str | os.PathLike = DEFAULT_MODEL_ID,
    tower: str | os.PathLike | None = DEFAULT_TOWER_ID,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> ASRModel:
    """Load the base model and (unless `tower` is None) replace its audio tower with the causal overlay."""
    model_dir = resolve_model_dir(model)
    config = read_config(model_dir)
    check_preprocessor(model_dir)
    tower_state, decoder_state = split_official_state(read_official_state(model_dir))
    tower_source = None
    if tower is not None:
        tower_path = resolve_tower_file(tower)
        tower_state = load_tower_overlay(tower_path, tower_state)
        tower_source = str(tower_path)
    dtype = dtype or default_dtype(device)

    audio_tower = AudioTower(config.audio)
    _load_strict(audio_tower, tower_state, "audio tower")
    text_decoder = TextDecoder(config.text)
    _load_strict(text_decoder, decoder_state, "text decoder")
    log.info("loaded %s (tower: %s) on %s as %s", model_dir, tower_source or "base", device, dtype)
    return ASRModel(
        config=config,
        audio_tower=audio_tower.to(device=device, dtype=dtype).eval(),
        text_decoder=text_decoder.to(device=device, dtype=dtype).eval(),
        tokenizer=load_tokenizer(model_dir),
        model_source=str(model_dir),
        tower_source=tower_source,
    )


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    problems = _state_mismatch(state, module.state_dict(), ("checkpoint", "config"))
    if problems:
        raise CheckpointError(f"{what} weights do not match config.json: {problems}")
    module.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)


def _state_mismatch(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], names: tuple[str, str]
) -> str:
    """'' when `state` has exactly the keys and shapes of `expected`; otherwise what differs, key by key."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = sorted(
        f"{k}: {names[0]} {tuple(state[k].shape)} vs {names[1]} {tuple(expected[k].shape)}"
        for k in expected.keys() & state.keys()
        if expected[k].shape != state[k].shape
    )
    problems = []
    for label, items, shown in (("missing keys", missing, 8), ("unexpected keys", unexpected, 8), ("mis-shaped tensors", misshaped, 4)):
        if items:
            problems.append(f"{label} {items[:shown]}{' …' if len(items) > shown else ''}")
    return "; ".join(problems)
