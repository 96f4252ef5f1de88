"""DreamBooth training data: image folders with captions, aspect-ratio buckets, crops and flips, and caches.

An *example* is one instance image (and, with prior preservation, one class image) at one bucket size.
Images are resized to cover their bucket and cropped to it (center or random), optionally flipped. When
nothing is random, each (image, bucket) view is encoded by the VAE once and its latent distribution kept
(`cache_latents`); prompts are encoded once when the text encoders are frozen (`PromptCache`). Randomness
is a pure function of (seed, epoch, example), so a resumed run draws exactly what the uninterrupted run did.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import find_nearest_bucket, generate_aspect_ratio_buckets
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.errors import StudioError
from studio.prompts import encode_prompts

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KOHYA_CONCEPT_FOLDER = re.compile(r"^([0-9]+)_(.*)$")  # kohya's "10_sks dog": 10 repeats, prompt "sks dog"


@dataclass(frozen=True)
class ImageRecord:
    """One readable training image: where it is, the prompt it is trained with, its size as (height, width),
    and how many times an epoch shows it (its kohya folder's repeats; `--repeats` multiplies them all)."""

    path: Path
    prompt: str
    size: tuple[int, int]
    repeats: int = 1


def concept_folders(folder: Path, warn: bool = False) -> list[tuple[Path, str, int]]:
    """The subfolders of `folder` named kohya's way, `N_prompt`, as (path, prompt, N), sorted by name; N is
    read as kohya reads it (`05_x` is 5). Those with N = 0 or no prompt are left out, with a warning when
    `warn`: kohya would train nothing from the first, and the second names no prompt."""
    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = KOHYA_CONCEPT_FOLDER.match(path.name)
        if not match:
            continue
        repeats, prompt = int(match[1]), match[2].strip()
        if repeats and prompt:
            found.append((path, prompt, repeats))
        elif warn:
            reason = "0 repeats" if not repeats else "no prompt after the underscore"
            logger.warning("%s: skipping the kohya-style folder %s (%s)", folder, path.name, reason)
    return found


def scan_images(
    folder: Path,
    default_prompt: str | None,
    what: str = "instance",
    required: bool = True,
    caption_extension: str = ".txt",
) -> list[ImageRecord]:
    """The readable images in `folder` and in its kohya-style `N_prompt` subfolders (each sorted by name), each
    with its caption file's text (NAME + `caption_extension` beside NAME.png), else its folder's prompt:
    `default_prompt` at the top, `prompt` in an `N_prompt` folder, whose images an epoch shows N times.

    Unreadable image files are skipped with one warning that names them; a missing folder, one with no
    readable image (when `required`: class folders may start empty, they get generated) or an image with no
    prompt at all is a `StudioError`.
    """
    if folder.exists() and not folder.is_dir():
        raise StudioError(f"{folder}: is a file, not a {what} folder")
    if not folder.is_dir():
        if required:
            raise StudioError(f"{folder}: {what} folder not found")
        return []
    records, unreadable, unprompted = [], [], []
    for source, prompt, repeats in [(folder, default_prompt, 1), *concept_folders(folder, warn=True)]:
        for path in sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            name = str(path.relative_to(folder))
            try:
                with Image.open(path) as image:
                    image = ImageOps.exif_transpose(image)
                    image.load()
                    size = (image.height, image.width)
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
                unreadable.append(name)
                continue
            caption = _caption(path, caption_extension) or prompt
            if caption is None:
                unprompted.append(name)
                continue
            records.append(ImageRecord(path=path, prompt=caption, size=size, repeats=repeats))
    if unreadable:
        logger.warning("%s: skipping unreadable image file(s): %s", folder, ", ".join(unreadable))
    if KOHYA_CONCEPT_FOLDER.match(folder.name) and any(r.path.parent == folder for r in records):
        logger.warning(
            "%s: named like a kohya concept folder, but its own N repeats count only in its parent folder: "
            "give that as the %s folder to use them", folder, what,
        )  # fmt: skip
    if unprompted:
        raise StudioError(
            f"{folder}: {', '.join(unprompted[:3])}{' ...' if len(unprompted) > 3 else ''} ha"
            f"{'s' if len(unprompted) == 1 else 've'} no caption (no or an empty NAME{caption_extension}): "
            f"give --{what}-prompt"
        )
    if required and not records:
        if unreadable:
            raise StudioError(f"{folder}: none of the {len(unreadable)} image file(s) could be read")
        raise StudioError(f"{folder}: {what} folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return records


def _caption(image_path: Path, extension: str) -> str | None:
    """The caption file's text; a byte-order mark (Windows Notepad writes one) is not part of it."""
    caption_path = image_path.with_suffix(extension)
    if not caption_path.is_file():
        return None
    try:
        return caption_path.read_text(encoding="utf-8-sig").strip() or None
    except UnicodeDecodeError:
        raise StudioError(f"{caption_path}: the caption is not UTF-8 text; save it as UTF-8") from None


def bucket_sizes(
    resolution: int, buckets: str | None, explicit: list[tuple[int, int]] | None, step: int
) -> list[tuple[int, int]]:
    """The (height, width) sizes images are trained at: one square, `explicit`, or an "auto" ladder of
    aspect ratios with about `resolution`² pixels, each side a multiple of `step` (kohya's bucket_reso_steps)."""
    if buckets is None:
        return [(resolution, resolution)]
    if explicit is not None:
        return explicit
    return generate_aspect_ratio_buckets(resolution, divisibility=step)


@dataclass(frozen=True)
class Example:
    """Dataset item `i`: which instance image, which class image (or None), and the bucket both are cut to."""

    instance: int
    class_image: int | None
    bucket: tuple[int, int]


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance (and class) images as model-ready tensors, one `Example` per item.

    An epoch shows every instance image `repeats` times its own repeats (its kohya folder's); with class images
    it is as long as the longer of the two lists, as in diffusers' DreamBooth scripts. Call `set_epoch` before
    each epoch so random crops and flips differ between epochs but not between a run and its resumption.
    """

    def __init__(
        self,
        instance_images: list[ImageRecord],
        class_images: list[ImageRecord] | None,
        buckets: list[tuple[int, int]],
        crop: str = "center",
        random_flip: bool = False,
        repeats: int = 1,
        seed: int = 0,
        caption_dropout_rate: float = 0.0,
        shuffle_caption: bool = False,
        keep_tokens: int = 0,
    ):
        self.instance_images = instance_images
        self.class_images = class_images or []
        self.caption_dropout_rate = caption_dropout_rate
        self.shuffle_caption = shuffle_caption
        self.keep_tokens = keep_tokens
        self.crop = crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.latents: dict[tuple[str, int, tuple[int, int]], torch.Tensor] | None = None
        # Which instance each example shows, round-robin: 0, 1, ..., n-1, 0, 1, ... while each has repeats left.
        counts = [record.repeats * repeats for record in instance_images]
        shown = [i for turn in range(max(counts)) for i, count in enumerate(counts) if turn < count]
        length = max(len(shown), len(self.class_images))
        instance_buckets = [buckets[find_nearest_bucket(h, w, buckets)] for h, w in (r.size for r in instance_images)]
        self.examples = [
            Example(
                instance=shown[i % len(shown)],
                class_image=i % len(self.class_images) if self.class_images else None,
                bucket=instance_buckets[shown[i % len(shown)]],
            )
            for i in range(length)
        ]

    @property
    def is_random(self) -> bool:
        """Whether an example's pixels can differ between epochs (then latents cannot be cached)."""
        return self.crop == "random" or self.random_flip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        item = {"instance": self._view("instance", example.instance, example.bucket, rng)}
        if example.class_image is not None:
            item["class"] = self._view("class", example.class_image, example.bucket, rng)
        return item

    def views(self) -> list[tuple[str, int, tuple[int, int]]]:
        """Every distinct (role, image index, bucket) the examples use: what `cache_latents` encodes."""
        keys = {("instance", e.instance, e.bucket) for e in self.examples}
        keys |= {("class", e.class_image, e.bucket) for e in self.examples if e.class_image is not None}
        return sorted(keys)

    def _view(self, role: str, index: int, bucket: tuple[int, int], rng: random.Random) -> dict:
        record = (self.instance_images if role == "instance" else self.class_images)[index]
        # With class images, only theirs: the unconditional branch then keeps the base model's world.
        dropping = role == "class" or not self.class_images
        dropped = dropping and self.caption_dropout_rate and rng.random() < self.caption_dropout_rate
        prompt = "" if dropped else record.prompt
        if self.shuffle_caption:
            prompt = shuffled_tags(prompt, self.keep_tokens, rng)
        view = {"prompt": prompt, "original_size": record.size, "target_size": bucket}
        if self.latents is not None:
            view["latent_parameters"] = self.latents[(role, index, bucket)]
            view["crop_top_left"] = center_crop_offset(record.size, bucket)
            return view
        pixels, crop_top_left = load_pixels(record.path, bucket, self.crop, self.random_flip, rng)
        view["pixels"] = pixels
        view["crop_top_left"] = crop_top_left
        return view


def shuffled_tags(caption: str, keep: int, rng: random.Random) -> str:
    """kohya's `--shuffle_caption`: the comma-separated tags after the first `keep` in a random order, so the
    LoRA does not tie the subject to where a tag stands; the kept ones (the trigger word) stay in front."""
    tags = [tag.strip() for tag in caption.split(",")]
    kept, shuffled = tags[:keep], tags[keep:]
    rng.shuffle(shuffled)
    return ", ".join(kept + shuffled)


def covering_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The smallest (height, width) with `size`'s aspect ratio that covers `target`."""
    scale = max(target[0] / size[0], target[1] / size[1])
    return max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale))


def center_crop_offset(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    height, width = covering_size(size, target)
    return (height - target[0]) // 2, (width - target[1]) // 2


def load_pixels(
    path: Path, target: tuple[int, int], crop: str, random_flip: bool, rng: random.Random
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image at `path` resized to cover `target` (height, width), cropped to it, maybe flipped, as a
    (3, H, W) tensor in [-1, 1]; also the crop's top-left corner (SDXL conditions on it)."""
    with Image.open(path) as image:
        image = as_rgb(ImageOps.exif_transpose(image))
    height, width = covering_size((image.height, image.width), target)
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    if crop == "random":
        top, left = rng.randint(0, height - target[0]), rng.randint(0, width - target[1])
    else:
        top, left = (height - target[0]) // 2, (width - target[1]) // 2
    image = image.crop((left, top, left + target[1], top + target[0]))
    if random_flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return pixels, (top, left)


def as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's own conversion clips 16-bit greyscale (PNG's "I;16", or "I" holding values above
    255) at 255, which turns most of such an image white: those are scaled from 0..65535 instead."""
    if image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or values.max() > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def collate(items: list[dict]) -> dict:
    """Instance views first, then class views (the trainer splits predictions in two halves)."""
    views = [item["instance"] for item in items] + [item["class"] for item in items if "class" in item]
    batch = {
        "prompts": [view["prompt"] for view in views],
        "time_ids": torch.tensor(
            [[*view["original_size"], *view["crop_top_left"], *view["target_size"]] for view in views],
            dtype=torch.float32,
        ),
    }
    if "latent_parameters" in views[0]:
        batch["latent_parameters"] = torch.stack([view["latent_parameters"] for view in views])
    else:
        batch["pixels"] = torch.stack([view["pixels"] for view in views])
    return batch


class BucketBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches whose examples share a bucket (so they stack), the same for a given (seed, epoch).

    A bucket's last batch may be short. The size is deliberately not called `batch_size`: accelerate's
    multi-process sharding reads that attribute and then assumes full batches, dropping rounds that end in a
    short one and topping up with loose examples that can mix buckets. Without it, accelerate deals out whole
    batches and evens the processes out by repeating the first ones, `ceil(len / processes)` each."""

    def __init__(self, dataset: DreamBoothDataset, batch_size: int, seed: int):
        self.dataset = dataset
        self.examples_per_batch = batch_size
        self.seed = seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.dataset.epoch)
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index in torch.randperm(len(self.dataset), generator=generator).tolist():
            by_bucket[self.dataset.examples[index].bucket].append(index)
        batches = [
            indices[start : start + self.examples_per_batch]
            for indices in by_bucket.values()
            for start in range(0, len(indices), self.examples_per_batch)
        ]
        for order in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[order]

    def __len__(self) -> int:
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for example in self.dataset.examples:
            counts[example.bucket] += 1
        return sum(math.ceil(n / self.examples_per_batch) for n in counts.values())


@torch.no_grad()
def cache_latents(dataset: DreamBoothDataset, vae, batch_size: int = 8) -> None:
    """Encode every view of `dataset` once; training then samples from the stored latent distributions."""
    if dataset.is_random:
        raise ValueError("latents of randomly augmented images cannot be cached")
    by_bucket: dict[tuple[int, int], list] = defaultdict(list)
    for key in dataset.views():
        by_bucket[key[2]].append(key)
    rng = random.Random(0)  # unused: center crop and no flip draw nothing
    cache = {}
    for bucket, keys in by_bucket.items():
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            records = [
                (dataset.instance_images if role == "instance" else dataset.class_images)[i] for role, i, _ in chunk
            ]
            pixels = torch.stack([load_pixels(r.path, bucket, dataset.crop, False, rng)[0] for r in records])
            parameters = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters
            cache.update(zip(chunk, parameters))
    dataset.latents = cache


def sample_latents(batch: dict, vae) -> torch.Tensor:
    """Latents for a batch, scaled for the UNet: sampled from the cached distributions or encoded now."""
    if "latent_parameters" in batch:
        distribution = DiagonalGaussianDistribution(batch["latent_parameters"])
    else:
        distribution = vae.encode(batch["pixels"].to(vae.device, vae.dtype)).latent_dist
    latents = distribution.sample()
    if getattr(vae.config, "shift_factor", None) is not None:
        latents = latents - vae.config.shift_factor
    return latents * vae.config.scaling_factor


class PromptCache:
    """Embeddings of every prompt the dataset uses, computed once while the text encoders are frozen."""

    @torch.no_grad()
    def __init__(self, text_encoders: list, tokenizers: list, prompts: list[str], clip_skip: int = 1):
        self.embeddings: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for prompt in sorted(set(prompts)):
            embeds, pooled = encode_prompts(text_encoders, tokenizers, [prompt], clip_skip)
            self.embeddings[prompt] = (embeds[0], None if pooled is None else pooled[0])

    def lookup(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds = torch.stack([self.embeddings[p][0] for p in prompts])
        pooled = [self.embeddings[p][1] for p in prompts]
        return embeds, None if pooled[0] is None else torch.stack(pooled)
