"""DreamBooth LoRA training for SD1.x, SD2.x and SDXL: `python -m studio.train_dreambooth --help`.

Reads top to bottom like diffusers' training scripts: parse the config, check the inputs (before any model
is loaded), load the models, generate missing class images, add LoRA adapters, prepare the data (caching
latents and prompt embeddings when nothing is random), then the loop, checkpoints and the final save. The
result is `pytorch_lora_weights.safetensors` in diffusers naming (plain `pipe.load_lora_weights(output_dir)`
loads it) with kohya-style `ss_*` and `studio.*` metadata, and on request a kohya-named copy.

    python -m studio.train_dreambooth --base demo --instance-dir shapes/ --instance-prompt "a sks shape" \\
        --output-dir out/sks --max-train-steps 300 --learning-rate 1e-3
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available, set_seed
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params, compute_snr, free_memory, offload_models
from diffusers.utils import make_image_grid
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from tqdm.auto import tqdm

from studio.base import DTYPES, BaseModel, load_base, pick_device_dtype, refuse_pickle
from studio.data import (
    BucketBatchSampler,
    DreamBoothDataset,
    ImageRecord,
    PromptCache,
    bucket_sizes,
    cache_latents,
    collate,
    concept_folders,
    sample_latents,
    scan_images,
)
from studio.errors import StudioError
from studio.lora_io import LoraFile, check_family, read_lora, write_lora
from studio.prompts import (
    check_clip_skip,
    encode_prompts,
    pipeline_text_encoders,
    pipeline_tokenizers,
    prompt_arguments,
)
from studio.train_config import (
    PATH_OPTIONS,
    STEPS_OR_EPOCHS,
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    TrainConfig,
    names_module,
    parse_config,
)
from studio.validation_prompts import ValidationImage, validation_images_wanted

logger = logging.getLogger("studio.train_dreambooth")

LORA_FILE = "pytorch_lora_weights.safetensors"
RUN_FILE = "training_config.json"  # marks a folder as holding a run, and which one
TRAINING_STATE_FILE = "lora_training_state.safetensors"  # raw adapter tensors in a checkpoint, for resuming
EMA_PREFIX, EMA_STEP_KEY = "ema.", "ema_step"  # the weight average's tensors and step count in that file
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
KOHYA_BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
# Stability AI's model spec (modelspec.*), as kohya writes it for LoRAs: architecture by family (SD2 by prediction).
MODELSPEC_ARCHITECTURES = {
    "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"
}  # fmt: skip


@dataclass
class TrainResult:
    """What a finished run wrote and how fast it went."""

    lora_path: Path
    kohya_path: Path | None
    steps: int
    seconds: float
    steps_per_second: float
    peak_memory_mb: float
    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class StepPlan:
    """How long the run is and how often it saves and validates, in optimizer steps (epoch-counted options
    turned into steps)."""

    steps_per_epoch: int
    total: int
    checkpoint_every: int
    validate_every: int


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    try:
        train(parse_config(argv))
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def train(config: TrainConfig, base: BaseModel | None = None) -> TrainResult:
    """Run one DreamBooth LoRA training as `config` says; every process of a multi-process launch calls it.

    `base`, when given, is an already loaded base model to train on instead of loading `config.base`: its
    pipeline keeps the trained adapters (named "default") afterwards."""
    # 1. Check the inputs: every user mistake is reported here, before a model is loaded.
    instance_images = scan_images(
        config.instance_dir, config.instance_prompt, caption_extension=config.caption_extension
    )
    class_images: list[ImageRecord] = []
    if config.with_prior_preservation:
        class_images = scan_images(
            config.class_dir, config.class_prompt, "class", required=False, caption_extension=config.caption_extension
        )
    check_output_dir(config)
    validation = validation_images_wanted(
        config.validation_prompt, config.num_validation_images, config.validation_prompts_file, config.seed
    )
    resume_dir = find_resume_checkpoint(config)
    initial_lora = read_initial_lora(config) if resume_dir is None else None  # a resumed run has its weights
    optimizer_class = optimizer_class_for(config.optimizer)
    refuse_pickle(Path(config.base), config.allow_pickle)
    make_output_dir(config)

    accelerator = make_accelerator(config)

    # 2. Load the base model; its scheduler's config says epsilon or v-prediction.
    if base is None:
        base = load_base(
            config.base, device=accelerator.device, dtype=torch.float32, config=config.base_config,
            allow_pickle=config.allow_pickle,
        )
    pipeline = base.pipeline
    unet, vae = pipeline.unet, pipeline.vae
    text_encoders, tokenizers = pipeline_text_encoders(pipeline), pipeline_tokenizers(pipeline)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise StudioError(f"{config.base}: cannot train a {noise_scheduler.config.prediction_type!r}-prediction model")
    num_timesteps = noise_scheduler.config.num_train_timesteps
    timestep_range = (config.min_timestep, config.max_timestep or num_timesteps)
    if not timestep_range[0] < timestep_range[1] <= num_timesteps:
        raise StudioError(
            f"--min-timestep {config.min_timestep} / --max-timestep {config.max_timestep}: "
            f"{config.base} trains on timesteps 0 to {num_timesteps - 1}"
        )
    resolution = config.resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    try:
        check_clip_skip(base.family, text_encoders, config.clip_skip)
    except StudioError as error:
        raise StudioError(f"--clip-skip: {config.base}: {error}") from None
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
    # Seeded only now: loading may draw from the global RNG or reseed it (the tiny pipelines do), and the
    # adapters' initial weights and the noise must depend on --seed alone, not on how the base was loaded.
    set_seed(config.seed, device_specific=True)

    # 3. Prior preservation: generate the class images the class folder lacks, with the untouched base.
    if config.with_prior_preservation:
        class_images = complete_class_images(config, pipeline, accelerator, class_images, resolution)

    # 4. Add the LoRA adapters; frozen weights go to the mixed-precision dtype, trained ones stay float32.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if weight_dtype != torch.float32:
        for module in (unet, *text_encoders):
            module.to(dtype=weight_dtype)
    trained = {"unet": unet}
    if config.train_text_encoder:
        trained.update(zip(("text_encoder", "text_encoder_2"), text_encoders))
    for name, module in trained.items():
        if name == "unet":
            add_lora(module, name, lora_config(config, config.unet_targets, conv_modules=convolutions(module, config)))
        else:
            layers = conditioning_layers(name, module, base.family, config.clip_skip)
            add_lora(module, name, lora_config(config, config.text_encoder_targets, layers))
    cast_training_params(list(trained.values()), dtype=torch.float32)
    if initial_lora is not None:
        start_from_lora(initial_lora, trained, base.family)
    # PiSSA/OLoRA move part of the base weight into the adapter; remember the start to save plain LoRA deltas.
    initial_state = (
        {name: adapter_state(module) for name, module in trained.items()} if config.init in ("pissa", "olora") else None
    )
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for name in trained.keys() - {"unet"}:
            trained[name].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # 5. Prepare the data; cache latents and prompt embeddings when they cannot change, then free the encoders.
    buckets = bucket_sizes(resolution, config.buckets, config.bucket_sizes(), step=pipeline.vae_scale_factor * 8)
    dataset = DreamBoothDataset(
        instance_images, class_images, buckets, crop=config.crop, random_flip=config.random_flip,
        repeats=config.repeats, seed=config.seed, caption_dropout_rate=config.caption_dropout_rate,
        shuffle_caption=config.shuffle_caption, keep_tokens=config.keep_tokens,
    )
    if config.cache_latents and not dataset.is_random:
        cache_latents(dataset, vae)
    prompt_cache = None
    if config.cache_prompt_embeddings and not config.train_text_encoder and not config.shuffle_caption:
        prompts = [r.prompt for r in instance_images + class_images] + [""] * (config.caption_dropout_rate > 0)
        prompt_cache = PromptCache(text_encoders, tokenizers, prompts, config.clip_skip)
    if accelerator.device.type != "cpu":
        for module, idle in [(vae, dataset.latents is not None)] + [
            (te, prompt_cache is not None) for te in text_encoders
        ]:
            if idle:
                module.to("cpu")
        free_memory()
    batch_sampler = BucketBatchSampler(dataset, config.train_batch_size, config.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=config.dataloader_num_workers,
        generator=torch.Generator().manual_seed(config.seed),  # else each epoch's iterator draws from the global RNG
    )

    plan = plan_steps(config, len(batch_sampler), accelerator.num_processes)
    logger.info("%d optimizer steps, %d an epoch", plan.total, plan.steps_per_epoch)

    # 6. Optimizer, learning-rate schedule, and accelerate's wrapping (DDP, mixed precision, accumulation).
    optimizer = build_optimizer(config, optimizer_class, trained)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=plan.total * accelerator.num_processes,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
    names = list(trained)
    *wrapped, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        *trained.values(), optimizer, dataloader, lr_scheduler
    )
    wrapped = dict(zip(names, wrapped))
    trained_params = trainable_parameters(trained)
    # The average starts at the initial weights; diffusers' EMAModel warms its decay up as (1+t)/(10+t).
    ema = EMAModel(trained_params, decay=config.ema_decay, foreach=True) if config.ema_decay else None
    register_checkpoint_hooks(accelerator, trained, ema)
    if config.report_to != "none" and accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-lora", config=tracker_config(config))
    if accelerator.is_main_process:
        write_json_atomic(config.output_dir / RUN_FILE, config.to_dict())

    # 7. Resume: restores the adapters, optimizer, schedule and every RNG, then skips the batches already seen.
    global_step = 0
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        global_step = int(CHECKPOINT.match(resume_dir.name).group(1))
        logger.info("resumed from %s at step %d", resume_dir, global_step)
    first_epoch = global_step // plan.steps_per_epoch
    batches_to_skip = (global_step % plan.steps_per_epoch) * config.gradient_accumulation_steps

    # 8. The loop.
    loss_settings = LossSettings(
        snr_gamma=config.snr_gamma, debiased=config.debiased_estimation_loss, loss_type=config.loss_type,
        huber_schedule=config.huber_schedule, huber_c=config.huber_c, huber_scale=config.huber_scale,
    )  # fmt: skip
    denoiser = wrapped["unet"]
    encoders_in_loop = [wrapped.get(n, te) for n, te in zip(("text_encoder", "text_encoder_2"), text_encoders)]
    if validation and config.validation_at_start and global_step == 0 and accelerator.is_main_process:
        images = validation_images(config, validation, pipeline, accelerator, trained, vae, text_encoders)
        save_validation(config, accelerator, validation, images, 0)
    progress = tqdm(total=plan.total, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    losses: list[float] = []
    start_step, start_time, pause = global_step, time.perf_counter(), 0.0
    for module in trained.values():
        module.train()
    for epoch in range(first_epoch, sys.maxsize):
        if global_step >= plan.total:
            break
        batches = dataloader
        if epoch == first_epoch and batches_to_skip:
            batches = accelerator.skip_first_batches(dataloader, batches_to_skip)
        batches.set_epoch(epoch)  # accelerate passes it on to the dataset and its sampler
        for batch in batches:
            with accelerator.accumulate(*wrapped.values()):
                latents = sample_latents(batch, vae).to(weight_dtype)
                noise = torch.randn_like(latents)
                if config.noise_offset:
                    noise += config.noise_offset * torch.randn(
                        (latents.shape[0], latents.shape[1], 1, 1), device=latents.device, dtype=latents.dtype
                    )
                timesteps = torch.randint(*timestep_range, (latents.shape[0],), device=latents.device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

                if prompt_cache is not None:
                    prompt_embeds, pooled_embeds = prompt_cache.lookup(batch["prompts"])
                else:
                    prompt_embeds, pooled_embeds = encode_prompts(
                        encoders_in_loop, tokenizers, batch["prompts"], config.clip_skip
                    )
                added_cond = None
                if base.family == "sdxl":
                    added_cond = {"text_embeds": pooled_embeds, "time_ids": batch["time_ids"].to(latents.device)}
                model_pred = denoiser(
                    noisy_latents,
                    timesteps,
                    prompt_embeds.to(weight_dtype),
                    added_cond_kwargs=added_cond,
                    return_dict=False,
                )[0]
                target = denoising_target(noise_scheduler, latents, noise, timesteps)

                prior_loss = None
                if config.with_prior_preservation:  # instance views first, class views second (see data.collate)
                    model_pred, prior_pred = model_pred.chunk(2)
                    target, prior_target = target.chunk(2)
                    timesteps, prior_timesteps = timesteps.chunk(2)
                    unweighted = replace(loss_settings, snr_gamma=None, debiased=False)  # as diffusers' prior loss
                    prior_loss = diffusion_loss(prior_pred, prior_target, prior_timesteps, noise_scheduler, unweighted)
                loss = diffusion_loss(model_pred, target, timesteps, noise_scheduler, loss_settings)
                if prior_loss is not None:
                    loss = loss + config.prior_loss_weight * prior_loss

                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trained_params, config.max_grad_norm)
                    # The same on every process (gradients are synced). fp16's scaler skips such steps itself;
                    # under DeepSpeed the norm comes back as a float, or None when its engine keeps it.
                    diverged = grad_norm is not None and not math.isfinite(float(grad_norm))
                    if config.mixed_precision != "fp16" and diverged:
                        progress.close()  # so the error starts a line of its own
                        raise StudioError(
                            f"{config.output_dir}: training diverged at step {global_step + 1} (the gradients are "
                            f"not finite); try a lower --learning-rate. Earlier checkpoints are kept."
                        )
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            logged = {}
            if config.scale_weight_norms is not None:
                logged["keys_scaled"], logged["max_key_norm"] = apply_max_norm(trained, config.scale_weight_norms)
            if ema is not None:
                ema.step(trained_params)
            global_step += 1
            losses.append(loss.detach().item())
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
            accelerator.log({"loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0], **logged}, step=global_step)

            paused_at = time.perf_counter()
            if global_step % plan.checkpoint_every == 0 and global_step < plan.total:
                metadata = lora_metadata(
                    config, base, plan, global_step, resolution, instance_images, len(class_images)
                )
                save_checkpoint(accelerator, config, global_step, trained, initial_state, base.family, metadata, ema)
            if validation and global_step % plan.validate_every == 0 and accelerator.is_main_process:
                with averaged_weights(ema, trained_params):
                    images = validation_images(config, validation, pipeline, accelerator, trained, vae, text_encoders)
                save_validation(config, accelerator, validation, images, global_step)
            pause += time.perf_counter() - paused_at
            if global_step >= plan.total:
                break
    progress.close()
    seconds = time.perf_counter() - start_time - pause

    # 9. Save the LoRA (and the kohya copy), make the base-vs-LoRA grid, report speed and memory.
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(trained_params)  # from here on the adapters are the average: saved, sampled and handed back
    lora_path, kohya_path = config.output_dir / LORA_FILE, None
    if accelerator.is_main_process:
        metadata = lora_metadata(config, base, plan, global_step, resolution, instance_images, len(class_images))
        save_dtype = DTYPES[config.save_precision]
        lora_path = save_lora(config.output_dir, trained, initial_state, base.family, metadata, save_dtype)
        if config.export_kohya:
            kohya_path = export_kohya(
                config.output_dir, trained, initial_state, base.family, metadata, save_dtype, config.output_name
            )
        if validation:
            save_comparison_grid(config, validation, pipeline, accelerator, trained, vae, text_encoders)
    accelerator.end_training()
    steps_done = global_step - start_step
    result = TrainResult(
        lora_path=lora_path,
        kohya_path=kohya_path,
        steps=global_step,
        seconds=seconds,
        steps_per_second=steps_done / seconds if seconds > 0 else 0.0,
        peak_memory_mb=peak_memory_mb(accelerator.device),
        losses=losses,
    )
    if accelerator.is_main_process:
        print(
            f"trained {steps_done} steps in {result.seconds:.1f} s ({result.steps_per_second:.2f} steps/s), "
            f"peak memory {result.peak_memory_mb:.0f} MB; LoRA: {lora_path}"
            + (f"; kohya copy: {kohya_path}" if kohya_path else "")
        )
    return result


# ---- checking inputs ---------------------------------------------------------------------------------------


def check_output_dir(config: TrainConfig) -> None:
    """An output folder must be new, empty (hidden files such as .DS_Store aside), or hold this same run (to
    resume or extend it)."""
    folder = config.output_dir
    if folder.exists() and not folder.is_dir():
        raise StudioError(f"{folder}: output dir is a file")
    if not folder.is_dir() or not any(not p.name.startswith(".") for p in folder.iterdir()):
        return
    if not (folder / RUN_FILE).is_file():
        raise StudioError(f"{folder}: output dir is not empty and holds no training run; pick a new or empty folder")
    differing = config.differences_from(read_run_file(folder / RUN_FILE))
    if differing:
        raise StudioError(
            f"{folder}: output dir holds a different run ({', '.join(differing)} differ); pick a new output dir"
        )


def read_run_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise StudioError(f"{path}: unreadable run description; pick a new or empty output dir") from None


def make_output_dir(config: TrainConfig) -> None:
    """Create the output folder now, the last of the checks, so a path it cannot be made at is one line."""
    try:
        config.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StudioError(f"{config.output_dir}: cannot create the output dir ({error.strerror})") from None


def read_initial_lora(config: TrainConfig) -> LoraFile | None:
    """The `--init-from` LoRA, read and checked against the options (rank, text encoders, DoRA, targets)
    before any model loads; whether the base model has its layers is checked once the adapters are added."""
    if config.init_from is None:
        return None
    lora = read_lora(config.init_from, allow_pickle=config.allow_pickle)
    check_initial_lora(config, lora)
    return lora


def check_initial_lora(config: TrainConfig, lora: LoraFile) -> None:
    """The `--init-from` file `lora`, already read, against the options (rank, text encoders, DoRA, targets)."""
    if not lora.modules:
        raise StudioError(f"{config.init_from}: holds no LoRA layers to start from")
    ranks = sorted({module.converted_rank for module in lora.modules})
    if ranks != [config.rank]:
        raise StudioError(
            f"{config.init_from}: its layers have rank {', '.join(map(str, ranks))}, "
            + (f"pass --rank {ranks[0]}" if len(ranks) == 1 else "and one --rank cannot hold them all")
        )
    text_layers = [m for m in lora.modules if m.component != "unet"]
    if text_layers and not config.train_text_encoder:
        raise StudioError(f"{config.init_from}: adapts the text encoder too; add --train-text-encoder")
    has_dora = any(module.dora for module in lora.modules)
    if has_dora != config.dora:
        needed = "is DoRA (it has magnitude vectors): add --dora" if has_dora else "is plain LoRA: leave out --dora"
        raise StudioError(f"{config.init_from}: {needed}")
    check_initial_lora_targets(config, lora)


def settings_to_train_further(lora: LoraFile) -> dict[str, object]:
    """The options under which `read_initial_lora` accepts `lora` as `--init-from`: its rank, the target names
    of its layers, the text encoders and DoRA when it has them. The UI fills its fields from these."""
    if not lora.modules:
        raise StudioError(f"{lora.path}: holds no LoRA layers to start from")
    ranks = sorted({module.converted_rank for module in lora.modules})
    if len(ranks) > 1:
        raise StudioError(
            f"{lora.path}: its layers have ranks {', '.join(map(str, ranks))}, and one rank cannot hold them all"
        )
    settings: dict[str, object] = {"rank": ranks[0], "dora": any(module.dora for module in lora.modules)}
    for component, option, known in (("unet", "unet_targets", UNET_TARGETS),
                                     ("text", "text_encoder_targets", TEXT_ENCODER_TARGETS)):  # fmt: skip
        layers = [module.module for module in lora.modules if module.component.startswith(component)]
        named = [target for target in known if any(names_module(target, layer) for layer in layers)]
        if named:
            settings[option] = named
    settings["train_text_encoder"] = "text_encoder_targets" in settings
    return settings


def check_initial_lora_targets(config: TrainConfig, lora: LoraFile) -> None:
    """Every layer of the `--init-from` file must be one the targets adapt: else name the targets to pass."""
    for component, flag, targets, known in (
        ("unet", "--unet-targets", config.unet_targets, UNET_TARGETS),
        ("text", "--text-encoder-targets", config.text_encoder_targets, TEXT_ENCODER_TARGETS),
    ):
        missing = []
        for module in lora.modules:
            if module.component.startswith(component) and not any(names_module(t, module.module) for t in targets):
                name = next((k for k in known if names_module(k, module.module)), None)
                if name is None:
                    raise StudioError(
                        f"{lora.path}: adapts {module.component}.{module.module}, a layer this trainer does not "
                        f"train (it trains {', '.join(known)})"
                    )
                missing.append(name)
        if missing:
            needed = targets + sorted(set(missing), key=known.index)
            raise StudioError(f"{lora.path}: adapts layers outside the targets; pass {flag} {','.join(needed)}")


def start_from_lora(lora: LoraFile, trained: dict[str, torch.nn.Module], family: str) -> None:
    """Set the new adapters to the file's changes: A from the file, B divided by the adapter's own scale
    (`read_lora` bakes the file's scale into its factors), so scale * B @ A is the file's delta for every
    layer, whatever --alpha says. Targeted layers the file lacks keep their fresh start (no change). The
    file's layers are within the targets (`check_initial_lora_targets`); here they must exist and fit. Its
    text-encoder layers that get no LoRA here (their output does not reach the UNet: `conditioning_layers`)
    are left out, with a warning."""
    check_family(lora, family)
    left_out = []
    for module in lora.modules:
        name = f"{module.component}.{module.module}"
        try:
            layer = trained[module.component].get_submodule(module.module)
        except AttributeError:
            layer = None
        if module.component != "unet" and isinstance(layer, torch.nn.Linear):
            left_out.append(name)
            continue
        down, up = lora.state_dict[f"{name}.lora_A.weight"], lora.state_dict[f"{name}.lora_B.weight"]
        if not isinstance(layer, BaseTunerLayer) or "default" not in layer.lora_A:
            raise StudioError(f"{lora.path}: adapts {name}, which the base model does not have: for another model?")
        if layer.lora_A["default"].weight.shape != down.shape or layer.lora_B["default"].weight.shape != up.shape:
            raise StudioError(f"{lora.path}: {name} does not fit the base model's layer: for another model?")
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(down)
            layer.lora_B["default"].weight.copy_(up / layer.scaling["default"])
            if module.dora:
                layer.lora_magnitude_vector["default"].weight.copy_(
                    lora.state_dict[f"{name}.lora_magnitude_vector.weight"]
                )
    if left_out:
        logger.warning(
            "%s: leaving out %d text-encoder layer(s) whose output does not reach the UNet at this clip skip "
            "(e.g. %s)", lora.path, len(left_out), left_out[0],
        )  # fmt: skip
    logger.info("starting from %s (%d layers)", lora.path, len(lora.modules) - len(left_out))


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint folder to resume from: the highest complete one for "latest", else the path given."""
    if config.resume_from_checkpoint is None:
        if list_checkpoints(config.output_dir):
            logger.warning(
                "%s holds checkpoints of this run: --resume-from-checkpoint latest continues it", config.output_dir
            )
        return None
    if config.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(config.output_dir)
        if not checkpoints:
            logger.info("no checkpoint in %s yet: starting a new run", config.output_dir)
            return None
        return checkpoints[-1]
    path = Path(config.resume_from_checkpoint)
    if not path.is_dir() and (config.output_dir / path).is_dir():
        path = config.output_dir / path
    if not path.is_dir() or not CHECKPOINT.match(path.name):
        raise StudioError(f"{config.resume_from_checkpoint}: no such checkpoint folder (checkpoint-N)")
    if path.parent.resolve() != config.output_dir.resolve():  # another run's: it must be this same run
        run_file = path.parent / RUN_FILE
        if not run_file.is_file():
            raise StudioError(f"{path}: no {RUN_FILE} beside it, so not a checkpoint of a run of this trainer")
        differing = config.differences_from(read_run_file(run_file))
        if differing:
            raise StudioError(f"{path}: a checkpoint of a different run ({', '.join(differing)} differ)")
    return path


def plan_steps(config: TrainConfig, batches_per_epoch: int, num_processes: int) -> StepPlan:
    """Lengths in optimizer steps. An epoch is `batches_per_epoch` batches in all; accelerate gives each process
    ceil(batches / processes) of them (repeating a few to even them out), and steps the optimizer at an epoch's
    end even when its last accumulation is incomplete."""
    per_epoch = math.ceil(math.ceil(batches_per_epoch / num_processes) / config.gradient_accumulation_steps)
    steps = {}
    for steps_name, (epochs_name, default_steps) in STEPS_OR_EPOCHS.items():
        given_steps, epochs = getattr(config, steps_name), getattr(config, epochs_name)
        steps[steps_name] = epochs * per_epoch if epochs is not None else given_steps or default_steps
    return StepPlan(per_epoch, steps["max_train_steps"], steps["checkpointing_steps"], steps["validation_steps"])


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (`checkpoint-N`, never the `.tmp` folders of an interrupted save), oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def optimizer_class_for(name: str) -> type[torch.optim.Optimizer]:
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise StudioError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit
    try:
        import prodigyopt
    except ImportError:
        raise StudioError("--optimizer prodigy needs prodigyopt: pip install prodigyopt") from None
    return prodigyopt.Prodigy


def make_accelerator(config: TrainConfig) -> Accelerator:
    report_to = config.report_to
    if report_to == "auto":
        report_to = "tensorboard" if is_tensorboard_available() else "none"
    elif report_to == "tensorboard" and not is_tensorboard_available():
        raise StudioError("--report-to tensorboard needs tensorboard: pip install tensorboard")
    elif report_to == "wandb" and not is_wandb_available():
        raise StudioError("--report-to wandb needs wandb: pip install wandb")
    config.report_to = report_to
    try:
        return Accelerator(
            cpu=pick_device_dtype()[0].type == "cpu",  # lets torchrun / accelerate launch run DDP over gloo on CPUs
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=None if report_to == "none" else report_to,
            project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=config.output_dir / "logs"),
        )
    except ValueError as error:  # e.g. fp16 on a machine without a GPU
        raise StudioError(f"--mixed-precision {config.mixed_precision}: {str(error).splitlines()[0]}") from None


