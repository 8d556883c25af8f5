"""The Qwen3-ASR prompt for causal streaming, and parsing of what the model writes back.

Prompt (reference qwen3_asr_model.md §6, causal_runtime.md §3.1):

    <|im_start|>system\\n{context}<|im_end|>\\n<|im_start|>user\\n<|audio_start|>
        + one <|audio_pad|> per audio step (its embedding is replaced by the audio vector)
    <|audio_end|><|im_end|>\\n<|im_start|>assistant\\n[language {Language}<asr_text>]

The rolling decoder keeps [head + audio] cached and re-forwards the tail every update, so the
prompt is built as two id lists around the audio. Special-token ids always come from the tokenizer.

Output: without a forced language the model writes `language English<asr_text>text`, or
`language None<asr_text>` for silence; with a forced language it writes only the text.
"""

from __future__ import annotations

import math

import re
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields

from transformers import PreTrainedTokenizerBase

#: The 30 languages of Qwen3-ASR (`support_languages` in config.json), keyed by ISO 639 code.
#: Filipino has no two-letter code; Whisper-style `tl` (Tagalog) is accepted for it too.
LANGUAGES_BY_CODE: dict[str, str] = {
    "zh": "Chinese",
    "en": "English",
    "yue": "Cantonese",
    "ar": "Arabic",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "pt": "Portuguese",
    "id": "Indonesian",
    "it": "Italian",
    "ko": "Korean",
    "ru": "Russian",
    "th": "Thai",
    "vi": "Vietnamese",
    "ja": "Japanese",
    "tr": "Turkish",
    "hi": "Hindi",
    "ms": "Malay",
    "nl": "Dutch",
    "sv": "Swedish",
    "da": "Danish",
    "fi": "Finnish",
    "pl": "Polish",
    "cs": "Czech",
    "fil": "Filipino",
    "tl": "Filipino",
    "fa": "Persian",
    "el": "Greek",
    "ro": "Romanian",
    "hu": "Hungarian",
    "mk": "Macedonian",
}
SUPPORTED_LANGUAGES: tuple[str, ...] = tuple(dict.fromkeys(LANGUAGES_BY_CODE.values()))
_LANGUAGES_BY_LOWER_NAME = {name.lower(): name for name in SUPPORTED_LANGUAGES}

ASR_TEXT_TAG = "<asr_text>"
_LANGUAGE_PREFIX = "language "


def canonical_language(language: str) -> str:
    """'en', 'EN', 'english', 'English' -> 'English'; anything else is an error."""
    key = language.strip().lower()
    if key in _LANGUAGES_BY_LOWER_NAME:
        return _LANGUAGES_BY_LOWER_NAME[key]
    if key in LANGUAGES_BY_CODE:
        return LANGUAGES_BY_CODE[key]
    raise ValueError(
        f"unknown language {language!r}; expected one of the Qwen3-ASR languages "
        f"{', '.join(SUPPORTED_LANGUAGES)} or their ISO 639 codes ({', '.join(LANGUAGES_BY_CODE)})"
    )


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the tokens that structure the prompt and the output, looked up in the tokenizer."""

    end_of_text: int
    im_start: int
    im_end: int
    audio_start: int
    audio_end: int
    audio_pad: int
    asr_text: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "SpecialTokenIds":
        return cls(**{field.name: token_id(tokenizer, _TOKEN_TEXT[field.name]) for field in fields(cls)})


_TOKEN_TEXT = {
    "end_of_text": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "audio_start": "<|audio_start|>",
    "audio_end": "<|audio_end|>",
    "audio_pad": "<|audio_pad|>",
    "asr_text": ASR_TEXT_TAG,
}


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of one whole token, or an error if the tokenizer lacks it.

    `convert_tokens_to_ids` maps an unknown token to the unk id (for Qwen2, `<|endoftext|>`), so
    the id is checked by mapping it back.
    """
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or tokenizer.convert_ids_to_tokens(found) != token:
        raise ValueError(f"tokenizer has no token {token!r}; expected a Qwen3-ASR (Qwen2 BPE) tokenizer")
    return found


@dataclass(frozen=True)
class CausalPrompt:
    """The prompt split around its audio: head_ids + audio_steps x <|audio_pad|> + tail_ids."""

    head_ids: tuple[int, ...]
    tail_ids: tuple[int, ...]
    special: SpecialTokenIds
    language: str | None  # canonical name when forced, None to let the model detect it
    context_tokens: int = 0  # of head_ids, the biasing context's

    def input_ids(self, audio_steps: int) -> list[int]:
        """The whole prompt, with one placeholder per audio step."""
        return [*self.head_ids, *[self.special.audio_pad] * audio_steps, *self.tail_ids]


#: The most tokens of biasing context (names, terms) a stream's prompt may carry, about 40 words; every decoder
#: slot keeps room for them, so that a context can change mid-stream.
MAX_CONTEXT_TOKENS = 64


