"""The audio tower against transformers' native Qwen3ASREncoder + projector, and its building blocks."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.qwen3_asr.modeling_qwen3_asr import (
    SinusoidsPositionEmbedding,
    _get_feat_extract_output_lengths,
)

from pipeline.config import AudioEncoderConfig, TINY_AUDIO
from pipeline.encoder import (
    CAUSAL_LEFT_CONTEXT_STEPS,
    AudioTower,
    block_causal_mask,
    offline_output_steps,
    sinusoidal_positions,
)
from tests.hf_reference import native_audio_tower


def random_tower(config: AudioEncoderConfig = TINY_AUDIO, seed: int = 0) -> AudioTower:
    """A tower with weights far from any default init, so that a wrong wiring shows in the outputs."""
    torch.manual_seed(seed)
    tower = AudioTower(config).eval()
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if "layer_norm" in name or "ln_post" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(param))
            elif name.startswith("conv2d1"):
                param.normal_(0.0, 0.3)
            else:
                param.normal_(0.0, 0.1)
            # Sharper attention than a plain 0.1 init, so the mask matters to the output.
            if ".q_proj." in name or ".k_proj." in name:
                param.mul_(2.0)
    return tower


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def native_offline(tower: AudioTower, mel: torch.Tensor) -> torch.Tensor:
    """transformers' encoder + projector on mel [T, bins], padded to whole 100-frame chunks with zeros."""
    encoder, projector = native_audio_tower(tower.config, tower.state_dict())
    frames = mel.shape[0]
    padded_frames = -(-frames // 100) * 100
    features = torch.zeros(1, mel.shape[1], padded_frames)
    features[0, :, :frames] = mel.T
    mask = torch.zeros(1, padded_frames, dtype=torch.long)
    mask[0, :frames] = 1
    hidden = encoder(input_features=features, input_features_mask=mask).last_hidden_state
    return projector(hidden)


def test_state_dict_keys_are_the_official_tower_keys_without_prefix():
    tower = AudioTower(TINY_AUDIO)
    layer_keys = [
        f"layers.{i}.{name}.{kind}"
        for i in range(TINY_AUDIO.encoder_layers)
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "self_attn_layer_norm",
            "fc1",
            "fc2",
            "final_layer_norm",
        )
        for kind in ("weight", "bias")
    ]
    expected = (
        {f"conv2d{i}.{kind}" for i in (1, 2, 3) for kind in ("weight", "bias")}
        | {"conv_out.weight"}
        | set(layer_keys)
        | {f"{name}.{kind}" for name in ("ln_post", "proj1", "proj2") for kind in ("weight", "bias")}
    )
    assert set(tower.state_dict()) == expected
    assert len(list(tower.buffers())) == 0


def test_published_geometry_shapes_and_key_count():
    # Shapes from the official checkpoint census (reference §7), without allocating 186 M parameters.
    with torch.device("meta"):
        tower = AudioTower(AudioEncoderConfig())
    shapes = {name: tuple(t.shape) for name, t in tower.state_dict().items()}
    assert len(shapes) == 301
    assert shapes["conv2d1.weight"] == (480, 1, 3, 3)
    assert shapes["conv_out.weight"] == (896, 7680)
    assert shapes["layers.17.fc1.weight"] == (3584, 896)
    assert shapes["proj2.weight"] == (1024, 896)