# ---- models and adapters -----------------------------------------------------------------------------------


def complete_class_images(
    config: TrainConfig, pipeline, accelerator: Accelerator, existing: list[ImageRecord], resolution: int
) -> list[ImageRecord]:
    """Generate the class images the class folder lacks (split across processes) and keep them there."""
    missing = config.num_class_images - len(existing)
    if missing > 0:
        config.class_dir.mkdir(parents=True, exist_ok=True)
        numbers = []  # generated-NNNNN.png names not taken yet; the number also seeds the image
        for number in itertools.count():
            if len(numbers) == missing:
                break
            if not (config.class_dir / f"generated-{number:05d}.png").exists():
                numbers.append(number)
        logger.info("generating %d class images for %r in %s", missing, config.class_prompt, config.class_dir)
        with accelerator.split_between_processes(numbers) as my_numbers:
            for start in range(0, len(my_numbers), config.sample_batch_size):
                chunk = my_numbers[start : start + config.sample_batch_size]
                images = pipeline(
                    **prompt_arguments(pipeline, [config.class_prompt] * len(chunk), None, config.clip_skip),
                    num_inference_steps=config.inference_steps,
                    height=resolution,
                    width=resolution,
                    generator=[torch.Generator(accelerator.device).manual_seed(config.seed + n) for n in chunk],
                ).images
                for number, image in zip(chunk, images):
                    save_image_atomic(image, config.class_dir / f"generated-{number:05d}.png")
        accelerator.wait_for_everyone()
        existing = scan_images(
            config.class_dir, config.class_prompt, "class", caption_extension=config.caption_extension
        )
    return existing[: config.num_class_images]


