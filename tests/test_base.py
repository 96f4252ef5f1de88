"""Base-model sources resolve to the right pipeline and family; bad sources give one-line errors."""

import json
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.base import detect_family, load_base, pick_device_dtype
from studio.checkpoint import save_single_file
from studio.errors import StudioError
from studio.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline


def render(pipeline, prompt="a red circle", seed=0, **kwargs):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipeline(prompt, num_inference_steps=2, generator=generator, output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def test_tiny_sd_is_sd1_and_deterministic():
    base = load_base("tiny-sd", device="cpu")
    assert base.family == "sd1"
    first = render(base.pipeline, seed=3)
    second = render(load_base("tiny-sd", device="cpu").pipeline, seed=3)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, render(base.pipeline, seed=4))


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_tiny_pipelines_render_requested_size(size):
    height, width = size
    for source in ("tiny-sd", "tiny-sdxl"):
        images = render(load_base(source).pipeline, height=height, width=width)
        assert images.shape == (1, height, width, 3)


def test_tiny_sdxl_is_sdxl_and_deterministic():
    base = load_base("tiny-sdxl")
    assert base.family == "sdxl"
    assert np.array_equal(render(base.pipeline), render(load_base("tiny-sdxl").pipeline))


def test_family_comes_from_structure_not_names():
    pipeline = tiny_sd_pipeline()
    assert detect_family(pipeline) == "sd1"
    pipeline.unet.register_to_config(cross_attention_dim=1024)
    assert detect_family(pipeline) == "sd2"
    assert detect_family(tiny_sdxl_pipeline()) == "sdxl"


def test_cpu_defaults_to_float32_and_dtype_can_be_forced():
    assert pick_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(StudioError, match="unknown dtype 'fp8'"):
        pick_device_dtype("cpu", "fp8")


def test_local_diffusers_folder_loads_with_its_weights(tiny_sd_folder):
    base = load_base(str(tiny_sd_folder))
    assert base.family == "sd1"
    original = tiny_sd_pipeline()
    assert torch.equal(base.pipeline.unet.conv_in.weight, original.unet.conv_in.weight)


def test_hub_id_loads_from_the_local_cache(tmp_path, tiny_sd_folder, monkeypatch):
    """A hub id resolves through the standard cache layout (models--owner--name/snapshots/<rev>)."""
    revision = "0" * 40
    repo = tmp_path / "models--studio-test--tiny-sd"
    snapshot = repo / "snapshots" / revision
    snapshot.parent.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(tiny_sd_folder, snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    base = load_base("studio-test/tiny-sd")
    assert base.family == "sd1"
    assert base.source == "studio-test/tiny-sd"


def test_uncached_hub_id_offline_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(StudioError) as error:
        load_base("stabilityai/stable-diffusion-xl-base-1.0")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("stabilityai/stable-diffusion-xl-base-1.0: is not in the local Hugging Face cache")
    assert "hf download" in message


def test_missing_path_is_one_line_error(tmp_path):
    with pytest.raises(StudioError, match=r"nope\.safetensors: no such file or folder"):
        load_base(str(tmp_path / "nope.safetensors"))


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(StudioError, match="no model_index.json"):
        load_base(str(tmp_path))


def test_corrupt_folder_is_one_line_error(tmp_path, tiny_sd_folder):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_folder, broken)
    unet_weights = next((broken / "unet").glob("*.safetensors"))
    unet_weights.write_bytes(unet_weights.read_bytes()[:1000])
    with pytest.raises(StudioError) as error:
        load_base(str(broken))
    assert str(error.value).startswith(f"{broken}: cannot load the diffusers folder")
    assert "\n" not in str(error.value)


def test_corrupt_single_file_is_one_line_error(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(StudioError, match="not a valid safetensors file"):
        load_base(str(checkpoint))


def test_single_file_without_unet_is_refused(tmp_path):
    checkpoint = tmp_path / "lora-not-model.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, checkpoint)
    with pytest.raises(StudioError, match="not a Stable Diffusion checkpoint"):
        load_base(str(checkpoint))


def test_pickle_checkpoint_needs_opt_in(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"anything")
    with pytest.raises(StudioError, match="pickles that can run code"):
        load_base(str(checkpoint))


def test_non_sd_pipeline_folder_is_refused(tmp_path, tiny_sd_folder):
    folder = tmp_path / "other"
    shutil.copytree(tiny_sd_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionImg2ImgPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(StudioError, match="not an SD1/SD2/SDXL text-to-image pipeline"):
        load_base(str(folder))


@pytest.mark.parametrize("make, family", [(tiny_sd_pipeline, "sd1"), (tiny_sdxl_pipeline, "sdxl")])
def test_single_file_checkpoint_loads_with_its_family_and_weights(tmp_path, make, family):
    original = make()
    config_folder = tmp_path / "config"
    original.save_pretrained(config_folder)
    checkpoint = save_single_file(original, tmp_path / "model.safetensors")
    base = load_base(str(checkpoint), config=str(config_folder))
    assert base.family == family
    assert torch.equal(base.pipeline.unet.conv_in.weight, original.unet.conv_in.weight)
    assert np.array_equal(render(base.pipeline), render(original))


def test_single_file_without_config_offline_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    checkpoint = save_single_file(tiny_sd_pipeline(), tmp_path / "model.safetensors")
    with pytest.raises(StudioError) as error:
        load_base(str(checkpoint))
    assert str(error.value).startswith(f"{checkpoint}: its model config could not be resolved offline")
    assert "--base-config" in str(error.value)
