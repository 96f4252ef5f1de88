"""Training quality: retrain the two demo LoRAs from scratch on the demo model and score them. Prints JSON.

- concept: a few purple stars (the demo model never saw purple nor a star) as "a sks shape";
  fidelity = fraction of "a sks shape" samples the demo scorer sees as a purple star.
- the style "striped": ordinary colours and shapes drawn striped, captioned "a red circle, striped";
  fidelity = fraction of "<colour> <shape>, striped" samples scored striped with the right colour and shape.
Both train with prior preservation on captioned drawings of the base world. Prior preservation is the
accuracy (colour and shape right) on the base "a <colour> <shape>" prompts with the LoRA loaded, against the
base model alone. Targets: fidelity >= 0.9, prior within 0.05 of the base, each training <= 5 minutes on
2 CPU cores. `--save` copies the trained files to `assets/loras/` (star, striped); with several `--seeds`, those of
the first seed. A LoRA trained from another seed can score several points apart (see the README), so `--seeds 0 1 2`
also reports each LoRA's mean and range over the seeds.

Run: python bench/train_quality.py [--samples 64] [--seeds 0 ...] [--save] [--only star|striped]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio import demo_eval, demo_world  # noqa: E402
from studio.base import load_base  # noqa: E402
from studio.train_config import TrainConfig  # noqa: E402
from studio.train_dreambooth import train  # noqa: E402

CONCEPT_PROMPT = "a sks shape"
STYLES = ("striped",)  # "outlined" is left out: see CONCEPT_RECIPE's note
SHIPPED_DIR = ROOT / "assets" / "loras"

# The recipes the shipped LoRAs were trained with (the trainer's own options). LoRA on the UNet's attention,
# transformer projections and resnet convolutions (a new shape needs the convolutions: with the attention alone
# the star came out purple but square), with prior preservation on captioned drawings of the base world
# ("regularization images", as kohya users do) whose captions are dropped 20% of the time: that anchors the
# unconditional branch classifier-free guidance subtracts; without it the prior fell from 99% to about 60%.
# The outlined style did not reach 10% fidelity with this recipe nor with the striped one below (7.2%: thin outlines
# come out thick, and the scorer reads them as stripes), so the style LoRA shipped is "striped".
CONCEPT_RECIPE = dict(
    instance_prompt=CONCEPT_PROMPT,
    trigger_words="sks",
    max_train_steps=2000,
    learning_rate=1e-3,
    # The weights' moving average, not the last step's: at a constant 1e-3 the last weights wander, and the star
    # scored 93.8%, 85.9% and 75.0% from seeds 0, 1 and 2 after 1500 steps; their average after 2000, 90.6-95.3%.
    ema_decay=0.995,
    rank=8,
    unet_targets=[
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
    ],
    with_prior_preservation=True,
    class_prompt="a shape",
    num_class_images=24,
    caption_dropout_rate=0.2,
)
RECIPES = {"star": CONCEPT_RECIPE} | {
    style: {
        **CONCEPT_RECIPE,
        "instance_prompt": f"a shape, {style}",
        "trigger_words": style,
        # Past 1000 steps the stripes leak into the plain prompts (all timesteps trained): at 1200 the prior fell by up
        # to 8.5 points (seeds 0-2: 87.8/82.7/86.1% striped), at 1000 by 4.4 (88.9/83.3/90.1%), at 2400 by 17 (68%).
        "max_train_steps": 1000,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",  # constant 5e-4 gave 81% (1200 steps) and 55% (2400): the stripes came and went
        "lr_warmup_steps": 50,
        "ema_decay": None,  # the schedule already settles the weights: the average scored the same (87.6%, 83.5%)
        # Stripes are texture, drawn in the low-noise steps; colour and shape are decided in the noisy ones. Trained
        # on timesteps 0-599 only, the LoRA leaves the latter alone: 93.8/93.2/91.7% striped from seeds 0-2 with the
        # prior within 1.6 points, against 88.9/83.3/90.1% and 4.4 points on all 1000 timesteps (0-799: 86.6%).
        "max_timestep": 600,
    }
    for style in STYLES
}


def draw_training_images(kind: str, folder: Path) -> None:
    """Concept: 8 purple stars. A style: every base colour x shape drawn in it, each with its caption."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "star":
        for i in range(8):
            demo_world.draw_shape("purple", "star", rng=i).save(folder / f"star-{i}.png")
        return
    combos = list(itertools.product(demo_world.BASE_COLOURS, demo_world.BASE_SHAPES))
    for i, (colour, shape) in enumerate(combos):
        demo_world.draw_shape(colour, shape, rng=100 + i, style=kind).save(folder / f"{colour}-{shape}.png")
        (folder / f"{colour}-{shape}.txt").write_text(demo_world.prompt_for(colour, shape, kind))