def lora_config(
    config: TrainConfig, targets: list[str], layers: list[int] | None = None, conv_modules: list[str] = ()
) -> LoraConfig:
    """peft's config for one model; `layers` limits a text encoder's LoRA to those transformer layers, and
    `conv_modules` (full names) get `--conv-rank` and `--conv-alpha` through peft's rank and alpha patterns."""
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        init_lora_weights=True if config.init == "default" else config.init,
        target_modules=targets,
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
        use_rslora=config.rslora,
        use_dora=config.dora,
        rank_pattern={name: config.conv_rank for name in conv_modules},
        alpha_pattern={name: config.conv_alpha for name in conv_modules},
    )


def convolutions(unet: torch.nn.Module, config: TrainConfig) -> list[str]:
    """The targeted 3x3 convolutions, which `--conv-rank` sizes (kohya's conv_dim; 1x1 ones count as linear)."""
    if config.conv_rank is None:
        return []
    return [
        name for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)
        and any(names_module(target, name) for target in config.unet_targets)
    ]  # fmt: skip


def conditioning_layers(name: str, text_encoder: torch.nn.Module, family: str, clip_skip: int) -> list[int] | None:
    """The text-encoder layers whose output reaches the UNet (None: all of them). LoRA on the others could
    never learn: the file would carry zeros, and DDP stops on parameters without gradients.

    SD1/SD2 condition on layer L - clip_skip (0-based, of L); SDXL's first encoder on the one before that;
    its second encoder's last layer feeds the pooled embedding, so all of its layers count."""
    if name == "text_encoder_2":
        return None
    last_used = text_encoder.config.num_hidden_layers - clip_skip - (family == "sdxl")
    if last_used == text_encoder.config.num_hidden_layers - 1:
        return None
    return list(range(last_used + 1))


