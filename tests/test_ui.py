"""The web app end to end through `gradio_client`: each request renders exactly the blend it asked for,
images carry their settings, uploads are checked, and errors come back as readable messages."""

import hashlib
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from lora_factories import diffusers_lora, kohya_lora
from PIL import Image
from ports import free_port
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import app as app_cli
from studio.a1111 import parse_infotext
from studio.adapters import Studio
from studio.base import load_base
from studio.checkpoint import ldm_state_dict
from studio.errors import StudioError
from studio.paths import DEMO_MODEL_DIR
from studio.pngmeta import read_png_metadata
from studio.train_dreambooth import main as train_main
from studio.ui import StudioApp, UIOptions, build_app, launch

BASE = "demo" if (DEMO_MODEL_DIR / "model_index.json").is_file() else "tiny-sd"
PROMPT = "a red circle"
STEPS = 2
SEED = 11
MAX_UPLOAD_BYTES = 3 * 1024**2


class Served:
    def __init__(self, app: StudioApp, url: str, root: Path):
        self.app, self.url, self.root = app, url, root
        self.client = Client(url, verbose=False)

    def generate(self, client=None, **kwargs):
        kwargs = {"prompt": PROMPT, "seed": SEED, "steps": STEPS, **kwargs}
        gallery, summary = (client or self.client).predict(**kwargs, api_name="/generate")
        return gallery, summary

    def image(self, client=None, **kwargs) -> np.ndarray:
        gallery, _ = self.generate(client, **kwargs)
        return np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))

    def direct(self, weights: dict, enabled: bool = True, prompt: str = PROMPT) -> np.ndarray:
        """The same render straight from `Studio`, bypassing the UI."""
        blend = self.app.studio.make_blend(weights, enabled=enabled)
        return np.asarray(self.app.studio.generate(prompt, seed=SEED, steps=STEPS, guidance=7.5, blend=blend)[0])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    studio = Studio.from_base(BASE, device="cpu")
    lora_dir = root / "loras"
    lora_dir.mkdir()
    kohya_lora(studio.pipeline, lora_dir / "stripes.safetensors", studio.family, seed=0,
               metadata={"studio.trigger_words": json.dumps(["striped"])})  # fmt: skip
    diffusers_lora(studio.pipeline, lora_dir / "outline.safetensors", studio.family, seed=1)
    app = StudioApp(
        studio,
        UIOptions(lora_dir=lora_dir, out_dir=root / "out", max_upload_bytes=MAX_UPLOAD_BYTES, render_previews=False),
    )
    blocks = build_app(app)
    _, url, _ = launch(blocks, app, port=free_port(), prevent_thread_lock=True)
    yield Served(app, url, root)
    blocks.close()


@pytest.fixture(scope="module")
def base_image():
    """The base model's image from a plain diffusers pipeline that never saw a LoRA."""
    pipeline = load_base(BASE, device="cpu").pipeline
    generator = torch.Generator("cpu").manual_seed(SEED)
    return np.asarray(pipeline(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, generator=generator).images[0])


def test_lora_off_renders_the_base_model_exactly(served, base_image):
    on = served.image(blend={"stripes": {"on": True, "weight": 1.0}})
    off = served.image(blend={"stripes": {"on": True, "weight": 1.0}}, lora_off=True)
    assert np.array_equal(off, base_image)
    assert not np.array_equal(on, base_image)


def test_generate_renders_exactly_the_blend_of_the_request(served):
    spec = {"stripes": {"on": True, "weight": 0.8}, "outline": {"on": True, "weight": -0.5}}
    assert np.array_equal(served.image(blend=spec), served.direct({"stripes": 0.8, "outline": -0.5}))


def test_switched_off_adapter_does_not_contribute(served):
    spec = {"stripes": {"on": True, "weight": 0.8}, "outline": {"on": False, "weight": 1.5}}
    assert np.array_equal(served.image(blend=spec), served.direct({"stripes": 0.8}))


def test_weight_change_changes_the_image(served):
    low = served.image(blend={"stripes": {"on": True, "weight": 0.3}})
    high = served.image(blend={"stripes": {"on": True, "weight": 1.2}})
    assert not np.array_equal(low, high)
    assert np.array_equal(high, served.direct({"stripes": 1.2}))


