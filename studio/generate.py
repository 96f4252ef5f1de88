"""Scripted generation: many images with many adapter blends, from the command line, a recipe, or Python.

    python -m studio.generate --base demo --lora-dir loras --prompt "a red circle <lora:striped:0.8>" --num-images 4
    python -m studio.generate --recipe assets/recipes/example.toml --out outputs/example
    python -m studio.generate --from-image outputs/example/weights-striped-0.5-s1.png --out again
    accelerate launch --num_processes 2 -m studio.generate --recipe ...      (or torchrun --nproc_per_node 2)

    from studio.generate import run_recipe
    paths = run_recipe("assets/recipes/example.toml")

A run reads top to bottom: plan every image and grid of the recipe (names, prompts, seeds, adapter weights;
no model yet), load the base and every adapter once, turn each image's weights into a `Blend` (all input
errors surface here, before anything is rendered), skip images already written with the same settings,
split the rest between processes, render them switching blends (never reloading adapters), then draw
the comparison grids. Every PNG carries A1111's `parameters` text and our exact record, so
`--from-image` re-renders any image bit-identically on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from PIL import Image
from tqdm.auto import tqdm

from studio import lora_io
from studio.a1111 import LoraTag, format_infotext, format_lora_tag, split_lora_tags
from studio.adapters import Blend, Studio, Weight, _name_from_path, hub_id_parts, resolve_lora_source
from studio.base import pick_device_dtype
from studio.errors import StudioError
from studio.grid import labelled_grid
from studio.pngmeta import read_png_metadata, save_png
from studio.prompts import check_clip_skip, pipeline_text_encoders
from studio.recipe import Job, Recipe, load_recipe

RECORD_FORMAT = "lora-studio/1"
NAMED_BASES = ("demo", "tiny-sd", "tiny-sdxl")  # what `studio.base.load_base` reads as names, never as paths
SINGLE_PROMPT_FLAGS = ("base", "lora", "negative_prompt", "seed", "num_images", "steps", "guidance", "width", "height", "clip_skip", "name")


@dataclass(frozen=True)
class AdapterSource:
    """Where adapter `name` comes from; `sha256` is set when the file must be the one an image was made with."""

    name: str
    source: str
    sha256: str | None = None


@dataclass
class PlannedImage:
    """One image to render: where it goes and everything it depends on besides the model files."""

    path: Path
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int | None
    height: int | None
    clip_skip: int
    weights: dict[str, Weight | LoraTag]
    fuse: bool
    where: str  # the job or file it comes from, for error messages
    batch: tuple[int, int] | None = None  # (first seed, size): render within this batch (a re-render)


@dataclass
class PlannedGrid:
    path: Path
    cells: list[list[Path]]
    column_labels: list[str]
    row_labels: list[str] | None
    scale: int


@dataclass
class Plan:
    """Everything a run will write, decided before any model is loaded."""

    base: str
    adapters: list[AdapterSource]
    images: list[PlannedImage]
    grids: list[PlannedGrid] = field(default_factory=list)
    batch_size: int = 1
    dtype: str | None = None
    scheduler: str | None = None  # required scheduler class (an image being reproduced)
    base_config: str | None = None  # config folder for a single-file base (see `studio.base.load_base`)
    allow_pickle: bool = False  # accept a .ckpt/.pt/.pth/.bin base


# Planning ----------------------------------------------------------------------------------------------


def plan_recipe(recipe: Recipe) -> Plan:
    """Expand jobs and sweeps into images and grids with predictable names under `recipe.out`:
    `<job>[-p<prompt>]-s<seed>.png`, sweep cells `<job>-<x>[_<y>]-s<seed>.png`, grids `<job>-grid.png`."""
    images, grids, used = [], [], {}
    for job in recipe.jobs:
        where = f"{recipe.source}: job {job.name!r}"
        for prompt_index, raw_prompt in enumerate(job.prompts):
            prompt, tags = split_lora_tags(raw_prompt)
            weights: dict[str, Weight | LoraTag] = dict(job.loras)
            for tag in tags:
                if tag.name in weights:
                    raise StudioError(f"{where}: adapter {tag.name!r} is weighted twice (loras and a <lora:> tag, or two tags)")
                weights[tag.name] = tag
            for name in _adapter_names(job, weights):
                used.setdefault(name, where)
            common = dict(prompt=prompt, negative_prompt=job.negative_prompt, steps=job.steps, guidance=job.guidance,
                          width=job.width, height=job.height, clip_skip=job.clip_skip, fuse=job.fuse, where=where)  # fmt: skip
            if job.sweep is None:
                stem = job.name if len(job.prompts) == 1 else f"{job.name}-p{prompt_index + 1}"
                for seed in job.seeds:
                    images.append(PlannedImage(path=recipe.out / f"{stem}-s{seed}.png", seed=seed, weights=weights, **common))
            else:
                cells, grid = _sweep(job, recipe.out, weights, common)
                images += cells
                grids.append(grid)
    counts = Counter([image.path for image in images] + [grid.path for grid in grids])
    repeated = sorted(str(path) for path, count in counts.items() if count > 1)
    if repeated:
        raise StudioError(f"{recipe.source}: two images would be written to {repeated[0]}: rename a job or drop a duplicate value")
    adapters = [AdapterSource(name, _find_adapter(name, recipe, where)) for name, where in used.items()]
    return Plan(base=recipe.base, adapters=adapters, images=images, grids=grids, batch_size=recipe.batch_size)


def _sweep(job: Job, out: Path, weights: dict, common: dict) -> tuple[list[PlannedImage], PlannedGrid]:
    """A sweep job's cells, row by row, each applying its x (and y) point to the job, and their grid."""
    x_points = job.sweep.x.points()
    y_points = job.sweep.y.points() if job.sweep.y else [None]
    images, cells = [], []
    for y in y_points:
        row = []
        for x in x_points:
            points = [x] if y is None else [x, y]
            seed = next((p.seed for p in points if p.seed is not None), job.seeds[0])
            cell_weights = dict(weights)
            for point in points:
                if point.weight is not None:
                    cell_weights[point.weight[0]] = point.weight[1]
            selection = next((p.selection for p in points if p.selection is not None), None)
            if selection is not None:  # an adapters axis: only these, at the job's weights (default 1)
                cell_weights = {name: cell_weights.get(name, 1.0) for name in selection}
            slug = "_".join(p.slug for p in points if p.slug)
            path = out / f"{job.name}{'-' + slug if slug else ''}-s{seed}.png"
            images.append(PlannedImage(path=path, seed=seed, weights=cell_weights, **common))
            row.append(path)
        cells.append(row)
    grid = PlannedGrid(
        path=out / f"{job.name}-grid.png",
        cells=cells,
        column_labels=[p.label for p in x_points],
        row_labels=None if job.sweep.y is None else [p.label for p in y_points],
        scale=job.sweep.scale,
    )
    return images, grid


