"""Build the embedded demo model in `assets/demo-model/`: a tiny text-to-image latent diffusion model.

It is an ordinary diffusers `StableDiffusionPipeline` folder, trained here from scratch on CPU on the
drawings of `studio.demo_world`: coloured shapes on white, 32x32 pixels, with prompts like "a red circle".
Three stages, each seeded:
  1. draw the data: for the VAE, shapes of every kind, style and hue (it is the image codec and must
     handle what DreamBooth will teach later); for the UNet and text encoder, only the base colours x base
     shapes, filled (purple, the star and the other styles are left out on purpose);
  2. train the VAE (32x32x3 pixels <-> 16x16x4 latents) on reconstruction with a small KL term, and set its
     `scaling_factor` so the latents the UNet sees have unit standard deviation;
  3. train the CLIP text encoder and the UNet together on the v-prediction loss of a zero-terminal-SNR
     schedule, with the prompt dropped to "" now and then so classifier-free guidance (the pipeline's
     default 7.5) works.
Then save with `save_pretrained` (safetensors) together with the project's tokenizer and the scheduler the
pipeline samples with.

Run: python tools/build_demo_model.py [--out assets/demo-model] [--seed 0] [--threads 2]

The same seed, thread count, torch version and CPU give the same weights; across machines or torch
versions the float arithmetic (and so the weights) may differ in the last bits, which changes nothing visible.
"""

from __future__ import annotations

import argparse
import colorsys
import copy
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from studio import demo_world  # noqa: E402
from studio.paths import DEMO_MODEL_DIR  # noqa: E402
from studio.tiny import load_tokenizer, tiny_text_encoder_config  # noqa: E402

# Ways the training captions say "a red circle"; the first is the canonical one and the most frequent.
CAPTION_TEMPLATES = ("a {colour} {shape}", "a {colour} {shape}", "a photo of a {colour} {shape}",
                     "a drawing of a {colour} {shape}", "{colour} {shape}")


@dataclass
class BuildConfig:
    """Sizes and schedules of the build; the defaults make the shipped model."""

    out: Path = DEMO_MODEL_DIR
    seed: int = 0
    threads: int = 2
    image_size: int = 32
    images_per_combination: int = 256
    codec_images: int = 4096
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 1500
    unet_batch: int = 32
    unet_lr: float = 1e-3
    ema_decay: float = 0.995
    empty_prompt_rate: float = 0.1  # classifier-free guidance needs an unconditional model too
    partial_prompt_rate: float = 0.15  # "a red shape", "a circle", "a shape": what each word means alone


def draw_dataset(config: BuildConfig) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Images (N, 3, H, W) in [-1, 1] of every base colour x base shape, and their (colour, shape) labels."""
    rng = np.random.default_rng(config.seed)
    images, labels = [], []
    for colour in demo_world.BASE_COLOURS:
        for shape in demo_world.BASE_SHAPES:
            for _ in range(config.images_per_combination):
                image = demo_world.draw_shape(colour, shape, config.image_size, rng, demo_world.BASE_STYLE)
                images.append(np.asarray(image))
                labels.append((colour, shape))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, labels


def draw_codec_dataset(config: BuildConfig) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] of any shape and style in colours from the whole hue circle.

    The VAE is the image codec, not the concept model: like Stable Diffusion's, it must encode and decode
    any image of this world, including the purple stars and striped shapes DreamBooth will later teach the
    UNet and text encoder, which never see them here.
    """
    rng = np.random.default_rng(config.seed + 100)
    images = []
    for _ in range(config.codec_images):
        hue, saturation, value = rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)
        rgb = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))
        shape, style = rng.choice(demo_world.SHAPES), rng.choice(demo_world.STYLES)
        images.append(np.asarray(demo_world.draw_shape(rgb, str(shape), config.image_size, rng, str(style))))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def new_vae(image_size: int) -> AutoencoderKL:
    """A narrow two-level VAE (one 2x downsampling); flat-coloured shapes need no more, and CPU time is short."""
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=image_size,
    )


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, config: BuildConfig) -> None:
    """Reconstruction (L1 + MSE) plus a small KL term toward N(0, 1), with a cosine learning-rate decay."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.vae_steps, warmup=50))
    vae.train()
    for step in range(config.vae_steps):
        batch = pixels[torch.randint(len(pixels), (config.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = (F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch)
                + config.kl_weight * posterior.kl().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.vae_steps - 1:
            print(f"  vae step {step:5d}  loss {loss.item():.5f}", flush=True)
    vae.eval()


@torch.no_grad()
def encode(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each image's latent distribution (unscaled)."""
    means, stds = [], []
    for batch in pixels.split(256):
        posterior = vae.encode(batch).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def _warmup_cosine(total_steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def new_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(tiny_text_encoder_config(tokenizer))


def new_unet(latent_size: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """A small SD-style UNet: 16x16 -> 8x8 -> 4x4, text cross-attention at 8x8, 4x4 and in the middle."""
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )


def noise_scheduler() -> DDPMScheduler:
    """Stable Diffusion's scaled-linear betas, rescaled to zero terminal SNR, with v-prediction.

    With the usual schedule the noisiest training step still holds a trace of the image, the model learns
    to read colour from it, and at sampling time picks a colour from the pure starting noise instead of
    from the prompt. Zero terminal SNR (https://arxiv.org/abs/2305.08891) removes that trace; it needs
    v-prediction and "trailing" timesteps.
    """
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        steps_offset=1,
        clip_sample=False,  # latents are not confined to [-1, 1]; kept in the saved config for DDIM/DDPM users
    )