def build_causal_prompt(
    tokenizer: PreTrainedTokenizerBase, language: str | None = None, context: str = ""
) -> CausalPrompt:
    """Head and tail ids of the causal-mode prompt.

    language: force the output language (name or ISO code), or None to let the model write
    `language X<asr_text>` itself. context: free biasing text for the system turn.
    """
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    context_ids = _text_ids(tokenizer, context)
    if len(context_ids) > MAX_CONTEXT_TOKENS:
        raise ValueError(
            f"context is {len(context_ids)} tokens ({len(context)} characters); expected at most {MAX_CONTEXT_TOKENS}"
        )
    reserved = set(tokenizer.all_special_ids) | set(vars(special).values())
    if reserved.intersection(context_ids):
        raise ValueError(f"context {context!r} contains special tokens; expected plain text")
    # Text pieces sit between special tokens, so encoding them one by one gives the same ids as
    # encoding the whole prompt string (added tokens split the text before BPE runs).
    head = [
        special.im_start,
        *_text_ids(tokenizer, "system\n"),
        *context_ids,
        special.im_end,
        *_text_ids(tokenizer, "\n"),
        special.im_start,
        *_text_ids(tokenizer, "user\n"),
        special.audio_start,
    ]
    tail = [
        special.audio_end,
        special.im_end,
        *_text_ids(tokenizer, "\n"),
        special.im_start,
        *_text_ids(tokenizer, "assistant\n"),
    ]
    forced = None if language is None else canonical_language(language)
    if forced is not None:
        tail += [*_text_ids(tokenizer, f"{_LANGUAGE_PREFIX}{forced}"), special.asr_text]
    return CausalPrompt(
        head_ids=tuple(head), tail_ids=tuple(tail), special=special, language=forced, context_tokens=len(context_ids)
    )


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def parse_asr_output(raw: str, forced_language: str | None = None) -> tuple[str, str]:
    """(language, text) from the model's decoded output, as the reference `parse_asr_output`.

    `language English<asr_text>Hi.` -> ('English', 'Hi.'); `language None<asr_text>` -> ('', '');
    with a forced language the whole output is text; without the tag, ('', whole output).
    Degenerate repetition loops are collapsed first (`detect_and_fix_repetitions`).
    """
    text = detect_and_fix_repetitions(raw.strip())
    if forced_language is not None:
        return canonical_language(forced_language), text
    meta, tag, body = text.partition(ASR_TEXT_TAG)
    if not tag:
        return "", text
    return _language_from_meta(meta), body.strip()


def decode_text(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int]) -> str:
    """The text of `token_ids`, special tokens skipped, spaces as the tokenizer's decoder leaves them."""
    if tokenizer.is_fast:  # its Rust decoder directly: the Python wrapper first type-checks every id (every update
        # of every stream decodes its hypothesis)
        return tokenizer.backend_tokenizer.decode(list(token_ids), skip_special_tokens=True)
    return tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def decode_asr_output(
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[int],
    special: SpecialTokenIds,
    forced_language: str | None = None,
) -> tuple[str, str]:
    """(language, text) from generated ids (stop token excluded).

    Splits on the `<asr_text>` id rather than its text, so it does not matter whether the tokenizer
    flags `<asr_text>` as special (which `skip_special_tokens` would erase).
    """
    if forced_language is not None or special.asr_text not in token_ids:
        return parse_asr_output(decode_text(tokenizer, token_ids), forced_language)
    split = list(token_ids).index(special.asr_text)
    meta = decode_text(tokenizer, token_ids[:split])
    text = detect_and_fix_repetitions(decode_text(tokenizer, token_ids[split + 1 :]).strip())
    return _language_from_meta(meta), text


#: Byte-level BPE marks a token that starts with a space (Ġ), a newline (Ċ) or a tab (ĉ).
_WORD_START_MARKS = "\u0120\u010a\u0109"

#: What a token is to word grouping (`word_confidences`), one byte per id of a vocabulary (`_token_kinds`).
_SKIPPED, _WHITESPACE, _WORD_START, _WORD_CONTINUES = range(4)

#: Per tokenizer: (its length when built, its ids' kinds). Built once: every update of every stream groups its
#: tokens, and asking the tokenizer for pieces and special ids each time cost more than the grouping.
_TOKEN_KINDS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, bytes]] = weakref.WeakKeyDictionary()


def _token_kinds(tokenizer: PreTrainedTokenizerBase) -> bytes:
    """Each id's kind: skipped (special, or no piece), whitespace alone, starting a word, or continuing one."""
    size = len(tokenizer)
    cached = _TOKEN_KINDS.get(tokenizer)
    if cached is not None and cached[0] == size:
        return cached[1]
    special_ids = set(tokenizer.all_special_ids)
    kinds = bytearray(size)
    for token_id, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if not piece or token_id in special_ids:  # (an empty piece neither starts nor continues a word)
            kinds[token_id] = _SKIPPED
            continue
        text = piece.lstrip(_WORD_START_MARKS)
        kinds[token_id] = _WHITESPACE if not text else _WORD_START if text != piece else _WORD_CONTINUES
    _TOKEN_KINDS[tokenizer] = (size, bytes(kinds))
    return _TOKEN_KINDS[tokenizer][1]


