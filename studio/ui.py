"""The Gradio app: a page that draws with the base model (the full studio UI grows from here)."""

from __future__ import annotations

import gradio as gr
import torch

from studio.base import BaseModel


def build_app(base: BaseModel) -> gr.Blocks:
    """A prompt, a seed, a few settings and a gallery, all rendering with `base`'s pipeline."""

    def generate(prompt: str, seed: int, steps: int, guidance: float, count: int):
        generator = torch.Generator("cpu").manual_seed(int(seed))
        result = base.pipeline(
            prompt,
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            num_images_per_prompt=int(count),
            generator=generator,
        )
        return result.images

    with gr.Blocks(title="LoRA Studio") as app:
        gr.Markdown(f"# LoRA Studio\nBase model: `{base.source}` ({base.family})")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value="a red circle")
                seed = gr.Number(label="Seed", value=0, precision=0)
                steps = gr.Slider(1, 50, value=20, step=1, label="Steps")
                guidance = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="Guidance")
                count = gr.Slider(1, 8, value=4, step=1, label="Images")
                button = gr.Button("Generate", variant="primary")
            gallery = gr.Gallery(label="Images", columns=4)
        button.click(generate, [prompt, seed, steps, guidance, count], gallery)
    return app
