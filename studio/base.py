"""Resolve a base-model source to a ready diffusers pipeline, its family, device and dtype.

Sources: "demo" (the embedded demo model), "tiny-sd" / "tiny-sdxl" (random test pipelines), a local
diffusers folder, a single-file A1111/civitai checkpoint, or a hub id loaded from the local cache.
Every failure a user can cause becomes a one-line `StudioError` that names the source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError, safe_open

from studio.errors import StudioError
from studio.paths import DEMO_MODEL_DIR
from studio.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

FAMILIES = ("sd1", "sd2", "sdxl")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip


@dataclass
class BaseModel:
    """A loaded base model: the pipeline and what the rest of the studio needs to know about it."""

    pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline
    family: str
    source: str
    device: torch.device
    dtype: torch.dtype
    base_config: str | None = None  # what a single-file source was loaded with: loading it again needs the same
    allow_pickle: bool = False


def pick_device_dtype(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """CUDA + fp16 when available, else MPS + fp16, else CPU + fp32; either part can be forced."""
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.float16
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise StudioError(f"unknown dtype {dtype!r}: use one of fp32, fp16, bf16")
        dtype = DTYPES[dtype]
    return device, dtype


def detect_family(pipeline: DiffusionPipeline) -> str:
    """Family from the pipeline's structure, not its name: SDXL has two text encoders and `text_time`
    added conditioning; SD2 cross-attends to 1024-dim (OpenCLIP ViT-H) states; the rest is SD1."""
    unet = getattr(pipeline, "unet", None)
    if unet is None or getattr(pipeline, "text_encoder", None) is None:
        raise StudioError(f"{type(pipeline).__name__} is not a Stable Diffusion text-to-image pipeline")
    if getattr(pipeline, "text_encoder_2", None) is not None and unet.config.addition_embed_type == "text_time":
        return "sdxl"
    if unet.config.cross_attention_dim == 1024:
        return "sd2"
    return "sd1"


def load_base(
    source: str | Path = "demo",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    config: str | Path | None = None,
    allow_pickle: bool = False,
) -> BaseModel:
    """Load `source` as a pipeline on `device`/`dtype`.

    `config` is for single-file checkpoints: a local diffusers folder (or cached hub id) whose component
    configs describe the checkpoint, needed offline. `allow_pickle` opts in to `.ckpt`/`.pt`/`.bin`
    checkpoints, which diffusers then reads with `torch.load(weights_only=True)`.
    """
    device, dtype = pick_device_dtype(device, dtype)
    name = str(source)
    if name == "tiny-sd":
        pipeline = tiny_sd_pipeline()
    elif name == "tiny-sdxl":
        pipeline = tiny_sdxl_pipeline()
    elif name == "demo":
        if not (DEMO_MODEL_DIR / "model_index.json").is_file():
            raise StudioError(f"demo model missing at {DEMO_MODEL_DIR}: rebuild it with tools/build_demo_model.py")
        pipeline = _load_folder(DEMO_MODEL_DIR, name)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            pipeline = _load_folder(path, name)
        elif path.is_file():
            pipeline = _load_single_file(path, config, allow_pickle)
        elif HUB_ID.match(name) and not name.endswith((".safetensors",) + PICKLE_SUFFIXES):
            pipeline = _load_hub_id(name)
        else:
            raise StudioError(f"{name}: no such file or folder, and not a hub id (owner/name)")
    if not isinstance(pipeline, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise StudioError(f"{name}: is a {type(pipeline).__name__}, not an SD1/SD2/SDXL text-to-image pipeline")
    family = detect_family(pipeline)
    pipeline.to(device=device)
    if pipeline.unet.dtype != dtype:  # casting to the dtype a model already has only earns a warning
        pipeline.to(dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return BaseModel(
        pipeline=pipeline, family=family, source=name, device=device, dtype=dtype,
        base_config=str(config) if config else None, allow_pickle=allow_pickle,
    )


def _load_folder(path: Path, name: str) -> DiffusionPipeline:
    if not (path / "model_index.json").is_file():
        raise StudioError(f"{name}: folder has no model_index.json, so it is not a diffusers pipeline folder")
    try:
        return DiffusionPipeline.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as error:
        raise StudioError(f"{name}: cannot load the diffusers folder: {_first_line(error)}") from error


def _load_hub_id(hub_id: str) -> DiffusionPipeline:
    offline = hub_constants.HF_HUB_OFFLINE
    try:
        return DiffusionPipeline.from_pretrained(hub_id, local_files_only=offline)
    except (OSError, ValueError) as error:
        if offline:
            reason = "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        else:
            reason = f"could not be loaded from the hub or the local cache ({_first_line(error)})"
        raise StudioError(
            f"{hub_id}: {reason}; download it once where there is network (`hf download {hub_id}`), "
            "or pass a local diffusers folder or .safetensors checkpoint"
        ) from error


def _load_single_file(path: Path, config: str | Path | None, allow_pickle: bool) -> DiffusionPipeline:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        refuse_pickle(path, allow_pickle)
        pipeline_class = StableDiffusionPipeline  # the keys are unknown until diffusers unpickles it
    elif suffix == ".safetensors":
        pipeline_class = _single_file_pipeline_class(path)
    else:
        raise StudioError(f"{path}: not a .safetensors checkpoint (or a diffusers folder)")
    offline = hub_constants.HF_HUB_OFFLINE
    try:
        return pipeline_class.from_single_file(
            str(path), config=str(config) if config else None, local_files_only=offline
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        if config is None:
            hint = "its model config could not be resolved offline: pass config=<local diffusers folder or cached hub id> (--base-config)"
        else:
            hint = f"loading with config {config} failed: {_first_line(error)}"
        raise StudioError(f"{path}: {hint}") from error


def refuse_pickle(path: Path, allow_pickle: bool) -> None:
    """A `.ckpt`/`.pt`/`.pth`/`.bin` checkpoint is read only with the explicit opt-in (callers check early)."""
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise StudioError(
            f"{path}: {path.suffix.lower()} checkpoints are pickles that can run code; convert it to .safetensors, "
            "or opt in with allow_pickle=True / --allow-pickle (read with weights_only=True)"
        )


def _single_file_pipeline_class(path: Path) -> type[DiffusionPipeline]:
    """SDXL checkpoints carry `conditioner.embedders.*`; SD1/SD2 carry `cond_stage_model.*`."""
    try:
        with safe_open(path, framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
    except (SafetensorError, OSError) as error:
        raise StudioError(f"{path}: not a valid safetensors file ({_first_line(error)})") from error
    if not any(key.startswith("model.diffusion_model.") for key in keys):
        raise StudioError(f"{path}: no UNet weights (model.diffusion_model.*): not a Stable Diffusion checkpoint")
    if any(key.startswith("conditioner.embedders.") for key in keys):
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
