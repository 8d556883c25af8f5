"""The tiny checkpoint's tokenizer files have the official Qwen3-ASR-0.6B keys, so other runtimes load it.

The published runtime (and transformers' own `Qwen3ASRProcessor`) reads `tokenizer.audio_token`,
`audio_bos_token` and `audio_eos_token`, which transformers sets only from the named tokens of
`tokenizer_config.json`; without them loading fails with `Qwen2Tokenizer(Fast) has no attribute audio_token`
(issue 11).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoProcessor, AutoTokenizer

# The named multimodal tokens of the official Qwen/Qwen3-ASR-0.6B tokenizer_config.json, present both at top level
# and under `extra_special_tokens` (issue 11; ../shared/reference/qwen3_asr_model.md has no tokenizer_config
# section yet).
OFFICIAL_NAMED_TOKENS = {
    "audio_token": "<|audio_pad|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
# Every top-level key of the official tokenizer_config.json.
OFFICIAL_TOKENIZER_CONFIG_KEYS = {
    *OFFICIAL_NAMED_TOKENS,
    "extra_special_tokens",
    "processor_class",
    "added_tokens_decoder",
    "additional_special_tokens",
    "bos_token",
    "clean_up_tokenization_spaces",
    "eos_token",
    "errors",
    "model_max_length",
    "pad_token",
    "split_special_tokens",
    "tokenizer_class",
    "unk_token",
}
OFFICIAL_PROCESSOR_CLASS = "Qwen3ASRProcessor"


def _tokenizer_config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "tokenizer_config.json").read_text())


def test_tokenizer_config_has_the_official_keys_and_named_tokens(tiny_checkpoint: Path) -> None:
    config = _tokenizer_config(tiny_checkpoint)
    assert set(config) == OFFICIAL_TOKENIZER_CONFIG_KEYS
    assert {name: config[name] for name in OFFICIAL_NAMED_TOKENS} == OFFICIAL_NAMED_TOKENS
    assert config["extra_special_tokens"] == OFFICIAL_NAMED_TOKENS
    assert config["processor_class"] == OFFICIAL_PROCESSOR_CLASS
    assert config["tokenizer_class"] == "Qwen2Tokenizer"


def test_named_tokens_are_special_tokens_of_the_tiny_vocabulary(tiny_checkpoint: Path) -> None:
    """Each named token is an added special token of the written vocabulary, so loading adds no token and the
    ids in config.json are the ones the loaded tokenizer uses."""
    decoder = _tokenizer_config(tiny_checkpoint)["added_tokens_decoder"]
    added = {entry["content"]: (int(index), entry["special"]) for index, entry in decoder.items()}
    for token in OFFICIAL_NAMED_TOKENS.values():
        assert token in added and added[token][1], token
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model_config = json.loads((tiny_checkpoint / "config.json").read_text())["thinker_config"]
    assert len(tokenizer) == model_config["text_config"]["vocab_size"]
    for token in OFFICIAL_NAMED_TOKENS.values():
        assert tokenizer.convert_tokens_to_ids(token) == added[token][0], token
    assert added["<|audio_pad|>"][0] == model_config["audio_token_id"]
    assert added["<|audio_start|>"][0] == model_config["audio_start_token_id"]
    assert added["<|audio_end|>"][0] == model_config["audio_end_token_id"]


def test_auto_tokenizer_exposes_the_named_tokens(tiny_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    for name, token in OFFICIAL_NAMED_TOKENS.items():
        assert getattr(tokenizer, name) == token, name
        if hasattr(tokenizer, f"{name}_id"):  # transformers >= 5 also exposes the ids
            assert getattr(tokenizer, f"{name}_id") == tokenizer.convert_tokens_to_ids(token), name


def test_transformers_qwen3_asr_processor_loads_the_tiny_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The processor class the files name loads them, and it fails exactly as in issue 11 without the names."""
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert type(processor).__name__ == OFFICIAL_PROCESSOR_CLASS
    audio_token_id = json.loads((tiny_checkpoint / "config.json").read_text())["thinker_config"]["audio_token_id"]
    assert processor.audio_token == "<|audio_pad|>" and processor.audio_token_id == audio_token_id

    stripped = tmp_path / "stripped"
    shutil.copytree(tiny_checkpoint, stripped, ignore=shutil.ignore_patterns("*.safetensors"))
    config = _tokenizer_config(stripped)
    for name in (*OFFICIAL_NAMED_TOKENS, "extra_special_tokens"):
        del config[name]
    (stripped / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(AttributeError, match="audio_token"):
        AutoProcessor.from_pretrained(stripped)

