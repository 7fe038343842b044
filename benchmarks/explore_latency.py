"""Round trip of the explore page for a drawn digit: prediction plus every activation map, over real HTTP.

    python benchmarks/explore_latency.py [RUN]      (default: trains lenet5-modern on mnist-mini first, ~15 s)

The server is the real app under uvicorn on 127.0.0.1, the client httpx; the request is what the page sends
while drawing: a 280x280 PNG of a white 7 on black, MNIST-style centring on. Reported: median and 95th
percentile of 200 requests after 10 warm-up ones. Target: under 100 ms on 2 CPU cores.
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
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(loaded), log_level="warning"))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api/predict"
        body = {"image": drawn_digit(), "center": True}
        times = []
        with httpx.Client() as client:
            for i in range(210):
                t0 = time.perf_counter()
                r = client.post(url, json=body)
                elapsed = time.perf_counter() - t0
                r.raise_for_status()
                if i >= 10:
                    times.append(elapsed * 1000)
        out = r.json()
        server.should_exit = True
    times.sort()
    maps = sum(len(layer["maps"]) for layer in out["layers"])
    body_text = "\n".join([
        "Command: `python benchmarks/explore_latency.py`. POST /api/predict over HTTP on 127.0.0.1 (uvicorn, httpx):",
        f"a drawn 280x280 PNG in, the top-5 classes and {maps} activation maps ({len(out['layers'])} layers, PNG",
        "data URLs) out, for lenet5-modern trained on mnist-mini. 200 requests after 10 warm-up ones.",
        "",
        f"Machine: {machine_line()}",
        "",
        "| median ms | 95th percentile ms | target |",
        "| --- | --- | --- |",
        f"| {statistics.median(times):.1f} | {times[int(0.95 * len(times))]:.1f} | < 100 |",
    ])  # fmt: skip
    print(body_text)
    write_section("Explore: round trip for a drawn digit", body_text)


if __name__ == "__main__":
    main()
