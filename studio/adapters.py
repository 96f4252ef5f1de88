"""`Studio`: one pipeline, its named LoRA adapters and their blend, safe to share between threads.

Everything that touches a pipeline's adapters goes through here, so the UI, the CLIs and scripts behave
the same. The studio keeps the blend it was asked for (`Blend`) apart from the one applied to the
pipeline, and applies a blend under a lock right before the pipeline runs: a generation always renders
with exactly the blend it was asked with, whatever other threads do meanwhile.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download, snapshot_download
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from transformers.utils import logging as transformers_logging

from studio import lora_io
from studio.base import BaseModel, load_base
from studio.errors import StudioError
from studio.prompts import check_clip_skip, pipeline_text_encoders, prompt_arguments

UNET_BLOCKS = ("down", "mid", "up")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]{0,99}$")

# A weight is a number, or per component {"unet": w, "text_encoder": w, "text_encoder_2": w}, where the
# UNet's w may itself be per block {"down": ..., "mid": ..., "up": ...} as diffusers' set_adapters takes.
Weight = float | Mapping


@dataclass(frozen=True)
class Blend:
    """What the pipeline should compute with: adapter weights in order, LoRA on/off, fused or not."""

    weights: tuple[tuple[str, Weight], ...] = ()
    enabled: bool = True
    fused: bool = False

    def active(self) -> dict[str, Weight]:
        """The adapters that contribute: enabled, and with a weight that is not zero everywhere."""
        if not self.enabled:
            return {}
        return {name: weight for name, weight in self.weights if not _is_zero(weight)}


@dataclass
class AdapterInfo:
    """A loaded adapter as users see it: where it came from, what it is, and its weight in the blend."""

    name: str
    source: str
    format: str
    family: str
    components: list[str]
    ranks: list[int]
    alphas: list[float]
    num_modules: int
    trigger_words: list[str]
    metadata: dict[str, str] = field(repr=False)
    weight: Weight = 1.0


class Studio:
    """A base pipeline plus named adapters; the README's "Adapters" section shows the public API."""

    def __init__(self, base: BaseModel):
        self.base = base
        self._adapters: dict[str, AdapterInfo] = {}
        self._blend = Blend()
        self._applied = Blend()
        self._fused_originals: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._layers: dict[str, list[tuple[str, BaseTunerLayer]]] | None = None  # listed once per load/delete
        self._lock = threading.RLock()

    @classmethod
    def from_base(cls, source: str | Path = "demo", **kwargs) -> Studio:
        """Load a base model (any source `studio.base.load_base` accepts) and wrap it."""
        return cls(load_base(source, **kwargs))

    @property
    def pipeline(self):
        return self.base.pipeline

    @property
    def family(self) -> str:
        return self.base.family

    @property
    def blend(self) -> Blend:
        """The blend the next `generate` without an explicit blend renders with."""
        return self._blend

    # Adapters --------------------------------------------------------------------------------------------

    def load_adapter(
        self, source: str | Path, name: str | None = None, weight: Weight = 1.0, allow_pickle: bool = False
    ) -> AdapterInfo:
        """Read a LoRA file (any format `studio.lora_io` reads) or a hub id and add it to the blend at `weight`.

        The file is checked against the pipeline (family, every target module present, shapes) before
        anything is injected; if diffusers still fails, the partial adapter is removed again.
        """
        path = resolve_lora_source(source)
        name = name or _name_from_path(path)
        if not ADAPTER_NAME.match(name):
            raise StudioError(f"{source}: adapter name {name!r} must be letters, digits, '.', '_' or '-'")
        lora = lora_io.read_lora(path, allow_pickle=allow_pickle)
        lora_io.check_family(lora, self.family)
        self._check_targets(lora)
        weight = self._validated_weight(name, weight, lora.components)
        with self._lock:
            if name in self._adapters:
                raise StudioError(f"{source}: an adapter named {name!r} is already loaded; delete it or pick another name")
            self._unfuse_exactly()
            try:
                with _quiet_transformers():
                    self.pipeline.load_lora_weights(lora.state_dict, adapter_name=name, low_cpu_mem_usage=True)
            except Exception as error:  # diffusers/peft raise many types; none may leave a half adapter behind
                self._remove_from_pipeline(name)
                self._applied = None
                self._layers = None
                raise StudioError(f"{source}: diffusers could not load it: {_first_line(error)}") from error
            info = AdapterInfo(
                name=name,
                source=str(source),
                format=lora.format,
                family=lora.family,
                components=list(lora.components),
                ranks=sorted(set(lora.ranks)),
                alphas=sorted(set(lora.alphas)),
                num_modules=len(lora.modules),
                trigger_words=list(lora.trigger_words),
                metadata=dict(lora.metadata),
                weight=weight,
            )
            self._adapters[name] = info
            self._blend = replace(self._blend, weights=self._blend.weights + ((name, weight),))
            self._applied = None  # diffusers changed the active adapters while loading
            self._layers = None
            self._apply(self._blend)
        return info

    def delete_adapter(self, name: str) -> None:
        with self._lock:
            self._require(name)
            self._unfuse_exactly()
            self._remove_from_pipeline(name)
            del self._adapters[name]
            weights = tuple((n, w) for n, w in self._blend.weights if n != name)
            self._blend = replace(self._blend, weights=weights)
            self._applied = None
            self._layers = None
            self._apply(self._blend)

    def list_adapters(self) -> list[AdapterInfo]:
        """Loaded adapters in load order, each with its weight in the current blend."""
        weights = dict(self._blend.weights)
        return [replace(info, weight=weights[name]) for name, info in self._adapters.items()]

    # The blend -------------------------------------------------------------------------------------------

    def set_adapters(self, weights: Mapping[str, Weight]) -> None:
        """Set the blend: `{name: weight}` for the adapters to use; loaded adapters not named get weight 0."""
        self._blend = self.make_blend(weights, enabled=self._blend.enabled, fused=self._blend.fused)
        with self._lock:
            self._apply(self._blend)

    def make_blend(self, weights: Mapping[str, Weight], enabled: bool = True, fused: bool = False) -> Blend:
        """A validated `Blend` for `generate(blend=...)`, without changing the studio's own blend."""
        for name in weights:
            self._require(name)
        ordered = tuple(
            (name, self._validated_weight(name, weights.get(name, 0.0), self._adapters[name].components))
            for name in self._adapters
        )
        return Blend(weights=ordered, enabled=enabled, fused=fused)

    def disable_lora(self) -> None:
        """Render with the base model alone (the pipeline's own `disable_lora`); adapters stay loaded."""
        self._blend = replace(self._blend, enabled=False)
        with self._lock:
            self._apply(self._blend)

    def enable_lora(self) -> None:
        self._blend = replace(self._blend, enabled=True)
        with self._lock:
            self._apply(self._blend)

    def fuse(self) -> None:
        """Bake the current blend into the base weights for speed. Changing the blend while fused unfuses
        (restoring the exact original weights) and fuses the new blend, so results never drift."""
        self._blend = replace(self._blend, fused=True)
        with self._lock:
            self._apply(self._blend)

    def unfuse(self) -> None:
        self._blend = replace(self._blend, fused=False)
        with self._lock:
            self._apply(self._blend)

    # Generation ------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        seed: int = 0,
        steps: int = 20,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        blend: Blend | None = None,
        clip_skip: int = 1,
    ) -> list[Image.Image]:
        """Render `num_images` images; image i uses seed `seed + i` (as A1111 does), so any one image can be
        re-rendered alone. `blend` defaults to the studio's blend at the moment of the call; `clip_skip` is
        A1111's (1: the text encoder's last layer)."""
        blend = self._blend if blend is None else blend
        _check_size(width, height)
        check_clip_skip(self.family, pipeline_text_encoders(self.pipeline), clip_skip)
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
        options = {} if guidance is None else {"guidance_scale": guidance}
        with self.computing(blend) as pipeline:
            result = pipeline(
                **prompt_arguments(pipeline, prompt, negative_prompt, clip_skip),
                num_inference_steps=steps,
                width=width,
                height=height,
                num_images_per_prompt=num_images,
                generator=generators,
                **options,
            )
        return result.images

    @contextlib.contextmanager
    def computing(self, blend: Blend | None = None) -> Iterator[DiffusionPipeline]:
        """The pipeline, computing `blend` (default: the studio's) until the block ends; other threads wait.
        For work that must see one blend throughout: a render, an export of the fused weights."""
        with self._lock:
            self._apply(self._blend if blend is None else blend)
            yield self.pipeline

    # Internals -------------------------------------------------------------------------------------------

    def _apply(self, blend: Blend) -> None:
        """Make the pipeline compute `blend`. Called with the lock held."""
        if blend == self._applied:
            return
        self._unfuse_exactly()
        active = blend.active()
        if self._adapters:
            if active:
                if not (self._applied and self._applied.active()):  # LoRA layers were off
                    self.pipeline.enable_lora()
                self._activate(active)
            else:
                self.pipeline.disable_lora()
        if blend.fused and active:
            self._fuse_exactly(list(active))
        self._applied = blend

    def _activate(self, active: dict[str, Weight]) -> None:
        """Make `active` the adapters and weights of every LoRA layer, as the pipeline's `set_adapters` does,
        but from layer lists made once per load. Diffusers walks every module of every component at each call,
        and peft's `layer.set_adapter` re-flags `requires_grad` on every adapter's parameters, which inference
        never reads: together most of a blend switch's time on SDXL. So the active adapters are set as that
        method sets them, without the flags. Block weights are expanded by diffusers' own function."""
        names = list(active)
        for component, layers in self._layers_by_component().items():
            weights = [w.get(component, 1.0) if isinstance(w, Mapping) else w for w in active.values()]
            if component == "unet":
                weights = _maybe_expand_lora_scales(self.pipeline.unet, copy.deepcopy(weights))
            for module_name, layer in layers:
                layer._active_adapter = list(names)
                for name, weight in zip(names, weights):
                    layer.set_scale(name, _module_weight(weight, module_name))

    def _layers_by_component(self) -> dict[str, list[tuple[str, BaseTunerLayer]]]:
        if self._layers is None:
            self._layers = {
                component: [
                    (name, module)
                    for name, module in getattr(self.pipeline, component).named_modules()
                    if isinstance(module, BaseTunerLayer)
                ]
                for component in self._lora_components()
            }
        return self._layers

    def _fuse_exactly(self, names: list[str]) -> None:
        """Fuse with diffusers, after keeping the weights it will change so unfusing restores them bit-exactly."""
        layers = (layer for listed in self._layers_by_component().values() for _, layer in listed)
        for layer in layers:
            if hasattr(layer, "lora_A") and any(name in layer.lora_A or name in layer.lora_magnitude_vector for name in names):
                weight = layer.get_base_layer().weight
                self._fused_originals[weight] = weight.detach().to("cpu", copy=True)
        self.pipeline.fuse_lora(components=self._lora_components(), adapter_names=names)

    def _unfuse_exactly(self) -> None:
        if not self._fused_originals:
            return
        self.pipeline.unfuse_lora(components=self._lora_components())
        with torch.no_grad():
            for weight, original in self._fused_originals.items():
                weight.copy_(original)
        self._fused_originals.clear()

    def _lora_components(self) -> list[str]:
        return [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(self.pipeline, c, None) is not None]

    def _remove_from_pipeline(self, name: str) -> None:
        loaded = {n for names in self.pipeline.get_list_adapters().values() for n in names}
        if name in loaded:
            self.pipeline.delete_adapters(name)

    def _require(self, name: str) -> None:
        if name not in self._adapters:
            known = ", ".join(self._adapters) or "none"
            raise StudioError(f"no adapter named {name!r} is loaded (loaded: {known})")

    def _check_targets(self, lora: lora_io.LoraFile) -> None:
        """Every LoRA module must name a layer of this pipeline with matching shapes, before injection."""
        for module in lora.modules:
            model = getattr(self.pipeline, module.component, None)
            if model is None:
                raise StudioError(f"{lora.path}: has {module.component} weights but this {self.family} base has none")
            try:
                layer = model.get_submodule(module.module)
            except AttributeError:
                raise StudioError(
                    f"{lora.path}: targets {module.component}.{module.module}, which the base model does not have"
                ) from None
            shape = tuple(layer.weight.shape)
            if (module.out_features, module.in_features) != shape[:2]:
                raise StudioError(
                    f"{lora.path}: {module.component}.{module.module} is {shape[0]}x{shape[1]} in the base model "
                    f"but the LoRA is {module.out_features}x{module.in_features}"
                )

    def _validated_weight(self, name: str, weight: Weight, components: list[str]) -> Weight:
        """Accept a number, a per-component dict, or a per-UNet-block dict (taken as the UNet's weight)."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float, Mapping)):
            raise StudioError(f"adapter {name!r}: weight must be a number or a dict, not {weight!r}")
        if isinstance(weight, (int, float)):
            if not math.isfinite(weight):
                raise StudioError(f"adapter {name!r}: weight {weight} is not a finite number")
            return float(weight)
        weight = dict(weight)
        for part, value in weight.items():
            for number in value.values() if isinstance(value, Mapping) else [value]:
                if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                    raise StudioError(f"adapter {name!r}: weight of {part} must be a finite number, not {number!r}")
        if set(weight) <= set(UNET_BLOCKS):
            weight = {"unet": weight}
        allowed = set(self._lora_components())
        unknown = sorted(set(weight) - allowed)
        if unknown:
            raise StudioError(
                f"adapter {name!r}: unknown component(s) {', '.join(unknown)} (this base has {', '.join(sorted(allowed))})"
            )
        unet = weight.get("unet")
        if isinstance(unet, Mapping):
            bad = sorted(set(unet) - set(UNET_BLOCKS))
            if bad:
                raise StudioError(f"adapter {name!r}: unknown UNet block(s) {', '.join(bad)} (use down, mid, up)")
            weight["unet"] = {block: unet.get(block, 1.0) for block in UNET_BLOCKS}
        # Spell out the components the dict leaves out at diffusers' default 1.0, so a blend says it all.
        return {component: weight.get(component, 1.0) for component in components}


@contextlib.contextmanager
def _quiet_transformers():
    """While diffusers injects LoRA layers, transformers prints a "LOAD REPORT" that calls the adapter weights
    missing (they are loaded right after) and a progress bar, and diffusers warns about each component the
    file has no weights for; the studio has checked the file already, so users should see none of it."""
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    diffusers_verbosity = diffusers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        diffusers_logging.set_verbosity(diffusers_verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def resolve_lora_source(source: str | Path) -> Path:
    """A local file, or a hub LoRA (`owner/name` or `owner/name/file.safetensors`) from the cache or the hub."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    parts = hub_id_parts(str(source))
    if parts is None:
        raise StudioError(f"{source}: no such file")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    offline = hub_constants.HF_HUB_OFFLINE
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.safetensors"], local_files_only=offline))
    except (OSError, ValueError) as error:
        where = "the local Hugging Face cache (offline)" if offline else "the hub or the local cache"
        raise StudioError(f"{source}: no such file, and not found in {where}: {_first_line(error)}") from error
    files = sorted(folder.rglob("*.safetensors"))
    preferred = [f for f in files if f.name == "pytorch_lora_weights.safetensors"]
    if preferred or len(files) == 1:
        return (preferred or files)[0]
    listing = ", ".join(str(f.relative_to(folder)) for f in files) or "none"
    raise StudioError(f"{source}: name one of its .safetensors files as {repo_id}/FILE (found: {listing})")


