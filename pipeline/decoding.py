"""Greedy decode controls as composable logit filters, and lossless draft verification.

The causal runtime (reference causal_runtime.md §3.2) picks each token by

    suppress ids -> repetition penalty -> no-repeat n-gram ban -> argmax,   stop at <|im_end|>

where the penalty and the ban look only at the ids generated so far in this hypothesis (its
*history*), never at the prompt. Because a pick is a deterministic function of (logits, history),
a draft can be verified against one parallel forward pass and the result is token-identical to
sequential greedy decoding.

`DecodeControls.pick` applies the chain to a batch of logit rows, each with its own history, so
sequential decoding (one row), draft verification (one row per draft prefix) and batched decoding
across streams (one row per stream) are the same code. The filters are tensor operations over the
whole batch (histories as one padded id tensor, the penalty a gather/scatter, the n-gram ban a
windowed comparison), so a thousand streams cost a few kernels, not a thousand Python loops; the
host reads the picks (or the verdicts of every draft) once per call.

Every pick comes with its log-probability under the model's own distribution (the raw logits, before the
filters): what per-word confidence is made of.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipeline.device_io import read_to_host, to_device
from pipeline.prompt import SpecialTokenIds
from pipeline.ragged import padded, ragged_rows


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


@dataclass(frozen=True)
class TokenHistories:
    """The ids each row of a batch continues, as one padded tensor.

    ids [N, width]: row i's first lengths[i] ids are its history, the rest the sink id (one past the vocabulary);
    lengths [N]. A filter reads and writes scores [N, vocab + 1], whose last column is the sink's: what padding
    gathers or scatters lands there and changes no real id.
    """

    ids: Tensor
    lengths: Tensor

    @classmethod
    def of(cls, histories: Sequence[Sequence[int]], vocab: int, device: torch.device) -> "TokenHistories":
        """From host lists (one host-to-device copy of the padded ids and one of the lengths)."""
        return cls(
            ids=to_device(padded(histories, fill=vocab), device),
            lengths=to_device([len(history) for history in histories], device),
        )


class LogitFilter:
    """Edits a batch of scores [N, vocab + 1] (the last column a sink) in place; row i sees history row i."""

    def apply(self, scores: Tensor, histories: TokenHistories) -> None:
        raise NotImplementedError


class SuppressTokens(LogitFilter):
    """Forbid fixed ids everywhere."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = list(token_ids)
        self._on_device: dict[torch.device, Tensor] = {}

    def apply(self, scores: Tensor, histories: TokenHistories) -> None:
        if scores.device not in self._on_device:
            self._on_device[scores.device] = to_device(self.token_ids, scores.device)
        scores.index_fill_(1, self._on_device[scores.device], float("-inf"))


class RepetitionPenalty(LogitFilter):
    """transformers' rule on every id already in the history: positive logits / p, negative x p.

    One gather and one scatter over the whole batch: an id repeated in a history gathers the same score and writes
    the same penalised one back, so repeats are applied once."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def apply(self, scores: Tensor, histories: TokenHistories) -> None:
        seen = scores.gather(1, histories.ids)
        scores.scatter_(1, histories.ids, torch.where(seen > 0, seen / self.penalty, seen * self.penalty))


class NoRepeatNGram(LogitFilter):
    """Forbid any id that would complete an n-gram already present in the history.

    In tensors: every window of size - 1 ids of each history that has a follower inside the history is compared
    with the history's last size - 1 ids; the followers of the matching windows are banned (one scatter)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def apply(self, scores: Tensor, histories: TokenHistories) -> None:
        ids, lengths = histories.ids, histories.lengths
        context = self.size - 1
        starts = ids.shape[1] - context  # window s = ids[:, s : s + context], followed by ids[:, s + context]
        if starts <= 0:
            return
        positions = torch.arange(max(starts, context), device=ids.device)
        matches = positions[None, :starts] < (lengths - context)[:, None]  # the follower is part of the history
        if context:
            last = (lengths[:, None] - context + positions[None, :context]).clamp(min=0)
            windows = ids.unfold(1, context, 1)[:, :starts]  # [N, starts, context]
            matches &= (windows == ids.gather(1, last)[:, None, :]).all(dim=-1)
        sink = scores.shape[1] - 1
        scores.scatter_(1, torch.where(matches, ids[:, context:], sink), float("-inf"))


class Pick(NamedTuple):
    token: int
    logprob: float  # log-probability of `token` under the raw logits


class Verdict(NamedTuple):
    """A draft checked against one parallel pass: draft[:accepted] is what greedy decoding produces, then
    `next_token` (possibly a stop); `logprobs` are those accepted + 1 tokens' log-probabilities."""

    accepted: int
    next_token: int
    logprobs: tuple[float, ...]


