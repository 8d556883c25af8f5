"""TextDecoder and DecoderKVCache against transformers' Qwen3 on random TINY_TEXT weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TINY_TEXT
from pipeline.decoder import (
    DecoderKVCache,
    TextDecoder,
    eager_attention,
    forward_streams,
    ragged_causal_mask,
    sdpa_attention,
)
from tests.hf_reference import native_text_model

TOLERANCE = 1e-5
AUDIO_TOKEN_ID = 7  # any id: the test only needs "these positions carry audio vectors"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def random_decoder(seed: int) -> TextDecoder:
    """Default init, plus norm weights of 1 ± noise so that a skipped or misplaced norm shows."""
    torch.manual_seed(seed)
    decoder = TextDecoder(TINY_TEXT).eval()
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
    return decoder


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def decoder() -> TextDecoder:
    return random_decoder(seed=0)


@pytest.fixture(scope="module")
def reference(decoder: TextDecoder):
    return native_text_model(TINY_TEXT, decoder.state_dict())


def prompt_embeddings(decoder: TextDecoder, seed: int, length: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [length] with a run of audio placeholders, and their embeddings [length, hidden]
    where the placeholders are replaced by random "audio" vectors."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, TINY_TEXT.vocab_size, (length,), generator=generator)
    ids[5:25] = AUDIO_TOKEN_ID
    embeds = decoder.embed(ids).detach().clone()
    audio = torch.randn(20, TINY_TEXT.hidden_size, generator=generator)
    embeds[ids == AUDIO_TOKEN_ID] = audio
    return ids, embeds


def reference_logits(reference, embeds: torch.Tensor) -> torch.Tensor:
    return reference(inputs_embeds=embeds[None], use_cache=False).logits[0]


def our_logits(decoder: TextDecoder, cache: DecoderKVCache, embeds: torch.Tensor) -> torch.Tensor:
    return decoder.logits(forward_streams(decoder, [cache], [embeds])[0])


def test_state_dict_keys_follow_the_official_layout(decoder: TextDecoder) -> None:
    expected = {"embed_tokens.weight", "norm.weight"}
    for i in range(TINY_TEXT.num_hidden_layers):
        expected |= {
            f"layers.{i}.input_layernorm.weight",
            f"layers.{i}.post_attention_layernorm.weight",
            *(f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"),
            f"layers.{i}.self_attn.q_norm.weight",
            f"layers.{i}.self_attn.k_norm.weight",
            *(f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        }
    assert set(decoder.state_dict()) == expected


def test_prefill_from_token_ids_matches_transformers(decoder: TextDecoder, reference) -> None:
    ids = torch.randint(0, TINY_TEXT.vocab_size, (41,), generator=torch.Generator().manual_seed(1))
    expected = reference(input_ids=ids[None], use_cache=False).logits[0]
    actual = our_logits(decoder, DecoderKVCache(TINY_TEXT.num_hidden_layers), decoder.embed(ids))
    assert relative_error(actual, expected) < TOLERANCE


def test_prefill_with_audio_embeddings_matches_transformers(decoder: TextDecoder, reference) -> None:
    _, embeds = prompt_embeddings(decoder, seed=2)
    expected = reference_logits(reference, embeds)
    actual = our_logits(decoder, DecoderKVCache(TINY_TEXT.num_hidden_layers), embeds)
    assert relative_error(actual, expected) < TOLERANCE


def test_cached_step_by_step_decoding_matches_full_sequence(decoder: TextDecoder, reference) -> None:
    _, embeds = prompt_embeddings(decoder, seed=3)
    expected = reference_logits(reference, embeds)
    cache = DecoderKVCache(TINY_TEXT.num_hidden_layers)
    pieces = [our_logits(decoder, cache, embeds[:30])]
    for position in range(30, 40):
        pieces.append(our_logits(decoder, cache, embeds[position : position + 1]))
    assert cache.length == 40
    assert relative_error(torch.cat(pieces), expected) < TOLERANCE


def test_crop_then_continue_equals_fresh_forward(decoder: TextDecoder, reference) -> None:
    """The rolling-decoder pattern: forward [tail + draft], crop back, forward something else."""
    _, embeds = prompt_embeddings(decoder, seed=4)
    cache = DecoderKVCache(TINY_TEXT.num_hidden_layers)
    our_logits(decoder, cache, embeds[:25])
    our_logits(decoder, cache, embeds[25:40])  # a first "tail + draft"
    cache.crop(25)
    other = torch.randn(9, TINY_TEXT.hidden_size, generator=torch.Generator().manual_seed(5))
    continued = our_logits(decoder, cache, other)

    fresh_input = torch.cat([embeds[:25], other])
    fresh = our_logits(decoder, DecoderKVCache(TINY_TEXT.num_hidden_layers), fresh_input)
    assert cache.length == 34
    assert relative_error(continued, fresh[25:]) < TOLERANCE
    assert relative_error(continued, reference_logits(reference, fresh_input)[25:]) < TOLERANCE


def test_ragged_batch_equals_each_stream_alone(decoder: TextDecoder) -> None:
    past_lengths, new_lengths = (0, 12, 31), (9, 1, 5)
    streams = [prompt_embeddings(decoder, seed=10 + b)[1] for b in range(3)]
    batched_caches, alone_caches = [], []
    for embeds, past in zip(streams, past_lengths):
        for caches in (batched_caches, alone_caches):
            caches.append(DecoderKVCache(TINY_TEXT.num_hidden_layers))
            if past:
                our_logits(decoder, caches[-1], embeds[:past])
    new_inputs = [embeds[past : past + new] for embeds, past, new in zip(streams, past_lengths, new_lengths)]

    batched = forward_streams(decoder, batched_caches, new_inputs)
    for b in range(3):
        alone = our_logits(decoder, alone_caches[b], new_inputs[b])
        assert batched[b].shape[0] == new_lengths[b]
        assert relative_error(decoder.logits(batched[b]), alone) < TOLERANCE
        assert batched_caches[b].length == past_lengths[b] + new_lengths[b]
        for layer in range(TINY_TEXT.num_hidden_layers):
            for part_batched, part_alone in zip(batched_caches[b].layer(layer), alone_caches[b].layer(layer)):
                assert relative_error(part_batched, part_alone) < TOLERANCE


def test_ragged_causal_mask_layout() -> None:
    mask = ragged_causal_mask(torch.tensor([2, 0]), torch.tensor([1, 2]), max_past=2, max_new=2)
    expected = torch.tensor(
        [
            [[1, 1, 1, 0], [1, 1, 1, 1]],  # stream 0: row 1 is padding, sees only new positions
            [[0, 0, 1, 0], [0, 0, 1, 1]],  # stream 1: no cache, padded past invisible
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_sdpa_attention_matches_eager_fp32_softmax() -> None:
    generator = torch.Generator().manual_seed(6)
    query = torch.randn(2, 4, 3, 16, generator=generator)
    key = torch.randn(2, 2, 8, 16, generator=generator)
    value = torch.randn(2, 2, 8, 16, generator=generator)
    mask = ragged_causal_mask(torch.tensor([5, 2]), torch.tensor([3, 2]), max_past=5, max_new=3)
    expected = eager_attention(query, key, value, mask)
    assert relative_error(sdpa_attention(query, key, value, mask), expected) < TOLERANCE


def test_cache_growth_keeps_contents_and_crop_checks_bounds() -> None:
    cache = DecoderKVCache(num_layers=1)
    chunks = [torch.randn(2, n, 4) for n in (40, 50, 1)]  # crosses the initial capacity of 64
    for chunk in chunks:
        cache.append([(chunk, -chunk)])
    keys, values = cache.layer(0)
    assert torch.equal(keys, torch.cat(chunks, dim=1)) and torch.equal(values, -keys)
    cache.crop(10)
    assert cache.length == 10 and torch.equal(cache.layer(0)[0], chunks[0][:, :10])
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(11)


def test_rotary_angles_stay_fp32_in_a_bf16_model() -> None:
    """`.to(bfloat16)` (the CUDA default) must not round the RoPE frequencies: cos/sin equal the fp32 model's."""
    decoder = random_decoder(seed=0)
    positions = torch.arange(0, 480, 7)[None]
    cos32, sin32 = decoder.rotary(positions)
    cos16, sin16 = decoder.to(torch.bfloat16).rotary(positions)
    assert cos16.dtype == torch.float32
    assert torch.equal(cos16, cos32) and torch.equal(sin16, sin32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels need a GPU")
def test_grouped_attention_runs_on_the_memory_efficient_kernel() -> None:
    """With the query groups folded into rows, SDPA's memory-efficient kernel takes the boolean mask (restricted
    to that kernel, a fallback to the math kernel would raise instead of silently slowing down)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator(device="cuda").manual_seed(6)
    query = torch.randn(3, 16, 5, 128, generator=generator, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(3, 8, 45, 128, generator=generator, device="cuda", dtype=torch.bfloat16)
    value = torch.randn(3, 8, 45, 128, generator=generator, device="cuda", dtype=torch.bfloat16)
    mask = ragged_causal_mask(torch.tensor([40, 7, 0], device="cuda"), torch.tensor([5, 2, 5], device="cuda"), 40, 5)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        fused = sdpa_attention(query, key, value, mask)
    assert relative_error(fused.float(), eager_attention(query, key, value, mask).float()) < 2e-2


def test_explicit_attention_in_row_chunks_is_bitwise_the_same(monkeypatch) -> None:
    """Large batches attend in row chunks (bounded score memory); every row's result is unchanged."""
    import pipeline.decoder as decoder_module

    generator = torch.Generator().manual_seed(7)
    shapes = ((8, 5), (2, 40), (2, 40))  # (heads, positions) of query, key, value
    query, key, value = (torch.randn(9, heads, length, 16, generator=generator) for heads, length in shapes)
    mask = torch.rand(9, 5, 40, generator=generator) > 0.4
    mask[..., 0] = True
    whole = decoder_module.attention(query, key, value, mask)
    monkeypatch.setattr("pipeline.row_chunks.CHUNK_BYTES", 2 * (2 * 4 * 8 * 5 * 40))  # two rows' scores + softmax
    assert torch.equal(decoder_module.attention(query, key, value, mask), whole)
    rows = torch.tensor([4, 0, 7])  # and queries attending over chosen rows of the K/V (scattered pool slots)
    spread = decoder_module.attention(query[:3], key, value, mask, kv_rows=rows)
    for index, row in enumerate(rows.tolist()):
        own = slice(row, row + 1)
        alone = decoder_module.attention(query[index : index + 1], key[own], value[own], mask[own])
        torch.testing.assert_close(spread[index : index + 1], alone, rtol=0, atol=1e-6)
