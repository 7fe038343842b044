"""Using a trained run: metrics, evaluate, predict, visualize, export, and the CLI commands for them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.engine.export import export_run
from cnnlab.engine.inference import eval_data, evaluate_run, load_run, predict_files
from cnnlab.engine.metrics import confusion_matrix, most_confused, per_class_report
from cnnlab.errors import CnnlabError, UsageError
from cnnlab.inspect.features import activations, conv_layers_in_order, default_stages, grad_cam
from tests.conftest import main_error


def test_confusion_matrix_and_report_match_a_hand_computed_example() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2, 0])
    cm = confusion_matrix(pred, labels, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    rep = per_class_report(cm, ["a", "b", "c"])
    a, b, c = rep["per_class"]
    # a: tp 2, predicted 3, true 3 -> p = r = 2/3; b: tp 1, predicted 2, true 2 -> 1/2; c: tp 3, predicted 4, true 4.
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3) and a["support"] == 3
    assert (
        b["f1"] == pytest.approx(0.5) and c["precision"] == pytest.approx(0.75) and c["recall"] == pytest.approx(0.75)
    )
    assert rep["macro"]["recall"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert rep["weighted"]["recall"] == pytest.approx(6 / 9), "support-weighted recall is accuracy"
    assert most_confused(cm, ["a", "b", "c"], n=2) == [
        {"true": "a", "predicted": "b", "count": 1},
        {"true": "b", "predicted": "c", "count": 1},
    ]


def test_class_never_predicted_has_zero_precision_not_nan() -> None:
    cm = confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 1]), 2)
    rep = per_class_report(cm, ["x", "y"])
    assert rep["per_class"][1]["precision"] == 0.0 and rep["per_class"][1]["f1"] == 0.0


def test_evaluate_numbers_agree_with_the_training_run(digit_run: Path) -> None:
    loaded = load_run(digit_run)
    ev = evaluate_run(loaded)
    results = json.loads((digit_run / "results.json").read_text())
    assert ev.n == 1000 and ev.top1 == pytest.approx(results["test_acc"], abs=1e-9)
    assert ev.top5 == pytest.approx(results["test_top5"], abs=1e-9) and ev.top1 > 0.8
    assert int(ev.confusion.trace()) == round(ev.top1 * ev.n) and int(ev.confusion.sum()) == ev.n
    assert [r["support"] for r in ev.report["per_class"]] == [100] * 10
    confidences = [w["confidence"] for w in ev.worst]
    assert confidences == sorted(confidences, reverse=True) and all(w["true"] != w["predicted"] for w in ev.worst)
    assert len(ev.images) == len(ev.worst)


def test_cli_evaluate_writes_pictures_and_json(digit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cnnlab.cli import main

    assert main(["evaluate", str(digit_run), "--json", "--out", str(tmp_path), "--normalize"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n"] == 1000 and len(doc["confusion_matrix"]) == 10 and doc["top5_error"] == 1 - doc["top5"]
    for key in ("confusion", "misclassified"):
        with Image.open(doc["files"][key]) as img:
            assert img.width > 400 and img.height > 200
    assert json.loads(Path(doc["files"]["json"]).read_text())["top1"] == doc["top1"]


def test_evaluate_on_data_with_other_classes_is_a_clear_error(
    digit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("L", (28, 28), 40 * i).save(tmp_path / cls / f"{i}.png")
    code, err = main_error(["evaluate", str(digit_run), "--data", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "its classes (cat, dog) differ from the run's (0, 1, 2, 3" in err[0]


def _digit_files(run: Path, folder: Path, n: int = 6) -> tuple[list[Path], list[int]]:
    """The first n test digits of the run's data, written as PNG files."""
    data, _ = eval_data(load_run(run), None, None, "test")
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        path = folder / f"digit{i}.png"
        Image.fromarray(data.images[i, 0].numpy()).save(path)
        files.append(path)
    return files, data.labels[:n].tolist()


