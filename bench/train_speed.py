"""Trainer speed: steps/s and peak memory on tiny-sd and the demo model, with caching on and off. Prints JSON.

Each case runs in its own process (peak memory is per process) with the settings of the diffusers anchor
(`examples/dreambooth/train_dreambooth_lora.py`): batch 1, rank 4, UNet targets to_k,to_q,to_v,to_out.0,
native resolution, 100 steps, no validation, no checkpoints. "caching off" encodes every batch's images with
the VAE and its prompts with the text encoder, as the anchor does; "caching on" is the trainer's default.

Run: python bench/train_speed.py [--steps 100] [--bases tiny-sd demo] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_case(base: str, cache: bool, steps: int, workdir: Path) -> dict:
    """Train once in this process and describe it."""
    from studio import demo_world
    from studio.train_config import TrainConfig
    from studio.train_dreambooth import train

    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        demo_world.draw_shape("purple", "star", size_px=64, rng=i).save(images / f"{i}.png")
    config = TrainConfig(
        base=base,
        instance_dir=images,
        instance_prompt="a sks shape",
        output_dir=workdir / "out",
        max_train_steps=steps,
        rank=4,
        unet_targets=["to_k", "to_q", "to_v", "to_out.0"],
        cache_latents=cache,
        cache_prompt_embeddings=cache,
        checkpointing_steps=10**9,
        report_to="none",
    )
    result = train(config)
    return {
        "base": base,
        "caching": cache,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "steps_per_second": round(result.steps_per_second, 2),
        "peak_memory_mb": round(result.peak_memory_mb),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--bases", nargs="+", default=["tiny-sd", "demo"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--one", nargs=2, metavar=("BASE", "CACHE"), help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.one:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(one_case(args.one[0], args.one[1] == "on", args.steps, Path(workdir))))
        return

    cases = []
    for base in args.bases:
        for cache in ("off", "on"):
            command = [sys.executable, __file__, "--one", base, cache, "--steps", str(args.steps)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
            if done.returncode != 0:
                cases.append({"base": base, "caching": cache == "on", "error": done.stderr.strip().splitlines()[-1]})
                continue
            cases.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for base in args.bases:
        off, on = (next(c for c in cases if c["base"] == base and c["caching"] is flag) for flag in (False, True))
        if "error" not in off and "error" not in on:
            on["speedup_vs_no_caching"] = round(on["steps_per_second"] / off["steps_per_second"], 2)
    import torch

    print(json.dumps({"machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
                                  "device": "cuda" if torch.cuda.is_available() else "cpu"},
                      "cases": cases}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
