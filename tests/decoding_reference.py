"""The per-row decode controls that `pipeline.decoding` replaced with batched tensor operations, kept as the
reference its property tests hold it to: plain Python over each row's history, one row at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.decoding import DecodeOptions


def suppress(scores: Tensor, token_ids: Sequence[int]) -> None:
    scores[:, list(token_ids)] = float("-inf")


def repetition_penalty(scores: Tensor, histories: Sequence[Sequence[int]], penalty: float) -> None:
    """transformers' rule on every id already in the row's history: positive logits / p, negative x p."""
    for row, history in enumerate(histories):
        for token in set(history):
            seen = scores[row, token]
            scores[row, token] = seen / penalty if seen > 0 else seen * penalty


def banned_ngram_followers(history: Sequence[int], size: int) -> set[int]:
    """Ids that follow an earlier occurrence of the history's last size - 1 ids."""
    context = size - 1
    if len(history) < context:
        return set()
    prefix = list(history[len(history) - context :])
    return {
        history[start + context]
        for start in range(len(history) - context)
        if list(history[start : start + context]) == prefix
    }


def no_repeat_ngram(scores: Tensor, histories: Sequence[Sequence[int]], size: int) -> None:
    for row, history in enumerate(histories):
        for token in banned_ngram_followers(history, size):
            scores[row, token] = float("-inf")


def reference_pick(options: DecodeOptions, logits: Tensor, histories: Sequence[Sequence[int]]) -> list[int]:
    """suppress -> penalty -> n-gram ban -> argmax, row by row."""
    scores = logits.to(torch.float32, copy=True)
    if options.suppress_token_ids:
        suppress(scores, options.suppress_token_ids)
    if options.repetition_penalty != 1.0:
        repetition_penalty(scores, histories, options.repetition_penalty)
    if options.no_repeat_ngram_size > 0:
        no_repeat_ngram(scores, histories, options.no_repeat_ngram_size)
    return scores.argmax(dim=-1).tolist()


def reference_verify(
    options: DecodeOptions, logits: Tensor, drafts: Sequence[Sequence[int]], histories: Sequence[Sequence[int]]
) -> list[tuple[int, int]]:
    """Each draft prefix as its own history; the longest prefix whose picks agree (and are not stops)."""
    prefixes = [[*history, *draft[:j]] for draft, history in zip(drafts, histories) for j in range(len(draft) + 1)]
    picks = iter(reference_pick(options, logits, prefixes))
    verdicts = []
    for draft in drafts:
        row_picks = [next(picks) for _ in range(len(draft) + 1)]
        accepted = next(
            (j for j, token in enumerate(draft) if row_picks[j] != token or row_picks[j] in options.stop_token_ids),
            len(draft),
        )
        verdicts.append((accepted, row_picks[accepted]))
    return verdicts
