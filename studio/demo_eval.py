"""Score demo-world images (colour, shape, style) and report how well a model draws what it is asked.

The scorer is measured, not learned: it separates the shape from the plain background by colour
distance, names the colour by the hue of the shape's pixels, and names the shape by the harmonics of its
outline's distance from the centre (a square's outline bulges four times around the circle, a triangle's
three times, a star's five times, a circle's not at all). It is validated on fresh `demo_world` drawings
(`--check-scorer`), then used to score samples from a model:

    python -m studio.demo_eval [--model assets/demo-model] [--samples 16] [--json] [--grid assets/demo-grid.png]

prints, for each "a <colour> <shape>" prompt, the fraction of seeded samples drawn with the right colour,
the right shape, and both.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio import demo_world
from studio.base import load_base
from studio.errors import StudioError
from studio.grid import labelled_grid

# Hue (degrees) of each named colour; an image's colour is the nearest of these around the hue circle.
_COLOUR_HUES = {
    name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in demo_world.COLOURS.items()
}
_SHAPE_HARMONICS = {3: "triangle", 4: "square", 5: "star"}
_MIN_CONTRAST = 60.0  # RGB distance (of 441) below which an image holds no shape at all
_MIN_SATURATION = 0.2  # below this the shape is grey, not any named colour
_MIN_CORNER_STRENGTH = 0.03  # relative outline harmonic below which a shape is a circle
_RAY_ANGLES = 90


@dataclass(frozen=True)
class ImageScore:
    """What the scorer sees in one image; `None` where it sees no shape or no named colour."""

    colour: str | None
    shape: str | None
    style: str | None


@dataclass(frozen=True)
class PromptResult:
    """How often the samples for one prompt were scored as asked (fractions in 0..1)."""

    prompt: str
    colour: str
    shape: str
    samples: int
    colour_right: float
    shape_right: float
    both_right: float


def score_image(image: Image.Image) -> ImageScore:
    """Name the colour, shape and style of the single shape in `image` (any size, RGB)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    strongest = np.percentile(distance, 99)
    if strongest < _MIN_CONTRAST:
        return ImageScore(None, None, None)
    foreground = distance > strongest / 2

    # Closing (grow, fill, shrink) seals hairline gaps in thin outlines before the inside is filled.
    silhouette = _erode(_fill_holes(_dilate(foreground)))
    return ImageScore(
        colour=_colour_name(pixels[distance > strongest * 0.75].mean(axis=0)),
        shape=_shape_name(silhouette),
        style=_style_name(foreground, silhouette),
    )


def _colour_name(rgb: np.ndarray) -> str | None:
    hue, saturation, _ = colorsys.rgb_to_hsv(*(rgb / 255))
    if saturation < _MIN_SATURATION:
        return None
    hue_distance = {name: min(abs(hue * 360 - h), 360 - abs(hue * 360 - h)) for name, h in _COLOUR_HUES.items()}
    return min(hue_distance, key=hue_distance.get)


def _shape_name(silhouette: np.ndarray) -> str:
    """Circle, or the shape whose number of corners is the strongest harmonic of the outline's radius."""
    radius = _outline_radius(silhouette)
    spectrum = np.abs(np.fft.rfft(radius)) / (len(radius) * radius.mean())
    harmonic = max(_SHAPE_HARMONICS, key=lambda k: spectrum[k])
    return _SHAPE_HARMONICS[harmonic] if spectrum[harmonic] >= _MIN_CORNER_STRENGTH else "circle"


def _outline_radius(silhouette: np.ndarray) -> np.ndarray:
    """Distance from the silhouette's centroid to its edge along evenly spaced rays (sub-pixel, by sampling)."""
    ys, xs = np.nonzero(silhouette)
    centre_y, centre_x = ys.mean() + 0.5, xs.mean() + 0.5  # pixel centres sit at +0.5
    height, width = silhouette.shape
    step = 0.25
    lengths = np.arange(0.0, max(height, width), step)
    angles = np.linspace(0.0, 2 * np.pi, _RAY_ANGLES, endpoint=False)
    sample_x = centre_x + np.cos(angles)[:, None] * lengths
    sample_y = centre_y + np.sin(angles)[:, None] * lengths
    column = np.clip(np.floor(sample_x).astype(int), 0, width - 1)
    row = np.clip(np.floor(sample_y).astype(int), 0, height - 1)
    inside_frame = (sample_x >= 0) & (sample_x < width) & (sample_y >= 0) & (sample_y < height)
    inside = silhouette[row, column] & inside_frame
    # The ray's length up to the farthest point still inside the shape.
    return (inside * lengths).max(axis=1) + step / 2


def _style_name(foreground: np.ndarray, silhouette: np.ndarray) -> str:
    """Filled, outlined or striped, by which rows of the shape's inside (away from its edge) are coloured.

    Stripes are horizontal bands, so a striped inside has both mostly coloured and mostly empty rows.
    """
    interior = _erode(_erode(silhouette))
    if not interior.any():  # too small to have an inside: judge the whole silhouette
        interior = silhouette
    rows = [foreground[y][interior[y]].mean() for y in np.nonzero(interior.any(axis=1))[0]]
    coloured_rows = sum(fraction > 0.5 for fraction in rows)
    if coloured_rows == len(rows):
        return "filled"
    return "outlined" if coloured_rows == 0 else "striped"


