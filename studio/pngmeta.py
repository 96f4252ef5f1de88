"""PNG files that carry how they were made: A1111's `parameters` text (read by A1111, ComfyUI, civitai)
and our `lora-studio` JSON record (the exact blend and settings), written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from studio.errors import StudioError

PARAMETERS_KEY = "parameters"
RECORD_KEY = "lora-studio"


def save_png(path: Path, image: Image.Image, parameters: str, record: dict | None = None) -> None:
    """Write `image` with both text chunks to a temporary name beside `path`, then rename it into place,
    so `path` is either absent or complete, even if the process dies half-way."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    if record is not None:
        info.add_text(RECORD_KEY, json.dumps(record, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format="PNG", pnginfo=info)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_png_metadata(path: Path) -> tuple[str | None, dict | None]:
    """The `parameters` text and the `lora-studio` record of a PNG (None for a chunk it does not have)."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise StudioError(f"{path}: is a {image.format} image, not a PNG")
            text = dict(image.text)
    except (FileNotFoundError, IsADirectoryError):
        raise StudioError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise StudioError(f"{path}: not a readable image ({error})") from None
    record = text.get(RECORD_KEY)
    if record is not None:
        try:
            record = json.loads(record)
        except json.JSONDecodeError as error:
            raise StudioError(f"{path}: its {RECORD_KEY} chunk is not valid JSON ({error})") from None
    return text.get(PARAMETERS_KEY), record
