"""Write a tiny random Qwen3-ASR checkpoint in exactly the official layout (tests and demos).

Real weights cannot be downloaded everywhere this project is built, so tests load a model that differs from
`Qwen/Qwen3-ASR-0.6B` only in widths, depths and vocabulary: same file names, same `thinker.*` keys, same
`config.json` schema, a byte-level BPE tokenizer holding the Qwen special tokens, the real mel and conv geometry
(128 mels, three stride-2 convs, n_window 50, n_window_infer 800), and optionally a causal tower overlay file.
Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from pipeline.checkpoint import DECODER_PREFIX, LM_HEAD_KEY, TOWER_PREFIX
from pipeline.config import QWEN3_ASR_0_6B, TINY_AUDIO, TINY_TEXT, Qwen3ASRConfig
from pipeline.decoder import TextDecoder
from pipeline.encoder import AudioTower

# In the official vocabulary order; `<asr_text>` is an added token that is *not* special, so that it survives
# `decode(skip_special_tokens=True)` and the output parser can split on it. The vision tokens are never used by
# ASR, but the official tokenizer_config names them, and a name pointing at a token the vocabulary lacks would
# make transformers append it at load time (ids would then differ between the files and the loaded tokenizer).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
]
NON_SPECIAL_ADDED_TOKENS = ["<asr_text>"]
# The named multimodal tokens of the official tokenizer_config.json, written both at top level and under
# `extra_special_tokens`: the published runtime (qwen-asr) and transformers' Qwen3ASRProcessor read
# `tokenizer.audio_token`, which transformers sets only from these entries.
NAMED_SPECIAL_TOKENS = {
    "audio_token": "<|audio_pad|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
PROCESSOR_CLASS = "Qwen3ASRProcessor"
TOWER_OVERLAY_DIR = "causal_tower"
BPE_VOCAB_SIZE = 700

_CORPUS = """\
Streaming speech recognition turns live audio into text while the speaker is still talking.
The quick brown fox jumps over the lazy dog. Hello world! How are you today? Thank you very much.
language English language None system user assistant. One two three four five six seven eight nine ten.
We encode each block of audio once, keep a cache of keys and values, and decode the transcript again.
Captioning, voice agents and call analytics need low latency, low cost, and never losing a word.
"""


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, with_tower: bool = False) -> Path:
    """Write the tiny model to `out_dir` (created); with `with_tower`, also `out_dir/causal_tower/`."""
    return make_random_checkpoint(out_dir, seed=seed, with_tower=with_tower)


def make_random_checkpoint(
    out_dir: str | Path, seed: int = 0, with_tower: bool = False, full_size: bool = False
) -> Path:
    """A random checkpoint in the official layout: the tiny geometry, or (`full_size`) Qwen3-ASR-0.6B's, whose
    compute does not depend on the weights' values (serving benchmarks load it like the published one)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS}
    if len(tokenizer) > TINY_TEXT.vocab_size:
        raise AssertionError(f"tiny tokenizer has {len(tokenizer)} tokens; TINY_TEXT.vocab_size is {TINY_TEXT.vocab_size}")
    config = Qwen3ASRConfig(
        audio=QWEN3_ASR_0_6B.audio if full_size else TINY_AUDIO,
        # Tiny: every output id decodes to text, so demos print words rather than unknown ids. Full size: the
        # whole vocabulary (the output matrix is the largest weight; the tokenizer's ids fit in it).
        text=QWEN3_ASR_0_6B.text if full_size else replace(TINY_TEXT, vocab_size=len(tokenizer)),
        audio_token_id=ids["<|audio_pad|>"],
        audio_start_token_id=ids["<|audio_start|>"],
        audio_end_token_id=ids["<|audio_end|>"],
    )
    _save_tokenizer(tokenizer, out)
    official = config.to_official_dict()
    official["thinker_config"]["text_config"].update(
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
    )
    (out / "config.json").write_text(json.dumps(official, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}, indent=2)
    )

    generator = torch.Generator().manual_seed(seed)
    tower = _random_state(AudioTower(config.audio), generator)
    decoder = _random_state(TextDecoder(config.text), generator)
    state = {TOWER_PREFIX + k: v for k, v in tower.items()} | {DECODER_PREFIX + k: v for k, v in decoder.items()}
    state[LM_HEAD_KEY] = decoder["embed_tokens.weight"].clone()
    # The official base checkpoint is stored in bf16.
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, out / "model.safetensors")

    if with_tower:
        # The causal tower is a fine-tune of the offline one: same keys, perturbed values, stored in fp32.
        overlay = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in tower.items()}
        (out / TOWER_OVERLAY_DIR).mkdir(exist_ok=True)
        save_file(overlay, out / TOWER_OVERLAY_DIR / "model.safetensors")
    return out


def _random_state(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random values scaled like a trained network (so activations stay O(1) through a few layers)."""
    state = {}
    for name, tensor in sorted(module.state_dict().items()):
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("norm.weight") or name.endswith(("layer_norm.weight", "ln_post.weight")):
            state[name] = 1.0 + 0.1 * noise
        elif tensor.dim() == 1:
            state[name] = 0.05 * noise
        else:
            fan_in = tensor[0].numel()
            state[name] = noise / fan_in**0.5
    return state


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokenizer, trained on a fixed corpus, plus the Qwen special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=merges)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[1:]], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED_TOKENS])
    return tokenizer


def _save_tokenizer(tokenizer: Qwen2Tokenizer, out: Path) -> None:
    """The official repo ships vocab.json + merges.txt + tokenizer_config.json (added tokens listed there), with the
    same keys as the official tokenizer_config.json."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    merges = backend["model"]["merges"]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merge_lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n")
    added = {
        str(token["id"]): {
            "content": token["content"],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token["special"],
        }
        for token in backend["added_tokens"]
    }
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "processor_class": PROCESSOR_CLASS,
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        **NAMED_SPECIAL_TOKENS,
        "extra_special_tokens": dict(NAMED_SPECIAL_TOKENS),
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 131072,
    }
    # Sorted like `save_pretrained` writes it.
    text = json.dumps(tokenizer_config, indent=2, sort_keys=True, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(text)


def _preprocessor_config() -> dict:
    return {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "Qwen3ASRProcessor",
        "feature_size": 128,
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_fft": 400,
        "chunk_length": 30,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "dither": 0.0,
        "return_attention_mask": True,
    }