def test_predict_files_matches_the_model_on_the_same_images(digit_run: Path, tmp_path: Path) -> None:
    loaded = load_run(digit_run)
    files, labels = _digit_files(digit_run, tmp_path / "digits")
    preds = predict_files(loaded, [str(tmp_path / "digits")], top_k=10, batch_size=4)
    assert [Path(p.file).name for p in preds] == [f.name for f in files]
    for p in preds:
        assert sum(p.probs) == pytest.approx(1.0, abs=1e-4) and p.probs == sorted(p.probs, reverse=True)
        assert sorted(p.labels) == list("0123456789")
    data, _ = eval_data(loaded, None, None, "test")
    expected = load_run(digit_run).model(loaded.prepare(data.images[:6])).argmax(1).tolist()
    assert [int(p.labels[0]) for p in preds] == expected, "same pixels in, same answer out"
    assert sum(int(p.labels[0]) == y for p, y in zip(preds, labels, strict=True)) >= 4


def test_predict_invert_handles_dark_digits_on_white(digit_run: Path, tmp_path: Path) -> None:
    loaded = load_run(digit_run)
    originals, _ = _digit_files(digit_run, tmp_path / "light", n=6)
    paper, _ = _digit_files(digit_run, tmp_path / "paper", n=6)
    for f in paper:  # paper-style: dark strokes on a white background
        Image.fromarray(255 - np.asarray(Image.open(f))).save(f)
    want = predict_files(loaded, [str(tmp_path / "light")], top_k=10)
    got = predict_files(loaded, [str(tmp_path / "paper")], top_k=10, invert=True)
    assert [p.labels for p in got] == [p.labels for p in want]
    assert got[0].probs == pytest.approx(want[0].probs, abs=1e-6)
    assert len(originals) == 6


