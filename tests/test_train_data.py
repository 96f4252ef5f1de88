"""DreamBooth data: captions, aspect-ratio buckets, crops and flips, and the latent / prompt caches."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image

from studio.data import (
    BucketBatchSampler,
    DreamBoothDataset,
    PromptCache,
    bucket_sizes,
    cache_latents,
    collate,
    load_pixels,
    scan_images,
)
from studio.errors import StudioError
from studio.prompts import encode_prompts
from studio.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline


def gradient_image(path, width: int, height: int) -> None:
    """Red grows left to right, green top to bottom: any crop or flip shows in the pixels."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8)).save(path)


def test_a_caption_file_overrides_the_prompt_and_an_empty_one_does_not(tmp_path):
    for name in ("a", "b", "c"):
        gradient_image(tmp_path / f"{name}.png", 16, 16)
    (tmp_path / "a.txt").write_text("a sks dog on a beach\n")
    (tmp_path / "b.txt").write_text("  \n")
    prompts = {r.path.stem: r.prompt for r in scan_images(tmp_path, "a sks dog")}
    assert prompts == {"a": "a sks dog on a beach", "b": "a sks dog", "c": "a sks dog"}


def test_the_caption_extension_picks_which_file_beside_the_image_is_the_caption(tmp_path):
    gradient_image(tmp_path / "a.png", 16, 16)
    (tmp_path / "a.txt").write_text("from the txt")
    (tmp_path / "a.caption").write_text("from the caption file")
    assert scan_images(tmp_path, "x")[0].prompt == "from the txt"
    assert scan_images(tmp_path, "x", caption_extension=".caption")[0].prompt == "from the caption file"
    assert scan_images(tmp_path, "x", caption_extension=".tags")[0].prompt == "x"


def test_kohya_style_subfolders_add_their_images_with_their_repeats_and_prompt(tmp_path, caplog):
    gradient_image(tmp_path / "top.png", 16, 16)
    (tmp_path / "top.txt").write_text("a captioned one")
    concept = tmp_path / "3_sks dog"
    concept.mkdir()
    for name in ("a", "b"):
        gradient_image(concept / f"{name}.png", 16, 16)
    (concept / "b.txt").write_text("sks dog, running")
    leading_zero = tmp_path / "02_sks cat"  # kohya reads 02 as 2
    leading_zero.mkdir()
    gradient_image(leading_zero / "c.png", 16, 16)
    for ignored in ("notes", "0_zero repeats", "5_"):  # not N_PROMPT with N >= 1 and a prompt
        (tmp_path / ignored).mkdir()
        gradient_image(tmp_path / ignored / "x.png", 16, 16)
    with caplog.at_level(logging.WARNING):
        records = scan_images(tmp_path, None)  # every top-level image has a caption: no prompt needed
    assert [(str(r.path.relative_to(tmp_path)), r.prompt, r.repeats) for r in records] == [
        ("top.png", "a captioned one", 1), ("02_sks cat/c.png", "sks cat", 2), ("3_sks dog/a.png", "sks dog", 3),
        ("3_sks dog/b.png", "sks dog, running", 3),
    ]  # fmt: skip
    assert "skipping the kohya-style folder 0_zero repeats (0 repeats)" in caplog.text
    assert "skipping the kohya-style folder 5_ (no prompt after the underscore)" in caplog.text
    assert "notes" not in caplog.text

    dataset = DreamBoothDataset(records, None, [(16, 16)], repeats=2)
    shown = [example.instance for example in dataset.examples]
    assert len(shown) == (1 + 2 + 3 + 3) * 2
    assert [shown.count(i) for i in range(4)] == [2, 4, 6, 6]


def test_equal_repeats_keep_the_round_robin_order_runs_were_trained_with(tmp_path):
    for name in ("a", "b", "c"):
        gradient_image(tmp_path / f"{name}.png", 16, 16)
    dataset = DreamBoothDataset(scan_images(tmp_path, "x"), None, [(16, 16)], repeats=4)
    assert [example.instance for example in dataset.examples] == [i % 3 for i in range(12)]