def plan_from_image(path: Path, out: Path, lora_dir: Path | None = None) -> Plan:
    """A plan that re-renders the image at `path` into `out` with its recorded base, adapter files
    (checked by sha256; looked up in `lora_dir` by file name if they moved), blend and settings."""
    path = Path(path)
    _, record = read_png_metadata(path)
    if record is None:
        raise StudioError(f"{path}: has no lora-studio record; only images written by studio.generate can be re-rendered")
    if record.get("format") != RECORD_FORMAT:
        raise StudioError(f"{path}: its record is format {record.get('format')!r}; this version reads {RECORD_FORMAT}")
    try:
        try:  # the settings pass the checks a recipe job's do: an edited record is one line, not a traceback
            Job(prompt=record["prompt"], negative_prompt=record["negative_prompt"], seeds=[record["seed"]],
                steps=record["steps"], guidance=record["guidance"], width=record["width"], height=record["height"],
                clip_skip=record.get("clip_skip", 1), loras={a["name"]: a["weight"] for a in record["adapters"]},
                fuse=record["fused"])  # fmt: skip
        except StudioError as error:
            raise StudioError(f"{path}: its lora-studio record: {error}") from None
        adapters = [
            AdapterSource(a["name"], _moved_file(Path(a["source"]), lora_dir, path), a["sha256"]) for a in record["adapters"]
        ]
        image = PlannedImage(
            path=Path(out) / path.name,
            prompt=record["prompt"],
            negative_prompt=record["negative_prompt"],
            seed=record["seed"],
            steps=record["steps"],
            guidance=record["guidance"],
            width=record["width"],
            height=record["height"],
            clip_skip=record.get("clip_skip", 1),  # records before clip skip existed rendered at 1
            weights={a["name"]: a["weight"] for a in record["adapters"]},
            fuse=record["fused"],
            where=str(path),
            batch=(record["batch"]["first_seed"], record["batch"]["size"]),
        )
        return Plan(record["base"], adapters, [image], dtype=record["dtype"], scheduler=record["scheduler"])
    except (KeyError, TypeError) as error:
        raise StudioError(f"{path}: its lora-studio record is incomplete ({error})") from None


