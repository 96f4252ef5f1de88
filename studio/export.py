"""Fuse-export: bake a blend of LoRAs into the base model and save it as a model plain diffusers loads.

    python -m studio.lora fuse-export --base demo --lora a.safetensors:0.8 --lora b.safetensors:0.5 --out fused.safetensors

    from studio.export import fuse_export
    fuse_export("demo", [("a.safetensors", 0.8), ("b.safetensors", 0.5)], "fused")   # a diffusers folder

Saving a model that still has LoRA layers injected writes `base_layer` keys that plain diffusers does not
know, and reloading it silently leaves those weights on the meta device. So an export fuses the blend with
diffusers' `fuse_lora`, takes the LoRA layers out of a structural copy of the pipeline that shares the fused
weights (diffusers' `unload_lora_weights` keeps each layer's base weight, now fused), saves that copy under a
temporary name beside the destination, reloads it with plain diffusers and checks every weight against the
fused ones, and only then renames it into place. The studio's own pipeline keeps its adapters.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers import PreTrainedModel
from transformers.utils import logging as transformers_logging

from studio import lora_io
from studio.adapters import Blend, Studio, Weight, resolve_lora_source
from studio.base import DTYPES, PICKLE_SUFFIXES
from studio.checkpoint import save_single_file
from studio.errors import StudioError

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
RECORD_FILE = "studio_export.json"  # the folder's record of what was fused; single files keep it as metadata
LORA_MARKERS = ("lora_", ".base_layer.")  # in a key, a sign that LoRA layers were saved instead of fused weights
SINGLE_FILE_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")  # what an A1111 checkpoint holds


def fuse_export(
    base: str | Path,
    loras: Sequence[tuple[str | Path, Weight]],
    out: str | Path,
    *,
    dtype: str = "fp32",
    base_config: str | Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Load `base`, blend `loras` ((file or hub id, weight) pairs) into it and save the result at `out`.

    `out` ending in `.safetensors` is one A1111-layout checkpoint, anything else a diffusers folder. The blend
    is fused in float32 on the CPU, then saved as `dtype` ("fp32", "fp16", "bf16"). `base_config` is the
    config folder a single-file base needs offline (see `studio.base.load_base`). Returns `out`.
    """
    out = _checked_destination(out, overwrite)
    _export_dtype(dtype, out)
    if not loras:
        raise StudioError(f"{out}: name at least one LoRA to fuse into the base model")
    with _quiet():
        studio = Studio.from_base(base, device="cpu", dtype="fp32", config=base_config, allow_pickle=allow_pickle)
        for number, (source, weight) in enumerate(loras, start=1):
            studio.load_adapter(source, name=f"lora{number}", weight=weight, allow_pickle=allow_pickle)
    return export_blend(studio, out, dtype=dtype, overwrite=overwrite)


