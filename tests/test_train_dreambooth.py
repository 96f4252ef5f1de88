"""The DreamBooth LoRA trainer, end to end on the tiny SD and SDXL pipelines (a few steps each).

Every LoRA it writes is checked from the outside: loaded by plain diffusers into a fresh pipeline, its
deltas recomputed from the raw tensors, images compared with the base model's.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image
from ports import free_port
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio import demo_world
from studio.base import load_base
from studio.checkpoint import ldm_state_dict, save_single_file
from studio.errors import StudioError
from studio.lora_io import read_lora
from studio.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline
from studio.train_config import TrainConfig
from studio.train_dreambooth import (
    LORA_FILE,
    RUN_FILE,
    LossSettings,
    StepPlan,
    apply_max_norm,
    build_optimizer,
    check_output_dir,
    denoising_target,
    diffusion_loss,
    list_checkpoints,
    main,
    plan_steps,
    read_initial_lora,
    remove_checkpoint,
    settings_to_train_further,
    train,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a sks shape"
ALL_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
BLOCK_TARGETS = ALL_ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def draw_images(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Purple stars (what the demo model never saw), one per (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (width, height) in enumerate(sizes):
        image = demo_world.draw_shape("purple", "star", size_px=max(width, height), rng=i)
        image.crop((0, 0, width, height)).save(folder / f"star-{i}.png")
    return folder


def options(tmp: Path, **overrides) -> TrainConfig:
    values = dict(
        base="tiny-sd",
        instance_dir=tmp / "images",
        instance_prompt=PROMPT,
        output_dir=tmp / "out",
        max_train_steps=2,
        report_to="none",
    )
    values.update(overrides)
    return TrainConfig(**values)


def lora_metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as handle:
        return handle.metadata()


def targeted(module: torch.nn.Module, targets: list[str]) -> set[str]:
    return {n for n, _ in module.named_modules() if any(n == t or n.endswith("." + t) for t in targets)}


def adapted(module: torch.nn.Module) -> set[str]:
    """Modules diffusers/peft put a LoRA on (peft renames the wrapped layer `base_layer`)."""
    return {n for n, m in module.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}


def images(pipe, prompt: str = PROMPT, seed: int = 0) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np").images


# ---- one SD1 run shared by several tests: all attention projections and the text encoder, kohya export ----


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    draw_images(tmp / "images", [(64, 64), (64, 64)])
    base = load_base("tiny-sd", device="cpu")
    before = {
        name: {k: v.clone() for k, v in module.state_dict().items()}
        for name, module in (("unet", base.pipeline.unet), ("text_encoder", base.pipeline.text_encoder))
    }
    config = options(
        tmp,
        max_train_steps=30,
        learning_rate=1e-2,
        unet_targets=BLOCK_TARGETS,  # attention alone barely moves a random tiny UNet in 30 steps
        train_text_encoder=True,
        text_encoder_lr=1e-3,
        export_kohya=True,
    )
    result = train(config, base=base)
    return SimpleNamespace(tmp=tmp, config=config, base=base, before=before, result=result)


def test_only_lora_tensors_change_and_base_weights_stay_bit_identical(sd_run):
    modules = {"unet": sd_run.base.pipeline.unet, "text_encoder": sd_run.base.pipeline.text_encoder}
    for name, module in modules.items():
        after = module.state_dict()
        lora_keys = [k for k in after if "lora_" in k]
        base_keys = [k for k in after if "lora_" not in k]
        assert lora_keys, name
        assert {k.replace("base_layer.", "") for k in base_keys} == set(sd_run.before[name])
        for key in base_keys:
            assert torch.equal(after[key].cpu(), sd_run.before[name][key.replace("base_layer.", "")]), key
        trained_up = [after[k] for k in lora_keys if "lora_B" in k]
        assert all(t.abs().max() > 0 for t in trained_up)  # B starts at zero: every module learned something


def fixed_batch_loss(pipe, image_folder: Path) -> float:
    """The denoising loss on one fixed batch: both training images, fixed noise and timesteps."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.stack([
        torch.from_numpy(np.asarray(demo_world.draw_shape("purple", "star", size_px=64, rng=i), dtype=np.float32))
        .permute(2, 0, 1) / 127.5 - 1
        for i in range(2)
    ])  # fmt: skip
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        latents = latents.repeat(4, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.tensor([100, 100, 300, 300, 500, 500, 800, 800])
        embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0].repeat(8, 1, 1)
        prediction = pipe.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, embeds).sample
    return torch.nn.functional.mse_loss(prediction, noise).item()


def test_loss_goes_down_on_a_fixed_batch(sd_run):
    pipe = tiny_sd_pipeline()
    before = fixed_batch_loss(pipe, sd_run.tmp / "images")
    pipe.load_lora_weights(sd_run.config.output_dir)
    after = fixed_batch_loss(pipe, sd_run.tmp / "images")
    assert after < 0.9 * before


def test_output_loads_in_plain_diffusers_changes_images_and_disable_restores_base(sd_run):
    pipe = tiny_sd_pipeline()
    base_images = images(pipe)
    pipe.load_lora_weights(sd_run.config.output_dir)  # a folder, as users of diffusers' scripts do
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"}
    assert adapted(pipe.unet) == targeted(tiny_sd_pipeline().unet, BLOCK_TARGETS)  # no module silently skipped
    assert adapted(pipe.text_encoder) == targeted(tiny_sd_pipeline().text_encoder, TEXT_TARGETS)
    lora_images = images(pipe)
    assert np.abs(lora_images - base_images).max() > 1e-3
    pipe.disable_lora()
    assert np.array_equal(images(pipe), base_images)


def test_metadata_describes_the_training(sd_run):
    metadata = lora_metadata(sd_run.result.lora_path)
    assert not [value for value in metadata.values() if str(sd_run.tmp) in value]  # folders by name only
    assert json.loads(metadata["studio.train_config"])["instance_dir"] == "images"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == "out" and metadata["modelspec.resolution"] == "64x64"
    assert metadata["modelspec.prediction_type"] == "epsilon" and metadata["modelspec.trigger_phrase"] == PROMPT
    assert datetime.fromisoformat(metadata["modelspec.date"]).tzinfo is not None
    assert "ss_training_comment" not in metadata and "modelspec.author" not in metadata
    assert metadata["studio.family"] == "sd1"
    assert metadata["studio.base_model"] == "tiny-sd"
    assert metadata["studio.trigger_words"] == PROMPT
    assert json.loads(metadata["ss_tag_frequency"]) == {"images": {PROMPT: 2}}  # two images, no caption files
    assert metadata["studio.steps"] == "30" == metadata["ss_steps"]
    assert metadata["studio.unet_targets"] == ",".join(BLOCK_TARGETS)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4.0"
    assert metadata["ss_resolution"] == "(64, 64)"  # tiny SD's native size
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert json.loads(metadata["studio.train_config"])["learning_rate"] == 1e-2
    adapter_settings = json.loads(metadata["lora_adapter_metadata"])  # diffusers' own peft-config record
    assert adapter_settings["unet.r"] == 4 and adapter_settings["text_encoder.r"] == 4
    assert json.loads((sd_run.config.output_dir / RUN_FILE).read_text())["max_train_steps"] == 30