def add_lora(module: torch.nn.Module, name: str, config: LoraConfig) -> None:
    """Inject the LoRA layers with peft itself, as diffusers' and transformers' `add_adapter` do inside: the
    transformers wrapper refuses to run unless peft is at least the version it was released with."""
    try:
        inject_adapter_in_model(config, module)
    except ValueError as error:  # peft: none of the target modules exists in this model
        raise StudioError(
            f"{name}: cannot add LoRA on {sorted(config.target_modules)}: {str(error).splitlines()[0]}"
        ) from None


def trainable_parameters(trained: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for module in trained.values() for p in module.parameters() if p.requires_grad]


def set_lora_enabled(modules, enabled: bool) -> None:
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.enable_adapters(enabled)


def adapter_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft naming (`...to_k.lora_A.weight`), detached copies."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(module).items()}


def build_optimizer(config: TrainConfig, optimizer_class, trained: dict[str, torch.nn.Module]) -> torch.optim.Optimizer:
    """One parameter group per model (the text encoders have their own learning rate and weight decay); with
    LoRA+, peft splits each into A and B groups, B at `loraplus_lr_ratio` times the rate."""
    kwargs = {"weight_decay": config.adam_weight_decay, "eps": config.adam_epsilon}
    kwargs["betas"] = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "prodigy":
        kwargs.update(
            beta3=config.prodigy_beta3, decouple=config.prodigy_decouple,
            use_bias_correction=config.prodigy_use_bias_correction, safeguard_warmup=config.prodigy_safeguard_warmup,
        )  # fmt: skip
    text_encoder_decay = config.adam_weight_decay_text_encoder
    if text_encoder_decay is None:
        text_encoder_decay = config.adam_weight_decay
    groups = []
    for name, module in trained.items():
        if name == "unet":
            lr, decay = config.learning_rate, config.adam_weight_decay
        else:
            lr, decay = config.text_encoder_lr, text_encoder_decay
        if config.loraplus_lr_ratio is None:
            params = [p for p in module.parameters() if p.requires_grad]
            groups.append({"params": params, "lr": lr, "weight_decay": decay})
        else:
            loraplus = create_loraplus_optimizer(
                module, optimizer_class, lr=lr, loraplus_lr_ratio=config.loraplus_lr_ratio,
                loraplus_weight_decay=decay, **kwargs,
            )  # fmt: skip
            groups += [g for g in loraplus.param_groups if g["params"]]
    if optimizer_class is torch.optim.AdamW:
        # One fused kernel for all LoRA tensors where torch has one (CPU, CUDA); else one grouped update. On CPU,
        # for tiny-sd's 96 LoRA tensors: 0.65 ms a step, against 1.5-1.8 ms grouped and 2.7 ms tensor by tensor.
        fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
        kwargs["fused" if fused else "foreach"] = True
    return optimizer_class(groups, lr=config.learning_rate, **kwargs)