def export_blend(
    studio: Studio, out: str | Path, *, blend: Blend | None = None, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Save `studio`'s base with `blend` (default: the studio's blend) fused in, as `fuse_export` does.

    `dtype` defaults to the dtype the studio computes in. Other threads wait while the export is written and
    verified (the fused weights must not change meanwhile); afterwards the studio computes its own blend as
    before. Peak memory: the studio, a cast copy while saving in another dtype, then the export reloaded.
    """
    out = _checked_destination(out, overwrite)
    blend = studio.blend if blend is None else blend
    active = blend.active()
    if not active:
        raise StudioError(f"{out}: the blend has no adapter with a weight other than 0, so there is nothing to fuse")
    torch_dtype = _export_dtype(dtype, out) if dtype else studio.base.dtype
    record = {
        "base_model": studio.base.source,
        "family": studio.family,
        "dtype": DTYPE_NAMES[torch_dtype],
        "fused_loras": _fused_loras(studio, active),
    }
    temp = _temporary_folder(out)
    written = temp / out.name
    try:
        with _quiet(), studio.computing(replace(blend, fused=True)) as pipeline:
            export = _plain_copy(pipeline, torch_dtype)
            _check_finite(export, torch_dtype, out)
            _save(export, written, record, out)
            _verify(written, _plain_copy(pipeline, studio.base.dtype), torch_dtype, temp / "config", out)
        _move_into_place(written, out, temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out


def _checked_destination(out: str | Path, overwrite: bool) -> Path:
    """`out` as a Path, after refusing what cannot be written or must not be replaced (before any model loads)."""
    out = Path(out).expanduser()
    single_file = out.suffix == ".safetensors"
    if out.suffix.lower() in PICKLE_SUFFIXES:
        raise StudioError(
            f"{out}: exports are written as one .safetensors file or a diffusers folder, never as a pickle"
        )
    if not out.parent.is_dir():
        raise StudioError(f"{out}: the folder {out.parent} does not exist")
    if not (out.exists() or out.is_symlink()):
        return out
    if not overwrite:
        raise StudioError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")
    if single_file and not out.is_file():
        raise StudioError(f"{out}: exists and is not a file, so it is not replaced by a single-file checkpoint")
    if not single_file and not (out / "model_index.json").is_file():
        raise StudioError(f"{out}: exists and is not a diffusers folder (no model_index.json), so it is not replaced")
    return out


def _export_dtype(name: str, out: Path) -> torch.dtype:
    if name not in DTYPES:
        raise StudioError(f"{out}: unknown dtype {name!r}: use fp32, fp16 or bf16")
    return DTYPES[name]


def _fused_loras(studio: Studio, active: dict[str, Weight]) -> list[dict]:
    """What the export records of each fused LoRA: its file name (not its local path), short sha256, weight."""
    sources = {info.name: info.source for info in studio.list_adapters()}
    fused = []
    for name, weight in active.items():
        path = resolve_lora_source(sources[name])
        sha256 = lora_io.file_hashes(path, is_safetensors=path.suffix == ".safetensors")["sha256"]
        fused.append({"file": path.name, "sha256": sha256[:12], "weight": weight})
    return fused


def _temporary_folder(out: Path) -> Path:
    """A hidden folder beside `out`, so the finished export is renamed into place on the same file system."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as error:
        raise StudioError(f"{out}: cannot write in {out.parent}: {error.strerror}") from error


