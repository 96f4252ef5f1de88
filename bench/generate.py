"""Scripted-generation throughput on the demo model: grouped (adapters loaded once, blends switched) vs
naive (each image loads its adapter afresh), and fused vs unfused blends. Prints JSON.

The workload is a recipe of 3 adapters x 4 weights x 2 seeds = 24 images (one weight sweep per adapter,
seeds down the rows), with random rank-8 LoRAs on every UNet attention layer and text-encoder projection.
  grouped          `run_recipe`: base and 3 adapters loaded once, 12 blends switched (unfused), 1 image per call
  grouped_batched  the same with `batch_size = 2`: the 2 seeds of each blend in one pipeline call
  fused            grouped with `fuse = true`: each blend baked into the weights (and unfused exactly after)
  fused_batched    both
  naive            one `Studio` and base; per image: load its adapter, set its weight, render, delete it
  naive_fresh_studio  per image: a fresh `Studio` (base loaded again), as one CLI call per image would do
Times include everything each way must do (model and adapter loading, rendering, writing PNGs for recipes).
Target: grouped >= 3x naive images/s.

Run: python bench/generate.py [--base demo] [--steps 20] [--rank 8] [--threads N] [--repeats 2] [--skip-fresh]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studio.adapters import Studio  # noqa: E402
from studio.generate import run_recipe  # noqa: E402
from studio.lora_io import write_lora  # noqa: E402
from studio.recipe import Axis, Job, Recipe, Sweep  # noqa: E402

ADAPTERS = ("one", "two", "three")
WEIGHTS = (0.25, 0.5, 0.75, 1.0)
SEEDS = (1, 2)
PROMPT = "a red circle"


def random_lora(pipeline, path: Path, rank: int, seed: int) -> None:
    """A rank-`rank` LoRA on the UNet attention layers and the text encoder's attention projections."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for component in ("unet", "text_encoder"):
        for name, module in getattr(pipeline, component).named_modules():
            wanted = ".attentions." in name if component == "unet" else name.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))
            if isinstance(module, torch.nn.Linear) and wanted:
                out_features, in_features = module.weight.shape
                state_dict[f"{component}.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.05
                state_dict[f"{component}.{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.05
    write_lora(path, state_dict)


def recipe(base: str, lora_dir: Path, out: Path, steps: int, fuse: bool, batch_size: int) -> Recipe:
    jobs = [
        Job(
            prompt=PROMPT,
            name=name,
            steps=steps,
            loras={name: 1.0},
            fuse=fuse,
            sweep=Sweep(x=Axis("weight", list(WEIGHTS), adapter=name), y=Axis("seed", list(SEEDS))),
        )
        for name in ADAPTERS
    ]
    return Recipe(jobs=jobs, base=base, out=out, lora_dir=lora_dir, batch_size=batch_size)


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def naive(base: str, lora_dir: Path, steps: int, fresh_studio: bool) -> list[np.ndarray]:
    images = []
    studio = None if fresh_studio else Studio.from_base(base)
    for name in ADAPTERS:
        for seed in SEEDS:
            for weight in WEIGHTS:
                if fresh_studio:
                    studio = Studio.from_base(base)
                studio.load_adapter(lora_dir / f"{name}.safetensors", name=name, weight=weight)
                images.append(np.asarray(studio.generate(PROMPT, seed=seed, steps=steps)[0]))
                studio.delete_adapter(name)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-fresh", action="store_true", help="skip naive_fresh_studio (the slowest)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way, interleaved; the fastest counts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    count = len(ADAPTERS) * len(WEIGHTS) * len(SEEDS)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        pipeline = Studio.from_base(args.base).pipeline
        for seed, name in enumerate(ADAPTERS):
            random_lora(pipeline, folder / f"{name}.safetensors", args.rank, seed)
        del pipeline
        Studio.from_base(args.base).generate(PROMPT, steps=2)  # warm-up: first-call allocations and caches

        ways = {
            name: (lambda out, fuse=fuse, batch=batch: run_recipe(recipe(args.base, folder, out, args.steps, fuse, batch)))
            for name, fuse, batch in (("grouped", False, 1), ("grouped_batched", False, 2), ("fused", True, 1), ("fused_batched", True, 2))
        }
        ways["naive"] = lambda out: naive(args.base, folder, args.steps, fresh_studio=False)
        if not args.skip_fresh:
            ways["naive_fresh_studio"] = lambda out: naive(args.base, folder, args.steps, fresh_studio=True)
        results, outputs = {}, {}
        for repeat in range(args.repeats):  # interleaved, best of each: the machine may be shared
            for way, run in ways.items():
                out = folder / f"{way}-{repeat}"
                seconds, outputs[way] = timed(lambda: run(out))
                results[way] = min(seconds, results.get(way, seconds))

        grouped_images = [
            np.asarray(Image.open(folder / "grouped-0" / f"{name}-{name}-{weight:g}-s{seed}.png"))
            for name in ADAPTERS
            for seed in SEEDS
            for weight in WEIGHTS
        ]
        same = all(np.array_equal(a, b) for a, b in zip(grouped_images, outputs["naive"], strict=True))

    report = {
        "base": args.base,
        "images": count,
        "recipe": f"{len(ADAPTERS)} adapters x {len(WEIGHTS)} weights x {len(SEEDS)} seeds",
        "steps": args.steps,
        "rank": args.rank,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "seconds": {way: round(s, 3) for way, s in results.items()},
        "images_per_s": {way: round(count / s, 3) for way, s in results.items()},
        "grouped_over_naive": round(results["naive"] / results["grouped"], 2),
        "grouped_batched_over_naive": round(results["naive"] / results["grouped_batched"], 2),
        "fused_batched_over_naive": round(results["naive"] / results["fused_batched"], 2),
        "fused_over_unfused": round(results["grouped"] / results["fused"], 2),
        "grouped_images_equal_naive_images": same,
        "target_grouped_ge_3x_naive": results["naive"] / results["grouped"] >= 3,
    }
    if "naive_fresh_studio" in results:
        report["grouped_over_naive_fresh_studio"] = round(results["naive_fresh_studio"] / results["grouped"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
