"""`python -m studio.lora`: inspect, convert and merge LoRA files, and bake a blend into a base model.

    python -m studio.lora inspect FILE [--json] [--allow-pickle]
    python -m studio.lora convert IN OUT --to diffusers|kohya [--allow-pickle]
    python -m studio.lora merge A B [...] [--weights WA WB ...] [--method cat|linear|svd|ties|dare_linear|dare_ties|
        magnitude_prune] [--density D] [--rank R] [--clamp Q] [--majority-sign total|frequency] [--seed N]
        [--to diffusers|kohya] [--allow-pickle] -o OUT.safetensors
    python -m studio.lora fuse-export --base BASE --lora FILE[:WEIGHT] ... --out OUT(.safetensors|folder) [--dtype fp16]

Each subcommand is registered by an `add_*_command(subcommands)` function that sets `run`.
User errors print one line to stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from studio.errors import StudioError
from studio.lora_io import NAMINGS, LoraReport, inspect, open_lora, read_lora, write_lora
from studio.merge import MAJORITY_SIGN_METHODS, MERGE_METHODS, merge_loras

METADATA_VALUE_WIDTH = 100


def add_inspect_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("inspect", help="show a LoRA file's format, family, ranks, hashes and metadata")
    parser.add_argument("file", help="a LoRA file (.safetensors; .ckpt/.pt/.bin only with --allow-pickle)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--allow-pickle", action="store_true", help="read a pickle file (weights-only unpickler)")
    parser.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    report = inspect(args.file, allow_pickle=args.allow_pickle)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def add_convert_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "convert", help="rewrite a LoRA of any readable format in diffusers or kohya naming (exact, scales baked)"
    )
    parser.add_argument("input", help="the LoRA file to read")
    parser.add_argument("output", help="the .safetensors file to write (replaced atomically)")
    parser.add_argument("--to", required=True, choices=NAMINGS, help="naming of the written file")
    parser.add_argument("--allow-pickle", action="store_true", help="read a pickle input (weights-only unpickler)")
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    lora = read_lora(args.input, allow_pickle=args.allow_pickle)
    metadata = {**lora.metadata, "studio.converted_from": f"{lora.format} ({lora.naming} naming)"}
    path = write_lora(args.output, lora.state_dict, metadata, naming=args.to, family=lora.family)
    print(f"wrote {path} ({args.to} naming, {lora.family}, {len(lora.modules)} modules, from {lora.format})")
    return 0


def add_merge_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "merge", help="merge LoRA files with weights into one new LoRA file (cat is exact; see studio.merge)"
    )
    parser.add_argument("inputs", nargs="+", metavar="LORA", help="the LoRA files to merge (any readable format)")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per file (default 1 each)")
    parser.add_argument("--method", default="cat", choices=MERGE_METHODS, help="how to merge (default: cat, exact)")
    parser.add_argument("--density", type=float, help="ties, dare_*, magnitude_prune: fraction of entries kept, (0, 1]")
    parser.add_argument("--rank", type=int, help="svd: the merged rank (default: the largest input rank)")
    parser.add_argument("--clamp", type=float, help="svd: clamp the factors at this quantile of their entries (0, 1]")
    parser.add_argument("--majority-sign", default="total", choices=MAJORITY_SIGN_METHODS, help="ties, dare_ties")
    parser.add_argument("--seed", type=int, default=0, help="dare_*: seed of the random pruning")
    parser.add_argument("--to", default="diffusers", choices=NAMINGS, help="naming of the merged file")
    parser.add_argument("--allow-pickle", action="store_true", help="read pickle inputs (weights-only unpickler)")
    parser.add_argument("-o", "--output", required=True, help="the .safetensors file to write (replaced atomically)")
    parser.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    path = merge_loras(
        args.inputs,
        args.weights or [1.0] * len(args.inputs),
        args.output,
        args.method,
        density=args.density,
        rank=args.rank,
        clamp=args.clamp,
        majority_sign_method=args.majority_sign,
        naming=args.to,
        seed=args.seed,
        allow_pickle=args.allow_pickle,
    )
    with open_lora(path) as merged:
        modules, ranks = len(merged.modules), ", ".join(map(str, sorted({m.rank for m in merged.modules})))
    print(f"merged {len(args.inputs)} LoRAs with {args.method}: {modules} modules, rank {ranks}; wrote {path}")
    return 0


def add_fuse_export_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "fuse-export", help="bake a blend of LoRAs into the base model; save a diffusers folder or one .safetensors"
    )
    parser.add_argument("--base", default="demo", help='"demo", a diffusers folder, a .safetensors file, a hub id')
    parser.add_argument("--base-config", metavar="DIR", help="config folder for a single-file --base, needed offline")
    parser.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]", help="repeatable")
    parser.add_argument("--out", required=True, help="OUT.safetensors: one A1111-layout file; else a diffusers folder")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    parser.add_argument("--allow-pickle", action="store_true", help="read pickle files (weights-only unpickler)")
    parser.set_defaults(run=run_fuse_export)


def run_fuse_export(args: argparse.Namespace) -> int:
    # Imported here: diffusers takes seconds to import, and inspect and convert need none of it.
    from studio.export import fuse_export
    from studio.generate import split_lora_weight

    loras = [split_lora_weight(reference) for reference in args.lora]
    out = fuse_export(
        args.base,
        loras,
        args.out,
        dtype=args.dtype,
        base_config=args.base_config,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
    )
    kind = "single-file checkpoint" if out.suffix == ".safetensors" else "diffusers folder"
    blend = ", ".join(f"{source} x{weight:g}" for source, weight in loras)
    print(f"wrote {out} ({kind}, {args.dtype}, base {args.base} + {blend}; verified: reloads in plain diffusers)")
    return 0


def format_report(report: LoraReport) -> str:
    """The human-readable form of an inspect report."""
    components = ", ".join(f"{name} ({count})" for name, count in report.components.items())
    ranks = ", ".join(map(str, report.ranks)) or "none (full LoKr parts)"
    if report.converted_ranks != report.ranks:
        ranks += f"  (as standard LoRA factors: {', '.join(map(str, report.converted_ranks))})"
    lines = [
        f"file:          {report.path}",
        f"format:        {report.format} ({report.naming} naming)",
        f"family:        {report.family}",
        f"components:    {components}",
        f"modules:       {report.num_modules}",
        f"rank:          {ranks}",
        f"alpha:         {', '.join(f'{a:g}' for a in report.alphas) or 'none in the file'}",
        f"scale:         {', '.join(f'{s:g}' for s in report.scales)}  (per module: alpha / rank, or 1)",
        f"dtypes:        {', '.join(report.dtypes)}",
        f"size:          {report.size_bytes / 2**20:.2f} MiB ({report.size_bytes} bytes)",
        f"sha256:        {report.sha256}",
        f"autov2:        {report.autov2}",
        f"a1111 hash:    {report.a1111_hash} (addnet sha256 {report.addnet_hash})",
        f"trigger words: {', '.join(report.trigger_words) or 'none'}",
    ]
    if report.top_tags:
        lines.append(f"top tags:      {', '.join(f'{tag} ({count})' for tag, count in report.top_tags)}")
    for title, metadata in (("training metadata", report.training_metadata), ("other metadata", report.other_metadata)):
        if metadata:
            lines.append(f"{title}:")
            lines += [f"  {key}: {_shorten(value)}" for key, value in sorted(metadata.items())]
    if report.unmapped_keys:
        lines.append(f"unmapped keys ({len(report.unmapped_keys)}, not loaded):")
        lines += [f"  {key}" for key in report.unmapped_keys]
    return "\n".join(lines)


def _shorten(value: str) -> str:
    value = " ".join(value.split())
    return value if len(value) <= METADATA_VALUE_WIDTH else value[: METADATA_VALUE_WIDTH - 3] + "..."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio.lora", description=__doc__.splitlines()[0])
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_inspect_command(subcommands)
    add_convert_command(subcommands)
    add_merge_command(subcommands)
    add_fuse_export_command(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except StudioError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
