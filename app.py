"""Start the LoRA Studio web UI: `python app.py [--base demo|HUB_ID|PATH] [--lora-dir DIR] [--host] [--port]`."""

import argparse
import sys
from pathlib import Path

from studio.errors import StudioError

DEFAULT_PORT = 7860


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA Studio web UI")
    parser.add_argument(
        "--base", default="demo", help="base model: demo, tiny-sd, a hub id, a folder or a .safetensors file"
    )
    parser.add_argument("--base-config", default=None, help="diffusers folder describing a single-file --base offline")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="accept a .ckpt/.pt/.pth/.bin --base (torch's weights-only loader)"
    )
    parser.add_argument(
        "--lora-dir", type=Path, default=Path("loras"),
        help="folder of LoRA files (default: ./loras; on the demo model a new folder starts with the demo LoRAs)",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=Path("outputs"), help="images, trainings, previews (default: ./outputs)"
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=2048, help="largest LoRA upload accepted (default: 2048)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="ask for this user name and password")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        auth = _auth(args.auth)
        from studio.adapters import Studio
        from studio.library import start_with_demo_loras
        from studio.ui import StudioApp, UIOptions, build_app, launch

        if args.base == "demo" and not args.lora_dir.exists():
            copied = start_with_demo_loras(args.lora_dir)
            print(f"created {args.lora_dir} with the {len(copied)} demo LoRAs: {', '.join(p.stem for p in copied)}")

        options = UIOptions(
            lora_dir=args.lora_dir, out_dir=args.out_dir, max_upload_bytes=int(args.max_upload_mb * 1024**2)
        )
        app = StudioApp(Studio.from_base(args.base, config=args.base_config, allow_pickle=args.allow_pickle), options)
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    launch(build_app(app), app, host=args.host, port=args.port, share=args.share, auth=auth)
    return 0


def _auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, colon, password = value.partition(":")
    if not colon or not user or not password:
        raise StudioError("--auth must be USER:PASSWORD")
    return user, password


if __name__ == "__main__":
    sys.exit(main())
