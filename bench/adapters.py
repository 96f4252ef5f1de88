"""Adapter benchmark on the real SD1.5 / SDXL architectures (random weights, no downloads). Prints JSON.

Measures: loading a rank-32 kohya-format SDXL LoRA with the studio vs plain diffusers `load_lora_weights`
on the same file; switching the blend among 5 loaded adapters; one UNet step with 0, 1 and 3 adapters,
unfused and fused. Targets: load within 1.1x of diffusers, switch under 50 ms, 3 fused within 3% of base.
Times are CPU seconds of this process, the minimum over `--repeats` runs taken round robin across the cases
(other work on a shared machine only adds time); the switch times are wall-clock.

Run: python bench/adapters.py [--family sdxl|sd1] [--latent 32] [--repeats 5] [--threads 1] [--skip-steps]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studio.adapters import Studio  # noqa: E402
from studio.base import BaseModel  # noqa: E402
from studio.lora_io import write_lora  # noqa: E402
from studio.tiny import load_tokenizer, tiny_vae  # noqa: E402

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=64,
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def materialised(build, dtype):
    """Build a module on the meta device, then give it random weights: seconds instead of a slow init."""
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * 0.02)
        for buffer_name, buffer in module.named_buffers():
            if "position_ids" in buffer_name:
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return module


def real_pipeline(family: str, dtype: torch.dtype):
    tokenizer = load_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    unet_config = SDXL_UNET if family == "sdxl" else SD15_UNET
    unet = materialised(lambda: UNet2DConditionModel(**unet_config), dtype)
    text_encoder = materialised(lambda: CLIPTextModel(CLIPTextConfig(vocab_size=49408, **ids, **CLIP_L)), dtype)
    if family == "sd1":
        return StableDiffusionPipeline(
            unet=unet, vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, scheduler=None,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    text_encoder_2 = materialised(lambda: CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **ids, **CLIP_G)), dtype)
    return StableDiffusionXLPipeline(
        unet=unet, vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=None,
    )  # fmt: skip


def random_lora(pipeline, rank: int, seed: int, components=("unet", "text_encoder", "text_encoder_2")):
    """A diffusers-named LoRA (rank `rank`) on every attention projection of `components`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for component in components:
        model = getattr(pipeline, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS):
                out_features, in_features = module.weight.shape
                tensors[f"{component}.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
                tensors[f"{component}.{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    return tensors


def seconds(action, repeats: int) -> float:
    """The fastest of `repeats` runs of `action`, in CPU seconds of this process: on a shared machine other
    work only ever adds time, so the minimum of CPU time is the steadiest estimate of the action's own cost."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        action()
        times.append(time.process_time() - start)
    return min(times)


def unet_step(pipeline, family: str, latent: int, dtype):
    """One UNet forward at latent size `latent`, with the conditioning of the family."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, latent, latent, generator=generator, dtype=dtype)
    context = torch.randn(1, 77, pipeline.unet.config.cross_attention_dim, generator=generator, dtype=dtype)
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, generator=generator, dtype=dtype),
            "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]], dtype=dtype),
        }

    def step():
        with torch.no_grad():
            pipeline.unet(sample, 500, encoder_hidden_states=context, **extra)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sdxl", "sd1"], default="sdxl")
    parser.add_argument("--latent", type=int, default=32, help="latent side for the UNet step (32 = 256 px)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--skip-steps", action="store_true", help="only load and switch timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.float32
    results: dict = {"family": args.family, "rank": args.rank, "device": "cpu", "threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory() as folder:
        pipeline = real_pipeline(args.family, dtype)
        base = BaseModel(pipeline=pipeline, family=args.family, source=f"real-{args.family}-random", device=torch.device("cpu"), dtype=dtype)
        # The same kohya file for both loaders: UNet only, since plain diffusers 0.42 cannot load kohya
        # text-encoder keys under transformers 5 (the studio can; timed separately below).
        unet_file = Path(folder) / "unet-kohya.safetensors"
        write_lora(unet_file, random_lora(pipeline, args.rank, 0, components=("unet",)), {}, naming="kohya", family=args.family)
        full_file = Path(folder) / "full-kohya.safetensors"
        write_lora(full_file, random_lora(pipeline, args.rank, 1), {}, naming="kohya", family=args.family)
        # Every LoRA is drawn before any is injected: injection wraps the Linear layers they target.
        adapter_files = []
        for seed in range(5):
            path = Path(folder) / f"adapter{seed}.safetensors"
            write_lora(path, random_lora(pipeline, args.rank, 10 + seed), {}, naming="diffusers", family=args.family)
            adapter_files.append(path)
        results["lora_file_mb"] = {"unet": round(unet_file.stat().st_size / 2**20, 1), "unet+te": round(full_file.stat().st_size / 2**20, 1)}

        def diffusers_load():
            pipeline.load_lora_weights(str(unet_file), adapter_name="plain")
            pipeline.delete_adapters("plain")

        studio = Studio(base)
        step = unet_step(pipeline, args.family, args.latent, dtype)
        if not args.skip_steps:
            step()  # warm-up
            plain_step_s = seconds(step, args.repeats)  # no LoRA layers injected at all

        def studio_load():
            studio.load_adapter(unet_file, name="studio")
            studio.delete_adapter("studio")

        seconds(diffusers_load, 1)  # warm caches and imports for both
        diffusers_s = studio_s = float("inf")
        for _ in range(args.repeats):  # interleaved, as the step timings below
            diffusers_s = min(diffusers_s, seconds(diffusers_load, 1))
            studio_s = min(studio_s, seconds(studio_load, 1))
        results["load_unet_kohya_s"] = {"diffusers": round(diffusers_s, 3), "studio": round(studio_s, 3), "ratio": round(studio_s / diffusers_s, 3)}
        results["load_unet_te_kohya_s"] = {"studio": round(seconds(lambda: (studio.load_adapter(full_file, name="full"), studio.delete_adapter("full")), args.repeats), 3)}

        names = []
        for index, path in enumerate(adapter_files):
            names.append(studio.load_adapter(path, name=f"a{index}", weight=0.0).name)
        blends = [{name: (0.2 * (i + j) % 1.0) for j, name in enumerate(names)} for i in range(1, 6)]
        switch_times = []
        for blend in blends * 2:
            start = time.perf_counter()
            studio.set_adapters(blend)
            switch_times.append(time.perf_counter() - start)
        results["switch_blend_ms"] = {"median": round(statistics.median(switch_times) * 1000, 1), "max": round(max(switch_times) * 1000, 1)}

        if not args.skip_steps:
            timings = {"base_no_lora_layers": round(plain_step_s, 3)}
            cases = {
                "0_adapters_loaded_disabled": ({}, False),
                "1_adapter": ({names[0]: 0.8}, False),
                "3_adapters": ({names[0]: 0.8, names[1]: 0.5, names[2]: 0.3}, False),
                "1_adapter_fused": ({names[0]: 0.8}, True),
                "3_adapters_fused": ({names[0]: 0.8, names[1]: 0.5, names[2]: 0.3}, True),
            }
            best: dict[str, float] = {}
            for _ in range(args.repeats):  # round robin: a slow spell of the machine hits every case alike
                for label, (weights, fused) in cases.items():
                    studio.set_adapters(weights)
                    studio.fuse() if fused else studio.unfuse()
                    step()  # warm-up after the weights changed
                    best[label] = min(best.get(label, float("inf")), seconds(step, 1))
            timings |= {label: round(value, 3) for label, value in best.items()}
            studio.unfuse()
            results["unet_step_s"] = timings
            results["latent"] = args.latent
            results["fused_3_vs_base"] = round(best["3_adapters_fused"] / plain_step_s, 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