def denoising_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon models) or the velocity (v-prediction, SD2-v)."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


@dataclass(frozen=True)
class LossSettings:
    """How the denoising error becomes the loss (`diffusion_loss`): the error measure (kohya's --loss_type,
    with its Huber threshold schedule) and the per-sample weights."""

    snr_gamma: float | None = None
    debiased: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0


def diffusion_loss(model_pred, target, timesteps, noise_scheduler, settings: LossSettings) -> torch.Tensor:
    """The error of each sample (mean squared by default; see `elementwise_loss`), optionally weighted per
    sample (both weights multiply when both are on), averaged:

    - min-SNR (https://arxiv.org/abs/2303.09556): the x0-loss weighted by min(SNR, gamma), which is the noise
      loss times min(SNR, gamma) / SNR and the velocity loss times min(SNR, gamma) / (SNR + 1). Written so that
      SNR = 0 (the last timestep of zero-terminal-SNR schedules, such as the demo model's) gives weight 1 and
      0, where the plain quotient gives NaN.
    - debiased estimation (kohya's; https://arxiv.org/abs/2310.08442): 1 / sqrt(SNR) for the noise loss,
      1 / (SNR + 1) for the velocity loss, with SNR held to [the schedule's smallest positive SNR, 1000] so
      that SNR = 0 and the nearly clean steps keep finite weights."""
    if settings.loss_type == "l2" and settings.snr_gamma is None and not settings.debiased:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    errors = elementwise_loss(model_pred, target, timesteps, noise_scheduler, settings)
    per_sample = errors.mean(dim=list(range(1, errors.ndim)))
    if settings.snr_gamma is None and not settings.debiased:
        return per_sample.mean()
    snr = compute_snr(noise_scheduler, timesteps)
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    weights = torch.ones_like(snr)
    if settings.snr_gamma is not None:
        gamma = settings.snr_gamma
        if v_prediction:
            weights = weights * torch.clamp(snr, max=gamma) / (snr + 1)
        else:
            weights = weights * torch.clamp(gamma / snr, max=1.0)  # = min(SNR, gamma) / SNR; gamma / 0 = inf -> 1
    if settings.debiased:
        alphas_cumprod = noise_scheduler.alphas_cumprod
        all_snr = alphas_cumprod / (1 - alphas_cumprod)
        held = snr.clamp(min=float(all_snr[all_snr > 0].min()), max=1000.0)
        weights = weights * (1 / (held + 1) if v_prediction else held.rsqrt())
    return (per_sample * weights).mean()