def _adapter_names(job: Job, weights: dict) -> list[str]:
    names = list(weights)
    for axis in job.sweep.axes if job.sweep else []:
        names += [axis.adapter] if axis.kind == "weight" else list(axis.values) if axis.kind == "adapters" else []
    return names


def _find_adapter(name: str, recipe: Recipe, where: str) -> str:
    """`recipe.adapters[name]`, else the one `<name>.safetensors` under `recipe.lora_dir` (as A1111 finds tags)."""
    if name in recipe.adapters:
        return str(recipe.adapters[name])
    if recipe.lora_dir is None:
        raise StudioError(f"{where}: unknown adapter {name!r}: it is not declared and no lora_dir (--lora-dir) is given")
    if not recipe.lora_dir.is_dir():
        raise StudioError(f"{where}: lora_dir {recipe.lora_dir} is not a folder")
    found = sorted(recipe.lora_dir.rglob(f"{name}.safetensors"))
    if len(found) != 1:
        problem = f"no {name}.safetensors" if not found else f"{len(found)} files named {name}.safetensors"
        raise StudioError(f"{where}: unknown adapter {name!r}: {problem} under {recipe.lora_dir}")
    return str(found[0])


def _moved_file(source: Path, lora_dir: Path | None, image: Path) -> str:
    if source.is_file() or lora_dir is None:
        return str(source)
    moved = Path(lora_dir) / source.name
    if not moved.is_file():
        raise StudioError(f"{image}: its adapter file {source} is missing, and {moved} is not there either")
    return str(moved)


# Running -----------------------------------------------------------------------------------------------


@dataclass
class _Render:
    image: PlannedImage
    blend: Blend
    record: dict
    parameters: str


@dataclass
class _Batch:
    """One pipeline call: images `first_seed`, `first_seed + 1`, ... (`size` of them); `members` are the
    (position, render) pairs to write. Identical settings but the seed, hence one blend."""

    first_seed: int
    size: int
    members: list[tuple[int, _Render]]


def run_recipe(recipe: Recipe | str | Path, overwrite: bool = False) -> list[Path]:
    """Render a recipe (a `Recipe` or a recipe file); return the paths this process wrote (images it
    rendered, and the grids on the main process). Images already written with the same settings are skipped."""
    recipe = load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe
    return execute(plan_recipe(recipe), overwrite=overwrite)


