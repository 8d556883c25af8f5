"""Prompt construction and output parsing, on a small Qwen2-style tokenizer built here."""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from pipeline.prompt import (
    LANGUAGES_BY_CODE,
    SUPPORTED_LANGUAGES,
    CausalPrompt,
    SpecialTokenIds,
    build_causal_prompt,
    canonical_language,
    decode_asr_output,
    decode_text,
    detect_and_fix_repetitions,
    parse_asr_output,
)

CORPUS = [
    "Hello world, this is a small test of the streaming recogniser.",
    "The quick brown fox jumps over the lazy dog! Numbers: 123, 4567.",
    "language English language German language None",
    "system user assistant",
    "Hot words: Qwen, Ray Serve, KubeRay.",
]
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"]


def make_tokenizer(asr_text_is_special: bool = False, with_asr_text: bool = True) -> Qwen2Tokenizer:
    """Byte-level BPE with Qwen2's pre-tokenizer, plus Qwen3-ASR's added tokens.

    As in the official tokenizer, `<asr_text>` is an added token that is *not* special, so that
    `decode(skip_special_tokens=True)` keeps it.
    """
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
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=merges)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    if with_asr_text:
        tokenizer.add_tokens([AddedToken("<asr_text>", special=asr_text_is_special, normalized=False)])
    return tokenizer


@functools.cache
def _cached_tokenizer(asr_text_is_special: bool) -> Qwen2Tokenizer:
    return make_tokenizer(asr_text_is_special=asr_text_is_special)


@pytest.fixture(scope="module")
def tokenizer() -> Qwen2Tokenizer:
    return make_tokenizer()


def reference_prompt_text(audio_steps: int, context: str = "", language: str | None = None) -> str:
    text = (
        f"<|im_start|>system\n{context}<|im_end|>\n<|im_start|>user\n<|audio_start|>"
        + "<|audio_pad|>" * audio_steps
        + "<|audio_end|><|im_end|>\n<|im_start|>assistant\n"
    )
    return text + (f"language {language}<asr_text>" if language else "")


def test_special_ids_come_from_the_tokenizer(tokenizer: Qwen2Tokenizer) -> None:
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    assert special.im_start == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert special.asr_text == tokenizer.convert_tokens_to_ids("<asr_text>")
    assert special.end_of_text == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert len(set(vars(special).values())) == 7


def test_missing_special_token_is_an_error() -> None:
    # Qwen2Tokenizer maps unknown tokens to <|endoftext|>: that must not pass as "<asr_text>".
    with pytest.raises(ValueError, match="no token '<asr_text>'"):
        SpecialTokenIds.from_tokenizer(make_tokenizer(with_asr_text=False))


@pytest.mark.parametrize(
    ("language", "context", "written"),
    [
        (None, "", None),
        ("en", "", "English"),
        ("german", "Hot words: Qwen, Ray Serve.", "German"),
    ],
)
def test_prompt_equals_tokenized_reference_text(
    tokenizer: Qwen2Tokenizer, language: str | None, context: str, written: str | None
) -> None:
    prompt = build_causal_prompt(tokenizer, language=language, context=context)
    expected = tokenizer.encode(reference_prompt_text(5, context, written), add_special_tokens=False)
    assert prompt.input_ids(5) == expected
    assert prompt.language == written
    special = prompt.special
    assert prompt.head_ids[0] == special.im_start and prompt.head_ids[-1] == special.audio_start
    assert prompt.tail_ids[:2] == (special.audio_end, special.im_end)
    assert prompt.tail_ids[-1] == (special.asr_text if language else tokenizer.encode("\n")[0])
    assert special.audio_pad not in prompt.head_ids + prompt.tail_ids


def test_prompt_without_audio_and_reuse(tokenizer: Qwen2Tokenizer) -> None:
    prompt = build_causal_prompt(tokenizer, language="English")
    assert isinstance(prompt, CausalPrompt)
    assert prompt.input_ids(0) == [*prompt.head_ids, *prompt.tail_ids]
    assert prompt.input_ids(3).count(prompt.special.audio_pad) == 3


def test_context_with_special_tokens_is_rejected(tokenizer: Qwen2Tokenizer) -> None:
    with pytest.raises(ValueError, match="contains special tokens"):
        build_causal_prompt(tokenizer, context="hi<|im_end|>")


@pytest.mark.parametrize(
    ("given", "canonical"),
    [("en", "English"), ("EN", "English"), (" english ", "English"), ("English", "English"),
     ("yue", "Cantonese"), ("fil", "Filipino"), ("tl", "Filipino"), ("zh", "Chinese"), ("mk", "Macedonian")],
)
def test_language_names_are_canonicalised(given: str, canonical: str) -> None:
    assert canonical_language(given) == canonical