def _neighbours(mask: np.ndarray) -> list[np.ndarray]:
    padded = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    return [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def _erode(mask: np.ndarray) -> np.ndarray:
    return np.logical_and.reduce(_neighbours(mask))


def _dilate(mask: np.ndarray) -> np.ndarray:
    return np.logical_or.reduce(_neighbours(mask))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region not connected to the image border filled in."""
    outside = np.zeros_like(mask)
    outside[[0, -1], :] = ~mask[[0, -1], :]
    outside[:, [0, -1]] = ~mask[:, [0, -1]]
    while True:
        grown = np.logical_or.reduce(_neighbours(outside)) & ~mask
        if (grown == outside).all():
            return ~outside
        outside = grown


def scorer_accuracy(per_combination: int = 20, seed: int = 1234) -> dict[str, float]:
    """Fraction of fresh `demo_world` drawings (every colour, shape and style) the scorer names right."""
    rng = np.random.default_rng(seed)
    right = {"colour": 0, "shape": 0, "style": 0}
    total = 0
    for colour in demo_world.COLOURS:
        for shape in demo_world.SHAPES:
            for style in demo_world.STYLES:
                for _ in range(per_combination):
                    score = score_image(demo_world.draw_shape(colour, shape, rng=rng, style=style))
                    right["colour"] += score.colour == colour
                    right["shape"] += score.shape == shape
                    right["style"] += score.style == style
                    total += 1
    return {name: count / total for name, count in right.items()}


def sample_images(pipeline, prompt: str, seeds: list[int], steps: int = 20) -> list[Image.Image]:
    """One image per seed for `prompt`, at the pipeline's default guidance; seed s always gives the same image."""
    device = getattr(pipeline, "device", "cpu")
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    return pipeline(prompt, num_images_per_prompt=len(seeds), generator=generators,
                    num_inference_steps=steps).images


def score_prompt(images: list[Image.Image], prompt: str, colour: str, shape: str) -> PromptResult:
    """How many of `images` (drawn for `prompt`) the scorer sees as `colour`, as `shape`, and as both."""
    scores = [score_image(image) for image in images]
    colour_right = [score.colour == colour for score in scores]
    shape_right = [score.shape == shape for score in scores]
    both_right = [c and s for c, s in zip(colour_right, shape_right)]
    count = len(scores)
    return PromptResult(prompt, colour, shape, count, sum(colour_right) / count, sum(shape_right) / count,
                        sum(both_right) / count)


def evaluate(pipeline, colours: list[str], shapes: list[str], samples: int = 16, steps: int = 20,
             ) -> tuple[list[PromptResult], list[list[Image.Image]]]:
    """Score `samples` seeded images (seeds 0..samples-1) for every "a <colour> <shape>" prompt.

    Returns the per-prompt results and the images, one row per prompt.
    """
    results, rows = [], []
    seeds = list(range(samples))
    for colour in colours:
        for shape in shapes:
            prompt = demo_world.prompt_for(colour, shape)
            images = sample_images(pipeline, prompt, seeds, steps)
            results.append(score_prompt(images, prompt, colour, shape))
            rows.append(images)
    return results, rows


def markdown_table(results: list[PromptResult]) -> str:
    """Per-prompt fractions of samples scored right, and their mean over all prompts."""
    lines = ["| prompt | colour right | shape right | both right |", "| --- | ---: | ---: | ---: |"]
    for result in results:
        lines.append(f"| {result.prompt} | {_fraction(result.colour_right, result.samples)} | "
                     f"{_fraction(result.shape_right, result.samples)} | {_fraction(result.both_right, result.samples)} |")
    mean = {key: np.mean([getattr(r, key) for r in results]) for key in ("colour_right", "shape_right", "both_right")}
    lines.append(f"| **all {len(results)} prompts** | **{mean['colour_right']:.0%}** | **{mean['shape_right']:.0%}** | "
                 f"**{mean['both_right']:.0%}** |")
    return "\n".join(lines)


def _fraction(value: float, samples: int) -> str:
    return f"{round(value * samples)}/{samples}"


def save_grid(rows: list[list[Image.Image]], prompts: list[str], path: Path, scale: int = 4) -> None:
    """A picture grid (rows = prompts, columns = seeds) enlarged `scale` times, written atomically as PNG."""
    grid = labelled_grid(rows, [f"seed {seed}" for seed in range(len(rows[0]))], prompts, scale=scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    grid.save(staging, format="PNG", optimize=True)
    os.replace(staging, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Score how well a demo-world model draws 'a <colour> <shape>'.")
    parser.add_argument("--model", default="demo", help='base model source (default "demo": assets/demo-model)')
    parser.add_argument("--samples", type=int, default=16, help="seeded samples per prompt (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=20, help="inference steps")
    parser.add_argument("--colours", nargs="+", default=list(demo_world.BASE_COLOURS), choices=list(demo_world.COLOURS))
    parser.add_argument("--shapes", nargs="+", default=list(demo_world.BASE_SHAPES), choices=list(demo_world.SHAPES))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    parser.add_argument("--grid", type=Path, help="also write a PNG grid of the samples (e.g. assets/demo-grid.png)")
    parser.add_argument("--grid-columns", type=int, default=8, help="seeds shown per prompt in the grid")
    parser.add_argument("--check-scorer", action="store_true", help="first report the scorer's accuracy on fresh drawings")
    args = parser.parse_args(argv)

    try:
        pipeline = load_base(args.model, device="cpu").pipeline
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    scorer = scorer_accuracy() if args.check_scorer else None
    results, rows = evaluate(pipeline, args.colours, args.shapes, args.samples, args.steps)
    if args.grid:
        save_grid([row[: args.grid_columns] for row in rows], [r.prompt for r in results], args.grid)
    if args.json:
        print(json.dumps({"model": args.model, "steps": args.steps, "scorer_accuracy": scorer,
                          "results": [asdict(r) for r in results]}, indent=2))
    else:
        if scorer:
            print("Scorer accuracy on fresh drawings: " + ", ".join(f"{k} {v:.1%}" for k, v in scorer.items()) + "\n")
        print(markdown_table(results))


if __name__ == "__main__":
    main()
