"""`cnnlab kernels`, `filter` and `shape` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.cli import main
from cnnlab.kernels import list_kernels
from tests.conftest import main_error, run_cli


@pytest.fixture
def lecture_png(tmp_path: Path) -> Path:
    """The 3x3 neighbourhood of the lecture's worked example."""
    path = tmp_path / "lecture.png"
    Image.fromarray(np.array([[0, 0, 0], [0, 1, 1], [0, 1, 2]], dtype=np.uint8)).save(path)
    return path


def test_kernels_lists_every_named_kernel_with_its_matrix() -> None:
    out = run_cli("kernels", "--json")
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert [k["name"] for k in doc] == list_kernels()
    sharpen8 = next(k for k in doc if k["name"] == "sharpen8")
    assert sharpen8["matrices"] == [[[-1, -1, -1], [-1, 9, -1], [-1, -1, -1]]]


def test_filter_sample_side_by_side(tmp_path: Path) -> None:
    out = run_cli("filter", "sample", "--kernel", "sharpen8", "--side-by-side", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "wrote sample_sharpen8.png" in out.stdout and "wrote sample_sharpen8-side-by-side.png" in out.stdout
    assert Image.open(tmp_path / "sample_sharpen8.png").size == (512, 600)
    assert Image.open(tmp_path / "sample_sharpen8-side-by-side.png").width > 900


def test_filter_explain_reproduces_the_lecture(lecture_png: Path) -> None:
    out = run_cli("filter", str(lecture_png), "--kernel", "4,0,0;0,0,0;0,0,-4", "--explain", "1,1", "--json")
    assert out.returncode == 0, out.stderr
    (e,) = json.loads(out.stdout)["explain"]
    assert e["sum"] == -8 and e["window"] == [[0, 0, 0], [0, 1, 1], [0, 1, 2]]
    assert not list(lecture_png.parent.glob("lecture_*")), "--explain alone writes no image"


def test_shape_prints_the_lecture_arithmetic() -> None:
    out = run_cli("shape", "--input", "3x32x32", "--conv", "6,5")
    assert out.returncode == 0
    assert "28x28x6" in out.stdout and "= 456" in out.stdout
    out = run_cli(
        "shape",
        "--input",
        "1x32x32",
        "--layers",
        "conv 6 5; pool max 2; conv 16 5; pool max 2; fc 120; fc 84; fc 10",
        "--json",
    )
    doc = json.loads(out.stdout)
    assert [layer["out_shape"] for layer in doc["layers"]][-1] == [10] and doc["params"] == 61706


def test_shape_walks_a_registered_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shape", "--model", "lenet5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    params = {row["name"]: row["params"] for row in doc["layers"] if row["params"]}
    assert params == {"c1": 156, "s2": 12, "c3": 1516, "s4": 32, "c5": 48120, "f6": 10164}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["filter", "{dir}/missing.png", "-k", "sharpen"], "missing.png: no such file"),
        (["filter", "{dir}/text.png", "-k", "sharpen"], "text.png: not an image"),
        (["filter", "{png}", "-k", "sharpn"], "unknown kernel 'sharpn'; did you mean 'sharpen'"),
        (["filter", "{png}", "-k", "1,2;3"], "rows have different lengths"),
        (["filter", "{png}", "-k", "{dir}/nope.npy"], "no such kernel file"),
        (["filter", "{png}"], "give at least one --kernel"),
        (["filter", "{png}", "-k", "sharpen", "--explain", "1"], "--explain '1': expected X,Y"),
        (["filter", "{png}", "-k", "sharpen", "--explain", "5,0"], "outside the 3x3 output"),
        (["filter", "{png}", "-k", "box:9", "--padding", "valid"], "does not fit a 3x3 image"),
        (["filter", "{png}", "-k", "sharpen", "--out", "{dir}/no/dir/x.png"], "does not exist"),
        (["filter", "{png}", "-k", "sharpen", "--out", "{dir}/x.doc"], "unknown image extension"),
        (["filter", "{png}", "--pool", "max", "--size", "4"], "does not fit a 3x3 image"),
        (["shape", "--conv", "6,5"], "--input is required"),
        (["shape", "--input", "3x32", "--conv", "6"], "--conv '6'"),
        (["shape", "--input", "3xAx32", "--conv", "6,5"], "--input '3xAx32'"),
        (["shape", "--input", "1x4x4", "--conv", "6,5"], "layer 1 (conv 6 5): output would be 0x0"),
        (["shape", "--input", "3x8x8", "--layers", "conv 4 3 g=2"], "groups=2 must divide"),
        (["shape", "--input", "3x8x8", "--layers", "pool max 2 p=same"], "even window"),
        (["shape", "--model", "resnet9000"], "unknown model 'resnet9000'"),
        (["shape", "--input", "1x8x8"], "one of the arguments"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], needle: str, lecture_png: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (lecture_png.parent / "text.png").write_text("not an image")
    args = [a.replace("{png}", str(lecture_png)).replace("{dir}", str(lecture_png.parent)) for a in args]
    code, lines = main_error(args, capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("cnnlab: error: ") and needle in lines[0], lines


def test_a_text_matrix_is_an_image_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "lecture.txt").write_text("0 0 0\n0 1 1\n0 1 2\n")
    assert main(["filter", str(tmp_path / "lecture.txt"), "-k", "4,0,0;0,0,0;0,0,-4", "--explain", "1,1"]) == 0
    out = capsys.readouterr().out
    assert "in[2,2] =        2 x       -4 =         -8" in out and "sum = -8" in out
