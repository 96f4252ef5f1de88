"""Validation prompts: diffusers' one prompt, or kohya's prompt file with options on each line."""

from __future__ import annotations

import logging

import pytest

from studio.errors import StudioError
from studio.validation_prompts import ValidationImage, validation_images_wanted


def test_one_prompt_makes_count_images_at_consecutive_seeds():
    assert validation_images_wanted("a sks dog", 3, None, seed=10) == [
        ValidationImage("a sks dog", 10), ValidationImage("a sks dog", 11), ValidationImage("a sks dog", 12),
    ]  # fmt: skip
    assert validation_images_wanted(None, 3, None, seed=0) == []


def test_a_prompt_file_line_carries_kohyas_options(tmp_path, caplog):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# comments and blank lines are skipped\n\n  # indented too\n"
        "a sks dog on a beach --n blurry, lowres --w 512 --H 768 --s 28 --l 7.5 --d 42\n"
        "a sks dog --ss euler_a --s 10\n"
        "a cat\n"
    )
    with caplog.at_level(logging.WARNING):
        wanted = validation_images_wanted(None, 4, path, seed=100)
    assert wanted == [
        ValidationImage("a sks dog on a beach", 42, "blurry, lowres", 512, 768, 28, 7.5),
        ValidationImage("a sks dog", 101, steps=10),  # no --d: the seed counts on from --seed
        ValidationImage("a cat", 102),
    ]
    assert "prompts.txt line 5: ignoring --ss euler_a" in caplog.text


@pytest.mark.parametrize(
    "text, message",
    [
        ("a dog --w 500\n", r"prompts.txt line 1: the width 500 is not a positive multiple of 8$"),
        ("# only\n\n", r"prompts.txt: the prompt file holds no prompt$"),
        ("a dog\n --n cat\n", r"prompts.txt line 2: no prompt before the options$"),
        ("a dog --d seven\n", r"prompts.txt line 1: --d 'seven' should be int$"),
        ("a dog --s 0\n", r"prompts.txt line 1: --s 0 should be at least 1$"),
        ("a dog --d -3\n", r"prompts.txt line 1: --d -3 should be a seed from 0 to 2\*\*32 - 1$"),
        ("a dog --l nan\n", r"prompts.txt line 1: --l nan should be a guidance scale of 0 or more$"),
    ],
)
def test_prompt_file_mistakes_name_the_line(tmp_path, text, message):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    with pytest.raises(StudioError, match=message):
        validation_images_wanted(None, 1, path, seed=0)


def test_only_text_prompt_files_are_read(tmp_path):
    path = tmp_path / "prompts.toml"
    path.write_text("[prompt]\n")
    with pytest.raises(StudioError, match=r"prompts.toml: prompt files are text files"):
        validation_images_wanted(None, 1, path, seed=0)
    with pytest.raises(StudioError, match=r"missing.txt: cannot read the prompt file"):
        validation_images_wanted(None, 1, tmp_path / "missing.txt", seed=0)
