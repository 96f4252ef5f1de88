"""The LoRA Studio web app: Generate, Library, Train and Merge tabs over one shared `Studio`.

This is the only module that imports gradio. Many people can use one app at once: adapters are loaded
once and shared, while what each browser tab wants (which adapters are on, their weights, "LoRA off")
travels with each of its requests as a small JSON *blend spec*. The server turns the spec into a `Blend`
for that request only (`Studio.generate(blend=...)`), so nobody's sliders change anybody else's images.

Blend spec: `{adapter: {"on": bool, "weight": w, "text_encoder": m, "down": m, "mid": m, "up": m}}`, the
last four optional multipliers of `weight` (1 when absent); a bare number means "on at that weight". From a
script: `Client(url).predict(prompt="a red circle", blend={"striped": 0.8}, api_name="/generate")`.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import gradio as gr
from PIL import Image

from studio import lora_io
from studio.a1111 import format_number, split_lora_tags
from studio.adapters import UNET_BLOCKS, AdapterInfo, Blend, Studio, Weight
from studio.data import scan_images
from studio.errors import StudioError
from studio.generate import base_source, default_size, image_metadata
from studio.grid import labelled_grid
from studio.library import DEFAULT_MAX_UPLOAD_BYTES, SUFFIX, LibraryEntry, LoraLibrary, check_name, safe_name
from studio.merge import MERGE_METHODS, merge_loras
from studio.pngmeta import save_png
from studio.train_config import TEXT_ENCODER_TARGETS, UNET_TARGETS, parse_config
from studio.train_dreambooth import check_initial_lora, settings_to_train_further
from studio.train_job import TrainingJob, TrainStatus

logger = logging.getLogger("studio.ui")

MAX_SEED = 2**32 - 1
EXAMPLE_PROMPTS = {"demo": "a red circle", "tiny-sd": "a red circle", "tiny-sdxl": "a red circle"}
MULTIPLIERS = ("text_encoder", *UNET_BLOCKS)  # the per-part weight panel, as multipliers of the weight
COMPARE_CELL_PIXELS = 128  # small renders are enlarged (nearest neighbour) to at least this in grids
CARD_PREVIEW_PIXELS = 96
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LIBRARY_COLUMNS = ["name", "status", "family", "format", "rank", "alpha", "modules", "trigger words", "size"]

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
SYSTEM_MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
CSS = """
.lora-card { padding: 8px !important; }
.lora-card .lora-meta p { font-size: 0.85em; margin: 0; opacity: 0.85; }
.lora-preview img, .pixelated img { image-rendering: pixelated; }
.tip p { font-size: 0.9em; opacity: 0.85; }
#studio-header h1 { margin-bottom: 0; }
"""


@dataclass
class UIOptions:
    """Where the app keeps its files and what it accepts; `app.py` fills it from the command line."""

    lora_dir: Path = Path("loras")
    out_dir: Path = Path("outputs")
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    render_previews: bool = True  # render a card preview for LoRAs that have no NAME.preview.png


class StudioApp:
    """Everything the pages do, as plain methods that raise `StudioError`; `build_app` wires them to gradio."""

    def __init__(self, studio: Studio, options: UIOptions):
        self.studio = studio
        self.options = options
        self.out_dir = Path(options.out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.library = LoraLibrary(studio, options.lora_dir, self.out_dir / "previews", options.max_upload_bytes)
        self.library.scan()
        self.training = TrainingJob(on_finished=self._add_trained_lora)
        self.default_width, self.default_height = default_size(studio.pipeline)
        # the largest clip skip the model allows: an SD1 encoder's layer count; other families take none
        self.max_clip_skip = (
            min(12, studio.pipeline.text_encoder.config.num_hidden_layers) if studio.family == "sd1" else 1
        )
        self._image_lock = threading.Lock()  # numbering of saved images
        self._hashes: dict[tuple[Path, float, int], dict[str, str]] = {}

    # Generate ------------------------------------------------------------------------------------------

    def blend_for(self, prompt: str, spec: dict | None, lora_off: bool) -> tuple[str, Blend]:
        """The prompt without `<lora:...>` tags, and the blend this request asked for: the adapters its spec
        switched on, then the prompt's tags (which win). "LoRA off" renders with the base model alone."""
        if spec is not None and not isinstance(spec, dict):
            raise StudioError(f"the blend must be an object {{name: weight or settings}}, not {spec!r}")
        text, tags = split_lora_tags(prompt or "")
        loaded = {info.name: info for info in self.library.loaded()}
        weights: dict[str, Weight] = {}
        for name, entry in (spec or {}).items():
            if name in loaded:  # an adapter another user deleted meanwhile is simply left out
                weight = spec_weight(entry, loaded[name].components)
                if weight is not None:
                    weights[name] = weight
        for tag in tags:
            if tag.name not in loaded:
                known = ", ".join(sorted(loaded)) or "none"
                raise StudioError(
                    f"the prompt names <lora:{tag.name}> but no LoRA {tag.name!r} is loaded (loaded: {known})"
                )
            weights[tag.name] = tag.weight_for(loaded[tag.name].components)
        return text, self.studio.make_blend(weights, enabled=not lora_off)

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        seed: int = -1,
        steps: int = 20,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        lora_off: bool = False,
        blend: dict | None = None,
        clip_skip: int = 1,
    ) -> tuple[list[tuple[str, str]], str, int]:
        """Render and save PNGs (with A1111 parameters and our record); return (gallery, summary, seed used)."""
        text, chosen = self.blend_for(prompt, blend, lora_off)
        seed = _seed(seed)
        settings = self._settings(negative_prompt, seed, steps, guidance, width, height, clip_skip)
        images = self.studio.generate(text, **settings, num_images=int(num_images), blend=chosen)
        folder = self._image_folder()
        gallery = []
        for i, image in enumerate(images):
            path = self._save(folder, image, text, {**settings, "seed": seed + i}, chosen.active())
            gallery.append((str(path), f"seed {seed + i}"))
        return gallery, self._summary(text, settings, chosen, len(images), folder), seed

    def compare(
        self,
        prompt: str,
        negative_prompt: str = "",
        seed: int = -1,
        steps: int = 20,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        blend: dict | None = None,
        clip_skip: int = 1,
    ) -> tuple[list[tuple[str, str]], str, int]:
        """Base model | each active adapter alone | the blend, same seeds, as one labelled grid (first in
        the gallery) followed by the cells. One row per image."""
        text, chosen = self.blend_for(prompt, blend, lora_off=False)
        active = chosen.active()
        if not active:
            raise StudioError("Compare needs at least one LoRA switched on (or a <lora:name:w> tag in the prompt)")
        seed = _seed(seed)
        settings = self._settings(negative_prompt, seed, steps, guidance, width, height, clip_skip)
        columns = [("base model", self.studio.make_blend({}, enabled=False))]
        columns += [
            (f"{name} {_weight_label(weight)}", self.studio.make_blend({name: weight}))
            for name, weight in active.items()
        ]
        if len(active) > 1:
            columns.append(("blend", chosen))
        folder = self._image_folder()
        cells, gallery = [], []
        for label, column_blend in columns:
            images = self.studio.generate(text, **settings, num_images=int(num_images), blend=column_blend)
            cells.append(images)
            for i, image in enumerate(images):
                path = self._save(folder, image, text, {**settings, "seed": seed + i}, column_blend.active())
                gallery.append((str(path), f"{label} · seed {seed + i}"))
        rows = [[column[i] for column in cells] for i in range(int(num_images))]
        scale = max(1, COMPARE_CELL_PIXELS // min(rows[0][0].size))
        grid = labelled_grid(
            rows, [label for label, _ in columns], [f"seed {seed + i}" for i in range(len(rows))], scale
        )
        grid_path = folder / f"{self._next_number(folder):05d}-{seed}-compare.png"
        parameters, _ = self._metadata(text, {**settings, "seed": seed}, active)
        save_png(grid_path, grid, parameters)
        gallery.insert(0, (str(grid_path), " | ".join(label for label, _ in columns)))
        return gallery, self._summary(text, settings, chosen, int(num_images), folder, compare=True), seed

    def _settings(self, negative_prompt, seed, steps, guidance, width, height, clip_skip) -> dict:
        return {
            "negative_prompt": negative_prompt or None,
            "seed": seed,
            "steps": int(steps),
            "guidance": float(guidance),
            "width": int(width or self.default_width),
            "height": int(height or self.default_height),
            "clip_skip": int(clip_skip or 1),
        }

    def _summary(self, text: str, settings: dict, blend: Blend, count: int, folder: Path, compare: bool = False) -> str:
        seed = settings["seed"]
        seeds = f"seed {seed}" if count == 1 else f"seeds {seed}–{seed + count - 1}"
        if not blend.enabled:
            loras = "LoRA off (base model)"
        else:
            loras = ", ".join(f"`{name}` {_weight_label(w)}" for name, w in blend.active().items()) or "no LoRA"
        what = "Compared" if compare else "Rendered"
        return (
            f"{what} **{text or '(empty prompt)'}** · {seeds} · {settings['steps']} steps · CFG {format_number(settings['guidance'])}"
            f" · {settings['width']}×{settings['height']}"
            + (f" · clip skip {settings['clip_skip']}" if settings["clip_skip"] > 1 else "")
            + f" · {loras}  \nSaved with their settings in `{_display_path(folder)}`"
        )

    def _image_folder(self) -> Path:
        folder = self.out_dir / "images" / date.today().isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _next_number(self, folder: Path) -> int:
        return len(list(folder.glob("*.png")))

    def _save(self, folder: Path, image: Image.Image, text: str, settings: dict, active: dict[str, Weight]) -> Path:
        parameters, record = self._metadata(text, settings, active)
        with self._image_lock:
            path = folder / f"{self._next_number(folder):05d}-{settings['seed']}.png"
            save_png(path, image, parameters, record)
        return path

    def _metadata(self, text: str, settings: dict, active: dict[str, Weight]) -> tuple[str, dict]:
        return image_metadata(
            self.studio, self.studio.base.source, text, settings["negative_prompt"] or "", settings["seed"],
            settings["steps"], settings["guidance"], settings["width"], settings["height"], active,
            {name: self._file_facts(name) for name in active}, clip_skip=settings["clip_skip"],
        )

    def _file_facts(self, name: str) -> dict[str, str]:
        """The adapter file's path and hashes, hashed once per file version."""
        path = self.library.entry(name).path
        stat = path.stat()
        key = (path, stat.st_mtime, stat.st_size)
        if key not in self._hashes:
            self._hashes[key] = {"source": str(path), **lora_io.file_hashes(path)}
        return self._hashes[key]

    # Library -------------------------------------------------------------------------------------------

    def library_table(self) -> list[list]:
        rows = []
        for entry in self.library.entries():
            info = entry.info
            size = f"{entry.path.stat().st_size / 1024**2:.1f} MB" if entry.path.is_file() else "?"
            if info is None:
                rows.append([entry.name, f"not loaded: {entry.error}", "", "", "", "", "", "", size])
                continue
            rows.append([
                entry.name, "loaded", info.family, info.format, _numbers(info.ranks), _numbers(info.alphas),
                info.num_modules, ", ".join(info.trigger_words), size,
            ])  # fmt: skip
        return rows

    def upload(self, file_path: str | None, name: str, replace: bool) -> str:
        if not file_path:
            raise StudioError("choose a .safetensors file to upload first")
        entry = self.library.add_file(Path(file_path), Path(file_path).name, name=name or None, replace=replace)
        self._render_preview(entry.name)
        return f"Added **{entry.name}** to the library ({_describe(entry)})."

    def download(self, hub_id: str, name: str, replace: bool) -> str:
        if not hub_id or not hub_id.strip():
            raise StudioError("type a hub id such as owner/repo or owner/repo/file.safetensors")
        entry = self.library.add_from_hub(hub_id, name=name or None, replace=replace)
        self._render_preview(entry.name)
        return f"Downloaded **{entry.name}** into the library ({_describe(entry)})."

    def inspect(self, name: str | None, file_path: str | None = None) -> tuple[str, dict]:
        """Everything `lora_io.inspect` reports about a library LoRA (or an uploaded file not yet added)."""
        if file_path:
            if not Path(file_path).name.lower().endswith(SUFFIX):
                raise StudioError(f"{Path(file_path).name}: only .safetensors files can be inspected here")
            report = lora_io.inspect(file_path)
            title = Path(file_path).name
        elif name:
            report = self.library.inspect(name)
            title = name
        else:
            raise StudioError("pick a LoRA to inspect")
        facts = report.to_dict()
        facts["file"] = Path(facts.pop("path")).name  # a "path" key would read as a file to download to clients
        return _report_markdown(title, report), facts

    def rename(self, name: str | None, new_name: str) -> str:
        if not name:
            raise StudioError("pick the LoRA to rename")
        entry = self.library.rename(name, new_name)
        return f"Renamed **{name}** to **{entry.name}**."

    def delete(self, name: str | None, confirmed: bool) -> str:
        if not name:
            raise StudioError("pick the LoRA to delete")
        if not confirmed:
            raise StudioError(
                f"tick 'yes, delete the file' to delete {name} (its file is removed from {self.library.folder})"
            )
        self.library.delete(name)
        return f"Deleted **{name}** and its file."

    def render_missing_previews(self) -> None:
        if self.options.render_previews:
            for info in self.library.loaded():
                self._render_preview(info.name)

    def _render_preview(self, name: str) -> None:
        if not self.options.render_previews or self.library.preview(name) is not None:
            return
        example = EXAMPLE_PROMPTS.get(self.studio.base.source, "a picture")
        self.library.render_preview(name, example)
        self.library.version += 1

    # Train ---------------------------------------------------------------------------------------------

    def dataset_folders(self) -> list[str]:
        """Folders of images under OUT/datasets the trainer may read (users copy their datasets there)."""
        root = self.out_dir / "datasets"
        root.mkdir(parents=True, exist_ok=True)
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def settings_to_train_further(self, lora_name: str) -> dict[str, object]:
        """The rank, targets and text encoders that training library LoRA `lora_name` further takes."""
        return settings_to_train_further(self._lora_to_start_from(lora_name))

    def _lora_to_start_from(self, lora_name: str):
        entry = self.library.entry(lora_name)
        if not entry.loaded:
            raise StudioError(f"{lora_name} cannot be trained further: {entry.error}")
        return lora_io.read_lora(entry.path)  # loaded, so for this base model's family

    def start_training(
        self, name: str, uploads: list[str] | None, dataset: str | None, options: dict, start_from: str | None = None
    ) -> str:
        """Check the request (every trainer option included), gather the images, start the trainer process.

        `options` are `TrainConfig` fields; each run gets its own folder OUT/train/NAME-TIME. `start_from` names
        a library LoRA to train further (the trainer's --init-from); the fields must then fit it, as
        `settings_to_train_further` fills them."""
        name = check_name(name or "")
        if any(entry.name == name for entry in self.library.entries()):
            raise StudioError(f"the library already has a LoRA named {name!r}; pick another name")
        if self.training.status().active:
            raise StudioError(
                f"a training ({self.training.status().name}) is already running; wait for it or cancel it"
            )
        uploads = [Path(p) for p in uploads or [] if Path(p).suffix.lower() in (*IMAGE_SUFFIXES, ".txt")]
        if not uploads and not dataset:
            raise StudioError("upload some images of the subject, or pick a dataset folder")
        run = self.out_dir / "train" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        images = run / "instance-images" if uploads else self._dataset_folder(dataset)
        output = run / "output"
        base = self.studio.base
        args = ["--base", base_source(base.source), "--instance-dir", str(images),
                "--output-dir", str(output), "--report-to", "none"]  # fmt: skip
        if base.base_config:  # the trainer loads the base the way the app did
            args += ["--base-config", base_source(base.base_config)]
        if base.allow_pickle:
            args.append("--allow-pickle")
        if base.device.type != "cpu":
            args += ["--mixed-precision", "fp16"]
        lora = self._lora_to_start_from(start_from) if start_from else None
        if lora is not None:
            options = {**options, "init_from": lora.path, "dora": settings_to_train_further(lora)["dora"]}
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif isinstance(value, list):
                args += [flag, ",".join(value)]
            elif value is not None and value is not False and value != "":
                args += [flag, str(value)]
        config = parse_config(args)  # every option error is reported now, not by a failed process later
        if lora is not None:
            check_initial_lora(config, lora)  # and whether the fields fit the LoRA to start from
        if uploads:
            images.mkdir(parents=True)
            for upload in uploads:
                shutil.copyfile(upload, images / (safe_name(upload.stem) + upload.suffix.lower()))
        try:  # and every image without a prompt
            scan_images(images, config.instance_prompt, caption_extension=config.caption_extension)
        except StudioError:
            shutil.rmtree(run, ignore_errors=True)
            raise
        self.training.start(name, output, args)
        return f"Started training **{name}**: loading the base model..."

    def cancel_training(self) -> str:
        self.training.cancel()
        return "Cancelled."

    def _dataset_folder(self, dataset: str) -> Path:
        root = (self.out_dir / "datasets").resolve()
        folder = (root / dataset).resolve()
        if folder.parent != root or not folder.is_dir():
            raise StudioError(f"{dataset!r}: not a folder of {root}")
        return folder

    def _add_trained_lora(self, name: str, lora_path: Path) -> str:
        entry = self.library.add_file(lora_path, f"{name}{SUFFIX}", name=name)
        self._render_preview(entry.name)
        return f"Finished: **{entry.name}** is in the library and on the Generate tab."

    # Merge ---------------------------------------------------------------------------------------------

    def merge(
        self,
        names: list[str] | None,
        weights: dict | None,
        method: str,
        density: float = 0.5,
        rank: int = 0,
        name: str = "",
        replace: bool = False,
        preview_prompt: str = "",
    ) -> tuple[str, list[tuple[str, str]]]:
        """Merge library LoRAs into OUT/merges/NAME.safetensors, add it to the library, and preview it next to
        the base model and the inputs blended at the same weights (same seed)."""
        names = list(names or [])
        if len(names) < 2:
            raise StudioError("pick at least two LoRAs to merge")
        name = check_name(name or "")
        weights = [float((weights or {}).get(n, 1.0)) for n in names]
        paths = [self.library.entry(n).path for n in names]
        folder = self.out_dir / "merges"
        folder.mkdir(parents=True, exist_ok=True)
        merged = merge_loras(paths, weights, out=folder / f"{name}{SUFFIX}", **_merge_options(method, density, rank))
        entry = self.library.add_file(merged, merged.name, name=name, replace=replace)
        prompt = preview_prompt or EXAMPLE_PROMPTS.get(self.studio.base.source, "a picture")
        columns = [
            ("base model", self.studio.make_blend({}, enabled=False)),
            ("inputs blended", self.studio.make_blend(dict(zip(names, weights)))),
            (f"merged ({method})", self.studio.make_blend({entry.name: 1.0})),
        ]
        settings = self._settings("", 0, 20, 7.5, None, None, 1)
        folder = self._image_folder()
        gallery = []
        for label, blend in columns:
            image = self.studio.generate(prompt, **settings, blend=blend)[0]
            gallery.append((str(self._save(folder, image, prompt, settings, blend.active())), label))
        recipe = ", ".join(f"{n} {format_number(w)}" for n, w in zip(names, weights))
        return f"Merged {recipe} with **{method}** into **{entry.name}** ({_describe(entry)}).", gallery


# Blend specs -------------------------------------------------------------------------------------------


def spec_weight(entry: dict | float | None, components: list[str]) -> Weight | None:
    """One adapter's entry of a blend spec as a `Studio` weight, or None when it is off."""
    if entry is None or isinstance(entry, bool):
        return None
    if isinstance(entry, (int, float)):
        return float(entry)
    if not isinstance(entry, dict):
        raise StudioError(f"a blend entry must be a number or an object, not {entry!r}")
    if not entry.get("on", False):
        return None
    try:
        weight = float(entry.get("weight", 1.0))
        multipliers = {key: float(entry.get(key, 1.0)) for key in MULTIPLIERS}
    except (TypeError, ValueError):
        raise StudioError(f"a blend entry has a weight that is not a number: {entry!r}") from None
    if all(value == 1.0 for value in multipliers.values()):
        return weight
    parts: dict[str, object] = {"unet": {block: weight * multipliers[block] for block in UNET_BLOCKS}}
    for component in components:
        if component != "unet":
            parts[component] = weight * multipliers["text_encoder"]
    return parts


def _merge_options(method: str, density: float, rank: int) -> dict:
    """The keyword arguments `merge_loras` takes for `method` (only the options that method uses)."""
    if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        return {"method": method, "density": float(density)}
    if method == "svd" and rank:
        return {"method": method, "rank": int(rank)}
    return {"method": method}


def _set_spec_js(name: str, key: str) -> str:
    """A browser-side handler that writes one control's value into this tab's blend spec: instant, no
    round trip, so a click on Generate right after moving a slider always sends the new weight."""
    return (
        f"(value, spec) => {{ const next = {{...(spec || {{}})}}; const name = {json.dumps(name)}; "
        f"next[name] = {{...(typeof next[name] === 'object' ? next[name] : {{}}), {json.dumps(key)}: value}}; return next; }}"
    )


def _insert_words_js(words: str) -> str:
    return f"(prompt) => {{ const w = {json.dumps(words)}; return prompt && prompt.trim() ? prompt.trim() + ', ' + w : w; }}"


# Page --------------------------------------------------------------------------------------------------


def build_app(app: StudioApp) -> gr.Blocks:
    """The four tabs. Each handler turns a `StudioError` into a readable message (never a traceback)."""
    studio, library = app.studio, app.library
    base = studio.base
    with gr.Blocks(title="LoRA Studio") as blocks:
        gr.Markdown(
            f"# LoRA Studio\nBase model **{base.source}** ({lora_io.FAMILY_NAMES.get(base.family, base.family)}, "
            f"{base.device.type}) · LoRA folder `{_display_path(library.folder)}` · outputs `{_display_path(app.out_dir)}`",
            elem_id="studio-header",
        )
        library_version = gr.Number(value=library.version, visible=False)
        blend_spec = gr.JSON(value={}, visible=False)
        last_seed = gr.State(-1)
        gr.Timer(5).tick(
            lambda: library.version,
            None,
            library_version,
            show_progress="hidden",
            queue=False,
            api_visibility="private",
        )

        with gr.Tab("Generate", id="generate"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=5):
                    prompt = gr.Textbox(
                        label="Prompt",
                        value=EXAMPLE_PROMPTS.get(base.source, ""),
                        placeholder="describe the picture; <lora:name:0.8> uses a LoRA by name",
                        lines=2,
                        elem_id="prompt",
                    )
                    negative = gr.Textbox(
                        label="Negative prompt", value="", placeholder="what to avoid (optional)", lines=1
                    )
                    with gr.Row():
                        generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button", scale=3)
                        compare_button = gr.Button("Compare", elem_id="compare-button", scale=2)
                    gr.Markdown(
                        "Switch LoRAs on below and set their weights, or write `<lora:name:0.8>` in the prompt. "
                        "**Compare** renders the base model, each LoRA alone and the blend with the same seed.",
                        elem_classes="tip",
                    )
                    lora_off = gr.Checkbox(
                        label="LoRA off (base model)", value=False, elem_id="lora-off",
                        info="render with the base model alone; your LoRA settings are kept",
                    )  # fmt: skip

                    @gr.render(inputs=[library_version, blend_spec], triggers=[library_version.change, blocks.load])
                    def adapter_cards(_version, spec):
                        _adapter_cards(app, spec or {}, blend_spec, prompt)

                with gr.Column(scale=6):
                    gallery = gr.Gallery(
                        label="Images", columns=2, height=560, object_fit="contain", elem_id="gallery",
                        elem_classes="pixelated", buttons=["download", "fullscreen"], interactive=False,
                    )  # fmt: skip
                    summary = gr.Markdown(elem_id="summary")
                    with gr.Accordion("Settings", open=True):
                        with gr.Row():
                            seed = gr.Number(
                                label="Seed (-1 = random)", value=-1, precision=0, minimum=-1, maximum=MAX_SEED, scale=3
                            )
                            random_seed = gr.Button("random", size="sm", scale=1, min_width=60)
                            reuse_seed = gr.Button("last seed", size="sm", scale=1, min_width=60)
                        with gr.Row():
                            steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                            guidance = gr.Slider(1.0, 20.0, value=7.5, step=0.5, label="Guidance (CFG)")
                        with gr.Row():
                            top = max(1024, 2 * max(app.default_width, app.default_height))
                            width = gr.Slider(8, top, value=app.default_width, step=8, label="Width")
                            height = gr.Slider(8, top, value=app.default_height, step=8, label="Height")
                            count = gr.Slider(1, 8, value=1, step=1, label="Images")
                        clip_skip = gr.Slider(
                            1, max(2, app.max_clip_skip), value=1, step=1, interactive=app.max_clip_skip > 1,
                            label="Clip skip (SD1.x; 2 for most anime models)",
                        )  # fmt: skip

            random_seed.click(lambda: -1, None, seed, queue=False, api_visibility="private")
            reuse_seed.click(lambda used: used, last_seed, seed, queue=False, api_visibility="private")
            settings = [prompt, negative, seed, steps, guidance, width, height, count]
            generate_button.click(
                _shown(app.generate), [*settings, lora_off, blend_spec, clip_skip], [gallery, summary, last_seed],
                api_name="generate", concurrency_id="render",
            )  # fmt: skip
            prompt.submit(
                _shown(app.generate), [*settings, lora_off, blend_spec, clip_skip], [gallery, summary, last_seed],
                api_visibility="private", concurrency_id="render",
            )  # fmt: skip
            compare_button.click(
                _shown(app.compare), [*settings, blend_spec, clip_skip], [gallery, summary, last_seed],
                api_name="compare", concurrency_id="render",
            )  # fmt: skip

        with gr.Tab("Library", id="library"):
            _library_tab(app, library_version)

        with gr.Tab("Train", id="train") as train_tab:
            _train_tab(app, library_version, train_tab)

        with gr.Tab("Merge", id="merge"):
            _merge_tab(app, library_version)

        if app.options.render_previews:
            blocks.load(
                _shown(app.render_missing_previews), None, None, show_progress="hidden", api_visibility="private"
            )
    return blocks


def _adapter_cards(app: StudioApp, spec: dict, blend_spec: gr.JSON, prompt: gr.Textbox) -> None:
    """One card per loaded LoRA: preview, on/off, weight, facts, trigger words, per-part weights."""
    library = app.library
    entries = library.entries()
    loaded = [entry for entry in entries if entry.loaded]
    gr.Markdown(f"### LoRAs ({len(loaded)})")
    if not loaded:
        gr.Markdown(
            f"No LoRA loaded yet. Add `.safetensors` files on the **Library** tab (or copy them into "
            f"`{library.folder}`), or make one on the **Train** tab.",
            elem_classes="tip",
        )
    for entry in loaded:
        info = entry.info
        state = spec.get(info.name)
        if not isinstance(state, dict):  # a bare number from a script: on at that weight
            state = {"on": state is not None, "weight": 1.0 if state is None else float(state)}
        with gr.Group(elem_classes="lora-card"):
            with gr.Row(equal_height=True):
                preview = library.preview(info.name)
                if preview is not None:
                    gr.Image(
                        _card_image(preview), show_label=False, container=False, interactive=False, buttons=[],
                        height=CARD_PREVIEW_PIXELS, width=CARD_PREVIEW_PIXELS, scale=0, min_width=CARD_PREVIEW_PIXELS,
                        elem_classes="lora-preview",
                    )  # fmt: skip
                with gr.Column(scale=4, min_width=200):
                    on = gr.Checkbox(
                        value=bool(state.get("on")), label=info.name, key=f"on-{info.name}", elem_classes="lora-on",
                        interactive=True,
                    )  # fmt: skip
                    weight = gr.Slider(
                        -1.0, 2.0, value=float(state.get("weight", 1.0)), step=0.05, label="weight",
                        key=f"weight-{info.name}", elem_classes="lora-weight", interactive=True,
                    )  # fmt: skip
            gr.Markdown(_card_facts(info, app.studio.family), elem_classes="lora-meta")
            if info.trigger_words:
                with gr.Row():
                    for word in info.trigger_words[:4]:
                        button = gr.Button(f"+ {word}", size="sm", variant="secondary", min_width=40)
                        button.click(None, prompt, prompt, js=_insert_words_js(word))
            with gr.Accordion("per-part weights", open=False):
                parts = []
                labels = {
                    "text_encoder": "text encoder ×",
                    "down": "UNet down ×",
                    "mid": "UNet mid ×",
                    "up": "UNet up ×",
                }
                with gr.Row():
                    for key in MULTIPLIERS:
                        if key == "text_encoder" and not any(c.startswith("text_encoder") for c in info.components):
                            continue
                        parts.append((key, gr.Slider(0.0, 2.0, value=float(state.get(key, 1.0)), step=0.05,
                                                     label=labels[key], min_width=100, key=f"{key}-{info.name}", interactive=True)))  # fmt: skip
        on.change(None, [on, blend_spec], blend_spec, js=_set_spec_js(info.name, "on"))
        weight.change(None, [weight, blend_spec], blend_spec, js=_set_spec_js(info.name, "weight"))
        for key, slider in parts:
            slider.change(None, [slider, blend_spec], blend_spec, js=_set_spec_js(info.name, key))
    failed = [entry for entry in entries if not entry.loaded]
    if failed:
        lines = "\n".join(f"- **{entry.name}**: {entry.error}" for entry in failed)
        gr.Markdown(f"⚠️ Not loaded (see the Library tab):\n{lines}", elem_classes="tip")


def _library_tab(app: StudioApp, library_version: gr.Number) -> None:
    library = app.library
    limit_mb = app.options.max_upload_bytes / 1024**2
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            gr.Markdown(
                f"### Add a LoRA\n`.safetensors` files only (up to {limit_mb:.0f} MB), any format: diffusers, kohya/A1111/civitai, LyCORIS."
            )
            upload_file = gr.File(label="LoRA file", file_types=[SUFFIX], type="filepath", elem_id="upload-file")
            save_as = gr.Textbox(
                label="Save as (optional)", placeholder="name; default: the file's name", elem_id="upload-name"
            )
            replace = gr.Checkbox(label="replace a LoRA with the same name", value=False)
            with gr.Row():
                add_button = gr.Button("Add to library", variant="primary", elem_id="upload-button")
                inspect_upload_button = gr.Button("Inspect without adding")
            with gr.Accordion("From the Hugging Face Hub (needs network)", open=False):
                hub_id = gr.Textbox(label="Hub id", placeholder="owner/repo or owner/repo/file.safetensors")
                hub_button = gr.Button("Download into the library")
            message = gr.Markdown(elem_id="library-message")
        with gr.Column(scale=7):
            gr.Markdown("### Library")
            gr.Dataframe(
                value=lambda _version: app.library_table(), headers=LIBRARY_COLUMNS, interactive=False, wrap=True,
                inputs=[library_version], elem_id="library-table",
            )  # fmt: skip
            with gr.Row():
                chosen = gr.Dropdown(
                    choices=_entry_names(library), label="LoRA", value=None, scale=3, elem_id="library-choice",
                    allow_custom_value=False,
                )  # fmt: skip
                inspect_button = gr.Button("Inspect", scale=1)
            with gr.Row():
                new_name = gr.Textbox(label="New name", scale=3)
                rename_button = gr.Button("Rename", scale=1)
            with gr.Row():
                confirm = gr.Checkbox(label="yes, delete the file", value=False, scale=3)
                delete_button = gr.Button("Delete", variant="stop", scale=1)
            report_text = gr.Markdown()
            with gr.Accordion("Full report (JSON)", open=False):
                report_json = gr.JSON()

    def refreshed(text: str):
        """A change's message, and the new library for every list that shows it."""
        return text, library.version, gr.Dropdown(choices=_entry_names(library), value=None), False

    def upload(file, name, replace):
        return refreshed(app.upload(file, name, replace))

    def download(hub_id, name, replace):
        return refreshed(app.download(hub_id, name, replace))

    def rename(lora, new_name):
        return refreshed(app.rename(lora, new_name))

    def delete(lora, confirmed):
        return refreshed(app.delete(lora, confirmed))

    def inspect_upload(file):
        return app.inspect(None, file)

    changed = [message, library_version, chosen, confirm]
    add_button.click(_shown(upload), [upload_file, save_as, replace], changed, api_name="upload")
    hub_button.click(_shown(download), [hub_id, save_as, replace], changed, api_name="download")
    rename_button.click(_shown(rename), [chosen, new_name], changed, api_name="rename")
    delete_button.click(_shown(delete), [chosen, confirm], changed, api_name="delete")
    inspect_button.click(_shown(app.inspect), chosen, [report_text, report_json], api_name="inspect")
    inspect_upload_button.click(
        _shown(inspect_upload), upload_file, [report_text, report_json], api_name="inspect_upload"
    )
    library_version.change(
        lambda: gr.Dropdown(choices=_entry_names(library)), None, chosen, show_progress="hidden", queue=False,
        api_visibility="private",
    )  # fmt: skip


def _train_tab(app: StudioApp, library_version: gr.Number, train_tab: gr.Tab) -> None:
    gr.Markdown(
        "Teach the model a new subject from a few pictures (DreamBooth LoRA). Training runs in its own process, "
        "one at a time; the LoRA lands in the library (and on the Generate tab) when it ends.",
        elem_classes="tip",
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            name = gr.Textbox(label="LoRA name", placeholder="e.g. my_dog", elem_id="train-name")
            images = gr.File(label="Images of the subject (a NAME.txt beside NAME.png is its caption)",
                             file_count="multiple", file_types=["image", ".txt"], type="filepath", elem_id="train-images")  # fmt: skip
            with gr.Row():
                dataset = gr.Dropdown(
                    choices=app.dataset_folders(), value=None, label=f"...or a folder of {app.out_dir / 'datasets'}",
                    scale=4, allow_custom_value=False,
                )  # fmt: skip
                refresh = gr.Button("refresh", size="sm", scale=0, min_width=60)
            instance_prompt = gr.Textbox(
                label="Instance prompt (optional if every image has a caption)",
                placeholder='a rare word + the class, e.g. "a sks shape"',
                elem_id="train-prompt",
            )
            validation_prompt = gr.Textbox(
                label="Validation prompt (optional)", placeholder="drawn every N steps while training"
            )
            start_from = gr.Dropdown(
                choices=[info.name for info in app.library.loaded()], value=None, elem_id="train-start-from",
                label="Start from a library LoRA (optional: train it further; sets its rank and layers below)",
            )  # fmt: skip
            with gr.Row():
                max_train_steps = gr.Number(label="Steps", value=400, precision=0, minimum=1)
                learning_rate = gr.Number(label="Learning rate", value=1e-4, minimum=0)
                rank = gr.Number(label="Rank", value=4, precision=0, minimum=1)
            with gr.Accordion("More options", open=False):
                unet_targets = gr.CheckboxGroup(
                    list(UNET_TARGETS), value=["to_k", "to_q", "to_v", "to_out.0"], label="UNet layers"
                )
                train_text_encoder = gr.Checkbox(label="also train the text encoder(s)", value=False)
                text_encoder_targets = gr.CheckboxGroup(
                    list(TEXT_ENCODER_TARGETS),
                    value=["q_proj", "k_proj", "v_proj", "out_proj"],
                    label="Text-encoder layers",
                )
                with gr.Row():
                    resolution = gr.Number(
                        label="Resolution (0 = the model's)", value=0, precision=0, minimum=0, step=8
                    )
                    train_batch_size = gr.Number(label="Batch size", value=1, precision=0, minimum=1)
                    repeats = gr.Number(label="Repeats", value=1, precision=0, minimum=1)
                    seed = gr.Number(label="Seed", value=0, precision=0)
                with gr.Row():
                    validation_steps = gr.Number(label="Validation every N steps", value=100, precision=0, minimum=1)
                    num_validation_images = gr.Number(label="Validation images", value=2, precision=0, minimum=1)
                    inference_steps = gr.Number(label="Validation denoising steps", value=25, precision=0, minimum=1)
                with gr.Row():
                    max_timestep = gr.Number(
                        label="Train only on timesteps below (0 = all; about 600 for a style: textures, not shapes)",
                        value=0, precision=0, minimum=0, maximum=1000, scale=3,
                    )  # fmt: skip
                    train_clip_skip = gr.Number(
                        label="Clip skip (SD1.x; as the LoRA will be used)", value=1, precision=0, minimum=1,
                        maximum=app.max_clip_skip, interactive=app.max_clip_skip > 1, scale=2,
                    )  # fmt: skip
                with gr.Row():
                    random_flip = gr.Checkbox(label="random horizontal flip", value=False)
                    export_kohya = gr.Checkbox(label="also write a kohya copy (A1111/ComfyUI)", value=False)
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
        with gr.Column(scale=6):
            progress = gr.Markdown(_progress_markdown(app.training.status()), elem_id="train-progress")
            validation = gr.Gallery(
                label="Validation images (newest first)", columns=4, height=280, elem_classes="pixelated"
            )
            with gr.Accordion("Trainer output", open=False):
                log = gr.Textbox(lines=10, max_lines=10, show_label=False, autoscroll=True)

    poll = gr.Timer(1.0, active=app.training.status().active)

    def start_training(
        name, images, dataset, instance_prompt, validation_prompt, max_train_steps, learning_rate, rank, unet_targets,
        train_text_encoder, text_encoder_targets, resolution, train_batch_size, repeats, seed, validation_steps,
        num_validation_images, inference_steps, max_timestep, random_flip, export_kohya, clip_skip, start_from=None,
    ):  # fmt: skip
        options = {
            "instance_prompt": instance_prompt, "validation_prompt": validation_prompt or None,
            "max_train_steps": max_train_steps, "learning_rate": learning_rate, "rank": rank, "unet_targets": unet_targets,
            "train_text_encoder": train_text_encoder,
            "text_encoder_targets": text_encoder_targets if train_text_encoder else None,
            "resolution": resolution or None, "train_batch_size": train_batch_size, "repeats": repeats, "seed": seed,
            "validation_steps": validation_steps, "num_validation_images": num_validation_images,
            "inference_steps": inference_steps, "max_timestep": max_timestep or None, "random_flip": random_flip,
            "export_kohya": export_kohya, "clip_skip": clip_skip,
            "checkpointing_steps": max_train_steps,  # the UI keeps no resumable checkpoints: they cost time and disk
        }  # fmt: skip
        return app.start_training(name, images, dataset, options, start_from), gr.Timer(active=True)

    def fill_from(lora_name):
        if not lora_name:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        settings = app.settings_to_train_further(lora_name)
        return (
            settings["rank"],
            settings.get("unet_targets", gr.skip()),
            settings["train_text_encoder"],
            settings.get("text_encoder_targets", gr.skip()),
        )

    def show():
        status = app.training.status()
        pictures = [(str(p), p.stem) for p in reversed(status.validation_images[-16:])]
        return (
            _progress_markdown(status),
            pictures,
            "\n".join(status.log),
            gr.Timer(active=status.active),
            app.library.version,
        )

    settings = [name, images, dataset, instance_prompt, validation_prompt, max_train_steps, learning_rate, rank,
                unet_targets, train_text_encoder, text_encoder_targets, resolution, train_batch_size, repeats, seed,
                validation_steps, num_validation_images, inference_steps, max_timestep, random_flip,
                export_kohya, train_clip_skip, start_from]  # fmt: skip
    outputs = [progress, validation, log, poll, library_version]
    start.click(_shown(start_training), settings, [progress, poll], api_name="train")
    cancel.click(_shown(app.cancel_training), None, progress, api_name="cancel_training").then(
        show, None, outputs, api_visibility="private"
    )
    poll.tick(show, None, outputs, show_progress="hidden", api_name="training_status")
    train_tab.select(show, None, outputs, show_progress="hidden", api_visibility="private")
    refresh.click(
        lambda: gr.Dropdown(choices=app.dataset_folders()), None, dataset, queue=False, api_visibility="private"
    )
    start_from.change(
        _shown(fill_from), start_from, [rank, unet_targets, train_text_encoder, text_encoder_targets],
        show_progress="hidden", api_visibility="private",
    )  # fmt: skip
    library_version.change(
        _loaded_loras(app), None, start_from, show_progress="hidden", queue=False, api_visibility="private"
    )


def _merge_tab(app: StudioApp, library_version: gr.Number) -> None:
    gr.Markdown(
        "Merge several LoRAs into one new LoRA file in the library. `cat` is exact (the merged file renders like "
        "the blend); `linear` mixes the factors (an approximation); `svd` re-factors the blend to a target rank; "
        "`ties`, `dare_*` and `magnitude_prune` keep only the strongest part (`density`) of each LoRA.",
        elem_classes="tip",
    )
    merge_spec = gr.JSON(value={}, visible=False)
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            chosen = gr.Dropdown(
                choices=[info.name for info in app.library.loaded()], multiselect=True, label="LoRAs to merge",
                elem_id="merge-choice",
            )  # fmt: skip

            @gr.render(inputs=[chosen, merge_spec], triggers=[chosen.change])
            def weight_sliders(names, spec):
                for name in names or []:
                    slider = gr.Slider(-2.0, 2.0, value=float((spec or {}).get(name, 1.0)), step=0.05,
                                       label=f"{name} weight", key=f"merge-{name}", interactive=True)  # fmt: skip
                    slider.change(None, [slider, merge_spec], merge_spec, js=_set_merge_weight_js(name))

            method = gr.Radio(list(MERGE_METHODS), value="cat", label="Method")
            with gr.Row():
                density = gr.Slider(0.01, 1.0, value=0.5, step=0.01, label="density (ties, dare, magnitude_prune)")
                rank = gr.Number(label="target rank (svd; 0 = the largest input rank)", value=0, precision=0, minimum=0)
            merged_name = gr.Textbox(label="Save as", placeholder="e.g. striped_star", elem_id="merge-name")
            replace = gr.Checkbox(label="replace a LoRA with the same name", value=False)
            preview_prompt = gr.Textbox(label="Preview prompt", value=EXAMPLE_PROMPTS.get(app.studio.base.source, ""))
            merge_button = gr.Button("Merge and add to library", variant="primary", elem_id="merge-button")
        with gr.Column(scale=6):
            message = gr.Markdown()
            previews = gr.Gallery(
                label="base model | inputs blended | merged", columns=3, height=320, elem_classes="pixelated"
            )

    def merge(names, weights, method, density, rank, name, replace, preview_prompt):
        text, gallery = app.merge(names, weights, method, density, rank, name, replace, preview_prompt)
        return text, gallery, app.library.version, gr.Dropdown(choices=[info.name for info in app.library.loaded()])

    merge_button.click(
        _shown(merge), [chosen, merge_spec, method, density, rank, merged_name, replace, preview_prompt],
        [message, previews, library_version, chosen], api_name="merge", concurrency_id="render",
    )  # fmt: skip
    library_version.change(
        _loaded_loras(app), None, chosen, show_progress="hidden", queue=False, api_visibility="private"
    )


def _set_merge_weight_js(name: str) -> str:
    return f"(value, spec) => ({{...(spec || {{}}), [{json.dumps(name)}]: value}})"


# Small helpers -----------------------------------------------------------------------------------------


def _loaded_loras(app: StudioApp):
    """A handler that refreshes a dropdown's choices to the library's loaded LoRAs."""
    return lambda: gr.Dropdown(choices=[info.name for info in app.library.loaded()])


def _shown(function):
    """Run a handler so the user sees a readable message for every failure: a `StudioError` as it is,
    anything else as one line (the traceback goes to the server log only)."""

    @functools.wraps(function)
    def handler(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except StudioError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as error:  # an unexpected failure must still reach the page as words
            logger.exception("unexpected error in %s", getattr(function, "__name__", "handler"))
            raise gr.Error(
                f"unexpected error ({type(error).__name__}): {_first_line(error)}", print_exception=False
            ) from None

    return handler


def _progress_markdown(status: TrainStatus) -> str:
    if status.state == "idle":
        return "No training yet."
    lines = [f"**{status.name}**: {status.state}"]
    if status.total:
        percent = 100 * status.step / status.total
        lines.append(f"<progress value='{status.step}' max='{status.total}' style='width:100%'></progress>")
        facts = [f"step {status.step}/{status.total} ({percent:.0f}%)"]
        if status.loss is not None:
            facts.append(f"loss {status.loss:.4f}")
        if status.steps_per_second:
            facts.append(f"{status.steps_per_second:.2f} steps/s")
        if status.eta and status.active:
            facts.append(f"{status.eta} left")
        lines.append(" · ".join(facts))
    lines.append(f"{status.message} ({status.elapsed_seconds:.0f} s)")
    return "\n\n".join(lines)


def _report_markdown(title: str, report: lora_io.LoraReport) -> str:
    components = ", ".join(f"{c} ({n})" for c, n in report.components.items())
    rows = [
        ("format", f"{report.format} ({report.naming} naming)"),
        ("family", f"{lora_io.FAMILY_NAMES.get(report.family, report.family)} ({report.family})"),
        ("modules", f"{report.num_modules}: {components}"),
        (
            "rank",
            _numbers(report.ranks)
            + (f" (as LoRA: {_numbers(report.converted_ranks)})" if report.converted_ranks != report.ranks else ""),
        ),
        ("alpha", _numbers(report.alphas) or "none (scale 1)"),
        ("dtypes", ", ".join(report.dtypes)),
        ("size", f"{report.size_bytes / 1024**2:.2f} MB"),
        ("trigger words", ", ".join(report.trigger_words) or "none declared"),
        ("top tags", ", ".join(f"{tag} ({n})" for tag, n in report.top_tags) or "none"),
        ("sha256", f"`{report.sha256}`"),
        ("AutoV2 (civitai)", f"`{report.autov2}`"),
        ("A1111 short hash", f"`{report.a1111_hash}`"),
        ("training metadata", f"{len(report.training_metadata)} keys"),
        ("unmapped keys", ", ".join(report.unmapped_keys[:5]) or "none"),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"#### {title}\n| property | value |\n|---|---|\n{table}"


def _card_facts(info: AdapterInfo, base_family: str) -> str:
    parts = [info.family, f"rank {_numbers(info.ranks)}", info.format, f"{info.num_modules} modules"]
    if "text_encoder" not in info.components and "text_encoder_2" not in info.components:
        parts.append("UNet only")
    text = " · ".join(parts)
    if info.family != base_family:
        text += f"  \n⚠️ made for {info.family}, the base model is {base_family}"
    return text


def _card_image(path: Path) -> Image.Image:
    """Small previews enlarged crisply, large ones shrunk: a square thumbnail for the card."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    if max(image.size) < CARD_PREVIEW_PIXELS:
        factor = CARD_PREVIEW_PIXELS // max(image.size) or 1
        return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    image.thumbnail((CARD_PREVIEW_PIXELS * 2, CARD_PREVIEW_PIXELS * 2))
    return image


def _describe(entry: LibraryEntry) -> str:
    info = entry.info
    return f"{info.family}, {info.format}, rank {_numbers(info.ranks)}, {info.num_modules} modules"


def _entry_names(library: LoraLibrary) -> list[str]:
    return [entry.name for entry in library.entries()]


def _numbers(values: list) -> str:
    return ", ".join(format_number(v) for v in values)


def _weight_label(weight: Weight) -> str:
    if isinstance(weight, dict):
        return "(per part)"
    return format_number(weight)


def _seed(seed: float | None) -> int:
    seed = -1 if seed is None else int(seed)
    if seed > MAX_SEED:
        raise StudioError(f"seed {seed} is too large (at most {MAX_SEED})")
    return random.randint(0, MAX_SEED) if seed < 0 else seed


def _display_path(folder: Path) -> str:
    """A folder as the header shows it: relative to where the app was started when it lies below it."""
    folder = Path(folder).resolve()
    return str(folder.relative_to(Path.cwd())) if folder.is_relative_to(Path.cwd()) else str(folder)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def launch(
    blocks: gr.Blocks,
    app: StudioApp,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    prevent_thread_lock: bool = False,
) -> tuple:
    """Serve the page. Only the output folder is served as files (generated images); uploads are capped at
    the library's limit before they reach a handler."""
    blocks.queue(default_concurrency_limit=1)
    return blocks.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        prevent_thread_lock=prevent_thread_lock,
        allowed_paths=[str(app.out_dir)],
        max_file_size=app.options.max_upload_bytes,
        css=CSS,
        theme=gr.themes.Soft(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS),  # no web fonts: works offline
        footer_links=["api", "settings"],
        quiet=prevent_thread_lock,
    )
