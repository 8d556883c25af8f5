"""End to end against an independent implementation: transformers' `Qwen3ASRForConditionalGeneration`.

A spoken sentence (espeak-ng, under 8 s, so one offline attention window) goes through

* ours: `pipeline.features.log_mel` -> the offline tower (`AudioTower.forward_offline`, as the windowed backend runs
  it) -> `pipeline.rolling.decode_from_scratch` with the prompt of `pipeline.prompt.build_causal_prompt` and the
  causal-mode controls of `pipeline.decoding` (`DecodeOptions.causal`: suppress the four prompt-structure ids,
  repetition penalty 1.15, no-repeat 3-gram ban, stop at <|im_end|> only, at most 256 new tokens);
* transformers: its own audio encoder, projector, Qwen3 decoder and `generate` (greedy), with weights read straight
  from the checkpoint file, fed the same prompt ids and the *same* mel.

Features. The offline path of this runtime is `log_mel` (the streaming extractor, running-max floor) followed by
`forward_offline`; transformers' feature extractor floors at the whole clip's max instead. Both sides therefore take
the mel our extractor gives, zero-padded to whole 100-frame chunks with `input_features_mask` on transformers' side,
so the comparison is of tower, projector, prompt, decoder and decoding, not of the two clamp policies.

Decode controls on transformers' side:

* suppress tokens, greedy, eos = <|im_end|> only, max_new_tokens: `GenerationConfig` as is.
* repetition penalty 1.15: transformers' own `RepetitionPenaltyLogitsProcessor`, passed as a logits processor with
  `prompt_ignore_length` = prompt length. `GenerationConfig.repetition_penalty` cannot be used: `generate` sets
  `prompt_ignore_length` only to the left padding, so it would also penalize every id of the prompt, whereas the
  runtime (reference causal runtime) penalizes only the ids generated in this hypothesis (on this clip the two
  diverge after a few dozen tokens).
* no-repeat 3-gram ban: transformers' own `NoRepeatNGramLogitsProcessor`, passed as a logits processor that shows it
  only the generated ids. `GenerationConfig.no_repeat_ngram_size` cannot be used: its processor has no way to ignore
  the prompt, so it would ban n-grams occurring in (or spanning into) the prompt, which the runtime does not.

The ids must be equal token for token (transformers' output carries the final <|im_end|> when decoding stopped before
the budget; ours does not append stops). Two checkpoints: the tiny random one, and the same with the rows of the
suppressed ids and of <|im_end|> scaled up (in the file, so both sides read them), so that suppression is binding
(the raw argmax is a suppressed id at some step) and decoding ends at <|im_end|> before the budget; both are checked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor
from transformers.models.qwen3_asr.configuration_qwen3_asr import Qwen3ASRConfig as NativeASRConfig
from transformers.models.qwen3_asr.modeling_qwen3_asr import (
    Qwen3ASRForConditionalGeneration,
    _get_feat_extract_output_lengths,
)

from pipeline.audio_io import read_audio
from pipeline.checkpoint import ASRModel, load_model, read_config
from pipeline.decoding import DecodeControls, DecodeOptions
from pipeline.features import SAMPLE_RATE, log_mel
from pipeline.prompt import CausalPrompt, SpecialTokenIds, build_causal_prompt
from pipeline.rolling import decode_from_scratch
from tests.hf_reference import native_encoder_config, native_text_config
from tests.speech import speak

CLIP_TEXT = "The quick brown fox jumps over the lazy dog."
MAX_CLIP_SEC = 8.0
MIN_TOKENS = 5
# Row scales of the "boosted" checkpoint: suppressed ids win the raw argmax, <|im_end|> ends decoding early.
SUPPRESSED_ROW_SCALE = 4.0
IM_END_ROW_SCALE = 2.5


@pytest.fixture(scope="module")
def clip_mel(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    spoken = speak(CLIP_TEXT, tmp_path_factory.mktemp("clip") / "fox.wav")
    samples = read_audio(spoken.path)
    assert len(samples) / SAMPLE_RATE <= MAX_CLIP_SEC
    return log_mel(samples)


@pytest.fixture(scope="module")
def boosted_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with the embedding (= output) rows of the suppressed ids and of <|im_end|> scaled."""
    out = tmp_path_factory.mktemp("boosted") / "model"
    shutil.copytree(tiny_checkpoint, out)
    model = load_model(out, tower=None, dtype=torch.float32)
    special = build_causal_prompt(model.tokenizer).special
    options = DecodeOptions.causal(special)
    state = load_file(out / "model.safetensors")
    for key in ("thinker.model.embed_tokens.weight", "thinker.lm_head.weight"):
        rows = state[key].to(torch.float32)
        rows[list(options.suppress_token_ids)] *= SUPPRESSED_ROW_SCALE
        rows[special.im_end] *= IM_END_ROW_SCALE
        state[key] = rows.to(state[key].dtype)
    save_file(state, out / "model.safetensors")
    return out