def execute(plan: Plan, overwrite: bool = False) -> list[Path]:
    """Load the base and every adapter once, check every input and existing file, then render this
    process's share of the images not yet written, and (main process) draw the grids."""
    state = _process_state()
    for folder in sorted({image.path.parent for image in plan.images} | {grid.path.parent for grid in plan.grids}):
        _check_output_folder(folder)
    studio = Studio.from_base(
        plan.base, device=state.device, dtype=plan.dtype, config=plan.base_config, allow_pickle=plan.allow_pickle
    )
    scheduler = type(studio.pipeline.scheduler).__name__
    if plan.scheduler and plan.scheduler != scheduler:
        raise StudioError(f"{plan.base}: its scheduler is {scheduler}, but the image was rendered with {plan.scheduler}")
    files = _load_adapters(studio, plan.adapters)
    renders = [_prepare(studio, plan, image, files) for image in plan.images]
    todo = [render for render in renders if _needs_rendering(render, overwrite)]
    if state.is_main_process:
        print(f"studio.generate: {len(renders)} images, {len(renders) - len(todo)} already written, "
              f"{len(todo)} to render on {state.num_processes} process(es)", file=sys.stderr)  # fmt: skip
    state.wait_for_everyone()  # every process checked the same files before any writes one
    written = []
    with state.split_between_processes(_batches(todo, plan.batch_size)) as mine:
        progress = tqdm(total=sum(len(b.members) for b in mine), desc="rendering", unit="image", disable=not state.is_main_process)
        for batch in mine:
            first = batch.members[0][1]  # all members share these settings
            pictures = studio.generate(
                first.image.prompt,
                negative_prompt=first.image.negative_prompt,
                seed=batch.first_seed,
                num_images=batch.size,
                steps=first.image.steps,
                guidance=first.image.guidance,
                width=first.record["width"],
                height=first.record["height"],
                blend=first.blend,
                clip_skip=first.image.clip_skip,
            )
            for position, render in batch.members:
                save_png(render.image.path, pictures[position], render.parameters, render.record)
                written.append(render.image.path)
            progress.update(len(batch.members))
        progress.close()
    state.wait_for_everyone()  # grids need every cell
    if state.is_main_process:
        for grid in plan.grids:
            _draw_grid(grid)
            written.append(grid.path)
    return written


def _process_state() -> PartialState:
    """This process's place among those `accelerate launch` / `torchrun` started (one, when run plainly).
    accelerate only forms a CPU process group when asked to, so ask when there is no accelerator."""
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or pick_device_dtype()[0].type == "cpu"
    return PartialState(cpu=cpu)


def _load_adapters(studio: Studio, adapters: list[AdapterSource]) -> dict[str, dict]:
    """Load each adapter once; return {name: {"source": file, "components": [...], hashes...}}."""
    files = {}
    for adapter in adapters:
        path = resolve_lora_source(adapter.source)
        hashes = lora_io.file_hashes(path, is_safetensors=path.suffix == ".safetensors")
        if adapter.sha256 and hashes["sha256"] != adapter.sha256:
            raise StudioError(f"{path}: this file changed since the image was rendered (sha256 {hashes['sha256'][:12]}..., expected {adapter.sha256[:12]}...)")
        info = studio.load_adapter(path, name=adapter.name, weight=0.0)
        files[adapter.name] = {"source": str(path.resolve()), "components": info.components, **hashes}
    return files


def _prepare(studio: Studio, plan: Plan, image: PlannedImage, files: dict) -> _Render:
    """The exact blend for `image` (validated by the studio) and the record and infotext its PNG will carry."""
    weights = {
        name: weight.weight_for(files[name]["components"]) if isinstance(weight, LoraTag) else weight
        for name, weight in image.weights.items()
    }
    try:
        blend = studio.make_blend(weights, fused=image.fuse)
        check_clip_skip(studio.family, pipeline_text_encoders(studio.pipeline), image.clip_skip)
    except StudioError as error:
        raise StudioError(f"{image.where}: {error}") from None
    default_width, default_height = default_size(studio.pipeline)
    parameters, record = image_metadata(
        studio, plan.base, image.prompt, image.negative_prompt, image.seed, image.steps, image.guidance,
        image.width or default_width, image.height or default_height, blend.active(), files, fused=blend.fused,
        clip_skip=image.clip_skip,
    )
    return _Render(image=image, blend=blend, record=record, parameters=parameters)


