"""Rolling decoder updates with lossless speculative re-decoding, batched across streams.

Between updates a stream's decoder K/V holds exactly `[prompt head + all audio of the segment]`. An update

1. forwards `[new audio embeddings] + prompt tail + draft` in ONE parallel pass on top of that cache
   (the draft is the previous hypothesis: usually most of it is still right);
2. verifies the draft against that pass's logits with the same decode controls as sequential greedy
   decoding, accepts the longest agreeing prefix and takes the pick at the first disagreement;
3. continues greedy decoding one token at a time from there (streams leave the batch as they stop);
4. crops the cache back to `head + audio`.

Because every pick is a deterministic function of (logits, tokens so far), the hypothesis is token-identical
to greedy decoding from a fresh prefill without a draft (`decode_from_scratch`); only compute is saved.
The tail and draft are re-forwarded every update because the new audio shifts their positions.

All functions take lists of streams, so the single-stream session (a batch of one) and the multi-stream
engine run the same code: one forward per phase for every stream in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from pipeline.decode_step import DecodeStep, DynamicDecodeStep
from pipeline.decoder import DecoderKVCache, TextDecoder, forward_padded
from pipeline.decoding import DecodeControls, Verdict
from pipeline.device_io import to_device
from pipeline.prompt import CausalPrompt
from pipeline.ragged import concat_ranges
from pipeline.row_chunks import consecutive_runs, rows_per_chunk


@dataclass
class RollingDecoderState:
    """One stream's decoder between updates: K/V of `[head + segment audio]` and the last hypothesis."""

    cache: DecoderKVCache
    audio_steps: int = 0
    hypothesis: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.cache.length == 0


@dataclass(frozen=True)
class UpdateStats:
    """What one update cost: the speculation's yield and the positions the decoder saw."""

    draft_tokens: int
    draft_accepted: int
    decode_steps: int  # sequential one-token forwards after the parallel pass
    positions_forwarded: int  # parallel pass + sequential steps


@dataclass(frozen=True)
class _PassInputs:
    """The parallel pass of an update: embeds [streams, longest, hidden] with stream b's first lengths[b] rows
    real, and the flat rows (stream * longest + position) whose hidden states verify the drafts, in stream order."""

    embeds: Tensor
    lengths: list[int]
    verify_rows: Tensor


@dataclass(frozen=True)
class UpdateResult:
    tokens: tuple[int, ...]  # the new hypothesis, without the stop token
    stats: UpdateStats
    logprobs: tuple[float, ...] = ()  # of each token, under the model's raw logits (per-word confidence)


