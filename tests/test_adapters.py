"""`Studio`: loading, blending, disabling, fusing and thread safety, checked against W + sum w_i * delta_i."""

import copy
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.adapters import Studio
from studio.errors import StudioError

UNET_TARGETS = ("attn1.to_k", "attn2.to_q", "attn2.to_v", "attn1.to_out.0")
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.v_proj")


def make_diffusers_lora(pipeline, path, seed, rank=4, text_encoders=True, scale=0.5):
    """Write a diffusers/peft-named LoRA on `pipeline`'s attention layers; return {(component, module): delta}."""
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    components = ["unet"] + (["text_encoder", "text_encoder_2"] if text_encoders else [])
    for component in components:
        model = getattr(pipeline, component, None)
        if model is None:
            continue
        targets = UNET_TARGETS if component == "unet" else TEXT_TARGETS
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module_name.endswith(targets):
                out_features, in_features = module.weight.shape
                down = torch.randn(rank, in_features, generator=generator) * scale
                up = torch.randn(out_features, rank, generator=generator) * scale
                tensors[f"{component}.{module_name}.lora_A.weight"] = down
                tensors[f"{component}.{module_name}.lora_B.weight"] = up
                deltas[(component, module_name)] = up @ down
    save_file(tensors, str(path))
    return deltas


def render(studio, seed=0, **kwargs):
    return np.asarray(studio.generate("a red circle", seed=seed, steps=2, **kwargs)[0])


def layer_output(studio, component, module_name, x):
    with torch.no_grad():
        return getattr(studio.pipeline, component).get_submodule(module_name)(x)


def expected_output(original_weight, bias, x, weighted_deltas):
    weight = original_weight.clone()
    for w, delta in weighted_deltas:
        weight += w * delta
    return torch.nn.functional.linear(x, weight, bias)


@pytest.fixture()
def sd_studio():
    return Studio.from_base("tiny-sd", device="cpu")


@pytest.fixture()
def two_loras(sd_studio, tmp_path):
    paths = {name: tmp_path / f"{name}.safetensors" for name in ("a", "b")}
    deltas = {name: make_diffusers_lora(sd_studio.pipeline, paths[name], seed) for seed, name in enumerate(paths)}
    return paths, deltas


@pytest.mark.parametrize("source", ["tiny-sd", "tiny-sdxl"])
def test_blend_effective_weight_is_base_plus_weighted_deltas(source, tmp_path):
    studio = Studio.from_base(source)
    deltas = {}
    for seed, name in enumerate(["a", "b"]):
        deltas[name] = make_diffusers_lora(studio.pipeline, tmp_path / f"{name}.safetensors", seed)
    originals = {
        key: getattr(studio.pipeline, key[0]).get_submodule(key[1]).weight.detach().clone() for key in deltas["a"]
    }
    for name in deltas:
        studio.load_adapter(tmp_path / f"{name}.safetensors", name=name)
    studio.set_adapters({"a": 0.7, "b": -0.4})
    checked_components = set()
    for component, module_name in deltas["a"]:
        layer = getattr(studio.pipeline, component).get_submodule(module_name)
        bias = layer.get_base_layer().bias
        x = torch.randn(3, originals[(component, module_name)].shape[1])
        weighted = [(0.7, deltas["a"][(component, module_name)]), (-0.4, deltas["b"][(component, module_name)])]
        expected = expected_output(originals[(component, module_name)], bias, x, weighted)
        torch.testing.assert_close(layer_output(studio, component, module_name, x), expected, rtol=1e-4, atol=1e-5)
        checked_components.add(component)
    expected_components = {"unet", "text_encoder"} | ({"text_encoder_2"} if source == "tiny-sdxl" else set())
    assert checked_components == expected_components


def test_disable_gives_base_image_exactly_and_enable_gives_blend_back(sd_studio, two_loras):
    paths, _ = two_loras
    base_image = render(sd_studio)
    for name, path in paths.items():
        sd_studio.load_adapter(path, name=name)
    sd_studio.set_adapters({"a": 0.8, "b": 0.5})
    blended = render(sd_studio)
    assert np.abs(blended.astype(int) - base_image.astype(int)).max() > 0
    sd_studio.disable_lora()
    assert np.array_equal(render(sd_studio), base_image)
    sd_studio.enable_lora()
    assert np.array_equal(render(sd_studio), blended)


def test_zero_weights_equal_disabled(sd_studio, two_loras):
    paths, _ = two_loras
    base_image = render(sd_studio)
    for name, path in paths.items():
        sd_studio.load_adapter(path, name=name)
    sd_studio.set_adapters({"a": 0.0, "b": {"unet": {"down": 0, "mid": 0, "up": 0}, "text_encoder": 0}})
    assert np.array_equal(render(sd_studio), base_image)


