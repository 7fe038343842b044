"""`cnnlab explore`: every API endpoint and bad request through FastAPI's test client, then the page in a real
headless browser (Playwright driving Debian's chromium)."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from cnnlab.engine.inference import eval_data, load_run
from cnnlab.explore.app import create_app
from cnnlab.explore.service import MAX_UPLOAD_BYTES, center_digit
from cnnlab.inspect.features import layer_inputs_and_outputs


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    """An image as the page sends it."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def drawn_seven() -> str:
    """A 280x280 canvas with a white 7 on black, as the drawing pad produces."""
    img = Image.new("L", (280, 280), 0)
    from PIL import ImageDraw

    d = ImageDraw.Draw(img)
    d.line([(80, 70), (200, 70), (130, 220)], fill=255, width=22)
    return data_url(img.convert("RGB"))


@pytest.fixture(scope="module")
def client(digit_run: Path) -> TestClient:
    """The app for the trained digit run."""
    return TestClient(create_app(load_run(digit_run), allowed_hosts=("testserver",)), raise_server_exceptions=False)


def test_info_lists_run_layers_and_kernels(client: TestClient) -> None:
    info = client.get("/api/info").json()
    assert info["run"]["classes"] == list("0123456789") and info["run"]["digits"] is True
    assert info["run"]["layers"] == ["features.1", "features.3", "features.4", "features.6"]
    assert any(k["name"] == "sharpen" for k in info["kernels"])


