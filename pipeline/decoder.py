"""The Qwen3 text decoder of Qwen3-ASR, and the per-stream K/V cache it runs on.

Model execution and K/V management are kept apart (as in vLLM): `TextDecoder.forward` is a pure
function of (new input embeddings, their positions, the cached K/V, a mask) that returns hidden
states and the K/V of the new positions; `DecoderKVCache` owns one stream's K/V and knows how to grow
and crop; `forward_streams` joins the two for a ragged batch of streams.

Architecture (reference qwen3_asr_model.md §5): pre-norm layers with RMSNorm (computed in fp32),
per-head RMSNorm on q and k *before* RoPE, standard 1-D RoPE in the rotate-half convention over the
full head_dim, grouped-query attention, SwiGLU MLP, a final RMSNorm, and an output matrix tied to
`embed_tokens`. The config's interleaved M-RoPE is exactly 1-D RoPE for ASR, where the three
position streams are equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import TextDecoderConfig
from pipeline.device_io import to_device
from pipeline.ragged import ragged_rows
from pipeline.row_chunks import in_row_chunks, rows_per_forward_chunk, slot_chunks

#: One layer's (key, value), each [batch, kv_heads, positions, head_dim], keys already rotated.
LayerKV = tuple[Tensor, Tensor]
# Given a layer's new keys and values [B, kv_heads, S, d], store them if the caller keeps them, and return every
# key and value the S new positions attend over [B, kv_heads, T, d] (the mask says which of the T are visible).
KVAccess = Callable[[Tensor, Tensor], LayerKV]
# The same, per layer index: how a whole forward reaches its K/V storage.
LayerKVStore = Callable[[int, Tensor, Tensor], LayerKV]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in fp32 so bf16 runs match the reference."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of 1-D RoPE for arbitrary (per-row) positions, in fp32 whatever the model's dtype.

    The inverse frequencies are recomputed per call (64 values) rather than kept in a buffer: `Module.to(bf16)`,
    the CUDA default, would round a floating buffer to bf16 (0.4 % off: half a radian by position 480), while the
    reference keeps them in fp32.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids [B, S] -> (cos, sin), each [B, S, head_dim] in fp32."""
        device = position_ids.device
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        angles = position_ids.float()[..., None] * (1.0 / self.theta**exponents)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, S, head_dim] by the angles of its positions (cos/sin [B, S, head_dim])."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def _fold_query_groups(query: Tensor, kv_heads: int, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Grouped-query attention as plain attention over the kv heads, without repeating K/V.

    query [B, heads, S, d] -> [B, kv_heads, groups * S, d]: query head h reads kv head h // groups (transformers'
    `repeat_kv`), so each kv head's group of query heads becomes extra query rows. mask [B, S, T] -> [B, 1,
    groups * S, T] to match.
    """
    batch, heads, length, head_dim = query.shape
    groups = heads // kv_heads
    folded = query.reshape(batch, kv_heads, groups * length, head_dim)
    visible = mask[:, None, None].expand(batch, 1, groups, length, mask.shape[-1])
    return folded, visible.reshape(batch, 1, groups * length, mask.shape[-1])


def eager_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor) -> Tensor:
    """Grouped-query attention with an explicit fp32 softmax.

    query [B, heads, S, d]; key/value [B, kv_heads, T, d]; mask [B, S, T] bool, True = may attend.
    """
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * length, head_dim)  # see `_fold_query_groups`
    scores = torch.matmul(grouped.float(), key.float().transpose(-1, -2))
    scores.mul_(head_dim**-0.5)
    # The mask broadcast over kv heads and query groups, in place: the scores are the step's largest tensor.
    scores.view(batch, kv_heads, heads // kv_heads, length, -1).masked_fill_(~mask[:, None, None], float("-inf"))
    attended = torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)
    return attended.reshape(query.shape)


def sdpa_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor) -> Tensor:
    """The same attention through PyTorch's fused kernel (same argument conventions).

    The groups are folded into query rows rather than passed as `enable_gqa`: with a boolean mask, SDPA's
    memory-efficient kernel does not take GQA and the call would fall back to the math kernel, which repeats K/V
    and materialises fp32 scores.
    """
    grouped, visible = _fold_query_groups(query, key.shape[1], mask)
    return F.scaled_dot_product_attention(grouped, key, value, attn_mask=visible).reshape(query.shape)


def attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, kv_rows: Tensor | None = None) -> Tensor:
    """query [B, heads, S, d] over key/value [R, kv_heads, T, d]; mask [R, S, T].

    Without `kv_rows`, R = B. With it, query row b reads K/V row kv_rows[b] (e.g. rows = a pool's slots, where a
    batch of scattered slots attends in place): the queries are spread to the K/V's rows and the outputs gathered
    back, a copy of the queries, never of the K/V. Rows no query reads are computed and dropped (their mask must
    show them some key)."""
    if kv_rows is None:
        return _attend(query, key, value, mask)
    spread = query.new_zeros(key.shape[0], *query.shape[1:]).index_copy_(0, kv_rows, query)
    return _attend(spread, key, value, mask).index_select(0, kv_rows)


def _attend(query: Tensor, key: Tensor, value: Tensor, mask: Tensor) -> Tensor:
    # Fused kernels accumulate the softmax in fp32 on GPU; on CPU the explicit form is the tested one.
    if query.is_cuda:
        return sdpa_attention(query, key, value, mask)
    # Per row: fp32 scores and their softmax, in chunks of rows (`pipeline.row_chunks`).
    heads, length = query.shape[1], query.shape[2]
    return in_row_chunks(eager_attention, 2 * 4 * heads * length * key.shape[2], query, key, value, mask)


class DecoderAttention(nn.Module):
    def __init__(self, config: TextDecoderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=False)
        self.k_proj = nn.Linear(hidden, kv_width, bias=False)
        self.v_proj = nn.Linear(hidden, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv: "KVAccess", kv_rows: Tensor | None = None
    ) -> tuple[Tensor, LayerKV]:
        """kv(key, value) stores the new positions' K/V if it keeps them, and returns all K/V to attend over
        (row kv_rows[b] of it for batch row b, if given; see `attention`)."""
        batch, length, _ = x.shape
        query = self.q_norm(self.q_proj(x).view(batch, length, self.num_heads, self.head_dim))
        key = self.k_norm(self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim))
        value = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        query = apply_rotary(query.transpose(1, 2), cos, sin)
        key = apply_rotary(key.transpose(1, 2), cos, sin)
        all_keys, all_values = kv(key, value)
        attended = attention(query, all_keys, all_values, mask, kv_rows)
        out = self.o_proj(attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
        return out, (key, value)


class DecoderMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TextDecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextDecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DecoderMLP(config)

    def forward(
        self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv: "KVAccess", kv_rows: Tensor | None = None
    ) -> tuple[Tensor, LayerKV]:
        attended, new_kv = self.self_attn(self.input_layernorm(h), cos, sin, mask, kv, kv_rows)
        h = h + attended
        return h + self.mlp(self.post_attention_layernorm(h)), new_kv


@dataclass
class DecoderOutput:
    """Final-norm hidden states [B, S, hidden] and, per layer, the K/V of the S new positions (none when a
    `kv_store` took them: they are in its storage)."""

    hidden: Tensor
    new_kv: list[LayerKV]


class TextDecoder(nn.Module):
    """Qwen3 decoder; state-dict keys are the official ones minus `thinker.model.`."""

    def __init__(self, config: TextDecoderConfig) -> None:
        super().__init__()
        if not config.tie_word_embeddings:
            raise ValueError("TextDecoderConfig.tie_word_embeddings is False; Qwen3-ASR ties the output matrix")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def embed(self, token_ids: Tensor) -> Tensor:
        return self.embed_tokens(token_ids)

    def forward(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor,
        past: Sequence[LayerKV] | None = None,
        kv_store: LayerKVStore | None = None,
        kv_rows: Tensor | None = None,
    ) -> DecoderOutput:
        """Run S new positions on top of P cached ones.

        inputs_embeds [B, S, hidden] (token embeddings, or audio vectors at audio positions);
        position_ids [B, S]; attention_mask [B, S, P + S] bool over [cached | new] keys, True = may
        attend (see `ragged_causal_mask`); past: per layer (key, value) [B, kv_heads, P, head_dim],
        or None when P = 0. Instead of `past`, `kv_store` may own the storage: it takes each layer's new
        K/V and returns what to attend over (the mask then indexes its layout; see `forward_streams`), and
        `kv_rows` [B] may say which row of that each batch row attends over (the mask then has one row per K/V row).
        """
        if past is not None and len(past) != len(self.layers):
            raise ValueError(f"past has {len(past)} layers; expected {len(self.layers)}")
        if past is not None and kv_store is not None:
            raise ValueError("give either past or kv_store, not both")
        store = kv_store or partial(_concatenate_past, past)
        cos, sin = self.rotary(position_ids)
        h = inputs_embeds
        new_kv: list[LayerKV] = []
        for index, layer in enumerate(self.layers):
            h, layer_kv = layer(h, cos, sin, attention_mask, partial(store, index), kv_rows)
            if kv_store is None:  # a store has kept it: a copy per layer would stay alive to the end of the forward
                new_kv.append(layer_kv)
        return DecoderOutput(hidden=self.norm(h), new_kv=new_kv)

    def logits(self, hidden: Tensor, out: Tensor | None = None) -> Tensor:
        """Vocabulary logits through the tied output matrix (`embed_tokens.weight`); `out`: a buffer to fill."""
        return torch.matmul(hidden, self.embed_tokens.weight.T, out=out)


def _concatenate_past(past: Sequence[LayerKV] | None, index: int, key: Tensor, value: Tensor) -> LayerKV:
    if past is None:
        return key, value
    return torch.cat([past[index][0], key], dim=2), torch.cat([past[index][1], value], dim=2)


class DecoderKVCache:
    """One stream's decoder K/V: per layer, key and value [kv_heads, length, head_dim].

    Storage is preallocated and grows geometrically, so `append` writes in place and `crop` (the
    rolling decoder's "drop tail + draft, keep head + audio") is O(1). Tensors returned by `layer`
    are views, valid until the next `append`.

    Given `storage` (per layer (key, value) [kv_heads, capacity, head_dim], e.g. one slot of a
    preallocated pool, see `pipeline.kv_pool`), the cache writes into it and never reallocates: an
    append past `capacity` is an error.
    """

    def __init__(
        self, num_layers: int, storage: Sequence[LayerKV] | None = None, pool_slot: "PoolSlot | None" = None
    ) -> None:
        """`pool_slot`: where `storage` sits in a pool, so that a batch of slots can run on the pool in place
        (`forward_streams`)."""
        self.num_layers = num_layers
        self.pool_slot = pool_slot
        self._keys: list[Tensor] = [] if storage is None else [key for key, _ in storage]
        self._values: list[Tensor] = [] if storage is None else [value for _, value in storage]
        self._fixed = storage is not None
        if self._fixed and len(self._keys) != num_layers:
            raise ValueError(f"storage has {len(self._keys)} layers; expected {num_layers}")
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def layer(self, index: int) -> LayerKV:
        if not self._keys:
            raise ValueError("the cache is empty; append K/V before reading a layer")
        return self._keys[index][:, : self._length], self._values[index][:, : self._length]

    def append(self, new_kv: Sequence[LayerKV]) -> None:
        """Add positions: per layer (key, value), each [kv_heads, S, head_dim]."""
        if len(new_kv) != self.num_layers:
            raise ValueError(f"new_kv has {len(new_kv)} layers; expected {self.num_layers}")
        added = new_kv[0][0].shape[1]
        self._reserve(self._length + added, new_kv[0][0])
        end = self._length + added
        for index, (key, value) in enumerate(new_kv):
            self._keys[index][:, self._length : end] = key
            self._values[index][:, self._length : end] = value
        self._length = end

    def advance(self, count: int) -> None:
        """Count `count` positions that a pooled forward wrote straight into this cache's storage."""
        if not self._fixed or self._length + count > self._keys[0].shape[1]:
            raise ValueError(
                f"cannot advance a cache of {self._length} positions by {count}: only fixed storage with room "
                "is written in place"
            )
        self._length += count

    def crop(self, length: int) -> None:
        """Keep the first `length` positions."""
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot crop a cache of {self._length} positions to {length}")
        self._length = length

    def _reserve(self, needed: int, like: Tensor) -> None:
        capacity = self._keys[0].shape[1] if self._keys else 0
        if needed <= capacity:
            return
        if self._fixed:
            raise ValueError(f"{needed} positions needed; the cache's fixed storage holds {capacity}")
        new_capacity = max(needed, 2 * capacity, 64)
        heads, _, head_dim = like.shape

        def grown(old: Tensor | None) -> Tensor:
            storage = like.new_empty(heads, new_capacity, head_dim)
            if old is not None:
                storage[:, : self._length] = old[:, : self._length]
            return storage

        old_keys = self._keys or [None] * self.num_layers
        old_values = self._values or [None] * self.num_layers
        self._keys = [grown(old) for old in old_keys]
        self._values = [grown(old) for old in old_values]


@dataclass(frozen=True)
class PoolSlot:
    """Slot `index` of pool tensors keys/values [layers, slots, kv_heads, columns, head_dim].

    A stream may fill `capacity` positions; the pool may hold more columns (e.g. a scratch column that idle rows
    of a static-shape decode step write to, see `pipeline.decode_step`).
    """

    keys: Tensor
    values: Tensor
    index: int
    capacity: int


def ragged_causal_mask(past_lengths: Tensor, new_lengths: Tensor, max_past: int, max_new: int) -> Tensor:
    """[B, max_new, max_past + max_new] bool mask for a padded batch of streams.

    Stream b has past_lengths[b] cached positions (padded to max_past) and new_lengths[b] new ones
    (padded to max_new). A new position sees the stream's real cached positions and the new ones up
    to itself. Padding rows see only new positions up to themselves, never an empty row (so no NaN);
    real rows never see padding, because padded new positions come after every real one.
    """
    if bool((new_lengths > max_new).any()) or bool((past_lengths > max_past).any()):
        raise ValueError(
            f"lengths past={past_lengths.tolist()} new={new_lengths.tolist()} exceed the padded sizes "
            f"({max_past}, {max_new})"
        )
    batch = past_lengths.shape[0]
    device = past_lengths.device
    past_visible = torch.arange(max_past, device=device)[None, :] < past_lengths[:, None]  # [B, P]
    causal = torch.ones(max_new, max_new, dtype=torch.bool, device=device).tril()  # [S, S]
    return torch.cat(
        [past_visible[:, None, :].expand(batch, max_new, max_past), causal.expand(batch, max_new, max_new)],
        dim=-1,
    )


def forward_streams(
    decoder: TextDecoder, caches: Sequence[DecoderKVCache], inputs_embeds: Sequence[Tensor]
) -> list[Tensor]:
    """`forward_padded` for a list of streams' inputs: inputs_embeds[b] is [S_b, hidden]; returns each stream's
    final hidden states [S_b, hidden]."""
    if len(caches) != len(inputs_embeds):
        raise ValueError(f"{len(caches)} caches but {len(inputs_embeds)} input sequences")
    new_lengths = [embeds.shape[0] for embeds in inputs_embeds]
    embeds = torch.nn.utils.rnn.pad_sequence(list(inputs_embeds), batch_first=True)
    hidden = forward_padded(decoder, caches, embeds, new_lengths)
    return [hidden[row, :count] for row, count in enumerate(new_lengths)]


def forward_padded(
    decoder: TextDecoder,
    caches: Sequence[DecoderKVCache],
    embeds: Tensor,
    new_lengths: Sequence[int],
    *,
    consume_inputs: bool = False,
) -> Tensor:
    """Forward each stream's new positions on top of its cache, as one padded batch.

    embeds [B, S, hidden]: row b's first new_lengths[b] positions are stream b's (the rest padding); positions
    continue at caches[b].length. The new K/V is appended to each cache; returns the final hidden states
    [B, S, hidden] (padding rows hold garbage). Nothing here is per stream on the device side: a thousand streams
    cost the same operators as one.

    Two layouts, same results. Caches that are slots of one pool run in place, wherever their slots are: each
    layer writes the real new K/V of every stream into its slot with one scatter, and the batch attends over a
    view of the pool's slot range, each stream's queries at its own slot (`_PoolRows`): no copy of the past.
    Caches of their own (a single session's) are gathered into padded tensors first.
    Lengths come from the caches and the caller (host values): nothing here waits for the device.

    The streams run in chunks whose intermediates fit `pipeline.row_chunks` (the whole forward per chunk, so no
    activation spans the batch); a chunk re-reads every layer's weights, so it may be as large as they are: at full
    size that is hundreds of streams, on the tiny checkpoint tens. A pooled chunk's slot range, every row of which
    its attention computes, stays within the same budget (`slot_chunks`): a chunk never spans a wide gap in the
    slots. With `consume_inputs` (the caller has no further
    use for `embeds`), each chunk's output is written over its own rows of `embeds`, which is returned: the step
    then never holds a batch of inputs and a batch of outputs at once.
    """
    if len(caches) != embeds.shape[0] or len(new_lengths) != embeds.shape[0]:
        raise ValueError(f"{len(caches)} caches and {len(new_lengths)} lengths for {embeds.shape[0]} rows of inputs")
    keys = max(cache.length + count for cache, count in zip(caches, new_lengths))
    per_stream = _bytes_per_stream(decoder, embeds.shape[1], keys)
    limit = rows_per_forward_chunk(per_stream, len(caches), decoder.layers)
    # Chunks of neighbouring slots (a batch's order need not be the slots'), none across a wide gap in them.
    slots = [-1 if cache.pool_slot is None else cache.pool_slot.index for cache in caches]
    chunks = slot_chunks(slots, limit, per_stream, _bytes_per_range_row(decoder, embeds.shape[1], keys))
    if len(chunks) == 1:
        return _forward_chunk(decoder, caches, embeds, new_lengths)
    hidden = embeds if consume_inputs else embeds.new_zeros(embeds.shape)
    for chunk in chunks:
        rows = chunk.tolist()
        width = max(new_lengths[row] for row in rows)  # the chunk's own padding only
        if width:
            index = to_device(chunk, embeds.device)
            hidden[index, :width] = _forward_chunk(
                decoder, [caches[row] for row in rows], embeds[index, :width], [new_lengths[row] for row in rows]
            )
    return hidden


def _bytes_per_stream(decoder: TextDecoder, width: int, keys: int) -> int:
    """What one stream's `width` new positions hold at once in a forward: the residual stream, its norm and the
    layer outputs, the attention's projections with their rotary copies, the MLP's three intermediate-wide
    tensors (in the weights' dtype), and its mask rows over `keys` keys (bool). Scores are chunked on their own."""
    config = decoder.config
    q_width, kv_width = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_position = 8 * config.hidden_size + 2 * q_width + 2 * kv_width + 3 * config.intermediate_size
    return width * (per_position * decoder.embed_tokens.weight.element_size() + keys)


def _bytes_per_range_row(decoder: TextDecoder, width: int, keys: int) -> int:
    """What each row of a pooled chunk's slot range holds in its attention, whether a stream of the chunk lives
    there or not (see `attention`): the spread queries and their output (in the weights' dtype) and the mask row
    over `keys` keys (bool)."""
    config = decoder.config
    q_width = config.num_attention_heads * config.head_dim
    return width * (2 * q_width * decoder.embed_tokens.weight.element_size() + keys)


def _forward_chunk(
    decoder: TextDecoder, caches: Sequence[DecoderKVCache], embeds: Tensor, new_lengths: Sequence[int]
) -> Tensor:
    """`forward_padded` for one chunk of streams."""
    device = embeds.device
    past_lengths = [cache.length for cache in caches]
    max_past, max_new = max(past_lengths), embeds.shape[1]
    past = to_device(past_lengths, device)
    positions = past[:, None] + torch.arange(max_new, device=device)[None, :]

    pool_rows = _pool_rows(caches, max(p + n for p, n in zip(past_lengths, new_lengths)))
    if pool_rows is not None:
        rows = pool_rows.placed(past_lengths, list(new_lengths), device)
        output = decoder(embeds, positions, rows.mask(past, max_new), kv_store=rows.store, kv_rows=rows.kv_rows)
        for cache, count in zip(caches, new_lengths):
            cache.advance(count)
    else:
        mask = ragged_causal_mask(past, to_device(list(new_lengths), device), max_past, max_new)
        output = decoder(embeds, positions, mask, _padded_past(caches, max_past) if max_past > 0 else None)
        for row, (cache, count) in enumerate(zip(caches, new_lengths)):
            cache.append([(key[row, :, :count], value[row, :, :count]) for key, value in output.new_kv])
    return output.hidden


def in_place_causal_mask(past_lengths: Tensor, total: int, max_new: int) -> Tensor:
    """[B, max_new, total] mask when each stream's new positions sit right after its own cached ones.

    New position i of stream b is absolute position P_b + i and sees keys 0..P_b + i. Padding rows
    (i >= S_b) see a few stale slot entries; their outputs are discarded, and no real row sees them.
    """
    keys = torch.arange(total, device=past_lengths.device)
    queries = past_lengths[:, None] + torch.arange(max_new, device=past_lengths.device)[None, :]
    return keys[None, None, :] <= queries[:, :, None]


@dataclass(frozen=True)
class _PoolRows:
    """A batch whose caches are all slots of one pool (any slots, any order): batch row b lives in slots[b]."""

    slot: PoolSlot
    slots: list[int]

    def placed(self, past_lengths: list[int], new_lengths: list[int], device: torch.device) -> "_PlacedRows":
        """Where this forward writes (every real new position: slot, column) and what it attends over."""
        first = min(self.slots)
        count = max(self.slots) - first + 1
        rows, steps = ragged_rows(new_lengths)
        slots = np.asarray(self.slots)
        identity = self.slots == list(range(first, first + count))  # rows are the slot range, in order
        return _PlacedRows(
            keys=self.slot.keys,
            values=self.slot.values,
            first=first,
            count=count,
            total=max(p + n for p, n in zip(past_lengths, new_lengths)),
            write_rows=to_device(rows, device),
            write_steps=to_device(steps, device),
            write_slots=to_device(slots[rows], device),
            write_columns=to_device(np.asarray(past_lengths)[rows] + steps, device),
            kv_rows=None if identity else to_device(slots - first, device),
        )


@dataclass(frozen=True)
class _PlacedRows:
    """One in-place forward over pool slots first .. first + count - 1, whose columns [0, total) it attends over."""

    keys: Tensor  # the pool's [layers, slots, kv_heads, columns, head_dim]
    values: Tensor
    first: int
    count: int
    total: int
    write_rows: Tensor  # [real new positions]: the batch row and step of each,
    write_steps: Tensor
    write_slots: Tensor  # and the slot and column it goes to.
    write_columns: Tensor
    kv_rows: Tensor | None  # per batch row: its slot's row in the range (None: the batch is the range, in order)

    def mask(self, past_lengths: Tensor, max_new: int) -> Tensor:
        """[count, max_new, total]: per slot of the range, its stream's causal mask over its own slot; a slot
        without a stream in this batch sees its first keys (computed, then dropped)."""
        if self.kv_rows is None:
            return in_place_causal_mask(past_lengths, self.total, max_new)
        range_past = past_lengths.new_zeros(self.count).index_copy_(0, self.kv_rows, past_lengths)
        return in_place_causal_mask(range_past, self.total, max_new)

    def store(self, layer: int, key: Tensor, value: Tensor) -> LayerKV:
        """One scatter per tensor of every stream's real new K/V [B, kv_heads, S, d] into its slot, whatever the
        lengths; returns the range's columns [0, total) of the layer (a view of the pool)."""
        attended = []
        for pool, new in ((self.keys[layer], key), (self.values[layer], value)):
            real = new.transpose(1, 2)[self.write_rows, self.write_steps]  # [positions, kv_heads, d]
            pool.transpose(1, 2).index_put_((self.write_slots, self.write_columns), real)
            attended.append(pool[self.first : self.first + self.count, :, : self.total])
        return attended[0], attended[1]


def _pool_rows(caches: Sequence[DecoderKVCache], needed: int) -> _PoolRows | None:
    """The batch's pool layout if every cache is a slot of one pool with room for `needed` positions."""
    slots = [cache.pool_slot for cache in caches]
    if any(slot is None for slot in slots):
        return None
    keys = slots[0].keys
    if any(slot.keys is not keys for slot in slots) or needed > slots[0].capacity:
        return None
    return _PoolRows(slot=slots[0], slots=[slot.index for slot in slots])


def _padded_past(caches: Sequence[DecoderKVCache], max_past: int) -> list[LayerKV]:
    """Per layer, every stream's cached K/V right-padded to max_past: [B, kv_heads, max_past, d]."""
    if len(caches) == 1:  # no padding needed: view the cache itself
        return [tuple(part[None] for part in caches[0].layer(index)) for index in range(caches[0].num_layers)]
    template = next(cache for cache in caches if cache.length > 0).layer(0)[0]
    heads, _, head_dim = template.shape
    padded: list[LayerKV] = []
    for index in range(caches[0].num_layers):
        keys = template.new_zeros(len(caches), heads, max_past, head_dim)
        values = template.new_zeros(len(caches), heads, max_past, head_dim)
        for row, cache in enumerate(caches):
            if cache.length > 0:
                keys[row, :, : cache.length], values[row, :, : cache.length] = cache.layer(index)
        padded.append((keys, values))
    return padded
