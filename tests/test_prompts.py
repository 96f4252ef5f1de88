"""Prompt embeddings with A1111's clip skip, checked against encoders cut short and against diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPTextModel

from studio.errors import StudioError
from studio.prompts import encode_prompts, prompt_arguments
from studio.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a red circle", "a sks shape, striped"]


def truncated(text_encoder: CLIPTextModel, layers: int) -> CLIPTextModel:
    """The same encoder with only its first `layers` layers: A1111's "stop at the layer N - 1 from the last"."""
    config = text_encoder.config.__class__.from_dict({**text_encoder.config.to_dict(), "num_hidden_layers": layers})
    short = CLIPTextModel(config).eval()
    missing, _ = short.load_state_dict(text_encoder.state_dict(), strict=False)
    assert not missing
    return short


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_sd_clip_skip_is_the_encoder_stopped_that_many_layers_early(clip_skip):
    pipe = tiny_sd_pipeline()
    layers = pipe.text_encoder.config.num_hidden_layers
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        expected = truncated(pipe.text_encoder, layers - clip_skip + 1)(ids).last_hidden_state
        embeds, pooled = encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS, clip_skip)
    assert pooled is None
    torch.testing.assert_close(embeds, expected)


def test_sdxl_clip_skip_matches_diffusers_for_the_prompt():
    pipe = tiny_sdxl_pipeline()
    with torch.no_grad():
        expected, _, expected_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", clip_skip=1)
        embeds, pooled = encode_prompts(
            [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2], PROMPTS, clip_skip=2
        )
        default, _ = encode_prompts(
            [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2], PROMPTS
        )
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, expected_pooled)  # the pooled embedding ignores clip skip
    assert not torch.allclose(embeds, default)


def test_prompt_arguments_skip_for_the_negative_prompt_too_and_keep_sdxls_zeroed_empty_negative():
    sd = tiny_sd_pipeline()
    assert prompt_arguments(sd, "a red circle", "blurry", 1) == {"prompt": "a red circle", "negative_prompt": "blurry"}
    arguments = prompt_arguments(sd, "a red circle", "blurry", 2)
    negative, _ = encode_prompts([sd.text_encoder], [sd.tokenizer], ["blurry"], 2)
    torch.testing.assert_close(arguments["negative_prompt_embeds"], negative)

    sdxl = tiny_sdxl_pipeline()
    assert sdxl.config.force_zeros_for_empty_prompt
    missing = prompt_arguments(sdxl, "a red circle", None, 2)
    assert not missing["negative_prompt_embeds"].any() and not missing["negative_pooled_prompt_embeds"].any()
    empty = prompt_arguments(sdxl, "a red circle", "", 2)
    assert empty["negative_prompt_embeds"].abs().sum() > 0


@pytest.mark.parametrize("clip_skip", [0, 6])
def test_a_clip_skip_outside_the_encoder_is_refused(clip_skip):
    pipe = tiny_sd_pipeline()  # 5 layers
    with pytest.raises(StudioError, match=rf"clip skip {clip_skip}: must be from 1 to 5"):
        encode_prompts([pipe.text_encoder], [pipe.tokenizer], PROMPTS, clip_skip)
    sdxl = tiny_sdxl_pipeline()  # 5 layers each, counted from the penultimate: 4 to skip at most
    encoders, tokenizers = [sdxl.text_encoder, sdxl.text_encoder_2], [sdxl.tokenizer, sdxl.tokenizer_2]
    with pytest.raises(StudioError, match=r"clip skip 5: must be from 1 to 4"):
        encode_prompts(encoders, tokenizers, PROMPTS, 5)
    assert encode_prompts(encoders, tokenizers, PROMPTS, 4)[0].shape[0] == len(PROMPTS)


def test_studio_renders_clip_skip_from_the_stopped_encoder_for_prompt_and_negative_prompt():
    from studio.adapters import Studio
    from studio.base import load_base

    studio = Studio(load_base("tiny-sd", device="cpu"))
    pipe = studio.pipeline

    def stopped_embeddings(text: str) -> torch.Tensor:
        ids = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            return truncated(pipe.text_encoder, pipe.text_encoder.config.num_hidden_layers - 1)(ids).last_hidden_state

    settings = dict(seed=3, steps=2, width=16, height=16)
    skipped = np.asarray(studio.generate("a red circle", negative_prompt="blurry", clip_skip=2, **settings)[0])
    expected = pipe(
        prompt_embeds=stopped_embeddings("a red circle"), negative_prompt_embeds=stopped_embeddings("blurry"),
        num_inference_steps=2, width=16, height=16, generator=torch.Generator().manual_seed(3),
    ).images[0]  # fmt: skip
    assert np.array_equal(skipped, np.asarray(expected))
    default = np.asarray(studio.generate("a red circle", negative_prompt="blurry", **settings)[0])
    assert not np.array_equal(skipped, default)


@pytest.mark.parametrize("base", ["tiny-sdxl"])
def test_clip_skip_is_refused_where_the_encoder_already_gives_its_penultimate_layer(base):
    from studio.adapters import Studio
    from studio.base import load_base

    studio = Studio(load_base(base, device="cpu"))
    with pytest.raises(StudioError, match=r"clip skip 2: for SD1.x models only; SDXL already conditions on"):
        studio.generate("a red circle", clip_skip=2, steps=1, width=32, height=32)
    assert studio.generate("a red circle", clip_skip=1, steps=1, width=32, height=32)  # the default is fine
