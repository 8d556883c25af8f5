"""The static-shape decode step (the CUDA-graph form) computes what the dynamic batch computes, and touches no
K/V but the stepping streams' next positions and the scratch column."""

from __future__ import annotations

import pytest
import torch

from pipeline.decode_step import DynamicDecodeStep, StaticDecodeStep, bucket_sizes
from pipeline.decoder import DecoderKVCache, TextDecoder, forward_streams
from pipeline.kv_pool import DecoderKVPool
from tests.test_decoder import random_decoder

SLOTS = 6
CAPACITY = 40


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode(), torch.random.fork_rng():
        yield


def _prefilled(decoder: TextDecoder, caches: list[DecoderKVCache], lengths: list[int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    hidden = decoder.config.hidden_size
    for cache, length in zip(caches, lengths):
        forward_streams(decoder, [cache], [torch.randn(length, hidden, generator=generator).to(decoder.embed_tokens.weight)])


def test_bucket_sizes_cover_every_batch_with_few_shapes() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(33) == [1, 2, 4, 8, 16, 32, 33]
    assert bucket_sizes(475, smallest=64) == [64, 128, 256, 475]
    assert bucket_sizes(40, smallest=64) == [40]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_static_step_equals_dynamic_step(dtype: torch.dtype, tolerance: float) -> None:
    """Streams in slots 4, 0, 2 (ragged lengths; some leave as they stop) against growing caches; slot 1 holds
    a stream that never steps, slots 3 and 5 none. Logits agree and the idle stream's K/V is untouched."""
    decoder = random_decoder(seed=0).to(dtype)
    pool = DecoderKVPool(decoder, slots=SLOTS, capacity=CAPACITY)
    static = StaticDecodeStep(decoder, pool, smallest_span=4)  # spans 4, 8, 16, 32, 40: several are used
    dynamic = DynamicDecodeStep(decoder)
    slots, lengths = [4, 0, 2], [11, 3, 17]
    pooled = [pool.new_cache(slot) for slot in slots]
    growing = [DecoderKVCache(len(decoder.layers)) for _ in slots]
    _prefilled(decoder, pooled, lengths, seed=1)
    _prefilled(decoder, growing, lengths, seed=1)
    idle = pool.new_cache(1)
    _prefilled(decoder, [idle], [9], seed=2)
    idle_keys = idle.layer(1)[0].clone()

    worst = 0.0
    for step, active in enumerate([[0, 1, 2], [0, 1, 2], [2, 0], [1], [0, 2, 1]]):
        token_ids = [(17 * step + 5 * row) % decoder.config.vocab_size for row in active]
        got = static([pooled[row] for row in active], token_ids)
        want = dynamic([growing[row] for row in active], token_ids)
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        worst = max(worst, float((got.float() - want.float()).abs().max() / want.float().abs().max()))
        for row in active:
            assert pooled[row].length == growing[row].length
            torch.testing.assert_close(pooled[row].layer(0)[1], growing[row].layer(0)[1], rtol=0, atol=tolerance)
    assert worst < tolerance
    assert torch.equal(idle.layer(1)[0], idle_keys) and idle.length == 9


def test_static_step_refuses_foreign_and_full_caches() -> None:
    decoder = random_decoder(seed=0)
    pool = DecoderKVPool(decoder, slots=2, capacity=4)
    static = StaticDecodeStep(decoder, pool)
    with pytest.raises(ValueError, match="outside this step's decoder pool"):
        static([DecoderKVCache(len(decoder.layers))], [1])
    full = pool.new_cache(1)
    _prefilled(decoder, [full], [4], seed=0)
    with pytest.raises(ValueError, match=r"slot 1 is full \(4 of 4 positions\)"):
        static([full], [1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_graphs_need_a_cuda_pool() -> None:
    decoder = random_decoder(seed=0)
    with pytest.raises(ValueError, match="needs the decoder pool on a CUDA device; it is on cpu"):
        StaticDecodeStep(decoder, DecoderKVPool(decoder, slots=2, capacity=8), cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replays_equal_eager_static_steps_on_cuda() -> None:
    decoder = random_decoder(seed=0).cuda().to(torch.bfloat16)
    pools = [DecoderKVPool(decoder, slots=SLOTS, capacity=CAPACITY) for _ in range(2)]
    eager, graphed = StaticDecodeStep(decoder, pools[0]), StaticDecodeStep(decoder, pools[1], cuda_graphs=True)
    caches = [[pool.new_cache(slot) for slot in (3, 0)] for pool in pools]
    for pool_caches in caches:
        _prefilled(decoder, pool_caches, [7, 12], seed=1)
    for step in range(4):
        want = eager(caches[0], [step + 1, step + 2])
        got = graphed(caches[1], [step + 1, step + 2])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