def test_per_component_weight_applies_to_that_component_only(sd_studio, two_loras):
    paths, deltas = two_loras
    sd_studio.load_adapter(paths["a"], name="a")
    sd_studio.set_adapters({"a": {"unet": 0.5, "text_encoder": 0.0}})
    unet_key = next(k for k in deltas["a"] if k[0] == "unet")
    text_key = next(k for k in deltas["a"] if k[0] == "text_encoder")
    for (component, module_name), weight in ((unet_key, 0.5), (text_key, 0.0)):
        layer = getattr(sd_studio.pipeline, component).get_submodule(module_name)
        base_layer = layer.get_base_layer()
        x = torch.randn(2, base_layer.weight.shape[1])
        expected = expected_output(base_layer.weight, base_layer.bias, x, [(weight, deltas["a"][(component, module_name)])])
        torch.testing.assert_close(layer_output(sd_studio, component, module_name, x), expected, rtol=1e-4, atol=1e-5)


def lora_layer_state(pipeline):
    """Every LoRA layer's active adapters and scalings, component by component."""
    state = {}
    for component in ("unet", "text_encoder"):
        for module_name, module in getattr(pipeline, component).named_modules():
            if hasattr(module, "scaling") and hasattr(module, "active_adapters"):
                state[(component, module_name)] = (list(module.active_adapters), dict(module.scaling))
    return state


@pytest.mark.parametrize(
    "blend",
    [
        {"a": 0.7, "b": -0.4},
        {"b": 0.25},
        {"a": {"unet": 0.5, "text_encoder": 0.0}, "b": 1.5},
        {"a": {"down": 0.0, "mid": 0.3, "up": 1.0}, "b": {"unet": {"down": 2.0, "mid": 0.0, "up": 0.5}, "text_encoder": 0.2}},
    ],
)
def test_switching_sets_the_layers_as_diffusers_set_adapters_does(sd_studio, two_loras, blend):
    """The studio switches blends from its own list of LoRA layers (fast); diffusers' pipeline-wide
    `set_adapters`, called with the same blend, must leave every layer in the same state."""
    paths, _ = two_loras
    for name, path in paths.items():
        sd_studio.load_adapter(path, name=name)
    sd_studio.set_adapters({"a": 0.1})  # another active set first, so the switch has work to do
    sd_studio.set_adapters(blend)
    studio_state = lora_layer_state(sd_studio.pipeline)
    active = sd_studio.blend.active()  # the weights as validated: per-block dicts sit under "unet"
    assert list(active) == [name for name in ("a", "b") if name in blend]
    sd_studio.pipeline.set_adapters(list(active), [copy.deepcopy(w) for w in active.values()])
    assert studio_state and lora_layer_state(sd_studio.pipeline) == studio_state


def test_per_block_weight_reaches_only_that_block(sd_studio, two_loras):
    paths, deltas = two_loras
    sd_studio.load_adapter(paths["a"], name="a")
    sd_studio.set_adapters({"a": {"down": 0.0, "mid": 1.0, "up": 1.0}})
    for (component, module_name), delta in deltas["a"].items():
        if component != "unet" or not module_name.startswith(("down_blocks", "up_blocks")):
            continue
        weight = 0.0 if module_name.startswith("down_blocks") else 1.0
        base_layer = sd_studio.pipeline.unet.get_submodule(module_name).get_base_layer()
        x = torch.randn(2, base_layer.weight.shape[1])
        expected = expected_output(base_layer.weight, base_layer.bias, x, [(weight, delta)])
        torch.testing.assert_close(layer_output(sd_studio, "unet", module_name, x), expected, rtol=1e-4, atol=1e-5)


def test_fused_matches_unfused_and_unfuse_restores_weights_exactly(sd_studio, two_loras):
    paths, deltas = two_loras
    for name, path in paths.items():
        sd_studio.load_adapter(path, name=name)
    key = next(iter(deltas["a"]))
    base_weight = getattr(sd_studio.pipeline, key[0]).get_submodule(key[1]).get_base_layer().weight
    original = base_weight.detach().clone()
    sd_studio.set_adapters({"a": 0.6, "b": 0.3})
    unfused = render(sd_studio).astype(int)
    sd_studio.fuse()
    torch.testing.assert_close(base_weight, original + 0.6 * deltas["a"][key] + 0.3 * deltas["b"][key], rtol=1e-5, atol=1e-5)
    fused = render(sd_studio).astype(int)
    assert np.abs(fused - unfused).max() <= 2  # uint8 levels: float summation order differs
    sd_studio.set_adapters({"a": 0.1, "b": 0.9})  # changing the blend while fused re-fuses from exact weights
    sd_studio.unfuse()
    assert torch.equal(base_weight, original)


