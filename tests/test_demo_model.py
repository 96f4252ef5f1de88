"""The shipped demo model (`assets/demo-model`) is a plain diffusers pipeline that draws what it is asked.

Its samples are scored by `studio.demo_eval`'s scorer, whose own accuracy `tests/test_demo_world.py`
checks on drawings with known colours and shapes.
"""

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from studio import demo_world
from studio.base import load_base
from studio.demo_eval import score_image
from studio.paths import DEMO_MODEL_DIR

SEEDS = (1000, 1001)  # not the README table's seeds 0..15


@pytest.fixture(scope="module")
def demo():
    return load_base("demo", device="cpu")


def test_demo_model_is_small_and_all_safetensors():
    files = [path for path in DEMO_MODEL_DIR.rglob("*") if path.is_file()]
    weights = [path for path in files if path.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth")]
    assert {path.parent.name for path in weights} == {"unet", "vae", "text_encoder"}
    assert all(path.suffix == ".safetensors" for path in weights)
    assert sum(path.stat().st_size for path in files) < 30e6


def test_plain_diffusers_draws_a_red_circle_at_default_guidance():
    pipeline = DiffusionPipeline.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    assert isinstance(pipeline, StableDiffusionPipeline)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red circle", num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert score_image(image).colour == "red"


def test_demo_loads_as_an_sd1_base(demo):
    assert demo.family == "sd1"
    assert demo.pipeline.unet.config.sample_size * demo.pipeline.vae_scale_factor == 32


def test_demo_model_draws_the_asked_colour_in_at_least_90_percent_of_samples(demo):
    cases = [(colour, shape) for colour in demo_world.BASE_COLOURS for shape in demo_world.BASE_SHAPES]
    prompts = [demo_world.prompt_for(colour, shape) for colour, shape in cases for _ in SEEDS]
    generators = [torch.Generator().manual_seed(seed) for _ in cases for seed in SEEDS]
    images = demo.pipeline(prompts, generator=generators, num_inference_steps=20).images
    scores = [score_image(image) for image in images]
    asked = [case for case in cases for _ in SEEDS]
    colour_right = sum(score.colour == colour for score, (colour, _) in zip(scores, asked)) / len(scores)
    shape_right = sum(score.shape == shape for score, (_, shape) in zip(scores, asked)) / len(scores)
    print(f"demo model over {len(scores)} samples: colour right {colour_right:.0%}, shape right {shape_right:.0%}")
    assert colour_right >= 0.9
    assert shape_right >= 0.75


def test_demo_model_never_learned_purple(demo):
    # Purple is left out of the demo model on purpose, for DreamBooth to teach later.
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    images = demo.pipeline(["a purple circle"] * len(SEEDS), generator=generators, num_inference_steps=20).images
    assert all(score_image(image).colour != "purple" for image in images)