def test_predict_a_drawn_digit_gives_probabilities_and_every_activation_map(client: TestClient) -> None:
    out = client.post("/api/predict", json={"image": drawn_seven(), "center": True}).json()
    probs = [t["prob"] for t in out["top"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    shapes = [layer["shape"] for layer in out["layers"]]
    assert shapes == [[6, 28, 28], [6, 14, 14], [16, 10, 10], [16, 5, 5]]
    assert [len(layer["maps"]) for layer in out["layers"]] == [6, 6, 16, 16]
    assert all(m.startswith("data:image/png;base64,") for layer in out["layers"] for m in layer["maps"])


def test_predict_a_test_image_matches_the_model(client: TestClient, digit_run: Path) -> None:
    run = load_run(digit_run)
    data, _ = eval_data(run, None, None, "test")
    with torch.no_grad():
        expected = run.model(run.prepare(data.images[5:6])).softmax(1)[0]
    out = client.post("/api/predict", json={"test_index": 5, "top_k": 10}).json()
    got = {t["label"]: t["prob"] for t in out["top"]}
    assert got == pytest.approx({str(i): float(p) for i, p in enumerate(expected)}, abs=1e-5)


def test_explain_is_the_layers_own_output(client: TestClient) -> None:
    for layer, channel, x, y in (("features.1", 2, 14, 10), ("features.4", 7, 3, 6)):
        ex = client.post("/api/explain", json={"test_index": 0, "layer": layer, "channel": channel, "x": x, "y": y})
        body = ex.json()
        assert ex.status_code == 200, body
        assert body["total"] == pytest.approx(body["output"], abs=1e-4), "products + bias = the activation"
        first = np.array(body["terms"][0]["products"])
        window, kernel = np.array(body["terms"][0]["window"]), np.array(body["terms"][0]["kernel"])
        assert np.allclose(first, window * kernel) and first.shape == (5, 5)
    assert len(body["terms"]) == 6, "a conv of the 6 maps below it: six windows"


def test_pooling_windows_are_explained_with_their_winner(client: TestClient) -> None:
    for x, y in ((3, 4), (0, 0), (6, 6)):
        body = client.post("/api/explain", json={"test_index": 0, "layer": "features.3", "channel": 2, "x": x,
                                                 "y": y}).json()  # fmt: skip
        window = np.array(body["window"])
        assert body["kind"] == "max" and body["total"] == pytest.approx(body["output"], abs=1e-5)
        assert window[tuple(body["winner"])] == pytest.approx(window.max()) == pytest.approx(body["total"])
        assert body["origin"] == [2 * y, 2 * x] and body["size"] == [2, 2] and len(body["inputs"]) == 1
    conv = client.post("/api/explain", json={"test_index": 0, "layer": "features.4", "channel": 1, "x": 0,
                                             "y": 0}).json()  # fmt: skip
    assert len(conv["inputs"]) == 6 and conv["input_shape"] == [6, 14, 14] and conv["origin"] == [0, 0]


def test_one_diverging_colour_scale_per_map_layer_or_all(client: TestClient) -> None:
    info = client.get("/api/info").json()
    assert len(info["colormap"]) == 11 and info["colormap"][5].lower() in ("#f7f7f7", "#f6f6f6", "#f7f6f6")
    per = {s: client.post("/api/predict", json={"test_index": 1, "scale": s}).json()["layers"]
           for s in ("map", "layer", "global")}  # fmt: skip
    for own, layer in zip(per["map"], per["layer"], strict=True):
        assert layer["bounds"] == [max(own["bounds"])] * len(own["bounds"])
    assert len({b for layer in per["global"] for b in layer["bounds"]}) == 1
    assert per["global"][0]["bounds"][0] == max(b for layer in per["map"] for b in layer["bounds"])
    assert len(set(per["map"][0]["bounds"])) > 1
    assert per["layer"][0]["post"]["kind"] == "ReLU" and per["layer"][1]["post"] is None  # conv, then pooling
    assert client.post("/api/predict", json={"test_index": 1, "scale": "loud"}).status_code == 422


def test_the_maps_after_an_activation_are_the_activations_output(digit_run: Path) -> None:
    from cnnlab.inspect.features import activations_after

    run = load_run(digit_run)
    x = run.prepare(eval_data(run, None, None, "test")[0].images[:1])
    _, outs, _ = layer_inputs_and_outputs(run.model, x, ["features.1", "features.4"])
    post = activations_after(run.model, x, ["features.1", "features.4", "features.3"])
    assert set(post) == {"features.1", "features.4"}, "a pooling layer has no activation after it"
    for name in ("features.1", "features.4"):
        act, after = post[name]
        assert isinstance(run.model.get_submodule(act), torch.nn.ReLU)
        assert torch.equal(after, torch.relu(outs[name]))
    import torchvision

    resnet = torchvision.models.resnet18(num_classes=3).eval()  # in-place ReLUs, a residual sum added in place
    paired = activations_after(resnet, torch.randn(1, 3, 32, 32), ["conv1", "layer1.0.conv1", "layer1.0.conv2"])
    assert {k: v[0] for k, v in paired.items()} == {"conv1": "relu", "layer1.0.conv1": "layer1.0.relu"}, (
        "the ReLU after a residual sum is not the conv's own activation"
    )


def test_the_confusion_matrix_and_its_cells_list_the_test_images(client: TestClient, digit_run: Path) -> None:
    run = load_run(digit_run)
    test, _ = eval_data(run, None, None, "test")
    with torch.no_grad():
        pred = torch.cat([run.model(run.prepare(test.images[i : i + 500])).argmax(1) for i in range(0, len(test), 500)])
    c = client.get("/api/confusion").json()
    cm = torch.tensor(c["confusion"])
    assert cm.sum() == c["n"] == len(test) and torch.equal(cm.sum(1), torch.bincount(test.labels, minlength=10))
    assert c["mistakes"], "a briefly trained LeNet-5 makes mistakes"
    for m in c["mistakes"]:
        assert m["true"] == str(int(test.labels[m["index"]])) and m["predicted"] == str(int(pred[m["index"]]))
        assert m["true"] != m["predicted"] and m["image"].startswith("data:image/png")
    confidences = [m["confidence"] for m in c["mistakes"]]
    assert confidences == sorted(confidences, reverse=True)
    t, p = divmod(int(torch.argmax(cm - torch.diag(torch.diag(cm)))), 10)  # the largest off-diagonal cell
    cell = client.get("/api/cell", params={"true": t, "predicted": p}).json()
    assert cell["count"] == cm[t, p] and len(cell["images"]) == min(24, int(cm[t, p]))
    assert all(int(test.labels[i["index"]]) == t and int(pred[i["index"]]) == p for i in cell["images"])
    assert client.get("/api/cell", params={"true": 10, "predicted": 0}).status_code == 400
    assert client.get("/api/cell", params={"true": -1, "predicted": 0}).status_code == 422


@pytest.mark.parametrize("kernel", ["sharpen", "sobel", "0,-1,0;-1,5,-1;0,-1,0"])
def test_a_playground_pixel_is_explained_as_cnnlab_filter_explains_it(client: TestClient, kernel: str) -> None:
    from cnnlab.data.images import sample_image_path
    from cnnlab.filtering import run_filter

    for gray, (x, y) in ((True, (100, 80)), (False, (0, 5))):
        body = client.post("/api/kernel-explain", json={"kernel": kernel, "gray": gray, "x": x, "y": y}).json()
        cli = run_filter(str(sample_image_path()), [kernel], gray=gray, explain=(x, y)).explain_data
        channels = body["channels"]
        assert len(channels) == (1 if gray else 3) and body["composite"] == (kernel == "sobel")
        parts = [p for ch in channels for p in ch["parts"]]
        assert [p["total"] for p in parts] == pytest.approx([d["sum"] for d in cli])
        assert [p["window"] for p in parts] == [d["window"] for d in cli]
        for ch in channels:
            assert 0 <= ch["shown"] <= 255
            if not body["composite"]:
                assert ch["value"] == ch["parts"][0]["total"]
    assert client.post("/api/kernel-explain", json={"kernel": "sharpen", "x": 5000, "y": 0}).status_code == 400


def test_what_a_channel_detects(client: TestClient, digit_run: Path) -> None:
    run = load_run(digit_run)
    test, _ = eval_data(run, None, None, "test")
    v = client.get("/api/channel", params={"layer": "features.4", "channel": 5}).json()
    peaks = [t["peak"] for t in v["top"]]
    assert len(peaks) == 9 and peaks == sorted(peaks, reverse=True) and v["scanned"] == min(2000, len(test))
    _, outs, _ = layer_inputs_and_outputs(run.model, run.prepare(test.images[v["top"][0]["index"]][None]),
                                          ["features.4"])  # fmt: skip
    assert float(outs["features.4"][5].max()) == pytest.approx(peaks[0], abs=1e-4)
    assert v["reached"] > v["start"] + 0.5, "the optimised input excites the channel more than the noise it began as"
    assert v["visualisation"].startswith("data:image/png")
    assert client.get("/api/channel", params={"layer": "features.4", "channel": 16}).status_code == 400
    assert client.get("/api/channel", params={"layer": "nope", "channel": 0}).status_code == 400


def test_the_whole_pipeline_from_the_input_to_every_class(client: TestClient, digit_run: Path) -> None:
    run = load_run(digit_run)
    test, _ = eval_data(run, None, None, "test")
    p = client.post("/api/pipeline", json={"test_index": 4}).json()
    rows = p["rows"]
    assert [r["name"] for r in rows] == ["input", *(f"features.{i}" for i in range(7)),
                                         *(f"classifier.{i}" for i in range(6))]  # fmt: skip
    lecture = {r["name"]: r["lecture"] for r in rows if r["lecture"]}
    assert lecture == {"features.1": "C1", "features.3": "S2", "features.4": "C3", "features.6": "S4",
                       "classifier.1": "C5", "classifier.3": "F6", "classifier.5": "output"}  # fmt: skip
    c1 = rows[2]
    assert c1["kernel"] == [5, 5] and c1["stride"] == [1, 1] and c1["padding"] == [0, 0] and c1["params"] == 156
    assert rows[1]["shape"] == [1, 32, 32] and rows[1]["kind"] == "ZeroPad2d", "the padding is a stage of its own"
    assert sum(r["params"] for r in rows) == 61_706 and not any(r["collapsible"] for r in rows)
    with torch.no_grad():
        logits = run.model(run.prepare(test.images[4:5]))[0]
    assert rows[-1]["values"] == pytest.approx(logits.tolist(), abs=1e-4)
    assert [b["prob"] for b in p["probabilities"]] == pytest.approx(logits.softmax(0).tolist(), abs=1e-5)
    one = client.post("/api/pipeline", json={"test_index": 4, "scale": "global"}).json()["rows"]
    assert len({r["bound"] for r in one}) == 1


def test_a_deep_network_folds_its_long_stages(digit_run: Path) -> None:
    import dataclasses

    from cnnlab.engine.inference import LoadedRun
    from cnnlab.explore.service import Explorer
    from cnnlab.inspect.features import stages
    from cnnlab.models.registry import create_model

    assert stages([(3, 8, 8), (4, 8, 8), (4, 4, 4), (10,), (5,)]) == [0, 0, 1, 2, 2]
    run = load_run(digit_run)
    record = dataclasses.replace(run.record, model=dataclasses.replace(run.record.model, name="resnet18"))
    model = create_model("resnet18", num_classes=10, in_channels=1, image_size=28)
    rows = Explorer(LoadedRun.of(run.path, record, model, run.weights, "cpu")).pipeline_view(None, 0, False)["rows"]
    assert len(rows) > 24 and not any(r["lecture"] for r in rows)
    for stage in {r["stage"] for r in rows}:
        members = [r for r in rows if r["stage"] == stage]
        assert not members[-1]["collapsible"], "a stage's last row always shows"
        assert [r["collapsible"] for r in members[:-1]] == [len(members) > 4] * (len(members) - 1)
    assert any(r["collapsible"] for r in rows)
    assert all(len(r["maps"]) <= 4 for r in rows if r["collapsible"] and "maps" in r), "folded rows stay small"


def test_kernel_weights_and_playground(client: TestClient) -> None:
    w = client.get("/api/kernel-weights", params={"layer": "features.1", "channel": 0}).json()
    assert np.array(w["weights"]).shape == (1, 5, 5) and "bias" in w
    out = client.post("/api/kernel", json={"kernel": "sobel", "gray": True, "mode": "normalize"}).json()
    assert out["shape"][0] == 1 and out["output"] != out["input"]
    pooled = client.post("/api/kernel", json={"kernel": "1,1;1,1", "pool": "max", "size": 4}).json()
    assert pooled["shape"][1] == out["shape"][1] // 4


def test_run_summary_and_pictures(client: TestClient) -> None:
    s = client.get("/api/summary").json()
    assert s["params"] == 61_706 and s["rows"][0]["name"]
    for what in ("curves", "confusion", "misclassified"):
        r = client.get(f"/api/picture/{what}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).width > 300
    assert client.get("/api/picture/../../etc/passwd").status_code == 404
    assert client.get("/api/picture/secrets").status_code == 404


def _bomb_url() -> str:
    buf = io.BytesIO()
    Image.new("1", (9500, 9500)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "message"),
    [
        ("post", "/api/predict", {"image": "data:image/png;base64,@@@"}, 400, "not valid base64"),
        ("post", "/api/predict", {"image": base64.b64encode(b"plain text").decode()}, 400, "not an image"),
        ("post", "/api/predict", {"image": _bomb_url()}, 400, "decompression bomb"),
        ("post", "/api/predict", {"test_index": 5000}, 400, "test split has 1000 images"),
        ("post", "/api/predict", {}, 400, "give an image or a test_index"),
        ("post", "/api/predict", {"test_index": -1}, 422, "test_index"),
        ("post", "/api/predict", "not json", 422, "malformed request"),
        ("post", "/api/explain", {"test_index": 0, "layer": "x", "channel": 0, "x": 0, "y": 0}, 400, "not one of"),
        ("post", "/api/explain", {"test_index": 0, "layer": "features.3", "channel": 6, "x": 0, "y": 0}, 400,
         "channel 6 outside 0..5"),
        ("post", "/api/explain", {"test_index": 0, "layer": "features.3", "channel": 0, "x": 14, "y": 0}, 400,
         "outside the 14x14 output"),
        ("post", "/api/explain", {"test_index": 0, "layer": "features.1", "channel": 0, "x": 99, "y": 0}, 400,
         "outside the 28x28 output"),
        ("post", "/api/kernel", {"kernel": "1,2;3"}, 400, "kernel"),
        ("post", "/api/kernel", {"kernel": "sharpen", "pool": "median"}, 422, "pool"),
        ("get", "/api/kernel-weights?layer=features.1&channel=99", None, 400, "channel 99 outside"),
        ("get", "/static/../../pyproject.toml", None, 404, None),
        ("get", "/api/nothing", None, 404, None),
    ],
)  # fmt: skip
def test_bad_requests_get_clear_4xx_json(
    client: TestClient, method: str, path: str, payload: object, status: int, message: str | None
) -> None:
    if isinstance(payload, str):
        r = client.post(path, content=payload, headers={"content-type": "application/json"})
    else:
        r = getattr(client, method)(path, **({"json": payload} if payload is not None else {}))
    assert r.status_code == status, r.text
    if message:
        assert message in r.json()["error"]
    assert client.get("/api/info").status_code == 200, "the server keeps serving"


def test_oversize_upload_is_413(client: TestClient) -> None:
    big = "A" * (MAX_UPLOAD_BYTES * 4 // 3 + 8)
    r = client.post("/api/predict", json={"image": big})
    assert r.status_code == 413 and "error" in r.json()


def test_without_a_run_only_the_playground_works() -> None:
    c = TestClient(create_app(None, allowed_hosts=("testserver",)), raise_server_exceptions=False)
    assert c.get("/api/info").json()["run"] is None
    r = c.post("/api/predict", json={"test_index": 0})
    assert r.status_code == 404 and "no run" in r.json()["error"]
    assert c.post("/api/kernel", json={"kernel": "box-blur"}).status_code == 200
    assert c.get("/").status_code == 200 and "cnnlab explore" in c.get("/").text


def test_center_digit_puts_the_mass_in_the_middle() -> None:
    canvas = np.zeros((280, 280), dtype=np.uint8)
    canvas[10:60, 200:230] = 255  # a small stroke in a corner
    out = center_digit(canvas, 28).astype(float)
    ys, _ = np.nonzero(out)
    cy, cx = (out.sum(1) * np.arange(28)).sum() / out.sum(), (out.sum(0) * np.arange(28)).sum() / out.sum()
    assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1 and ys.max() - ys.min() + 1 == 20


# --- a real browser -------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    (CHROMIUM is None or importlib.util.find_spec("playwright") is None)
    and not os.environ.get("CNNLAB_REQUIRE_BROWSER"),
    reason="needs Playwright and a chromium executable (CI installs Debian's chromium, CNNLAB_REQUIRE_BROWSER=1)",
)


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` served by uvicorn on a free local port, in a background thread: its address."""
    import uvicorn

    from cnnlab.explore.server import no_delay

    sock = no_delay(socket.socket())
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(digit_run: Path) -> Iterator[str]:
    """The app of the trained digit run, served."""
    with serving(create_app(load_run(digit_run))) as url:
        yield url


@pytest.mark.slow
@needs_browser
def test_the_page_in_a_real_browser(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server)
        expect(page.locator("#bars .bar")).to_have_count(5, timeout=20_000)  # test image 0 on load
        box = page.locator("#pad").bounding_box()
        page.mouse.move(box["x"] + 80, box["y"] + 70)
        page.mouse.down()
        for x, y in ((200, 70), (170, 140), (130, 220)):
            page.mouse.move(box["x"] + x, box["y"] + y, steps=6)
        page.mouse.up()
        expect(page.locator("#status")).to_contain_text("round trip", timeout=20_000)
        expect(page.locator(".maps img")).to_have_count(44)  # 6 + 6 + 16 + 16 activation maps
        assert page.locator("#seen").get_attribute("src").startswith("data:image/png")
        page.locator(".maps img").first.click()
        expect(page.locator("#kernel-view")).to_contain_text("kernel of this map")
        page.locator("#big").click(position={"x": 140, "y": 140})
        expect(page.locator("#explain")).to_contain_text("bias")
        page.screenshot(path=str(tmp_path / "network.png"), full_page=True)
        page.locator('[data-tab="kernels"]').click()
        expect(page.locator("#k-out")).to_have_attribute("src", re.compile(r"^data:image/png"), timeout=20_000)
        before = page.locator("#k-out").get_attribute("src")
        page.select_option("#kernel-name", "sobel")
        expect(page.locator("#k-out")).not_to_have_attribute("src", before, timeout=20_000)
        page.locator('[data-tab="run"]').click()
        expect(page.locator("#summary table")).to_be_visible(timeout=20_000)
        assert errors == [], errors
        browser.close()


def test_cli_refuses_a_busy_or_impossible_port(capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import main_error

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        code, err = main_error(["explore", "--port", str(busy.getsockname()[1])], capsys)
    finally:
        busy.close()
    assert code == 2 and "cannot listen there" in err[-1]
    code, err = main_error(["explore", "--port", "70000"], capsys)
    assert code == 2 and "must be at most 65535" in err[-1]
    code, err = main_error(["explore", "no/such/run"], capsys)
    assert code == 2 and "no such run directory" in err[-1]


# --- the page's bugs, each pinned in the browser at desktop and phone size ------------------------------------------

DESKTOP, PHONE = {"width": 1280, "height": 900}, {"width": 390, "height": 844}


@contextlib.contextmanager
def browser_page(url: str, viewport: dict[str, int]) -> Iterator[Any]:
    """A chromium page at `url`; a script error anywhere fails the test."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport=viewport)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        yield page
        assert errors == [], errors
        browser.close()


def draw(page: Any, points: tuple[tuple[int, int], ...]) -> None:
    """One stroke on the drawing pad through `points` (pad pixels), scrolled into view first."""
    page.locator("#pad").scroll_into_view_if_needed()
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y, steps=6)
    page.mouse.up()


def explained(page: Any) -> tuple[float, float]:
    """(the weighted sum shown, the layer's output it is compared with) of the explain panel."""
    text = page.locator("#explain .explain-total").inner_text()
    found = re.search(r"= (\S+) \(the layer's output there: (\S+)\)", text)
    assert found, text
    return float(found.group(1)), float(found.group(2))


def shown_as(v: float) -> str:
    """A number as the page's fmt() shows it: three decimals, trailing zeros dropped."""
    return f"{float(f'{v:.3f}'):g}"


def api_total(page: Any, body: dict[str, Any]) -> float:
    """The weighted sum the server computes for `body` (an /api/explain request), fetched from the page."""
    script = "async (b) => (await (await fetch('/api/explain', {method: 'POST', headers: {'Content-Type': " \
             "'application/json'}, body: JSON.stringify(b)})).json()).total"  # fmt: skip
    return page.evaluate(script, body)


@pytest.mark.slow
@needs_browser
def test_the_weighted_sum_follows_every_new_input(server: str) -> None:
    from playwright.sync_api import expect

    with browser_page(server, DESKTOP) as page:
        expect(page.locator(".maps img")).to_have_count(44, timeout=20_000)
        layer = page.locator(".maps .map").first.get_attribute("data-layer")  # conv1, map 0 (28x28 on a 280 canvas)
        where = {"layer": layer, "channel": 0, "center": False}
        # A pixel whose sum differs between test images 0 and 7 (on the background both are the bias alone).
        x, y = next((x, y) for y in range(6, 22, 2) for x in range(6, 22, 2)
                    if abs(api_total(page, {**where, "test_index": 0, "x": x, "y": y})
                           - api_total(page, {**where, "test_index": 7, "x": x, "y": y})) > 0.05)  # fmt: skip
        page.locator(".maps img").first.click()
        page.locator("#big").click(position={"x": 10 * x + 5, "y": 10 * y + 5})
        expect(page.locator("#explain .explain-total")).to_be_visible(timeout=20_000)
        total, output = explained(page)
        assert total == pytest.approx(output, abs=2e-3)
        assert total == pytest.approx(api_total(page, {**where, "test_index": 0, "x": x, "y": y}), abs=2e-3)
        page.fill("#test-index", "7")
        page.click("#load-test")
        expected = api_total(page, {**where, "test_index": 7, "x": x, "y": y})
        expect(page.locator("#explain .explain-total")).to_contain_text(f"= {shown_as(expected)} ", timeout=20_000)
        again, output_again = explained(page)
        assert again == pytest.approx(output_again, abs=2e-3) and again == pytest.approx(expected, abs=2e-3)
        shown = page.locator("#explain").inner_text()
        draw(page, ((20, 10 * y + 5), (140, 10 * y + 5), (260, 10 * y + 5)))  # a stroke through the explained pixel
        expect(page.locator("#explain")).not_to_have_text(shown, timeout=20_000)
        pad = page.evaluate("document.getElementById('pad').toDataURL('image/png')")
        expected = api_total(page, {**where, "image": pad, "center": True, "x": x, "y": y})  # a drawing is centred
        expect(page.locator("#explain .explain-total")).to_contain_text(f"= {shown_as(expected)} ", timeout=20_000)
        drawn, output_drawn = explained(page)
        assert drawn == pytest.approx(output_drawn, abs=2e-3)


@pytest.mark.slow
@needs_browser
def test_a_test_image_is_shown_on_the_pad_with_its_true_label(server: str, digit_run: Path) -> None:
    from playwright.sync_api import expect

    labels = eval_data(load_run(digit_run), None, None, "test")[0].labels
    with browser_page(server, DESKTOP) as page:
        # The first load predicts test image 0: the pad shows it, and the line says so with its label.
        expect(page.locator("#source-line")).to_have_text(
            f"test image 0, true label: {int(labels[0])}. Draw on the pad to replace it.", timeout=20_000)  # fmt: skip
        lit = "(() => { const d = document.getElementById('pad').getContext('2d').getImageData(0, 0, 280, 280).data;" \
              " let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] > 128; return n; })()"  # fmt: skip
        # The pad is painted when the image decodes, a moment after the line: wait for it.
        page.wait_for_function(f"{lit} > 500", timeout=20_000)
        page.fill("#test-index", "3")
        page.click("#load-test")
        expect(page.locator("#source-line")).to_contain_text(f"test image 3, true label: {int(labels[3])}.")
        expect(page.locator("#top1")).to_contain_text("prediction: ")
        before = page.evaluate("document.getElementById('pad').toDataURL()")
        draw(page, ((100, 40), (100, 240)))
        expect(page.locator("#source-line")).to_have_text("your drawing")
        after = page.evaluate(lit)
        assert page.evaluate("document.getElementById('pad').toDataURL()") != before
        assert after < 280 * 40, "drawing starts on a clean pad, not on top of the test image"


@pytest.mark.slow
@needs_browser
def test_playground_status_lines_clear_when_they_no_longer_hold(server: str) -> None:
    from playwright.sync_api import expect

    with browser_page(server, DESKTOP) as page:
        page.locator('[data-tab="kernels"]').click()
        expect(page.locator("#k-out")).to_have_attribute("src", re.compile(r"^data:image/png"), timeout=20_000)
        page.select_option("#kernel-name", "sobel")
        expect(page.locator("#k-status")).to_contain_text("sobel combines 2 matrices")
        page.select_option("#kernel-name", "sharpen")
        expect(page.locator("#k-status")).to_have_text("", timeout=20_000)
        page.fill("#k-matrix", "1 2 3\n4 5")
        expect(page.locator("#k-status")).to_contain_text("rows have different lengths", timeout=20_000)
        page.fill("#k-matrix", "1 2 3\n4 5 6")
        expect(page.locator("#k-status")).to_have_text("", timeout=20_000)


@pytest.mark.slow
@needs_browser
def test_the_page_on_a_phone(server: str) -> None:
    from playwright.sync_api import expect

    with browser_page(server, PHONE) as page:
        expect(page.locator(".maps img")).to_have_count(44, timeout=20_000)
        fits = "document.documentElement.scrollWidth <= window.innerWidth"
        assert page.evaluate(fits), "the page is wider than the phone"
        tabs = [page.locator(".tab").nth(i).bounding_box() for i in range(page.locator(".tab").count())]
        assert len({round(t["y"]) for t in tabs}) == 1, "the tabs wrap onto several rows"
        assert all(t["x"] + t["width"] <= PHONE["width"] for t in tabs), "a tab is cut off at the phone's edge"
        draw(page, ((80, 70), (200, 70), (130, 220)))
        expect(page.locator("#top1")).to_contain_text("prediction: ", timeout=20_000)
        box = page.locator("#top1").bounding_box()
        assert box["y"] + box["height"] <= PHONE["height"], "the prediction is below the fold while drawing"
        page.locator('[data-tab="run"]').click()
        expect(page.locator("#summary table")).to_be_visible(timeout=20_000)
        assert page.evaluate(fits), "the layer table overflows the page"
        card = page.locator("#summary").bounding_box()
        assert card["x"] + card["width"] <= PHONE["width"]
        expect(page.locator("#mistake-list .thumb").first).to_be_visible(timeout=60_000)
        size = page.evaluate("parseFloat(getComputedStyle(document.querySelector('#mistake-list .thumb span'))"
                             ".fontSize)")  # fmt: skip
        assert size >= 11, f"mistake captions are {size} px high"
        page.wait_for_function("document.getElementById('curves').naturalWidth > 0", timeout=60_000)
        shown = page.locator("#curves").bounding_box()["width"]
        natural = page.evaluate("document.getElementById('curves').naturalWidth")
        assert shown >= 0.5 * natural, f"the curves' labels shrunk to {shown / natural:.0%} of their size"
        assert page.evaluate(fits)


@pytest.mark.slow
@needs_browser
def test_without_a_run_the_page_opens_on_the_playground() -> None:
    from playwright.sync_api import expect

    with serving(create_app(None)) as url, browser_page(url, DESKTOP) as page:
        expect(page.locator("#kernels")).to_have_class(re.compile(r"\bactive\b"), timeout=20_000)
        expect(page.locator("#k-out")).to_have_attribute("src", re.compile(r"^data:image/png"), timeout=20_000)
        assert page.locator("#k-drawn").is_hidden() and page.locator("#tab-network").is_hidden()
        assert page.locator("#network").is_hidden()


# --- the weighted sum you can see, honest colour, keyboard and screen reader ----------------------------------------

AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"


def serious_violations(page: Any) -> list[str]:
    """axe-core's serious and critical accessibility violations of the page as it is now: 'rule: element'."""
    page.add_script_tag(path=str(AXE))
    script = ("async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
              ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
              ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).slice(0, 3).join(', '))")  # fmt: skip
    return page.evaluate(script)


@pytest.mark.slow
@needs_browser
def test_hover_and_arrow_keys_move_the_explained_pixel(server: str) -> None:
    from playwright.sync_api import expect

    with browser_page(server, DESKTOP) as page:
        expect(page.locator(".maps .map")).to_have_count(44, timeout=20_000)
        page.locator(".maps .map").first.click()  # conv1 map 0: a 28x28 map on a 280 px canvas
        expect(page.locator("#big")).to_be_focused()  # the keyboard lands on the enlarged map
        expect(page.locator("#post-figure")).to_be_visible()
        expect(page.locator(".layer h3").first).to_contain_text("C1 · features.1")
        expect(page.locator("#post-caption")).to_have_text("after features.2 (ReLU)")
        expect(page.locator("#detail-colorbar .colorbar")).to_be_visible()
        big = page.locator("#big")
        big.scroll_into_view_if_needed()
        box = big.bounding_box()
        page.mouse.move(box["x"] + 105, box["y"] + 105)  # hover, no click: pixel (10, 10)
        expect(page.locator("#explain h3")).to_have_text("pixel (x=10, y=10) of map 0", timeout=20_000)
        expect(page.locator("#explain canvas.input-map")).to_have_count(1)  # conv1 reads the one input channel
        total, output = explained(page)
        assert total == pytest.approx(output, abs=2e-3)
        big.focus()
        page.keyboard.press("ArrowRight")
        expect(page.locator("#explain h3")).to_have_text("pixel (x=11, y=10) of map 0", timeout=20_000)
        page.keyboard.press("ArrowDown")
        expect(page.locator("#explain h3")).to_have_text("pixel (x=11, y=11) of map 0", timeout=20_000)
        assert page.locator("#explain td[style*='background']").count() >= 3 * 25, "coloured window, kernel, products"
        # A pooling map: its window, and which value won.
        page.locator('.maps .map[data-layer="features.3"]').first.click()
        expect(page.locator("#post-figure")).to_be_hidden()
        big.scroll_into_view_if_needed()
        box = big.bounding_box()
        page.mouse.move(box["x"] + 50, box["y"] + 50)
        expect(page.locator("#explain .explain-total")).to_contain_text("the largest value of the window",
                                                                        timeout=20_000)  # fmt: skip
        expect(page.locator("#explain td.winner")).to_have_count(1)
        pooled, pooled_output = explained(page)
        assert pooled == pytest.approx(pooled_output, abs=2e-3)
        # One colour bar for every layer: each layer's heading then names the same bound.
        page.select_option("#scale", "global")
        expect(page.locator(".layer h3 .hint:last-child").first).to_contain_text("colour ±", timeout=20_000)
        page.wait_for_function("new Set([...document.querySelectorAll('.layer h3 .hint:last-child')]"
                               ".map(e => e.textContent)).size === 1", timeout=20_000)  # fmt: skip
        page.select_option("#scale", "map")
        expect(page.locator(".layer h3 .hint:last-child").first).to_have_text("colour: each map its own",
                                                                              timeout=20_000)  # fmt: skip


@pytest.mark.slow
@needs_browser
@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_no_serious_accessibility_violations(server: str, viewport: dict[str, int]) -> None:
    from playwright.sync_api import expect

    with browser_page(server, viewport) as page:
        expect(page.locator(".maps .map")).to_have_count(44, timeout=20_000)
        page.locator(".maps .map").first.click()
        expect(page.locator("#kernel-view")).to_contain_text("kernel of this map", timeout=20_000)
        assert serious_violations(page) == []
        tab = page.locator("#tab-network")
        tab.focus()
        page.keyboard.press("ArrowRight")  # the tab list's keys
        expect(page.locator("#tab-pipeline")).to_have_attribute("aria-selected", "true")
        expect(page.locator("#pipeline-rows .bar")).to_have_count(10, timeout=20_000)
        assert serious_violations(page) == []
        page.keyboard.press("ArrowRight")
        expect(page.locator("#tab-kernels")).to_have_attribute("aria-selected", "true")
        expect(page.locator("#k-out")).to_have_attribute("src", re.compile(r"^data:image/png"), timeout=20_000)
        assert serious_violations(page) == []
        page.keyboard.press("ArrowRight")
        expect(page.locator("#summary table")).to_be_visible(timeout=20_000)
        assert serious_violations(page) == []


@pytest.mark.slow
@needs_browser
def test_the_output_size_widget_is_torchs_formula(server: str) -> None:
    from playwright.sync_api import expect

    from cnnlab.arithmetic import conv_output_size

    with browser_page(server, DESKTOP) as page:
        page.locator('[data-tab="kernels"]').click()
        for n, k, p, s, d in ((7, 3, 1, 2, 1), (28, 5, 0, 1, 1), (32, 3, 1, 1, 2), (5, 4, 0, 3, 1), (13, 3, 2, 3, 2),
                              (4, 5, 0, 1, 1)):  # fmt: skip
            for name, value in zip("nkpsd", (n, k, p, s, d), strict=True):
                page.fill(f"#sz-{name}", str(value))
            text = page.locator("#sz-formula").inner_text()
            if n + 2 * p >= d * (k - 1) + 1:
                assert text.endswith(f"= {conv_output_size(n, k, s, p, d)}"), text
            else:
                assert "no output" in text, text
        for name, value in zip("nkpsd", (7, 3, 1, 2, 1), strict=True):
            page.fill(f"#sz-{name}", str(value))
        expect(page.locator("#sz-where")).to_contain_text("(x=0, y=0) of 4×4: the window covers input rows -1..1, "
                                                          "columns -1..1")  # fmt: skip
        page.click("#sz-step")
        expect(page.locator("#sz-where")).to_contain_text("(x=1, y=0) of 4×4: the window covers input rows -1..1, "
                                                          "columns 1..3")  # fmt: skip
        page.click("#sz-play")
        expect(page.locator("#sz-where")).to_contain_text("(x=3, y=0)", timeout=10_000)
        page.click("#sz-play")
        expect(page.locator("#sz-play")).to_have_attribute("aria-pressed", "false")


@pytest.mark.slow
@needs_browser
def test_a_mistake_or_a_confusion_cell_opens_in_the_network_view(server: str) -> None:
    from playwright.sync_api import expect

    with browser_page(server, DESKTOP) as page:
        expect(page.locator(".maps .map")).to_have_count(44, timeout=20_000)
        page.locator('[data-tab="run"]').click()
        first = page.locator("#mistake-list .thumb").first
        expect(first).to_be_visible(timeout=60_000)
        index = first.get_attribute("data-index")
        true, predicted = first.locator("span").first.inner_text().split(" ")[0:3:2]
        first.click()
        expect(page.locator("#tab-network")).to_have_attribute("aria-selected", "true")
        expect(page.locator("#source-line")).to_contain_text(f"test image {index}, true label: {true}.",
                                                             timeout=20_000)  # fmt: skip
        expect(page.locator("#top1")).to_contain_text(f"prediction: {predicted} (")
        page.locator('[data-tab="run"]').click()
        page.locator('#confusion button[data-t="3"][data-p="3"]').click()
        expect(page.locator("#cell-title")).to_contain_text("true 3, predicted 3:", timeout=20_000)
        page.locator("#cell-images .thumb").first.click()
        expect(page.locator("#top1")).to_contain_text("prediction: 3 (", timeout=20_000)


@pytest.mark.slow
@needs_browser
def test_the_playground_explains_a_clicked_pixel_and_takes_a_grid(server: str) -> None:
    from playwright.sync_api import expect

    with browser_page(server, DESKTOP) as page:
        page.locator('[data-tab="kernels"]').click()
        expect(page.locator("#k-out")).to_have_attribute("src", re.compile(r"^data:image/png"), timeout=20_000)
        page.locator("#k-out").click(position={"x": 60, "y": 60})
        expect(page.locator("#k-explain .explain-total")).to_have_count(1, timeout=20_000)  # grayscale: one channel
        expect(page.locator("#k-explain")).to_contain_text("sum of the products")
        page.select_option("#kernel-name", "sobel")  # the explained pixel follows the new kernel
        expect(page.locator("#k-explain")).to_contain_text("magnitude = √", timeout=20_000)
        page.select_option("#kernel-name", "sharpen")
        expect(page.locator("#k-explain")).not_to_contain_text("magnitude", timeout=20_000)
        page.click("#k-grid3")
        expect(page.locator("#k-grid input")).to_have_count(9)
        before = page.locator("#k-out").get_attribute("src")
        page.locator('#k-grid input[data-r="0"][data-c="0"]').fill("-1")
        expect(page.locator("#k-matrix")).to_have_value(re.compile(r"^-1 "))
        expect(page.locator("#k-out")).not_to_have_attribute("src", before, timeout=20_000)
        assert serious_violations(page) == []


@pytest.mark.slow
@needs_browser
def test_what_a_channel_detects_in_the_page(server: str) -> None:
    from playwright.sync_api import expect

    with browser_page(server, DESKTOP) as page:
        expect(page.locator(".maps .map")).to_have_count(44, timeout=20_000)
        page.locator('.maps .map[data-layer="features.4"]').nth(5).click()
        page.click("#detects")
        expect(page.locator("#channel-view .thumb")).to_have_count(9, timeout=60_000)
        expect(page.locator("#channel-view .vis img")).to_be_visible()
        assert serious_violations(page) == []
        index = page.locator("#channel-view .thumb").first.get_attribute("data-index")
        page.locator("#channel-view .thumb").first.click()
        expect(page.locator("#source-line")).to_contain_text(f"test image {index}, true label:", timeout=20_000)


@pytest.mark.slow
@needs_browser
def test_the_pipeline_tab_draws_every_cell_at_one_size(server: str) -> None:
    from playwright.sync_api import expect

    with browser_page(server, DESKTOP) as page:
        expect(page.locator(".maps .map")).to_have_count(44, timeout=20_000)
        page.locator('[data-tab="pipeline"]').click()
        expect(page.locator("#pipeline-rows .stage-row")).to_have_count(15, timeout=20_000)  # 14 stages + softmax
        c1 = page.locator('#pipeline-rows .stage-row[data-name="features.1"] img').first.bounding_box()
        s4 = page.locator('#pipeline-rows .stage-row[data-name="features.6"] img').first.bounding_box()
        assert c1["width"] / s4["width"] == pytest.approx(28 / 5, rel=0.05), "one cell size in every row"
        expect(page.locator("#pipeline-rows")).to_contain_text("C3")
        expect(page.locator("#pipeline-rows .bar")).to_have_count(10)
        assert serious_violations(page) == []
        page.locator('[data-tab="network"]').click()
        page.fill("#test-index", "9")
        page.click("#load-test")
        expect(page.locator("#source-line")).to_contain_text("test image 9", timeout=20_000)
        page.locator('[data-tab="pipeline"]').click()  # the pipeline follows the current input
        expect(page.locator("#pipeline-rows .stage-row")).to_have_count(15, timeout=20_000)
