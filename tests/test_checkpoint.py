"""Single-file checkpoints: diffusers' own `from_single_file` reads them back bit for bit, in the real LDM layout."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft import LoraConfig
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from studio.checkpoint import ldm_state_dict, open_clip_to_ldm, save_single_file, unet_to_ldm, vae_to_ldm
from studio.errors import StudioError
from studio.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=64,
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    sample_size=128,
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
)


def render(pipeline, seed=0):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipeline("a red circle", num_inference_steps=2, generator=generator, output_type="np").images


def tiny_sd2_pipeline() -> StableDiffusionPipeline:
    """An SD2-style tiny pipeline: linear transformer projections, v-prediction, text encoder saved as OpenCLIP."""
    pipeline = tiny_sd_pipeline()
    torch.manual_seed(5)
    unet = UNet2DConditionModel.from_config(
        {**pipeline.unet.config, "use_linear_projection": True, "attention_head_dim": (2, 4)}
    )
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, prediction_type="v_prediction")
    pipeline = StableDiffusionPipeline(**{**pipeline.components, "unet": unet, "scheduler": scheduler})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def round_trip(pipeline, tmp_path, family=None):
    """Save as one file, then load it with diffusers' own loader, configs from a `save_pretrained` folder."""
    folder = tmp_path / "config"
    pipeline.save_pretrained(folder)
    path = save_single_file(pipeline, tmp_path / "model.safetensors", family=family)
    loaded = type(pipeline).from_single_file(str(path), config=str(folder), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    return path, loaded


def assert_same_weights(original, loaded, names):
    for name in names:
        expected = dict(getattr(original, name).state_dict())
        actual = dict(getattr(loaded, name).state_dict())
        assert actual.keys() == expected.keys(), name
        meta = [key for key, tensor in actual.items() if tensor.is_meta]
        assert not meta, f"{name}: left on meta: {meta[:3]}"
        different = [key for key in expected if not torch.equal(expected[key], actual[key])]
        assert not different, f"{name}: differs: {different[:3]}"


def file_keys(path):
    with safe_open(path, framework="pt") as checkpoint:
        return {key: checkpoint.get_slice(key).get_shape() for key in checkpoint.keys()}


def test_sd1_file_loads_back_bit_exact_in_diffusers(tmp_path):
    pipeline = tiny_sd_pipeline()
    path, loaded = round_trip(pipeline, tmp_path)
    assert_same_weights(pipeline, loaded, ["unet", "vae", "text_encoder"])
    assert np.array_equal(render(pipeline), render(loaded))
    keys = file_keys(path)
    assert "cond_stage_model.transformer.text_model.encoder.layers.4.self_attn.q_proj.weight" in keys
    assert keys["first_stage_model.decoder.mid.attn_1.q.weight"] == [64, 64, 1, 1]  # a 1x1 conv, as in LDM
    assert not list(tmp_path.glob(".model.safetensors.*"))  # no temporary file left behind


def test_sdxl_file_loads_back_bit_exact_in_diffusers(tmp_path):
    pipeline = tiny_sdxl_pipeline()
    path, loaded = round_trip(pipeline, tmp_path)
    assert_same_weights(pipeline, loaded, ["unet", "vae", "text_encoder", "text_encoder_2"])
    assert np.array_equal(render(pipeline), render(loaded))
    keys = file_keys(path)
    prefix = "conditioner.embedders.1.model."
    assert keys[prefix + "transformer.resblocks.4.attn.in_proj_weight"] == [3 * 48, 48]
    assert keys[prefix + "text_projection"] == [48, 32]  # (hidden, projection): transposed from diffusers
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys


def test_sd2_file_uses_open_clip_layout_and_loads_back(tmp_path):
    pipeline = tiny_sd2_pipeline()
    path, loaded = round_trip(pipeline, tmp_path, family="sd2")
    assert_same_weights(pipeline, loaded, ["unet", "vae", "text_encoder"])
    # The prediction type is not in the file: diffusers takes the scheduler from the config folder.
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert np.array_equal(render(pipeline), render(loaded))
    keys = file_keys(path)
    assert "cond_stage_model.model.token_embedding.weight" in keys  # what diffusers detects OpenCLIP by
    assert not any(key.startswith("cond_stage_model.transformer.") for key in keys)


def test_open_clip_in_proj_stacks_q_k_v_and_text_projection_is_transposed():
    encoder = tiny_sdxl_pipeline().text_encoder_2
    layer = encoder.text_model.encoder.layers[2].self_attn
    with torch.no_grad():
        layer.k_proj.bias.normal_()  # biases start at zero: make the slice check meaningful
    state = open_clip_to_ldm(encoder)
    in_proj = state["transformer.resblocks.2.attn.in_proj_weight"]
    assert torch.equal(in_proj[:48], layer.q_proj.weight)
    assert torch.equal(in_proj[48:96], layer.k_proj.weight)
    assert torch.equal(in_proj[96:], layer.v_proj.weight)
    assert torch.equal(state["transformer.resblocks.2.attn.in_proj_bias"][48:96], layer.k_proj.bias)
    assert torch.equal(state["text_projection"], encoder.text_projection.weight.T)
    assert torch.equal(state["positional_embedding"], encoder.text_model.embeddings.position_embedding.weight)
    fc1 = encoder.text_model.encoder.layers[2].mlp.fc1.weight
    assert torch.equal(state["transformer.resblocks.2.mlp.c_fc.weight"], fc1)


def test_real_sd15_unet_and_vae_names_and_shapes():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD_VAE)
    state = unet_to_ldm(unet)
    expected = {
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.in_layers.2.weight": (640, 320, 3, 3),
        "input_blocks.4.0.emb_layers.1.weight": (640, 1280),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.2.in_layers.0.weight": (1280,),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),  # up block without attention: upsampler in slot 1
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),  # with attention: slot 2
        "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "time_embed.0.weight": (1280, 320),
        "out.2.weight": (4, 320, 3, 3),
    }
    assert {key: tuple(state[key].shape) for key in expected} == expected
    assert not any(key.startswith("input_blocks.12") or key.startswith("output_blocks.12") for key in state)

    vae_state = vae_to_ldm(vae)
    expected_vae = {
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.1.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),  # LDM counts decoder blocks from the bottom
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        "decoder.norm_out.weight": (128,),
    }
    assert {key: tuple(vae_state[key].shape) for key in expected_vae} == expected_vae
    assert "decoder.up.0.upsample.conv.weight" not in vae_state