def diffusers_deltas(path: Path) -> dict[str, torch.Tensor]:
    """scale * B @ A per module of a diffusers/peft-named file, keyed by component and module path."""
    tensors = load_file(path)
    settings = json.loads(lora_metadata(path)["lora_adapter_metadata"])
    deltas = {}
    for key, down in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            component = module.split(".")[0]
            scale = settings[f"{component}.lora_alpha"] / settings[f"{component}.r"]
            up = tensors[f"{module}.lora_B.weight"]
            deltas[module] = scale * up.flatten(1) @ down.flatten(1)  # convolutions too
    return deltas


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_init_from_starts_the_new_lora_at_the_files_deltas(sd_run, tmp_path, kind):
    """At a vanishing learning rate one step moves nothing: the saved LoRA is where it started. With
    --alpha 2 at rank 4 (scale 0.5, the file's is 1) its factors differ, its deltas must not."""
    source = sd_run.result.lora_path if kind == "diffusers" else sd_run.result.kohya_path
    result = train(options(
        sd_run.tmp, output_dir=tmp_path / "out", init_from=source, unet_targets=BLOCK_TARGETS, train_text_encoder=True,
        alpha=2, learning_rate=1e-12, text_encoder_lr=1e-12, max_train_steps=1,
    ))  # fmt: skip
    expected, started = diffusers_deltas(sd_run.result.lora_path), diffusers_deltas(result.lora_path)
    assert started.keys() == expected.keys()
    for module, delta in expected.items():
        torch.testing.assert_close(started[module], delta, rtol=1e-5, atol=1e-7, msg=module)
    assert json.loads(lora_metadata(result.lora_path)["lora_adapter_metadata"])["unet.lora_alpha"] == 2


def test_init_from_at_a_higher_clip_skip_leaves_out_the_unused_text_encoder_layer(sd_run, tmp_path, caplog):
    result = train(options(
        sd_run.tmp, output_dir=tmp_path / "out", init_from=sd_run.result.lora_path, unet_targets=BLOCK_TARGETS,
        train_text_encoder=True, clip_skip=2, learning_rate=1e-12, text_encoder_lr=1e-12, max_train_steps=1,
    ))  # fmt: skip
    assert "leaving out 4 text-encoder layer(s)" in caplog.text  # q, k, v, out_proj of the last layer
    expected, started = diffusers_deltas(sd_run.result.lora_path), diffusers_deltas(result.lora_path)
    last_layer = f".layers.{tiny_sd_pipeline().text_encoder.config.num_hidden_layers - 1}."
    assert started.keys() == {module for module in expected if last_layer not in module}
    for module, delta in started.items():
        torch.testing.assert_close(delta, expected[module], rtol=1e-5, atol=1e-7, msg=module)


def test_a_run_started_from_a_lora_resumes_without_that_file(sd_run, tmp_path):
    start = tmp_path / "start.safetensors"
    start.write_bytes(sd_run.result.lora_path.read_bytes())
    run = dict(output_dir=tmp_path / "out", init_from=start, unet_targets=BLOCK_TARGETS, train_text_encoder=True,
               checkpointing_steps=1)  # fmt: skip
    train(options(sd_run.tmp, max_train_steps=2, **run))
    start.unlink()  # the checkpoint holds the weights now
    result = train(options(sd_run.tmp, max_train_steps=3, resume_from_checkpoint="latest", **run))
    assert result.steps == 3


