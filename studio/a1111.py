"""The two AUTOMATIC1111 text formats people paste around: `<lora:name:weight>` prompt tags and the
`parameters` infotext that A1111, ComfyUI and civitai write into (and read from) PNG files.

    split_lora_tags("a red circle <lora:stripes:0.8>")  # ("a red circle", [LoraTag("stripes", 0.8, 0.8)])
    format_infotext("a red circle", "", {"Steps": 20, "Seed": 1})
    parse_infotext(text)  # {"Prompt": ..., "Negative prompt": ..., "Steps": "20", "Seed": "1"}

Only the text lives here; which files the names mean and how weights reach the model is `studio.generate`'s job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from studio.errors import StudioError

LORA_TAG = re.compile(r"<lora:([^>]*)>")
# One `Key: value` pair of the last infotext line; a value with commas or colons is JSON-quoted (A1111's re_param).
INFOTEXT_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
NEGATIVE_PREFIX = "Negative prompt:"


@dataclass(frozen=True)
class LoraTag:
    """`<lora:name:te:unet>` as A1111 reads it: one weight for the text encoder(s), one for the UNet."""

    name: str
    text_encoder: float = 1.0
    unet: float = 1.0

    def weight_for(self, components: list[str]) -> float | dict[str, float]:
        """The weight in `Studio` form for an adapter with these components: a number when both parts are
        equal, else one entry per component (A1111's te weight goes to every text encoder, as in SDXL)."""
        if self.text_encoder == self.unet:
            return self.unet
        return {c: self.unet if c == "unet" else self.text_encoder for c in components}


def split_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its `<lora:...>` tags (whitespace tidied), and the tags in order of appearance."""
    tags = [_parse_tag(match.group(1), prompt) for match in LORA_TAG.finditer(prompt)]
    text = " ".join(LORA_TAG.sub(" ", prompt).split()).strip(" ,")
    return text, tags


def format_lora_tag(name: str, weight: float | Mapping) -> str | None:
    """The A1111 tag for a validated `Studio` weight, or None when A1111's syntax cannot say it (per block)."""
    if not isinstance(weight, Mapping):
        return f"<lora:{name}:{format_number(weight)}>"
    unet = weight.get("unet", 1.0)
    text_encoders = {value for component, value in weight.items() if component != "unet"}
    if isinstance(unet, Mapping) or len(text_encoders) > 1:
        return None
    text_encoder = text_encoders.pop() if text_encoders else unet
    if text_encoder == unet:
        return f"<lora:{name}:{format_number(unet)}>"
    return f"<lora:{name}:{format_number(text_encoder)}:{format_number(unet)}>"


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """A1111's `parameters` text: the prompt, `Negative prompt: ...` when there is one, then `Key: value, ...`."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(format_number(value))}" for key, value in params.items()))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, str]:
    """Read A1111's `parameters` text back (as A1111's own parser does): `Prompt`, `Negative prompt`, and
    each `Key: value` of the last line, unquoted, as strings."""
    *lines, last = text.strip().split("\n")
    if len(INFOTEXT_PARAM.findall(last)) < 3:  # no parameter line: it is all prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in INFOTEXT_PARAM.findall(last):
        result[key] = json.loads(value) if value.startswith('"') else value
    return result


def parse_lora_hashes(value: str) -> dict[str, str]:
    """`Lora hashes: "a: 0123456789ab, b: ..."` as {name: short hash}."""
    pairs = (item.rsplit(":", 1) for item in value.split(",") if item.strip())
    return {name.strip(): digest.strip() for name, digest in pairs}


def format_number(value: object) -> str:
    """Numbers as people type them (`0.5`, `1`, `7.5`), never losing precision; anything else as text."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def _parse_tag(body: str, prompt: str) -> LoraTag:
    """`name`, `name:w`, `name:te:unet`, with A1111's named `te=` / `unet=` overriding the positions."""
    name, *params = body.split(":")
    positional = [p for p in params if "=" not in p]
    named = dict(p.split("=", 1) for p in params if "=" in p)
    unknown = sorted(set(named) - {"te", "unet"})
    if not name.strip() or len(positional) > 2 or unknown:
        problem = f"unknown option(s) {', '.join(unknown)}" if unknown else "use <lora:name>, <lora:name:w> or <lora:name:te:unet>"
        raise StudioError(f"prompt {prompt!r}: cannot read <lora:{body}>: {problem}")
    try:
        text_encoder = float(named.get("te", positional[0] if positional else 1.0))
        unet = float(named.get("unet", positional[1] if len(positional) > 1 else text_encoder))
    except ValueError:
        raise StudioError(f"prompt {prompt!r}: <lora:{body}> has a weight that is not a number") from None
    return LoraTag(name=name.strip(), text_encoder=text_encoder, unet=unet)


def _quote(text: str) -> str:
    """A1111 quotes a value with JSON when it holds a comma, colon or newline, so the line stays parseable."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text