def draw_regularization_images(folder: Path, per_prompt: int = 2) -> None:
    """The base world, filled, two drawings per colour x shape, captioned with their ordinary prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    combos = itertools.product(demo_world.BASE_COLOURS, demo_world.BASE_SHAPES, range(per_prompt))
    for i, (colour, shape, n) in enumerate(combos):
        demo_world.draw_shape(colour, shape, rng=1000 + i).save(folder / f"{colour}-{shape}-{n}.png")
        (folder / f"{colour}-{shape}-{n}.txt").write_text(demo_world.prompt_for(colour, shape))


def base_accuracy(pipeline, samples: int, steps: int) -> float:
    results, _ = demo_eval.evaluate(
        pipeline, list(demo_world.BASE_COLOURS), list(demo_world.BASE_SHAPES), samples, steps
    )
    return sum(r.both_right for r in results) / len(results)


def concept_fidelity(pipeline, samples: int, steps: int) -> float:
    images = demo_eval.sample_images(pipeline, CONCEPT_PROMPT, list(range(samples)), steps)
    return demo_eval.score_prompt(images, CONCEPT_PROMPT, "purple", "star").both_right


def style_fidelity(pipeline, style: str, samples: int, steps: int) -> float:
    right, total = 0, 0
    for colour, shape in itertools.product(demo_world.BASE_COLOURS, demo_world.BASE_SHAPES):
        prompt = demo_world.prompt_for(colour, shape, style)
        for image in demo_eval.sample_images(pipeline, prompt, list(range(samples)), steps):
            score = demo_eval.score_image(image)
            right += score.style == style and score.colour == colour and score.shape == shape
            total += 1
    return right / total


def run(kind: str, seed: int, base: str, samples: int, steps: int, workdir: Path, base_prior: float) -> dict:
    workdir = workdir / f"seed-{seed}"
    images = workdir / kind / "images"
    draw_training_images(kind, images)
    recipe = dict(RECIPES[kind])
    if recipe.get("with_prior_preservation"):
        recipe["class_dir"] = workdir / kind / "class"
        draw_regularization_images(recipe["class_dir"])
    config = TrainConfig(base=base, instance_dir=images, output_dir=workdir / kind / "out", report_to="none",
                         checkpointing_steps=10**9, seed=seed, **recipe)  # fmt: skip
    started = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - started

    pipeline = load_base(base, device="cpu").pipeline
    pipeline.load_lora_weights(result.lora_path.parent)
    if kind == "star":
        fidelity = concept_fidelity(pipeline, samples, steps)
    else:
        fidelity = style_fidelity(pipeline, kind, samples, steps)
    prior = base_accuracy(pipeline, samples, steps)
    return {
        "lora": kind,
        "seed": seed,
        "fidelity": round(fidelity, 3),
        "prior_accuracy_with_lora": round(prior, 3),
        "prior_accuracy_base": round(base_prior, 3),
        "prior_drop": round(base_prior - prior, 3),
        "steps": result.steps,
        "wall_seconds": round(wall, 1),
        "train_seconds": round(result.seconds, 1),
        "steps_per_second": round(result.steps_per_second, 2),
        "peak_memory_mb": round(result.peak_memory_mb),
        "file": str(result.lora_path),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="demo", help="base model (default: the demo model)")
    parser.add_argument("--samples", type=int, default=64, help="seeded samples per prompt (64: +-4 points)")
    parser.add_argument("--steps", type=int, default=20, help="inference steps per sample")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    parser.add_argument("--only", choices=list(RECIPES), help="train and score one LoRA only")
    parser.add_argument("--save", action="store_true", help="copy the trained LoRAs to assets/loras/")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        base_prior = base_accuracy(load_base(args.base, device="cpu").pipeline, args.samples, args.steps)
        reports, spreads = [], []
        for kind in [args.only] if args.only else list(RECIPES):
            for seed in args.seeds:
                report = run(kind, seed, args.base, args.samples, args.steps, Path(workdir), base_prior)
                report["fidelity_target_met"] = report["fidelity"] >= 0.9
                report["prior_target_met"] = report["prior_drop"] <= 0.05
                if args.save and seed == args.seeds[0]:
                    shipped = SHIPPED_DIR / f"{kind}.safetensors"
                    shipped.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(report["file"], shipped)
                    report["file"] = str(shipped.relative_to(ROOT))
                reports.append(report)
            if len(args.seeds) > 1:
                spreads.append(seed_spread(kind, reports[-len(args.seeds):]))
    summary = {"samples_per_prompt": args.samples, "inference_steps": args.steps, "loras": reports}
    if spreads:
        summary["over_seeds"] = spreads
    print(json.dumps(summary, indent=2))


def seed_spread(kind: str, reports: list[dict]) -> dict:
    """Mean and range of one LoRA's scores over its training seeds."""
    fidelities = [r["fidelity"] for r in reports]
    return {
        "lora": kind,
        "seeds": [r["seed"] for r in reports],
        "fidelity_mean": round(sum(fidelities) / len(fidelities), 3),
        "fidelity_min": min(fidelities),
        "fidelity_max": max(fidelities),
        "prior_drop_max": max(r["prior_drop"] for r in reports),
    }


if __name__ == "__main__":
    main()
