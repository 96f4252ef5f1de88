"""Read, inspect, convert and write Stable Diffusion LoRA files of every common format, safely.

Reading ends in one `LoraFile` whose `state_dict` is ready for
`pipe.load_lora_weights(lora.state_dict, adapter_name=...)`, whatever the file's format:

    unet.<module>.lora_A.weight, unet.<module>.lora_B.weight   (+ .lora_magnitude_vector.weight for DoRA)
    text_encoder.<module>..., text_encoder_2.<module>...       (paths in the INSTALLED transformers layout)

`open_lora` gives the same one module at a time (header read and checked first, then each module's
factors loaded on request), for code that must not hold a whole file in memory (merging).

Each module's scale (kohya `alpha / rank`, LyCORIS rules, diffusers adapter metadata) is baked into its
factors, split as sqrt(|scale|) into both so half-precision factors do not underflow, hence
delta_W = lora_B @ lora_A (convolutions: the 1x1 `lora_B` after the `lora_A` convolution) and diffusers
loads every module with lora_alpha == rank, scale 1, whatever the per-module ranks.

Formats (`LoraFile.format`; the most specific one present in the file wins):
  "diffusers"  diffusers/peft naming, `lora_A`/`lora_B` (optionally `.alpha` keys or diffusers'
               `lora_adapter_metadata`), text encoders in either transformers layout
  "kohya"      kohya/A1111/civitai naming (`lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_`;
               `lora_down`/`lora_up`/`alpha`), SDXL UNet in its original `input_blocks_*` names
  "locon"      kohya naming with convolutions of kernel > 1 (LyCORIS LoCon, Tucker `lora_mid` included)
  "dora"       DoRA magnitudes: kohya/LyCORIS `dora_scale` (per output row) or `lora_magnitude_vector`
  "loha"       LyCORIS LoHa: `hada_w1_a/b`, `hada_w2_a/b`, Tucker cores `hada_t1/t2` for convolutions
  "lokr"       LyCORIS LoKr: `lokr_w1` or `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b`, Tucker core `lokr_t2`
`LoraFile.naming` says which naming the file used: "diffusers" or "kohya".

LoHa and LoKr become standard LoRA factors exactly, by algebra, without any truncation:
  LoHa  s * (B1 A1) * (B2 A2)  = (B1 (.) B2)(A1 (.) A2)   row-wise Khatri-Rao products, rank r1*r2
  LoKr  s * kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2) mixed-product rule, rank r1*r2
where a part stored full (`lokr_w1`, `lokr_w2`) is factored as (I, W) or (W, I), rank min(its dims), and
Tucker cores are folded into the down factor. When r1*r2 would reach min(out, in*kh*kw), the module is
stored as the equally exact pair (I, delta_W) or (delta_W, I) of rank min(out, in*kh*kw) instead; inspect
shows every converted rank. Converted factors are float32.
The 2-D factors LyCORIS stores for a convolution do not carry the kernel size; it is taken from the
Stable Diffusion UNet's architecture (3x3 for resnet and sampler convolutions and conv_in/conv_out,
1x1 for conv_shortcut and, on SD1, proj_in/proj_out).

Family ("sd1", "sd2", "sdxl") comes from the tensors first: the cross-attention context width
(`attn2.to_k` input: 768 sd1, 1024 sd2, 2048 sdxl) or the first text encoder's width (768 sd1,
1024 sd2); then structure only SDXL has (a second text encoder, `add_embedding`/`label_emb`, a
transformer block index above 0, kohya's `lora_te1_` names); then the file's metadata
(`ss_base_model_version`, `ss_v2`, `modelspec.architecture`); files that say nothing (tiny test
models, UNet-only files of unknown width) are "sd1".

Why not diffusers' own kohya loading (0.42, with transformers 5; see the "known_breakage" tests): it
turns per-module alphas into peft patterns that match no module, so those modules silently get the most
common alpha; it stops with "Could not automatically infer state dict type" on kohya text-encoder keys
without out_proj/MLP layers; it drops `dora_scale`; it refuses LoHa/LoKr; and transformers 5 ignores
peft's bare `lora_magnitude_vector` keys in text encoders (hence the `.weight` keys above).

Hashes (`inspect`): sha256 of the whole file; civitai's AutoV2 (its first 10 hex digits); the
kohya/addnet hash, sha256 of everything after the safetensors header, which A1111 (>= 1.6) uses for
LoRAs, and its first 12 hex digits, the short hash A1111 writes in "Lora hashes" (for pickle files
A1111 hashes the whole file, so its short hash is then the first 12 of sha256).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from studio.errors import StudioError

FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
NAMINGS = ("diffusers", "kohya")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TRIGGER_WORDS_KEY = "studio.trigger_words"  # our metadata: a JSON list, or comma-separated words
DIFFUSERS_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' saved LoraConfig per component
TOP_TAGS = 5
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# Suffix after the module name -> our part name.
KOHYA_PARTS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "dora_scale": "magnitude",
    **{name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{name: name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}
DIFFUSERS_PARTS = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_magnitude_vector.weight": "magnitude",
    "lora_magnitude_vector": "magnitude",
    "alpha": "alpha",
}

# Words of diffusers and transformers module names that contain "_" themselves; kohya names replace
# every "." by "_", so these are re-joined when reading. Longest first.
# fmt: off
COMPOUND_WORDS = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
    "out_proj", "text_projection", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
    "position_embedding",
)
# fmt: on
NAME_COMPOUNDS = sorted((tuple(word.split("_")) for word in COMPOUND_WORDS), key=len, reverse=True)
# SDXL's original (sgm) UNet names, as kohya writes them, <-> diffusers names.
SGM_RESNET_PARTS = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
SGM_TOP_LEVEL = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
}
LAYERS_PER_BLOCK = 2  # SD1, SD2 and SDXL UNets (and the tiny ones) all have 2 resnets per down block


@dataclass
class LoraModule:
    """One adapted layer as the file stores it, described from the header (and its alpha scalar)."""

    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    module: str  # module path in the installed layout (in `inspect`: in the layout files use)
    file_name: str  # the module's name in the file (for messages)
    kind: str  # "lora" | "loha" | "lokr"
    keys: dict[str, str]  # part name -> key in the file
    out_features: int
    in_features: int  # input channels
    kernel: tuple[int, int] | None  # None for linear layers
    rank: int | None  # the file's rank; None for a LoKr whose two parts are both stored full
    alpha: float | None  # None when the file has no alpha for this module
    scale: float  # what the file multiplies the product of its factors by
    converted_rank: int  # rank of the standard LoRA factors handed to diffusers
    dora: bool


@dataclass
class LoraFile:
    """A LoRA file read into diffusers/peft naming (see the module docstring for the conventions)."""

    path: Path | None
    format: str  # "diffusers" | "kohya" | "locon" | "dora" | "loha" | "lokr"
    naming: str  # "diffusers" | "kohya"
    family: str  # "sd1" | "sd2" | "sdxl"
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: list[LoraModule]
    unmapped_keys: list[str] = field(default_factory=list)  # keys this reader could not place; not loaded

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if any(m.component == c for m in self.modules)]

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules if m.rank is not None})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules if m.alpha is not None})

    @property
    def trigger_words(self) -> list[str]:
        return trigger_words(self.metadata)


@dataclass
class LoraReader:
    """An open LoRA file (see `open_lora`): what its header says, and its modules' tensors on request."""

    path: Path
    format: str
    naming: str
    family: str
    metadata: dict[str, str]
    modules: list[LoraModule]
    unmapped_keys: list[str]
    _tensors: _Tensors = field(repr=False)

    def factors(self, module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A, lora_B) of one of `modules`, scale baked in, in peft's shapes (conv: A 4-D, B 1x1)."""
        return _module_factors(module, self._tensors)

    def magnitude(self, module: LoraModule) -> torch.Tensor:
        """A DoRA module's magnitudes in peft's shape: (out,), for a convolution (1, out, 1, 1)."""
        magnitude = _load_checked(self._tensors, module.keys["magnitude"], module)
        return magnitude.reshape((1, -1, 1, 1) if module.kernel else (-1,))