def test_real_sdxl_unet_names_and_shapes():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    state = unet_to_ldm(unet)
    expected = {
        "label_emb.0.0.weight": (1280, 2816),
        "label_emb.0.2.weight": (1280, 1280),
        "input_blocks.4.1.proj_in.weight": (640, 640),  # linear projection, as in the real file
        "input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
        "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    }
    assert {key: tuple(state[key].shape) for key in expected} == expected
    assert "input_blocks.1.1.proj_in.weight" not in state  # the first SDXL block has no attention
    assert not any(key.startswith("input_blocks.9") for key in state)


@pytest.mark.parametrize("config", [SD15_UNET, SDXL_UNET], ids=["sd15", "sdxl"])
def test_diffusers_converter_maps_real_unet_names_back(config):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    ldm = {"model.diffusion_model." + key: tensor for key, tensor in unet_to_ldm(unet).items()}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    original = unet.state_dict()
    assert back.keys() == original.keys()
    assert all(back[key].shape == original[key].shape for key in original)


def test_real_sdxl_open_clip_names_and_shapes():
    config = CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280
    )
    with torch.device("meta"):
        encoder = CLIPTextModelWithProjection(config)
    state = open_clip_to_ldm(encoder)
    expected = {
        "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "transformer.resblocks.31.attn.in_proj_bias": (3840,),
        "transformer.resblocks.9.mlp.c_proj.bias": (1280,),  # diffusers' SDXL detection key
        "transformer.resblocks.0.ln_1.weight": (1280,),
        "transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
        "token_embedding.weight": (49408, 1280),
        "positional_embedding": (77, 1280),
        "ln_final.bias": (1280,),
        "text_projection": (1280, 1280),
    }
    assert {key: tuple(state[key].shape) for key in expected} == expected
    assert not any("q_proj" in key or "self_attn" in key for key in state)


def test_fp16_file_holds_half_precision_copies(tmp_path):
    pipeline = tiny_sd_pipeline()
    path = save_single_file(pipeline, tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(path, framework="pt") as checkpoint:
        conv_in = checkpoint.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert conv_in.dtype == torch.float16
    assert torch.equal(conv_in, pipeline.unet.conv_in.weight.half())


def test_metadata_is_written(tmp_path):
    path = save_single_file(tiny_sd_pipeline(), tmp_path / "m.safetensors", metadata={"modelspec.title": "tiny"})
    with safe_open(path, framework="pt") as checkpoint:
        assert checkpoint.metadata() == {"modelspec.title": "tiny"}


def test_failed_write_leaves_existing_file_untouched(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous")
    with pytest.raises(TypeError):  # safetensors metadata values must be str: fails inside the write
        save_single_file(tiny_sd_pipeline(), path, metadata={"steps": 10})
    assert path.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [path]


def test_attached_lora_layers_are_refused(tmp_path):
    pipeline = tiny_sd_pipeline()
    pipeline.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(StudioError, match=r"x\.safetensors: .*unet still has LoRA layers"):
        save_single_file(pipeline, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_unknown_family_and_wrong_suffix_are_user_errors(tmp_path):
    pipeline = tiny_sd_pipeline()
    with pytest.raises(StudioError, match="family 'sd3'"):
        ldm_state_dict(pipeline, family="sd3")
    with pytest.raises(StudioError, match=r"model\.ckpt: .*\.safetensors"):
        save_single_file(pipeline, tmp_path / "model.ckpt")
