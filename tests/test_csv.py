"""Labels from a CSV file: the same images as an image folder, splits from a column, clear errors for bad rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cnnlab
from cnnlab.cli import main
from cnnlab.data import load_dataset
from cnnlab.data.folders import load_image_folder
from cnnlab.errors import CnnlabError, UsageError
from tests.test_folders import rgb, save, two_classes


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def folder_rows(root: Path) -> str:
    """file,label rows for every image of an image folder, in the folder loader's order (class, then file name)."""
    return "".join(f"{p.relative_to(root).as_posix()},{p.parent.name}\n" for p in sorted(root.rglob("*.png")))


def test_a_csv_gives_the_images_and_labels_of_the_same_folder(tmp_path: Path) -> None:
    root = two_classes(tmp_path / "photos", n=6)
    csv = write_csv(root / "labels.csv", "file,label\n" + folder_rows(root))
    from_csv, from_folder = load_dataset(str(csv), image_size=16), load_image_folder(root, image_size=16)
    assert from_csv.classes == from_folder.classes == ("a", "b") and from_csv.name == "labels"
    for mine, theirs in ((from_csv.train, from_folder.train), (from_csv.test, from_folder.test)):
        assert torch.equal(mine.images, theirs.images) and torch.equal(mine.labels, theirs.labels)
    assert from_csv.extra["csv"] == str(csv.resolve()) and "label column 'label'" in from_csv.notes[0]


def test_a_split_column_names_train_validation_and_test(tmp_path: Path) -> None:
    for i in range(12):
        save(rgb(i), tmp_path / "img" / f"{i}.jpg")
    split = ["train"] * 6 + ["valid"] * 2 + ["test"] * 4  # 'valid' as fastai and Kaggle write it
    rows = "".join(f"img/{i}.jpg,{'10' if i % 2 else '2'},{split[i]}\n" for i in range(12))
    ds = load_dataset(str(write_csv(tmp_path / "data.csv", "image,class,split\n" + rows)), image_size=8)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 4)
    assert ds.classes == ("2", "10"), "whole-number labels sort as numbers"
    assert ds.train.labels.tolist() == [0, 1, 0, 1, 0, 1]


BAD = {
    "header only": ("file,label\n", "needs a header row and at least one row"),
    "no file": ("file,label\nnope.png,a\nb/0.png,b\na/0.png,a\n", "line 2: nope.png: no such image file"),
    "unseen label": (
        "file,label,split\na/0.png,a,train\nb/0.png,b,train\na/1.png,c,test\n",
        "line 4: label 'c' (test)",
    ),
    "bad split": ("file,label,split\na/0.png,a,holdout\n", "line 2: split 'holdout' is not train, val or test"),
    "empty label": ("file,label\na/0.png,\nb/0.png,b\na/1.png,a\n", "line 2: empty label cell"),
    "twice": ("file,label\na/0.png,a\na/0.png,b\n", "line 3: a/0.png is listed twice (first on line 2)"),
    "short row": (
        "file,label,split\na/0.png\nb/0.png,b,train\na/1.png,a,train\n",
        "line 2: 1 cell(s), the header has 3",
    ),
    "one class": ("file,label\na/0.png,a\na/1.png,a\n", "have 1 class(es); at least 2 are needed"),
    "named wrong": ("label,where\na,a/0.png\n", "the header needs an image column"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_csv_is_one_line_naming_the_file_and_line(case: str, tmp_path: Path) -> None:
    root = two_classes(tmp_path / "photos", n=2)
    text, needle = BAD[case]
    csv = write_csv(root / "labels.csv", text)
    with pytest.raises(CnnlabError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
        load_dataset(str(csv), image_size=8)
    assert str(e.value).startswith(str(csv)) and "\n" not in str(e.value)


def test_not_a_text_file_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(UsageError, match="not a UTF-8 text file"):
        load_dataset(str(tmp_path / "bin.csv"))
    code = main(["train", "--data", str(tmp_path / "missing.csv"), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"--data {tmp_path / 'missing.csv'}: no such CSV file" in err[0]
    assert not (tmp_path / "runs").exists()


def test_train_and_evaluate_from_a_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = two_classes(tmp_path / "photos", n=8)
    write_csv(root / "labels.csv", "file,label\n" + folder_rows(root))
    monkeypatch.chdir(root)  # a relative CSV path is recorded absolute: evaluate finds it from anywhere
    run = cnnlab.train("cnn-compact", "labels.csv", image_size=16, epochs=1, runs_dir=tmp_path / "runs",
                       progress=False)  # fmt: skip
    assert run.classes == ("a", "b") and run.record.data.extra["csv"] == str((root / "labels.csv").resolve())
    monkeypatch.chdir(tmp_path)
    again = cnnlab.load_run(run.dir)
    ev = again.evaluate()  # re-reads the images the CSV lists: its test split is 20% of each class
    assert ev.n == 4 and ev.top1 == pytest.approx(run.result.test_acc)
