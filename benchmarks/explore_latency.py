"""Round trips of the explore page over real HTTP: a drawn digit's prediction plus every map (end of stroke to updated
prediction), and one pixel's weighted sum (what the page asks for as the pointer moves over a map).

    python benchmarks/explore_latency.py [RUN]      (default: trains lenet5-modern on mnist-mini first, ~15 s)

The server is the real app under uvicorn on 127.0.0.1, the client httpx; the requests are what the page sends:
a 280x280 PNG of a white 7 on black, MNIST-style centring on; for the sum, a pixel of C3 (six input maps, 150
products) with the same drawing. Reported: median and 95th percentile of 200 requests after 10 warm-up ones.
Then, where Playwright and a chromium are installed, the same two in a real browser, as a user meets them: from the
mouse button's release at the end of a stroke to the page showing the new prediction, and from the pointer moving
onto a pixel of C3's enlarged map to the page showing that pixel's weighted sum (60 pixels, the first 5 not
counted). Targets on 2 CPU cores: prediction under 100 ms, weighted sum under 50 ms.
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import statistics
import tempfile
import threading
import time

import httpx
import uvicorn
from _common import machine_line, write_section
from PIL import Image, ImageDraw

from cnnlab.engine.inference import load_run
from cnnlab.engine.trainer import TrainConfig, fit
from cnnlab.explore.app import create_app
from cnnlab.explore.server import no_delay


def drawn_digit() -> str:
    """The drawing pad's PNG data URL of a 7."""
    img = Image.new("RGB", (280, 280), (0, 0, 0))
    ImageDraw.Draw(img).line([(80, 70), (200, 70), (130, 220)], fill=(255, 255, 255), width=20)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    """Serve, time the requests, write the RESULTS.md section."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", nargs="?", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or fit(TrainConfig(), runs_dir=tmp, run_name="digits").run_dir
        loaded = load_run(run)
        sock = no_delay(socket.socket())  # as `cnnlab explore` serves
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(loaded), log_level="warning"))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
        body = {"image": drawn_digit(), "center": True}
        with httpx.Client() as client:
            times, out = timed(client, f"{base}/predict", body)
            c3 = [name for name in out_layers(out) if name][2]  # conv, pool, conv: C3 of LeNet-5
            pixel = {**body, "layer": c3, "channel": 3, "x": 4, "y": 5}
            sums, explained = timed(client, f"{base}/explain", pixel)
        in_browser = browser_times(f"http://127.0.0.1:{sock.getsockname()[1]}/", c3)
        server.should_exit = True
    maps = sum(len(layer["maps"]) for layer in out["layers"])
    body_text = "\n".join([
        "Command: `python benchmarks/explore_latency.py`. POST /api/predict over HTTP on 127.0.0.1 (uvicorn, httpx):",
        f"a drawn 280x280 PNG in, the top-5 classes and {maps} activation maps ({len(out['layers'])} layers, PNG",
        "data URLs) out, for lenet5-modern trained on mnist-mini. 200 requests after 10 warm-up ones.",
        "",
        f"Machine: {machine_line()}",
        "",
        "| request | median ms | 95th percentile ms | target |",
        "| --- | --- | --- | --- |",
        f"| predict: top-5 and {maps} maps | {statistics.median(times):.1f} | {times[int(0.95 * len(times))]:.1f} "
        "| < 100 |",
        f"| explain: one pixel of {c3} ({len(explained['terms'])} input maps) | {statistics.median(sums):.1f} | "
        f"{sums[int(0.95 * len(sums))]:.1f} | < 50 |",
    ])  # fmt: skip
    if in_browser:
        stroke, hover = in_browser
        body_text += "\n".join([
            "", "", "In chromium (Playwright, 1280x900), as the user sees it:", "",
            "| from | to | median ms | 95th percentile ms | target |", "| --- | --- | --- | --- | --- |",
            f"| the end of a stroke | the new prediction shown | {statistics.median(stroke):.1f} | "
            f"{stroke[int(0.95 * len(stroke))]:.1f} | < 100 |",
            f"| the pointer on a pixel of {c3} | its weighted sum shown | {statistics.median(hover):.1f} | "
            f"{hover[int(0.95 * len(hover))]:.1f} | < 50 |",
        ])  # fmt: skip
    print(body_text)
    write_section("Explore: round trip for a drawn digit", body_text)


def browser_times(url: str, layer: str) -> tuple[list[float], list[float]] | None:
    """(end of stroke -> prediction shown, pointer on a pixel -> its sum shown), ms, sorted; None without a browser."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if chromium is None:
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector(".maps .map")
        pad = page.locator("#pad").bounding_box()
        stroke = []
        for i in range(25):
            page.mouse.move(pad["x"] + 60 + 4 * i, pad["y"] + 60)
            page.mouse.down()
            page.mouse.move(pad["x"] + 140, pad["y"] + 200, steps=4)
            page.wait_for_timeout(300)  # the stroke's own predictions are done: time the release alone
            page.evaluate("document.getElementById('status').textContent = ''")
            t0 = time.perf_counter()
            page.mouse.up()
            page.wait_for_function("document.getElementById('status').textContent.startsWith('round trip')",
                                   polling="raf")  # fmt: skip
            stroke.append((time.perf_counter() - t0) * 1000)
        page.locator(f'.maps .map[data-layer="{layer}"]').nth(3).click()
        big = page.locator("#big")
        big.scroll_into_view_if_needed()
        box = big.bounding_box()
        hover = []
        for i in range(60):
            x, y = i % 10, (i // 10) % 10
            t0 = time.perf_counter()
            page.mouse.move(box["x"] + 28 * x + 14, box["y"] + 28 * y + 14)
            page.wait_for_function(f"(document.querySelector('#explain h3') || {{}}).textContent === "
                                   f"'pixel (x={x}, y={y}) of map 3'", polling="raf")  # fmt: skip
            hover.append((time.perf_counter() - t0) * 1000)
        browser.close()
    return sorted(stroke[5:]), sorted(hover[5:])


def timed(client: httpx.Client, url: str, body: dict) -> tuple[list[float], dict]:
    """Milliseconds of 200 POSTs after 10 warm-up ones, sorted, and the last answer."""
    times = []
    for i in range(210):
        t0 = time.perf_counter()
        r = client.post(url, json=body)
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        if i >= 10:
            times.append(elapsed * 1000)
    return sorted(times), r.json()


def out_layers(out: dict) -> list[str]:
    """The shown layers' names, in order."""
    return [layer["name"] for layer in out["layers"]]


if __name__ == "__main__":
    main()