@dataclass
class LoraReport:
    """Everything `python -m studio.lora inspect` shows, read from the header where possible."""

    path: str
    format: str
    naming: str
    family: str
    components: dict[str, int]  # component -> number of modules
    num_modules: int
    ranks: list[int]
    converted_ranks: list[int]
    alphas: list[float]
    scales: list[float]  # what each module multiplies its product by (alpha / rank, or 1)
    dtypes: list[str]
    size_bytes: int
    sha256: str
    autov2: str
    addnet_hash: str
    a1111_hash: str
    trigger_words: list[str]
    top_tags: list[tuple[str, int]]
    training_metadata: dict[str, str]  # ss_* and modelspec.* keys
    other_metadata: dict[str, str]
    unmapped_keys: list[str]
    modules: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Opening files


@dataclass
class _Tensors:
    """A file's tensor names, shapes and dtypes (from the header) and a loader for one tensor."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]
    load: Callable[[str], torch.Tensor]
    is_safetensors: bool


@contextmanager
def _open_tensors(path: Path, allow_pickle: bool) -> Iterator[_Tensors]:
    if not path.is_file():
        raise StudioError(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        yield _open_pickle(path, allow_pickle)
        return
    try:
        # pread, not the default mmap: the pages of a memory-mapped file stay in the resident set while
        # it is open, so reading module by module (merging) would still look like loading the whole file.
        handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except SafetensorError as error:
        raise StudioError(f"{path}: {_explain_safetensors_error(path, error)}") from None
    with handle as f:
        shapes, dtypes = {}, {}
        names = f.keys()
        for key in names:
            tensor_slice = f.get_slice(key)
            shapes[key] = tuple(tensor_slice.get_shape())
            dtypes[key] = SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), tensor_slice.get_dtype())
        yield _Tensors(path, shapes, dtypes, dict(f.metadata() or {}), f.get_tensor, is_safetensors=True)


def _explain_safetensors_error(path: Path, error: SafetensorError) -> str:
    if path.stat().st_size < 8:
        return "not a safetensors file (shorter than a safetensors header)"
    reason = str(error)
    if "not fully covered" in reason or "incomplete" in reason:
        return "truncated safetensors file (the header lists more tensor data than the file holds)"
    return f"not a safetensors file, or its header is corrupt ({reason})"


def _open_pickle(path: Path, allow_pickle: bool) -> _Tensors:
    """Pickle files only on explicit request, and then only through torch's weights-only unpickler."""
    if not allow_pickle:
        raise StudioError(
            f"{path}: pickle files ({path.suffix}) can run code when loaded and are refused; "
            "convert it to .safetensors, or pass allow_pickle=True / --allow-pickle if you trust it"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise StudioError(
            f"{path}: cannot be read as a weights-only torch file ({str(error).splitlines()[0]})"
        ) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise StudioError(f"{path}: holds a {type(loaded).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    return _Tensors(
        path,
        shapes={k: tuple(v.shape) for k, v in tensors.items()},
        dtypes={k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()},
        metadata={},
        load=tensors.__getitem__,
        is_safetensors=False,
    )


# ---------------------------------------------------------------------------------------------------
# Names: file keys -> (component, module path in the installed layout, part)


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """(naming, component, module name as in the file, part) for a LoRA key, or None."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, suffix = key.partition(".")
            part = KOHYA_PARTS.get(suffix)
            return ("kohya", component, name, part) if part else None
    for component in COMPONENTS:
        if key.startswith(component + "."):
            for suffix, part in DIFFUSERS_PARTS.items():
                if key.endswith("." + suffix):
                    return "diffusers", component, key[: -len(suffix) - 1], part
    return None


def _join_kohya_words(name: str) -> str:
    """'down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q'
    -> 'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q' (kohya replaced every '.' by '_')."""
    words, joined, i = name.split("_"), [], 0
    while i < len(words):
        compound = next((c for c in NAME_COMPOUNDS if tuple(words[i : i + len(c)]) == c), (words[i],))
        joined.append("_".join(compound))
        i += len(compound)
    return ".".join(joined)


def _sgm_to_diffusers(name: str) -> str | None:
    """A kohya UNet name in SDXL's original block names -> the diffusers module path (None if unknown)."""
    if name in SGM_TOP_LEVEL:
        return SGM_TOP_LEVEL[name]
    per_level = LAYERS_PER_BLOCK + 1
    if match := re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", name):
        index, sub, rest = int(match[1]), int(match[2]), match[3]
        level, layer = divmod(index - 1, per_level)
        if layer == LAYERS_PER_BLOCK:
            return f"down_blocks.{level}.downsamplers.0.conv" if (sub, rest) == (0, "op") else None
        return _sgm_layer(f"down_blocks.{level}", layer, sub, rest)
    if match := re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", name):
        index, sub, rest = int(match[1]), int(match[2]), match[3]
        level, layer = divmod(index, per_level)
        if rest == "conv" and sub in (1, 2):  # the upsampler follows the resnet, and the attention if any
            return f"up_blocks.{level}.upsamplers.0.conv"
        return _sgm_layer(f"up_blocks.{level}", layer, sub, rest)
    if match := re.fullmatch(r"middle_block_(\d)_(.+)", name):
        placement = {"0": (0, 0), "1": (0, 1), "2": (1, 0)}.get(match[1])  # (layer, sub): resnet, attention, resnet
        return _sgm_layer("mid_block", *placement, match[2]) if placement else None
    return None


def _sgm_layer(block: str, layer: int, sub: int, rest: str) -> str | None:
    if sub == 0:
        return f"{block}.resnets.{layer}.{SGM_RESNET_PARTS[rest]}" if rest in SGM_RESNET_PARTS else None
    if sub == 1:
        return f"{block}.attentions.{layer}.{_join_kohya_words(rest)}"
    return None


def _diffusers_to_sgm(path: str) -> str | None:
    """The inverse of `_sgm_to_diffusers`, for SDXL (whose upsamplers all follow an attention)."""
    top_level = {v: k for k, v in SGM_TOP_LEVEL.items()}
    if path in top_level:
        return top_level[path]
    resnet_parts = {v: k for k, v in SGM_RESNET_PARTS.items()}
    per_level = LAYERS_PER_BLOCK + 1
    if match := re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        blocks, level, kind, layer, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        if kind == "resnets" and rest not in resnet_parts:
            return None
        if blocks == "down_blocks":
            index, sgm = 1 + level * per_level + layer, "input_blocks"
        else:
            index, sgm = level * per_level + layer, "output_blocks"
        if kind == "resnets":
            return f"{sgm}_{index}_0_{resnet_parts[rest]}"
        return f"{sgm}_{index}_1_{rest.replace('.', '_')}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks_{(int(match[1]) + 1) * per_level}_0_op"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        return f"output_blocks_{int(match[1]) * per_level + LAYERS_PER_BLOCK}_2_conv"
    if match := re.fullmatch(r"mid_block\.(resnets\.0|attentions\.0|resnets\.1)\.(.+)", path):
        sub, rest = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[match[1]], match[2]
        if sub == 1:
            return f"middle_block_1_{rest.replace('.', '_')}"
        return f"middle_block_{sub}_{resnet_parts[rest]}" if rest in resnet_parts else None
    return None


@functools.cache
def _installed_text_model_prefixes() -> dict[str, str]:
    """Per text encoder, 'text_model.' if the installed transformers nests its layers under `text_model`.

    transformers 5 flattened `CLIPTextModel` (SD's text encoder, SDXL's first) but kept the
    `text_model` wrapper in `CLIPTextModelWithProjection` (SDXL's second): ask the installed version,
    on the meta device, instead of trusting a version number.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_attention_heads=1,
        num_hidden_layers=1,
        max_position_embeddings=8,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    prefixes = {}
    for component, model_class in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        with torch.device("meta"):
            names = {name for name, _ in model_class(config).named_modules()}
        prefixes[component] = "text_model." if "text_model.encoder" in names else ""
    return prefixes


def _installed_text_path(component: str, path: str) -> str:
    """A text-encoder module path in either transformers layout -> the installed layout."""
    inner = path.removeprefix("text_model.")
    if inner.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        return _installed_text_model_prefixes()[component] + inner
    return inner


def _portable_text_path(path: str) -> str:
    """The transformers-4 layout (`text_model.encoder...`) every LoRA tool reads, for writing files."""
    inner = path.removeprefix("text_model.")
    return "text_model." + inner if inner.startswith(("encoder.", "embeddings.", "final_layer_norm")) else inner


def _module_path(naming: str, component: str, name: str, installed: bool) -> str | None:
    """The module path for a module name of the file, or None if it cannot be placed. Text-encoder
    paths are in the installed transformers layout if `installed`, else in the portable one."""
    text_path = functools.partial(_installed_text_path, component) if installed else _portable_text_path
    if naming == "kohya":
        raw = name[next(len(p) for p in KOHYA_PREFIXES if name.startswith(p)) :]
        if component == "unet":
            sgm = _sgm_to_diffusers(raw)
            if sgm is not None:
                return sgm
            if re.match(r"(input_blocks|output_blocks|middle_block|time_embed|label_emb|out)_", raw):
                return None
            return _join_kohya_words(raw)
        return text_path(_join_kohya_words(raw))
    path = name.removeprefix(component + ".")
    return path if component == "unet" else text_path(path)


# ---------------------------------------------------------------------------------------------------
# Header stage: group keys into modules, check shapes, detect format and family


@dataclass
class _Layout:
    """What the header says about a file's LoRA content."""

    naming: str
    modules: list[LoraModule]
    unmapped_keys: list[str]
    family: str
    format: str


def _read_layout(tensors: _Tensors, installed: bool = True) -> _Layout:
    """Group, place and check the file's LoRA modules; `installed`: as for `_module_path`."""
    path = tensors.path
    grouped: dict[tuple[str, str, str], dict[str, str]] = {}
    unmapped = []
    for key in tensors.shapes:
        split = _split_key(key)
        if split is None:
            unmapped.append(key)
            continue
        naming, component, name, part = split
        grouped.setdefault((naming, component, name), {})[part] = key
    namings = {naming for naming, _, _ in grouped}
    if not grouped:
        shown = ", ".join(list(tensors.shapes)[:3]) or "the file is empty"
        raise StudioError(f"{path}: no LoRA keys found (first keys: {shown})")
    if len(namings) > 1:
        raise StudioError(f"{path}: mixes kohya and diffusers key names; not a single LoRA")
    naming = namings.pop()

    adapter_config = _diffusers_adapter_config(tensors.metadata, path)
    modules = []
    for (_, component, name), parts in grouped.items():
        module_path = _module_path(naming, component, name, installed)
        if module_path is None or parts.keys() == {"alpha"}:
            unmapped.extend(parts.values())
            continue
        modules.append(_describe_module(tensors, naming, component, module_path, name, parts, adapter_config))
    if not modules:
        raise StudioError(f"{path}: no LoRA keys this reader understands (first keys: {', '.join(unmapped[:3])})")

    family = _detect_family(modules, tensors.metadata)
    for module in modules:
        _resolve_kernel(module, family, tensors)
    return _Layout(naming, modules, sorted(unmapped), family, _detect_format(modules, naming))


class _Dims(NamedTuple):
    """A module's size as its factors give it: delta_W is (out, in_flat = in * kh * kw)."""

    out: int
    in_flat: int
    kernel: tuple[int, int] | None
    product_rank: int  # rank of the product of its factors, before any full-rank fallback
    file_rank: int | None  # the rank its alpha is divided by


@dataclass
class _Shapes:
    """One module's tensor shapes by part, with checks whose errors name the file and module."""

    where: str
    shapes: dict[str, tuple[int, ...]]

    def __call__(self, part: str) -> tuple[int, ...]:
        if part not in self.shapes:
            raise StudioError(f"{self.where} has {', '.join(sorted(self.shapes))} but no {part}")
        return self.shapes[part]

    def flat(self, part: str) -> tuple[int, int]:
        dims = self(part)
        if len(dims) not in (2, 4):
            raise StudioError(f"{self.where}: {part} has shape {list(dims)}, expected 2 or 4 dimensions")
        return dims[0], math.prod(dims[1:])

    def rank(self, up: str, down: str) -> int:
        """The rank shared by an up factor's columns and a down factor's rows."""
        if self(up)[1] != self(down)[0]:
            raise StudioError(
                f"{self.where}: shape mismatch, {up} {list(self(up))} and {down} {list(self(down))} do not share a rank"
            )
        return self(down)[0]

    def tucker_kernel(self, core: str, up: str, down: str) -> tuple[int, int]:
        """A LyCORIS Tucker core (r_up, r_down, kh, kw) between `up` (r_up, out) and `down` (r_down, in)."""
        dims = self(core)
        if len(dims) != 4 or dims[0] != self(up)[0] or dims[1] != self(down)[0]:
            raise StudioError(f"{self.where}: shape mismatch, {core} {list(dims)} does not join {up} and {down}")
        return dims[2], dims[3]

    def kernel_of(self, part: str) -> tuple[int, int] | None:
        return tuple(self(part)[2:]) if len(self(part)) == 4 else None


def _lora_dims(s: _Shapes) -> _Dims:
    rank, in_flat = s.flat("down")
    out = s.flat("up")[0]
    if "mid" in s.shapes:  # LoCon Tucker: down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1)
        mid = s("mid")
        if len(mid) != 4 or mid[0] != s("up")[1] or mid[1] != rank:
            raise StudioError(f"{s.where}: shape mismatch, lora_mid {list(mid)} does not join lora_down and lora_up")
        return _Dims(out, in_flat * mid[2] * mid[3], (mid[2], mid[3]), rank, rank)
    s.rank("up", "down")
    if s.kernel_of("up") not in (None, (1, 1)):
        raise StudioError(f"{s.where}: lora_up has a {s('up')[2]}x{s('up')[3]} kernel, expected 1x1")
    return _Dims(out, in_flat, s.kernel_of("down"), rank, rank)


def _loha_dims(s: _Shapes) -> _Dims:
    sizes, kernel = [], None
    for i in (1, 2):
        w_a, w_b = f"hada_w{i}_a", f"hada_w{i}_b"
        if f"hada_t{i}" in s.shapes:  # Tucker: w_a (r, out), w_b (r, in), core (r, r, kh, kw)
            kernel = s.tucker_kernel(f"hada_t{i}", w_a, w_b)
            sizes.append((s(w_a)[1], s(w_b)[1] * kernel[0] * kernel[1], s(w_a)[0]))
        else:  # w_a (out, r), w_b (r, in * kh * kw)
            sizes.append((s.flat(w_a)[0], s.flat(w_b)[1], s.rank(w_a, w_b)))
            kernel = kernel or s.kernel_of(w_b)
    if sizes[0][:2] != sizes[1][:2]:
        raise StudioError(
            f"{s.where}: shape mismatch, the two Hadamard factors make {list(sizes[0][:2])} and {list(sizes[1][:2])}"
        )
    return _Dims(sizes[0][0], sizes[0][1], kernel, sizes[0][2] * sizes[1][2], s("hada_w1_b")[0])


def _lokr_dims(s: _Shapes) -> _Dims:
    sizes, kernel = [], None
    for i in (1, 2):
        full, w_a, w_b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
        if full in s.shapes:  # factored as (I, w) or (w, I)
            rows, cols = s.flat(full)
            sizes.append((rows, cols, min(rows, cols)))
            kernel = kernel or s.kernel_of(full)
        elif i == 2 and "lokr_t2" in s.shapes:  # Tucker: w2_a (r, c), w2_b (r, d), t2 (r, r, kh, kw)
            kernel = s.tucker_kernel("lokr_t2", w_a, w_b)
            sizes.append((s(w_a)[1], s(w_b)[1] * kernel[0] * kernel[1], s(w_a)[0]))
        else:
            sizes.append((s.flat(w_a)[0], s.flat(w_b)[1], s.rank(w_a, w_b)))
            kernel = kernel or s.kernel_of(w_b)
    # LyCORIS/A1111: alpha is divided by the rank of a factored part (w2's if both are), else scale 1.
    file_rank = next((s(p)[0] for p in ("lokr_w2_b", "lokr_w1_b") if p in s.shapes), None)
    (a, b, r1), (c, d, r2) = sizes
    return _Dims(a * c, b * d, kernel, r1 * r2, file_rank)


def _describe_module(
    tensors: _Tensors,
    naming: str,
    component: str,
    module_path: str,
    name: str,
    parts: dict[str, str],
    adapter_config: dict,
) -> LoraModule:
    """Check one module's shapes and work out its size, rank and scale."""
    s = _Shapes(f"{tensors.path}: module {name}", {part: tensors.shapes[key] for part, key in parts.items()})
    if any(part.startswith("hada_") for part in parts):
        kind, dims = "loha", _loha_dims(s)
    elif any(part.startswith("lokr_") for part in parts):
        kind, dims = "lokr", _lokr_dims(s)
    elif parts.keys() & {"down", "up", "mid"}:
        kind, dims = "lora", _lora_dims(s)
    else:
        raise StudioError(f"{s.where}: has only {', '.join(sorted(parts))}, no LoRA weights")

    alpha, scale = None, 1.0
    if "alpha" in parts:
        alpha_tensor = tensors.load(parts["alpha"])
        if alpha_tensor.numel() != 1 or not torch.isfinite(alpha_tensor).all():
            raise StudioError(f"{s.where}: alpha is not one finite number")
        alpha = float(alpha_tensor.item())
        scale = alpha / dims.file_rank if dims.file_rank else 1.0
    elif component in adapter_config and kind == "lora":
        alpha, scale = _diffusers_config_scale(
            adapter_config[component], name.removeprefix(component + "."), dims.file_rank
        )

    if "magnitude" in parts:
        magnitude = s("magnitude")
        if naming == "kohya" and len(magnitude) > 1 and magnitude[0] == 1 and dims.out != 1:
            raise StudioError(
                f"{s.where}: its DoRA scale {list(magnitude)} normalises per input column (LyCORIS "
                "wd_on_out=False); peft's DoRA normalises per output row, so it cannot be loaded exactly"
            )
        if math.prod(magnitude) != dims.out:
            raise StudioError(f"{s.where}: shape mismatch, DoRA scale {list(magnitude)} for {dims.out} outputs")

    # LoHa/LoKr products as wide as the layer are stored as an exact full-rank pair instead.
    converted_rank = dims.product_rank if kind == "lora" else min(dims.product_rank, dims.out, dims.in_flat)
    return LoraModule(
        component=component,
        module=module_path,
        file_name=name,
        kind=kind,
        keys=parts,
        out_features=dims.out,
        in_features=dims.in_flat,  # made per channel by `_resolve_kernel`
        kernel=dims.kernel,
        rank=dims.file_rank,
        alpha=alpha,
        scale=scale,
        converted_rank=converted_rank,
        dora="magnitude" in parts,
    )


def _diffusers_adapter_config(metadata: Mapping[str, str], path: Path) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` (the LoraConfig it saved), split per component."""
    raw = metadata.get(DIFFUSERS_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        raise StudioError(f"{path}: its {DIFFUSERS_ADAPTER_METADATA_KEY} metadata is not valid JSON") from None
    per_component: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, option = key.partition(".")
        per_component.setdefault(component, {})[option] = value
    return per_component


def _diffusers_config_scale(config: dict, module_name: str, rank: int) -> tuple[float, float]:
    """(alpha, scale) of one module under a saved peft LoraConfig, matching patterns the way peft does."""
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    key = get_pattern_key(list(alpha_pattern), module_name)
    alpha = float(alpha_pattern.get(key, config.get("lora_alpha", rank)))
    denominator = math.sqrt(rank) if config.get("use_rslora") else rank
    return alpha, alpha / denominator


def _conv_kernel_by_name(module: str, family: str) -> tuple[int, int] | None:
    """The kernel of a UNet convolution, from the Stable Diffusion architecture (None: a linear layer)."""
    leaf = module.rsplit(".", 1)[-1]
    if leaf == "conv_shortcut":
        return (1, 1)
    if leaf in ("conv1", "conv2", "conv_in", "conv_out") or module.endswith(("samplers.0.conv",)):
        return (3, 3)
    if leaf in ("proj_in", "proj_out") and family == "sd1":
        return (1, 1)
    return None


def _resolve_kernel(module: LoraModule, family: str, tensors: _Tensors) -> None:
    if module.kernel is None and module.component == "unet" and module.kind != "lora":
        module.kernel = _conv_kernel_by_name(module.module, family)
    if module.kernel is None:
        return
    taps = module.kernel[0] * module.kernel[1]
    if module.in_features % taps:
        raise StudioError(
            f"{tensors.path}: module {module.file_name}: {module.in_features} inputs do not fit a "
            f"{module.kernel[0]}x{module.kernel[1]} convolution"
        )
    module.in_features //= taps


def _detect_family(modules: list[LoraModule], metadata: Mapping[str, str]) -> str:
    context = {
        m.in_features for m in modules if m.component == "unet" and m.module.endswith(("attn2.to_k", "attn2.to_v"))
    }
    text_width = {
        m.in_features
        for m in modules
        if m.component == "text_encoder" and m.module.endswith(("q_proj", "k_proj", "v_proj"))
    }
    if 2048 in context:
        return "sdxl"
    if 1024 in context or (not context and 1024 in text_width):
        return "sd2"
    if 768 in context:
        return "sd1"
    sdxl_structure = any(
        m.component == "text_encoder_2"
        or m.module.startswith("add_embedding")
        or re.search(r"transformer_blocks\.[1-9]", m.module)
        or m.file_name.startswith("lora_te1_")
        for m in modules
    )
    if sdxl_structure:
        return "sdxl"
    if 768 in text_width:
        return "sd1"
    architecture = metadata.get("modelspec.architecture", "")
    if metadata.get("ss_base_model_version", "").startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl"
    if metadata.get("ss_v2") == "True" or architecture.startswith("stable-diffusion-v2"):
        return "sd2"
    return "sd1"


def _detect_format(modules: list[LoraModule], naming: str) -> str:
    kinds = {m.kind for m in modules}
    if "lokr" in kinds:
        return "lokr"
    if "loha" in kinds:
        return "loha"
    if any(m.dora for m in modules):
        return "dora"
    if naming == "diffusers":
        return "diffusers"
    if any(m.kernel and m.kernel != (1, 1) for m in modules):
        return "locon"
    return "kohya"


# ---------------------------------------------------------------------------------------------------
# Tensor stage: standard LoRA factors with the scale baked in


def _load_checked(tensors: _Tensors, key: str, module: LoraModule) -> torch.Tensor:
    tensor = tensors.load(key)
    if tensor.numel():
        # NaN propagates into min and max, and +-Inf lands on one of them: one pass, no temporary,
        # several times faster than isfinite().all() on half precision.
        low, high = torch.aminmax(tensor)
        if not (math.isfinite(low.item()) and math.isfinite(high.item())):
            raise StudioError(f"{tensors.path}: module {module.file_name}: {key} contains NaN or Inf values")
    return tensor


def _module_factors(module: LoraModule, tensors: _Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of one module, scale included, in peft's shapes (conv: A 4-D, B 1x1)."""
    load = functools.partial(_load_checked, tensors, module=module)
    parts = module.keys
    if module.kind == "lora":
        down, up = load(parts["down"]), load(parts["up"])
        if "mid" in parts:  # Tucker: the core convolution folds into the down factor
            mid = load(parts["mid"])
            down = _fold_core(mid.float(), down.flatten(1).float()).to(down.dtype)
        _bake_scale(down, up, module.scale)
        return _conv_shaped(down, up, module)

    if module.kind == "loha":
        up1, down1 = _loha_half(load, parts, 1)
        up2, down2 = _loha_half(load, parts, 2)
        up = (up1.unsqueeze(2) * up2.unsqueeze(1)).flatten(1)  # row-wise Khatri-Rao: (out, r1*r2)
        down = (down1.unsqueeze(1) * down2.unsqueeze(0)).flatten(0, 1)  # column-wise: (r1*r2, in*kh*kw)
    else:
        up1, down1 = _lokr_half(load, parts, 1)
        up2, down2 = _lokr_half(load, parts, 2)
        up, down = torch.kron(up1, up2), torch.kron(down1, down2)

    if module.converted_rank < up.shape[1]:  # as exact, and no larger: (I, delta) or (delta, I)
        delta = up @ down
        if delta.shape[0] <= delta.shape[1]:
            up, down = torch.eye(delta.shape[0]), delta
        else:
            up, down = delta, torch.eye(delta.shape[1])
    _bake_scale(down, up, module.scale)
    return _conv_shaped(down.contiguous(), up.contiguous(), module)


def _loha_half(load: Callable[[str], torch.Tensor], parts: dict[str, str], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of one LoHa factor w_i = up @ down, flattened to 2-D float32."""
    w_a, w_b = load(parts[f"hada_w{i}_a"]).float(), load(parts[f"hada_w{i}_b"]).float()
    if f"hada_t{i}" in parts:  # Tucker: w[o, c, h, w] = sum_ij w_a[i, o] t[i, j, h, w] w_b[j, c]
        core = load(parts[f"hada_t{i}"]).float()
        return w_a.t().contiguous(), _fold_core(core, w_b).flatten(1)
    return w_a.flatten(1), w_b.flatten(1)


def _lokr_half(load: Callable[[str], torch.Tensor], parts: dict[str, str], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of one Kronecker part w_i = up @ down; a part stored full becomes (I, w) or (w, I)."""
    if f"lokr_w{i}" in parts:
        full = load(parts[f"lokr_w{i}"]).float().flatten(1)
        rows, cols = full.shape
        return (torch.eye(rows), full) if rows <= cols else (full, torch.eye(cols))
    w_a, w_b = load(parts[f"lokr_w{i}_a"]).float(), load(parts[f"lokr_w{i}_b"]).float()
    if i == 2 and "lokr_t2" in parts:  # Tucker, as A1111's make_weight_cp
        core = load(parts["lokr_t2"]).float()
        return w_a.t().contiguous(), _fold_core(core, w_b).flatten(1)
    return w_a.flatten(1), w_b.flatten(1)


def _fold_core(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A Tucker core (r, r', kh, kw) applied to a down factor (r', in): the (r, in, kh, kw) convolution."""
    return (core.permute(0, 2, 3, 1) @ down).permute(0, 3, 1, 2)


def _bake_scale(down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
    """Multiply the factors in place so that up @ down carries `scale` (sqrt split; sign on `up`)."""
    if scale == 1.0:
        return
    root = math.sqrt(abs(scale))
    down.mul_(root)
    up.mul_(math.copysign(root, scale))


def _conv_shaped(down: torch.Tensor, up: torch.Tensor, module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    if module.kernel is None:
        return down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
    return (
        down.reshape(down.shape[0], module.in_features, *module.kernel),
        up.reshape(up.shape[0], up.shape[1], 1, 1),
    )


# ---------------------------------------------------------------------------------------------------
# Public API


@contextmanager
def open_lora(path: str | os.PathLike, allow_pickle: bool = False) -> Iterator[LoraReader]:
    """Open a LoRA file of any supported format: its header is read and checked now, its tensors are
    loaded one module at a time by `LoraReader.factors` while the file stays open."""
    path = Path(path)
    with _open_tensors(path, allow_pickle) as tensors:
        layout = _read_layout(tensors)
        yield LoraReader(
            path=path,
            format=layout.format,
            naming=layout.naming,
            family=layout.family,
            metadata=tensors.metadata,
            modules=layout.modules,
            unmapped_keys=layout.unmapped_keys,
            _tensors=tensors,
        )


def read_lora(path: str | os.PathLike, allow_pickle: bool = False) -> LoraFile:
    """Read a LoRA file of any supported format into diffusers/peft naming, scales baked in."""
    with open_lora(path, allow_pickle) as lora:
        state_dict: dict[str, torch.Tensor] = {}
        for module in lora.modules:
            prefix = f"{module.component}.{module.module}"
            state_dict[f"{prefix}.lora_A.weight"], state_dict[f"{prefix}.lora_B.weight"] = lora.factors(module)
            if module.dora:
                # "...lora_magnitude_vector.weight": transformers' text-encoder loader ignores the bare name.
                state_dict[f"{prefix}.lora_magnitude_vector.weight"] = lora.magnitude(module)
        return LoraFile(
            path=lora.path,
            format=lora.format,
            naming=lora.naming,
            family=lora.family,
            state_dict=state_dict,
            metadata=lora.metadata,
            modules=lora.modules,
            unmapped_keys=lora.unmapped_keys,
        )


def check_family(lora: LoraFile, family: str) -> None:
    """Refuse a LoRA made for another model family than the pipeline's, naming both."""
    if lora.family != family:
        raise StudioError(
            f"{lora.path}: this LoRA is for {FAMILY_NAMES[lora.family]} ({lora.family}) but the loaded "
            f"model is {FAMILY_NAMES.get(family, family)} ({family})"
        )


def inspect(path: str | os.PathLike, allow_pickle: bool = False) -> LoraReport:
    """Describe a LoRA file from its header (alpha scalars aside), with hashes and metadata.

    Text-encoder modules are named as LoRA files name them (transformers-4 layout, `text_model.`),
    whatever transformers is installed; tensor values are not checked (NaN/Inf: `read_lora`).
    """
    path = Path(path)
    with _open_tensors(path, allow_pickle) as tensors:
        layout = _read_layout(tensors, installed=False)  # no transformers import just to name modules
        dtypes = sorted({tensors.dtypes[k] for m in layout.modules for k in m.keys.values()})
        is_safetensors = tensors.is_safetensors
        metadata = tensors.metadata
    hashes = file_hashes(path, is_safetensors)
    modules = layout.modules
    components = {c: n for c in COMPONENTS if (n := sum(m.component == c for m in modules))}
    training = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec."))}
    return LoraReport(
        path=str(path),
        format=layout.format,
        naming=layout.naming,
        family=layout.family,
        components=components,
        num_modules=len(modules),
        ranks=sorted({m.rank for m in modules if m.rank is not None}),
        converted_ranks=sorted({m.converted_rank for m in modules}),
        alphas=sorted({m.alpha for m in modules if m.alpha is not None}),
        scales=sorted({round(m.scale, 6) for m in modules}),
        dtypes=dtypes,
        size_bytes=path.stat().st_size,
        **hashes,
        trigger_words=trigger_words(metadata),
        top_tags=top_tags(metadata),
        training_metadata=training,
        other_metadata={k: v for k, v in metadata.items() if k not in training},
        unmapped_keys=layout.unmapped_keys,
        modules=[
            {
                "component": m.component,
                "module": m.module,
                "file_name": m.file_name,
                "kind": m.kind + ("+dora" if m.dora else ""),
                "shape": [m.out_features, m.in_features, *(m.kernel or ())],
                "rank": m.rank,
                "alpha": m.alpha,
                "scale": m.scale,
                "converted_rank": m.converted_rank,
            }
            for m in modules
        ],
    )


def file_hashes(path: Path, is_safetensors: bool = True) -> dict[str, str]:
    """sha256, civitai AutoV2, the kohya/addnet hash of the tensor data and A1111's 12-digit short hash."""
    full, after_header = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        first = f.read(8)
        full.update(first)
        header_length = int.from_bytes(first, "little") if is_safetensors and len(first) == 8 else 0
        header = f.read(header_length)
        full.update(header)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            full.update(chunk)
            after_header.update(chunk)
    sha256 = full.hexdigest()
    addnet = after_header.hexdigest() if is_safetensors else sha256
    return {"sha256": sha256, "autov2": sha256[:10], "addnet_hash": addnet, "a1111_hash": addnet[:12]}


def top_tags(metadata: Mapping[str, str], limit: int = TOP_TAGS) -> list[tuple[str, int]]:
    """The most frequent captions tags of kohya's `ss_tag_frequency` ({dataset: {tag: count}})."""
    try:
        frequencies = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return []
    counts: Counter[str] = Counter()
    for dataset in frequencies.values() if isinstance(frequencies, dict) else ():
        if isinstance(dataset, dict):
            counts.update({tag.strip(): int(n) for tag, n in dataset.items() if isinstance(n, (int, float))})
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]


def trigger_words(metadata: Mapping[str, str]) -> list[str]:
    """Declared trigger words (ours, then modelspec's), else the most frequent training tags."""
    declared: list[str] = []
    ours = metadata.get(TRIGGER_WORDS_KEY, "")
    try:
        parsed = json.loads(ours) if ours else []
        declared += [str(w) for w in parsed] if isinstance(parsed, list) else [str(parsed)]
    except json.JSONDecodeError:
        declared += ours.split(",")
    declared += metadata.get("modelspec.trigger_phrase", "").split(",")
    words = list(dict.fromkeys(w.strip() for w in declared if w.strip()))
    return words or [tag for tag, _ in top_tags(metadata)]


def write_lora(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    naming: str = "diffusers",
    family: str = "sd1",
) -> Path:
    """Write a LoRA (diffusers/peft naming in, scales baked, as `LoraFile.state_dict`) atomically.

    naming "diffusers": keys as `pipe.load_lora_weights` reads them, text encoders in the
    transformers-4 layout (`text_model.encoder...`) that every LoRA tool reads and diffusers maps.
    naming "kohya": `lora_unet_`/`lora_te_` (SDXL: `lora_te1_`/`lora_te2_` and the original UNet block
    names) with `lora_down`/`lora_up`, alpha = rank (scale 1) and DoRA `dora_scale` per output row.
    The stale `lora_adapter_metadata` of a diffusers file is dropped: the scales are in the factors.
    """
    path = Path(path)
    if naming not in NAMINGS:
        raise StudioError(f"{path}: unknown naming {naming!r}; choose one of {', '.join(NAMINGS)}")
    if family not in FAMILIES:
        raise StudioError(f"{path}: unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if path.suffix != ".safetensors":
        raise StudioError(f"{path}: LoRA files are written as .safetensors only")
    if not path.parent.is_dir():
        raise StudioError(f"{path}: the folder {path.parent} does not exist")

    tensors = {}
    for component, module, factors in _group_modules(state_dict, path):
        down, up = factors["lora_A"], factors["lora_B"]
        if naming == "diffusers":
            name = f"{component}.{module if component == 'unet' else _portable_text_path(module)}"
            tensors[f"{name}.lora_A.weight"] = down
            tensors[f"{name}.lora_B.weight"] = up
            if "magnitude" in factors:
                tensors[f"{name}.lora_magnitude_vector.weight"] = factors["magnitude"]
            continue
        name = _kohya_name(component, module, family, path)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        if "magnitude" in factors:
            tensors[f"{name}.dora_scale"] = factors["magnitude"].reshape(up.shape[0], *[1] * (up.dim() - 1))

    file_metadata = {k: v for k, v in (metadata or {}).items() if k != DIFFUSERS_ADAPTER_METADATA_KEY}
    file_metadata.setdefault("format", "pt")
    if naming == "kohya":  # what A1111 reads to tell SD1, SD2 and SDXL LoRAs apart
        file_metadata.setdefault(
            "ss_base_model_version", {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
        )
        file_metadata.setdefault("ss_v2", str(family == "sd2"))
    _save_atomically(path, {k: v.contiguous() for k, v in tensors.items()}, file_metadata)
    return path


def _group_modules(state_dict: Mapping[str, torch.Tensor], path: Path) -> Iterator[tuple[str, str, dict]]:
    """(component, module, {"lora_A", "lora_B", "magnitude"}) per module of a diffusers/peft state dict."""
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    suffixes = {
        ".lora_A.weight": "lora_A",
        ".lora_B.weight": "lora_B",
        ".lora_magnitude_vector.weight": "magnitude",
        ".lora_magnitude_vector": "magnitude",
    }
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        suffix = next((s for s in suffixes if rest.endswith(s)), None)
        if component not in COMPONENTS or suffix is None:
            raise StudioError(f"{path}: cannot write key {key!r}: expected <component>.<module>.lora_A/lora_B.weight")
        module = rest[: -len(suffix)]
        if component != "unet":
            module = _portable_text_path(module)
        modules.setdefault((component, module), {})[suffixes[suffix]] = tensor
    for (component, module), factors in modules.items():
        if "lora_A" not in factors or "lora_B" not in factors:
            raise StudioError(f"{path}: module {component}.{module} needs both lora_A and lora_B")
        if factors["lora_A"].shape[0] != factors["lora_B"].shape[1]:
            raise StudioError(
                f"{path}: module {component}.{module}: shape mismatch, lora_A {list(factors['lora_A'].shape)} "
                f"and lora_B {list(factors['lora_B'].shape)} do not share a rank"
            )
        yield component, module, factors


def _kohya_name(component: str, module: str, family: str, path: Path) -> str:
    if component == "unet":
        name = _diffusers_to_sgm(module) if family == "sdxl" else module.replace(".", "_")
        if name is None:
            raise StudioError(f"{path}: module unet.{module} has no name in kohya's SDXL naming")
        return "lora_unet_" + name
    prefix = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    if component == "text_encoder_2" and family != "sdxl":
        raise StudioError(f"{path}: a second text encoder only exists in SDXL, not {family}")
    return prefix + _portable_text_path(module).replace(".", "_")


def _save_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same folder, then rename it over `path`: never half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