def _plain_copy(pipeline: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
    """`pipeline` without its LoRA layers, for saving: only the module structure is copied, the weights are
    the pipeline's own (fused) tensors, or copies cast to `dtype`. The pipeline itself keeps its adapters."""
    tensors = {}
    for model in pipeline.components.values():
        if isinstance(model, torch.nn.Module):
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                tensors[id(tensor)] = _cast(tensor, dtype)
    plain = copy.deepcopy(pipeline, memo=tensors)  # deepcopy takes a tensor found in its memo as is
    plain.unload_lora_weights()  # each LoRA layer gives way to its base layer, whose weight is the fused one
    return plain


def _check_finite(pipeline: DiffusionPipeline, dtype: torch.dtype, out: Path) -> None:
    """Weights too large for `dtype` (a big LoRA weight, or fp16's 65504) would save as inf and render black."""
    for component, model in pipeline.components.items():
        if isinstance(model, torch.nn.Module):
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise StudioError(
                        f"{out}: fused at these weights, {component}.{name} is not finite in "
                        f"{DTYPE_NAMES[dtype]}; use smaller LoRA weights (or fp32)"
                    )


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    cast = tensor.detach().to(dtype)
    return torch.nn.Parameter(cast, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else cast


def _save(pipeline: DiffusionPipeline, path: Path, record: dict, out: Path) -> None:
    """A single-file checkpoint with the record as metadata, or a diffusers folder with the record beside it."""
    try:
        if path.suffix == ".safetensors":
            metadata = {f"studio.{key}": v if isinstance(v, str) else json.dumps(v) for key, v in record.items()}
            save_single_file(pipeline, path, metadata=metadata, family=record["family"])
        else:
            pipeline.save_pretrained(path)
            (path / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    except StudioError as error:
        raise StudioError(f"{out}: {error}") from error
    except OSError as error:
        raise StudioError(f"{out}: could not be written: {error}") from error


def _verify(path: Path, expected: DiffusionPipeline, dtype: torch.dtype, config: Path, out: Path) -> None:
    """Reload the export with plain diffusers; every weight must be there, off the meta device, under the
    base model's names and equal to `expected`'s (the fused weights) cast to `dtype`. Else raise."""
    try:
        if path.suffix == ".safetensors":
            _save_configs(expected, config)
            loaded = type(expected).from_single_file(str(path), config=str(config), local_files_only=True, dtype=dtype)
        else:
            loaded = DiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=dtype)
    except Exception as error:  # whatever diffusers raises, the export is unusable
        raise StudioError(
            f"{out}: the export does not load in plain diffusers ({_first_line(error)}); nothing was written"
        ) from error
    names = SINGLE_FILE_MODELS if path.suffix == ".safetensors" else tuple(expected.components)
    problems = []
    for name in names:
        model = getattr(expected, name, None)
        if not isinstance(model, torch.nn.Module):
            continue
        reloaded = getattr(loaded, name)
        want, got = model.state_dict(), reloaded.state_dict()
        tensors = itertools.chain(reloaded.named_parameters(), reloaded.named_buffers())
        unequal = [key for key in want.keys() & got.keys() if not _equal(got[key], want[key], dtype)]
        checks = {
            "missing": sorted(want.keys() - got.keys()),
            "unexpected": sorted(got.keys() - want.keys()),
            "with LoRA names": sorted(key for key in want.keys() | got.keys() if any(m in key for m in LORA_MARKERS)),
            "left on the meta device": sorted(key for key, tensor in tensors if tensor.is_meta),
            "unequal to the fused ones": sorted(unequal),
        }
        problems += [f"{name}: {len(keys)} weights {kind} (e.g. {keys[0]})" for kind, keys in checks.items() if keys]
    if problems:
        raise StudioError(f"{out}: the export did not load back as saved ({'; '.join(problems)}); nothing was written")


def _equal(loaded: torch.Tensor, fused: torch.Tensor, dtype: torch.dtype) -> bool:
    if loaded.is_meta:
        return False
    return torch.equal(loaded, _cast(fused, dtype).to(loaded.device))


def _save_configs(pipeline: DiffusionPipeline, folder: Path) -> None:
    """Every config and tokenizer of `pipeline` but no weights: what `from_single_file(config=...)` reads offline."""
    pipeline.save_config(folder)
    for name, component in pipeline.components.items():
        if isinstance(component, PreTrainedModel):
            component.config.save_pretrained(folder / name)
        elif hasattr(component, "save_config"):  # diffusers models and schedulers
            component.save_config(folder / name)
        elif component is not None:  # tokenizers, image processors
            component.save_pretrained(folder / name)


def _move_into_place(written: Path, out: Path, temp: Path) -> None:
    """Rename the verified export to `out`. A folder cannot replace a folder in one rename: the old one moves
    into the temporary folder first (and is deleted with it), and back if the second rename fails."""
    replaced = temp / "replaced"
    try:
        if written.is_dir() and out.exists():
            os.replace(out, replaced)
        os.replace(written, out)
    except OSError as error:
        if replaced.exists() and not out.exists():
            os.replace(replaced, out)
        raise StudioError(f"{out}: could not be written: {error}") from error


@contextlib.contextmanager
def _quiet():
    """Saving and reloading print a progress bar and a load report per component; users get one line instead."""
    verbosity = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled()
    for library in (transformers_logging, diffusers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, level, bar in zip((transformers_logging, diffusers_logging), verbosity, bars):
            library.set_verbosity(level)
            if bar:
                library.enable_progress_bar()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
