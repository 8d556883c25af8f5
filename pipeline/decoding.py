"""Greedy decode controls as composable logit filters, and lossless draft verification.

The causal runtime (reference causal_runtime.md §3.2) picks each token by

    suppress ids -> repetition penalty -> no-repeat n-gram ban -> argmax,   stop at <|im_end|>

where the penalty and the ban look only at the ids generated so far in this hypothesis (its
*history*), never at the prompt. Because a pick is a deterministic function of (logits, history),
a draft can be verified against one parallel forward pass and the result is token-identical to
sequential greedy decoding.

`DecodeControls.pick` applies the chain to a batch of logit rows, each with its own history, so
sequential decoding (one row), draft verification (one row per draft prefix) and batched decoding
across streams (one row per stream) are the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.prompt import SpecialTokenIds


@dataclass(frozen=True)
class DecodeOptions:
    suppress_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.15  # 1.0 disables
    no_repeat_ngram_size: int = 3  # 0 disables
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty is {self.repetition_penalty}; expected > 0")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size is {self.no_repeat_ngram_size}; expected >= 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens is {self.max_new_tokens}; expected >= 1")

    @classmethod
    def causal(cls, special: SpecialTokenIds) -> "DecodeOptions":
        """The reference defaults of causal mode: never emit prompt-structure tokens, stop only at
        <|im_end|> (the reference does not stop at <|endoftext|>)."""
        return cls(
            suppress_token_ids=(special.audio_start, special.audio_pad, special.audio_end, special.im_start),
            stop_token_ids=(special.im_end,),
        )


class LogitFilter:
    """Edits a batch of logit rows [N, vocab] in place; row i sees histories[i]."""

    def apply(self, logits: Tensor, histories: Sequence[Sequence[int]]) -> None:
        raise NotImplementedError


class SuppressTokens(LogitFilter):
    """Forbid fixed ids everywhere."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = list(token_ids)

    def apply(self, logits: Tensor, histories: Sequence[Sequence[int]]) -> None:
        logits[:, self.token_ids] = float("-inf")


class RepetitionPenalty(LogitFilter):
    """transformers' rule on every id already in the history: positive logits / p, negative x p."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def apply(self, logits: Tensor, histories: Sequence[Sequence[int]]) -> None:
        rows, ids = _row_id_pairs([set(history) for history in histories], logits.device)
        seen = logits[rows, ids]
        logits[rows, ids] = torch.where(seen > 0, seen / self.penalty, seen * self.penalty)


class NoRepeatNGram(LogitFilter):
    """Forbid any id that would complete an n-gram already present in the history."""

    def __init__(self, size: int) -> None:
        self.size = size

    def banned(self, history: Sequence[int]) -> set[int]:
        """Ids that follow an earlier occurrence of the history's last size - 1 ids."""
        context = self.size - 1
        if len(history) < context:
            return set()
        prefix = list(history[len(history) - context :])
        return {
            history[start + context]
            for start in range(len(history) - context)
            if list(history[start : start + context]) == prefix
        }

    def apply(self, logits: Tensor, histories: Sequence[Sequence[int]]) -> None:
        rows, ids = _row_id_pairs([self.banned(history) for history in histories], logits.device)
        logits[rows, ids] = float("-inf")


def _row_id_pairs(ids_per_row: Sequence[set[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Flatten per-row id sets into (row, id) index tensors, for one gather/scatter per batch."""
    rows = [row for row, ids in enumerate(ids_per_row) for _ in ids]
    ids = [token for row_ids in ids_per_row for token in sorted(row_ids)]
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(ids, dtype=torch.long, device=device)


class DecodeControls:
    """The decode-control chain of one `DecodeOptions`, applied to batches of rows."""

    def __init__(self, options: DecodeOptions) -> None:
        self.options = options
        chain: list[LogitFilter] = []
        if options.suppress_token_ids:
            chain.append(SuppressTokens(options.suppress_token_ids))
        if options.repetition_penalty != 1.0:
            chain.append(RepetitionPenalty(options.repetition_penalty))
        if options.no_repeat_ngram_size > 0:
            chain.append(NoRepeatNGram(options.no_repeat_ngram_size))
        self.filters: tuple[LogitFilter, ...] = tuple(chain)
        self._stop_ids = frozenset(options.stop_token_ids)

    def pick(self, logits: Tensor, histories: Sequence[Sequence[int]]) -> list[int]:
        """Greedy pick per row of logits [N, vocab], row i continuing histories[i]."""
        if logits.dim() != 2 or logits.shape[0] != len(histories):
            raise ValueError(f"logits have shape {tuple(logits.shape)}; expected [{len(histories)}, vocab]")
        scores = logits.to(torch.float32, copy=True)
        for logit_filter in self.filters:
            logit_filter.apply(scores, histories)
        return scores.argmax(dim=-1).tolist()

    def is_stop(self, token: int) -> bool:
        return token in self._stop_ids

    def continues(self, hypothesis_length: int, token: int) -> bool:
        """Whether greedy decoding appends `token` to a hypothesis of this length, rather than
        ending it (a stop token, or the max_new_tokens budget is spent). Stops are not appended."""
        return not self.is_stop(token) and hypothesis_length < self.options.max_new_tokens

    def trim_draft(self, draft: Sequence[int], history_length: int = 0) -> list[int]:
        """A previous hypothesis as a draft: cut at its first stop, capped to the remaining budget."""
        budget = self.options.max_new_tokens - history_length
        for index, token in enumerate(draft[:budget]):
            if self.is_stop(token):
                return list(draft[:index])
        return list(draft[:budget])

    def verify_drafts(
        self,
        logits: Tensor,
        drafts: Sequence[Sequence[int]],
        histories: Sequence[Sequence[int]] | None = None,
    ) -> list[tuple[int, int]]:
        """Check the drafts of many streams against the logits of one parallel pass over them: one filter
        chain and one argmax over all their rows.

        logits [sum(len(draft) + 1), vocab]: each draft's rows in turn; row j of a draft predicts the token
        after history + draft[:j]. Returns per draft (accepted, next_token): draft[:accepted] is what greedy
        decoding would have produced, and next_token is its pick after that prefix (the correction at the
        first disagreement, or the continuation after a fully accepted draft; possibly a stop). A stop pick
        ends acceptance even where the draft agrees, since decoding ends there.
        """
        histories = histories if histories is not None else [()] * len(drafts)
        expected_rows = sum(len(draft) + 1 for draft in drafts)
        if logits.shape[0] != expected_rows:
            raise ValueError(f"logits have {logits.shape[0]} rows; expected sum(len(draft) + 1) = {expected_rows}")
        for draft, history in zip(drafts, histories):
            if len(history) + len(draft) > self.options.max_new_tokens:
                raise ValueError(
                    f"history ({len(history)}) + draft ({len(draft)}) exceed max_new_tokens "
                    f"({self.options.max_new_tokens}); trim the draft with trim_draft"
                )
        prefixes = [[*history, *draft[:j]] for draft, history in zip(drafts, histories) for j in range(len(draft) + 1)]
        picks = iter(self.pick(logits, prefixes))
        return [self._accept(draft, [next(picks) for _ in range(len(draft) + 1)]) for draft in drafts]

    def _accept(self, draft: Sequence[int], picks: Sequence[int]) -> tuple[int, int]:
        """The longest prefix of `draft` that greedy decoding reproduces, and the pick after it."""
        for j, token in enumerate(draft):
            if picks[j] != token or self.is_stop(picks[j]):
                return j, picks[j]
        return len(draft), picks[len(draft)]