def test_a_caption_loses_its_byte_order_mark_and_one_not_in_utf8_is_named(tmp_path):
    gradient_image(tmp_path / "a.png", 16, 16)
    (tmp_path / "a.txt").write_bytes("\ufeffsks dog, running".encode("utf-8"))  # as Windows Notepad saves it
    assert scan_images(tmp_path, "x")[0].prompt == "sks dog, running"
    (tmp_path / "a.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(StudioError, match=r"a\.txt: the caption is not UTF-8 text; save it as UTF-8$"):
        scan_images(tmp_path, "x")


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    pixels, _ = load_pixels(tmp_path / "deep.png", (16, 16), "center", False, random.Random(0))
    expected = np.round(ramp / 257.0) / 127.5 - 1.0  # the same picture at 8 bits, in [-1, 1]
    for channel in pixels:
        np.testing.assert_allclose(channel.numpy(), expected, atol=1e-6)


def test_an_image_with_no_prompt_at_all_is_named(tmp_path):
    for name in ("a", "b"):
        gradient_image(tmp_path / f"{name}.png", 16, 16)
    (tmp_path / "a.txt").write_text("a caption")
    (tmp_path / "b.txt").write_text("  \n")
    with pytest.raises(StudioError, match=r": b.png has no caption \(no or an empty NAME.txt\): give --instance-prompt$"):
        scan_images(tmp_path, None)


def test_shuffled_captions_keep_the_leading_tags_and_vary_by_epoch_but_repeat_for_a_resumed_run(tmp_path):
    gradient_image(tmp_path / "a.png", 8, 8)
    (tmp_path / "a.txt").write_text("sks,  red hair , smiling,outdoors, hat")
    records = scan_images(tmp_path, "x")

    def prompts(keep: int, shuffle: bool = True) -> list[str]:
        dataset = DreamBoothDataset(records, None, [(8, 8)], seed=7, shuffle_caption=shuffle, keep_tokens=keep)
        seen = []
        for epoch in range(40):
            dataset.set_epoch(epoch)
            seen.append(dataset[0]["instance"]["prompt"])
        return seen

    tags = ["sks", "red hair", "smiling", "outdoors", "hat"]
    kept_one = prompts(keep=1)
    assert all(p.split(", ")[0] == "sks" and sorted(p.split(", ")) == sorted(tags) for p in kept_one)
    assert len(set(kept_one)) > 5  # 24 orders of the other four
    assert kept_one == prompts(keep=1)  # a pure function of (seed, epoch, example)
    assert len({p.split(", ")[0] for p in prompts(keep=0)}) > 1  # nothing kept: the first tag moves too
    assert set(prompts(keep=0, shuffle=False)) == {"sks,  red hair , smiling,outdoors, hat"}


def test_center_crop_cuts_equally_from_both_sides(tmp_path):
    gradient_image(tmp_path / "wide.png", 80, 64)
    pixels, (top, left) = load_pixels(tmp_path / "wide.png", (64, 64), "center", False, random.Random(0))
    assert pixels.shape == (3, 64, 64) and (top, left) == (0, 8)
    expected_red = np.linspace(0, 255, 80)[8:72] / 127.5 - 1  # the middle 64 of 80 columns
    np.testing.assert_allclose(pixels[0, 32].numpy(), expected_red, atol=0.02)


def test_random_crop_and_flip_repeat_for_the_same_draw_and_vary_between_draws(tmp_path):
    gradient_image(tmp_path / "wide.png", 96, 64)  # resized to cover 64x64 it stays 96x64: 32 columns to spare
    draws = [load_pixels(tmp_path / "wide.png", (64, 64), "random", True, random.Random(seed)) for seed in range(8)]
    again = load_pixels(tmp_path / "wide.png", (64, 64), "random", True, random.Random(3))
    assert torch.equal(draws[3][0], again[0]) and draws[3][1] == again[1]
    assert len({d[1] for d in draws}) > 1  # crop positions differ
    red_rises = [bool(d[0][0, 32, -1] > d[0][0, 32, 0]) for d in draws]
    assert True in red_rises and False in red_rises  # some are mirrored


def test_buckets_keep_portrait_and_landscape_images_uncropped(tmp_path):
    gradient_image(tmp_path / "portrait.png", 48, 96)
    gradient_image(tmp_path / "landscape.png", 96, 48)
    gradient_image(tmp_path / "square.png", 64, 64)
    records = scan_images(tmp_path, "x")
    buckets = bucket_sizes(64, "auto", None, step=16)
    dataset = DreamBoothDataset(records, None, buckets)
    by_name = {records[e.instance].path.stem: e.bucket for e in dataset.examples}
    assert by_name["portrait"][0] > by_name["portrait"][1]
    assert by_name["landscape"][0] < by_name["landscape"][1]
    assert by_name["square"] == (64, 64)
    height, width = by_name["portrait"]
    assert abs(height / width - 2) < 0.25 and all(side % 16 == 0 for side in by_name["portrait"])
    item = dataset[[r.path.stem for r in records].index("portrait")]["instance"]
    assert item["pixels"].shape == (3, height, width)


def test_batches_share_a_bucket_and_every_example_comes_once_per_epoch(tmp_path):
    for i, size in enumerate([(48, 96), (96, 48), (64, 64), (48, 96), (96, 48), (64, 64), (64, 64)]):
        gradient_image(tmp_path / f"{i}.png", *size)
    dataset = DreamBoothDataset(scan_images(tmp_path, "x"), None, bucket_sizes(64, "auto", None, 16), repeats=2)
    sampler = BucketBatchSampler(dataset, batch_size=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(14))
    assert all(len({dataset.examples[i].bucket for i in b}) == 1 for b in batches)
    assert list(sampler) == batches  # same seed and epoch, same order
    dataset.set_epoch(1)
    assert list(sampler) != batches


@pytest.mark.parametrize("processes", [2, 3])
def test_accelerate_deals_whole_bucket_batches_to_each_process(tmp_path, processes):
    """What `accelerator.prepare` makes of the sampler on several processes: each gets ceil(len / processes)
    batches (the trainer counts an epoch's steps so), none mixing buckets, and together they see every example."""
    for i, size in enumerate([(48, 96), (96, 48), (64, 64), (48, 96), (96, 48)]):
        gradient_image(tmp_path / f"{i}.png", *size)
    dataset = DreamBoothDataset(scan_images(tmp_path, "x"), None, bucket_sizes(64, "auto", None, 16))
    sampler = BucketBatchSampler(dataset, batch_size=2, seed=0)
    assert len(sampler) == 3  # two buckets of two and one of one: a short batch
    shards = [list(BatchSamplerShard(sampler, processes, rank)) for rank in range(processes)]
    assert [len(shard) for shard in shards] == [math.ceil(3 / processes)] * processes
    assert all(len({dataset.examples[i].bucket for i in batch}) == 1 for shard in shards for batch in shard)
    assert {i for shard in shards for batch in shard for i in batch} == set(range(5))


def test_prior_preservation_pairs_each_instance_with_a_class_image_in_the_same_bucket(tmp_path):
    (tmp_path / "i").mkdir(), (tmp_path / "c").mkdir()
    gradient_image(tmp_path / "i" / "tall.png", 48, 96)
    for n in range(3):
        gradient_image(tmp_path / "c" / f"{n}.png", 64, 64)
    dataset = DreamBoothDataset(
        scan_images(tmp_path / "i", "sks"), scan_images(tmp_path / "c", "dog"), bucket_sizes(64, "auto", None, 16)
    )
    assert len(dataset) == 3  # as long as the longer list
    batch = collate([dataset[0], dataset[1]])
    assert batch["prompts"] == ["sks", "sks", "dog", "dog"]  # instance views first, then class views
    assert batch["pixels"].shape[0] == 4 and batch["pixels"].shape[2] > batch["pixels"].shape[3]
    original, crop, target = batch["time_ids"][0].split(2)
    assert original.tolist() == [96, 48] and target.tolist() == list(batch["pixels"].shape[2:])


def test_cached_latents_are_the_vae_distribution_of_the_same_pixels(tmp_path):
    gradient_image(tmp_path / "a.png", 80, 64)
    vae = tiny_sd_pipeline().vae
    dataset = DreamBoothDataset(scan_images(tmp_path, "x"), None, [(64, 64)])
    pixels = dataset[0]["instance"]["pixels"]
    cache_latents(dataset, vae)
    cached = collate([dataset[0]])["latent_parameters"]
    with torch.no_grad():
        expected = vae.encode(pixels[None]).latent_dist
    torch.testing.assert_close(cached[:, :4], expected.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[:, 4:], expected.logvar, rtol=1e-5, atol=1e-5)


def test_latents_of_randomly_augmented_images_are_never_cached(tmp_path):
    gradient_image(tmp_path / "a.png", 64, 64)
    dataset = DreamBoothDataset(scan_images(tmp_path, "x"), None, [(64, 64)], random_flip=True)
    with pytest.raises(ValueError):
        cache_latents(dataset, tiny_sd_pipeline().vae)


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_prompt_cache_matches_the_pipelines_own_prompt_encoding(make):
    pipe = make()
    sdxl = hasattr(pipe, "text_encoder_2")
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
    cache = PromptCache(encoders, tokenizers, ["a red circle", "a sks shape", "a red circle"])
    embeds, pooled = cache.lookup(["a sks shape", "a red circle"])
    with torch.no_grad():
        if sdxl:
            expected, _, expected_pooled, _ = pipe.encode_prompt(
                ["a sks shape", "a red circle"], device="cpu", do_classifier_free_guidance=False
            )
            torch.testing.assert_close(pooled, expected_pooled)
        else:
            expected = pipe.encode_prompt(["a sks shape", "a red circle"], "cpu", 1, False)[0]
            assert pooled is None
        torch.testing.assert_close(embeds, expected)
        torch.testing.assert_close(encode_prompts(encoders, tokenizers, ["a sks shape"])[0], expected[:1])


def test_caption_dropout_empties_class_prompts_only_and_at_the_asked_rate(tmp_path):
    (tmp_path / "i").mkdir(), (tmp_path / "c").mkdir()
    for n in range(400):
        gradient_image(tmp_path / "c" / f"{n:03d}.png", 8, 8)
    gradient_image(tmp_path / "i" / "0.png", 8, 8)
    images, classes = scan_images(tmp_path / "i", "sks"), scan_images(tmp_path / "c", "dog")
    dataset = DreamBoothDataset(images, classes, [(8, 8)], caption_dropout_rate=0.25, seed=3)
    items = [dataset[i] for i in range(len(dataset))]
    assert {item["instance"]["prompt"] for item in items} == {"sks"}  # the concept never teaches the empty prompt
    dropped = sum(item["class"]["prompt"] == "" for item in items)
    assert 60 <= dropped <= 140  # 25% of 400, well inside binomial noise (sd ~ 8.7)
    assert [dataset[i]["class"]["prompt"] for i in range(50)] == [item["class"]["prompt"] for item in items[:50]]


def test_caption_dropout_without_class_images_empties_instance_prompts(tmp_path):
    for n in range(200):
        gradient_image(tmp_path / f"{n:03d}.png", 8, 8)
    dataset = DreamBoothDataset(scan_images(tmp_path, "sks"), None, [(8, 8)], caption_dropout_rate=0.5)
    prompts = [dataset[i]["instance"]["prompt"] for i in range(len(dataset))]
    assert set(prompts) == {"sks", ""}
    assert 60 <= prompts.count("") <= 140


def test_a_kohya_concept_folder_given_itself_warns_that_its_repeats_are_unused(tmp_path, caplog):
    concept = tmp_path / "10_sks dog"
    concept.mkdir()
    gradient_image(concept / "a.png", 16, 16)
    assert [r.repeats for r in scan_images(concept, "sks dog")] == [1]
    assert "named like a kohya concept folder" in caplog.text