def reference_model(checkpoint: Path, special: SpecialTokenIds) -> Qwen3ASRForConditionalGeneration:
    """transformers' whole Qwen3-ASR in fp32, its weights mapped from the official-layout file by key alone."""
    config = read_config(checkpoint)
    native = NativeASRConfig(
        audio_config=native_encoder_config(config.audio).to_dict(),
        text_config=native_text_config(config.text).to_dict(),
        audio_token_id=special.audio_pad,
        pad_token_id=special.end_of_text,
        eos_token_id=special.im_end,
    )
    model = Qwen3ASRForConditionalGeneration(native).eval()
    renames = {
        "thinker.audio_tower.proj1.": "model.multi_modal_projector.linear_1.",
        "thinker.audio_tower.proj2.": "model.multi_modal_projector.linear_2.",
        "thinker.audio_tower.": "model.audio_tower.",
        "thinker.model.": "model.language_model.",
        "thinker.lm_head.": "lm_head.",
    }
    state = {}
    for key, value in load_file(checkpoint / "model.safetensors").items():
        prefix = next(p for p in renames if key.startswith(p))
        state[renames[prefix] + key[len(prefix) :]] = value.to(torch.float32)
    model.load_state_dict(state, strict=True)
    return model


class GeneratedOnly(LogitsProcessor):
    """Run a transformers logits processor on the generated ids only (the prompt's first `prompt_length` cut off)."""

    def __init__(self, inner: LogitsProcessor, prompt_length: int) -> None:
        self.inner = inner
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.inner(input_ids[:, self.prompt_length :], scores)


def reference_features(mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our mel [T, bins] as transformers takes it: [1, bins, T padded to whole 100-frame chunks] and its frame mask."""
    frames = mel.shape[0]
    padded = -(-frames // 100) * 100
    features = torch.zeros(1, mel.shape[1], padded)
    features[0, :, :frames] = mel.T
    features_mask = torch.zeros(1, padded, dtype=torch.long)
    features_mask[0, :frames] = 1
    return features, features_mask


def reference_generate(
    reference: Qwen3ASRForConditionalGeneration, prompt: CausalPrompt, mel: torch.Tensor, options: DecodeOptions
) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy ids after the prompt (a final stop included), and its raw logits [steps, vocab]."""
    frames = mel.shape[0]
    features, features_mask = reference_features(mel)
    steps = int(_get_feat_extract_output_lengths(torch.tensor(frames), reference.config.audio_config.n_window))
    input_ids = torch.tensor([prompt.input_ids(steps)])
    prompt_length = input_ids.shape[1]
    generation = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=options.max_new_tokens,
        eos_token_id=list(options.stop_token_ids),
        pad_token_id=prompt.special.end_of_text,
        suppress_tokens=list(options.suppress_token_ids),
    )
    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(options.repetition_penalty, prompt_ignore_length=prompt_length),
            GeneratedOnly(NoRepeatNGramLogitsProcessor(options.no_repeat_ngram_size), prompt_length),
        ]
    )
    with torch.inference_mode():
        out = reference.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            input_features=features,
            input_features_mask=features_mask,
            generation_config=generation,
            logits_processor=processors,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, prompt_length:].tolist(), torch.cat(out.logits)


def our_decode(
    model: ASRModel, prompt: CausalPrompt, mel: torch.Tensor, options: DecodeOptions
) -> tuple[list[int], torch.Tensor]:
    """Our hypothesis ids and the offline tower's audio embeddings they were decoded from."""
    with torch.inference_mode():
        audio = model.audio_tower.forward_offline(mel)
    tokens = list(decode_from_scratch(model.text_decoder, prompt, audio, DecodeControls(options)).tokens)
    return tokens, audio


@pytest.mark.parametrize("language", ["English", None])
@pytest.mark.parametrize("boosted", [False, True], ids=["tiny", "boosted"])
def test_offline_decode_equals_transformers_generate(
    request: pytest.FixtureRequest, clip_mel: torch.Tensor, language: str | None, boosted: bool
) -> None:
    checkpoint = request.getfixturevalue("boosted_checkpoint" if boosted else "tiny_checkpoint")
    model = load_model(checkpoint, tower=None, dtype=torch.float32)
    prompt = build_causal_prompt(model.tokenizer, language=language)
    options = DecodeOptions.causal(prompt.special)
    assert options.repetition_penalty == 1.15 and options.no_repeat_ngram_size == 3
    assert options.stop_token_ids == (prompt.special.im_end,)

    ours, our_audio = our_decode(model, prompt, clip_mel, options)
    reference = reference_model(checkpoint, prompt.special)
    theirs, raw_logits = reference_generate(reference, prompt, clip_mel, options)

    # Token equality tolerates small numeric differences (greedy margins); the audio embeddings are checked closely.
    with torch.inference_mode():
        their_audio = reference.get_audio_features(*reference_features(clip_mel), return_dict=True).pooler_output
    torch.testing.assert_close(our_audio, their_audio, rtol=1e-4, atol=1e-5)

    stopped = len(ours) < options.max_new_tokens
    assert theirs == ours + ([prompt.special.im_end] if stopped else [])
    assert len(ours) >= MIN_TOKENS
    if boosted:
        # The fixture must exercise what the tiny one does not: a binding suppression and a stop at <|im_end|>.
        assert stopped
        assert set(raw_logits.argmax(dim=-1).tolist()) & set(options.suppress_token_ids)
