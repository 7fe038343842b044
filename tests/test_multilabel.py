"""Multi-label data: a CSV with `a;b` cells, a sigmoid head with BCE, thresholds chosen on validation, mAP as
scikit-learn computes it, predict returning every label above its threshold, Grad-CAM per label, exact resume."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from sklearn.metrics import average_precision_score, f1_score

import cnnlab
from cnnlab.cli import main
from cnnlab.data import load_dataset
from cnnlab.data.balance import positive_weights
from cnnlab.data.pipeline import BatchMixer
from cnnlab.data.types import Dataset, ImageSet, stratified_split
from cnnlab.engine.checkpoint import load_checkpoint
from cnnlab.engine.inference import load_run, logits_of
from cnnlab.engine.loss import class_loss
from cnnlab.engine.metrics import average_precision, best_thresholds, mean_average_precision, multilabel_report
from cnnlab.engine.trainer import TrainConfig, fit
from cnnlab.errors import CnnlabError, OptionError, UsageError
from tests.test_engine import StopAfter, quick

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (40, 40, 230)}


def squares(root: Path, n: int = 120, seed: int = 0) -> Path:
    """A CSV of photos holding coloured squares; each photo's labels are the colours it shows (one to three)."""
    rng = random.Random(seed)
    (root / "photos").mkdir(parents=True, exist_ok=True)
    rows = ["image,label"]
    for i in range(n):
        labels = [c for c in COLOURS if rng.random() < 0.45] or [rng.choice(list(COLOURS))]
        img = Image.new("RGB", (48, 40), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        for c in labels:
            x, y = rng.randint(0, 34), rng.randint(0, 26)
            draw.rectangle([x, y, x + 12, y + 12], fill=COLOURS[c])
        img.save(root / "photos" / f"{i}.png")
        rows.append(f"photos/{i}.png,{';'.join(labels)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root / "labels.csv"


def digit_labels(ds: Dataset) -> Dataset:
    """Digits as multi-label data: the digit itself (10 labels), 'even' and 'large' (5 to 9)."""

    def hot(labels: torch.Tensor) -> torch.Tensor:
        out = F.one_hot(labels, 10)
        return torch.cat([out, (labels % 2 == 0)[:, None], (labels >= 5)[:, None]], 1).to(torch.uint8)

    train, test = ds.train, ds.test
    return Dataset("digit-tags", ImageSet(train.images, hot(train.labels)), ImageSet(test.images, hot(test.labels)),
                   (*ds.classes, "even", "large"), default_augment=("crop",))  # fmt: skip


# --- the metrics, against scikit-learn ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_average_precision_is_scikit_learns_with_ties_too(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 10 + 13 * seed
    scores = torch.randint(0, 6, (n, 4), generator=g).float() / 5 if seed % 2 else torch.rand(n, 4, generator=g)
    truth = (torch.rand(n, 4, generator=g) < 0.4).long()
    truth[0] = 1  # every label present
    m_ap, per = mean_average_precision(scores, truth)
    assert m_ap == pytest.approx(average_precision_score(truth.numpy(), scores.numpy(), average="macro"), abs=1e-12)
    for k in range(4):
        assert per[k] == pytest.approx(average_precision_score(truth[:, k].numpy(), scores[:, k].numpy()), abs=1e-12)
    assert average_precision(scores[:, 0], torch.zeros(n)) != average_precision(scores[:, 0], torch.zeros(n))  # NaN


def test_thresholds_give_the_best_f1_on_the_images_they_were_chosen_on() -> None:
    g = torch.Generator().manual_seed(3)
    truth = (torch.rand(80, 5, generator=g) < 0.3).long()
    probs = (truth * 0.3 + torch.rand(80, 5, generator=g) * 0.7).clamp(0, 1)  # informative, not separable
    probs[:, 4], truth[:, 4] = torch.rand(80, generator=g), 0  # a label no image has keeps 1/2
    th = best_thresholds(probs, truth)
    for k in range(4):
        best = max(f1_score(truth[:, k], probs[:, k] >= t) for t in np.unique(probs[:, k].numpy()))
        assert f1_score(truth[:, k], probs[:, k] >= th[k]) == pytest.approx(best)
    assert th[4] == 0.5
    report = multilabel_report(probs, truth, th, [str(k) for k in range(5)])
    for k, row in enumerate(report["per_class"][:4]):
        assert row["f1"] == pytest.approx(f1_score(truth[:, k], probs[:, k] >= th[k]))
    pred = (probs >= th).long()
    assert report["micro"]["f1"] == pytest.approx(f1_score(truth, pred, average="micro"))


def test_bce_smoothing_and_positive_weights() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 4, generator=g), (torch.rand(6, 4, generator=g) < 0.5).to(torch.uint8)
    plain = F.binary_cross_entropy_with_logits(logits, y.float())
    assert class_loss(logits, y, multi_label=True) == pytest.approx(plain.item())
    smoothed = F.binary_cross_entropy_with_logits(logits, y.float() * 0.8 + 0.1)
    assert class_loss(logits, y, 0.2, multi_label=True) == pytest.approx(smoothed.item())
    w = positive_weights(torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]]))
    assert w.tolist() == pytest.approx([1 / 3, 3.0, 1.0])  # negatives / positives; a label never seen: 1
    weighted = F.binary_cross_entropy_with_logits(logits[:, :3], y[:, :3].float(), pos_weight=w)
    assert class_loss(logits[:, :3], y[:, :3], weight=w, multi_label=True) == pytest.approx(weighted.item())


