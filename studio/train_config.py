"""The DreamBooth LoRA training options: one dataclass, filled from the command line, a TOML/YAML file, or code.

Every field is one option. Its flag is the field name with dashes (`--max-train-steps`); the underscore
spelling that diffusers' docs use (`--max_train_steps`) works too, and so do both spellings as keys of a
`--config` file. Where diffusers' or kohya's scripts name the same option differently, that name works as
well (`--pretrained_model_name_or_path`, `--instance_data_dir`, `--network_dim`, ...); their flags that have
no equivalent here get a one-line hint saying what to use. Precedence: defaults < config file < command line.
Value checks live in `__post_init__`, so a `TrainConfig` built from code is checked the same way; checks that
need the disk (folders, images, the output folder) are the trainer's, and still run before any model is loaded.
"""

from __future__ import annotations

import argparse
import math
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from diffusers.optimization import SchedulerType

from studio.data import IMAGE_SUFFIXES
from studio.errors import StudioError

# The names LoRA can target, as module-name suffixes (see `names_module`); a longer suffix narrows the
# choice, e.g. `attn2.to_k` for the cross-attention keys only.
UNET_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0",  # attention projections
    "add_k_proj", "add_v_proj",  # added-KV attention (some UNet variants)
    "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",  # transformer blocks
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",  # resnet blocks
)  # fmt: skip
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
INITS = ("default", "gaussian", "pissa", "olora")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
CROPS = ("center", "random")
REPORT_TO = ("auto", "none", "tensorboard", "wandb")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
DEFAULT_TEXT_ENCODER_LR = 5e-6
POLYNOMIAL_LR_END = 1e-7  # where diffusers' polynomial schedule ends (get_scheduler's default lr_end)
LR_SCHEDULERS = tuple(s.value for s in SchedulerType if s.value != "piecewise_constant")

# Options that change how a run is watched or stored, not what it learns: a folder holding a run that
# differs only in these is the same run (it may be resumed, or extended with more steps).
NOT_PART_OF_RUN = frozenset({
    "output_dir", "resume_from_checkpoint", "max_train_steps", "num_train_epochs", "checkpointing_steps",
    "checkpointing_epochs", "checkpoints_total_limit", "validation_prompt", "validation_prompts_file",
    "validation_steps", "validation_epochs", "num_validation_images", "report_to", "export_kohya",
    "cache_latents", "cache_prompt_embeddings", "dataloader_num_workers", "gradient_checkpointing",
    "base_config", "allow_pickle", "save_precision", "output_name", "validation_at_start", "training_comment",
    "metadata_title", "metadata_author", "metadata_description", "metadata_license", "metadata_tags",
})  # fmt: skip

# Options that name local files or folders (--base and --base-config may also be hub ids, --base a built-in model).
PATH_OPTIONS = ("base", "base_config", "instance_dir", "output_dir", "class_dir", "init_from", "validation_prompts_file")

# Lengths given in optimizer steps or in epochs (diffusers' and kohya's scripts take both): steps option ->
# (epochs option, steps when neither is given). The trainer turns epochs into steps once the data is known.
STEPS_OR_EPOCHS = {
    "max_train_steps": ("num_train_epochs", 400),
    "checkpointing_steps": ("checkpointing_epochs", 500),
    "validation_steps": ("validation_epochs", 100),
}
# Pairs of options that say one thing two ways: at most one of each is given (a flag replaces a file's).
EITHER_OR = [(steps, epochs) for steps, (epochs, _) in STEPS_OR_EPOCHS.items()] + [
    ("validation_prompt", "validation_prompts_file")
]

# Switches of diffusers' (and kohya's) scripts that set an option here to one value: name -> (option, value, whose).
SWITCHES = {
    "center_crop": ("crop", "center", "diffusers'"),
    "use_8bit_adam": ("optimizer", "adamw8bit", "diffusers'"),
    "enable_bucket": ("buckets", "auto", "kohya's"),
    "random_crop": ("crop", "random", "kohya's"),
    "network_train_unet_only": ("train_text_encoder", False, "kohya's"),
}

# kohya's `--network_args KEY=VALUE ...` keys that have an option here.
NETWORK_ARGS = {"conv_dim": "conv_rank", "conv_alpha": "conv_alpha"}

