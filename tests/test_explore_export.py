"""`cnnlab explore RUN --export DIR`: the static site, its files and safety, and the page served by a plain static
file server in Debian's chromium (the network running in ONNX Runtime Web), compared number for number with the live
server's answers."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from cnnlab.engine.inference import load_run
from cnnlab.explore.app import create_app
from cnnlab.explore.export import MARKER, ORT, ORT_FILES, export_site
from cnnlab.explore.service import Explorer, center_digit, decode_data_url
from tests.test_explore import (
    DESKTOP,
    PHONE,
    browser_page,
    draw,
    explained,
    needs_browser,
    serious_violations,
)

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.xdist_group("explore-export")  # one worker exports the site once for all these tests


@pytest.fixture(scope="module")
def site(digit_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digit run exported once, inside a parent folder (the site is served from a sub-folder of the host)."""
    root = tmp_path_factory.mktemp("host")
    # Without feature visualisations (44 of them take a minute on a busy CI core; one is tested below).
    export_site(load_run(digit_run), root / "course" / "digits", say=lambda *a: None, visualise=False)
    return root


@contextlib.contextmanager
def static_host(root: Path) -> Iterator[str]:
    """`root` served by Python's plain static file server (http.server) on a free port: its address."""
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """The plain static file server, without a log line per request; every path it was asked for is kept."""

    asked: ClassVar[list[tuple[str, int]]] = []

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        QuietHandler.asked.append((self.path, int(code) if str(code).isdigit() else 0))

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def host(site: Path) -> Iterator[str]:
    """The exported site's address on the static host."""
    with static_host(site) as url:
        yield url + "course/digits/"


@pytest.fixture(scope="module")
def live(digit_run: Path) -> TestClient:
    """The live server of the same run, for the numbers the static page must reproduce."""
    return TestClient(create_app(load_run(digit_run), allowed_hosts=("testserver",)))


def test_the_site_holds_the_page_the_runtime_and_the_network(site: Path, digit_run: Path) -> None:
    d = site / "course" / "digits"
    files = ["index.html", "app.js", "static.js", "style.css", "model.onnx", "site.json", "run.json", "channels.json",
             "test.bin", "weights.bin", MARKER, "pictures/curves.png", "pictures/confusion.png"]  # fmt: skip
    for f in files:
        assert (d / f).is_file(), f
    for f in ORT_FILES:  # ONNX Runtime Web travels with the site: it works offline and on any static host
        assert (d / "ort" / f).read_bytes() == (ORT / f).read_bytes()
    html = (d / "index.html").read_text()
    assert 'src="/' not in html and 'href="/' not in html, "every path relative: the site may live in a sub-folder"
    meta = json.loads((d / "site.json").read_text())
    assert meta["info"]["run"]["path"] == "digits", "the author's folders are not published"
    assert meta["test"]["index"][:1000] == list(range(1000))
    assert len((d / "test.bin").read_bytes()) == len(meta["test"]["index"]) * 28 * 28


def test_the_exported_network_computes_the_models_logits_and_maps(site: Path, digit_run: Path) -> None:
    import onnxruntime as ort

    run = load_run(digit_run)
    d = site / "course" / "digits"
    meta = json.loads((d / "site.json").read_text())
    session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    explorer = Explorer(run)
    for i in (0, 7, 123):
        x = run.prepare(explorer.test_split().final(torch.tensor([i])))
        got = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            logits = run.model(x)
        assert np.abs(got[0] - logits.numpy()).max() < 1e-4
        from cnnlab.inspect.features import layer_inputs_and_outputs

        ins, outs, _ = layer_inputs_and_outputs(run.model, x, explorer.layers())
        for layer in meta["network"]["layers"]:
            name = layer["name"]
            assert np.abs(got[layer["maps"]] - outs[name][:32].numpy()).max() < 1e-4, name
            assert np.abs(got[layer["input"]] - ins[name].numpy()).max() < 1e-4, name