def image_metadata(
    studio: Studio,
    base: str,
    prompt: str,
    negative_prompt: str,
    seed: int,
    steps: int,
    guidance: float,
    width: int,
    height: int,
    active: Mapping[str, Weight],
    files: Mapping[str, Mapping[str, str]],
    fused: bool = False,
    clip_skip: int = 1,
) -> tuple[str, dict]:
    """A1111's `parameters` text (so A1111/civitai read the settings) and the exact record `--from-image`
    re-renders from, for one image. `files` gives each active adapter's "source" path and lora_io hashes.
    Clip skip appears only above 1, as A1111 writes it (and so records made before it existed still match)."""
    scheduler = type(studio.pipeline.scheduler).__name__
    record = {
        "format": RECORD_FORMAT,
        "base": base_source(base),
        "family": studio.family,
        "scheduler": scheduler,
        "device": studio.base.device.type,
        "dtype": str(studio.base.dtype).removeprefix("torch."),
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "width": width,
        "height": height,
        "fused": bool(fused and active),
        **({"clip_skip": clip_skip} if clip_skip > 1 else {}),
        "adapters": [
            {"name": name, "weight": weight, "source": files[name]["source"], "sha256": files[name]["sha256"]}
            for name, weight in active.items()
        ],
    }
    params = {
        "Steps": steps,
        "Sampler": scheduler,
        "CFG scale": guidance,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": Path(base).name.removesuffix(".safetensors"),
    }
    if clip_skip > 1:
        params["Clip skip"] = clip_skip
    if active:
        params["Lora hashes"] = ", ".join(f"{name}: {files[name]['a1111_hash']}" for name in active)
    tags = [tag for name, weight in active.items() if (tag := format_lora_tag(name, weight))]
    return format_infotext(" ".join([prompt, *tags]), negative_prompt, params), record


def _batches(todo: list[_Render], batch_size: int) -> list[_Batch]:
    """Images whose records differ only in consecutive seeds share a pipeline call, up to `batch_size`;
    each record then says which batch it came from, since batch size may change the last bits (GPUs).
    Batches come sorted by blend, so equal blends follow each other and the adapters switch least."""
    batches, runs = [], {}
    for render in todo:
        if render.image.batch is not None:  # a re-render: the batch the image was first rendered in
            first_seed, size = render.image.batch
            batches.append(_Batch(first_seed, size, [(render.image.seed - first_seed, render)]))
        else:
            runs.setdefault(json.dumps(_without(render.record, "seed", "batch"), sort_keys=True), []).append(render)
    for group in runs.values():
        group.sort(key=lambda render: render.image.seed)
        run = [group[0]]
        for render in group[1:]:
            if render.image.seed == run[-1].image.seed + 1 and len(run) < batch_size:
                run.append(render)
            else:
                batches.append(_Batch(run[0].image.seed, len(run), list(enumerate(run))))
                run = [render]
        batches.append(_Batch(run[0].image.seed, len(run), list(enumerate(run))))
    for batch in batches:
        for _, render in batch.members:
            render.record["batch"] = {"first_seed": batch.first_seed, "size": batch.size}
    return sorted(batches, key=lambda batch: _blend_key(batch.members[0][1].blend))


def _without(record: dict, *keys: str) -> dict:
    return {key: value for key, value in record.items() if key not in keys}


def _needs_rendering(render: _Render, overwrite: bool) -> bool:
    """False for an image already written with exactly this record; an image written with other settings
    is an error unless `overwrite`, so an edited recipe never silently mixes old and new images."""
    path = render.image.path
    if not path.exists():
        return True
    try:
        _, record = read_png_metadata(path)
    except StudioError:
        record = None
    if record is not None and _without(record, "batch") == json.loads(json.dumps(render.record)):
        return False  # the batch it was rendered in does not matter: the file reproduces from its own record
    if overwrite:
        return True
    raise StudioError(f"{path}: already exists with other settings; pass --overwrite (overwrite=True) to replace it, or another --out")


