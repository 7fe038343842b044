"""Draw the explore page's screenshots in docs/images from a real run, in chromium.

    python docs/scripts/explore_screenshots.py [RUN]   (default: trains lenet5-modern on mnist-mini first, ~15 s)

Writes explore.png (a drawn 7, its prediction, the maps, and the weighted sum behind one pixel of C3 with its input
windows), explore-pipeline.png (the whole computation, every cell one size), explore-pool.png (a max-pooling window
and its winner), explore-kernels.jpg (the playground: Sobel on the sample photo) and explore-phone.png (the page at
a phone's 390x844). Needs Playwright and a chromium executable.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from PIL import Image
from playwright.sync_api import Page, sync_playwright

from cnnlab.engine.inference import load_run
from cnnlab.engine.trainer import TrainConfig, fit
from cnnlab.explore.app import create_app
from cnnlab.explore.server import no_delay

IMAGES = Path(__file__).resolve().parents[1] / "images"


def draw_seven(page: Page) -> None:
    """A 7 on the pad, as a user draws it."""
    page.locator("#pad").scroll_into_view_if_needed()
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + 80, box["y"] + 70)
    page.mouse.down()
    for x, y in ((200, 70), (170, 140), (130, 220)):
        page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
    page.mouse.up()
    page.wait_for_function("document.getElementById('status').textContent.startsWith('round trip')")
    page.wait_for_timeout(500)


def hover(page: Page, layer: str, map_index: int, x: int, y: int, side: int) -> None:
    """Open `layer`'s map and put the pointer on its pixel (x, y) (the map is `side` pixels wide)."""
    page.locator(f'.maps .map[data-layer="{layer}"]').nth(map_index).click()
    big = page.locator("#big")
    big.scroll_into_view_if_needed()
    box = big.bounding_box()
    cell = box["width"] / side
    page.mouse.move(box["x"] + cell * (x + 0.5), box["y"] + cell * (y + 0.5))
    page.wait_for_function(f"(document.querySelector('#explain h3') || {{}}).textContent === "
                           f"'pixel (x={x}, y={y}) of map {map_index}'")  # fmt: skip
    page.wait_for_timeout(400)  # the input maps' canvases are drawn


def shoot(url: str, chromium: str) -> list[Path]:
    """Every screenshot, written into docs/images."""
    made = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector(".maps .map")
        draw_seven(page)
        hover(page, "features.4", 3, 4, 5, 10)
        made.append(IMAGES / "explore.png")
        page.screenshot(path=str(made[-1]), full_page=True)
        hover(page, "features.3", 2, 6, 4, 14)
        made.append(IMAGES / "explore-pool.png")
        page.locator("#detail").screenshot(path=str(made[-1]))
        page.locator('[data-tab="pipeline"]').click()
        page.wait_for_selector("#pipeline-rows .bar")
        page.wait_for_timeout(500)
        made.append(IMAGES / "explore-pipeline.png")
        page.screenshot(path=str(made[-1]), full_page=True)
        page.locator('[data-tab="kernels"]').click()
        page.select_option("#kernel-name", "sobel")
        page.wait_for_function("document.getElementById('k-caption').textContent.startsWith('output')")
        page.wait_for_timeout(800)
        png = IMAGES / "explore-kernels.png"
        page.locator("#kernels").screenshot(path=str(png))
        made.append(IMAGES / "explore-kernels.jpg")
        Image.open(png).convert("RGB").save(made[-1], quality=85)
        png.unlink()
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(url)
        phone.wait_for_selector(".maps .map")
        draw_seven(phone)
        phone.evaluate("window.scrollTo(0, 0)")
        made.append(IMAGES / "explore-phone.png")
        phone.screenshot(path=str(made[-1]))
        browser.close()
    return made


def main() -> None:
    """Serve the run as `cnnlab explore` does, then take the screenshots."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", nargs="?", default=None)
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs a chromium executable (apt install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or fit(TrainConfig(), runs_dir=tmp, run_name="digits").run_dir
        sock = no_delay(socket.socket())
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(load_run(run)), log_level="warning"))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        try:
            for path in shoot(f"http://127.0.0.1:{sock.getsockname()[1]}/", chromium):
                print(path)
        finally:
            server.should_exit = True


if __name__ == "__main__":
    main()
