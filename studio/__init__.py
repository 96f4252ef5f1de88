"""LoRA Studio: train, load, blend, merge and use image LoRA adapters on Stable Diffusion.

`from studio import Studio` is the entry point (see "Adapters" in the README). It is imported lazily so
that light modules (`studio.demo_world`, the CLIs' `--help`) start without loading diffusers.
"""

import logging

from transformers.utils import logging as transformers_logging

__all__ = ["Studio"]


def _hide_torchvision_notices() -> None:
    """transformers says on import that its CLIP image processors fall back to PIL without torchvision; the
    studio never uses them (no safety checker), so on every command that line is only noise."""
    transformers_logging.get_logger("transformers")  # makes sure the library's handler exists
    for handler in logging.getLogger("transformers").handlers:
        handler.addFilter(lambda record: "requires torchvision" not in record.getMessage())


_hide_torchvision_notices()


def __getattr__(name: str):
    if name == "Studio":
        from studio.adapters import Studio

        return Studio
    raise AttributeError(f"module 'studio' has no attribute {name!r}")