def pick_logprobs(logits: Tensor, picks: Tensor) -> Tensor:
    """Log-probability [N] of each row's pick under the raw logits [N, vocab] (fp32, on their device)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, picks[:, None])[:, 0]


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

    def pick(self, logits: Tensor, histories: Sequence[Sequence[int]]) -> list[Pick]:
        """Greedy pick per row of logits [N, vocab], row i continuing histories[i], with its log-probability
        (one read of both: token ids are exact in fp32)."""
        if logits.dim() != 2 or logits.shape[0] != len(histories):
            raise ValueError(f"logits have shape {tuple(logits.shape)}; expected [{len(histories)}, vocab]")
        picks = self.pick_ids(logits, TokenHistories.of(histories, logits.shape[1], logits.device))
        read = read_to_host(torch.stack([picks.float(), pick_logprobs(logits, picks)], dim=1))
        return [Pick(int(token), logprob) for token, logprob in read]

    def pick_ids(self, logits: Tensor, histories: TokenHistories) -> Tensor:
        """The greedy picks [N] of logits [N, vocab] continuing `histories`, on the logits' device (no sync)."""
        rows, vocab = logits.shape
        scores = logits.new_empty(rows, vocab + 1, dtype=torch.float32)
        scores[:, :vocab] = logits
        scores[:, vocab] = 0.0
        for logit_filter in self.filters:
            logit_filter.apply(scores, histories)
        return scores[:, :vocab].argmax(dim=-1)

    def is_stop(self, token: int) -> bool:
        return token in self._stop_ids

    def continues(self, hypothesis_length: int, token: int) -> bool:
        """Whether greedy decoding appends `token` to a hypothesis of this length, rather than
        ending it (a stop token, or the max_new_tokens budget is spent). Stops are not appended."""
        return not self.is_stop(token) and hypothesis_length < self.options.max_new_tokens

    def trim_draft(self, draft: Sequence[int], history_length: int = 0) -> list[int]:
        """A previous hypothesis as a draft: cut at its first stop, capped to the remaining budget."""
        budget = self.options.max_new_tokens - history_length
        stops = self._stop_ids
        for index, token in enumerate(draft[:budget]):
            if token in stops:
                return list(draft[:index])
        return list(draft[:budget])

    def verify_drafts(
        self,
        logits: Tensor,
        drafts: Sequence[Sequence[int]],
        histories: Sequence[Sequence[int]] | None = None,
    ) -> list[Verdict]:
        """Check the drafts of many streams against the logits of one parallel pass over them: one filter
        chain and one argmax over all their rows.

        logits [sum(len(draft) + 1), vocab]: each draft's rows in turn; row j of a draft predicts the token
        after history + draft[:j]. Returns per draft (accepted, next_token): draft[:accepted] is what greedy
        decoding would have produced, and next_token is its pick after that prefix (the correction at the
        first disagreement, or the continuation after a fully accepted draft; possibly a stop). A stop pick
        ends acceptance even where the draft agrees, since decoding ends there.
        """
        histories = histories if histories is not None else [()] * len(drafts)
        if not drafts:
            return []
        expected_rows = sum(len(draft) + 1 for draft in drafts)
        if logits.shape[0] != expected_rows:
            raise ValueError(f"logits have {logits.shape[0]} rows; expected sum(len(draft) + 1) = {expected_rows}")
        for draft, history in zip(drafts, histories):
            if len(history) + len(draft) > self.options.max_new_tokens:
                raise ValueError(
                    f"history ({len(history)}) + draft ({len(draft)}) exceed max_new_tokens "
                    f"({self.options.max_new_tokens}); trim the draft with trim_draft"
                )
        verdicts = read_to_host(self._verify_on_device(logits, drafts, histories))
        return [
            Verdict(int(accepted), int(token), tuple(logprobs[: int(accepted) + 1]))
            for accepted, token, *logprobs in verdicts
        ]

    def _verify_on_device(
        self, logits: Tensor, drafts: Sequence[Sequence[int]], histories: Sequence[Sequence[int]]
    ) -> Tensor:
        """[streams, 2 + longest draft + 1] fp32: per draft (accepted, next_token, each row's pick's log-probability),
        from one filter chain and argmax over every row.

        Row j of draft b continues history b + draft b[:j]: its history is row b of the padded [history + draft]
        ids, cut at len(history b) + j. The picks are laid out as [streams, longest draft + 1] and compared with the
        drafts (padded with -1, which no pick equals): the first disagreement, or a stop pick, ends acceptance."""
        device, vocab = logits.device, logits.shape[1]
        counts = [len(draft) + 1 for draft in drafts]
        rows, steps = ragged_rows(counts)
        stream_of_row, step_of_row = to_device(rows, device), to_device(steps, device)
        sequences = TokenHistories.of([[*history, *draft] for history, draft in zip(histories, drafts)], vocab, device)
        lengths = to_device(np.asarray([len(history) for history in histories], dtype=np.int64)[rows] + steps, device)
        in_prefix = torch.arange(sequences.ids.shape[1], device=device)[None, :] < lengths[:, None]
        prefixes = TokenHistories(torch.where(in_prefix, sequences.ids.index_select(0, stream_of_row), vocab), lengths)
        picks = self.pick_ids(logits, prefixes)
        width = max(counts)
        laid_out = picks.new_full((len(drafts), width), -1).index_put_((stream_of_row, step_of_row), picks)
        padded_drafts = to_device(padded(drafts, fill=-1, width=width), device)
        stops = torch.isin(laid_out, to_device(sorted(self._stop_ids), device))
        ends = (laid_out != padded_drafts) | stops
        accepted = ends.to(torch.int8).argmax(dim=1)  # the first end: at the latest the row after the draft
        logprobs = logits.new_zeros(len(drafts), width, dtype=torch.float32)
        logprobs.index_put_((stream_of_row, step_of_row), pick_logprobs(logits, picks))
        verdicts = torch.stack([accepted, laid_out.gather(1, accepted[:, None])[:, 0]], dim=1)
        return torch.cat([verdicts.float(), logprobs], dim=1)