def test_mixup_blends_label_sets_with_the_images_weights() -> None:
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.uint8)
    mixed, target = BatchMixer(0.4, 0.0, 4)(x, y, torch.Generator().manual_seed(1))
    lam = float((mixed[0] - x[3]).flatten()[0] / (x[0] - x[3]).flatten()[0])  # MixUp: x0' = lam x0 + (1-lam) x3
    assert torch.allclose(target, lam * y.float() + (1 - lam) * y.roll(1, 0).float(), atol=1e-5)


def test_multi_label_split_keeps_every_label_in_the_held_out_part() -> None:
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(200, 6, generator=g) < 0.3).to(torch.uint8)
    y[:5, 5], y[5:, 5] = 1, 0  # a rare label: 5 images
    rest, held = stratified_split(y, 0.2, seed=0)
    assert sorted(torch.cat([rest, held]).tolist()) == list(range(200))
    assert bool((y[held].sum(0) > 0).all()) and bool((y[rest].sum(0) > 0).all())


# --- the CSV ----------------------------------------------------------------------------------------------------------


def test_a_csv_with_several_labels_per_cell_is_multi_label(tmp_path: Path) -> None:
    csv = squares(tmp_path, n=40)
    ds = load_dataset(str(csv), image_size=16)
    assert ds.multi_label and ds.classes == ("blue", "green", "red") and ds.train.resize == "squash"
    rows = [line.split(",")[1].split(";") for line in csv.read_text().splitlines()[1:]]
    every = torch.cat([ds.train.labels, ds.test.labels])
    assert every.dtype == torch.uint8 and every.shape == (40, 3)
    assert int(every.sum()) == sum(len(r) for r in rows)
    assert any("resize=squash by default" in n for n in ds.notes)
    assert load_dataset(str(csv), image_size=16, resize="crop").train.resize == "crop"


