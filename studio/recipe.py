"""Recipes: many renders with many adapter blends, described once in TOML or YAML (or built in Python).

A recipe names one base model, where its adapters come from, defaults, and a list of jobs. A job is a
prompt (or several), seeds, sampling settings and adapter weights; a job with a `sweep` becomes a labelled
comparison grid whose axes vary seeds, one adapter's weight, or a set of adapters (base | each | blend).
See `assets/recipes/example.toml` for a documented example. Every check names the file and key at fault.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from studio.a1111 import format_number
from studio.errors import StudioError

AXIS_KINDS = ("seed", "weight", "adapters")
JOB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]{0,99}$")
MAX_SEED = 2**63 - 1
RECIPE_KEYS = ("base", "out", "lora_dir", "adapters", "batch_size", "defaults", "jobs")
JOB_KEYS = ("name", "prompt", "negative_prompt", "seeds", "seed", "num_images", "steps", "guidance",
            "width", "height", "clip_skip", "loras", "fuse", "sweep")  # fmt: skip
DEFAULT_KEYS = tuple(key for key in JOB_KEYS if key not in ("name", "sweep"))
SEED_KEYS = ("seeds", "seed", "num_images")


@dataclass(frozen=True)
class AxisPoint:
    """One column (or row) of a grid: its label, its part of the file names, and what it changes."""

    label: str
    slug: str = ""
    seed: int | None = None
    weight: tuple[str, float] | None = None  # (adapter, weight) for a weight axis
    selection: tuple[str, ...] | None = None  # the adapters switched on, for an adapters axis


@dataclass
class Axis:
    """A grid axis: `seed` over `values` seeds (instead of the job's), `weight` over `adapter`'s weights, or
    `adapters` over a set of adapter names, drawn as base | each alone | all blended (at the job's weights)."""

    kind: str
    values: list
    adapter: str | None = None

    def __post_init__(self):
        if self.kind not in AXIS_KINDS:
            raise StudioError(f"kind must be one of {', '.join(AXIS_KINDS)}, not {self.kind!r}")
        if not isinstance(self.values, (list, tuple)) or not self.values:
            raise StudioError("values must be a non-empty list")
        self.values = list(self.values)
        if len(set(map(repr, self.values))) != len(self.values):
            raise StudioError(f"values has duplicates: {self.values}")
        if (self.adapter is not None) != (self.kind == "weight"):
            raise StudioError('adapter (the adapter whose weight varies) goes with kind = "weight", and only there')
        if self.kind == "seed":
            for seed in self.values:
                _check_seed(seed)
        elif self.kind == "weight":
            _check_name("adapter", self.adapter)
            for value in self.values:
                if not _is_number(value):
                    raise StudioError(f"values must be numbers, not {value!r}")
        else:
            for name in self.values:
                _check_name("values", name)
            if {"base", "blend"} & set(self.values):
                raise StudioError("values cannot name adapters 'base' or 'blend': those are the grid's own columns")

    def points(self) -> list[AxisPoint]:
        if self.kind == "seed":
            return [AxisPoint(label=f"seed {seed}", seed=seed) for seed in self.values]
        if self.kind == "weight":
            return [
                AxisPoint(label=f"{self.adapter} {format_number(value)}", slug=f"{self.adapter}-{format_number(value)}", weight=(self.adapter, value))
                for value in self.values
            ]
        points = [AxisPoint(label="base", slug="base", selection=())]
        points += [AxisPoint(label=name, slug=name, selection=(name,)) for name in self.values]
        if len(self.values) > 1:
            points.append(AxisPoint(label="blend", slug="blend", selection=tuple(self.values)))
        return points


@dataclass
class Sweep:
    """A comparison grid: `x` across the columns, optionally `y` down the rows; cells enlarged `scale` times."""

    x: Axis
    y: Axis | None = None
    scale: int = 1

    def __post_init__(self):
        if not _is_int(self.scale) or not 1 <= self.scale <= 16:
            raise StudioError(f"scale must be an integer from 1 to 16, not {self.scale!r}")
        if self.y is not None and self.x.kind == self.y.kind and (self.x.kind != "weight" or self.x.adapter == self.y.adapter):
            raise StudioError(f"x and y both sweep the same thing ({self.x.kind}{' ' + self.x.adapter if self.x.adapter else ''})")

    @property
    def axes(self) -> list[Axis]:
        return [self.x] if self.y is None else [self.x, self.y]


@dataclass
class Job:
    """Images of one prompt (or several) at `seeds`, with the adapters in `loras` at their weights.

    A weight is a number, per component `{unet = w, text_encoder = w}`, or per UNet block
    `{down = w, mid = w, up = w}`, as `Studio.set_adapters` takes. Prompts may carry A1111 `<lora:name:w>` tags.
    """

    prompt: str | list[str]
    name: str = ""
    negative_prompt: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 20
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    clip_skip: int = 1  # A1111's: 1 is the text encoder's last layer, 2 the one before
    loras: dict[str, float | dict] = field(default_factory=dict)
    fuse: bool = False
    sweep: Sweep | None = None

    def __post_init__(self):
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise StudioError("prompt must be a non-empty string or a list of them")
        if self.name:
            _check_name("name", self.name)
        if not isinstance(self.negative_prompt, str):
            raise StudioError(f"negative_prompt must be a string, not {self.negative_prompt!r}")
        if not isinstance(self.seeds, (list, tuple)) or not self.seeds:
            raise StudioError(f"seeds must be a non-empty list of integers, not {self.seeds!r}")
        for seed in self.seeds:
            _check_seed(seed)
        if len(set(self.seeds)) != len(self.seeds):
            raise StudioError(f"seeds has duplicates: {list(self.seeds)}")
        if not _is_int(self.steps) or not 1 <= self.steps <= 1000:
            raise StudioError(f"steps must be an integer from 1 to 1000, not {self.steps!r}")
        if not _is_number(self.guidance) or self.guidance < 0:
            raise StudioError(f"guidance must be a finite number >= 0, not {self.guidance!r}")
        self.guidance = float(self.guidance)
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value <= 0 or value % 8):
                raise StudioError(f"{key} must be a positive multiple of 8, not {value!r}")
        if not _is_int(self.clip_skip) or self.clip_skip < 1:
            raise StudioError(f"clip_skip must be an integer >= 1 (1: no skip), not {self.clip_skip!r}")
        if not isinstance(self.loras, Mapping):
            raise StudioError(f"loras must be a table of adapter = weight, not {self.loras!r}")
        for name, weight in self.loras.items():
            _check_name("loras", name)
            _check_weight(f"loras.{name}", weight)
        if not isinstance(self.fuse, bool):
            raise StudioError(f"fuse must be true or false, not {self.fuse!r}")
        if self.sweep is not None:
            kinds = [axis.kind for axis in self.sweep.axes]
            if "seed" not in kinds and len(self.seeds) > 1:
                raise StudioError("a sweep without a seed axis renders one seed: give one seed, or add an axis of kind \"seed\"")
            if len(self.prompts) > 1:
                raise StudioError("a sweep job takes one prompt")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


@dataclass
class Recipe:
    """One base model, where adapters come from, and the jobs. Adapters are named in jobs and prompts; a
    name is looked up in `adapters` (name -> file or hub id), then as `<lora_dir>/**/<name>.safetensors`."""

    jobs: list[Job]
    base: str = "demo"
    out: Path = Path("outputs")
    lora_dir: Path | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    batch_size: int = 1  # images rendered per pipeline call when only their seeds differ
    source: str = "recipe"  # where it was read from, for error messages

    def __post_init__(self):
        if not isinstance(self.jobs, (list, tuple)) or not self.jobs or not all(isinstance(j, Job) for j in self.jobs):
            raise StudioError(f"{self.source}: jobs must be a non-empty list of jobs")
        for index, job in enumerate(self.jobs, start=1):
            job.name = job.name or f"job{index}"
        names = [job.name for job in self.jobs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise StudioError(f"{self.source}: job names must be unique: {', '.join(duplicates)}")
        self.base = str(self.base) if isinstance(self.base, Path) else self.base
        if not isinstance(self.base, str) or not self.base:
            raise StudioError(f"{self.source}: base must be a model source (\"demo\", a folder, a file or a hub id)")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise StudioError(f"{self.source}: batch_size must be an integer >= 1, not {self.batch_size!r}")
        self.out = Path(self.out)
        self.lora_dir = None if self.lora_dir is None else Path(self.lora_dir)
        for name, source in self.adapters.items():
            _check_name(f"{self.source}: adapters", name)
            if not isinstance(source, (str, Path)):
                raise StudioError(f"{self.source}: adapters.{name} must be a file path or hub id, not {source!r}")


def load_recipe(path: str | Path) -> Recipe:
    """Read a `.toml`, `.yaml` or `.yml` recipe. Relative paths in it are relative to the recipe's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise StudioError(f"{path}: cannot read the recipe ({error.strerror if isinstance(error, OSError) else error})") from None
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise StudioError(f"{path}: not valid TOML: {error}") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        data = _load_yaml(path, text)
    else:
        raise StudioError(f"{path}: a recipe is a .toml, .yaml or .yml file")
    return recipe_from_dict(data, source=str(path), folder=path.parent)


def recipe_from_dict(data: object, source: str = "recipe", folder: Path | None = None) -> Recipe:
    """Build a `Recipe` from parsed TOML/YAML, naming `source` and the key at fault in every error."""
    if not isinstance(data, Mapping):
        raise StudioError(f"{source}: a recipe is a table of {', '.join(RECIPE_KEYS)}")
    _check_keys(source, "the recipe", data, RECIPE_KEYS)
    defaults = data.get("defaults", {})
    _check_keys(source, "defaults", defaults, DEFAULT_KEYS)
    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise StudioError(f"{source}: jobs: needs at least one job ([[jobs]] in TOML, a list under jobs: in YAML)")
    adapters = data.get("adapters", {})
    if not isinstance(adapters, Mapping):
        raise StudioError(f"{source}: adapters: must be a table of name = file or hub id")
    for key in ("base", "out", "lora_dir"):
        if key in data and not isinstance(data[key], str):
            raise StudioError(f"{source}: {key} must be text (a path or a name), not {data[key]!r}")
    return Recipe(
        jobs=[_job(source, f"jobs[{index}]", defaults, table) for index, table in enumerate(jobs, start=1)],
        base=_relative(data.get("base", "demo"), folder, maybe_name=True),
        out=_relative(data.get("out", "outputs"), folder),
        lora_dir=None if "lora_dir" not in data else _relative(data["lora_dir"], folder),
        adapters={name: _relative(value, folder, maybe_name=True) for name, value in adapters.items()},
        batch_size=data.get("batch_size", 1),
        source=source,
    )


def _job(source: str, where: str, defaults: Mapping, table: object) -> Job:
    _check_keys(source, where, table, JOB_KEYS)
    if "name" in table:
        where = f"{where} ({table['name']})"
    # A job's own `seeds` replace the defaults' seed keys as a whole; its `seed` or `num_images` only replace
    # the defaults' `seeds` list (so `num_images = 4` counts from the default seed).
    if "seeds" in table:
        defaults = {key: value for key, value in defaults.items() if key not in SEED_KEYS}
    elif "seed" in table or "num_images" in table:
        defaults = {key: value for key, value in defaults.items() if key != "seeds"}
    fields = {**defaults, **table}
    if "seeds" in fields and ("seed" in fields or "num_images" in fields):
        raise StudioError(f"{source}: {where}: give either seeds = [...] or seed (+ num_images), not both")
    if "seed" in fields or "num_images" in fields:
        seed, count = fields.pop("seed", 0), fields.pop("num_images", 1)
        if not _is_int(seed) or not _is_int(count) or count < 1:
            raise StudioError(f"{source}: {where}: seed and num_images must be integers (num_images >= 1)")
        fields["seeds"] = list(range(seed, seed + count))
    if "prompt" not in fields:
        raise StudioError(f"{source}: {where}: has no prompt (give one in the job or in [defaults])")
    if "sweep" in fields:
        fields["sweep"] = _sweep(source, f"{where}.sweep", fields["sweep"])
    return _build(f"{source}: {where}", Job, **fields)


def _sweep(source: str, where: str, table: object) -> Sweep:
    _check_keys(source, where, table, ("x", "y", "scale"))
    if "x" not in table:
        raise StudioError(f"{source}: {where}: needs an x axis, e.g. x = {{ kind = \"seed\", values = [1, 2] }}")
    axes = {}
    for key in ("x", "y"):
        if key in table:
            _check_keys(source, f"{where}.{key}", table[key], ("kind", "values", "adapter"))
            axes[key] = _build(f"{source}: {where}.{key}", Axis, **table[key])
    return _build(f"{source}: {where}", Sweep, scale=table.get("scale", 1), **axes)


def _build(where: str, cls, **fields):
    """`cls(**fields)`, with the dataclass's own validation messages prefixed by where they apply."""
    try:
        return cls(**fields)
    except StudioError as error:
        raise StudioError(f"{where}: {error}") from None
    except TypeError as error:  # a required field missing
        raise StudioError(f"{where}: {error}") from None


def _check_keys(source: str, where: str, table: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(table, Mapping):
        raise StudioError(f"{source}: {where}: must be a table, not {table!r}")
    unknown = [key for key in table if key not in allowed]
    if unknown:
        raise StudioError(f"{source}: {where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")


def _load_yaml(path: Path, text: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise StudioError(f"{path}: not valid YAML: {where}{error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise StudioError(f"{path}: not valid YAML: {error}") from None


def _relative(value: object, folder: Path | None, maybe_name: bool = False) -> object:
    """A path written in a recipe, taken relative to the recipe's folder. A value that may also be a name
    (a base "demo", a hub id) stays as written unless it exists there or names a .safetensors file."""
    if not isinstance(value, str) or folder is None or Path(value).is_absolute():
        return value
    candidate = folder / value
    if maybe_name and not (candidate.exists() or value.endswith(".safetensors")):
        return value
    return str(candidate)


def _check_seed(seed: object) -> None:
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise StudioError(f"seeds must be integers from 0 to 2**63-1, not {seed!r}")


def _check_name(key: str, name: object) -> None:
    if not isinstance(name, str) or not JOB_NAME.match(name):
        raise StudioError(f"{key}: {name!r} is not a valid name (letters, digits, '.', '_' or '-')")


def _check_weight(key: str, weight: object) -> None:
    if _is_number(weight):
        return
    if not isinstance(weight, Mapping) or not weight:
        raise StudioError(f"{key} must be a number or a table of numbers, not {weight!r}")
    for part, value in weight.items():
        _check_weight(f"{key}.{part}", value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float: NaN and infinity pass every comparison check, and render black images."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
