"""Prompt embeddings as the SD pipelines make them, with A1111's "Clip skip" (kohya's `--clip_skip`).

Clip skip N takes the text encoder's output N - 1 layers before its last (1: the last layer, the default),
then the encoder's final layer norm, as its last layer's output has. It is an SD1 setting: SD2's encoder
(converted without OpenCLIP's last layer) and SDXL's already give their penultimate layer, and A1111 ignores
clip skip for them, so the studio refuses it there (`check_clip_skip`) rather than render what A1111 would
not. `encode_prompts` itself follows diffusers' SDXL rule too (N - 1 layers before the penultimate; the
pooled embedding stays the second encoder's projected output). The same function serves training and
generation, so a LoRA trained at clip skip 2 is used at clip skip 2.

Written out rather than calling `pipeline.encode_prompt` so that gradients flow through text encoders that
are being trained (and wrapped for DDP), as in diffusers' own training scripts, and because diffusers 0.42's
SD1 clip skip reaches for `text_encoder.text_model`, which transformers 5's `CLIPTextModel` no longer has.
"""

from __future__ import annotations

import torch

from studio.errors import StudioError


def encode_prompts(
    text_encoders: list, tokenizers: list, prompts: list[str], clip_skip: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings, SDXL's pooled embeddings or None) for `prompts`; one text encoder means SD1/SD2."""
    _check_layer_count(text_encoders, clip_skip)
    if len(text_encoders) == 1:
        text_encoder = text_encoders[0]
        ids = _token_ids(tokenizers[0], prompts).to(_device_of(text_encoder))
        if clip_skip == 1:
            return text_encoder(ids)[0], None
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
        return _final_layer_norm(text_encoder)(hidden), None
    hidden_states, pooled = [], None
    for text_encoder, tokenizer in zip(text_encoders, tokenizers):
        output = text_encoder(_token_ids(tokenizer, prompts).to(_device_of(text_encoder)), output_hidden_states=True)
        pooled = output[0]  # CLIPTextModelWithProjection (the last encoder): the projected pooled embedding
        hidden_states.append(output.hidden_states[-(clip_skip + 1)])
    return torch.cat(hidden_states, dim=-1), pooled


@torch.no_grad()
def prompt_arguments(
    pipeline, prompt: str | list[str], negative_prompt: str | None = None, clip_skip: int = 1
) -> dict[str, object]:
    """Keyword arguments that make an SD/SDXL `pipeline` call condition on `prompt` at `clip_skip`.

    At 1 the prompts themselves (the pipeline encodes them, as always). Above, embeddings from
    `encode_prompts` for the prompt and the negative prompt alike, as A1111 and ComfyUI apply clip skip to
    both (diffusers' own `clip_skip` applies it to the prompt only); an SDXL pipeline that zeroes the
    embeddings of a missing negative prompt (`force_zeros_for_empty_prompt`) still does."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if clip_skip == 1:
        if negative_prompt is not None and not isinstance(prompt, str):  # a list of prompts takes a list of them
            return {"prompt": prompt, "negative_prompt": [negative_prompt] * len(prompts)}
        return {"prompt": prompt, "negative_prompt": negative_prompt}
    text_encoders, tokenizers = pipeline_text_encoders(pipeline), pipeline_tokenizers(pipeline)
    embeds, pooled = encode_prompts(text_encoders, tokenizers, prompts, clip_skip)
    negative_embeds, negative_pooled = encode_prompts(
        text_encoders, tokenizers, [negative_prompt or ""] * len(prompts), clip_skip
    )
    if negative_prompt is None and pipeline.config.get("force_zeros_for_empty_prompt", False):
        negative_embeds, negative_pooled = torch.zeros_like(negative_embeds), torch.zeros_like(negative_pooled)
    arguments = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    if pooled is not None:
        arguments |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    return arguments


def pipeline_text_encoders(pipeline) -> list[torch.nn.Module]:
    """The SD pipeline's text encoder, or SDXL's two."""
    second = getattr(pipeline, "text_encoder_2", None)
    return [pipeline.text_encoder] + ([second] if second is not None else [])


def pipeline_tokenizers(pipeline) -> list:
    """The tokenizer of each of `pipeline_text_encoders`, in the same order."""
    second = getattr(pipeline, "tokenizer_2", None)
    return [pipeline.tokenizer] + ([second] if second is not None else [])


def check_clip_skip(family: str, text_encoders: list, clip_skip: int) -> None:
    """Clip skip above 1 is for SD1 models (see the module docstring), up to the text encoder's layer count."""
    if clip_skip > 1 and family != "sd1":
        raise StudioError(
            f"clip skip {clip_skip}: for SD1.x models only; {family.upper()} already conditions on the text "
            "encoder's penultimate layer (A1111 ignores clip skip there)"
        )
    _check_layer_count(text_encoders, clip_skip)


def _check_layer_count(text_encoders: list, clip_skip: int) -> None:
    """At most the layer count, so at least one layer's output is used (SDXL: one fewer, counted from its
    penultimate layer)."""
    layers = min(_unwrapped(text_encoder).config.num_hidden_layers for text_encoder in text_encoders)
    layers -= len(text_encoders) == 2
    if not 1 <= clip_skip <= layers:
        raise StudioError(f"clip skip {clip_skip}: must be from 1 to {layers}, the text encoder's layer count")


def _final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """transformers 5 flattened `CLIPTextModel`; transformers 4 nests it under `text_model`."""
    model = _unwrapped(text_encoder)
    return getattr(model, "text_model", model).final_layer_norm


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel keeps the model as `.module`


def _token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