def hub_id_parts(text: str) -> list[str] | None:
    """`owner/name` or `owner/name/FILE` split at its slashes; None for what cannot be a hub id (a bare name,
    or a path starting with `.`, `/` or `~`)."""
    parts = text.split("/")
    if len(parts) < 2 or not all(parts) or text.startswith((".", "/", "~")):
        return None
    return parts


def _is_zero(weight: Weight) -> bool:
    """True when a validated weight is 0 everywhere. A per-block UNet weight counts as zero only when each
    of down/mid/up is a plain 0: a finer per-transformer dict may leave blocks at diffusers' default 1.0."""
    if not isinstance(weight, Mapping):
        return float(weight) == 0.0
    for component, part in weight.items():
        blocks = part.values() if component == "unet" and isinstance(part, Mapping) else [part]
        if not all(isinstance(b, (int, float)) and b == 0 for b in blocks):
            return False
    return True


def _module_weight(weight: float | dict, module_name: str) -> float:
    """A layer's weight from diffusers' expanded per-block UNet weights, found as its `set_adapters` finds it:
    the first key the module name contains, else the weight of the block's attention of the same index.
    Layers outside the blocks (a LoCon's `conv_in`, say) keep the default 1.0, where diffusers would fail."""
    if not isinstance(weight, dict):
        return weight
    for key, value in weight.items():
        if key in module_name:
            return value
    parts = module_name.split(".")
    if len(parts) < 4:
        return 1.0
    return weight.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)


def _name_from_path(path: Path) -> str:
    stem = path.name.removesuffix(".safetensors") if path.name != "pytorch_lora_weights.safetensors" else path.parent.name
    return re.sub(r"[^\w.\-]+", "_", stem).strip("._-") or "lora"


def _check_size(width: int | None, height: int | None) -> None:
    for label, value in (("width", width), ("height", height)):
        if value is not None and (value <= 0 or value % 8):
            raise StudioError(f"{label} {value} must be a positive multiple of 8")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
