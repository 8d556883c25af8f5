"""Checkpoint resolution and loading in the official layout, the causal tower overlay, the tiny generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli import main as cli_main
from pipeline.checkpoint import (
    CheckpointError,
    default_dtype,
    load_model,
    read_official_state,
    resolve_tower_file,
)
from pipeline.config import QWEN3_ASR_0_6B, Qwen3ASRConfig
from pipeline.decoder import TextDecoder
from pipeline.encoder import AudioTower
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR, make_tiny_checkpoint

OFFICIAL_FILES = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json"}


def test_tiny_checkpoint_has_official_layout(tiny_checkpoint: Path) -> None:
    assert OFFICIAL_FILES <= {p.name for p in tiny_checkpoint.iterdir()}
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    assert raw["model_type"] == "qwen3_asr"
    audio = raw["thinker_config"]["audio_config"]
    assert (audio["num_mel_bins"], audio["n_window"], audio["n_window_infer"]) == (128, 50, 800)
    state = load_file(tiny_checkpoint / "model.safetensors")
    assert all(k.startswith(("thinker.audio_tower.", "thinker.model.")) or k == "thinker.lm_head.weight" for k in state)
    assert "thinker.audio_tower.conv2d1.weight" in state and "thinker.model.layers.1.self_attn.q_norm.weight" in state
    assert state["thinker.model.embed_tokens.weight"].dtype == torch.bfloat16


def test_tiny_checkpoint_token_ids_come_from_its_tokenizer(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint, tower=None)
    tok = model.tokenizer
    ids = tok.convert_tokens_to_ids(["<|audio_pad|>", "<|audio_start|>", "<|audio_end|>", "<asr_text>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    assert (model.config.audio_token_id, model.config.audio_start_token_id, model.config.audio_end_token_id) == tuple(ids[:3])
    assert len(set(ids)) == 7 and max(ids) < model.config.text.vocab_size
    # <asr_text> is an added token that survives skipping special tokens, as in the official tokenizer.
    text_ids = tok("language English<asr_text>hello world")["input_ids"]
    assert ids[3] in text_ids
    assert tok.decode(text_ids + [ids[5]], skip_special_tokens=True) == "language English<asr_text>hello world"


def test_tiny_checkpoint_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = make_tiny_checkpoint(tmp_path / "a", seed=3, with_tower=True)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3, with_tower=True)
    c = make_tiny_checkpoint(tmp_path / "c", seed=4)
    for name in ("model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / TOWER_OVERLAY_DIR / "model.safetensors").read_bytes() == (b / TOWER_OVERLAY_DIR / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_overlay_replaces_the_whole_tower(tiny_checkpoint: Path) -> None:
    base = load_model(tiny_checkpoint, tower=None)
    causal = load_model(tiny_checkpoint, tower=tiny_checkpoint / TOWER_OVERLAY_DIR)
    overlay = load_file(tiny_checkpoint / TOWER_OVERLAY_DIR / "model.safetensors")
    for name, value in causal.audio_tower.state_dict().items():
        assert torch.equal(value, overlay[name]), name
    assert not torch.equal(base.audio_tower.conv_out.weight, causal.audio_tower.conv_out.weight)
    for name, value in base.text_decoder.state_dict().items():
        assert torch.equal(value, causal.text_decoder.state_dict()[name]), name
    assert causal.tower_source.endswith("model.safetensors") and base.tower_source is None


def test_overlay_accepts_file_directory_and_prefixed_keys(tiny_checkpoint: Path, tmp_path: Path) -> None:
    overlay_file = tiny_checkpoint / TOWER_OVERLAY_DIR / "model.safetensors"
    assert resolve_tower_file(overlay_file) == overlay_file
    assert resolve_tower_file(overlay_file.parent) == overlay_file
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"audio_tower.{k}": v for k, v in load_file(overlay_file).items()}, prefixed)
    model = load_model(tiny_checkpoint, tower=prefixed)
    assert torch.equal(model.audio_tower.proj2.weight, load_file(overlay_file)["proj2.weight"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("layers.0.fc1.weight"), "missing keys ['layers.0.fc1.weight']"),
        (lambda sd: sd.__setitem__("layers.9.fc1.weight", torch.zeros(1)), "unexpected keys ['layers.9.fc1.weight']"),
        (lambda sd: sd.__setitem__("proj2.weight", torch.zeros(128, 64)), "proj2.weight: overlay (128, 64) vs base (64, 64)"),
    ],
)
def test_overlay_that_does_not_fit_fails_with_key_names(tiny_checkpoint: Path, tmp_path: Path, edit, message: str) -> None:
    state = load_file(tiny_checkpoint / TOWER_OVERLAY_DIR / "model.safetensors")
    edit(state)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(CheckpointError, match="does not fit the base model") as err:
        load_model(tiny_checkpoint, tower=bad)
    assert message in str(err.value)


def test_small_tower_under_wider_base_fails_fast(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The 0.6B tower under the 1.7B base: widths differ, so the overlay is refused (WLK issue #360)."""
    wide = make_tiny_checkpoint(tmp_path / "wide", seed=1)
    raw = json.loads((wide / "config.json").read_text())
    raw["thinker_config"]["audio_config"]["d_model"] = 96
    raw["thinker_config"]["audio_config"]["encoder_attention_heads"] = 6
    (wide / "config.json").write_text(json.dumps(raw))
    config = Qwen3ASRConfig.from_official_dict(raw)
    state = load_file(wide / "model.safetensors")
    tower = {k: v for k, v in AudioTower(config.audio).state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith("thinker.audio_tower.")}
    state |= {f"thinker.audio_tower.{k}": torch.zeros_like(v) for k, v in tower.items()}
    save_file(state, wide / "model.safetensors")
    with pytest.raises(CheckpointError, match="another model size"):
        load_model(wide, tower=tiny_checkpoint / TOWER_OVERLAY_DIR)


