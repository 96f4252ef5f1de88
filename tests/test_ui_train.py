"""The Train tab through `gradio_client`: the trainer runs in its own process, reports progress and
validation images, refuses a second start, can be cancelled, and its LoRA lands in the library."""

import json

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from ports import free_port

from studio.adapters import Studio
from studio.demo_world import draw_shape
from studio.paths import DEMO_MODEL_DIR
from studio.train_dreambooth import RUN_FILE
from studio.ui import StudioApp, UIOptions, build_app, launch

BASE = "demo" if (DEMO_MODEL_DIR / "model_index.json").is_file() else "tiny-sd"
TRAIN_SECONDS = 600


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-ui")
    app = StudioApp(
        Studio.from_base(BASE), UIOptions(lora_dir=root / "loras", out_dir=root / "out", render_previews=False)
    )
    blocks = build_app(app)
    _, url, _ = launch(blocks, app, port=free_port(), prevent_thread_lock=True)
    yield app, Client(url, verbose=False)
    if app.training.status().active:
        app.training.cancel()
    blocks.close()


@pytest.fixture(scope="module")
def instance_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    paths = []
    for i in range(3):
        path = folder / f"star {i}.png"
        draw_shape("purple", "star", rng=i).save(path)
        paths.append(path)
    (folder / "star 0.txt").write_text("a sks shape, rotated")
    return [*paths, folder / "star 0.txt"]


def train_settings(images, name, steps, **changes):
    settings = {
        "name": name, "images": [handle_file(str(p)) for p in images], "dataset": None, "instance_prompt": "a sks shape",
        "validation_prompt": "a sks shape", "max_train_steps": steps, "learning_rate": 1e-3, "rank": 2,
        "unet_targets": ["to_k", "to_v"], "train_text_encoder": False, "text_encoder_targets": ["q_proj"],
        "resolution": 0, "train_batch_size": 1, "repeats": 1, "seed": 0, "validation_steps": 1,
        "num_validation_images": 1, "inference_steps": 1, "max_timestep": 0, "random_flip": False,
        "export_kohya": False, "clip_skip": 1,
    }  # fmt: skip
    settings.update(changes)
    return settings


def test_training_reports_progress_refuses_a_second_start_and_adds_the_lora(served, instance_images):
    app, client = served
    client.predict(**train_settings(instance_images, "sks", steps=2, max_timestep=600, clip_skip=2), api_name="/train")
    with pytest.raises(AppError, match="already running"):
        client.predict(**train_settings(instance_images, "other", steps=2), api_name="/train")

    status = app.training.wait(timeout=TRAIN_SECONDS)
    assert status.state == "finished", status.message + "\n" + "\n".join(status.log)
    progress, validation, *_ = client.predict(api_name="/training_status")
    assert "**sks**: finished" in progress and "step 2/2" in progress and "loss" in progress
    assert len(validation) == 2  # one image at step 1 and one at step 2
    captions = sorted(item["caption"] for item in validation)
    assert captions == ["step-000001-0", "step-000002-0"]

    run = json.loads((status.lora.parent / RUN_FILE).read_text())
    assert (run["min_timestep"], run["max_timestep"]) == (0, 600)  # the style setting reached the trainer
    assert run["clip_skip"] == 2

    run_images = sorted(p.name for p in (status.lora.parent.parent / "instance-images").iterdir())
    assert run_images == ["star_0.png", "star_0.txt", "star_1.png", "star_2.png"]  # safe names, caption kept beside
    assert [info.name for info in app.studio.list_adapters()] == ["sks"]
    assert (app.library.folder / "sks.safetensors").read_bytes() == status.lora.read_bytes()
    gallery_on, _ = client.predict(prompt="a sks shape", seed=3, steps=2, blend={"sks": 1.0}, api_name="/generate")
    gallery_off, _ = client.predict(
        prompt="a sks shape", seed=3, steps=2, blend={"sks": 1.0}, lora_off=True, api_name="/generate"
    )
    on, off = (np.asarray(Image.open(g[0]["image"])) for g in (gallery_on, gallery_off))
    assert not np.array_equal(on, off)

    with pytest.raises(AppError, match="already has a LoRA named 'sks'"):
        client.predict(**train_settings(instance_images, "sks", steps=2), api_name="/train")


def test_cancel_stops_the_trainer_and_adds_nothing(served, instance_images):
    app, client = served
    client.predict(**train_settings(instance_images, "long", steps=100000), api_name="/train")
    client.predict(api_name="/cancel_training")
    status = app.training.wait(timeout=60)
    assert status.state == "cancelled"
    assert "long" not in {info.name for info in app.studio.list_adapters()}
    assert not (app.library.folder / "long.safetensors").exists()


def test_bad_trainer_options_are_refused_before_anything_starts(served, instance_images):
    app, client = served
    with pytest.raises(AppError, match="--unet-targets is empty"):
        client.predict(**train_settings(instance_images, "empty_targets", steps=2, unet_targets=[]), api_name="/train")
    with pytest.raises(AppError, match="upload some images"):
        client.predict(**train_settings([], "no_images", steps=2), api_name="/train")
    assert not app.training.status().active
    assert not list((app.out_dir / "train").glob("empty_targets*"))