def test_init_from_a_dora_lora_starts_at_its_magnitudes_too(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    first = train(options(tmp_path, output_dir=tmp_path / "first", dora=True, learning_rate=1e-2, max_train_steps=3))
    again = train(options(tmp_path, output_dir=tmp_path / "again", dora=True, init_from=first.lora_path, alpha=2,
                          learning_rate=1e-12, max_train_steps=1))  # fmt: skip
    expected, started = load_file(first.lora_path), load_file(again.lora_path)
    magnitudes = [key for key in expected if "lora_magnitude_vector" in key]
    assert magnitudes and started.keys() == expected.keys()
    for key in magnitudes:
        torch.testing.assert_close(started[key], expected[key], rtol=1e-6, atol=1e-7)
    full_scale, half_scale = diffusers_deltas(first.lora_path), diffusers_deltas(again.lora_path)
    for module, delta in full_scale.items():
        torch.testing.assert_close(half_scale[module], delta, rtol=1e-5, atol=1e-7, msg=module)


def test_init_from_mismatches_are_one_line_errors_before_any_model_loads(sd_run, tmp_path, capsys, no_model_loading):
    common = ["--instance-dir", str(sd_run.tmp / "images"), "--instance-prompt", PROMPT, "--base", "tiny-sd",
              "--output-dir", str(tmp_path / "out"), "--init-from", str(sd_run.result.kohya_path)]  # fmt: skip
    cases = {
        "rank 4, pass --rank 4": ["--rank", "8", "--train-text-encoder"],
        "adapts the text encoder too; add --train-text-encoder": [],
        "is plain LoRA: leave out --dora": ["--train-text-encoder", "--dora"],
        "adapts layers outside the targets; pass --unet-targets to_q,to_k,to_v,to_out.0,proj_in,proj_out,"
        "ff.net.0.proj,ff.net.2,conv1,conv2": ["--train-text-encoder", "--unet-targets", ",".join(ALL_ATTENTION)],
        "pass --text-encoder-targets q_proj,k_proj,v_proj,out_proj": [
            "--train-text-encoder", "--unet-targets", ",".join(BLOCK_TARGETS), "--text-encoder-targets", "q_proj,k_proj"
        ],
    }
    for expected, flags in cases.items():
        assert main(common + flags) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"error: {sd_run.result.kohya_path}: ") and expected in error and "\n" not in error
    assert main(common[:-1] + [str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_settings_to_train_further_are_the_ones_init_from_accepts(sd_run, tmp_path):
    for path in (sd_run.result.lora_path, sd_run.result.kohya_path):
        settings = settings_to_train_further(read_lora(path))
        assert settings == {"rank": sd_run.config.rank, "dora": False, "unet_targets": BLOCK_TARGETS,
                            "text_encoder_targets": TEXT_TARGETS, "train_text_encoder": True}  # fmt: skip
        assert read_initial_lora(options(sd_run.tmp, init_from=path, **settings)).path == path
    mixed = tmp_path / "mixed.safetensors"
    modules = ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", "text_encoder.encoder.layers.0.mlp.fc1"]
    save_file({f"{modules[0]}.lora_A.weight": torch.zeros(4, 64), f"{modules[0]}.lora_B.weight": torch.zeros(64, 4),
               f"{modules[1]}.lora_A.weight": torch.zeros(2, 32), f"{modules[1]}.lora_B.weight": torch.zeros(37, 2)},
              mixed)  # fmt: skip
    with pytest.raises(StudioError, match=r"mixed.safetensors: its layers have ranks 2, 4, and one rank cannot hold"):
        settings_to_train_further(read_lora(mixed))


def test_init_from_a_lora_for_another_model_is_refused(sd_run, tmp_path):
    elsewhere = tmp_path / "elsewhere.safetensors"  # a third down block: tiny-sd has two
    module = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_k"
    save_file({f"{module}.lora_A.weight": torch.randn(4, 64), f"{module}.lora_B.weight": torch.randn(64, 4)}, elsewhere)
    with pytest.raises(StudioError, match=rf"adapts {module}, which the base model does not have"):
        train(options(sd_run.tmp, output_dir=tmp_path / "a", init_from=elsewhere))
    sdxl_file = tmp_path / "sdxl.safetensors"  # cross-attention from 2048 channels: an SDXL LoRA
    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{module}.lora_A.weight": torch.randn(4, 2048), f"{module}.lora_B.weight": torch.randn(64, 4)},
              sdxl_file)  # fmt: skip
    with pytest.raises(StudioError, match=r"sdxl.safetensors: this LoRA is for .* \(sdxl\) but the loaded model .*sd1"):
        train(options(sd_run.tmp, output_dir=tmp_path / "b", init_from=sdxl_file))


def test_kohya_export_holds_exactly_the_same_deltas(sd_run):
    kohya = load_file(sd_run.result.kohya_path)
    expected = diffusers_deltas(sd_run.result.lora_path)
    pipe = tiny_sd_pipeline()
    modules = len(targeted(pipe.unet, BLOCK_TARGETS)) + len(targeted(pipe.text_encoder, TEXT_TARGETS))
    assert len(expected) == len([k for k in kohya if k.endswith(".lora_down.weight")]) == modules
    for module, delta in expected.items():
        component, path = module.split(".", 1)
        name = ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        kohya_delta = kohya[f"{name}.alpha"].item() / rank * up.flatten(1) @ down.flatten(1)
        torch.testing.assert_close(kohya_delta, delta, rtol=1e-5, atol=1e-7)


def test_conv_rank_sizes_the_3x3_convolutions_and_every_file_keeps_their_scale(tmp_path):
    """kohya's conv_dim/conv_alpha: rank 2 (alpha 2: scale 1) on to_k, rank 4 at alpha 2 (scale 0.5) on conv1/conv2."""
    draw_images(tmp_path / "images", [(64, 64)])
    result = train(options(tmp_path, unet_targets=["to_k", "conv1", "conv2"], rank=2, conv_rank=4, conv_alpha=2,
                           learning_rate=1e-2, max_train_steps=3, export_kohya=True))  # fmt: skip
    tensors = load_file(result.lora_path)
    ranks = {key.split(".lora_A")[0].rsplit(".", 1)[-1]: t.shape[0] for key, t in tensors.items() if ".lora_A" in key}
    assert ranks == {"to_k": 2, "conv1": 4, "conv2": 4}
    assert json.loads(lora_metadata(result.lora_path)["ss_network_args"])["conv_dim"] == "4"

    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(result.lora_path)  # plain diffusers reads the per-layer rank and alpha
    conv = pipe.unet.down_blocks[0].resnets[0].conv1
    assert conv.lora_A["default_0"].weight.shape[0] == 4 and conv.scaling["default_0"] == 0.5
    assert pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_k.scaling["default_0"] == 1.0
    scales = {m.module.rsplit(".", 1)[-1]: m.scale for m in read_lora(result.lora_path).modules}
    assert scales == {"to_k": 1.0, "conv1": 0.5, "conv2": 0.5}  # and so does the studio's own reader

    kohya = load_file(result.kohya_path)
    for key, down in tensors.items():
        if ".lora_A" not in key:
            continue
        module = key.split(".lora_A")[0]
        scale = 0.5 if module.endswith(("conv1", "conv2")) else 1.0
        delta = scale * tensors[f"{module}.lora_B.weight"].flatten(1) @ down.flatten(1)
        name = "lora_unet_" + module.removeprefix("unet.").replace(".", "_")
        k_down, k_up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        kohya_delta = kohya[f"{name}.alpha"].item() / k_down.shape[0] * k_up.flatten(1) @ k_down.flatten(1)
        torch.testing.assert_close(kohya_delta, delta, rtol=1e-5, atol=1e-7)


def test_kohya_export_loads_through_the_studio_with_the_same_images(sd_run):
    from studio.adapters import Studio

    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(sd_run.config.output_dir)
    expected = images(pipe)
    studio = Studio(load_base("tiny-sd", device="cpu"))
    studio.load_adapter(sd_run.result.kohya_path, name="kohya")
    got = np.stack([np.asarray(i, dtype=np.float32) / 255 for i in studio.generate(PROMPT, seed=0, steps=2)])
    assert np.abs(got - expected).max() <= 1.5 / 255  # the same image, up to 8-bit rounding


# ---- SDXL: both text encoders, buckets for mixed sizes, validation images -------------------------------


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    draw_images(tmp / "images", [(48, 80), (80, 48)])  # one portrait, one landscape
    config = options(
        tmp,
        base="tiny-sdxl",
        max_train_steps=2,
        learning_rate=1e-2,
        train_text_encoder=True,
        text_encoder_lr=1e-2,
        buckets="auto",
        validation_prompt=PROMPT,
        validation_steps=2,
        num_validation_images=1,
        inference_steps=1,
        export_kohya=True,
    )
    return SimpleNamespace(config=config, result=train(config))


def test_sdxl_lora_has_keys_for_both_text_encoders_and_loads_in_plain_diffusers(sdxl_run):
    keys = load_file(sdxl_run.result.lora_path).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    for component in ("text_encoder", "text_encoder_2"):
        for projection in TEXT_TARGETS:
            assert any(k.startswith(f"{component}.") and f".{projection}.lora_A" in k for k in keys)
    assert lora_metadata(sdxl_run.result.lora_path)["studio.family"] == "sdxl"
    pipe = tiny_sdxl_pipeline()
    base_images = images(pipe)
    pipe.load_lora_weights(sdxl_run.config.output_dir)
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    assert np.abs(images(pipe) - base_images).max() > 1e-4


def test_sdxl_kohya_export_names_both_encoders(sdxl_run):
    keys = load_file(sdxl_run.result.kohya_path).keys()
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert any(k.startswith("lora_unet_") for k in keys)


def test_a_prompt_file_draws_each_line_with_its_own_options(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# kohya's sample prompts\n\na sks shape --n blue --w 32 --h 48 --s 2 --l 4.5 --d 5\n"
                       "a red circle --s 1 --ss euler_a\n")  # fmt: skip
    train(options(tmp_path, max_train_steps=1, validation_steps=1, validation_prompts_file=prompts))
    out = tmp_path / "out"
    with Image.open(out / "validation" / "step-000001-0.png") as first, Image.open(out / "validation_grid.png") as grid:
        assert first.size == (32, 48)
        assert grid.size == (128, 128)  # two 64x64 tiles (the largest width and height), base row above LoRA row
        base_tile = np.asarray(grid.convert("RGB").crop((16, 8, 16 + 32, 8 + 48)))  # centred, unscaled
    with Image.open(out / "validation" / "step-000001-1.png") as second:
        assert second.size == (64, 64)  # the training resolution where a line gives no size

    # The grid's base tile is the plain pipeline's image for that line: its prompt, negative, size, steps,
    # guidance and seed.
    plain = tiny_sd_pipeline()(
        "a sks shape", negative_prompt="blue", width=32, height=48, num_inference_steps=2, guidance_scale=4.5,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]  # fmt: skip
    assert np.array_equal(base_tile, np.asarray(plain))


def test_validation_images_and_base_vs_lora_grid_are_written(sdxl_run):
    out = sdxl_run.config.output_dir
    assert (out / "validation" / "step-000002-0.png").is_file()
    from PIL import Image

    with Image.open(out / "validation_grid.png") as grid:
        assert grid.size == (64, 128)  # one column, base row above LoRA row


# ---- resuming, several processes, prior preservation, LoRA variants -------------------------------------


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    draw_images(tmp_path / "images", [(80, 72), (72, 80), (80, 80)])  # larger than 64: random crops differ
    config = dict(
        max_train_steps=5,
        checkpointing_steps=1,
        checkpoints_total_limit=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        crop="random",
        random_flip=True,
        train_text_encoder=True,
        snr_gamma=5.0,
        noise_offset=0.05,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        ema_decay=0.6,  # the saved LoRA is the average: it only matches if the average resumes too
    )
    train(options(tmp_path, **config))
    uninterrupted = load_file(tmp_path / "out" / LORA_FILE)
    checkpoints = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-3", "checkpoint-4"]  # the limit keeps the newest two, none half-written

    resumed = train(options(tmp_path, **config, resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3")))
    assert resumed.steps == 5 and len(resumed.losses) == 2
    again = load_file(tmp_path / "out" / LORA_FILE)
    assert again.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(again[key], uninterrupted[key]), key


def test_a_kill_while_a_checkpoint_is_deleted_never_leaves_a_gutted_checkpoint_to_resume_from(tmp_path, monkeypatch):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in ("model.safetensors", "optimizer.bin", LORA_FILE):
            (tmp_path / f"checkpoint-{step}" / name).write_bytes(b"x")

    def killed(path, *args, **kwargs):  # the process dies after deleting one file
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr("studio.train_dreambooth.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_checkpoint(tmp_path / "checkpoint-4")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]  # "latest" is whole
    assert len(list((tmp_path / "checkpoint-2").iterdir())) == 3


def test_steps_of_an_epoch_count_each_processs_batches_and_accumulation():
    def plan(processes=1, **lengths):
        return plan_steps(options(Path("."), **{"max_train_steps": None, **lengths}), 10, processes)

    assert plan() == StepPlan(steps_per_epoch=10, total=400, checkpoint_every=500, validate_every=100)  # defaults
    # 10 batches on 3 processes: 4 each (accelerate repeats two to even them out); accumulating 3: 2 steps.
    assert plan(3, num_train_epochs=5, gradient_accumulation_steps=3, checkpointing_epochs=2) == StepPlan(
        steps_per_epoch=2, total=10, checkpoint_every=4, validate_every=100
    )  # fmt: skip
    assert plan(2, max_train_steps=7, validation_epochs=1) == StepPlan(5, 7, 500, 5)


def test_epoch_counted_lengths_become_optimizer_steps(tmp_path):
    """4 images x 2 repeats at batch 2 are 4 batches an epoch; accumulating 3 makes that 2 optimizer steps (the
    epoch's last, incomplete accumulation still steps). So 3 epochs are 6 steps; a checkpoint every epoch is
    one at steps 2 and 4 (6 is the final save); validation every 2 epochs is at step 4."""
    draw_images(tmp_path / "images", [(64, 64)] * 4)
    config = options(
        tmp_path, max_train_steps=None, num_train_epochs=3, checkpointing_epochs=1, validation_epochs=2,
        repeats=2, train_batch_size=2, gradient_accumulation_steps=3, validation_prompt=PROMPT,
        num_validation_images=1, inference_steps=1,
    )  # fmt: skip
    result = train(config)
    out = tmp_path / "out"
    assert result.steps == 6 and len(result.losses) == 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000004-0.png"]
    final, first_epoch = lora_metadata(result.lora_path), lora_metadata(out / "checkpoint-2" / LORA_FILE)
    assert (final["ss_max_train_steps"], final["ss_num_epochs"], final["ss_epoch"], final["ss_steps"]) == (
        "6", "3", "3", "6"
    )  # fmt: skip
    assert (first_epoch["ss_epoch"], first_epoch["ss_steps"]) == ("1", "2")

    # Resuming at the start of the third epoch (checkpoint-4) skips what it should: the same LoRA comes out.
    uninterrupted = load_file(result.lora_path)
    resumed = train(replace(config, resume_from_checkpoint="latest"))
    assert resumed.steps == 6 and len(resumed.losses) == 2
    again = load_file(resumed.lora_path)
    assert again.keys() == uninterrupted.keys()
    assert all(torch.equal(again[key], uninterrupted[key]) for key in uninterrupted)


def test_a_kohya_dataset_folder_trains_without_an_instance_prompt(tmp_path, capsys):
    draw_images(tmp_path / "data" / "2_sks shape", [(64, 64), (64, 64)])
    (tmp_path / "data" / "5_nothing here").mkdir()  # no images: neither trained nor a trigger word
    out = tmp_path / "out"
    code = main(["--base", "tiny-sd", "--train_data_dir", str(tmp_path / "data"), "--output_dir", str(out),
                 "--max_train_epochs", "1", "--report-to", "none"])  # fmt: skip
    assert code == 0
    assert "trained 4 steps" in capsys.readouterr().out  # 2 images, 2 repeats each
    metadata = lora_metadata(out / LORA_FILE)
    assert read_lora(out / LORA_FILE).trigger_words == ["sks shape"]
    assert metadata["studio.trigger_prompt"] == "sks shape" and metadata["ss_num_train_images"] == "4"
    assert json.loads(metadata["ss_dataset_dirs"]) == {"2_sks shape": {"n_repeats": 2, "img_count": 2}}
    assert json.loads(metadata["ss_tag_frequency"]) == {"2_sks shape": {"sks shape": 2}}


def test_ema_saves_the_moving_average_of_the_weights_after_each_step(tmp_path):
    draw_images(tmp_path / "images", [(64, 64), (64, 64)])
    common = dict(max_train_steps=3, learning_rate=1e-2, checkpointing_steps=1)
    train(options(tmp_path, **common, output_dir=tmp_path / "plain"))
    per_step = [load_file(tmp_path / "plain" / f"checkpoint-{n}" / LORA_FILE) for n in (1, 2)]
    per_step.append(load_file(tmp_path / "plain" / LORA_FILE))

    decay = 0.2
    train(options(tmp_path, **common, output_dir=tmp_path / "ema", ema_decay=decay))
    saved = load_file(tmp_path / "ema" / LORA_FILE)
    at_step_2 = load_file(tmp_path / "ema" / "checkpoint-2" / LORA_FILE)

    # The average after step t is d*average + (1-d)*weights, d = min(decay, t/(9+t)): 0 at step 1, 2/11, then 0.2.
    for key, last in per_step[-1].items():
        average = per_step[0][key]
        for step, weights in ((2, per_step[1][key]), (3, last)):
            d = min(decay, step / (9 + step))
            average = d * average + (1 - d) * weights
            if step == 2:
                torch.testing.assert_close(at_step_2[key], average, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(saved[key], average, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(saved[k], per_step[-1][k]) for k in saved)  # the average is not the last step


SQUARES = [(64, 64), (64, 64)]


@pytest.mark.parametrize(
    "base, sizes, extra",
    [
        ("tiny-sd", SQUARES, ["--num-train-epochs", "1", "--repeats", "2"]),
        ("tiny-sd", [(96, 64), (96, 64), (64, 96)], ["--num-train-epochs", "2", "--train-batch-size", "2",
                                                      "--buckets", "auto"]),
        ("tiny-sd", SQUARES, ["--max-train-steps", "2", "--clip-skip", "2", "--train-text-encoder",
                              "--text-encoder-lr", "1e-3"]),
        ("tiny-sdxl", SQUARES, ["--max-train-steps", "2", "--train-text-encoder", "--text-encoder-lr", "1e-3",
                                "--resolution", "32"]),
    ],
    ids=["sd-one-epoch", "sd-buckets-two-epochs", "sd-clip-skip-2-text-encoder", "sdxl-text-encoders"],
)  # fmt: skip
def test_two_process_torchrun_completes_and_writes_one_output(tmp_path, base, sizes, extra):
    """Text-encoder layers whose output never reaches the UNet (the last at clip skip 2; SDXL's first encoder's
    last, as SDXL conditions on the penultimate layer) get no LoRA: DDP would stop on their missing
    gradients, and the file would carry zeros. Every LoRA written must have learned. Each run is 2 steps: one
    epoch of 2 images x 2 repeats is 2 batches for each of the 2 processes; two landscape images and a portrait
    one at batch 2 are a full batch and a short one, one for each process, so 2 epochs are 2 steps."""
    draw_images(tmp_path / "images", sizes)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "studio.train_dreambooth", "--base", base, "--instance-dir", str(tmp_path / "images"),
        "--instance_prompt", PROMPT, "--output-dir", str(out), "--checkpointing-steps", "1",
        "--report-to", "none", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    # In a session of its own, so a run that hangs is killed with its ranks, not just torchrun's own process.
    with subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as run:  # fmt: skip
        try:
            stdout, stderr = run.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            raise
    assert run.returncode == 0, stderr[-2000:]
    assert stdout.count("trained 2 steps") == 1  # the summary comes from the main process only
    files = sorted(p.name for p in out.iterdir())
    assert files == ["checkpoint-1", LORA_FILE, RUN_FILE]
    assert sorted(p.name for p in (out / "checkpoint-1").iterdir()) == sorted([
        LORA_FILE, "lora_training_state.safetensors", "optimizer.bin", "scheduler.bin",
        "random_states_0.pkl", "random_states_1.pkl",
    ])  # fmt: skip
    lora_up = {key: t for key, t in load_file(out / LORA_FILE).items() if "lora_B" in key}
    assert lora_up and all(t.abs().max() > 0 for t in lora_up.values())  # B starts at zero: the DDP steps moved it
    if "--train-text-encoder" in extra:
        layers = 5  # both tiny text encoders
        adapted = {
            (key.split(".")[0], int(key.split(".layers.")[1].split(".")[0]))
            for key in lora_up if key.startswith("text_encoder")
        }  # fmt: skip
        first_encoder = {layer for component, layer in adapted if component == "text_encoder"}
        assert first_encoder == set(range(layers - 1))  # all but the last layer
        if base == "tiny-sdxl":
            assert {layer for component, layer in adapted if component == "text_encoder_2"} == set(range(layers))


def test_prior_preservation_generates_the_missing_class_images_and_keeps_them(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    demo_world.draw_shape("red", "circle", size_px=64, rng=0).save(class_dir / "mine.png")
    config = options(
        tmp_path,
        with_prior_preservation=True,
        class_prompt="a shape",
        class_dir=class_dir,
        num_class_images=3,
        inference_steps=1,
        caption_dropout_rate=0.5,  # the empty prompt joins the prompt cache
    )
    result = train(config)
    assert sorted(p.name for p in class_dir.iterdir()) == ["generated-00000.png", "generated-00001.png", "mine.png"]
    assert lora_metadata(result.lora_path)["ss_num_reg_images"] == "3"
    assert lora_metadata(result.lora_path)["ss_caption_dropout_rate"] == "0.5"


def test_pissa_is_saved_as_a_plain_lora_against_the_original_base(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    base = load_base("tiny-sd", device="cpu")
    result = train(options(tmp_path, init="pissa", rank=2, learning_rate=1e-2), base=base)
    module_path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    trained = base.pipeline.unet.get_submodule(module_path)
    trained_weight = (trained.base_layer.weight + trained.get_delta_weight("default")).cpu()  # W_res + s·B·A

    tensors = load_file(result.lora_path)
    settings = json.loads(lora_metadata(result.lora_path)["lora_adapter_metadata"])
    down, up = tensors[f"unet.{module_path}.lora_A.weight"], tensors[f"unet.{module_path}.lora_B.weight"]
    assert down.shape[0] == settings["unet.r"] == 4  # twice the rank: [B, -B0] @ [A; A0]
    original = tiny_sd_pipeline().unet.get_submodule(module_path).weight
    scale = settings["unet.lora_alpha"] / settings["unet.r"]
    torch.testing.assert_close(original + scale * up @ down, trained_weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loraplus", [None, 4.0])
def test_optimizer_groups_carry_each_models_rate_and_weight_decay(loraplus):
    prodigyopt = pytest.importorskip("prodigyopt")
    trained = {}
    for name in ("unet", "text_encoder"):
        trained[name] = torch.nn.Sequential(torch.nn.Linear(3, 3)).requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), trained[name])
    config = options(
        Path("."), optimizer="Prodigy", learning_rate=1.0, adam_weight_decay=0.1, adam_weight_decay_text_encoder=0.01,
        prodigy_beta3=0.5, prodigy_safeguard_warmup=False, loraplus_lr_ratio=loraplus,
    )  # fmt: skip
    optimizer = build_optimizer(config, prodigyopt.Prodigy, trained)
    assert isinstance(optimizer, prodigyopt.Prodigy)
    by_model = {
        name: sorted((g["lr"], g["weight_decay"]) for g in optimizer.param_groups if set(map(id, g["params"])) <= ids)
        for name, ids in ((n, {id(p) for p in m.parameters()}) for n, m in trained.items())
    }  # fmt: skip
    # Under Prodigy the text encoder trains at --learning-rate too; LoRA+ puts the B matrices at 4 times it.
    rates = [1.0] if loraplus is None else [1.0, 4.0]
    assert by_model == {"unet": [(r, 0.1) for r in rates], "text_encoder": [(r, 0.01) for r in rates]}
    assert (optimizer.defaults["beta3"], optimizer.defaults["safeguard_warmup"]) == (0.5, False)
    assert optimizer.defaults["use_bias_correction"] is True and optimizer.defaults["decouple"] is True


def test_prodigy_trains_and_output_name_names_the_kohya_copy(tmp_path):
    pytest.importorskip("prodigyopt")
    draw_images(tmp_path / "images", [(64, 64)])
    result = train(options(tmp_path, optimizer="prodigy", learning_rate=1.0, train_text_encoder=True,
                           output_name="my-star", max_train_steps=3))  # fmt: skip
    assert result.kohya_path == tmp_path / "out" / "my-star.safetensors"
    assert not list((tmp_path / "out").glob("*_kohya.safetensors"))
    metadata = lora_metadata(result.kohya_path)
    assert (metadata["ss_output_name"], metadata["ss_optimizer"], metadata["ss_text_encoder_lr"]) == (
        "my-star", "prodigy", "1.0"
    )  # fmt: skip
    up = {k: t for k, t in load_file(result.lora_path).items() if "lora_B" in k}
    assert all(t.abs().max() > 0 for k, t in up.items() if k.startswith("text_encoder"))  # trained there too


def test_dora_rslora_loraplus_gaussian_train_and_load_in_plain_diffusers(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    result = train(
        options(tmp_path, dora=True, rslora=True, init="gaussian", loraplus_lr_ratio=16.0, learning_rate=1e-2, rank=2)
    )
    settings = json.loads(lora_metadata(result.lora_path)["lora_adapter_metadata"])
    assert settings["unet.use_dora"] and settings["unet.use_rslora"]
    assert any("magnitude" in k for k in load_file(result.lora_path))
    pipe = tiny_sd_pipeline()
    base_images = images(pipe)
    pipe.load_lora_weights(tmp_path / "out")
    assert np.abs(images(pipe) - base_images).max() > 1e-4


def test_dora_text_encoder_magnitudes_load_in_plain_diffusers(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    result = train(options(tmp_path, dora=True, train_text_encoder=True, learning_rate=1e-2, text_encoder_lr=1e-2,
                           max_train_steps=3))  # fmt: skip
    saved = {k: v for k, v in load_file(result.lora_path).items() if k.startswith("text_encoder.") and "magnitude" in k}
    pipe = tiny_sd_pipeline()
    initial = {name: layer.weight.norm(dim=1) for name, layer in pipe.text_encoder.named_modules() if name.endswith("proj")}
    pipe.load_lora_weights(tmp_path / "out")
    assert len(saved) == 20  # q, k, v, out of five layers
    for key, magnitude in saved.items():
        module = key.removeprefix("text_encoder.text_model.").split(".lora_magnitude_vector")[0]
        [loaded] = pipe.text_encoder.get_submodule(module).lora_magnitude_vector.values()
        assert not torch.allclose(magnitude, initial[module])  # trained: not where DoRA starts
        torch.testing.assert_close(loaded.weight, magnitude, msg=module)


# ---- the loss ----------------------------------------------------------------------------------------------


def test_v_prediction_models_learn_the_velocity():
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 700])
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[timesteps].float().view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(denoising_target(scheduler, latents, noise, timesteps), expected, rtol=1e-4, atol=1e-5)
    epsilon = DDPMScheduler(prediction_type="epsilon")
    assert denoising_target(epsilon, latents, noise, timesteps) is noise


def test_min_snr_weighting_caps_each_sample_at_gamma_over_snr():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([5, 900])  # high SNR (weight gamma/snr < 1), low SNR (weight 1)
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * torch.clamp(5.0 / snr, max=1.0)).mean()
    torch.testing.assert_close(diffusion_loss(prediction, target, timesteps, scheduler, LossSettings(snr_gamma=5.0)), expected)
    torch.testing.assert_close(diffusion_loss(prediction, target, timesteps, scheduler, LossSettings()), per_sample.mean())


def test_min_snr_weighting_of_velocity_on_a_zero_terminal_snr_schedule_is_finite():
    """The demo model's schedule (v-prediction, zero terminal SNR) has SNR = 0 at its last timestep, where
    min(SNR, gamma) / SNR is 0 / 0. The velocity loss is (SNR + 1) times the x0-loss, so its weight is
    min(SNR, gamma) / (SNR + 1): 0 there."""
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True)  # fmt: skip
    prediction, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([5, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    assert alpha_bar[2] == 0
    snr = alpha_bar / (1 - alpha_bar)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3)).double()
    expected = (per_sample * torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)).mean()
    loss = diffusion_loss(prediction, target, timesteps, scheduler, LossSettings(snr_gamma=5.0))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_debiased_estimation_weights_noise_loss_by_one_over_sqrt_snr_held_to_the_schedule():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    prediction, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 400, 999])
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[timesteps]
    snr = (alpha_bar / (1 - alpha_bar)).clamp(max=1000)  # t = 0: SNR ~ 1175, held to 1000
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3)).double()
    loss = diffusion_loss(prediction, target, timesteps, scheduler, LossSettings(debiased=True))
    torch.testing.assert_close(loss.double(), (per_sample / snr.sqrt()).mean(), rtol=1e-5, atol=1e-7)
    with_min_snr = diffusion_loss(prediction, target, timesteps, scheduler, LossSettings(snr_gamma=5.0, debiased=True))
    expected = (per_sample / snr.sqrt() * torch.clamp(5.0 / (alpha_bar / (1 - alpha_bar)), max=1.0)).mean()
    torch.testing.assert_close(with_min_snr.double(), expected, rtol=1e-5, atol=1e-7)


