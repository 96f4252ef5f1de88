"""Start the LoRA Studio web UI: `python app.py [--base demo|HUB_ID|PATH] [--host] [--port] [--share]`."""

import argparse
import sys

from studio.base import load_base
from studio.errors import StudioError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LoRA Studio web UI")
    parser.add_argument("--base", default="demo", help="base model: demo, tiny-sd, a hub id, a folder or a .safetensors file")
    parser.add_argument("--base-config", default=None, help="diffusers folder describing a single-file --base offline")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    args = parser.parse_args(argv)
    try:
        base = load_base(args.base, config=args.base_config)
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from studio.ui import build_app

    build_app(base).queue().launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