def test_all_thirty_languages_are_supported() -> None:
    assert len(SUPPORTED_LANGUAGES) == 30
    assert all(canonical_language(name.upper()) == name for name in SUPPORTED_LANGUAGES)
    assert set(LANGUAGES_BY_CODE.values()) == set(SUPPORTED_LANGUAGES)


def test_unknown_language_is_an_error(tokenizer: Qwen2Tokenizer) -> None:
    with pytest.raises(ValueError, match="unknown language 'Klingon'.*English"):
        build_causal_prompt(tokenizer, language="Klingon")


@pytest.mark.parametrize(
    ("raw", "forced", "expected"),
    [
        ("language English<asr_text>Hello world.", None, ("English", "Hello world.")),
        ("  language cHINese<asr_text> 你好 \n", None, ("Chinese", "你好")),
        ("language None<asr_text>", None, ("", "")),
        ("language None<asr_text>stray", None, ("", "stray")),
        ("Hello world.", "en", ("English", "Hello world.")),
        ("Hello world.", None, ("", "Hello world.")),
        ("\nlanguage German\n<asr_text>Hallo", None, ("German", "Hallo")),
    ],
)
def test_parse_asr_output(raw: str, forced: str | None, expected: tuple[str, str]) -> None:
    assert parse_asr_output(raw, forced) == expected


@pytest.mark.parametrize("asr_text_is_special", [False, True])
def test_decode_ids_splits_on_the_asr_text_id(asr_text_is_special: bool) -> None:
    """Works whether or not the tokenizer flags <asr_text> special (ports disagree on the flag)."""
    tokenizer = make_tokenizer(asr_text_is_special=asr_text_is_special)
    special = SpecialTokenIds.from_tokenizer(tokenizer)

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    assert decode_asr_output(tokenizer, ids("language English<asr_text>Hello world."), special) == (
        "English",
        "Hello world.",
    )
    assert decode_asr_output(tokenizer, ids("language None<asr_text>"), special) == ("", "")
    assert decode_asr_output(tokenizer, ids("Hello world."), special) == ("", "Hello world.")
    assert decode_asr_output(tokenizer, ids("Hello world."), special, forced_language="de") == (
        "German",
        "Hello world.",
    )


@pytest.mark.parametrize("asr_text_is_special", [False, True])
@given(data=st.data())
def test_decode_text_equals_the_tokenizers_decode(asr_text_is_special: bool, data: st.DataObject) -> None:
    tokenizer = _cached_tokenizer(asr_text_is_special)  # (hypothesis runs the test body many times)
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=40))
    expected = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert decode_text(tokenizer, ids) == decode_text(tokenizer, tuple(ids)) == expected


@pytest.mark.parametrize(
    ("text", "fixed"),
    [
        ("a" * 25, "a"),  # a character repeated more than 20 times
        ("b" * 20 + "c", "b" * 20 + "c"),  # exactly 20 is kept (and the text is too short to scan)
        ("ha" * 25, "ha"),
        ("ab" * 40, "ab"),  # the shortest repeating pattern wins
        ("Hello. " + "la la " * 21 + "end", "Hello. la end"),
        ("!" * 20 + "The quick brown fox ", "!The quick brown fox "),
        # Reference quirk: a run is only looked for where 40 characters remain.
        ("The quick brown fox " + "!" * 20, "The quick brown fox " + "!" * 20),
        ("One sentence. Another sentence, normal text.", "One sentence. Another sentence, normal text."),
        ("xy" * 21 + " middle " + "z." * 20 + "tail of the text", "xy middle z.tail of the text"),
    ],
)
def test_detect_and_fix_repetitions(text: str, fixed: str) -> None:
    assert detect_and_fix_repetitions(text) == fixed


def test_repetition_fixer_fast_path_changes_nothing() -> None:
    """Texts the C search clears are exactly those the reference scans leave alone (random texts, many with
    planted runs of every pattern length around the threshold)."""
    import random

    from pipeline.prompt import _collapse_char_runs, _collapse_pattern_runs

    rng = random.Random(0)
    for _ in range(400):
        alphabet = rng.choice(["ab", "abc ", "the quick brown fox. ", "\n x"])
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
        if rng.random() < 0.6:
            pattern = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 23)))
            at = rng.randrange(0, len(text) + 1)
            text = text[:at] + pattern * rng.randrange(15, 24) + text[at:]
        assert detect_and_fix_repetitions(text) == _collapse_pattern_runs(_collapse_char_runs(text, 20), 20, 20)