def test_debiased_estimation_on_a_zero_terminal_snr_schedule_is_finite():
    """SNR = 0 at the last timestep: held to the smallest positive SNR for noise prediction (1 / sqrt(0) is
    infinite); velocity's 1 / (SNR + 1) is 1 there."""
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([500, 999])
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3)).double()
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type=prediction_type, rescale_betas_zero_snr=True)  # fmt: skip
        alpha_bar = scheduler.alphas_cumprod.double()
        snr = alpha_bar / (1 - alpha_bar)
        assert snr[999] == 0
        held = snr[timesteps].clamp(min=snr[998])  # t = 998 has the smallest positive SNR
        weights = 1 / (snr[timesteps] + 1) if prediction_type == "v_prediction" else 1 / held.sqrt()
        loss = diffusion_loss(prediction, target, timesteps, scheduler, LossSettings(debiased=True))
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), (per_sample * weights).mean(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_losses_follow_kohyas_formulas_and_threshold_schedules(schedule):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    prediction, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 400, 999])
    c, scale = 0.1, 2.0
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[timesteps]
    threshold = {
        "constant": torch.full((3,), c * scale, dtype=torch.float64),
        "exponential": scale * c ** (timesteps.double() / 1000),  # scale at t = 0 down to c x scale at t = 1000
        "snr": (1 - c) / (1 + ((1 - alpha_bar) / alpha_bar).sqrt()) ** 2 + c,
    }[schedule].view(-1, 1, 1, 1)
    d = (prediction - target).double()
    huber = (2 * threshold * ((d**2 + threshold**2).sqrt() - threshold)).mean()
    smooth = (2 * ((d**2 + threshold**2).sqrt() - threshold)).mean()
    for loss_type, expected in (("huber", huber), ("smooth_l1", smooth)):
        settings = LossSettings(loss_type=loss_type, huber_schedule=schedule, huber_c=c, huber_scale=scale)
        loss = diffusion_loss(prediction, target, timesteps, scheduler, settings)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    l1 = diffusion_loss(prediction, target, timesteps, scheduler, LossSettings(loss_type="l1"))
    torch.testing.assert_close(l1.double(), d.abs().mean(), rtol=1e-5, atol=1e-7)