def test_cli_predict_formats_and_errors(digit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cnnlab.cli import main

    files, _ = _digit_files(digit_run, tmp_path / "digits", n=2)
    assert main(["predict", str(digit_run), *map(str, files), "--csv", "--top-k", "3"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "file,rank,label,probability" and len(rows) == 1 + 2 * 3
    assert main(["predict", str(digit_run), str(files[0]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc[0]["file"] == str(files[0]) and len(doc[0]["top"]) == 5
    code, err = main_error(["predict", str(digit_run)], capsys)
    assert code == 2 and "give a RUN and at least one IMAGE" in err[0]
    code, err = main_error(["predict", str(digit_run), str(tmp_path / "missing.png")], capsys)
    assert code == 2 and err == [f"cnnlab: error: {tmp_path / 'missing.png'}: no such file or folder"]
    (tmp_path / "bad.png").write_bytes(b"nope")
    code, err = main_error(["predict", str(digit_run), str(tmp_path / "bad.png")], capsys)
    assert code == 2 and len(err) == 1 and "bad.png: not an image" in err[0]


def test_predict_pretrained_uses_imagenet_categories_from_a_local_weights_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import torchvision

    from cnnlab.cli import main

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "red.jpg")
    assert main(["predict", "--model", "resnet18", "--weights", str(weights), str(tmp_path / "red.jpg"), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    categories = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
    assert len(top) == 5 and all(t["label"] in categories for t in top)
    code, err = main_error(["predict", "--model", "resnet18", str(tmp_path / "red.jpg")], capsys)
    assert code == 2 and "add --pretrained" in err[0]


def test_load_run_from_the_checkpoint_file_gives_the_last_weights(digit_run: Path) -> None:
    from_ckpt = load_run(digit_run / "last.ckpt")
    best = load_run(digit_run)
    assert from_ckpt.weights.name == "last.ckpt" and best.weights.name == "best.safetensors"
    with pytest.raises(UsageError, match="no such run directory"):
        load_run(digit_run / "nope")


# --- visualize --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["filters", "activations", "gradcam", "curves"])
def test_cli_visualize_writes_readable_pngs(
    what: str, digit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from cnnlab.cli import main

    args = ["visualize", what, str(digit_run), "--out", str(tmp_path)]
    if what in ("activations", "gradcam"):
        args.insert(3, "test:3")
    assert main(args) == 0
    paths = [Path(p) for p in capsys.readouterr().out.split()]
    assert paths and all(p.parent == tmp_path for p in paths)
    for p in paths:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.width >= 300 and img.height >= 150
    if what == "activations":
        assert len(paths) == 2, "lenet5-modern: one picture per conv stage"


def test_activations_and_gradcam_shapes(digit_run: Path) -> None:
    loaded = load_run(digit_run)
    data, _ = eval_data(loaded, None, None, "test")
    x = loaded.prepare(data.images[:1])
    calls = conv_layers_in_order(loaded.model, x)
    assert [tuple(s[1:]) for _, s in calls] == [(6, 28, 28), (16, 10, 10)]
    maps = activations(loaded.model, x, default_stages(calls))
    assert [tuple(m.shape) for m in maps.values()] == [(6, 28, 28), (16, 10, 10)]
    cam = grad_cam(loaded.model, x)
    assert cam.heatmap.shape == (28, 28) and float(cam.heatmap.min()) >= 0 and float(cam.heatmap.max()) == 1.0
    assert cam.layer == calls[-1][0] and cam.class_index == int(loaded.model(x).argmax())
    with pytest.raises(UsageError, match="--layer 'nope': no such layer; conv layers: features"):
        grad_cam(loaded.model, x, layer="nope")


def test_gradcam_lights_up_where_the_evidence_is() -> None:
    # Class 1's score is the mean activation of a 1x1 conv; the input is bright only in its right half, so that
    # is where the evidence for class 1 lies, and where Grad-CAM must be hot (and cold elsewhere).
    class MeanScore(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1, bias=False)
            torch.nn.init.ones_(self.conv.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            score = self.conv(x).mean(dim=(1, 2, 3))
            return torch.stack([-score, score], 1)

    x = torch.zeros(1, 1, 8, 8)
    x[..., 4:] = 1.0
    cam = grad_cam(MeanScore(), x, class_index=1)
    assert float(cam.heatmap[:, :3].max()) == 0.0 and float(cam.heatmap[:, 5:].min()) > 0.9
    assert float(grad_cam(MeanScore(), x, class_index=0).heatmap.max()) == 0.0, "evidence against: nothing lit"


# --- export -----------------------------------------------------------------------------------------------------------


def _export(digit_run: Path, fmt: str, out: Path) -> dict:
    loaded = load_run(digit_run)
    data, _ = eval_data(loaded, None, None, "test")
    result = export_run(loaded, fmt, data.images[:16], out)
    assert result.max_abs_diff <= 1e-4 and result.path == out and result.batch_sizes == (16, 1)
    return json.loads(result.metadata.read_text())


def test_torchscript_export_runs_any_batch_size(digit_run: Path, tmp_path: Path) -> None:
    meta = _export(digit_run, "torchscript", tmp_path / "m.pt")
    assert meta["classes"] == list("0123456789") and meta["image_size"] == 28 and meta["channels"] == 1
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    assert scripted(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_onnx_export_parity_in_onnxruntime(digit_run: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    meta = _export(digit_run, "onnx", tmp_path / "m.onnx")
    assert meta["parity_max_abs_diff"] <= 1e-4 and meta["mean"] and meta["std"]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.zeros((7, 1, 28, 28), dtype=np.float32)})[0]
    assert out.shape == (7, 10)


def test_export_parity_failure_writes_nothing(digit_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnlab.engine import export

    real = export._run_exported
    monkeypatch.setattr(export, "_run_exported", lambda fmt, path, x: real(fmt, path, x) + 1e-3)
    with pytest.raises(CnnlabError, match="parity check failed"):
        _export(digit_run, "torchscript", tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.pt.json").exists()


def test_cli_export_bad_output_is_a_usage_error(digit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    code, err = main_error(
        ["export", str(digit_run), "--format", "torchscript", "-o", str(tmp_path / "file/m.pt")], capsys
    )
    assert code == 2 and "not a directory" in err[0] and len(err) == 1
    code, err = main_error(["export", str(digit_run), "--format", "tflite"], capsys)
    assert code == 2 and "invalid choice: 'tflite'" in err[0]


def test_predict_pretrained_offline_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error

    import torchvision

    def offline(*a: object, **k: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # cnnlab downloads through torch.hub itself
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # an empty cache, whatever the user has
    Image.new("RGB", (40, 40)).save(tmp_path / "x.png")
    code, err = main_error(["predict", "--model", "resnet18", "--pretrained", str(tmp_path / "x.png")], capsys)
    assert code == 1 and len(err) == 1
    assert "cannot download pretrained weights" in err[0] and "--weights FILE" in err[0]