def elementwise_loss(model_pred, target, timesteps, noise_scheduler, settings: LossSettings) -> torch.Tensor:
    """kohya's error measures: squared (l2), absolute (l1), or the pseudo-Huber forms with threshold c,
    2c(sqrt(d² + c²) - c) ("huber": quadratic for small d, c|d| beyond) and 2(sqrt(d² + c²) - c) ("smooth_l1")."""
    difference = model_pred.float() - target.float()
    if settings.loss_type == "l2":
        return difference**2
    if settings.loss_type == "l1":
        return difference.abs()
    c = huber_threshold(timesteps, noise_scheduler, settings).view(-1, *[1] * (difference.ndim - 1))
    smooth = torch.sqrt(difference**2 + c**2) - c
    return 2 * c * smooth if settings.loss_type == "huber" else 2 * smooth


def huber_threshold(timesteps: torch.Tensor, noise_scheduler, settings: LossSettings) -> torch.Tensor:
    """kohya's schedules of the Huber threshold c per sample: "constant" c x scale; "exponential" from scale
    at t = 0 down to c x scale at the last timestep; "snr" (kohya's default) (1 - c) / (1 + sigma)² + c with
    sigma = sqrt((1 - alpha_bar) / alpha_bar): near 1 (quadratic) on clean steps, c on the noisiest."""
    timesteps = timesteps.float()
    if settings.huber_schedule == "constant":
        return torch.full_like(timesteps, settings.huber_c * settings.huber_scale)
    if settings.huber_schedule == "exponential":
        rate = -math.log(settings.huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps) * settings.huber_scale
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps.long()]
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
    return (1 - settings.huber_c) / (1 + sigmas) ** 2 + settings.huber_c


@torch.no_grad()
def apply_max_norm(trained: dict[str, torch.nn.Module], max_norm: float) -> tuple[int, float]:
    """kohya's max-norm regularisation: a LoRA layer whose change, scale * B @ A, has a (Frobenius) norm above
    `max_norm` gets A and B each multiplied by sqrt(max_norm / norm), so the change keeps its direction at norm
    `max_norm`. Returns how many layers were scaled and the largest norm left (kohya logs both)."""
    scaled, largest = 0, 0.0
    for module in trained.values():
        for layer in module.modules():
            if not isinstance(layer, BaseTunerLayer) or "default" not in layer.lora_A:
                continue
            down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            norm = float((layer.scaling["default"] * up.flatten(1) @ down.flatten(1)).norm())
            if norm > max_norm:
                factor = (max_norm / norm) ** 0.5
                down.mul_(factor)
                up.mul_(factor)
                scaled, norm = scaled + 1, max_norm
            largest = max(largest, norm)
    return scaled, largest


# ---- checkpoints -------------------------------------------------------------------------------------------


def register_checkpoint_hooks(
    accelerator: Accelerator, trained: dict[str, torch.nn.Module], ema: EMAModel | None
) -> None:
    """Checkpoints hold the adapters' tensors only, not the frozen base weights (as diffusers' scripts do), and
    the weight average with its step count when `--ema-decay` is on, all in one safetensors file."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            state = {
                f"{name}.{key}": value
                for name, module in trained.items()
                for key, value in adapter_state(module).items()
            }
            if ema is not None:
                state |= {f"{EMA_PREFIX}{i}": shadow for i, shadow in enumerate(ema.shadow_params)}
                state[EMA_STEP_KEY] = torch.tensor(ema.optimization_step)
            safetensors.torch.save_file(state, os.path.join(output_dir, TRAINING_STATE_FILE))
        weights.clear()  # accelerate would otherwise save every model's full state dict

    def load_hook(models, input_dir):
        state = safetensors.torch.load_file(os.path.join(input_dir, TRAINING_STATE_FILE))
        for name, module in trained.items():
            prefix = f"{name}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(module, own)
            if result.unexpected_keys:
                raise StudioError(f"{input_dir}: checkpoint does not match this run ({name})")
        if ema is not None:
            if EMA_STEP_KEY not in state:
                raise StudioError(f"{input_dir}: checkpoint has no weight average (it was saved without --ema-decay)")
            for i, shadow in enumerate(ema.shadow_params):
                shadow.copy_(state[f"{EMA_PREFIX}{i}"])
            ema.optimization_step = int(state[EMA_STEP_KEY])
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator: Accelerator,
    config: TrainConfig,
    step: int,
    trained,
    initial_state,
    family: str,
    metadata: dict,
    ema: EMAModel | None,
) -> None:
    """accelerate's state (optimizer, schedule, RNGs) plus the LoRA so far (the average, with `--ema-decay`),
    written to `checkpoint-N.tmp` and renamed when complete, so an interrupted save never leaves a half
    checkpoint behind."""
    final = config.output_dir / f"checkpoint-{step}"
    staging = config.output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every process has written its RNG state before the folder is renamed
    if accelerator.is_main_process:
        with averaged_weights(ema, trainable_parameters(trained)):
            save_lora(staging, trained, initial_state, family, metadata, DTYPES[config.save_precision])
        if final.exists():  # the same step saved again after resuming from an earlier checkpoint
            remove_checkpoint(final)
        os.replace(staging, final)
        checkpoints = list_checkpoints(config.output_dir)
        if config.checkpoints_total_limit is not None:
            for old in checkpoints[: max(0, len(checkpoints) - config.checkpoints_total_limit)]:
                remove_checkpoint(old)
    accelerator.wait_for_everyone()


def remove_checkpoint(folder: Path) -> None:
    """Rename first, then delete: a kill while deleting leaves a `.removing` folder, never a `checkpoint-N`
    with files missing that `--resume-from-checkpoint` would pick."""
    doomed = folder.with_name(f"{folder.name}.removing")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


@contextlib.contextmanager
def averaged_weights(ema: EMAModel | None, params: list[torch.nn.Parameter]):
    """The weight average in place of the trained weights while a LoRA is saved or sampled, then back."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


# ---- saving the LoRA ---------------------------------------------------------------------------------------


