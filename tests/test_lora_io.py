"""`studio.lora_io`: every LoRA format reads into factors whose deltas match the format's own formula,
loads into diffusers as W + delta on the tiny SD1 and SDXL pipelines, converts without loss, and
every bad file gets a one-line error naming it."""

import hashlib
import json

import pytest
import torch
from lora_factories import (
    LOKR_VARIANTS,
    diffusers_lora,
    expected_weight,
    kohya_lora,
    kohya_name,
    layer_input,
    loha_lora,
    lokr_lora,
    reference_output,
    sgm_path,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio.errors import StudioError
from studio.lora_io import check_family, inspect, read_lora, write_lora
from studio.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

BUILDERS = {
    "kohya": lambda pipe, path, family, **kw: kohya_lora(pipe, path, family, **kw),
    "kohya-sgm-names": lambda pipe, path, family, **kw: kohya_lora(
        pipe, path, family, conv=True, unet_naming="sgm", **kw
    ),
    "kohya-fp16": lambda pipe, path, family, **kw: kohya_lora(pipe, path, family, dtype=torch.float16, **kw),
    "locon": lambda pipe, path, family, **kw: kohya_lora(pipe, path, family, conv=True, **kw),
    "locon-tucker": lambda pipe, path, family, **kw: kohya_lora(pipe, path, family, conv=True, tucker=True, **kw),
    "dora": lambda pipe, path, family, **kw: kohya_lora(pipe, path, family, conv=True, dora=True, **kw),
    "diffusers": lambda pipe, path, family, **kw: diffusers_lora(pipe, path, family, **kw),
    "diffusers-transformers4": lambda pipe, path, family, **kw: diffusers_lora(
        pipe, path, family, transformers4_layout=True, **kw
    ),
    "diffusers-adapter-metadata": lambda pipe, path, family, **kw: diffusers_lora(
        pipe, path, family, adapter_metadata=True, **kw
    ),
    "diffusers-dora": lambda pipe, path, family, **kw: diffusers_lora(pipe, path, family, dora=True, conv=True, **kw),
    "loha": lambda pipe, path, family, **kw: loha_lora(pipe, path, family, conv=True, **kw),
    "loha-tucker": lambda pipe, path, family, **kw: loha_lora(pipe, path, family, conv=True, tucker=True, **kw),
    **{
        f"lokr-{variant}": (
            lambda pipe, path, family, variant=variant, **kw: lokr_lora(pipe, path, family, variant, conv=True, **kw)
        )
        for variant in LOKR_VARIANTS
    },
}
FAMILIES = ("sd1", "sdxl")
CASES = [(name, family) for name in BUILDERS for family in FAMILIES]
# Loaded into the pipelines: each kind of factor the reader makes (baked kohya scales, convolutions,
# DoRA in both namings, diffusers metadata scales, Khatri-Rao, Kronecker, full-rank pairs, Tucker cores).
# Every case is checked as factors above; loading is what costs time.
LOADED = [
    "kohya",
    "dora",
    "diffusers-adapter-metadata",
    "diffusers-dora",
    "loha-tucker",
    "lokr-both_full",
    "lokr-tucker",
]


@pytest.fixture(scope="module")
def pipes():
    return {"sd1": tiny_sd_pipeline(0), "sdxl": tiny_sdxl_pipeline(0)}


@pytest.fixture(scope="module")
def built(pipes, tmp_path_factory):
    """Build each (format, family) file once per module, on demand; `distinct`: one layer of each kind."""
    cache = {}

    def build(name, family, distinct=False):
        if (name, family, distinct) not in cache:
            path = tmp_path_factory.mktemp("loras") / f"{name}-{family}{'-distinct' * distinct}.safetensors"
            cache[name, family, distinct] = BUILDERS[name](pipes[family], path, family, distinct=distinct)
        return cache[name, family, distinct]

    return build


def product(lora, key):
    down = lora.state_dict[f"{key}.lora_A.weight"].double()
    up = lora.state_dict[f"{key}.lora_B.weight"].double()
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def assert_deltas_equal(lora, expected, magnitudes=None, rtol=1e-5):
    """Every module's B @ A equals the expected delta, relative to the delta's largest entry."""
    modules = {key.rsplit(".lora_", 1)[0] for key in lora.state_dict}
    assert modules == set(expected)
    for key, delta in expected.items():
        error = (product(lora, key).float().reshape(delta.shape) - delta).abs().max()
        assert error <= rtol * delta.abs().max(), f"{key}: off by {error:.3g}"
    for key, magnitude in (magnitudes or {}).items():
        torch.testing.assert_close(
            lora.state_dict[f"{key}.lora_magnitude_vector.weight"].float().reshape(-1), magnitude
        )


def layer_output_and_reference(pipe, adapter_name, key, delta, magnitude=None):
    """(what the layer computes with only `adapter_name` active, what W + delta or DoRA's W' computes)."""
    component, module = key.split(".", 1)
    layer = getattr(pipe, component).get_submodule(module)
    layer.set_adapter(adapter_name)
    weight = expected_weight(layer.base_layer.weight.detach(), delta, magnitude)
    x = layer_input(layer)
    with torch.no_grad():
        return layer(x), reference_output(layer, x, weight)


def assert_layers_compute(pipe, adapter_name, expected, magnitudes=None):
    """Every layer computes W + delta, with scale 1 (the scales are baked into the factors)."""
    for key, delta in expected.items():
        got, want = layer_output_and_reference(pipe, adapter_name, key, delta, (magnitudes or {}).get(key))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=key)
        component, module = key.split(".", 1)
        assert getattr(pipe, component).get_submodule(module).scaling[adapter_name] == 1.0, key