def test_a_huber_run_trains_and_records_its_loss_in_the_metadata(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    result = train(options(tmp_path, loss_type="huber", huber_c=0.2, max_train_steps=3, learning_rate=1e-2))
    metadata = lora_metadata(result.lora_path)
    assert (metadata["ss_loss_type"], metadata["ss_huber_schedule"], metadata["ss_huber_c"]) == ("huber", "snr", "0.2")
    assert all(math.isfinite(loss) for loss in result.losses) and len(result.losses) == 3


def test_max_norm_scales_only_the_layers_above_it_and_keeps_their_direction():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"]), model)  # scale 2
    torch.manual_seed(0)
    for layer, size in ((model[0], 1.0), (model[1], 1e-3)):  # the conv's change stays far below the limit
        for factor in (layer.lora_A["default"], layer.lora_B["default"]):
            factor.weight.data = torch.randn_like(factor.weight) * size
    delta = [2 * layer.lora_B["default"].weight.flatten(1) @ layer.lora_A["default"].weight.flatten(1) for layer in model]
    conv_before = [p.clone() for p in model[1].parameters()]
    assert delta[0].norm() > 0.5 > delta[1].norm()
    scaled, largest = apply_max_norm({"unet": model}, 0.5)
    after = 2 * model[0].lora_B["default"].weight @ model[0].lora_A["default"].weight
    torch.testing.assert_close(after, delta[0] * 0.5 / delta[0].norm())
    assert all(torch.equal(p, q) for p, q in zip(model[1].parameters(), conv_before))
    assert scaled == 1 and largest == pytest.approx(0.5)


def test_scale_weight_norms_bounds_every_layer_of_the_trained_lora(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    result = train(options(tmp_path, unet_targets=BLOCK_TARGETS, learning_rate=1e-1, max_train_steps=3,
                           scale_weight_norms=0.02))  # fmt: skip
    norms = [float(delta.norm()) for delta in diffusers_deltas(result.lora_path).values()]
    assert max(norms) <= 0.02 * (1 + 1e-4) and max(norms) > 0.019  # the bound was reached, and held


def test_validation_at_start_draws_the_base_models_images_and_leaves_the_training_unchanged(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    common = dict(validation_prompt=PROMPT, num_validation_images=1, inference_steps=2, validation_steps=2,
                  learning_rate=1e-2)  # fmt: skip
    at_start = train(options(tmp_path, output_dir=tmp_path / "a", validation_at_start=True, **common))
    without = train(options(tmp_path, output_dir=tmp_path / "b", **common))
    assert sorted(p.name for p in (tmp_path / "a" / "validation").iterdir()) == [
        "step-000000-0.png", "step-000002-0.png"
    ]  # fmt: skip
    base = tiny_sd_pipeline()
    expected = base(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    drawn = np.asarray(Image.open(tmp_path / "a" / "validation" / "step-000000-0.png")).astype(np.float64) / 255
    assert np.abs(drawn - expected).max() <= 1 / 255 + 1e-6  # the LoRA starts as no change: the base model's image
    for key, tensor in load_file(at_start.lora_path).items():
        assert torch.equal(tensor, load_file(without.lora_path)[key]), key


def test_metadata_options_reach_the_file(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    result = train(options(tmp_path, training_comment="first try", metadata_title="Star", metadata_author="me",
                           metadata_license="CC-BY-4.0", metadata_tags="shape,star", max_timestep=600))  # fmt: skip
    metadata = lora_metadata(result.lora_path)
    assert metadata["ss_training_comment"] == "first try"
    assert (metadata["modelspec.title"], metadata["modelspec.author"]) == ("Star", "me")
    assert (metadata["modelspec.license"], metadata["modelspec.tags"]) == ("CC-BY-4.0", "shape,star")
    assert metadata["modelspec.timestep_range"] == "0,600"


def test_timesteps_are_drawn_only_from_the_range_asked_for(tmp_path, monkeypatch):
    draw_images(tmp_path / "images", [(64, 64), (64, 64)])
    drawn: list[int] = []
    add_noise = DDPMScheduler.add_noise

    def recording_add_noise(self, latents, noise, timesteps):
        drawn.extend(timesteps.tolist())
        return add_noise(self, latents, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "add_noise", recording_add_noise)
    train(options(tmp_path, max_train_steps=40, train_batch_size=2, min_timestep=300, max_timestep=310))
    assert len(drawn) == 80
    assert min(drawn) >= 300 and max(drawn) <= 309
    assert len(set(drawn)) > 5  # drawn over the range, not one fixed step

    with pytest.raises(StudioError, match="tiny-sd trains on timesteps 0 to 999"):
        train(options(tmp_path, output_dir=tmp_path / "too-far", max_timestep=1001))


def test_shuffled_captions_reach_the_text_encoder_every_step(tmp_path, monkeypatch):
    draw_images(tmp_path / "images", [(64, 64)])
    (tmp_path / "images" / "star-0.txt").write_text("sks, Purple, star, five arms")
    encoded: list[str] = []
    from studio import train_dreambooth

    encode_prompts = train_dreambooth.encode_prompts

    def recording_encode_prompts(encoders, tokenizers, prompts, clip_skip=1):
        encoded.extend(prompts)
        return encode_prompts(encoders, tokenizers, prompts, clip_skip)

    monkeypatch.setattr(train_dreambooth, "encode_prompts", recording_encode_prompts)
    train(options(tmp_path, max_train_steps=12, shuffle_caption=True, keep_tokens=1))
    assert len(encoded) == 12  # no prompt cache: each step encodes its own order
    assert all(p.startswith("sks, ") and sorted(p.split(", ")[1:]) == ["Purple", "five arms", "star"] for p in encoded)
    assert len(set(encoded)) > 1
    tags = json.loads(lora_metadata(tmp_path / "out" / LORA_FILE)["ss_tag_frequency"])
    assert tags == {"images": {"sks": 1, "purple": 1, "star": 1, "five arms": 1}}  # kohya's: per caption


def test_clip_skip_reaches_the_cached_prompts_and_the_validation_images(tmp_path, monkeypatch):
    from studio import data, prompts

    draw_images(tmp_path / "images", [(64, 64)])
    skips = {}  # who encoded -> the clip skips asked for
    for module in (data, prompts):  # the prompt cache; the validation images (through prompt_arguments)
        encode_prompts = module.encode_prompts

        def recording_encode_prompts(encoders, tokenizers, texts, clip_skip=1, encode=encode_prompts, who=module):
            skips.setdefault(who.__name__, []).append(clip_skip)
            return encode(encoders, tokenizers, texts, clip_skip)

        monkeypatch.setattr(module, "encode_prompts", recording_encode_prompts)
    result = train(
        options(tmp_path, clip_skip=2, validation_prompt=PROMPT, validation_steps=2, num_validation_images=1)
    )
    # the one prompt, cached once; the validation at step 2 and the final grid's two rows: prompt + negative each
    assert skips == {"studio.data": [2], "studio.prompts": [2] * 6}
    assert lora_metadata(result.lora_path)["ss_clip_skip"] == "2"
    assert (tmp_path / "out" / "validation" / "step-000002-0.png").is_file()
    with pytest.raises(StudioError, match=r"--clip-skip: tiny-sd: clip skip 9: must be from 1 to 5"):
        train(options(tmp_path, output_dir=tmp_path / "too-deep", clip_skip=9))
    with pytest.raises(StudioError, match=r"--clip-skip: tiny-sdxl: clip skip 2: for SD1.x models only"):
        train(options(tmp_path, base="tiny-sdxl", output_dir=tmp_path / "sdxl", clip_skip=2))


def test_fp16_save_precision_writes_the_same_lora_at_half_the_size(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    runs = {}
    for precision in ("fp32", "fp16"):
        folder = tmp_path / precision
        train(options(tmp_path, output_dir=folder, max_train_steps=3, learning_rate=1e-2, save_precision=precision,
                      export_kohya=True, checkpointing_steps=2))  # fmt: skip
        runs[precision] = {
            "diffusers": load_file(folder / LORA_FILE),
            "kohya": load_file(folder / f"{precision}_kohya.safetensors"),
            "checkpoint": load_file(folder / "checkpoint-2" / LORA_FILE),
        }
    for kind, full in runs["fp32"].items():
        half = runs["fp16"][kind]
        assert half.keys() == full.keys()
        for key, tensor in full.items():
            expected_dtype = torch.float32 if key.endswith(".alpha") else torch.float16
            assert half[key].dtype == expected_dtype, (kind, key)
            assert torch.equal(half[key], tensor.to(expected_dtype)), (kind, key)
    tensor_bytes = {}  # the file less its 8-byte length and JSON header (metadata dominates for a tiny LoRA)
    for precision in runs:
        data = (tmp_path / precision / LORA_FILE).read_bytes()
        tensor_bytes[precision] = len(data) - 8 - int.from_bytes(data[:8], "little")
    assert tensor_bytes["fp16"] * 2 == tensor_bytes["fp32"]


def test_a_diverging_run_stops_with_an_error_instead_of_saving_a_nan_lora(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    with pytest.raises(StudioError, match=r"training diverged at step \d+ .*--learning-rate"):
        train(options(tmp_path, learning_rate=1e30, max_train_steps=4))  # one Adam step moves weights by ~lr
    assert not (tmp_path / "out" / LORA_FILE).exists()


# ---- bad input: one line on stderr, exit code 2, no model loaded --------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("studio.train_dreambooth.load_base", refuse)


def bad_input_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    good = draw_images(tmp / "good", [(64, 64)])
    (tmp / "empty").mkdir()
    (tmp / "broken").mkdir()
    (tmp / "broken" / "a.png").write_bytes(b"not a png")
    (tmp / "other-run").mkdir()
    (tmp / "other-run" / RUN_FILE).write_text(json.dumps({**options(tmp, instance_dir=good).to_dict(), "rank": 16}))
    (tmp / "not-a-run").mkdir()
    (tmp / "not-a-run" / "notes.txt").write_text("mine")
    (tmp / "prompts.txt").write_text("a sks shape --w 100\n")
    (tmp / "seed.txt").write_text("a sks shape --d 99999999999999999999\n")
    (tmp / "latin1").mkdir()
    draw_images(tmp / "latin1", [(64, 64)])
    (tmp / "latin1" / "star-0.txt").write_bytes("un café".encode("latin-1"))
    (tmp / "elsewhere" / "checkpoint-4").mkdir(parents=True)  # another folder's run, at another rank
    (tmp / "elsewhere" / RUN_FILE).write_text(json.dumps({**options(tmp, instance_dir=good).to_dict(), "rank": 8}))
    return {
        "missing instance dir": (["--instance-dir", str(tmp / "nope")], "folder not found"),
        "empty instance dir": (["--instance-dir", str(tmp / "empty")], "holds no images"),
        "no readable image": (["--instance-dir", str(tmp / "broken")], "could be read"),
        "resolution": (["--instance-dir", str(good), "--resolution", "60"], "multiple of 8"),
        "rank": (["--instance-dir", str(good), "--rank", "0"], "--rank 0"),
        "unet target": (["--instance-dir", str(good), "--unet-targets", "to_k,to_z"], "to_z"),
        "text encoder target": (["--instance-dir", str(good), "--text-encoder-targets", "qproj"], "qproj"),
        "different run": (["--instance-dir", str(good), "--output-dir", str(tmp / "other-run")], "different run (rank"),
        "foreign folder": (
            ["--instance-dir", str(good), "--output-dir", str(tmp / "not-a-run")],
            "holds no training run",
        ),
        "missing checkpoint": (
            ["--instance-dir", str(good), "--resume-from-checkpoint", "checkpoint-9"],
            "checkpoint-9",
        ),
        "prior without class": (["--instance-dir", str(good), "--with-prior-preservation"], "--class-prompt"),
        "unknown flag value": (["--instance-dir", str(good), "--crop", "diagonal"], "crop"),
        "caption dropout": (["--instance-dir", str(good), "--caption-dropout-rate", "1"], "--caption-dropout-rate 1"),
        "prompt file": (
            ["--instance-dir", str(good), "--sample_prompts", str(tmp / "prompts.txt")],
            "prompts.txt line 1: the width 100 is not a positive multiple of 8",
        ),
        "prompt file seed": (
            ["--instance-dir", str(good), "--sample_prompts", str(tmp / "seed.txt")],
            "seed.txt line 1: --d 99999999999999999999 should be a seed from 0 to 2**32 - 1",
        ),
        "caption not utf-8": (["--instance-dir", str(tmp / "latin1")], "star-0.txt: the caption is not UTF-8 text"),
        "class dir is a file": (
            ["--instance-dir", str(good), "--with-prior-preservation", "--class-prompt", "a shape",
             "--class-dir", str(good / "star-0.png")], "star-0.png: is a file, not a class folder",
        ),  # fmt: skip
        "output dir inside a file": (
            ["--instance-dir", str(good), "--output-dir", str(good / "star-0.png" / "out")],
            "cannot create the output dir",
        ),
        "another run's checkpoint": (
            ["--instance-dir", str(good), "--resume-from-checkpoint", str(tmp / "elsewhere" / "checkpoint-4")],
            "checkpoint-4: a checkpoint of a different run (rank differ)",
        ),
        "seed": (["--instance-dir", str(good), "--seed", "-1"], "--seed -1: must be from 0 to 2**32 - 1"),
        "not a number": (["--instance-dir", str(good), "--learning-rate", "nan"], "--learning-rate nan: must be a finite"),
        "beta": (["--instance-dir", str(good), "--adam-beta1", "1.5"], "--adam-beta1 1.5: must be in [0, 1)"),
        "workers": (["--instance-dir", str(good), "--dataloader-num-workers", "-1"], "must be 0 or more"),
        "power": (
            ["--instance-dir", str(good), "--lr-scheduler", "polynomial", "--lr-power", "-1"],
            "--lr-power -1.0: must be positive",
        ),
        "polynomial end": (
            ["--instance-dir", str(good), "--lr-scheduler", "polynomial", "--learning-rate", "1e-8"],
            "polynomial decays to 1e-07",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["missing instance dir", "empty instance dir", "no readable image", "resolution", "rank", "unet target",
     "text encoder target", "different run", "foreign folder", "missing checkpoint", "prior without class",
     "unknown flag value", "caption dropout", "prompt file", "prompt file seed", "caption not utf-8",
     "class dir is a file", "output dir inside a file", "another run's checkpoint", "seed", "not a number", "beta",
     "workers", "power", "polynomial end"],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_code_2_before_any_model_loads(case, tmp_path, capsys, no_model_loading):
    arguments, expected = bad_input_cases(tmp_path)[case]
    base = ["--instance-prompt", PROMPT, "--output-dir", str(tmp_path / "out"), "--base", "tiny-sd"]
    assert main(base + arguments) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert expected in error
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_output_dir_holding_only_hidden_files_counts_as_empty(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".DS_Store").write_bytes(b"\0")
    check_output_dir(options(tmp_path))


def test_the_same_folders_typed_another_way_are_the_same_run(tmp_path, monkeypatch):
    draw_images(tmp_path / "images", [(64, 64)])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / RUN_FILE).write_text(json.dumps(options(tmp_path).to_dict()))  # absolute paths
    monkeypatch.chdir(tmp_path / "out")
    check_output_dir(options(tmp_path, instance_dir=Path("../images")))
    with pytest.raises(StudioError, match=r"different run \(instance_dir differ\)"):
        check_output_dir(options(tmp_path, instance_dir=Path("../out")))


def test_unreadable_files_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    from studio.data import scan_images

    folder = draw_images(tmp_path / "images", [(64, 64)])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    records = scan_images(folder, PROMPT)
    assert [r.path.name for r in records] == ["star-0.png"]
    assert "broken.jpg" in caplog.text


def test_missing_optional_optimizer_package_is_named(tmp_path, capsys, no_model_loading, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as if not installed
    draw_images(tmp_path / "images", [(64, 64)])
    argv = [
        "--instance-dir",
        str(tmp_path / "images"),
        "--instance-prompt",
        PROMPT,
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert main(argv + ["--optimizer", "prodigy"]) == 2
    assert "pip install prodigyopt" in capsys.readouterr().err


def test_a_run_described_before_an_option_existed_is_the_same_run_with_its_default(tmp_path):
    draw_images(tmp_path / "images", [(64, 64)])
    (tmp_path / "out").mkdir()
    older = options(tmp_path).to_dict()
    del older["min_timestep"], older["max_timestep"]  # options added after that run was written
    (tmp_path / "out" / RUN_FILE).write_text(json.dumps(older))
    check_output_dir(options(tmp_path))
    with pytest.raises(StudioError, match=r"different run \(min_timestep differ\)"):
        check_output_dir(options(tmp_path, min_timestep=100))


def test_cli_exits_2_with_one_line_on_bad_input(tmp_path):
    command = [sys.executable, "-m", "studio.train_dreambooth", "--instance-dir", str(tmp_path / "nope"),
               "--instance-prompt", PROMPT, "--output-dir", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: instance folder not found"


def test_trains_on_single_file_checkpoints_as_on_the_pipeline_they_hold(tmp_path, capsys):
    """A civitai-style .safetensors (with --base-config, as offline needs) and an opted-in .ckpt hold the
    tiny SD's weights: training on them gives the very LoRA that training on tiny-sd itself gives."""
    draw_images(tmp_path / "images", [(64, 64), (64, 64)])
    original = tiny_sd_pipeline()
    original.save_pretrained(tmp_path / "config")
    checkpoint = save_single_file(original, tmp_path / "model.safetensors")
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": ldm_state_dict(original)}, pickled)
    common = ["--instance-dir", str(tmp_path / "images"), "--instance-prompt", PROMPT, "--max-train-steps", "2",
              "--report-to", "none", "--learning-rate", "1e-2", "--base-config", str(tmp_path / "config")]  # fmt: skip

    assert main(common + ["--base", "tiny-sd", "--output-dir", str(tmp_path / "direct")]) == 0
    assert main(common + ["--base", str(checkpoint), "--output-dir", str(tmp_path / "single")]) == 0
    assert main(common + ["--base", str(pickled), "--output-dir", str(tmp_path / "refused")]) == 2
    assert "pickles that can run code" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main(common + ["--base", str(pickled), "--allow-pickle", "--output-dir", str(tmp_path / "pickled")]) == 0

    expected = load_file(tmp_path / "direct" / LORA_FILE)
    assert any(tensor.abs().max() > 0 for key, tensor in expected.items() if "lora_B" in key)
    assert main(common + ["--base", "tiny-sd", "--seed", "1", "--output-dir", str(tmp_path / "seed1")]) == 0
    other_seed = load_file(tmp_path / "seed1" / LORA_FILE)
    assert not any(torch.equal(other_seed[key], expected[key]) for key in expected)  # --seed decides, not the loader
    for run in ("single", "pickled"):
        trained = load_file(tmp_path / run / LORA_FILE)
        assert trained.keys() == expected.keys()
        for key in expected:
            assert torch.equal(trained[key], expected[key]), (run, key)