def test_per_part_weights_multiply_the_weight(served):
    spec = {"stripes": {"on": True, "weight": 0.8, "text_encoder": 0.0, "down": 0.5, "up": 2.0}}
    expected = served.direct({"stripes": {"unet": {"down": 0.4, "mid": 0.8, "up": 1.6}, "text_encoder": 0.0}})
    assert np.array_equal(served.image(blend=spec), expected)


def test_lora_tag_in_the_prompt_works_like_the_switch(served):
    tagged = served.image(prompt=f"{PROMPT} <lora:outline:0.7>", blend={})
    assert np.array_equal(tagged, served.direct({"outline": 0.7}))


def test_unknown_lora_tag_is_a_readable_error(served):
    with pytest.raises(AppError, match="no LoRA 'nope' is loaded"):
        served.generate(prompt=f"{PROMPT} <lora:nope:1>")


def test_image_file_carries_its_settings(served):
    gallery, summary = served.generate(blend={"stripes": {"on": True, "weight": 0.8}})
    parameters, record = read_png_metadata(Path(gallery[0]["image"]))
    assert parameters.splitlines()[0] == f"{PROMPT} <lora:stripes:0.8>"
    params = parse_infotext(parameters)
    assert (params["Seed"], params["Steps"]) == (str(SEED), str(STEPS))
    data = (served.app.library.folder / "stripes.safetensors").read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert params["Lora hashes"] == f"stripes: {hashlib.sha256(data[8 + header_length :]).hexdigest()[:12]}"  # A1111's
    assert record["seed"] == SEED and record["prompt"] == PROMPT
    assert [(a["name"], a["weight"]) for a in record["adapters"]] == [("stripes", 0.8)]
    assert "`stripes` 0.8" in summary
    saved = sorted((served.root / "out" / "images").rglob(Path(gallery[0]["image"]).name))
    assert saved, "the image is kept in the output folder"


def test_random_seed_is_reported_and_reproducible(served):
    gallery, _ = served.generate(seed=-1, blend={})
    seed = int(gallery[0]["caption"].removeprefix("seed "))
    again, _ = served.generate(seed=seed, blend={})
    first, second = (np.asarray(Image.open(g[0]["image"])) for g in (gallery, again))
    assert np.array_equal(first, second)