def exported_adapter(module: torch.nn.Module, initial: dict[str, torch.Tensor] | None) -> tuple[dict, dict]:
    """The adapter as a plain LoRA relative to the original base weights, and its peft config as a dict.

    PiSSA/OLoRA changed the base to W - s·B0·A0; the learned change is s·(B·A - B0·A0), which is the plain
    LoRA [B, -B0] @ [A; A0] of twice the rank (alpha scaled to keep s), as peft's `subtract_mutated_init`."""
    state = adapter_state(module)
    lora_settings = module.peft_config["default"].to_dict()
    lora_settings["init_lora_weights"] = True  # the tensors are trained: loading must not re-initialise
    if initial is None:
        return state, lora_settings
    for key, value in state.items():
        if "lora_A" in key:
            state[key] = torch.cat([value, initial[key]], dim=0)
        elif "lora_B" in key:
            state[key] = torch.cat([value, -initial[key]], dim=1)
    alpha_factor = math.sqrt(2) if lora_settings["use_rslora"] else 2
    lora_settings["r"] *= 2
    lora_settings["lora_alpha"] *= alpha_factor
    lora_settings["rank_pattern"] = {k: v * 2 for k, v in lora_settings["rank_pattern"].items()}
    lora_settings["alpha_pattern"] = {k: v * alpha_factor for k, v in lora_settings["alpha_pattern"].items()}
    return state, lora_settings


def save_lora(
    folder: Path, trained, initial_state, family: str, metadata: dict[str, str], dtype: torch.dtype
) -> Path:
    """`folder/pytorch_lora_weights.safetensors` via diffusers' own `save_lora_weights` (the adapters' peft
    configs go in its `lora_adapter_metadata`), then our metadata added and the tensors cast to `dtype`;
    written under a temp name, renamed.

    Keys are in peft naming (`unet.<module>.lora_A.weight`), which diffusers loads natively. Not passed
    through `convert_state_dict_to_diffusers` as diffusers' scripts do: that renames attention projections
    only (`to_k.lora.down`), and diffusers then silently skips them in a file that also adapts other layers.
    Text-encoder paths get the `text_model.` prefix of the transformers-4 layout, which every tool reads, and
    DoRA magnitudes there a `.weight` suffix, without which transformers 5 leaves them at their initial values."""
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    layers, settings = {}, {}
    for name, module in trained.items():
        state, lora_settings = exported_adapter(module, initial_state[name] if initial_state else None)
        if name != "unet":  # transformers 5 loads DoRA magnitudes only as `...lora_magnitude_vector.weight`
            state = {
                ("" if k.startswith("text_model.") else "text_model.") + k
                + (".weight" if k.endswith("lora_magnitude_vector") else ""): v
                for k, v in state.items()
            }  # fmt: skip
        layers[f"{name}_lora_layers"] = state
        settings[f"{name}_lora_adapter_metadata"] = lora_settings
    staging_name = f".{LORA_FILE}.{os.getpid()}.staging"
    pipeline_class.save_lora_weights(folder, weight_name=staging_name, **layers, **settings)
    staging = folder / staging_name
    with safetensors.safe_open(staging, framework="pt") as handle:
        diffusers_metadata = handle.metadata() or {}
    tensors = {key: value.to(dtype) for key, value in safetensors.torch.load_file(staging).items()}
    path = folder / LORA_FILE
    save_safetensors_atomic(tensors, path, {**diffusers_metadata, **metadata})
    staging.unlink()
    return path


def export_kohya(
    folder: Path, trained, initial_state, family: str, metadata: dict[str, str], dtype: torch.dtype,
    output_name: str | None,
) -> Path:
    """A kohya-named copy (`lora_unet_…`, `lora_te…`, `.lora_down/.lora_up/.alpha`) for A1111 / ComfyUI,
    written by `studio.lora_io.write_lora` from the same adapters with each module's scale baked in (in
    float32, before the cast to `dtype`)."""
    state = {}
    for name, module in trained.items():
        tensors, _ = exported_adapter(module, initial_state[name] if initial_state else None)
        for key, value in tensors.items():
            if "lora_B" in key:  # each layer's own scale: --conv-rank's layers have theirs (PiSSA's doubling keeps it)
                value = value * module.get_submodule(key.rpartition(".lora_B")[0]).scaling["default"]
            state[f"{name}.{key}"] = value.to(dtype)
    name = output_name or f"{folder.name}_kohya"
    return write_lora(folder / f"{name}.safetensors", state, metadata, naming="kohya", family=family)