def _draw_grid(grid: PlannedGrid) -> None:
    rows = []
    for row in grid.cells:
        for path in row:
            if not path.is_file():
                raise StudioError(f"{grid.path}: its cell {path} was not written")
        rows.append([Image.open(path).convert("RGB") for path in row])
    parameters, _ = read_png_metadata(grid.cells[0][0])  # A1111 grids carry their first image's text
    save_png(grid.path, labelled_grid(rows, grid.column_labels, grid.row_labels, grid.scale), parameters or "")


def _blend_key(blend: Blend) -> str:
    return json.dumps([blend.fused, list(blend.active().items())], sort_keys=True)


def default_size(pipeline) -> tuple[int, int]:
    """The size the pipeline renders when none is given: the UNet's sample size in pixels."""
    size = pipeline.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    return width * pipeline.vae_scale_factor, height * pipeline.vae_scale_factor


def base_source(base: str) -> str:
    """Local bases recorded by absolute path so a re-render finds them from any folder; names stay names."""
    path = Path(base)
    return str(path.resolve()) if base not in NAMED_BASES and path.exists() else base


# Command line ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m studio.generate",
        description="Render images with LoRA adapter blends: from flags, a recipe (TOML/YAML), or an image's own metadata.",
    )
    source = parser.add_argument_group("what to render (one of)")
    source.add_argument("--prompt", metavar="TEXT", help='text prompt; A1111 tags like "<lora:name:0.8>" load name from --lora-dir')
    source.add_argument("--recipe", type=Path, metavar="FILE", help="a TOML or YAML recipe (see assets/recipes/example.toml)")
    source.add_argument("--from-image", type=Path, metavar="IMAGE.png", help="re-render a PNG written by studio.generate, bit-identically")
    single = parser.add_argument_group("single prompt")
    single.add_argument("--base", default="demo", help='base model: "demo", a diffusers folder, a .safetensors checkpoint, a hub id')
    single.add_argument("--lora", action="append", default=[], metavar="PATH_OR_ID[:WEIGHT]",
                        help="an adapter file, a name in --lora-dir, or a hub id, with its weight (default 1); repeatable")  # fmt: skip
    single.add_argument("--negative-prompt", default="", metavar="TEXT")
    single.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    single.add_argument("--num-images", type=int, default=1, metavar="N")
    single.add_argument("--steps", type=int, default=20)
    single.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    single.add_argument("--width", type=int)
    single.add_argument("--height", type=int)
    single.add_argument("--clip-skip", type=int, default=1, metavar="N", help="A1111's clip skip: 1 (default) uses the text encoder's last layer, 2 the one before")
    single.add_argument("--name", help="file name stem (default: from the prompt)")
    common = parser.add_argument_group("any mode")
    common.add_argument("--lora-dir", type=Path, metavar="DIR", help="folder searched (recursively) for <name>.safetensors")
    common.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: outputs, or the recipe's out)")
    common.add_argument("--batch-size", type=int, metavar="N", help="images per pipeline call when only their seeds differ (default 1)")
    common.add_argument("--fuse", action="store_true", help="fuse each blend into the weights: faster, results differ in the last bits")
    common.add_argument("--overwrite", action="store_true", help="replace images written earlier with other settings")
    common.add_argument("--base-config", metavar="DIR", help="diffusers folder (or cached hub id) describing a single-file base; needed offline")
    common.add_argument("--allow-pickle", action="store_true", help="accept a .ckpt/.pt/.pth/.bin base (read with torch's weights-only loader)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = dataclasses.replace(
            _plan_from_args(parser, args), base_config=args.base_config, allow_pickle=args.allow_pickle
        )
        for path in execute(plan, overwrite=args.overwrite):
            print(path, flush=True)
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _plan_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Plan:
    modes = [flag for flag, value in (("--prompt", args.prompt), ("--recipe", args.recipe), ("--from-image", args.from_image)) if value]
    if len(modes) != 1:
        parser.error("give exactly one of --prompt, --recipe, --from-image")
    if args.from_image or args.recipe:
        given = [dest for dest in SINGLE_PROMPT_FLAGS if getattr(args, dest) != parser.get_default(dest)]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} only goes with --prompt ({modes[0]} says it all)")
    if args.from_image:
        if args.fuse or args.batch_size:
            parser.error("--fuse and --batch-size do not go with --from-image (the image's record says them)")
        return plan_from_image(args.from_image, args.out or Path("outputs"), args.lora_dir)
    if args.recipe:
        recipe = load_recipe(args.recipe)
        changes = {"out": args.out, "lora_dir": args.lora_dir, "batch_size": args.batch_size}
        recipe = dataclasses.replace(recipe, **{key: value for key, value in changes.items() if value is not None})
        if args.fuse:
            recipe.jobs = [dataclasses.replace(job, fuse=True) for job in recipe.jobs]
        return plan_recipe(recipe)
    return plan_recipe(_recipe_from_flags(args))