# ---------------------------------------------------------------------------------------------------
# Every format


@pytest.mark.parametrize(("name", "family"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_each_format_reads_into_factors_with_the_formats_own_deltas(built, name, family):
    lora_file = built(name, family)
    lora = read_lora(lora_file.path)
    assert (lora.format, lora.family, lora.unmapped_keys) == (lora_file.format, family, [])
    assert sorted(lora.components) == lora_file.components
    assert set(lora.ranks) == lora_file.ranks
    assert set(lora.alphas) == lora_file.alphas
    assert_deltas_equal(lora, lora_file.deltas, lora_file.magnitudes, rtol=2e-3 if "fp16" in name else 1e-5)


@pytest.mark.parametrize(
    ("name", "family"), [(n, f) for n in LOADED for f in FAMILIES], ids=[f"{n}-{f}" for n in LOADED for f in FAMILIES]
)
def test_each_format_loads_into_diffusers_as_weight_plus_delta(pipes, built, name, family):
    lora_file = built(name, family, distinct=True)
    pipe = pipes[family]
    adapter = name.replace("-", "_")
    pipe.load_lora_weights(read_lora(lora_file.path).state_dict, adapter_name=adapter)
    try:
        assert_layers_compute(pipe, adapter, lora_file.deltas, lora_file.magnitudes)
    finally:
        pipe.delete_adapters(adapter)


def test_loha_wider_than_the_layer_becomes_an_exact_full_rank_pair(built):
    lora = read_lora(built("loha", "sd1").path)
    wide = [m for m in lora.modules if m.component == "text_encoder" and m.rank == 6]
    assert wide, "the factory gives some text-encoder modules rank 6 (6 * 6 = 36 > 32 channels)"
    for module in wide:
        assert module.converted_rank == 32
        assert lora.state_dict[f"text_encoder.{module.module}.lora_A.weight"].shape[0] == 32


def test_text_encoder_keys_follow_the_installed_transformers_layout(built):
    config = CLIPTextConfig(
        hidden_size=8,
        intermediate_size=8,
        num_attention_heads=1,
        num_hidden_layers=5,
        vocab_size=8,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    with torch.device("meta"):
        installed = {
            "text_encoder": {n for n, _ in CLIPTextModel(config).named_modules()},
            "text_encoder_2": {n for n, _ in CLIPTextModelWithProjection(config).named_modules()},
        }
    for name in ("kohya", "diffusers-transformers4"):
        lora = read_lora(built(name, "sdxl").path)
        text_modules = [m for m in lora.modules if m.component != "unet"]
        assert {m.component for m in text_modules} == {"text_encoder", "text_encoder_2"}
        for module in text_modules:
            assert module.module in installed[module.component], module.module


# ---------------------------------------------------------------------------------------------------
# diffusers' own loader: the known breakage, and the files we write


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_diffusers_cannot_load_kohya_text_encoder_attention_known_breakage(tmp_path, family):
    """diffusers 0.42 + transformers 5 cannot tell what kohya text-encoder keys are when they hold no
    out_proj/MLP layers, and leaves the UNet half-loaded; read_lora reads the same file exactly.
    If this starts failing, diffusers fixed its kohya conversion: the workaround may then go."""
    pipe = tiny_sd_pipeline(1) if family == "sd1" else tiny_sdxl_pipeline(1)  # left half-loaded: not shared
    lora_file = kohya_lora(pipe, tmp_path / "full.safetensors", family)
    kept = {
        k: v for k, v in load_file(lora_file.path).items() if k.startswith("lora_unet_") or "_self_attn_q_proj." in k
    }
    path = tmp_path / "attention.safetensors"
    save_file(kept, str(path))
    with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
        pipe.load_lora_weights(str(path), adapter_name="plain")
    names = {key.split(".")[0] for key in kept}
    assert_deltas_equal(
        read_lora(path), {k: d for k, d in lora_file.deltas.items() if lora_file.kohya_names[k] in names}
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_diffusers_mis_scales_kohya_files_with_per_module_alphas_known_breakage(pipes, built, family):
    """diffusers 0.42 turns per-module kohya alphas into peft alpha_pattern keys that match no module
    (`...processor.to_q_lora.down.weight`, `text_model...self_attn`), so those modules silently get
    the most common alpha. Dynamic-rank (resized) LoRAs and LoCon files with a conv_alpha are like this.
    If this starts failing, diffusers fixed it."""
    lora_file = built("kohya", family, distinct=True)  # alphas rank/2, 1 and absent in turn
    pipe = pipes[family]
    pipe.load_lora_weights(str(lora_file.path), adapter_name="plain")
    try:
        wrong = set()
        for key, delta in lora_file.deltas.items():
            got, want = layer_output_and_reference(pipe, "plain", key, delta)
            if not torch.allclose(got, want, atol=2e-5, rtol=1e-4):
                wrong.add(key.split(".", 1)[0])
        assert wrong == {"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())
    finally:
        pipe.delete_adapters("plain")


def test_plain_diffusers_loses_dora_magnitudes_known_breakage(pipes, built):
    """diffusers drops kohya `dora_scale` keys (with a warning), and transformers 5's text-encoder
    loader ignores peft's bare `lora_magnitude_vector` keys; read_lora's `.weight` keys load everywhere.
    If this starts failing, diffusers/transformers fixed it."""
    pipe = pipes["sd1"]
    for name, wrong_components in (("dora", {"unet", "text_encoder"}), ("diffusers-dora", {"text_encoder"})):
        lora_file = built(name, "sd1", distinct=True)
        pipe.load_lora_weights(str(lora_file.path), adapter_name="plain")
        try:
            wrong = set()
            for key, delta in lora_file.deltas.items():
                got, want = layer_output_and_reference(pipe, "plain", key, delta, lora_file.magnitudes[key])
                if not torch.allclose(got, want, atol=2e-5, rtol=1e-4):
                    wrong.add(key.split(".", 1)[0])
            assert wrong == wrong_components, name
        finally:
            pipe.delete_adapters("plain")


@pytest.mark.parametrize("family", FAMILIES)
def test_written_diffusers_file_loads_with_plain_diffusers(pipes, built, tmp_path, family):
    lora_file = built("dora", family, distinct=True)  # kohya LoCon + DoRA, text encoders included
    written = write_lora(
        tmp_path / "out.safetensors", read_lora(lora_file.path).state_dict, naming="diffusers", family=family
    )
    pipe = pipes[family]
    pipe.load_lora_weights(str(written), adapter_name="written")
    try:
        assert_layers_compute(pipe, "written", lora_file.deltas, lora_file.magnitudes)
    finally:
        pipe.delete_adapters("written")


# ---------------------------------------------------------------------------------------------------
# Conversion and names


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_to_kohya_to_diffusers_keeps_every_delta(built, tmp_path, family):
    lora_file = built("diffusers-dora", family)  # convolutions, DoRA and text encoders
    first = read_lora(lora_file.path)
    kohya = read_lora(
        write_lora(tmp_path / "k.safetensors", first.state_dict, first.metadata, naming="kohya", family=family)
    )
    back = read_lora(
        write_lora(tmp_path / "d.safetensors", kohya.state_dict, kohya.metadata, naming="diffusers", family=family)
    )
    assert (kohya.naming, kohya.format, kohya.family) == ("kohya", "dora", family)
    assert (back.naming, back.format, back.family) == ("diffusers", "dora", family)
    assert_deltas_equal(back, lora_file.deltas, lora_file.magnitudes)


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_writer_uses_the_names_kohya_uses(built, tmp_path, family):
    lora_file = built("locon", family)
    lora = read_lora(lora_file.path)
    written = write_lora(tmp_path / "k.safetensors", lora.state_dict, naming="kohya", family=family)
    with open(written, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    names = {key.split(".")[0] for key in header if key != "__metadata__"}
    assert names == set(lora_file.kohya_names.values())
    assert header["__metadata__"]["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]


def real_unet_layers(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return [name for name, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


SDXL_UNET = dict(  # noqa: C408 (config keyword names, as diffusers spells them)
    sample_size=128,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD1_UNET = dict(  # noqa: C408
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


@pytest.mark.parametrize(("family", "config"), [("sd1", SD1_UNET), ("sdxl", SDXL_UNET)])
def test_every_layer_of_the_real_unet_round_trips_through_kohya_names(tmp_path, family, config):
    layers = real_unet_layers(config)
    state_dict = {}
    for layer in layers:  # names are all that matter here: rank-1 factors of made-up width
        state_dict[f"unet.{layer}.lora_A.weight"] = torch.ones(1, 2)
        state_dict[f"unet.{layer}.lora_B.weight"] = torch.ones(2, 1)
    written = write_lora(tmp_path / "names.safetensors", state_dict, naming="kohya", family=family)
    with open(written, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    unet_naming = "sgm" if family == "sdxl" else "diffusers"
    assert {k.split(".")[0] for k in header if k != "__metadata__"} == {
        kohya_name(f"unet.{layer}", family, unet_naming) for layer in layers
    }
    assert {m.module for m in read_lora(written).modules} == set(layers)


def test_known_community_names_map_to_diffusers_modules(tmp_path):
    expected = {  # kohya UNet names (after "lora_unet_") -> diffusers module
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_8_1_transformer_blocks_9_ff_net_0_proj": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
        "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",  # SD1 in sgm names: no attention there
        "output_blocks_5_0_skip_connection": "up_blocks.1.resnets.2.conv_shortcut",
        "output_blocks_4_1_transformer_blocks_1_attn2_to_out_0": "up_blocks.1.attentions.1.transformer_blocks.1.attn2.to_out.0",
        "label_emb_0_0": "add_embedding.linear_1",
        "time_embed_2": "time_embedding.linear_2",
        "input_blocks_0_0": "conv_in",
        "out_2": "conv_out",
        "down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k": "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
        "up_blocks_3_resnets_2_time_emb_proj": "up_blocks.3.resnets.2.time_emb_proj",
    }
    for name, module in expected.items():
        path = tmp_path / f"{name}.safetensors"
        tensors = {
            f"lora_unet_{name}.lora_down.weight": torch.ones(1, 2),
            f"lora_unet_{name}.lora_up.weight": torch.ones(2, 1),
        }
        save_file(tensors, str(path))
        assert read_lora(path).modules[0].module == module, name


def test_sgm_naming_helper_agrees_with_the_known_sdxl_names():
    assert (
        sgm_path("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        == "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    )
    assert sgm_path("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"
    assert sgm_path("mid_block.resnets.1.time_emb_proj") == "middle_block.2.emb_layers.1"


# ---------------------------------------------------------------------------------------------------
# Family


def one_module_file(tmp_path, name, in_features, out_features=4):
    path = tmp_path / f"{name}-{in_features}.safetensors"
    save_file(
        {f"{name}.lora_down.weight": torch.ones(1, in_features), f"{name}.lora_up.weight": torch.ones(out_features, 1)},
        str(path),
    )
    return path


@pytest.mark.parametrize(
    ("name", "width", "family"),
    [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, "sd1"),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 1024, "sd2"),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v", 2048, "sdxl"),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, "sd1"),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, "sd2"),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, "sdxl"),
        ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, "sdxl"),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q", 64, "sdxl"),  # 2nd transformer block
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 64, "sd1"),  # tiny, says nothing
    ],
)
def test_family_comes_from_widths_and_structure(tmp_path, name, width, family):
    assert read_lora(one_module_file(tmp_path, name, width)).family == family


def test_family_falls_back_to_training_metadata(tmp_path):
    path = tmp_path / "meta.safetensors"
    name = "lora_unet_down_blocks_1_attentions_0_proj_in"
    save_file(
        {f"{name}.lora_down.weight": torch.ones(1, 8), f"{name}.lora_up.weight": torch.ones(8, 1)},
        str(path),
        {"ss_base_model_version": "sdxl_base_v1-0"},
    )
    assert read_lora(path).family == "sdxl"


def test_check_family_names_both_families(built):
    lora = read_lora(built("kohya", "sd1").path)
    check_family(lora, "sd1")
    with pytest.raises(StudioError, match=r"kohya-sd1\.safetensors.*Stable Diffusion 1\.x.*Stable Diffusion XL"):
        check_family(lora, "sdxl")


# ---------------------------------------------------------------------------------------------------
# inspect


def test_inspect_reports_format_family_ranks_hashes_and_metadata(built):
    lora_file = built("kohya", "sdxl")
    report = inspect(lora_file.path)
    data = lora_file.path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert (report.format, report.naming, report.family) == ("kohya", "kohya", "sdxl")
    assert report.components == {
        c: sum(k.startswith(c + ".") for k in lora_file.deltas) for c in ("unet", "text_encoder", "text_encoder_2")
    }
    assert report.num_modules == len(lora_file.deltas)
    assert set(report.ranks) == lora_file.ranks and set(report.alphas) == lora_file.alphas
    assert report.size_bytes == len(data)
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert report.autov2 == report.sha256[:10]
    assert report.a1111_hash == hashlib.sha256(data[header_end:]).hexdigest()[:12]
    assert report.trigger_words == ["sks shape", "striped", "purple star"]  # ss_tag_frequency, most frequent first
    assert report.training_metadata["ss_network_module"] == "networks.lora"
    assert report.unmapped_keys == []


@pytest.mark.parametrize(
    "ours", [json.dumps(["sks", "outlined"]), "sks, outlined"]
)  # JSON list, or as the trainer writes
def test_inspect_prefers_declared_trigger_words(pipes, tmp_path, ours):
    metadata = {"studio.trigger_words": ours, "modelspec.trigger_phrase": "purple star"}
    lora_file = kohya_lora(pipes["sd1"], tmp_path / "t.safetensors", "sd1", metadata=metadata, distinct=True)
    assert inspect(lora_file.path).trigger_words == ["sks", "outlined", "purple star"]


def test_keys_that_cannot_be_placed_are_listed_not_loaded(pipes, tmp_path):
    lora_file = kohya_lora(pipes["sd1"], tmp_path / "base.safetensors", "sd1")
    tensors = load_file(lora_file.path)
    tensors["lora_unet_down_blocks_1_attentions_0_norm.diff"] = torch.ones(64)
    tensors["bundle_emb.sks.string_to_param.*"] = torch.ones(1, 32)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, str(path))
    lora = read_lora(path)
    assert lora.unmapped_keys == ["bundle_emb.sks.string_to_param.*", "lora_unet_down_blocks_1_attentions_0_norm.diff"]
    assert inspect(path).unmapped_keys == lora.unmapped_keys
    assert_deltas_equal(lora, lora_file.deltas)


# ---------------------------------------------------------------------------------------------------
# Bad files


def assert_one_line_error(path, match, **kwargs):
    with pytest.raises(StudioError, match=match) as error:
        read_lora(path, **kwargs)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def kohya_module(rank_down=2, rank_up=2, value=1.0):
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    return {
        f"{name}.lora_down.weight": torch.full((rank_down, 64), value),
        f"{name}.lora_up.weight": torch.full((64, rank_up), value),
    }


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my favourite prompts, not weights")
    assert_one_line_error(path, "not a safetensors file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert_one_line_error(path, "not a safetensors file")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(kohya_module(), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    assert_one_line_error(path, "truncated")


def test_corrupt_header(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    save_file(kohya_module(), str(path))
    data = bytearray(path.read_bytes())
    data[8:12] = b"@@@@"  # the JSON header no longer parses
    path.write_bytes(bytes(data))
    assert_one_line_error(path, "header is corrupt")


def test_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "nowhere.safetensors", "no such file")


def test_file_without_lora_keys(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 2)}, str(path))
    assert_one_line_error(path, "no LoRA keys")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors(tmp_path, value):
    path = tmp_path / "nan.safetensors"
    save_file(kohya_module(value=value), str(path))
    assert_one_line_error(path, "NaN or Inf")


def test_ranks_of_down_and_up_differ(tmp_path):
    path = tmp_path / "mismatch.safetensors"
    save_file(kohya_module(rank_down=4, rank_up=3), str(path))
    assert_one_line_error(path, "shape mismatch")


def test_loha_halves_of_different_shapes(tmp_path):
    path = tmp_path / "loha.safetensors"
    name = "lora_unet_down_blocks_1_attentions_0_proj_in"
    save_file(
        {
            f"{name}.hada_w1_a": torch.ones(8, 2),
            f"{name}.hada_w1_b": torch.ones(2, 8),
            f"{name}.hada_w2_a": torch.ones(8, 2),
            f"{name}.hada_w2_b": torch.ones(2, 6),
        },
        str(path),
    )
    assert_one_line_error(path, "shape mismatch")


def test_module_without_its_up_factor(tmp_path):
    path = tmp_path / "half.safetensors"
    tensors = kohya_module()
    tensors.pop(next(k for k in tensors if "lora_up" in k))
    save_file(tensors, str(path))
    assert_one_line_error(path, "no up")


def test_dora_normalised_per_input_column_is_refused(tmp_path):
    path = tmp_path / "dora-in.safetensors"
    tensors = kohya_module()
    tensors["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale"] = torch.ones(1, 64)
    save_file(tensors, str(path))
    assert_one_line_error(path, "per input column")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_files_are_refused_by_default(tmp_path, suffix):
    path = tmp_path / f"old{suffix}"
    torch.save(kohya_module(), path)
    assert_one_line_error(path, "pickle")


def test_pickle_file_is_read_when_allowed(pipes, tmp_path):
    lora_file = kohya_lora(pipes["sd1"], tmp_path / "k.safetensors", "sd1")
    path = tmp_path / "k.ckpt"
    torch.save({"state_dict": load_file(lora_file.path)}, path)
    assert_deltas_equal(read_lora(path, allow_pickle=True), lora_file.deltas)


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    from fractions import Fraction

    path = tmp_path / "evil.pt"
    torch.save({"payload": Fraction(1, 3), **kohya_module()}, path)
    assert_one_line_error(path, "weights-only", allow_pickle=True)


# ---------------------------------------------------------------------------------------------------
# Writing


def test_write_is_atomic_and_leaves_no_half_file(tmp_path):
    path = tmp_path / "out.safetensors"
    good = {"unet.conv_in.lora_A.weight": torch.ones(1, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.ones(8, 1, 1, 1)}
    write_lora(path, good)
    before = path.read_bytes()
    unsaveable = {
        "unet.conv_in.lora_A.weight": torch.ones(1, 4, 3, 3, device="meta"),
        "unet.conv_in.lora_B.weight": torch.ones(8, 1, 1, 1),
    }
    with pytest.raises(NotImplementedError):  # safetensors cannot copy a meta tensor out
        write_lora(path, unsaveable)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_write_refuses_other_formats_and_bad_state_dicts(tmp_path):
    good = {"unet.conv_in.lora_A.weight": torch.ones(1, 4), "unet.conv_in.lora_B.weight": torch.ones(8, 1)}
    with pytest.raises(StudioError, match="safetensors only"):
        write_lora(tmp_path / "out.ckpt", good)
    with pytest.raises(StudioError, match="shape mismatch"):
        write_lora(tmp_path / "out.safetensors", {**good, "unet.conv_in.lora_B.weight": torch.ones(8, 2)})
    with pytest.raises(StudioError, match="needs both"):
        write_lora(tmp_path / "out.safetensors", {"unet.conv_in.lora_A.weight": torch.ones(1, 4)})
    assert list(tmp_path.iterdir()) == []


def test_written_metadata_is_kept_and_stale_diffusers_scales_dropped(built, tmp_path):
    lora = read_lora(built("diffusers-adapter-metadata", "sd1").path)
    assert "lora_adapter_metadata" in lora.metadata
    metadata = {**lora.metadata, "studio.trigger_words": json.dumps(["sks"])}
    written = read_lora(write_lora(tmp_path / "w.safetensors", lora.state_dict, metadata))
    assert "lora_adapter_metadata" not in written.metadata
    assert written.trigger_words == ["sks"]
    assert_deltas_equal(written, built("diffusers-adapter-metadata", "sd1").deltas)


def test_reading_never_modifies_the_file(built):
    lora_file = built("kohya", "sd1")
    before = lora_file.path.read_bytes()
    read_lora(lora_file.path)  # scales are baked in place into the loaded copies
    assert lora_file.path.read_bytes() == before