def test_sharded_checkpoint_loads_like_single_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for path in tiny_checkpoint.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            (sharded / path.name).write_bytes(path.read_bytes())
    state = load_file(tiny_checkpoint / "model.safetensors")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, sharded / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    restored = read_official_state(sharded)
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    assert torch.equal(load_model(sharded, tower=None).text_decoder.embed_tokens.weight, load_model(tiny_checkpoint, tower=None).text_decoder.embed_tokens.weight)


def test_unreachable_hub_id_fails_with_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"Qwen/Qwen3-ASR-0\.6B.*HF_HUB_OFFLINE.*--model DIR"):
        load_model("Qwen/Qwen3-ASR-0.6B", tower=None)
    with pytest.raises(CheckpointError, match=r"qfuxa/qwen3-asr-0\.6b-streaming.*--tower DIR"):
        resolve_tower_file("qfuxa/qwen3-asr-0.6b-streaming")
    with pytest.raises(CheckpointError, match="neither an existing path nor a Hugging Face repo id"):
        load_model(tmp_path / "no" / "such" / "dir", tower=None)


def test_front_end_mismatch_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    other = make_tiny_checkpoint(tmp_path / "other", seed=0)
    raw = json.loads((other / "preprocessor_config.json").read_text())
    raw["feature_size"] = 80
    (other / "preprocessor_config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="feature_size=80"):
        load_model(other, tower=None)


def test_dtype_defaults_and_override(tiny_checkpoint: Path) -> None:
    assert default_dtype("cpu") == torch.float32 and default_dtype("cuda") == torch.bfloat16
    model = load_model(tiny_checkpoint, tower=None, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.audio_tower.conv2d1.weight.dtype == torch.bfloat16
    assert load_model(tiny_checkpoint, tower=None).dtype == torch.float32


def test_full_size_geometry_matches_the_published_key_census() -> None:
    """612 tensors and 938,008,576 elements in Qwen/Qwen3-ASR-0.6B (reference §2, §7)."""
    with torch.device("meta"):
        tower = AudioTower(QWEN3_ASR_0_6B.audio).state_dict()
        decoder = TextDecoder(QWEN3_ASR_0_6B.text).state_dict()
    lm_head = QWEN3_ASR_0_6B.text.vocab_size * QWEN3_ASR_0_6B.text.hidden_size
    assert len(tower) == 301 and len(decoder) + 1 == 311
    assert sum(v.numel() for v in tower.values()) == 186_376_192
    assert sum(v.numel() for v in (*tower.values(), *decoder.values())) + lm_head == 938_008_576


def test_cli_make_tiny_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["make-tiny-checkpoint", str(tmp_path / "cli"), "--seed", "5", "--with-tower"]) == 0
    assert OFFICIAL_FILES <= {p.name for p in (tmp_path / "cli").iterdir()}
    assert (tmp_path / "cli" / TOWER_OVERLAY_DIR / "model.safetensors").is_file()
    assert "written to" in capsys.readouterr().out


def test_dtype_names() -> None:
    from pipeline.checkpoint import dtype_from_name

    assert dtype_from_name("auto") is None and dtype_from_name(None) is None
    assert dtype_from_name("bfloat16") is torch.bfloat16 and dtype_from_name("float32") is torch.float32
    with pytest.raises(ValueError, match="dtype 'fp8'; expected 'auto' or one of"):
        dtype_from_name("fp8")