def _recipe_from_flags(args: argparse.Namespace) -> Recipe:
    adapters, loras = {}, {}
    for reference in args.lora:
        source, weight = split_lora_weight(reference)
        name, file_or_id = _cli_adapter(source)
        if name in loras:
            raise StudioError(f"--lora {reference}: another --lora is already named {name!r}")
        loras[name] = weight
        if file_or_id is not None:
            adapters[name] = file_or_id
    if args.num_images < 1:
        raise StudioError(f"--num-images must be at least 1, not {args.num_images}")
    name = args.name or _slug(split_lora_tags(args.prompt)[0])
    try:
        job = Job(
            prompt=args.prompt,
            name=name,
            negative_prompt=args.negative_prompt,
            seeds=list(range(args.seed, args.seed + args.num_images)),
            steps=args.steps,
            guidance=args.guidance,
            width=args.width,
            height=args.height,
            clip_skip=args.clip_skip,
            loras=loras,
            fuse=args.fuse,
        )
    except StudioError as error:
        raise StudioError(f"command line: {error}") from None
    return Recipe(jobs=[job], base=args.base, out=args.out or Path("outputs"), lora_dir=args.lora_dir,
                  adapters=adapters, batch_size=1 if args.batch_size is None else args.batch_size, source="command line")  # fmt: skip


def split_lora_weight(reference: str) -> tuple[str, float]:
    """`PATH_OR_ID[:WEIGHT]`: the weight is what follows the last colon, when that is a number."""
    source, _, weight = reference.rpartition(":")
    try:
        return (source, float(weight)) if source else (reference, 1.0)
    except ValueError:
        return reference, 1.0


def _cli_adapter(source: str) -> tuple[str, str | None]:
    """(name, file or hub id) for a --lora value; a bare name (no file) is looked up in --lora-dir later.
    A hub id is `owner/name`, or `owner/name/FILE.safetensors` for one file of it."""
    path = Path(source)
    if path.exists():
        return _name_from_path(path), source
    parts = hub_id_parts(source.rstrip("/"))
    if path.suffix == ".safetensors":
        if parts is None or len(parts) < 3:
            raise StudioError(f"--lora {source}: no such file")
        return _name_from_path(path), source
    if parts is not None:
        return parts[-1], source
    return source, None


def _check_output_folder(folder: Path) -> None:
    """Before any model loads or image renders (and without creating it, so a failed run leaves nothing): the
    output folder, or its nearest existing parent, must be a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StudioError(f"{folder}: cannot create the output folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StudioError(f"{folder}: cannot create the output folder: {existing} is not writable")


def _slug(text: str) -> str:
    """A file-name stem from a prompt: accents dropped, other non-ASCII left out (names are ASCII)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", ascii_text).strip("-._")[:48] or "image"


if __name__ == "__main__":
    sys.exit(main())
