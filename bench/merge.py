"""Merge benchmark: three rank-64 LoRAs over the real SDXL module shapes, with every method. Prints JSON.

The LoRAs cover to_q/to_k/to_v/to_out.0 of every transformer block of the real SDXL UNet and
q/k/v/out_proj of CLIP-L and OpenCLIP-bigG (736 modules; shapes from the architectures built on the
meta device with bench/adapters.py's configs), random float16 factors, no base model. One file is in
kohya naming, two in diffusers naming, so the merge also converts names.

Each method runs in a fresh process with 1 torch thread. Memory is the process's resident set (RSS):
its high-water mark (VmHWM, reset after the imports through /proc/self/clear_refs) minus its RSS right
before merging, i.e. what the merge itself adds, tensors, reading and writing included. Target:
under 2x the largest input file.

Run: python bench/merge.py [--rank 64] [--methods cat svd ...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studio.merge import MERGE_METHODS, merge_loras

DENSITY = 0.5
MIB = 2**20


def method_options(method: str) -> dict:
    return {"density": DENSITY} if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else {}


def sdxl_linear_shapes() -> dict[str, tuple[int, int]]:
    """'component.module' -> (out, in) of every SDXL attention projection a LoRA usually targets."""
    from adapters import CLIP_G, CLIP_L, LORA_TARGETS, SDXL_UNET  # bench/adapters.py
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=49408, **CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_G)),
        }
    return {
        f"{component}.{name}": tuple(module.weight.shape)
        for component, model in models.items()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS)
    }


def write_inputs(folder: Path, rank: int) -> list[Path]:
    from studio.lora_io import write_lora

    shapes = sdxl_linear_shapes()
    paths = []
    for seed, naming in enumerate(("kohya", "diffusers", "diffusers")):
        generator = torch.Generator().manual_seed(seed)
        state_dict = {}
        for key, (out_features, in_features) in shapes.items():
            state_dict[f"{key}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator) * 0.01).half()
            state_dict[f"{key}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator) * 0.01).half()
        paths.append(write_lora(folder / f"input{seed}_{naming}.safetensors", state_dict, naming=naming, family="sdxl"))
        del state_dict
    return paths


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def run_one(method: str, inputs: list[str], out: str) -> dict:
    """In a fresh process: merge once, measure seconds and what the merge adds to the RSS."""
    torch.set_num_threads(1)
    import peft.utils.merge_utils  # noqa: F401  (imported before measuring, as merge_loras would)

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = memory_kib("VmRSS")
    start = time.perf_counter()
    merge_loras(inputs, [0.5, 0.3, 0.2], out, method, **method_options(method))
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "rss_before_mib": before // 1024, "rss_peak_mib": memory_kib("VmHWM") // 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=list(MERGE_METHODS), choices=MERGE_METHODS)
    parser.add_argument("--keep", type=Path, help="write the files here and keep them (default: a temporary folder)")
    parser.add_argument("--run-one", nargs=3, metavar=("METHOD", "INPUTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        method, inputs, out = args.run_one
        print(json.dumps(run_one(method, inputs.split(","), out)))
        return

    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        inputs = write_inputs(folder, args.rank)
        from studio.lora_io import inspect

        report = inspect(inputs[0])
        largest = max(path.stat().st_size for path in inputs)
        results = {
            "inputs": {
                "files": len(inputs),
                "namings": ["kohya", "diffusers", "diffusers"],
                "modules": report.num_modules,
                "rank": args.rank,
                "dtype": "float16",
                "sizes_mib": [round(path.stat().st_size / MIB, 1) for path in inputs],
                "weights": [0.5, 0.3, 0.2],
                "written_in_s": round(time.perf_counter() - start, 1),
            },
            "memory": "RSS high-water mark (VmHWM) of a fresh process minus its RSS before the merge",
            "target": "peak memory < 2x the largest input",
            "methods": {},
        }
        for method in args.methods:
            out = folder / f"merged_{method}.safetensors"
            command = [sys.executable, __file__, "--run-one", method, ",".join(map(str, inputs)), str(out)]
            measured = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            added = (measured["rss_peak_mib"] - measured["rss_before_mib"]) * MIB
            with_options = method_options(method)
            results["methods"][method] = {
                **({"options": with_options} if with_options else {}),
                "seconds": measured["seconds"],
                "peak_added_mib": round(added / MIB, 1),
                "peak_vs_largest_input": round(added / largest, 2),
                "target_met": added < 2 * largest,
                "output_mib": round(out.stat().st_size / MIB, 1),
                "output_vs_largest_input": round(out.stat().st_size / largest, 2),
                "output_ranks": inspect(out).ranks,
                "rss_before_mib": measured["rss_before_mib"],
            }
            if not args.keep:
                out.unlink()
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
