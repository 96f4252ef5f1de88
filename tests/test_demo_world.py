"""`studio.demo_world` draws the demo world reproducibly, and `studio.demo_eval`'s scorer reads it back:
colour, shape and style of fresh drawings, and of shapes drawn here by hand, independently of the world."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from studio import demo_world
from studio.demo_eval import ImageScore, score_image, scorer_accuracy


def test_same_seed_draws_the_same_image_and_another_seed_another():
    first = np.asarray(demo_world.draw_shape("purple", "star", rng=7))
    again = np.asarray(demo_world.draw_shape("purple", "star", rng=7))
    other = np.asarray(demo_world.draw_shape("purple", "star", rng=8))
    assert first.shape == (32, 32, 3)
    assert (first == again).all()
    assert (first != other).any()


def test_drawing_is_one_tinted_shape_on_white():
    pixels = np.asarray(demo_world.draw_shape("blue", "square", size_px=64, rng=0)).astype(int)
    assert pixels.shape == (64, 64, 3)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    assert (border == 255).all()
    solid = pixels[np.abs(pixels - 255).sum(axis=-1) > 300]  # well inside the shape
    assert len(solid) > 64 * 64 * 0.1
    # Blue within the drawing's colour jitter (18 per channel) of the named colour.
    assert np.abs(solid.mean(axis=0) - demo_world.COLOURS["blue"]).max() <= 18


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="orange"):
        demo_world.draw_shape("orange", "circle")
    with pytest.raises(ValueError, match="hexagon"):
        demo_world.draw_shape("red", "hexagon")
    with pytest.raises(ValueError, match="dotted"):
        demo_world.draw_shape("red", "circle", style="dotted")


def test_prompts_name_colour_shape_and_any_style():
    assert demo_world.prompt_for("red", "circle") == "a red circle"
    assert demo_world.prompt_for("purple", "star", "striped") == "a purple star, striped"


def test_scorer_reads_colour_shape_and_style_of_fresh_drawings():
    # Every colour x shape x style, including what the base model never saw (purple, star, outlined, striped).
    accuracy = scorer_accuracy(per_combination=4, seed=2024)
    assert accuracy["colour"] == 1.0
    assert accuracy["shape"] >= 0.99
    assert accuracy["style"] >= 0.97


@pytest.mark.parametrize(
    "draw, expected",
    [
        (lambda d: d.ellipse([8, 6, 26, 24], fill=(200, 20, 20)), ImageScore("red", "circle", "filled")),
        (lambda d: d.rectangle([6, 8, 24, 26], fill=(20, 160, 40)), ImageScore("green", "square", "filled")),
        (lambda d: d.polygon([(16, 4), (29, 27), (3, 27)], fill=(250, 210, 0)),
         ImageScore("yellow", "triangle", "filled")),
        (lambda d: d.rectangle([5, 5, 26, 26], outline=(30, 30, 230), width=2), ImageScore("blue", "square", "outlined")),
    ],
)
def test_scorer_reads_shapes_drawn_by_hand(draw, expected):
    image = Image.new("RGB", (32, 32), "white")
    draw(ImageDraw.Draw(image))
    assert score_image(image) == expected


def test_scorer_reads_a_hand_drawn_purple_star():
    image = Image.new("RGB", (32, 32), "white")
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 13.0, 5.5)
    ImageDraw.Draw(image).polygon(list(zip(16 + radii * np.cos(angles), 17 - radii * np.sin(angles))),
                                  fill=(150, 40, 200))
    assert score_image(image) == ImageScore("purple", "star", "filled")


def test_scorer_sees_nothing_in_a_blank_or_grey_image():
    assert score_image(Image.new("RGB", (32, 32), "white")) == ImageScore(None, None, None)
    grey = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(grey).ellipse([8, 8, 24, 24], fill=(100, 100, 100))
    assert score_image(grey).colour is None