# Flags of diffusers' train_dreambooth_lora*.py and kohya's train_network.py that have no option here, with
# what to do instead: a user pasting their command learns it in one line.
_HINTS = [
    (("push_to_hub", "hub_model_id", "hub_token", "huggingface_repo_id", "huggingface_repo_type",
      "huggingface_path_in_repo", "huggingface_token", "huggingface_repo_visibility", "save_state_to_huggingface",
      "resume_from_huggingface", "async_upload"),
     "this trainer does not upload: the LoRA is written to --output-dir"),
    (("enable_xformers_memory_efficient_attention", "xformers", "sdpa", "mem_eff_attn"),
     "not needed: PyTorch's scaled-dot-product attention is used"),
    (("vae",), "not available: the base model's own VAE encodes the images"),
    (("pretrained_vae_model_name_or_path", "no_half_vae"),
     "not needed: the base model's VAE stays in float32 while training, so fp16 cannot overflow it"),
    (("pre_compute_text_embeddings", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk"),
     "on by default: prompt embeddings are cached while the text encoders are frozen (--cache-prompt-embeddings)"),
    (("cache_latents_to_disk",), "latents are cached in memory when no random augmentation is on (--cache-latents)"),
    (("v2", "v_parameterization"), "not needed: SD2 and v-prediction are read from the base model's configs"),
    (("full_fp16", "full_bf16"), "use --mixed-precision fp16 or bf16 (the LoRA weights always train in float32)"),
    (("allow_tf32",), "use --mixed-precision bf16 or fp16: the frozen weights then run in half precision, faster "
     "than TF32"),
    (("scale_lr",), "give the scaled rate itself as --learning-rate"),
    (("unet_lr",), "use --learning-rate (the UNet's rate here, --text-encoder-lr the text encoders')"),
    (("optimizer_args",), "use --adam-beta1/2, --adam-weight-decay, --adam-epsilon and the --prodigy-* options"),
    (("network_module",), "not needed: this trainer always trains LoRA (peft), with --dora and --init for variants"),
    (("dataset_config", "in_json", "dataset_name", "image_column", "caption_column"),
     "use --instance-dir (a folder of images, NAME.txt captions beside them, or kohya's N_PROMPT subfolders)"),
    (("reg_data_dir",), "use --with-prior-preservation with --class-dir and --class-prompt"),
    (("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"),
     "--buckets auto makes aspect-ratio buckets of about --resolution squared pixels, sides in steps of 64 "
     "(or list them: --buckets '768,512;512,768')"),
    (("save_state", "save_state_on_train_end"), "not needed: every checkpoint can be resumed (--checkpointing-steps)"),
    (("save_last_n_steps", "save_last_n_epochs", "save_last_n_steps_state", "save_last_n_epochs_state"),
     "use --checkpoints-total-limit"),
    (("save_model_as", "use_safetensors"), "not needed: LoRA files are always safetensors"),
    (("sample_sampler",), "not needed: validation images use the base model's scheduler"),
    (("logging_dir",), "not needed: TensorBoard logs go to OUTPUT_DIR/logs"),
    (("prior_generation_precision",), "not needed: class images are generated in float32"),
    (("local_rank",), "launch with torchrun or accelerate launch (they pass the rank in the environment)"),
    (("revision", "variant"), "give --base a local folder or single file holding the weights you want"),
    (("max_token_length",), "prompts are encoded to the text encoder's 77 tokens"),
    (("zero_terminal_snr", "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma",
      "adaptive_noise_scale", "noise_offset_random_strength"),
     "not available (--noise-offset and --snr-gamma are)"),
    (("color_aug", "face_crop_aug_range"), "not available (--random-flip and --crop random are)"),
    (("lowram", "highvram", "persistent_data_loader_workers", "vae_batch_size", "tokenizer_cache_dir",
      "console_log_level", "console_log_file", "console_log_simple", "ddp_timeout", "ddp_gradient_as_bucket_view",
      "ddp_static_graph"), "not needed here"),
    (("dim_from_weights",), "not needed: give --rank (a mismatch with the --init-from file is an error naming its rank)"),
    (("network_train_text_encoder_only",), "not available: the UNet is always trained (--train-text-encoder adds "
     "the text encoders)"),
    (("caption_tag_dropout_rate", "caption_dropout_every_n_epochs", "weighted_captions"),
     "not available (--caption-dropout-rate drops whole captions, --shuffle-caption shuffles tags)"),
    (("masked_loss", "alpha_mask"), "not available: every pixel counts (--loss-type chooses how errors count)"),
    (("fp8_base", "fp8_base_unet"), "not available: use --mixed-precision fp16 or bf16"),
    (("save_n_epoch_ratio",), "use --checkpointing-epochs"),
    (("no_metadata",), "not available: the metadata is how tools describe and load the LoRA; it records folders "
     "and the base model by name only, not their full paths"),
    (("wandb_api_key", "wandb_run_name", "log_tracker_name", "log_tracker_config", "log_prefix", "log_config"),
     "with --report-to wandb, log in once with `wandb login`; runs are named after the output folder"),
]  # fmt: skip
FOREIGN_FLAG_HINTS = {flag: hint for flags, hint in _HINTS for flag in flags}


def _option(default: Any = MISSING, help: str = "", **metadata: Any) -> Any:
    if default is MISSING:
        return field(metadata={"help": help, **metadata})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def square_resolution(text: str) -> int:
    """A resolution as one number, or as kohya writes it, "width,height", when that is square."""
    sizes = {size.strip() for size in text.split(",")}
    if len(sizes) == 1 and text.count(",") <= 1 and (size := sizes.pop()).isdigit():
        return int(size)
    if text.count(",") == 1 and all(size.isdigit() for size in sizes):
        raise argparse.ArgumentTypeError(
            f"{text} is not square: give one size (the pixels to train at) and --buckets auto for other shapes"
        )
    raise argparse.ArgumentTypeError(f"{text!r} is not a size in pixels")


@dataclass
class TrainConfig:
    """All DreamBooth LoRA options; the `help` of each field is its `--help` text."""

    # What to learn
    instance_dir: Path = _option(
        help="folder of images of the subject; a NAME.txt beside NAME.png is its caption; kohya-style subfolders "
        "N_PROMPT (e.g. 10_sks dog) add their images N times an epoch, PROMPT for those without a caption",
        aliases=("instance_data_dir", "train_data_dir"),
    )
    output_dir: Path = _option(help="where the LoRA, checkpoints and validation images go")
    instance_prompt: str | None = _option(
        None, 'prompt for the images (directly in --instance-dir) without a caption file, e.g. "a photo of sks dog"'
    )
    base: str = _option(
        "demo", "base model: demo, tiny-sd, tiny-sdxl, a hub id, a diffusers folder or a .safetensors",
        aliases=("pretrained_model_name_or_path",),
    )
    base_config: str | None = _option(
        None, "for a single-file --base: a diffusers folder (or cached hub id) whose configs describe it; "
        "needed offline"
    )
    allow_pickle: bool = _option(
        False, "accept a .ckpt/.pt/.pth/.bin --base or --init-from (pickle files, read with torch's weights-only loader)"
    )
    trigger_words: str | None = _option(
        None, "comma-separated trigger words stored in the LoRA (default: the instance prompt, or else the "
        "prompts of the kohya-style subfolders)"
    )

    # Prior preservation
    with_prior_preservation: bool = _option(False, "also train on class images so the class keeps its look")
    class_dir: Path | None = _option(
        None, "folder of class images; missing ones are generated with the base model", aliases=("class_data_dir",)
    )
    class_prompt: str | None = _option(None, 'prompt for the class images, e.g. "a photo of a dog"')
    num_class_images: int = _option(100, "how many class images to use (generated if the folder holds fewer)")
    prior_loss_weight: float = _option(1.0, "weight of the class-image loss")
    sample_batch_size: int = _option(4, "batch size when generating class images")

    # Images
    resolution: int | None = _option(
        None, "training resolution in pixels, a multiple of 8 (default: the base model's native size); kohya's "
        "square 512,512 works too", parse=square_resolution,
    )
    crop: str = _option("center", "how images are cropped to the resolution or bucket", choices=CROPS)
    random_flip: bool = _option(False, "flip images horizontally at random", aliases=("flip_aug",))
    buckets: str | None = _option(None, 'aspect-ratio buckets: "auto", or "height,width;height,width;..." in pixels')
    repeats: int = _option(1, "how many times each instance image appears in an epoch", aliases=("dataset_repeats",))
    caption_extension: str = _option(
        ".txt", "extension of the caption file beside each image (NAME.txt; kohya's datasets often use .caption)",
        aliases=("caption_extention",),  # kohya's misspelt name, which its docs still use
    )
    shuffle_caption: bool = _option(
        False, "shuffle the comma-separated tags of each caption at every step (kohya's --shuffle_caption); "
        "prompts are then encoded every step"
    )
    keep_tokens: int = _option(0, "with --shuffle-caption, how many leading tags stay in place (e.g. the trigger)")
    caption_dropout_rate: float = _option(
        0.0, "fraction of images trained with an empty prompt (the unconditional branch classifier-free guidance "
        "subtracts); with prior preservation only class images, so the LoRA does not leak into every prompt"
    )

    # LoRA
    rank: int = _option(4, "LoRA rank", aliases=("network_dim",))
    alpha: float | None = _option(None, "LoRA alpha (default: the rank, i.e. scale 1)", aliases=("network_alpha",))
    conv_rank: int | None = _option(
        None, "rank of the 3x3 convolutions among the targets (conv1, conv2; kohya's conv_dim) (default: --rank)",
        aliases=("conv_dim",),
    )
    conv_alpha: float | None = _option(
        None, "alpha of those convolutions (kohya's conv_alpha) (default: keeps the scale --alpha / --rank)"
    )
    dropout: float = _option(0.0, "LoRA dropout", aliases=("network_dropout", "lora_dropout"))
    init: str = _option("default", "LoRA initialisation (pissa/olora are saved converted to plain LoRA)", choices=INITS)
    init_from: Path | None = _option(
        None, "start from this LoRA file (any format the studio reads) instead of zero, e.g. to train a LoRA further "
        "on new images; it must be at --rank and within the targets (kohya's --network_weights)",
        aliases=("network_weights",),
    )
    rslora: bool = _option(False, "rank-stabilised LoRA: scale alpha/sqrt(rank) instead of alpha/rank")
    dora: bool = _option(False, "weight-decomposed LoRA (DoRA)", aliases=("use_dora",))
    unet_targets: list[str] = _option(
        ["to_k"],
        "comma-separated UNet module names to adapt, e.g. to_k,to_q,to_v,to_out.0 (attn2.to_k: cross-attention only)",
    )
    train_text_encoder: bool = _option(False, "also train LoRA on the text encoder(s) (both for SDXL)")
    clip_skip: int = _option(
        1, "SD1.x: condition on the text encoder's output N - 1 layers before its last (A1111's \"Clip skip\", "
        "kohya's --clip_skip; 2 for most anime models): train as the LoRA will be used"
    )
    text_encoder_targets: list[str] = _option(
        ["q_proj", "k_proj", "v_proj", "out_proj"], "comma-separated text-encoder module names to adapt"
    )

    # Optimisation
    max_train_steps: int | None = _option(None, "optimizer steps to train (default: 400)")
    num_train_epochs: int | None = _option(
        None, "or train this many epochs: an epoch shows each instance image --repeats times (times its kohya "
        "folder's N), or, with prior preservation, each class image once if there are more of those (diffusers' count)",
        aliases=("max_train_epochs",),
    )
    train_batch_size: int = _option(1, "batch size per device")
    gradient_accumulation_steps: int = _option(1, "batches accumulated per optimizer step")
    learning_rate: float = _option(1e-4, "UNet LoRA learning rate (about 1.0 for prodigy)")
    text_encoder_lr: float | None = _option(
        None, f"text-encoder LoRA learning rate (default: {DEFAULT_TEXT_ENCODER_LR}; with prodigy, --learning-rate)"
    )
    loraplus_lr_ratio: float | None = _option(
        None, "LoRA+: learning rate of the B matrices over that of the A matrices"
    )
    optimizer: str = _option(
        "adamw", "adamw, adamw8bit (needs bitsandbytes) or prodigy (needs prodigyopt); any case (kohya's AdamW8bit)",
        aliases=("optimizer_type",),
    )
    adam_beta1: float = _option(0.9, "Adam beta1")
    adam_beta2: float = _option(0.999, "Adam beta2")
    adam_weight_decay: float = _option(1e-2, "weight decay")
    adam_weight_decay_text_encoder: float | None = _option(
        None, "weight decay of the text-encoder LoRA (default: --adam-weight-decay)"
    )
    adam_epsilon: float = _option(1e-8, "Adam epsilon")
    max_grad_norm: float = _option(1.0, "gradient clipping norm")
    lr_scheduler: str = _option("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _option(0, "warm-up steps of the schedule")
    lr_num_cycles: int = _option(1, "cycles of cosine_with_restarts", aliases=("lr_scheduler_num_cycles",))
    lr_power: float = _option(1.0, "power of the polynomial schedule", aliases=("lr_scheduler_power",))
    prodigy_beta3: float | None = _option(None, "prodigy: beta3 of its step-size estimate (default: sqrt(beta2))")
    prodigy_decouple: bool = _option(True, "prodigy: AdamW-style decoupled weight decay")
    prodigy_use_bias_correction: bool = _option(True, "prodigy: Adam's bias correction")
    prodigy_safeguard_warmup: bool = _option(
        True, "prodigy: leave the rate out of the step-size estimate while it warms up"
    )
    ema_decay: float | None = _option(
        None, "save the exponential moving average of the LoRA weights (decay e.g. 0.995, about the last 200 steps) "
        "instead of the last step's weights: steadier from run to run; off when unset"
    )
    snr_gamma: float | None = _option(
        None, "min-SNR weighting gamma (5.0 is usual); off when unset", aliases=("min_snr_gamma",)
    )
    loss_type: str = _option(
        "l2", "how the denoising error counts, as kohya's --loss_type: l2 (squared, diffusers' loss), l1, or the "
        "pseudo-Huber huber / smooth_l1, which weigh large errors less", choices=LOSS_TYPES,
    )
    huber_schedule: str = _option(
        "snr", "huber / smooth_l1: how the threshold c changes with the timestep (kohya's default snr: near 1 "
        "on clean steps, --huber-c on the noisiest)", choices=HUBER_SCHEDULES,
    )
    huber_c: float = _option(0.1, "huber / smooth_l1: the threshold c (kohya's --huber_c)")
    huber_scale: float = _option(1.0, "huber / smooth_l1: scale of the constant and exponential schedules")
    debiased_estimation_loss: bool = _option(
        False, "weight the loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), kohya's debiased estimation: less weight "
        "on the nearly clean timesteps; SNR is held between the schedule's smallest positive SNR and 1000"
    )
    scale_weight_norms: float | None = _option(
        None, "after every step, shrink each layer whose change (scale x B @ A) has a norm above this, kohya's "
        "max-norm regularisation (e.g. 1.0: keeps the LoRA from overpowering at weight 1); off when unset"
    )
    noise_offset: float = _option(0.0, "noise offset (0.05-0.1 helps very dark or bright images)")
    min_timestep: int = _option(0, "lowest noise timestep trained on (kohya's --min_timestep)")
    max_timestep: int | None = _option(
        None, "train only on timesteps below this one (kohya's --max_timestep; e.g. 600 for a style: the low-noise "
        "steps draw textures, the noisy ones decide colour and shape); default: all the scheduler's timesteps"
    )
    mixed_precision: str = _option("no", "mixed precision", choices=MIXED_PRECISIONS)
    gradient_checkpointing: bool = _option(False, "trade compute for memory")
    seed: int = _option(0, "random seed: the same seed and options give the same LoRA")

    # Speed
    cache_latents: bool = _option(True, "encode images to latents once when no random augmentation is on")
    cache_prompt_embeddings: bool = _option(True, "encode prompts once when the text encoders are not trained")
    dataloader_num_workers: int = _option(0, "data-loading worker processes", aliases=("max_data_loader_n_workers",))

    # Checkpoints and feedback
    checkpointing_steps: int | None = _option(
        None, "save a resumable checkpoint every N steps (default: 500)", aliases=("save_every_n_steps",)
    )
    checkpointing_epochs: int | None = _option(None, "or save one every N epochs", aliases=("save_every_n_epochs",))
    checkpoints_total_limit: int | None = _option(None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = _option(
        None, 'resume from "latest" or a checkpoint folder', aliases=("resume",)
    )
    validation_prompt: str | None = _option(None, "prompt for validation images and the final base-vs-LoRA grid")
    validation_prompts_file: Path | None = _option(
        None, "or a text file of prompts, one image per line with kohya's options: --n negative prompt, --w/--h size, "
        "--s steps, --l guidance scale, --d seed (kohya's --sample_prompts)", aliases=("sample_prompts",),
    )
    validation_steps: int | None = _option(
        None, "make validation images every N steps (default: 100)", aliases=("sample_every_n_steps",)
    )
    validation_epochs: int | None = _option(None, "or make them every N epochs", aliases=("sample_every_n_epochs",))
    num_validation_images: int = _option(4, "images of --validation-prompt (a prompts file: one per line)")
    validation_at_start: bool = _option(
        False, "also make the validation images before the first step (kohya's --sample_at_first)",
        aliases=("sample_at_first",),
    )
    inference_steps: int = _option(25, "denoising steps for class images and validation images")
    report_to: str = _option(
        "auto", "tracker for losses and images (auto: tensorboard when installed)", choices=REPORT_TO,
        aliases=("log_with",),
    )
    export_kohya: bool | None = _option(
        None, "also write a kohya-named copy (A1111 / ComfyUI) (default: with --output-name only)",
        aliases=("output_kohya_format",),
    )
    output_name: str | None = _option(
        None, "file name of the kohya-named copy, NAME.safetensors (kohya's --output_name; implies --export-kohya; "
        "default: the output folder's name + _kohya)"
    )
    training_comment: str | None = _option(None, "free text stored in the LoRA's metadata (ss_training_comment)")
    metadata_title: str | None = _option(
        None, "title stored in the LoRA (modelspec.title, which tools show) (default: --output-name or the folder's name)"
    )
    metadata_author: str | None = _option(None, "author stored in the LoRA (modelspec.author)")
    metadata_description: str | None = _option(None, "description stored in the LoRA (modelspec.description)")
    metadata_license: str | None = _option(None, "license stored in the LoRA (modelspec.license)")
    metadata_tags: str | None = _option(None, "comma-separated tags stored in the LoRA (modelspec.tags)")
    save_precision: str = _option(
        "fp32", "dtype of the saved LoRA files: fp16 or bf16 halve their size (kohya's --save_precision); "
        "checkpoints resume in full precision either way", choices=SAVE_PRECISIONS,
    )

    def __post_init__(self) -> None:
        self.instance_dir = Path(self.instance_dir)
        self.output_dir = Path(self.output_dir)
        self.class_dir = Path(self.class_dir) if self.class_dir is not None else None
        self.init_from = Path(self.init_from) if self.init_from is not None else None
        if self.validation_prompts_file is not None:
            self.validation_prompts_file = Path(self.validation_prompts_file)
        self.unet_targets = _name_list(self.unet_targets)
        self.text_encoder_targets = _name_list(self.text_encoder_targets)
        if not self.caption_extension.startswith("."):
            self.caption_extension = "." + self.caption_extension
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.trigger_words is None:
            self.trigger_words = self.instance_prompt
        self.optimizer = self.optimizer.lower()
        if self.text_encoder_lr is None:  # Prodigy's rate is a multiplier of the step size it estimates, ~1.0 for all
            self.text_encoder_lr = self.learning_rate if self.optimizer == "prodigy" else DEFAULT_TEXT_ENCODER_LR
        if self.output_name is not None:
            if self.export_kohya is False:
                raise StudioError("--output-name names the kohya copy: it cannot go with --no-export-kohya")
            if self.output_name.lower().endswith(".safetensors"):
                self.output_name = self.output_name[: -len(".safetensors")]
        self.export_kohya = bool(self.export_kohya or self.output_name is not None)

        if self.instance_prompt is not None and not self.instance_prompt.strip():
            raise StudioError("--instance-prompt is empty")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise StudioError(f"--resolution {self.resolution}: must be a positive multiple of 8")
        if self.rank <= 0:
            raise StudioError(f"--rank {self.rank}: must be at least 1")
        if self.conv_alpha is not None and self.conv_rank is None:
            raise StudioError("--conv-alpha goes with --conv-rank")
        if self.conv_rank is not None and self.conv_alpha is None:
            self.conv_alpha = self.alpha * self.conv_rank / self.rank
        for first, second in EITHER_OR:
            if getattr(self, first) is not None and getattr(self, second) is not None:
                raise StudioError(f"--{_flag(first)} and --{_flag(second)}: give one of the two")
        for name in ("conv_rank", "max_train_steps", "num_train_epochs", "train_batch_size",
                     "gradient_accumulation_steps", "repeats", "checkpointing_steps", "checkpointing_epochs",
                     "validation_steps", "validation_epochs", "num_validation_images", "inference_steps",
                     "sample_batch_size"):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise StudioError(f"--{_flag(name)} {getattr(self, name)}: must be at least 1")
        for option in fields(self):  # NaN and infinity pass every comparison below, or fail late
            value = getattr(self, option.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise StudioError(f"--{_flag(option.name)} {value}: must be a finite number")
        if self.learning_rate <= 0 or self.text_encoder_lr <= 0:
            raise StudioError("--learning-rate and --text-encoder-lr must be positive")
        if self.lr_scheduler == "polynomial" and min(self.learning_rate, self.text_encoder_lr) <= POLYNOMIAL_LR_END:
            raise StudioError(
                f"--lr-scheduler polynomial decays to {POLYNOMIAL_LR_END:g}: --learning-rate and --text-encoder-lr "
                "must be above that"
            )
        if not 0 <= self.seed < 2**32:
            raise StudioError(f"--seed {self.seed}: must be from 0 to 2**32 - 1")
        for name in ("lr_warmup_steps", "dataloader_num_workers", "min_timestep", "adam_epsilon", "adam_weight_decay",
                     "adam_weight_decay_text_encoder", "noise_offset", "prior_loss_weight"):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise StudioError(f"--{_flag(name)} {getattr(self, name)}: must be 0 or more")
        for name in ("alpha", "conv_alpha", "snr_gamma", "max_grad_norm", "lr_power", "lr_num_cycles", "huber_c",
                     "huber_scale", "scale_weight_norms"):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise StudioError(f"--{_flag(name)} {getattr(self, name)}: must be positive")
        for name in ("adam_beta1", "adam_beta2", "prodigy_beta3"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < 1:
                raise StudioError(f"--{_flag(name)} {getattr(self, name)}: must be in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise StudioError(f"--dropout {self.dropout}: must be in [0, 1)")
        name = self.output_name
        if name is not None and (
            not name.strip() or name.startswith(".") or any(c in name for c in "/\\:") or name == "pytorch_lora_weights"
        ):
            raise StudioError(f"--output-name {name!r}: a plain file name, other than the diffusers file's")
        if self.caption_extension.lower() in (".", *IMAGE_SUFFIXES) or "/" in self.caption_extension:
            raise StudioError(f"--caption-extension {self.caption_extension!r}: a text file's extension, e.g. .txt")
        if self.clip_skip < 1:
            raise StudioError(f"--clip-skip {self.clip_skip}: must be at least 1 (1: the last layer, no skip)")
        if self.keep_tokens < 0:
            raise StudioError(f"--keep-tokens {self.keep_tokens}: must be at least 0")
        if not 0.0 <= self.caption_dropout_rate < 1.0:
            raise StudioError(f"--caption-dropout-rate {self.caption_dropout_rate}: must be in [0, 1)")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise StudioError(f"--ema-decay {self.ema_decay}: must be between 0 and 1")
        if self.min_timestep < 0 or self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise StudioError(
                f"--min-timestep {self.min_timestep} / --max-timestep {self.max_timestep}: "
                "need 0 <= min < max (max is excluded)"
            )
        if self.scale_weight_norms is not None and (self.dora or self.init in ("pissa", "olora")):
            raise StudioError(
                "--scale-weight-norms bounds the change B @ A makes: it cannot go with --dora or --init pissa/olora"
            )
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio < 1.0:
            raise StudioError(f"--loraplus-lr-ratio {self.loraplus_lr_ratio}: must be at least 1")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise StudioError(f"--checkpoints-total-limit {self.checkpoints_total_limit}: must be at least 1")
        if self.dora and self.init in ("pissa", "olora"):
            raise StudioError(f"--dora cannot be combined with --init {self.init}")
        if self.init_from is not None and self.init in ("pissa", "olora"):
            raise StudioError(f"--init-from cannot be combined with --init {self.init} (it changes the base weights)")
        if self.init_from is not None and self.conv_rank is not None:
            raise StudioError("--init-from cannot be combined with --conv-rank: the file's ranks decide")
        _check_targets("unet-targets", self.unet_targets, UNET_TARGETS)
        _check_targets("text-encoder-targets", self.text_encoder_targets, TEXT_ENCODER_TARGETS)
        if self.buckets is not None and self.buckets != "auto":
            self.bucket_sizes()  # raises on a malformed list
        if self.with_prior_preservation:
            if not self.class_prompt or self.class_dir is None:
                raise StudioError("--with-prior-preservation needs --class-prompt and --class-dir")
            if self.num_class_images < 1:
                raise StudioError(f"--num-class-images {self.num_class_images}: must be at least 1")
        for name, choices in (("crop", CROPS), ("init", INITS), ("optimizer", OPTIMIZERS),
                              ("mixed_precision", MIXED_PRECISIONS), ("report_to", REPORT_TO),
                              ("save_precision", SAVE_PRECISIONS), ("loss_type", LOSS_TYPES),
                              ("huber_schedule", HUBER_SCHEDULES),
                              ("lr_scheduler", LR_SCHEDULERS)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise StudioError(f"--{_flag(name)} {getattr(self, name)!r}: use one of {', '.join(choices)}")

    def bucket_sizes(self) -> list[tuple[int, int]] | None:
        """The explicit `--buckets` list as (height, width) pairs; None for no buckets or "auto"."""
        if self.buckets is None or self.buckets == "auto":
            return None
        sizes = []
        for pair in self.buckets.split(";"):
            parts = pair.split(",")
            try:
                height, width = (int(p) for p in parts)
            except ValueError:
                raise StudioError(f"--buckets {self.buckets!r}: write height,width pairs separated by ';'") from None
            if height <= 0 or width <= 0 or height % 8 or width % 8:
                raise StudioError(f"--buckets: {height},{width} is not a pair of positive multiples of 8")
            sizes.append((height, width))
        return sizes

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (paths as strings), as stored in the output folder and the LoRA metadata."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def run_identity(self) -> dict[str, Any]:
        """The options that decide what is learned: two runs with equal identities are the same run."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_PART_OF_RUN}

    def differences_from(self, previous: dict[str, Any]) -> list[str]:
        """The options that decide what is learned on which this run and `previous` (a stored `to_dict`)
        differ. Paths count by where they lead, so the same folder typed another way, or from another working
        directory, is the same; options added since `previous` was stored count at their defaults."""
        defaults = option_defaults()
        return sorted(
            name for name, value in self.run_identity().items()
            if _where(name, previous.get(name, defaults.get(name))) != _where(name, value)
        )  # fmt: skip


def option_defaults() -> dict[str, Any]:
    """Each option's default value (list options included): what a run described before that option existed used."""
    return {
        option.name: option.default if option.default_factory is MISSING else option.default_factory()
        for option in fields(TrainConfig)
        if not _required(option)
    }


def _where(name: str, value: Any) -> Any:
    """A path option's value as the absolute path it names (a base that is no local path stays as it is)."""
    if name not in PATH_OPTIONS or not isinstance(value, str):
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if name not in ("base", "base_config") or path.exists() else value


def _name_list(value: str | list[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item.strip()]


def names_module(target: str, module: str) -> bool:
    """peft's rule: a target names a module by its whole dotted name or by a dotted suffix of it."""
    return module == target or module.endswith("." + target)


def _check_targets(flag: str, targets: list[str], known: tuple[str, ...]) -> None:
    if not targets:
        raise StudioError(f"--{flag} is empty")
    unknown = [t for t in targets if not any(names_module(k, t) for k in known)]
    if unknown:
        raise StudioError(f"--{flag}: unknown module name(s) {', '.join(unknown)}; known: {', '.join(known)}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through the CLI's StudioError path, not usage + message
        raise StudioError(f"{message} (see --help)")


class _HelpFormatter(argparse.HelpFormatter):
    """Each spelling once, then the value's name once (`--max-train-steps, --max_train_steps MAX_TRAIN_STEPS`),
    and switches bare (the description tells their optional `=true|false`), so the many aliases stay readable."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        spellings = ", ".join(action.option_strings)
        if action.nargs == 0 or isinstance(action, _Switch):
            return spellings
        return f"{spellings} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


class _Switch(argparse.BooleanOptionalAction):
    """`--flag`, `--no-flag`, and `--flag=true|false`: diffusers declares some switches `type=bool`
    (`--prodigy_safeguard_warmup=True` in its docs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nargs, self.metavar = "?", "true|false"

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            super().__call__(parser, namespace, values, option_string)
        elif option_string.startswith("--no-"):
            parser.error(f"argument {option_string}: takes no value")
        elif values.lower() not in ("true", "false", "1", "0", "yes", "no"):
            parser.error(f"argument {option_string}: expected true or false, not {values!r}")
        else:
            setattr(namespace, self.dest, values.lower() in ("true", "1", "yes"))


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from the dataclass so flags, defaults and help cannot drift apart."""
    parser = _Parser(
        prog="python -m studio.train_dreambooth",
        usage="%(prog)s --instance-dir DIR --output-dir DIR [--instance-prompt TEXT] [--base SOURCE] [options]",
        description="Train a DreamBooth LoRA on SD1.x / SD2.x / SDXL; writes pytorch_lora_weights.safetensors "
        "that plain diffusers loads with pipe.load_lora_weights(output_dir). Underscore spellings work too "
        "(--max_train_steps), and every switch also takes =true or =false.",
        formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS,  # only what the user typed, so a config file can fill the rest
    )
    parser.add_argument("--config", type=Path, help="TOML or YAML file with the same keys; flags override it")
    for option in fields(TrainConfig):
        spellings = []
        for name in (option.name, *option.metadata.get("aliases", ())):
            spellings += [f"--{_flag(name)}"] + ([f"--{name}"] if "_" in name else [])
        help_text = option.metadata["help"]
        if option.default is not MISSING and option.default is not None:
            help_text += f" (default: {option.default})"
        elif option.default_factory is not MISSING:
            help_text += f" (default: {','.join(option.default_factory())})"
        elif _required(option):
            help_text += " (required)"
        kind = _field_type(option.type)
        if kind is bool:
            parser.add_argument(*spellings, dest=option.name, action=_Switch, help=help_text)
        else:
            parse = option.metadata.get("parse", kind)  # an option with its own reader names it
            parser.add_argument(*spellings, dest=option.name, type=parse, help=help_text,
                                choices=option.metadata.get("choices"),
                                metavar=option.name.upper())  # fmt: skip
    parser.add_argument("--network-args", "--network_args", nargs="+", metavar="KEY=VALUE",
                        help="kohya's network arguments: conv_dim=N and conv_alpha=A (--conv-rank, --conv-alpha)")
    for switch, (name, value, whose) in SWITCHES.items():
        parser.add_argument(f"--{_flag(switch)}", f"--{switch}", dest=name, action="store_const", const=value,
                            help=f"same as --{_flag(name)} {value} ({whose} flag)")  # fmt: skip
    return parser


def _aliases() -> dict[str, str]:
    """Other scripts' names for options here (`network_dim` -> `rank`), as used in config-file keys."""
    return {alias: option.name for option in fields(TrainConfig) for alias in option.metadata.get("aliases", ())}


def _foreign_flag_error(names: list[str], where: str) -> StudioError:
    """The one-line error for flags or config keys this trainer does not take: each of another script's with
    its hint, so a pasted command is fixed in one go, then any unknown ones. `where` starts the message: "" for
    the command line, "FILE: " for a config file."""
    hints, unknown, after_hint = [], [], False
    for name in names:
        key = name.lstrip("-").partition("=")[0].replace("-", "_")
        if key in FOREIGN_FLAG_HINTS:
            hints.append(f"{key if where else '--' + _flag(key)}: {FOREIGN_FLAG_HINTS[key]}")
        elif not (after_hint and not name.startswith("-")):  # a hinted flag's value is not an unknown option
            unknown.append(name)
        after_hint = key in FOREIGN_FLAG_HINTS
    if unknown:
        hints.append(f"unknown option(s) {(', ' if where else ' ').join(unknown)} (see --help)")
    return StudioError(where + "; ".join(hints))


def _required(option) -> bool:
    return option.default is MISSING and option.default_factory is MISSING


def _field_type(annotation: str) -> type:
    """The argparse type for a field annotation (annotations are strings under `from __future__`)."""
    if annotation.startswith("bool"):
        return bool
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str  # str, Path and comma-separated lists are parsed in __post_init__


def read_config_file(path: Path) -> dict[str, Any]:
    """Keys of a TOML or YAML file, with dashes turned into underscores; unknown keys are an error."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise StudioError(f"{path}: cannot read config file ({error.strerror})") from None
    except UnicodeDecodeError:
        raise StudioError(f"{path}: the config file is not UTF-8 text; save it as UTF-8") from None
    try:
        if path.suffix.lower() == ".toml":
            values = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            values = yaml.safe_load(text) or {}
        else:
            raise StudioError(f"{path}: config file must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise StudioError(f"{path}: not valid {path.suffix[1:].upper()}: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise StudioError(f"{path}: config file must hold a table of options")
    types = {option.name: _field_type(option.type) for option in fields(TrainConfig)}
    lists = {option.name for option in fields(TrainConfig) if option.type.startswith("list")}
    aliases = _aliases()
    named = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name == "network_args":  # kohya's list of KEY=VALUE texts: what it sets joins the options
            for option, setting in network_args(value if isinstance(value, list) else [value], f"{path}: ").items():
                if option in named:
                    raise StudioError(f"{path}: {option} is given twice (once in network_args)")
                named[option] = setting
            continue
        if name in SWITCHES:
            if not isinstance(value, bool):
                raise StudioError(f"{path}: {key} = {value!r} should be true or false")
            if not value:
                continue
            name, value, _ = SWITCHES[name]
        name = aliases.get(name, name)
        if name in named:
            raise StudioError(f"{path}: {key} is given twice (under two of its names)")
        named[name] = value
    values = named
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise _foreign_flag_error(unknown, f"{path}: ")
    parsers = {option.name: option.metadata["parse"] for option in fields(TrainConfig) if "parse" in option.metadata}
    optional = {option.name for option in fields(TrainConfig) if option.default is None}
    for name, value in values.items():
        if name in parsers and isinstance(value, str):
            try:
                values[name] = parsers[name](value)
            except argparse.ArgumentTypeError as error:
                raise StudioError(f"{path}: {name} = {value!r}: {error}") from None
        else:
            if value is None and name not in optional:
                raise StudioError(f"{path}: {name} has no value (null); give one, or leave the key out")
            values[name] = _coerce(path, name, value, types[name], name in lists)
    return values


def network_args(items: list, where: str) -> dict[str, Any]:
    """kohya's network arguments (`conv_dim=8`) as the options here they set (`conv_rank`: 8)."""
    kinds = {option.name: _field_type(option.type) for option in fields(TrainConfig)}
    options = {}
    for item in items:
        key, equals, value = str(item).partition("=")
        option = NETWORK_ARGS.get(key.strip())
        if not equals or option is None:
            raise StudioError(
                f"{where}{str(item)!r} has no equivalent here; conv_dim=N and conv_alpha=A do (--conv-rank, "
                "--conv-alpha), and --dora gives DoRA"
            )
        try:
            options[option] = kinds[option](value.strip())
        except ValueError:
            raise StudioError(f"{where}{key.strip()}={value.strip()!r} should be a number") from None
    return options


def _coerce(path: Path, name: str, value: Any, kind: type, is_list: bool) -> Any:
    """YAML reads `1e-4` as a string: numbers written that way are accepted, anything else is named.
    Text options take text; list options (targets) a comma-separated text or a list of texts."""
    if kind is str:
        if value is None or isinstance(value, str) or is_list and isinstance(value, list) and all(
            isinstance(item, str) for item in value
        ):
            return value
        raise StudioError(f"{path}: {name} = {value!r} should be {'a list of names' if is_list else 'text'}")
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    expected = {bool: "true or false", int: "an integer", float: "a number"}[kind]
    raise StudioError(f"{path}: {name} = {value!r} should be {expected}")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then `--config FILE`, then the flags typed: one checked `TrainConfig`."""
    arguments, extra = build_parser().parse_known_args(argv)
    if extra:
        raise _foreign_flag_error(extra, "")
    given = vars(arguments)
    for name, value in network_args(given.pop("network_args", []), "--network-args: ").items():
        if name in given:
            raise StudioError(f"--network-args and --{_flag(name)} both set {name}: give one")
        given[name] = value
    config_file = given.pop("config", None)
    values = read_config_file(config_file) if config_file is not None else {}
    for pair in EITHER_OR:  # e.g. a length typed replaces the file's, in either unit
        if any(name in given for name in pair):
            for name in pair:
                values.pop(name, None)
    values.update(given)
    missing = [f"--{_flag(o.name)}" for o in fields(TrainConfig) if _required(o) and o.name not in values]
    if missing:
        raise StudioError(f"missing required option(s): {', '.join(missing)}")
    try:
        return TrainConfig(**values)
    except TypeError as error:  # a config-file value of the wrong kind, e.g. a table where a number goes
        raise StudioError(f"bad option value: {error}") from None
