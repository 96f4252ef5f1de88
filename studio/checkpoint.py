"""Save a diffusers Stable Diffusion pipeline as one A1111/civitai-style `.safetensors` checkpoint.

The file uses the original LDM key layout (`model.diffusion_model.*` UNet, `first_stage_model.*` VAE,
`cond_stage_model.*` or `conditioner.embedders.*` text encoders), written as the exact inverse of diffusers'
single-file converters (`diffusers.loaders.single_file_utils`), so that
`StableDiffusionPipeline.from_single_file(path, config=<diffusers folder>)` loads every weight back bit for bit,
and A1111, ComfyUI and civitai read it like any other checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY, LDM_VAE_KEYS
from safetensors.torch import save_file

from studio.base import FAMILIES, detect_family
from studio.errors import StudioError

VAE_KEY = LDM_VAE_KEYS[0]  # "first_stage_model."
SD1_CLIP_KEY = "cond_stage_model.transformer."
SD2_OPEN_CLIP_KEY = "cond_stage_model.model."
SDXL_CLIP_KEY = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_KEY = "conditioner.embedders.1.model."

# Inverses of the renames in diffusers' `update_unet_resnet_ldm_to_diffusers`,
# `update_vae_resnet_ldm_to_diffusers` and `update_vae_attentions_ldm_to_diffusers` (functions, not tables).
UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_state_dict(
    pipeline: DiffusionPipeline, family: str | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """All weights of `pipeline` (UNet, VAE, text encoders) under their single-file (LDM) names, on the CPU.

    `family` ("sd1", "sd2", "sdxl") picks the text-encoder layout; by default `detect_family(pipeline)`
    (which calls tiny models SD1: a tiny SD2-style pipeline must say `family="sd2"`).
    `dtype` casts floating-point weights (e.g. `torch.float16` for the usual half-size civitai file).
    """
    family = family or detect_family(pipeline)
    if family not in FAMILIES:
        raise StudioError(f"cannot save a single-file checkpoint of family {family!r}: expected one of {FAMILIES}")
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ()):
        module = getattr(pipeline, name, None)
        if module is None:
            raise StudioError(f"cannot save a {family} single-file checkpoint: the pipeline has no {name}")
        if any("lora_" in key or ".base_layer." in key for key in module.state_dict()):
            raise StudioError(
                f"cannot save a single-file checkpoint: the {name} still has LoRA layers; "
                "fuse and unload them first (pipeline.fuse_lora(); pipeline.unload_lora_weights())"
            )

    state = _prefixed(LDM_UNET_KEY, unet_to_ldm(pipeline.unet))
    state |= _prefixed(VAE_KEY, vae_to_ldm(pipeline.vae))
    if family == "sd1":
        state |= _prefixed(SD1_CLIP_KEY, _text_model_state(pipeline.text_encoder))
    elif family == "sd2":
        state |= _prefixed(SD2_OPEN_CLIP_KEY, open_clip_to_ldm(pipeline.text_encoder))
    else:
        state |= _prefixed(SDXL_CLIP_KEY, _text_model_state(pipeline.text_encoder))
        state |= _prefixed(SDXL_OPEN_CLIP_KEY, open_clip_to_ldm(pipeline.text_encoder_2))

    return {key: _cpu(tensor, dtype) for key, tensor in state.items()}


def save_single_file(
    pipeline: DiffusionPipeline,
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    family: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `pipeline` to `path` as one `.safetensors` checkpoint (see `ldm_state_dict`); returns the path.

    The file appears whole or not at all: it is written under a temporary name in the same folder, then renamed.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise StudioError(f"{path}: a single-file checkpoint must be written as .safetensors")
    try:
        state = ldm_state_dict(pipeline, family=family, dtype=dtype)
    except StudioError as error:
        raise StudioError(f"{path}: {error}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, temp_path, metadata=metadata)
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return path


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's weights under LDM names (`input_blocks`, `middle_block`, `output_blocks`, `time_embed`, ...).

    LDM numbers the blocks flat: input block 0 is `conv_in`, then each down block contributes `layers_per_block`
    (resnet, attention) pairs and one downsampler; each up block contributes `layers_per_block + 1` pairs, its
    upsampler sitting after the last pair's resnet (slot 1) or attention (slot 2).
    """
    config = unet.config
    per_block = config.layers_per_block
    if not isinstance(per_block, int):
        raise StudioError(
            f"cannot save this UNet as a single-file checkpoint: layers_per_block={per_block!r} is not one number"
        )
    names = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.addition_embed_type == "text_time":
        names |= DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    if config.class_embed_type in ("timestep", "projection"):
        names |= DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"]

    def add_resnet(diffusers_name: str, ldm_name: str) -> None:
        for diffusers_part, ldm_part in UNET_RESNET_NAMES.items():
            names[f"{diffusers_name}.{diffusers_part}"] = f"{ldm_name}.{ldm_part}"

    for block in range(len(unet.down_blocks)):
        first = 1 + block * (per_block + 1)
        for layer in range(per_block):
            add_resnet(f"down_blocks.{block}.resnets.{layer}", f"input_blocks.{first + layer}.0")
            names[f"down_blocks.{block}.attentions.{layer}"] = f"input_blocks.{first + layer}.1"
        names[f"down_blocks.{block}.downsamplers.0.conv"] = f"input_blocks.{first + per_block}.0.op"

    add_resnet("mid_block.resnets.0", "middle_block.0")
    names["mid_block.attentions.0"] = "middle_block.1"
    add_resnet("mid_block.resnets.1", "middle_block.2")

    for block, up_block in enumerate(unet.up_blocks):
        first = block * (per_block + 1)
        for layer in range(per_block + 1):
            add_resnet(f"up_blocks.{block}.resnets.{layer}", f"output_blocks.{first + layer}.0")
            names[f"up_blocks.{block}.attentions.{layer}"] = f"output_blocks.{first + layer}.1"
        upsampler_slot = 2 if getattr(up_block, "attentions", None) else 1
        names[f"up_blocks.{block}.upsamplers.0.conv"] = f"output_blocks.{first + per_block}.{upsampler_slot}.conv"

    return _renamed(unet.state_dict(), names, "unet")


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE's weights under LDM names; its mid-block attention projections become 1x1 convolutions.

    LDM numbers the decoder's up blocks from the lowest resolution up, the reverse of diffusers' order.
    """
    names = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])

    def add_resnet(diffusers_name: str, ldm_name: str) -> None:
        names[diffusers_name] = ldm_name
        for diffusers_part, ldm_part in VAE_RESNET_NAMES.items():
            names[f"{diffusers_name}.{diffusers_part}"] = f"{ldm_name}.{ldm_part}"

    for part in ("encoder", "decoder"):
        add_resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        add_resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        for diffusers_part, ldm_part in VAE_ATTENTION_NAMES.items():
            names[f"{part}.mid_block.attentions.0.{diffusers_part}"] = f"{part}.mid.attn_1.{ldm_part}"

    for block, down_block in enumerate(vae.encoder.down_blocks):
        for layer in range(len(down_block.resnets)):
            add_resnet(f"encoder.down_blocks.{block}.resnets.{layer}", f"encoder.down.{block}.block.{layer}")
        names[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = f"encoder.down.{block}.downsample.conv"

    num_up_blocks = len(vae.decoder.up_blocks)
    for block, up_block in enumerate(vae.decoder.up_blocks):
        ldm_block = num_up_blocks - 1 - block
        for layer in range(len(up_block.resnets)):
            add_resnet(f"decoder.up_blocks.{block}.resnets.{layer}", f"decoder.up.{ldm_block}.block.{layer}")
        names[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = f"decoder.up.{ldm_block}.upsample.conv"

    state = _renamed(vae.state_dict(), names, "vae")
    attention_weights = tuple(f".mid.attn_1.{name}.weight" for name in ("q", "k", "v", "proj_out"))
    return {
        key: tensor[:, :, None, None] if key.endswith(attention_weights) and tensor.ndim == 2 else tensor
        for key, tensor in state.items()
    }


def open_clip_to_ldm(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's weights in OpenCLIP layout (`transformer.resblocks.N.attn.in_proj_weight`, ...).

    OpenCLIP keeps q, k and v as one stacked `in_proj` matrix and stores `text_projection` transposed.
    """
    layer_names = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    transformer_renames = DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]
    state = {}
    for key, tensor in _text_model_state(text_encoder).items():
        if key in layer_names:
            state[layer_names[key]] = tensor.T.contiguous() if key == "text_projection.weight" else tensor
        elif key.startswith("text_model.encoder.layers."):
            for diffusers_part, ldm_part in transformer_renames.items():
                key = key.replace(diffusers_part, ldm_part)
            state["transformer." + key] = tensor
        else:
            raise StudioError(f"cannot save the text encoder in OpenCLIP layout: no name for weight {key!r}")

    for q_key in [key for key in state if ".attn.q_proj." in key]:
        attention, kind = q_key.split(".q_proj.")  # kind: "weight" or "bias"
        stacked = [state.pop(f"{attention}.{projection}.{kind}") for projection in ("q_proj", "k_proj", "v_proj")]
        state[f"{attention}.in_proj_{kind}"] = torch.cat(stacked)
    return state


def _text_model_state(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's state dict with `text_model.` in front of the transformer's keys, as single files store them.

    transformers 5 flattened `CLIPTextModel` (no `text_model` submodule); `CLIPTextModelWithProjection` kept it.
    """
    state = text_encoder.state_dict()
    if hasattr(text_encoder, "text_model"):
        return state
    return {f"text_model.{key}": tensor for key, tensor in state.items()}


def _renamed(state: dict[str, torch.Tensor], names: dict[str, str], component: str) -> dict[str, torch.Tensor]:
    """Rename each key by its longest dotted prefix found in `names`; a key with none cannot be saved."""
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        for length in range(len(parts), 0, -1):
            prefix = ".".join(parts[:length])
            if prefix in names:
                renamed[names[prefix] + key[len(prefix) :]] = tensor
                break
        else:
            raise StudioError(f"cannot save the {component} as a single-file checkpoint: no LDM name for {key!r}")
    return renamed


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: tensor for key, tensor in state.items()}


def _cpu(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.detach().to("cpu").contiguous()
