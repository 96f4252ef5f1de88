"""The web app's LoRA folder (`studio.library`): names never leave the folder, a file that does not load
never stays in it, and replacing keeps the old file until the new one has loaded."""

import pytest
import torch
from lora_factories import diffusers_lora
from PIL import Image
from safetensors.torch import save_file

from studio.adapters import Studio
from studio.errors import StudioError
from studio.library import LoraLibrary, check_name, safe_name, start_with_demo_loras
from studio.paths import DEMO_LORAS_DIR

BAD_MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"


@pytest.fixture()
def library(tmp_path):
    return LoraLibrary(
        Studio.from_base("tiny-sd"), tmp_path / "loras", tmp_path / "previews", max_upload_bytes=2 * 1024**2
    )


def mismatched_lora(path):
    """Right family, wrong shapes: only loading it into the pipeline can tell."""
    save_file(
        {f"unet.{BAD_MODULE}.lora_A.weight": torch.ones(4, 48), f"unet.{BAD_MODULE}.lora_B.weight": torch.ones(64, 4)},
        str(path),
    )
    return path


@pytest.mark.parametrize("name", ["../up", "a/b", "a\\b", ".hidden", "..", "", "x" * 101, "sp ace"])
def test_names_typed_by_users_are_refused_not_changed(name):
    with pytest.raises(StudioError, match="not a usable LoRA name"):
        check_name(name)


def test_names_from_file_names_are_made_safe():
    assert safe_name("My LoRA (v2)") == "My_LoRA_v2"
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name("...") == "lora"
    assert check_name("style.v2.safetensors") == "style.v2"


def test_a_file_that_does_not_load_is_not_kept(library, tmp_path):
    with pytest.raises(StudioError, match="upload.safetensors: .*64x64 in the base model but the LoRA is 64x48"):
        library.add_file(mismatched_lora(tmp_path / "bad.safetensors"), "upload.safetensors")
    assert list(library.folder.iterdir()) == []
    assert library.entries() == [] and library.studio.list_adapters() == []


def test_replacing_with_a_file_that_does_not_load_keeps_the_old_one(library, tmp_path):
    good = tmp_path / "good.safetensors"
    diffusers_lora(library.studio.pipeline, good, "sd1", seed=0)
    library.add_file(good, "style.safetensors")
    with pytest.raises(StudioError, match="64x48"):
        library.add_file(mismatched_lora(tmp_path / "bad.safetensors"), "style.safetensors", replace=True)
    assert (library.folder / "style.safetensors").read_bytes() == good.read_bytes()
    assert sorted(p.name for p in library.folder.iterdir()) == ["style.safetensors"]
    assert [info.name for info in library.studio.list_adapters()] == ["style"]


def test_replacing_swaps_the_file_and_the_loaded_adapter(library, tmp_path):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    diffusers_lora(library.studio.pipeline, first, "sd1", seed=0)
    built = diffusers_lora(library.studio.pipeline, second, "sd1", seed=1)
    library.add_file(first, "style.safetensors")
    library.add_file(second, "style.safetensors", replace=True)
    assert (library.folder / "style.safetensors").read_bytes() == second.read_bytes()
    library.studio.set_adapters({"style": 1.0})
    key = next(k for k in built.deltas if k.startswith("unet.") and k.endswith("attn2.to_k"))
    layer = library.studio.pipeline.unet.get_submodule(key.split(".", 1)[1])
    x = torch.randn(2, layer.get_base_layer().weight.shape[1])
    expected = torch.nn.functional.linear(
        x, layer.get_base_layer().weight + built.deltas[key], layer.get_base_layer().bias
    )
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_oversized_files_are_refused_before_reading(library, tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(b"\0" * (library.max_upload_bytes + 1))
    with pytest.raises(StudioError, match="over the 2 MB upload limit"):
        library.add_file(path, "big.safetensors")
    assert list(library.folder.iterdir()) == []


def test_pickle_files_are_refused_by_name(library, tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04")
    with pytest.raises(StudioError, match="only .safetensors"):
        library.add_file(path, "model.ckpt")


def test_rename_moves_the_sidecar_preview_and_refuses_clashes(library, tmp_path):
    for seed, name in enumerate(("a", "b")):
        path = tmp_path / f"{name}.safetensors"
        diffusers_lora(library.studio.pipeline, path, "sd1", seed=seed)
        library.add_file(path, path.name)
    (library.folder / "a.preview.png").write_bytes(b"png")
    with pytest.raises(StudioError, match="already exists"):
        library.rename("a", "b")
    library.rename("a", "c")
    assert sorted(p.name for p in library.folder.iterdir()) == ["b.safetensors", "c.preview.png", "c.safetensors"]
    assert library.preview("c") == library.folder / "c.preview.png"
    library.delete("c")
    assert sorted(p.name for p in library.folder.iterdir()) == ["b.safetensors"]


def test_a_new_lora_folder_can_start_with_the_shipped_demo_loras(tmp_path):
    shipped = sorted(path.name for path in DEMO_LORAS_DIR.glob("*.safetensors"))
    assert shipped, "the demo LoRAs are missing from assets/loras"
    folder = tmp_path / "new" / "loras"
    copied = start_with_demo_loras(folder)
    assert [path.name for path in copied] == shipped
    assert all((folder / name).read_bytes() == (DEMO_LORAS_DIR / name).read_bytes() for name in shipped)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["loras"]  # no staging folder left
    with pytest.raises(StudioError, match="already exists"):
        start_with_demo_loras(folder)


def test_a_preview_is_rendered_from_the_prompt_the_lora_was_trained_with(library, tmp_path, monkeypatch):
    lora = tmp_path / "star.safetensors"
    metadata = {"studio.trigger_prompt": "a sks shape", "studio.trigger_words": "sks"}
    diffusers_lora(library.studio.pipeline, lora, "sd1", metadata=metadata)
    library.add_file(lora, "star.safetensors")
    prompts = []
    monkeypatch.setattr(library.studio, "generate", lambda text, **_: prompts.append(text) or [Image.new("RGB", (8, 8))])
    library.render_preview("star", prompt="fallback")
    assert prompts == ["a sks shape"]  # not the bare trigger word "sks"


@pytest.mark.parametrize("written, used", [("2", 2), ("None", 1), ("9", 1)])  # tiny-sd's encoder has 5 layers
def test_a_preview_is_rendered_at_the_clip_skip_the_lora_was_trained_with(library, tmp_path, monkeypatch, written,
                                                                          used):
    lora = tmp_path / "anime.safetensors"
    diffusers_lora(library.studio.pipeline, lora, "sd1", metadata={"ss_clip_skip": written})
    library.add_file(lora, "anime.safetensors")
    skips = []

    def rendering(text, **settings):
        skips.append(settings["clip_skip"])
        return [Image.new("RGB", (8, 8))]

    monkeypatch.setattr(library.studio, "generate", rendering)
    library.render_preview("anime", prompt="x")
    assert skips == [used]