def test_export_refuses_a_folder_of_other_files_and_keeps_them(digit_run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from tests.conftest import main_error

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, err = main_error(["explore", str(digit_run), "--export", str(mine)], capsys)
    assert code == 2 and "not a cnnlab explore site" in err[-1] and len(err) == 1
    assert (mine / "thesis.tex").read_text() == "years of work" and len(list(mine.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    code, err = main_error(["explore", str(digit_run), "--export", str(tmp_path / "file")], capsys)
    assert code == 2 and "is a file" in err[-1]
    code, err = main_error(["explore", "--export", str(tmp_path / "site")], capsys)
    assert code == 2 and "name the RUN" in err[-1]
    monkeypatch.chdir(tmp_path)
    code, err = main_error(["explore", str(digit_run), "--export", "."], capsys)
    assert code == 2 and "the current folder" in err[-1]
    code, err = main_error(["explore", str(digit_run), "--export", str(tmp_path / "file" / "site")], capsys)
    assert code == 2 and "cannot write there" in err[-1] and len(err) == 1


def test_export_again_replaces_its_own_site(site: Path, digit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from cnnlab.cli import main
    from cnnlab.explore import export

    monkeypatch.setattr(export, "channel_views", lambda *a: {})  # the replacing is tested here, not the contents
    d = tmp_path / "digits"
    shutil.copytree(site / "course" / "digits", d)  # a copy: the browser tests use the full site
    (d / "CNAME").write_text("course.example.org")  # the user's own file: GitHub Pages reads it
    (d / "model.onnx").write_bytes(b"an old model")  # the export's own file: replaced
    (tmp_path / ".digits-old").mkdir()
    (tmp_path / ".digits-old" / "mine.txt").write_text("not the export's")
    assert main(["explore", str(digit_run), "--export", str(d)]) == 0
    out = capsys.readouterr().out
    assert "python -m http.server --directory" in out and "MiB" in out and "kept 1 file(s) you added" in out
    assert (d / "CNAME").read_text() == "course.example.org" and (d / "model.onnx").read_bytes() != b"an old model"
    assert (tmp_path / ".digits-old" / "mine.txt").read_text() == "not the export's"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".digits-") and p.name != ".digits-old"]
    for f in [d, *d.rglob("*")]:  # readable by a web server running as another user
        assert f.stat().st_mode & (0o004 if f.is_file() else 0o005), f


def test_each_channel_view_carries_its_feature_visualisation(digit_run: Path, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:  # fmt: skip
    from cnnlab.explore import export

    monkeypatch.setattr(export, "MAX_MAPS", 1)  # the first channel of each layer: the loop, not 44 optimisations
    run = load_run(digit_run)
    explorer, used = Explorer(run), set()
    views = export.channel_views(run, explorer, used, lambda *a: None)  # 28 px: visualised by default
    assert sorted(views) == [f"{name}/0" for name in sorted(explorer.layers())]
    for v in views.values():
        assert v["visualisation"].startswith("data:image/png") and v["reached"] >= v["start"]
        assert len(v["top"]) == 9 and {t["index"] for t in v["top"]} <= used  # their images travel with the site
    assert any(v["reached"] > v["start"] for v in views.values()), "a channel that never fires stays at zero"


# --- the static page in a real browser, served by a plain static file server ---------------------------------------


def rgb(url: str) -> np.ndarray:
    """A PNG data URL's pixels, int (H, W, 3)."""
    return np.asarray(decode_data_url(url).convert("RGB"), dtype=int)


def live_json(client: TestClient, path: str, body: dict[str, Any] | None = None) -> Any:
    """What the live server answers to `path` (POST `body`)."""
    res = client.get(path) if body is None else client.post(path, json=body)
    assert res.status_code == 200, res.text
    return res.json()


@pytest.mark.slow
@needs_browser
@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_static_site_predicts_and_explains_as_the_live_server(host: str, live: TestClient, viewport: dict[str, int]
                                                                  ) -> None:  # fmt: skip
    from playwright.sync_api import expect

    QuietHandler.asked.clear()
    with browser_page(host, viewport) as page:
        expect(page.locator(".maps .map")).to_have_count(44, timeout=30_000)  # test image 0 through ONNX Runtime Web
        expect(page.locator("#run-line")).to_contain_text("a static copy")
        expect(page.locator("#status")).to_contain_text("computed in this browser")
        expect(page.locator("#source-line")).to_contain_text("test image 0, true label:")
        # The same probabilities as the live server (the same model, the same test image).
        mine = page.evaluate("staticApi('/api/predict', {test_index: 5, scale: 'layer'})")
        theirs = live_json(live, "/api/predict", {"test_index": 5, "scale": "layer"})
        assert [t["label"] for t in mine["top"]] == [t["label"] for t in theirs["top"]]
        assert np.allclose([t["prob"] for t in mine["top"]], [t["prob"] for t in theirs["top"]], atol=1e-5)
        assert mine["truth"] == theirs["truth"]
        for a, b in zip(mine["layers"], theirs["layers"], strict=True):
            assert (a["name"], a["shape"], len(a["maps"])) == (b["name"], b["shape"], len(b["maps"]))
            assert np.allclose(a["bounds"], b["bounds"], rtol=1e-4)
            for x, y in zip(a["maps"], b["maps"], strict=True):  # the same colours (PNG encoders differ)
                gap = np.abs(rgb(x) - rgb(y))
                assert gap.max() <= 16 and (gap > 2).mean() < 0.01, f"{a['name']}: the maps' colours differ"
        # Every conv and pooling pixel's explanation, as the server computes it.
        for layer, channel, x, y in (("features.1", 3, 10, 12), ("features.4", 9, 0, 9), ("features.3", 2, 6, 6),
                                     ("features.6", 15, 4, 0)):  # fmt: skip
            body = {"test_index": 5, "layer": layer, "channel": channel, "x": x, "y": y}
            a = page.evaluate("(b) => staticApi('/api/explain', b)", body)
            b = live_json(live, "/api/explain", body)
            assert a["total"] == pytest.approx(b["total"], abs=1e-4) and a["output"] == pytest.approx(
                b["output"], abs=1e-4
            )
            assert a["origin"] == b["origin"] and a.get("winner") == b.get("winner")
            for ta, tb in zip(a.get("terms", []), b.get("terms", []), strict=True):
                assert (
                    np.allclose(ta["products"], tb["products"], atol=1e-5)
                    and ta["input_channel"] == tb["input_channel"]
                )
        # The network view, hover and keys, on a drawing.
        draw(page, ((80, 70), (200, 70), (170, 140), (130, 220)))
        expect(page.locator("#source-line")).to_have_text("your drawing", timeout=20_000)
        page.locator(".maps .map").nth(2).click()
        expect(page.locator("#kernel-view")).to_contain_text("kernel of this map", timeout=20_000)
        big = page.locator("#big")
        big.scroll_into_view_if_needed()
        box = big.bounding_box()
        page.mouse.move(box["x"] + 105, box["y"] + 105)
        expect(page.locator("#explain h3")).to_have_text("pixel (x=10, y=10) of map 2", timeout=20_000)
        page.keyboard.press("ArrowRight")
        expect(page.locator("#explain h3")).to_have_text("pixel (x=11, y=10) of map 2", timeout=20_000)
        total, output = explained(page)
        assert total == pytest.approx(output, abs=2e-3)
        assert serious_violations(page) == []
        # The pipeline, the playground's note and the output-size widget, the run tab.
        page.locator("#tab-pipeline").click()
        expect(page.locator("#pipeline-rows .bar")).to_have_count(10, timeout=20_000)
        expect(page.locator("#pipeline-rows .stage-row")).to_have_count(15)
        assert serious_violations(page) == []
        page.locator("#tab-kernels").click()
        expect(page.locator("#static-note")).to_be_visible()
        expect(page.locator("#sz-formula")).to_contain_text("= 4")
        assert serious_violations(page) == []
        page.locator("#tab-run").click()
        expect(page.locator("#summary table")).to_be_visible(timeout=20_000)
        expect(page.locator("#confusion button")).to_have_count(100)
        # The picture loads after the tab opens (a fetch from the static host): wait for it, not just look.
        page.wait_for_function("document.getElementById('curves').naturalWidth > 0", timeout=20_000)
        assert serious_violations(page) == []
    missing = [(p, c) for p, c in QuietHandler.asked if c >= 400]
    assert missing == [], f"the page asked the static host for files it does not have: {missing}"


@pytest.mark.slow
@needs_browser
def test_the_static_site_run_tab_channels_and_pipeline_match_the_server(host: str, live: TestClient) -> None:
    from playwright.sync_api import expect

    with browser_page(host, DESKTOP) as page:
        expect(page.locator(".maps .map")).to_have_count(44, timeout=30_000)
        body = {"test_index": 11, "scale": "global"}
        mine = page.evaluate("(b) => staticApi('/api/pipeline', b)", body)
        theirs = live_json(live, "/api/pipeline", body)
        assert [(r["name"], r["shape"], r["lecture"], r["params"]) for r in mine["rows"]] == [
            (r["name"], r["shape"], r["lecture"], r["params"]) for r in theirs["rows"]]  # fmt: skip
        assert np.allclose([r["bound"] for r in mine["rows"]], [r["bound"] for r in theirs["rows"]], rtol=1e-4)
        for a, b in zip(mine["rows"], theirs["rows"], strict=True):
            if "values" in b:
                assert np.allclose(a["values"], b["values"], atol=2e-5)
        assert np.allclose([p["prob"] for p in mine["probabilities"]], [p["prob"] for p in theirs["probabilities"]],
                           atol=1e-5)  # fmt: skip
        kw = page.evaluate("staticApi('/api/kernel-weights?layer=features.4&channel=7')")
        theirs = live_json(live, "/api/kernel-weights?layer=features.4&channel=7")
        assert np.array_equal(np.float32(kw["weights"]), np.float32(theirs["weights"]))
        assert (kw["in_channels"], np.float32(kw["bias"])) == (theirs["in_channels"], np.float32(theirs["bias"]))
        # What a channel detects: the same test images; a mistake opens in the network view with its true label.
        page.locator('.maps .map[data-layer="features.4"]').nth(3).click()
        page.locator("#detects").click()
        expect(page.locator("#channel-view .thumb")).to_have_count(9, timeout=20_000)
        theirs = live_json(live, "/api/channel?layer=features.4&channel=3")
        shown = page.locator("#channel-view .thumb").evaluate_all("bs => bs.map(b => +b.dataset.index)")
        assert shown == [t["index"] for t in theirs["top"]]
        page.locator("#tab-run").click()
        expect(page.locator("#confusion button")).to_have_count(100, timeout=20_000)
        conf = live_json(live, "/api/confusion")
        wrong = next((t, p) for t, row in enumerate(conf["confusion"]) for p, n in enumerate(row) if n and t != p)
        page.locator(f'#confusion button[data-t="{wrong[0]}"][data-p="{wrong[1]}"]').click()
        expect(page.locator("#cell-title")).to_contain_text(f"{conf['confusion'][wrong[0]][wrong[1]]} test image")
        first = page.locator("#cell-images .thumb").first
        index = int(first.get_attribute("data-index"))
        first.click()
        expect(page.locator("#source-line")).to_contain_text(f"test image {index}, true label: {wrong[0]}",
                                                             timeout=20_000)  # fmt: skip
        # A test image beyond the split (the site holds all 1,000 of mnist-mini's): the server's own line.
        page.fill("#test-index", "9999")
        page.locator("#load-test").click()
        expect(page.locator("#status")).to_have_text("test_index: the test split has 1000 images (0..999)",
                                                     timeout=20_000)  # fmt: skip


@pytest.mark.slow
@needs_browser
def test_a_drawing_is_centred_as_the_server_centres_it(host: str) -> None:
    with browser_page(host, DESKTOP) as page:
        page.wait_for_function("document.querySelectorAll('.maps .map').length === 44", timeout=30_000)
        draw(page, ((90, 60), (190, 60), (150, 150), (120, 230)))
        url = page.evaluate("document.getElementById('pad').toDataURL('image/png')")
        mine = np.array(page.evaluate("(u) => loadImage(u).then((i) => Array.from(centerDigit(i, 28)))", url))
        theirs = center_digit(np.asarray(decode_data_url(url).convert("L")), 28).ravel().astype(float)
        # The browser's smoothing stands in for Pillow's Lanczos: the same glyph, in the same place, within a few
        # grey levels on average.
        assert np.abs(mine - theirs).mean() < 6, np.abs(mine - theirs).mean()
        assert (mine > 20).sum() == pytest.approx((theirs > 20).sum(), rel=0.15)