def test_columns_can_be_named_and_bad_rows_follow_on_bad_image(tmp_path: Path) -> None:
    squares(tmp_path, n=8)
    text = "where,tags,note\n" + "".join(f"photos/{i}.png,{'red;blue' if i % 2 else 'green'},x\n" for i in range(8))
    text += "photos/missing.png,red,x\nphotos/7.png\nphotos/6.png,,x\n"  # lines 10, 11 and 12 are bad
    csv = tmp_path / "named.csv"
    csv.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match="the header needs an image column"):
        load_dataset(str(csv))
    with pytest.raises(OptionError, match=r"csv_label_column.*'labels': .*has no such column \(its columns: 'where'"):
        load_dataset(str(csv), csv_image_column="where", csv_label_column="labels")
    with pytest.raises(CnnlabError, match=r"named.csv: line 10: photos/missing.png: no such image file .*2 more"):
        load_dataset(str(csv), image_size=8, csv_image_column="where", csv_label_column="TAGS")
    ds = load_dataset(str(csv), image_size=8, on_bad_image="skip", csv_image_column="where", csv_label_column="tags")
    assert len(ds.train) + len(ds.test) == 8 and ds.multi_label
    note = next(n for n in ds.notes if n.startswith("skipped 3 bad row(s)"))
    assert "line 10" in note and "line 11: 1 cell(s)" in note and "line 12: empty label cell" in note
    assert [r["line"] for r in ds.extra["skipped_rows"]] == [10, 11, 12]


def test_a_skipped_row_or_a_trailing_separator_does_not_make_data_multi_label(tmp_path: Path) -> None:
    squares(tmp_path, n=12)
    rows = "".join(f"photos/{i}.png,{'red' if i % 2 else 'blue;'}\n" for i in range(12))  # 'blue;' is one label
    (tmp_path / "one.csv").write_text("image,label\n" + rows + "photos/gone.png,red;blue\n", encoding="utf-8")
    ds = load_dataset(str(tmp_path / "one.csv"), image_size=8, on_bad_image="skip")
    assert not ds.multi_label and ds.classes == ("blue", "red") and ds.train.labels.dim() == 1
    assert ds.train.resize == "crop" and any("the data is single-label" in n for n in ds.notes)
    both = tmp_path / "both.csv"
    both.write_text("Picture File,Tags Here\n" + rows, encoding="utf-8")
    named = load_dataset(str(both), image_size=8, csv_image_column="picturefile", csv_label_column="TAGSHERE")
    assert not named.multi_label and len(named.train) + len(named.test) == 12
    with pytest.raises(OptionError, match="names the same column as csv_image_column"):
        load_dataset(str(both), csv_image_column="Tags Here", csv_label_column="tags here")


def test_evaluation_json_has_null_where_a_number_is_undefined() -> None:
    from cnnlab.cli_use import _finite

    assert _finite({"ap": [0.5, float("nan")], "x": float("inf"), "n": 3}) == {"ap": [0.5, None], "x": None, "n": 3}


def test_csv_column_options_are_refused_for_other_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data", "mnist-mini", "--csv-image-column", "f", "--runs-dir", str(tmp_path)])
    assert code == 2 and "--csv-image-column names a column of a CSV labels file" in capsys.readouterr().err