def test_repeated_fuse_cycles_do_not_drift(sd_studio, two_loras):
    paths, deltas = two_loras
    sd_studio.load_adapter(paths["a"], name="a")
    key = next(iter(deltas["a"]))
    base_weight = getattr(sd_studio.pipeline, key[0]).get_submodule(key[1]).get_base_layer().weight
    original = base_weight.detach().clone()
    sd_studio.fuse()
    for weight in (0.3, 0.9, 1.7, 0.2):
        sd_studio.set_adapters({"a": weight})
    torch.testing.assert_close(base_weight, original + 0.2 * deltas["a"][key], rtol=0, atol=1e-6)
    sd_studio.disable_lora()
    assert torch.equal(base_weight, original)


def test_two_threads_each_get_their_own_blend(sd_studio, two_loras):
    paths, _ = two_loras
    for name, path in paths.items():
        sd_studio.load_adapter(path, name=name)
    blends = {"a-heavy": sd_studio.make_blend({"a": 1.0, "b": 0.0}), "b-heavy": sd_studio.make_blend({"a": 0.0, "b": 1.2})}
    solo = {label: np.asarray(sd_studio.generate("a red circle", steps=2, blend=blend)[0]) for label, blend in blends.items()}
    assert not np.array_equal(solo["a-heavy"], solo["b-heavy"])
    results, errors = {label: [] for label in blends}, []

    def worker(label):
        try:
            for _ in range(3):
                image = sd_studio.generate("a red circle", steps=2, blend=blends[label])[0]
                results[label].append(np.asarray(image))
                sd_studio.set_adapters({"a": 0.3, "b": 0.3})  # another user moving sliders meanwhile
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(label,)) for label in blends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for label, images in results.items():
        assert len(images) == 3
        assert all(np.array_equal(image, solo[label]) for image in images)


def test_list_and_delete_adapters(sd_studio, two_loras):
    paths, _ = two_loras
    base_image = render(sd_studio)
    for name, path in paths.items():
        sd_studio.load_adapter(path, name=name, weight=0.5)
    sd_studio.set_adapters({"b": 0.25})
    listed = {info.name: info.weight for info in sd_studio.list_adapters()}
    assert listed == {"a": 0.0, "b": 0.25}
    info = sd_studio.list_adapters()[0]
    assert (info.format, info.family, info.ranks) == ("diffusers", "sd1", [4])
    sd_studio.delete_adapter("a")
    sd_studio.delete_adapter("b")
    assert sd_studio.list_adapters() == []
    assert np.array_equal(render(sd_studio), base_image)


def test_duplicate_name_and_unknown_name_are_refused(sd_studio, two_loras):
    paths, _ = two_loras
    sd_studio.load_adapter(paths["a"], name="a")
    with pytest.raises(StudioError, match="already loaded"):
        sd_studio.load_adapter(paths["b"], name="a")
    with pytest.raises(StudioError, match="no adapter named 'zzz'"):
        sd_studio.set_adapters({"zzz": 1.0})
    with pytest.raises(StudioError, match="unknown component"):
        sd_studio.set_adapters({"a": {"text_encoder_2": 1.0}})


def test_sd1_lora_on_sdxl_is_refused_naming_both_families(tmp_path):
    sd = Studio.from_base("tiny-sd")
    path = tmp_path / "sd1.safetensors"
    make_diffusers_lora(sd.pipeline, path, seed=0)
    xl = Studio.from_base("tiny-sdxl")
    with pytest.raises(StudioError) as error:
        xl.load_adapter(path)
    assert "sd1" in str(error.value) and "sdxl" in str(error.value)
    assert xl.pipeline.get_list_adapters() == {}


def test_shape_mismatch_is_refused_before_anything_is_injected(sd_studio, tmp_path):
    path = tmp_path / "bad.safetensors"
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    save_file({f"unet.{module}.lora_A.weight": torch.ones(4, 48), f"unet.{module}.lora_B.weight": torch.ones(64, 4)}, str(path))
    base_image = render(sd_studio)
    with pytest.raises(StudioError, match="64x64 in the base model but the LoRA is 64x48"):
        sd_studio.load_adapter(path)
    assert sd_studio.pipeline.get_list_adapters() == {}
    assert np.array_equal(render(sd_studio), base_image)


def test_missing_target_module_is_refused(sd_studio, tmp_path):
    path = tmp_path / "bad.safetensors"
    module = "down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_k"
    save_file({f"unet.{module}.lora_A.weight": torch.ones(4, 64), f"unet.{module}.lora_B.weight": torch.ones(64, 4)}, str(path))
    with pytest.raises(StudioError, match="which the base model does not have"):
        sd_studio.load_adapter(path)


def test_bad_size_is_refused(sd_studio):
    with pytest.raises(StudioError, match="width 60 must be a positive multiple of 8"):
        sd_studio.generate("a red circle", width=60)