class RollingDecoder:
    """Applies rolling updates for one prompt and one set of decode controls."""

    def __init__(
        self, decoder: TextDecoder, prompt: CausalPrompt, controls: DecodeControls, speculative: bool = True
    ) -> None:
        self.decoder = decoder
        self.prompt = prompt
        self.controls = controls
        self.speculative = speculative
        self.decode_step: DecodeStep = DynamicDecodeStep(decoder)

    def new_state(self) -> RollingDecoderState:
        return RollingDecoderState(cache=DecoderKVCache(len(self.decoder.layers)))

    @property
    def head_length(self) -> int:
        return len(self.prompt.head_ids)

    @torch.inference_mode()
    def update(
        self,
        states: Sequence[RollingDecoderState],
        new_audio: Sequence[Tensor],
        decode_step: DecodeStep | None = None,
    ) -> list[UpdateResult]:
        """Advance every stream by its new audio embeddings ([steps, hidden], steps may be 0).

        `decode_step` runs the sequential greedy steps (default: a dynamic batch; an engine passes its pool's
        static, possibly graph-captured, step)."""
        if len(states) != len(new_audio):
            raise ValueError(f"{len(states)} decoder states but {len(new_audio)} audio deltas")
        drafts = [self.controls.trim_draft(s.hypothesis) if self.speculative else [] for s in states]
        pass_inputs = self._pass_inputs(states, new_audio, drafts)
        caches = [s.cache for s in states]
        hidden = forward_padded(self.decoder, caches, pass_inputs.embeds, pass_inputs.lengths, consume_inputs=True)
        verdicts = self._verify(hidden.flatten(0, 1).index_select(0, pass_inputs.verify_rows), drafts)

        tokens: list[list[int]] = []
        logprobs: list[list[float]] = []
        accepted: list[int] = []
        pending: list[int] = []  # streams whose last token must be forwarded to continue
        for index, (state, audio, draft, verdict) in enumerate(zip(states, new_audio, drafts, verdicts)):
            count, next_token = verdict.accepted, verdict.next_token
            state.audio_steps += audio.shape[0]
            prefix_length = self.head_length + state.audio_steps + len(self.prompt.tail_ids)
            accepted.append(count)
            tokens.append(list(draft[:count]))
            logprobs.append(list(verdict.logprobs[:count]))
            state.cache.crop(prefix_length + count)
            if self.controls.continues(count, next_token):
                tokens[index].append(next_token)
                logprobs[index].append(verdict.logprobs[count])
                if self._has_budget(tokens[index]):
                    pending.append(index)

        steps = self._continue_greedy(states, tokens, logprobs, pending, decode_step or self.decode_step)
        results = []
        for state, draft, count, hypothesis, scores, step_count, forwarded in zip(
            states, drafts, accepted, tokens, logprobs, steps, pass_inputs.lengths
        ):
            state.cache.crop(self.head_length + state.audio_steps)
            state.hypothesis = hypothesis
            stats = UpdateStats(
                draft_tokens=len(draft),
                draft_accepted=count,
                decode_steps=step_count,
                positions_forwarded=forwarded + step_count,
            )
            results.append(UpdateResult(tokens=tuple(hypothesis), stats=stats, logprobs=tuple(scores)))
        return results

    def _verify(self, rows: Tensor, drafts: Sequence[Sequence[int]]) -> list[Verdict]:
        """Verify every stream's draft from its pass rows [sum(len(draft) + 1), hidden] (per stream, its last tail
        position and each draft position, in stream order).

        Logits only for those rows, and one matmul + one filter chain per run of whole streams whose logits fit a
        chunk (`pipeline.row_chunks`; a thousand streams' 31 rows each would be 9 GB of bf16 logits at once at full
        size). The output matrix, the largest weight, is read once per chunk, so a chunk may be as large as it.
        """
        weight = self.decoder.embed_tokens.weight
        # Per row: the logits, the filter chain's fp32 scores, the log-softmax and an fp32 copy of the logits.
        row_bytes = weight.shape[0] * (weight.element_size() + 3 * 4)
        limit = rows_per_chunk(row_bytes, reread_bytes=weight.numel() * weight.element_size())
        verdicts: list[Verdict] = []
        first_row = 0
        for run in consecutive_runs([len(draft) + 1 for draft in drafts], limit):
            total = sum(len(drafts[index]) + 1 for index in run)
            logits = self.decoder.logits(rows[first_row : first_row + total])
            verdicts += self.controls.verify_drafts(logits, drafts[run.start : run.stop])
            first_row += total
        return verdicts

    def _pass_inputs(
        self, states: Sequence[RollingDecoderState], new_audio: Sequence[Tensor], drafts: Sequence[Sequence[int]]
    ) -> _PassInputs:
        """Per stream `[head if its cache is empty] + new audio + tail + draft`, laid out as one padded batch
        with two writes: every token of every stream from one embedding lookup, every stream's audio from one
        concatenation (no per-stream tensor operations)."""
        head, tail = list(self.prompt.head_ids), list(self.prompt.tail_ids)
        lengths = [
            (len(head) if state.is_empty else 0) + audio.shape[0] + len(tail) + len(draft)
            for state, audio, draft in zip(states, new_audio, drafts)
        ]
        width = max(lengths)
        token_ids = [
            token
            for state, draft in zip(states, drafts)
            for token in ((*head, *tail, *draft) if state.is_empty else (*tail, *draft))
        ]
        # Flat rows (stream * width + position) of each stream's spans: head, audio, tail + draft, verified rows.
        starts = np.arange(len(states), dtype=np.int64) * width
        heads = np.array([len(head) if state.is_empty else 0 for state in states], dtype=np.int64)
        audio_ends = starts + heads + np.array([audio.shape[0] for audio in new_audio], dtype=np.int64)
        ends = starts + np.asarray(lengths, dtype=np.int64)
        token_rows = concat_ranges(  # the head, then tail + draft, of each stream in turn
            np.stack([starts, audio_ends], axis=1).ravel(), np.stack([starts + heads, ends], axis=1).ravel()
        )
        audio_rows = concat_ranges(starts + heads, audio_ends)
        verify_rows = concat_ranges(ends - np.array([len(draft) + 1 for draft in drafts], dtype=np.int64), ends)
        weight = self.decoder.embed_tokens.weight
        embeds = weight.new_zeros(len(states) * width, weight.shape[1])
        embeds.index_copy_(0, to_device(token_rows, weight.device), self._embed(token_ids))
        if audio_rows.size:
            embeds.index_copy_(0, to_device(audio_rows, weight.device), torch.cat(list(new_audio)).to(weight.dtype))
        return _PassInputs(embeds.view(len(states), width, -1), lengths, to_device(verify_rows, weight.device))

    def _continue_greedy(
        self,
        states: Sequence[RollingDecoderState],
        tokens: list[list[int]],
        logprobs: list[list[float]],
        pending: list[int],
        decode_step: DecodeStep,
    ) -> list[int]:
        """Sequential greedy steps for the streams in `pending`, batched, appending to their `tokens` and
        `logprobs`; returns steps per stream."""
        steps = [0] * len(states)
        active = list(pending)
        while active:
            logits = decode_step([states[i].cache for i in active], [tokens[i][-1] for i in active])
            picks = self.controls.pick(logits, [tokens[i] for i in active])
            still_active = []
            for i, (token, logprob) in zip(active, picks):
                steps[i] += 1
                if self.controls.continues(len(tokens[i]), token):
                    tokens[i].append(token)
                    logprobs[i].append(logprob)
                    if self._has_budget(tokens[i]):
                        still_active.append(i)
            active = still_active
        return steps

    def _has_budget(self, hypothesis: Sequence[int]) -> bool:
        """Whether another token may follow (no forward pass is spent once max_new_tokens is reached)."""
        return len(hypothesis) < self.controls.options.max_new_tokens

    def _embed(self, ids: Sequence[int]) -> Tensor:
        return self.decoder.embed(to_device(list(ids), self.decoder.embed_tokens.weight.device))


@torch.inference_mode()
def decode_from_scratch(
    decoder: TextDecoder, prompt: CausalPrompt, audio: Tensor, controls: DecodeControls
) -> UpdateResult:
    """Plain greedy decoding after a fresh prefill of `[head + audio + tail]` (no rolling cache, no draft).

    The reference that speculative rolling updates must reproduce token for token, and the decoder of the
    windowed backend (its stats count the prefill as the positions forwarded)."""
    rolling = RollingDecoder(decoder, prompt, controls, speculative=False)
    return rolling.update([rolling.new_state()], [audio])[0]