def test_clip_skip_from_the_ui_renders_as_the_studio_does_and_is_written_down(served):
    gallery, summary = served.generate(clip_skip=2, blend={})
    assert "clip skip 2" in summary
    image = Image.open(gallery[0]["image"])
    blend = served.app.studio.make_blend({}, enabled=False)
    expected = served.app.studio.generate(PROMPT, seed=SEED, steps=STEPS, guidance=7.5, blend=blend, clip_skip=2)[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    assert parse_infotext(image.info["parameters"])["Clip skip"] == "2"


def test_compare_returns_base_each_adapter_and_blend(served, base_image):
    spec = {"stripes": {"on": True, "weight": 0.8}, "outline": {"on": True, "weight": 0.6}}
    gallery, _ = served.client.predict(prompt=PROMPT, seed=SEED, steps=STEPS, blend=spec, api_name="/compare")
    assert [item["caption"] for item in gallery] == [
        "base model | outline 0.6 | stripes 0.8 | blend",
        f"base model · seed {SEED}",
        f"outline 0.6 · seed {SEED}",
        f"stripes 0.8 · seed {SEED}",
        f"blend · seed {SEED}",
    ]
    cells = [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery[1:]]
    assert np.array_equal(cells[0], base_image)
    assert np.array_equal(cells[1], served.direct({"outline": 0.6}))
    assert np.array_equal(cells[2], served.direct({"stripes": 0.8}))
    assert np.array_equal(cells[3], served.direct({"stripes": 0.8, "outline": 0.6}))
    grid = Image.open(gallery[0]["image"])
    assert grid.width >= 4 * base_image.shape[1] and grid.height > base_image.shape[0]


def test_compare_without_an_active_adapter_is_refused(served):
    with pytest.raises(AppError, match="Compare needs at least one LoRA"):
        served.client.predict(prompt=PROMPT, seed=SEED, steps=STEPS, blend={}, api_name="/compare")


def test_two_clients_with_different_blends_each_get_their_solo_image(served):
    blends = {"a": {"stripes": {"on": True, "weight": 1.0}}, "b": {"outline": {"on": True, "weight": 1.2}}}
    solo = {"a": served.direct({"stripes": 1.0}), "b": served.direct({"outline": 1.2})}
    clients = {label: Client(served.url, verbose=False) for label in blends}
    jobs = [
        (label, clients[label].submit(prompt=PROMPT, seed=SEED, steps=STEPS, blend=blends[label], api_name="/generate"))
        for _ in range(3)
        for label in blends
    ]
    for label, job in jobs:
        gallery, _ = job.result(timeout=120)
        assert np.array_equal(np.asarray(Image.open(gallery[0]["image"]).convert("RGB")), solo[label]), label


def test_upload_then_inspect_then_generate_with_it(served, tmp_path):
    path = tmp_path / "My Upload (v2).safetensors"
    kohya_lora(served.app.studio.pipeline, path, served.app.studio.family, seed=5, text_encoders=False)
    message, *_ = served.client.predict(handle_file(str(path)), "", False, api_name="/upload")
    assert "My_Upload_v2" in message
    assert (served.app.library.folder / "My_Upload_v2.safetensors").read_bytes() == path.read_bytes()
    text, report = served.client.predict("My_Upload_v2", api_name="/inspect")
    assert report["format"] == "kohya" and report["components"] == {"unet": report["num_modules"]}
    assert report["ranks"] == [2, 3, 4] and "sha256" in text
    image = served.image(blend={"My_Upload_v2": {"on": True, "weight": 1.0}})
    assert np.array_equal(image, served.direct({"My_Upload_v2": 1.0}))


def test_upload_refuses_a_file_that_is_not_safetensors(served, tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(b"\x80\x04 pickle bytes")
    with pytest.raises(AppError, match="safetensors"):
        served.client.predict(handle_file(str(path)), "", False, api_name="/upload")
    assert not list(served.app.library.folder.glob("evil*"))


def test_upload_refuses_an_oversized_file(served, tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(b"\0" * (MAX_UPLOAD_BYTES + 1))
    with path.open("rb") as file:  # past the client's own check: the server refuses it too
        response = httpx.post(f"{served.url}gradio_api/upload", files={"files": (path.name, file)})
    assert response.status_code == 413
    with pytest.raises(StudioError, match="over the 3 MB upload limit"):  # and the handler, whatever reaches it
        served.app.upload(str(path), "", False)
    assert not list(served.app.library.folder.glob("huge*"))


def test_upload_refuses_a_name_that_leaves_the_lora_folder(served, tmp_path):
    path = tmp_path / "fine.safetensors"
    diffusers_lora(served.app.studio.pipeline, path, served.app.studio.family, seed=6)
    with pytest.raises(AppError, match="not a usable LoRA name"):
        served.client.predict(handle_file(str(path)), "../escaped", False, api_name="/upload")
    assert not (served.app.library.folder.parent / "escaped.safetensors").exists()
    assert not list(served.app.library.folder.glob("*escaped*"))


def test_upload_does_not_replace_without_being_asked(served, tmp_path):
    path = tmp_path / "stripes.safetensors"
    diffusers_lora(served.app.studio.pipeline, path, served.app.studio.family, seed=7)
    before = (served.app.library.folder / "stripes.safetensors").read_bytes()
    with pytest.raises(AppError, match="already exists"):
        served.client.predict(handle_file(str(path)), "", False, api_name="/upload")
    assert (served.app.library.folder / "stripes.safetensors").read_bytes() == before


def test_rename_and_delete(served, tmp_path):
    path = tmp_path / "temporary.safetensors"
    diffusers_lora(served.app.studio.pipeline, path, served.app.studio.family, seed=8)
    served.client.predict(handle_file(str(path)), "", False, api_name="/upload")
    with pytest.raises(AppError, match="not a usable LoRA name"):
        served.client.predict("temporary", "../../outside", api_name="/rename")
    served.client.predict("temporary", "renamed", api_name="/rename")
    folder = served.app.library.folder
    assert (folder / "renamed.safetensors").is_file() and not (folder / "temporary.safetensors").exists()
    assert "renamed" in {info.name for info in served.app.studio.list_adapters()}
    with pytest.raises(AppError, match="tick"):
        served.client.predict("renamed", False, api_name="/delete")
    served.client.predict("renamed", True, api_name="/delete")
    assert not (folder / "renamed.safetensors").exists()
    assert "renamed" not in {info.name for info in served.app.studio.list_adapters()}


def test_a_lora_for_another_family_is_listed_with_the_reason_not_loaded(tmp_path):
    sdxl = Studio.from_base("tiny-sdxl")
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    kohya_lora(sdxl.pipeline, lora_dir / "xl.safetensors", "sdxl", seed=0)
    app = StudioApp(
        Studio.from_base("tiny-sd"), UIOptions(lora_dir=lora_dir, out_dir=tmp_path / "out", render_previews=False)
    )
    [row] = app.library_table()
    assert row[0] == "xl" and row[1].startswith("not loaded:") and "sdxl" in row[1] and "sd1" in row[1]
    assert app.studio.list_adapters() == []


def test_app_reports_a_bad_base_in_one_line_and_exits_2(tmp_path, capsys):
    assert (
        app_cli.main(
            ["--base", str(tmp_path / "missing"), "--lora-dir", str(tmp_path / "l"), "--out-dir", str(tmp_path / "o")]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "missing" in error and error.count("\n") == 1


def test_app_opens_a_pickled_base_only_when_allowed(tmp_path, capsys, monkeypatch):
    original = load_base("tiny-sd", device="cpu").pipeline
    original.save_pretrained(tmp_path / "config")
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": ldm_state_dict(original)}, pickled)
    launched = []
    monkeypatch.setattr("studio.ui.launch", lambda blocks, app, **kwargs: launched.append(app))
    flags = ["--base", str(pickled), "--base-config", str(tmp_path / "config"), "--lora-dir", str(tmp_path / "l"),
             "--out-dir", str(tmp_path / "o")]  # fmt: skip
    assert app_cli.main(flags) == 2
    assert "pickles that can run code" in capsys.readouterr().err and not launched
    assert app_cli.main(flags + ["--allow-pickle"]) == 0
    [app] = launched
    assert torch.equal(app.studio.pipeline.unet.conv_in.weight, original.unet.conv_in.weight)


def test_training_from_the_ui_loads_a_single_file_base_as_the_app_did(tmp_path, monkeypatch):
    """The Train tab runs the trainer as a process: it must get the app's --base-config and --allow-pickle."""
    original = load_base("tiny-sd", device="cpu").pipeline
    original.save_pretrained(tmp_path / "config")
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": ldm_state_dict(original)}, pickled)
    studio = Studio.from_base(str(pickled), device="cpu", config=str(tmp_path / "config"), allow_pickle=True)
    app = StudioApp(studio, UIOptions(lora_dir=tmp_path / "l", out_dir=tmp_path / "o", render_previews=False))
    started = []
    monkeypatch.setattr(app.training, "start", lambda name, output, args: started.append(args))
    image = tmp_path / "star.png"
    Image.new("RGB", (64, 64), "purple").save(image)
    app.start_training("star", [str(image)], None, {"instance_prompt": "a sks shape", "max_train_steps": 1})
    [args] = started
    assert args[args.index("--base-config") + 1] == str((tmp_path / "config").resolve())
    assert "--allow-pickle" in args
    assert train_main(args) == 0  # what the process would run, in this one


def test_training_without_a_prompt_needs_a_caption_for_every_image(tmp_path, monkeypatch):
    app = StudioApp(Studio.from_base("tiny-sd", device="cpu"),
                    UIOptions(lora_dir=tmp_path / "l", out_dir=tmp_path / "o", render_previews=False))  # fmt: skip
    started = []
    monkeypatch.setattr(app.training, "start", lambda name, output, args: started.append(args))
    uploads = [tmp_path / "star.png", tmp_path / "moon.png"]
    for path in uploads:
        Image.new("RGB", (64, 64), "purple").save(path)
    (tmp_path / "star.txt").write_text("a sks star")
    with pytest.raises(StudioError, match=r": moon.png has no caption .*give --instance-prompt$"):
        app.start_training("star", [str(p) for p in [*uploads, tmp_path / "star.txt"]], None, {"max_train_steps": 1})
    assert not started and not list((tmp_path / "o" / "train").iterdir())  # nothing started, no run folder left
    (tmp_path / "moon.txt").write_text("a sks moon")
    app.start_training("star", [str(p) for p in tmp_path.glob("*.*")], None, {"max_train_steps": 1})
    assert len(started) == 1 and "--instance-prompt" not in started[0]


def test_training_a_library_lora_further_fills_its_settings_and_starts_at_its_deltas(tmp_path, monkeypatch):
    """A rank-2 LoRA on attn1.to_k, attn2.to_v and the text encoder's q_proj: the Train tab's fields become
    rank 2, to_k + to_v, text encoder q_proj; at a vanishing learning rate the new LoRA is the file's change (the
    file has no alpha: scale 1)."""
    studio = Studio.from_base("tiny-sd", device="cpu")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, model, suffixes in (("unet.", studio.pipeline.unet, ("attn1.to_k", "attn2.to_v")),
                                    ("text_encoder.text_model.", studio.pipeline.text_encoder, ("self_attn.q_proj",))):  # fmt: skip
        for name, layer in model.named_modules():  # the file names the text encoder as diffusers' files do
            if name.endswith(suffixes):
                tensors[f"{prefix}{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=generator)
                tensors[f"{prefix}{name}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=generator)
    (tmp_path / "l").mkdir()
    save_file(tensors, tmp_path / "l" / "mine.safetensors")
    app = StudioApp(studio, UIOptions(lora_dir=tmp_path / "l", out_dir=tmp_path / "o", render_previews=False))
    settings = app.settings_to_train_further("mine")
    assert settings == {"rank": 2, "dora": False, "unet_targets": ["to_k", "to_v"], "text_encoder_targets": ["q_proj"],
                        "train_text_encoder": True}  # fmt: skip

    started = []
    monkeypatch.setattr(app.training, "start", lambda name, output, args: started.append(args))
    image = tmp_path / "star.png"
    Image.new("RGB", (64, 64), "purple").save(image)
    fields = {"instance_prompt": "a sks shape", "max_train_steps": 1, "learning_rate": 1e-12, "text_encoder_lr": 1e-12}
    with pytest.raises(StudioError, match=r"mine.safetensors: its layers have rank 2, pass --rank 2$"):
        app.start_training("more", [str(image)], None, {**fields, **settings, "rank": 4}, start_from="mine")
    assert not started and not (tmp_path / "o" / "train").exists()  # checked before any run folder is made
    app.start_training("more", [str(image)], None, {**fields, **settings}, start_from="mine")
    [args] = started
    assert args[args.index("--init-from") + 1] == str(tmp_path / "l" / "mine.safetensors")
    assert train_main(args) == 0
    [output] = (tmp_path / "o" / "train").glob("more-*/output/pytorch_lora_weights.safetensors")
    trained = load_file(output)
    with safe_open(output, framework="pt") as handle:
        adapter = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert {key for key in tensors if "lora_A" in key} < {key for key in trained if "lora_A" in key}
    for key, down in trained.items():  # to_k and to_v of both attentions: the file's layers, the others at zero
        if key.endswith(".lora_A.weight"):
            module, component = key[: -len(".lora_A.weight")], key.split(".")[0]
            scale = adapter[f"{component}.lora_alpha"] / adapter[f"{component}.r"]
            up = f"{module}.lora_B.weight"
            expected = tensors[up] @ tensors[key] if key in tensors else torch.zeros(trained[up].shape[0], down.shape[1])
            torch.testing.assert_close(scale * trained[up] @ down, expected, rtol=1e-5, atol=1e-6, msg=module)


def test_app_refuses_a_malformed_auth(tmp_path, capsys):
    assert app_cli.main(["--base", "tiny-sd", "--auth", "nopassword", "--lora-dir", str(tmp_path / "l")]) == 2
    assert "USER:PASSWORD" in capsys.readouterr().err


def test_merge_cat_adds_a_lora_that_renders_like_the_blend(served):
    message, previews, *_ = served.client.predict(
        names=["stripes", "outline"], weights={"stripes": 0.8, "outline": 0.6}, method="cat", density=0.5, rank=0,
        name="merged", replace=False, preview_prompt=PROMPT, api_name="/merge",
    )  # fmt: skip
    assert "**merged**" in message
    assert [item["caption"] for item in previews] == ["base model", "inputs blended", "merged (cat)"]
    assert (served.app.library.folder / "merged.safetensors").is_file()
    merged = served.image(blend={"merged": {"on": True, "weight": 1.0}})
    blended = served.direct({"stripes": 0.8, "outline": 0.6})
    assert np.abs(merged.astype(int) - blended.astype(int)).max() <= 3  # cat is exact up to float summation order