def test_the_balanced_sampler_is_refused_before_decoding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = squares(tmp_path, n=6)
    (tmp_path / "photos" / "0.png").write_bytes(b"not a png")  # decoding would fail first if it started
    code = main(["train", "--data", str(csv), "--sampler", "balanced", "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--sampler balanced" in err[0] and "--class-weights auto" in err[0]


# --- a trained run ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("multilabel")
    csv = squares(root, n=160)
    run = cnnlab.train("cnn-compact", str(csv), image_size=24, epochs=6, runs_dir=root / "runs", progress=False,
                       class_weights="auto", mixup=0.2)  # fmt: skip
    return run, root


def test_training_records_multi_label_and_thresholds(trained: Any) -> None:
    run, _ = trained
    assert run.record.data.multi_label and run.result.test_map is not None and run.result.test_map > 0.8
    doc = json.loads((run.dir / "thresholds.json").read_text())
    assert list(doc["thresholds"]) == ["blue", "green", "red"] and "validation split" in doc["chosen"]
    assert all(0 < t < 1 for t in doc["thresholds"].values())
    assert "val_mAP" in (run.dir / "metrics.csv").read_text().splitlines()[0]
    assert run.result.headline().startswith("test mAP")
    ev = run.evaluate()  # the run's own test numbers are evaluate's: exact match at the chosen thresholds
    assert ev.exact_match == pytest.approx(run.result.test_acc) and ev.mAP == pytest.approx(run.result.test_map)
    assert ev.exact_match > 0.5 and max(r["train_acc"] for r in run.metrics) > 0.5  # exact match counts images


def test_epoch_progress_counts_images_not_labels() -> None:
    from cnnlab.engine.state import EpochProgress

    zero = torch.zeros(())
    prog = EpochProgress(torch.arange(4), 0, zero, zero.long(), zero.long() - 1, 0, 1e-3)
    y = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.uint8)
    logits = torch.where(y > 0, 2.0, -2.0)
    logits[3, 0] = 1.0  # one wrong label: three of the four images are right
    prog.add(torch.tensor(0.5), logits, y, 1)
    assert prog.seen == 4 and int(prog.correct) == 3 and float(prog.loss_sum) == pytest.approx(2.0)


def test_a_hostile_or_partial_thresholds_file_is_one_line(tmp_path: Path) -> None:
    from cnnlab.engine.rundir import read_thresholds

    assert read_thresholds(tmp_path, ("a", "b"))[0] == [0.5, 0.5]
    cases = (('{"thresholds": {"a": 0.3}}', "no threshold for label 'b'"), ("{", "unreadable"),
             ('{"thresholds": {"a": 0.3, "b": NaN}}', "between 0 and 1"),
             ('{"thresholds": [0.3, 0.4]}', "no threshold for label 'a'"))  # fmt: skip
    for text, needle in cases:
        (tmp_path / "thresholds.json").write_text(text)
        with pytest.raises(UsageError, match=needle):
            read_thresholds(tmp_path, ("a", "b"))
    (tmp_path / "thresholds.json").unlink()
    (tmp_path / "thresholds.json").mkdir()
    with pytest.raises(UsageError, match="unreadable"):
        read_thresholds(tmp_path, ("a", "b"))


def test_evaluate_json_map_is_scikit_learns(trained: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = trained
    assert main(["evaluate", str(run.dir), "--json", "--out", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    loaded = load_run(run.dir)
    test = load_dataset(loaded.record.train.data, image_size=24).test
    probs = logits_of(loaded, test).sigmoid()
    assert doc["multi_label"] and doc["n"] == len(test)
    assert doc["mAP"] == pytest.approx(average_precision_score(test.labels.numpy(), probs.numpy(), average="macro"))
    th = loaded.thresholds
    for k, row in enumerate(doc["per_class"]):
        assert row["threshold"] == pytest.approx(float(th[k]))
        assert row["ap"] == pytest.approx(average_precision_score(test.labels[:, k].numpy(), probs[:, k].numpy()))
        assert row["f1"] == pytest.approx(f1_score(test.labels[:, k].numpy(), (probs[:, k] >= th[k]).numpy()))
    assert not (tmp_path / "confusion.png").exists() and (tmp_path / "misclassified.png").is_file()
    assert main(["evaluate", str(run.dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mAP" in out and "per-label metrics" in out and "threshold" in out


def test_predict_gives_every_label_above_its_threshold(trained: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run, root = trained
    files = [root / "photos" / f"{i}.png" for i in range(6)]
    loaded = load_run(run.dir)
    probs = logits_of(loaded, torch.stack([loaded.model_input(Image.open(f)) for f in files])).sigmoid()
    preds = run.predict([str(f) for f in files])
    for p, row in zip(preds, probs, strict=True):
        above = {loaded.classes[k] for k in range(3) if row[k] >= loaded.thresholds[k]}
        assert p.multi_label and set(p.labels) == above and p.probs == sorted(p.probs, reverse=True)
    assert main(["predict", str(run.dir), *map(str, files), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [[d["label"] for d in item["labels"]] for item in doc] == [p.labels for p in preds]
    assert main(["predict", str(run.dir), str(files[0]), "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "file,rank,label,probability"


def test_gradcam_draws_one_picture_per_predicted_label(trained: Any, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run, root = trained
    image = root / "photos" / "2.png"
    labels = run.predict(str(image)).labels
    assert main(["visualize", "gradcam", str(run.dir), str(image), "--out", str(tmp_path)]) == 0
    made = sorted(p.name for p in tmp_path.glob("gradcam_*.png"))
    assert made == sorted(f"gradcam_2_{label}.png" for label in labels or [made[0][10:-4]])
    assert main(["visualize", "batch", str(run.dir), "--count", "4", "--out", str(tmp_path)]) == 0
    capsys.readouterr()


def test_the_explore_service_reports_sigmoid_probabilities(trained: Any) -> None:
    from cnnlab.explore.service import Explorer

    run, _ = trained
    out = Explorer(load_run(run.dir)).predict(None, 0, False)
    assert out["multi_label"] and all("threshold" in t and "predicted" in t for t in out["top"])
    assert sum(t["prob"] for t in out["top"]) != pytest.approx(1.0)


def test_what_a_channel_detects_and_the_static_export_on_a_multi_label_run(trained: Any, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from cnnlab.explore.export import export_site
    from cnnlab.explore.service import Explorer

    run, _ = trained
    loaded = load_run(run.dir)
    explorer = Explorer(loaded)
    view = explorer.channel_view(explorer.layers()[0], 0, visualise=False)  # thumbnails name label sets
    truth = loaded.classes
    for item in view["top"]:
        assert set(item["true"].split(";")) <= set(truth) and item["predicted"]
    export_site(loaded, tmp_path / "site", say=lambda *a: None, visualise=False)
    meta = json.loads((tmp_path / "site" / "site.json").read_text())
    assert meta["info"]["run"]["multi_label"] and meta["thresholds"] == pytest.approx(loaded.thresholds.tolist())
    assert json.loads((tmp_path / "site" / "run.json").read_text())["confusion"] is None


# --- the trainer ------------------------------------------------------------------------------------------------------


def test_multi_label_resume_is_bit_exact(small_digits: Dataset, tmp_path: Path) -> None:
    data = digit_labels(small_digits)
    cfg: TrainConfig = quick(epochs=3, mixup=0.2, cutmix=1.0, augment=("crop", "flip"))
    straight = fit(cfg, runs_dir=tmp_path / "a", dataset=data)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, runs_dir=tmp_path / "b", dataset=data, reporter=StopAfter(2))
    stopped = next((tmp_path / "b").iterdir())
    resumed = fit(resume=stopped, dataset=data)
    a, b = load_checkpoint(straight.run_dir / "last.ckpt"), load_checkpoint(stopped / "last.ckpt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert resumed.test_map == straight.test_map and straight.test_map > 0.5
    assert (stopped / "thresholds.json").read_text() == (straight.run_dir / "thresholds.json").read_text()


def test_a_new_sigmoid_head_starts_at_each_labels_prior() -> None:
    from cnnlab.engine.setup import prior_bias
    from cnnlab.models.registry import create_model

    model = create_model("lenet5-modern", num_classes=3, in_channels=1, image_size=28)
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.uint8)  # priors 3/4, 1/4, 0
    assert prior_bias(model, labels) is not None
    out = model.eval()(torch.zeros(1, 1, 28, 28))
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert torch.allclose(last.bias.detach().sigmoid()[:2], torch.tensor([0.75, 0.25]), atol=1e-6)
    assert float(last.bias[2].detach().sigmoid()) == pytest.approx(1e-4, rel=1e-3) and out.shape == (1, 3)
