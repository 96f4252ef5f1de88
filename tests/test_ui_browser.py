"""The page in a real browser (Playwright driving Debian's Chromium): switch a LoRA on, move its slider,
generate, switch "LoRA off", generate again; the two images differ and the first used the slider's weight.
Screenshots are saved under the test's temporary folder (and in $UI_SCREENSHOT_DIR when set)."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from lora_factories import diffusers_lora, kohya_lora
from PIL import Image
from ports import free_port

from studio.adapters import Studio
from studio.paths import DEMO_MODEL_DIR
from studio.ui import StudioApp, UIOptions, build_app, launch

BASE = "demo" if (DEMO_MODEL_DIR / "model_index.json").is_file() else "tiny-sd"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
TIMEOUT_MS = 120_000
STEPS = 4


def install_chromium() -> str | None:
    """Install Debian's chromium when it is missing; the reason it cannot be had, or None."""
    if CHROMIUM.is_file():
        return None
    if shutil.which("apt-get") is None:
        return "Chromium is not installed at /usr/bin/chromium and there is no apt-get to install it"
    if os.geteuid() != 0:
        return "Chromium is not installed at /usr/bin/chromium and installing it needs root (apt-get install chromium)"
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0:
            return f"could not install Chromium ({' '.join(command)}): {result.stderr.strip().splitlines()[-1:]}"
    return None if CHROMIUM.is_file() else "apt-get installed chromium but /usr/bin/chromium is missing"


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )
    reason = install_chromium()
    if reason:
        pytest.skip(reason)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    studio = Studio.from_base(BASE)
    lora_dir = root / "loras"
    lora_dir.mkdir()
    kohya_lora(
        studio.pipeline,
        lora_dir / "stripes.safetensors",
        studio.family,
        seed=0,
        metadata={"studio.trigger_words": '["striped"]'},
    )
    diffusers_lora(studio.pipeline, lora_dir / "outline.safetensors", studio.family, seed=1)
    app = StudioApp(studio, UIOptions(lora_dir=lora_dir, out_dir=root / "out", render_previews=False))
    blocks = build_app(app)
    _, url, _ = launch(blocks, app, port=free_port(), prevent_thread_lock=True)
    yield app, url, root
    blocks.close()


def screenshot(page, root: Path, name: str) -> None:
    for folder in filter(None, [root, os.environ.get("UI_SCREENSHOT_DIR")]):
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def wait_for_new_image(page, previous: str | None) -> str:
    page.wait_for_function(
        "(old) => { const i = document.querySelector('#gallery img'); return i && i.getAttribute('src') !== old; }",
        arg=previous, timeout=TIMEOUT_MS,
    )  # fmt: skip
    return page.locator("#gallery img").first.get_attribute("src")


def test_toggle_slider_generate_then_lora_off_in_a_real_browser(browser, served):
    app, url, root = served
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    steps = page.locator("input[aria-label='number input for Steps']")
    steps.fill(str(STEPS))
    steps.press("Enter")
    card = page.locator(".lora-card").filter(has_text="stripes")
    card.locator(".lora-on input[type=checkbox]").check()
    weight = card.locator(".lora-weight input[type=number]")
    weight.fill("1.5")
    weight.press("Enter")
    page.locator("#generate-button").click()  # the seed stays -1: each render gets a fresh random seed
    with_lora = wait_for_new_image(page, None)
    summary = page.locator("#summary").inner_text()
    assert "stripes 1.5" in summary and f"{STEPS} steps" in summary, summary
    screenshot(page, root, "browser-lora-on.png")

    seed = int(summary.split("seed ")[1].split(" ")[0])
    page.locator("#lora-off input[type=checkbox]").check()
    page.get_by_label("Seed (-1 = random)").fill(str(seed))
    page.locator("#generate-button").click()
    base = wait_for_new_image(page, with_lora)
    summary = page.locator("#summary").inner_text()
    assert "LoRA off (base model)" in summary and f"seed {seed}" in summary, summary
    screenshot(page, root, "browser-lora-off.png")

    first, second = (np.asarray(Image.open(_saved(app, page, src)).convert("RGB")) for src in (with_lora, base))
    assert not np.array_equal(first, second)
    blend = app.studio.make_blend({"stripes": 1.5})
    expected = np.asarray(app.studio.generate("a red circle", seed=seed, steps=STEPS, guidance=7.5, blend=blend)[0])
    assert np.array_equal(first, expected)
    page.close()


def _saved(app, page, src: str) -> Path:
    """The image file behind a gallery `src`, fetched through the page's own server."""
    path = app.out_dir / "fetched" / src.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(page.request.get(src).body())
    return path
