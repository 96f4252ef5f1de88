"""LoRA Studio: train, load, blend, merge and use image LoRA adapters on Stable Diffusion.

`from studio import Studio` is the entry point (see ARCHITECTURE in the README). It is imported lazily so
that light modules (`studio.demo_world`, the CLIs' `--help`) start without loading diffusers.
"""

__all__ = ["Studio"]


def __getattr__(name: str):
    if name == "Studio":
        from studio.adapters import Studio

        return Studio
    raise AttributeError(f"module 'studio' has no attribute {name!r}")