def lora_metadata(
    config: TrainConfig, base: BaseModel, plan: StepPlan, steps: int, resolution: int, images: list[ImageRecord],
    num_class: int,
) -> dict[str, str]:
    """Safetensors metadata: `studio.*` keys, and kohya's `ss_*` keys where one means the same thing.

    `ss_tag_frequency` counts the instance captions' comma-separated tags (lowercased, every occurrence) under
    each image folder's name, as kohya does: what civitai and A1111 show as the training tags. Without an
    instance prompt, the kohya-style folders' prompts are the trigger words."""
    v_prediction = base.pipeline.scheduler.config.get("prediction_type") == "v_prediction"
    by_folder: dict[str, list[ImageRecord]] = {}
    for image in images:
        by_folder.setdefault(image.path.parent.name, []).append(image)
    concepts = ", ".join(dict.fromkeys(p for f, p, _ in concept_folders(config.instance_dir) if f.name in by_folder))
    trigger_words = config.trigger_words or concepts
    values = config.to_dict()
    shared_config = values | {name: _name_only(values[name]) for name in PATH_OPTIONS}
    return {
        **modelspec_metadata(config, base, resolution, trigger_words),
        "studio.base_model": _name_only(base.source),
        "studio.family": base.family,
        "studio.rank": str(config.rank),
        "studio.alpha": str(config.alpha),
        "studio.unet_targets": ",".join(config.unet_targets),
        "studio.text_encoder_targets": ",".join(config.text_encoder_targets) if config.train_text_encoder else "",
        "studio.trigger_words": trigger_words,
        "studio.trigger_prompt": config.instance_prompt or concepts,
        "studio.steps": str(steps),
        "studio.resolution": str(resolution),
        "studio.prediction_type": "v_prediction" if v_prediction else "epsilon",
        "studio.train_config": json.dumps(shared_config, sort_keys=True),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_network_dropout": str(config.dropout),
        "ss_network_args": json.dumps({
            "init": config.init, "use_rslora": config.rslora, "use_dora": config.dora,
            **({"conv_dim": str(config.conv_rank), "conv_alpha": str(config.conv_alpha)} if config.conv_rank else {}),
        }),
        "ss_base_model_version": KOHYA_BASE_VERSIONS[base.family],
        "ss_v2": str(base.family == "sd2"),
        "ss_v_parameterization": str(v_prediction),
        "ss_sd_model_name": _name_only(base.source),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_enable_bucket": str(config.buckets is not None),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": str(config.text_encoder_lr) if config.train_text_encoder else "0",
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_max_train_steps": str(plan.total),
        "ss_steps": str(steps),
        "ss_num_epochs": str(math.ceil(plan.total / plan.steps_per_epoch)),
        "ss_epoch": str(math.ceil(steps / plan.steps_per_epoch)),
        "ss_seed": str(config.seed),
        "ss_batch_size_per_device": str(config.train_batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": config.optimizer,
        "ss_mixed_precision": config.mixed_precision,
        "ss_noise_offset": str(config.noise_offset),
        "ss_caption_dropout_rate": str(config.caption_dropout_rate),
        "ss_shuffle_caption": str(config.shuffle_caption),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_clip_skip": str(config.clip_skip),
        "ss_min_snr_gamma": str(config.snr_gamma),
        "ss_debiased_estimation": str(config.debiased_estimation_loss),
        "ss_scale_weight_norms": str(config.scale_weight_norms),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_loss_type": config.loss_type,
        "ss_huber_schedule": config.huber_schedule,
        "ss_huber_c": str(config.huber_c),
        "ss_huber_scale": str(config.huber_scale),
        "ss_prior_loss_weight": str(config.prior_loss_weight),
        "ss_output_name": config.output_name or config.output_dir.name,
        "ss_num_train_images": str(sum(image.repeats for image in images) * config.repeats),
        "ss_num_reg_images": str(num_class),
        "ss_tag_frequency": json.dumps({
            folder: Counter(tag for image in group for tag in _tags(image.prompt))
            for folder, group in by_folder.items()
        }),
        "ss_dataset_dirs": json.dumps({
            folder: {"n_repeats": group[0].repeats * config.repeats, "img_count": len(group)}
            for folder, group in by_folder.items()
        }),
        **({"ss_training_comment": config.training_comment} if config.training_comment else {}),
    }


def modelspec_metadata(config: TrainConfig, base: BaseModel, resolution: int, trigger_words: str | None) -> dict[str, str]:
    """Stability AI's model spec keys (`modelspec.*`) as kohya writes them for a LoRA: ComfyUI, civitai and
    other tools read the architecture, title and trigger phrase from them."""
    scheduler = base.pipeline.scheduler.config
    v_prediction = scheduler.get("prediction_type") == "v_prediction"
    architecture = MODELSPEC_ARCHITECTURES[base.family]
    if base.family == "sd2" and v_prediction:
        architecture = "stable-diffusion-v2-768-v"
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if base.family == "sdxl"
        else "diffusers",
        "modelspec.title": config.metadata_title or config.output_name or config.output_dir.name,
        "modelspec.date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.encoder_layer": str(config.clip_skip),
    }
    if config.min_timestep or config.max_timestep is not None:
        spec["modelspec.timestep_range"] = f"{config.min_timestep},{config.max_timestep or scheduler.num_train_timesteps}"
    if trigger_words:
        spec["modelspec.trigger_phrase"] = trigger_words
    for name in ("author", "description", "license", "tags"):
        if getattr(config, f"metadata_{name}"):
            spec[f"modelspec.{name}"] = getattr(config, f"metadata_{name}")
    return spec


def _name_only(value: str | None) -> str | None:
    """A local path cut to its last part (hub ids and built-in names stay): the metadata travels with a shared
    LoRA, the trainer's folders and user name should not (kohya records names only, too)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return path.name if path.is_absolute() or path.exists() else value


# ---- validation --------------------------------------------------------------------------------------------


@torch.no_grad()
def validation_images(
    config: TrainConfig, wanted: list[ValidationImage], pipeline, accelerator, trained, vae, text_encoders
) -> list[Image.Image]:
    """The `wanted` images with the LoRA as trained so far, in order; those that differ only in their seed are
    drawn in one pipeline call."""
    for module in trained.values():
        module.eval()
    images = []
    try:
        with offload_models(vae, *text_encoders, device=accelerator.device), accelerator.autocast():
            for _, group in itertools.groupby(wanted, key=ValidationImage.settings):
                group = list(group)
                first = group[0]
                extra = {} if first.guidance_scale is None else {"guidance_scale": first.guidance_scale}
                images += pipeline(
                    **prompt_arguments(pipeline, [first.prompt] * len(group), first.negative_prompt, config.clip_skip),
                    num_inference_steps=first.steps or config.inference_steps,
                    height=first.height or config.resolution,
                    width=first.width or config.resolution,
                    generator=[torch.Generator(accelerator.device).manual_seed(image.seed) for image in group],
                    **extra,
                ).images
    finally:
        for module in trained.values():
            module.train()
    return images


def save_validation(
    config: TrainConfig, accelerator: Accelerator, wanted: list[ValidationImage], images: list[Image.Image], step: int
) -> None:
    folder = config.output_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image_atomic(image, folder / f"step-{step:06d}-{i}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            for i, image in enumerate(images):  # one by one: a prompt file's images may differ in size
                tracker.writer.add_image(f"validation/{i}", np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(i, caption=w.prompt) for w, i in zip(wanted, images)]}, step=step)


def save_comparison_grid(
    config: TrainConfig, wanted: list[ValidationImage], pipeline, accelerator, trained, vae, text_encoders
) -> Path:
    """Top row the base model, bottom row with the LoRA: same prompts, same seeds. A prompt file's images of
    mixed sizes are each centred, unscaled, on a white tile of the largest width and height."""
    with_lora = validation_images(config, wanted, pipeline, accelerator, trained, vae, text_encoders)
    set_lora_enabled(trained.values(), False)
    try:
        without = validation_images(config, wanted, pipeline, accelerator, trained, vae, text_encoders)
    finally:
        set_lora_enabled(trained.values(), True)
    images = without + with_lora
    width, height = max(i.width for i in images), max(i.height for i in images)
    tiles = []
    for image in images:
        tile = Image.new("RGB", (width, height), "white")
        tile.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
        tiles.append(tile)
    grid = make_image_grid(tiles, rows=2, cols=len(with_lora))
    path = config.output_dir / "validation_grid.png"
    save_image_atomic(grid, path)
    return path


# ---- small helpers -----------------------------------------------------------------------------------------


def _tags(caption: str) -> list[str]:
    return [tag.strip().lower() for tag in caption.split(",") if tag.strip()]


def tracker_config(config: TrainConfig) -> dict:
    """TensorBoard's hparams take scalars only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on a GPU; the process's peak resident memory (RSS) otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    temp = _temp_name(path)
    safetensors.torch.save_file(tensors, temp, metadata=metadata)
    os.replace(temp, path)


def save_image_atomic(image: Image.Image, path: Path) -> None:
    temp = _temp_name(path)
    image.save(temp, format="PNG")
    os.replace(temp, path)


def write_json_atomic(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_name(path)
    temp.write_text(json.dumps(value, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(temp, path)


if __name__ == "__main__":
    sys.exit(main())
