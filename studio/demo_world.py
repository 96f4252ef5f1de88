"""The demo world: one coloured shape on a plain white background, drawn procedurally.

The embedded demo model (`assets/demo-model`, built by `tools/build_demo_model.py`) is trained on these
drawings, `studio.demo_eval` scores images against them, and the DreamBooth trainer and its benchmarks
draw new concepts with them. The base model learns only `BASE_COLOURS` x `BASE_SHAPES` in the
`"filled"` style; purple, the star and the `"outlined"` and `"striped"` styles are left out on purpose so
that DreamBooth has something new to teach ("a sks shape" = a purple star).

    from studio.demo_world import draw_shape, prompt_for
    image = draw_shape("purple", "star", rng=0)          # a 32x32 PIL image
    prompt_for("red", "circle")                          # "a red circle"
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (145, 45, 195),
}
SHAPES = ("circle", "square", "triangle", "star")
STYLES = ("filled", "outlined", "striped")
BACKGROUND = (255, 255, 255)

# What the base demo model is trained on; the rest of the world is left for DreamBooth to teach.
BASE_COLOURS = ("red", "green", "blue", "yellow")
BASE_SHAPES = ("circle", "square", "triangle")
BASE_STYLE = "filled"

_SUPERSAMPLE = 8  # shapes are drawn this many times larger, then box-filtered down: clean anti-aliasing
_COLOUR_JITTER = 18  # per-channel, in 0..255 units
_MAX_ROTATION_DEG = 15.0  # shapes keep their upright look: a square stays a square, not a diamond
_STAR_INNER_RATIO = 0.45


def prompt_for(colour: str, shape: str, style: str = "filled") -> str:
    """The caption the demo model is trained on: "a red circle"; other styles: "a red circle, outlined"."""
    return f"a {colour} {shape}" if style == "filled" else f"a {colour} {shape}, {style}"


def draw_shape(
    colour: str | tuple[int, int, int],
    shape: str,
    size_px: int = 32,
    rng: np.random.Generator | int | None = None,
    style: str = "filled",
) -> Image.Image:
    """Draw one `colour` `shape` in `style` on white, with random size, position, rotation and tint.

    `colour` is a name from `COLOURS` or an RGB triple (drawn as given, without tint). `rng` is a numpy
    Generator or a seed (the same seed draws the same image). Sizes scale with `size_px`; at 32 px a shape
    spans about 14 to 26 px.
    """
    if isinstance(colour, str) and colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    rng = np.random.default_rng(rng)

    unit = size_px / 32  # geometry below is in 32-px units
    half_size = rng.uniform(7.0, 10.5) * unit  # circle radius, half the side of a square, ...
    centre = size_px / 2 + rng.uniform(-2.5, 2.5, size=2) * unit
    rotation = math.radians(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
    tint = np.clip(np.array(COLOURS[colour]) + jitter, 0, 255) if isinstance(colour, str) else np.array(colour)
    stripe_phase = rng.uniform(0.0, 4.0) * unit

    big = size_px * _SUPERSAMPLE
    outline_px = 2.0 * unit * _SUPERSAMPLE
    inside = _shape_mask(shape, big, centre * _SUPERSAMPLE, half_size * _SUPERSAMPLE, rotation, width=0)
    if style == "filled":
        coverage = inside
    else:
        outline = _shape_mask(shape, big, centre * _SUPERSAMPLE, half_size * _SUPERSAMPLE, rotation,
                              width=round(outline_px))
        coverage = outline
        if style == "striped":
            rows = (np.arange(big) / _SUPERSAMPLE + stripe_phase) / unit
            stripes = (np.floor(rows / 2.0) % 2 == 0)[:, None]  # 2-px bands of colour and background
            coverage = outline | (inside & stripes)

    # Box-filter the high-resolution coverage down to the output size, then blend tint over background.
    alpha = coverage.reshape(size_px, _SUPERSAMPLE, size_px, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    pixels = alpha * tint + (1 - alpha) * np.array(BACKGROUND)
    return Image.fromarray(np.round(pixels).astype(np.uint8), mode="RGB")


def _shape_mask(shape: str, size: int, centre: np.ndarray, half_size: float, rotation: float,
                width: int) -> np.ndarray:
    """A boolean mask of the shape drawn filled (`width=0`) or as an outline `width` pixels wide."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre
    if shape == "circle":
        box = [cx - half_size, cy - half_size, cx + half_size, cy + half_size]
        if width:
            draw.ellipse(box, outline=255, width=width)
        else:
            draw.ellipse(box, fill=255)
    else:
        points = _polygon(shape, cx, cy, half_size, rotation)
        if width:
            # PIL strokes polygon outlines inside the filled area, like the ellipse above.
            draw.polygon(points, outline=255, width=width)
        else:
            draw.polygon(points, fill=255)
    return np.asarray(canvas) > 127


def _polygon(shape: str, cx: float, cy: float, half_size: float, rotation: float) -> list[tuple[float, float]]:
    """Corner points of an upright square, triangle (apex up) or five-pointed star, then rotated."""
    if shape == "square":
        radii, count = [half_size * math.sqrt(2)], 4
        start = math.pi / 4
    elif shape == "triangle":
        # Circumradius chosen so the triangle's area is close to the square's and circle's.
        radii, count = [half_size * 1.3], 3
        start = -math.pi / 2
    elif shape == "star":
        outer = half_size * 1.25
        radii, count = [outer, outer * _STAR_INNER_RATIO], 10
        start = -math.pi / 2
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    points = []
    for i in range(count):
        angle = start + rotation + 2 * math.pi * i / count
        radius = radii[i % len(radii)]
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    if shape == "triangle":
        # Centre the triangle's bounding box rather than its centroid so it sits in frame like the others.
        ys = [y for _, y in points]
        shift = cy - (min(ys) + max(ys)) / 2
        points = [(x, y + shift) for x, y in points]
    return points