@pytest.mark.parametrize("frames", [1, 7, 8, 9, 30, 99, 100, 101, 799, 800, 850, 1500, 3000, 6500, 12345])
def test_offline_output_steps_matches_transformers(frames):
    expected = int(_get_feat_extract_output_lengths(torch.tensor(frames)))
    assert offline_output_steps(frames) == expected
    assert offline_output_steps(frames) == 13 * (frames // 100) + math.ceil((frames % 100) / 8)


def test_sinusoids_equal_the_table_and_continue_past_it():
    table = SinusoidsPositionEmbedding(1500, 896).positional_embedding
    torch.testing.assert_close(sinusoidal_positions(torch.arange(1500), 896), table, rtol=0, atol=0)
    far = torch.tensor([1500, 4321, 60000])
    inv = torch.exp(-math.log(10000.0) / 447 * torch.arange(448, dtype=torch.float64))
    expected = torch.cat([torch.sin(far[:, None] * inv), torch.cos(far[:, None] * inv)], dim=1)
    # fp32 rounding of p·inv bounds the agreement at large p.
    torch.testing.assert_close(sinusoidal_positions(far, 896).double(), expected, rtol=0, atol=5e-3)


@pytest.mark.parametrize("frames", [30, 100, 799, 800, 850, 3000, 6500])
def test_offline_tower_matches_transformers_native(frames):
    tower = random_tower(seed=frames)
    mel = torch.randn(frames, TINY_AUDIO.num_mel_bins)
    with torch.no_grad():
        ours = tower.forward_offline(mel)
        expected = native_offline(tower, mel)
    assert ours.shape == (offline_output_steps(frames), TINY_AUDIO.output_dim)
    assert relative_error(ours, expected) < 1e-5


def test_offline_windows_do_not_see_each_other():
    # 8.5 s: the steps after the first 104 form their own window, so changing audio there must
    # leave the first window's embeddings untouched, while changing it inside the window must not.
    tower = random_tower()
    mel = torch.randn(850, TINY_AUDIO.num_mel_bins)
    changed_late = mel.clone()
    changed_late[800:] += 1.0
    changed_early = mel.clone()
    changed_early[700:800] += 1.0
    with torch.no_grad():
        base = tower.forward_offline(mel)
        late = tower.forward_offline(changed_late)
        early = tower.forward_offline(changed_early)
    torch.testing.assert_close(late[:104], base[:104], rtol=0, atol=0)
    assert relative_error(early[:10], base[:10]) > 1e-3


def test_block_causal_mask_shape_of_the_window():
    allowed = block_causal_mask(num_steps=30, steps_per_block=12, left_context_steps=5)
    assert allowed[0, :12].all() and not allowed[0, 12:].any()  # whole first block, nothing later
    assert allowed[13].nonzero().flatten().tolist() == [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
    assert allowed[29].nonzero().flatten().tolist() == [25, 26, 27, 28, 29]


def test_block_causal_forward_is_causal_across_blocks():
    tower = random_tower()
    mel = torch.randn(4 * 96 + 40, TINY_AUDIO.num_mel_bins)
    changed = mel.clone()
    changed[2 * 96 :] += 1.0
    with torch.no_grad():
        base = tower.forward_block_causal(mel, 96)
        after = tower.forward_block_causal(changed, 96)
    assert base.shape == ((4 * 96 + 40) // 8, TINY_AUDIO.output_dim)
    torch.testing.assert_close(after[:24], base[:24], rtol=0, atol=0)
    assert relative_error(after[24:36], base[24:36]) > 1e-3


def test_block_causal_left_window_is_195_steps():
    # Perturb step 10 only. Layer 1 moves the steps that see it: its block (0..11) and q <= 10 + 194.
    # Layer 2 carries that one window further: the last moved step is 10 + 2·194, the next is untouched.
    tower = random_tower()
    mel = torch.randn(96 * 36, TINY_AUDIO.num_mel_bins)
    changed = mel.clone()
    changed[8 * 10 : 8 * 11] += 1.0
    with torch.no_grad():
        base = tower.forward_block_causal(mel, 96)
        after = tower.forward_block_causal(changed, 96)
    assert TINY_AUDIO.encoder_layers == 2
    reach = 10 + 2 * (CAUSAL_LEFT_CONTEXT_STEPS - 1)
    assert (after[reach] - base[reach]).abs().max() > 0
    torch.testing.assert_close(after[reach + 1 :], base[reach + 1 :], rtol=0, atol=0)


def test_bad_inputs_are_rejected():
    tower = AudioTower(TINY_AUDIO)
    with pytest.raises(ValueError, match="multiple of 8"):
        tower.forward_block_causal(torch.zeros(100, 128), 100)
    with pytest.raises(ValueError, match=r"expected \[frames > 0, 128\]"):
        tower.forward_offline(torch.zeros(128, 50))
    with pytest.raises(ValueError, match=r"expected \[frames > 0, 128\]"):
        tower.forward_offline(torch.zeros(0, 128))


def test_fused_attention_path_equals_the_explicit_one() -> None:
    """The SDPA path the tower takes on CUDA, checked on the CPU against the explicit fp32 softmax (ragged mask)."""
    from pipeline.encoder import audio_attention

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 24, 16, generator=generator)
    key, value = (torch.randn(2, 4, 54, 16, generator=generator) for _ in range(2))  # 30 cached + 24 new
    allowed = torch.rand(2, 24, 54, generator=generator) > 0.3
    allowed[..., -1] = True  # no empty row
    explicit = audio_attention(query, key, value, allowed, fused=False)
    fused = audio_attention(query, key, value, allowed, fused=True)
    assert relative_error(fused, explicit) < 1e-5


def test_fused_attention_over_scattered_rows_gathers_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `kv_rows` the fused path reads every row's K/V with one gather per tensor (no 4 MiB row chunks, which
    at full size were a few rows each), and equals the explicit path, which chunks."""
    from pipeline.encoder import audio_attention

    generator = torch.Generator().manual_seed(2)
    query = torch.randn(6, 4, 24, 16, generator=generator)
    key, value = (torch.randn(12, 4, 54, 16, generator=generator) for _ in range(2))  # 12 slots, 6 in the batch
    kv_rows = torch.tensor([1, 3, 4, 7, 10, 11])
    allowed = torch.rand(6, 24, 54, generator=generator) > 0.3
    allowed[..., -1] = True
    monkeypatch.setattr("pipeline.row_chunks.CHUNK_BYTES", 1)  # the explicit path: one row per chunk
    gathers = []
    real_index_select = torch.Tensor.index_select
    def counted_index_select(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
        gathers.append(len(index))
        return real_index_select(tensor, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", counted_index_select)
    explicit = audio_attention(query, key, value, allowed, fused=False, kv_rows=kv_rows)
    assert gathers == [1] * 12  # K and V of each row, one row per chunk
    gathers.clear()
    fused = audio_attention(query, key, value, allowed, fused=True, kv_rows=kv_rows)
    assert gathers == [6, 6]
    assert relative_error(fused, explicit) < 1e-5


def test_conv_stem_in_bounded_calls_equals_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The conv stem splits many pieces into calls within `pipeline.row_chunks.CHUNK_BYTES` (bounded
    activations); pieces are independent, so the steps are the same."""
    tower = random_tower(seed=4)
    mel = torch.randn(8 * 37, TINY_AUDIO.num_mel_bins, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = tower.conv_steps(mel)
        monkeypatch.setattr("pipeline.row_chunks.CHUNK_BYTES", 1)  # one piece per call
        assert tower.conv_pieces_per_call() == 1
        chunked = tower.conv_steps(mel)
    assert chunked.shape == (37, TINY_AUDIO.d_model)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