def word_confidences(
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    special: SpecialTokenIds,
    words: Sequence[str],
) -> tuple[float | None, ...]:
    """Per word of the decoded text `words`: the geometric-mean probability of its tokens (exp of their mean
    log-probability). Tokens are grouped into words where a token starts with whitespace; the `language X
    <asr_text>` preamble, if the model wrote one, is left out. Where the grouping does not give exactly `words`
    (the repetition fixer changed the text), every word's confidence is None: unknown, never guessed."""
    if len(logprobs) != len(token_ids):
        return (None,) * len(words)
    start = list(token_ids).index(special.asr_text) + 1 if special.asr_text in token_ids else 0
    kinds = _token_kinds(tokenizer)
    sums: list[float] = []  # per word: its tokens' summed log-probability, and their count
    counts: list[int] = []
    new_word = True
    for index in range(start, len(token_ids)):
        token_id = token_ids[index]
        kind = kinds[token_id] if 0 <= token_id < len(kinds) else _SKIPPED
        if kind == _SKIPPED:
            continue
        if kind == _WHITESPACE:  # the next token starts a word
            new_word = True
        elif new_word or kind == _WORD_START:
            sums.append(logprobs[index])
            counts.append(1)
            new_word = False
        else:
            sums[-1] += logprobs[index]
            counts[-1] += 1
    if len(sums) != len(words):
        return (None,) * len(words)
    return tuple(math.exp(total / count) for total, count in zip(sums, counts))


def _language_from_meta(meta: str) -> str:
    """The value of the first `language X` line, capitalised ('language english' -> 'English');
    '' for `language None` (silence) or when there is no such line."""
    if "language none" in meta.lower():
        return ""
    for line in meta.splitlines():
        line = line.strip()
        if line.lower().startswith(_LANGUAGE_PREFIX):
            value = line[len(_LANGUAGE_PREFIX) :].strip()
            return value[:1].upper() + value[1:].lower()
    return ""


def detect_and_fix_repetitions(text: str, threshold: int = 20, max_pattern_length: int = 20) -> str:
    """Collapse degenerate decode loops, as the reference runtime does before parsing.

    1. A character repeated more than `threshold` times in a row becomes one character.
    2. Scanning left to right, the first place where a pattern of 1..`max_pattern_length` characters
       (shortest first) repeats at least `threshold` times back to back is collapsed to one copy;
       scanning resumes after the run. As in the reference, a run is only looked for at positions
       that leave at least 2 x `threshold` characters to the end of the (remaining) text.
    Normal text is never that repetitive, so it passes unchanged.
    """
    if not _may_repeat(text, threshold, max_pattern_length):
        return text
    return _collapse_pattern_runs(_collapse_char_runs(text, threshold), threshold, max_pattern_length)


def _may_repeat(text: str, threshold: int, max_pattern_length: int) -> bool:
    """Whether some pattern of <= max_pattern_length characters may repeat `threshold` times back to back.

    Every transcript update of every stream runs the fixer, and normal text should not pay for its scans. Each
    test is a necessary condition, cheapest first: every character of such a run occurs >= threshold times in
    the text; the run is a stretch of >= threshold such characters; and the search finds it (in C).
    """
    frequent = "".join(char for char, count in Counter(text).items() if count >= threshold)
    if not frequent or re.search(f"[{re.escape(frequent)}]{{{threshold}}}", text) is None:
        return False
    return re.search(f"(.{{1,{max_pattern_length}}}?)\\1{{{threshold - 1}}}", text, flags=re.DOTALL) is not None


def _collapse_char_runs(text: str, threshold: int) -> str:
    pieces = []
    start = 0
    while start < len(text):
        end = start + 1
        while end < len(text) and text[end] == text[start]:
            end += 1
        pieces.append(text[start] if end - start > threshold else text[start:end])
        start = end
    return "".join(pieces)


def _collapse_pattern_runs(text: str, threshold: int, max_pattern_length: int) -> str:
    pieces = []
    index = 0
    while index <= len(text) - 2 * threshold:
        length = _repeated_pattern_length(text, index, threshold, max_pattern_length)
        if length is None:
            pieces.append(text[index])
            index += 1
            continue
        pattern = text[index : index + length]
        run_end = index + threshold * length
        while text[run_end : run_end + length] == pattern:
            run_end += length
        pieces.append(pattern)
        # Continue on the rest as a new text: the reference recurses on it.
        text, index = text[run_end:], 0
    pieces.append(text[index:])
    return "".join(pieces)


def _repeated_pattern_length(text: str, index: int, threshold: int, max_pattern_length: int) -> int | None:
    """Shortest pattern length whose pattern repeats `threshold` times from `index`, if any."""
    for length in range(1, max_pattern_length + 1):
        if index + length * threshold > len(text):
            return None
        pattern = text[index : index + length]
        if text[index : index + length * threshold] == pattern * threshold:
            return length
    return None