def sample_caption(colour: str, shape: str, rng: np.random.Generator, config: BuildConfig) -> str:
    """A caption for a drawing: usually "a <colour> <shape>" (or a paraphrase), sometimes partial or empty."""
    draw = rng.random()
    if draw < config.empty_prompt_rate:
        return ""
    if draw < config.empty_prompt_rate + config.partial_prompt_rate:
        return str(rng.choice([f"a {colour} shape", f"a {shape}", "a shape"]))
    return str(rng.choice(CAPTION_TEMPLATES)).format(colour=colour, shape=shape)


def train_unet_and_text_encoder(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    labels: list[tuple[str, str]],
    scaling_factor: float,
    config: BuildConfig,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """v-prediction training of both models; returns their exponential moving averages."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    rng = np.random.default_rng(config.seed + 3)
    scheduler = noise_scheduler()
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.unet_steps, warmup=100))
    ema_unet, ema_text_encoder = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_parameters = [*ema_unet.parameters(), *ema_text_encoder.parameters()]
    token_ids: dict[str, torch.Tensor] = {}  # captions repeat, so tokenize each once

    unet.train()
    text_encoder.train()
    for step in range(config.unet_steps):
        index = torch.randint(len(labels), (config.unet_batch,), generator=generator)
        noise_for_latents = torch.randn(latent_mean[index].shape, generator=generator)
        latents = (latent_mean[index] + latent_std[index] * noise_for_latents) * scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)

        # Encode each distinct caption of the batch once, then spread the results over the batch.
        captions = [sample_caption(*labels[i], rng, config) for i in index.tolist()]
        distinct = sorted(set(captions))
        for caption in distinct:
            if caption not in token_ids:
                token_ids[caption] = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length,
                                               truncation=True, return_tensors="pt").input_ids[0]
        encoded = text_encoder(torch.stack([token_ids[c] for c in distinct]))[0]
        hidden_states = encoded[[distinct.index(c) for c in captions]]

        prediction = unet(noisy_latents, timesteps, hidden_states).sample
        loss = F.mse_loss(prediction, scheduler.get_velocity(latents, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_parameters, parameters, 1 - decay)
        if step % 100 == 0 or step == config.unet_steps - 1:
            print(f"  unet step {step:5d}  loss {loss.item():.4f}  lr {schedule.get_last_lr()[0]:.2e}", flush=True)
    return ema_unet, ema_text_encoder


def save_pipeline(
    out: Path, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> None:
    """Write the pipeline folder (safetensors) under a temporary name, then swap it in for `out`."""
    # DPM-Solver++ over the training schedule draws clean images in the pipeline's usual 20-50 steps.
    scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler().config)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    pipeline.save_pretrained(staging, safe_serialization=True)
    previous = out.with_name(f".{out.name}-previous")
    if out.exists():
        os.replace(out, previous)
    os.replace(staging, out)
    shutil.rmtree(previous, ignore_errors=True)


def build(config: BuildConfig) -> None:
    torch.set_num_threads(config.threads)
    started = time.perf_counter()

    def elapsed() -> str:
        return f"{time.perf_counter() - started:6.1f} s"

    codec_pixels = draw_codec_dataset(config)
    pixels, labels = draw_dataset(config)
    print(f"[{elapsed()}] drew {len(codec_pixels)} + {len(labels)} images", flush=True)

    torch.manual_seed(config.seed)
    vae = new_vae(config.image_size)
    train_vae(vae, codec_pixels, config)
    latent_mean, latent_std = encode(vae, pixels)
    scaling_factor = 1.0 / latent_mean.std().item()
    vae.register_to_config(scaling_factor=scaling_factor)
    print(f"[{elapsed()}] trained the VAE; scaling_factor {scaling_factor:.4f}", flush=True)

    tokenizer = load_tokenizer()
    torch.manual_seed(config.seed + 10)
    text_encoder = new_text_encoder(tokenizer)
    unet = new_unet(config.image_size // 2, text_encoder.config.hidden_size)
    unet, text_encoder = train_unet_and_text_encoder(
        unet, text_encoder, tokenizer, latent_mean, latent_std, labels, scaling_factor, config
    )
    print(f"[{elapsed()}] trained the text encoder and UNet", flush=True)

    save_pipeline(config.out, vae, text_encoder, tokenizer, unet)
    size_mb = sum(f.stat().st_size for f in config.out.rglob("*") if f.is_file()) / 1e6
    print(f"[{elapsed()}] saved {config.out} ({size_mb:.1f} MB); build time {elapsed().strip()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BuildConfig.out, help="pipeline folder to write")
    parser.add_argument("--seed", type=int, default=BuildConfig.seed)
    parser.add_argument("--threads", type=int, default=BuildConfig.threads, help="torch CPU threads")
    parser.add_argument("--vae-steps", type=int, default=BuildConfig.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=BuildConfig.unet_steps)
    args = parser.parse_args()
    build(BuildConfig(out=args.out, seed=args.seed, threads=args.threads, vae_steps=args.vae_steps,
                      unet_steps=args.unet_steps))


if __name__ == "__main__":
    main()
