"""Take the README's screenshot of the Generate tab: the demo model with two LoRAs switched on and blended.

    python tools/screenshot_ui.py --loras star:1.0 striped:0.8 --prompt "a sks shape, striped" --out assets/screenshot-generate.png

Starts the app in this process on a free port with a copy of the LoRAs, drives Debian's Chromium with
Playwright (as tests/test_ui_browser.py does), waits for the previews and the images, and saves the PNG.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio.adapters import Studio
from studio.errors import StudioError
from studio.ui import StudioApp, UIOptions, build_app, launch

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
TIMEOUT_MS = 300_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="demo")
    parser.add_argument("--lora-dir", type=Path, default=ROOT / "assets" / "loras")
    parser.add_argument("--loras", nargs="+", required=True, metavar="NAME:WEIGHT", help="the LoRAs to switch on")
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshot-generate.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1050)
    args = parser.parse_args(argv)
    wanted = [(name, float(weight)) for name, _, weight in (item.partition(":") for item in args.loras)]

    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)  # as a user starts it: the header shows `loras` and `outputs`, no temporary path
        lora_dir = Path("loras")
        lora_dir.mkdir()
        for name, _ in wanted:  # only the LoRAs shown, so the page holds exactly them
            for suffix in (".safetensors", ".preview.png"):
                source = args.lora_dir / f"{name}{suffix}"
                if source.is_file():
                    shutil.copyfile(source, lora_dir / source.name)
        try:
            app = StudioApp(
                Studio.from_base(args.base), UIOptions(lora_dir=lora_dir, out_dir=Path("outputs"))
            )
        except StudioError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        app.render_missing_previews()
        blocks = build_app(app)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        _, url, _ = launch(blocks, app, port=port, prevent_thread_lock=True)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(url)
                page.locator("#prompt textarea").fill(args.prompt)
                page.get_by_label("Seed (-1 = random)").fill(str(args.seed))
                images = page.locator("input[aria-label='number input for Images']")
                images.fill(str(args.images))
                images.press("Enter")
                for name, weight in wanted:
                    card = page.locator(".lora-card").filter(has_text=name)
                    card.locator(".lora-on input[type=checkbox]").check()
                    number = card.locator(".lora-weight input[type=number]")
                    number.fill(str(weight))
                    number.press("Enter")
                page.locator("#generate-button").click()
                page.wait_for_function(
                    f"() => document.querySelectorAll('#gallery img').length >= {min(args.images, 2)}",
                    timeout=TIMEOUT_MS,
                )
                page.wait_for_function(  # every picture on the page decoded, previews included
                    "() => [...document.images].every((image) => image.complete && image.naturalWidth > 0)",
                    timeout=TIMEOUT_MS,
                )
                page.mouse.move(0, 0)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            blocks.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
