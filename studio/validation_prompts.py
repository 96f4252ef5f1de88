"""What the trainer draws to show progress: `--validation-prompt` (diffusers' way: N images of one prompt) or a
prompt file in kohya's `--sample_prompts` format, one image per line with its own options:

    a sks dog on a beach --n blurry, lowres --w 512 --h 768 --s 28 --l 7.5 --d 42

`--n` negative prompt, `--w`/`--h` size, `--s` denoising steps, `--l` guidance scale, `--d` seed. Lines that are
empty or start with `#` are skipped. kohya's options for other model kinds (`--ss` sampler, `--cn`, `--g`, ...)
are ignored with a warning, as kohya ignores what it cannot parse. The file is read before any model loads, so
its mistakes are one-line errors naming the line.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError

logger = logging.getLogger(__name__)

# kohya's option letters that set something here, and how each value is read.
OPTIONS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int),
           "l": ("guidance_scale", float), "d": ("seed", int)}  # fmt: skip


@dataclass(frozen=True)
class ValidationImage:
    """One validation image; None means the trainer's setting (size: the training resolution, steps:
    `--inference-steps`, guidance: the pipeline's default)."""

    prompt: str
    seed: int
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None

    def settings(self) -> tuple:
        """Everything but the seed: images that share it are drawn in one pipeline call."""
        return (self.prompt, self.negative_prompt, self.width, self.height, self.steps, self.guidance_scale)


def validation_images_wanted(
    prompt: str | None, count: int, prompt_file: Path | None, seed: int
) -> list[ValidationImage]:
    """`count` images of `prompt` at seeds seed, seed + 1, ...; or one per line of `prompt_file`, line i (from 0)
    at seed + i unless it gives `--d`. Empty when neither is given."""
    if prompt_file is not None:
        return read_prompt_file(prompt_file, seed)
    if prompt is None:
        return []
    return [ValidationImage(prompt=prompt, seed=seed + i) for i in range(count)]


def read_prompt_file(path: Path, seed: int) -> list[ValidationImage]:
    if path.suffix.lower() != ".txt":
        raise StudioError(f"{path}: prompt files are text files, one prompt per line (kohya's .txt format)")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as error:
        raise StudioError(f"{path}: cannot read the prompt file ({error.strerror})") from None
    except UnicodeDecodeError:
        raise StudioError(f"{path}: the prompt file is not UTF-8 text") from None
    images = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            images.append(_parse_line(text, f"{path} line {number}", seed + len(images)))
    if not images:
        raise StudioError(f"{path}: the prompt file holds no prompt")
    return images


def _parse_line(line: str, where: str, seed: int) -> ValidationImage:
    prompt, *options = (" " + line).split(" --")  # the space: a line that starts with an option has no prompt
    if not prompt.strip():
        raise StudioError(f"{where}: no prompt before the options")
    values: dict = {"prompt": prompt.strip(), "seed": seed}
    for option in options:
        letter, _, value = option.partition(" ")
        if letter.lower() not in OPTIONS:
            logger.warning("%s: ignoring --%s (not an option for this model kind)", where, option.strip())
            continue
        name, kind = OPTIONS[letter.lower()]
        try:
            values[name] = kind(value.strip())
        except ValueError:
            raise StudioError(f"{where}: --{letter} {value.strip()!r} should be {kind.__name__}") from None
    for name in ("width", "height"):
        if name in values and (values[name] <= 0 or values[name] % 8):
            raise StudioError(f"{where}: the {name} {values[name]} is not a positive multiple of 8")
    if values.get("steps", 1) < 1:
        raise StudioError(f"{where}: --s {values['steps']} should be at least 1")
    if not 0 <= values["seed"] < 2**32:
        raise StudioError(f"{where}: --d {values['seed']} should be a seed from 0 to 2**32 - 1")
    if "guidance_scale" in values and not 0 <= values["guidance_scale"] < math.inf:
        raise StudioError(f"{where}: --l {values['guidance_scale']} should be a guidance scale of 0 or more")
    return ValidationImage(**values)
