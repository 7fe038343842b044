"""Kernels, `cnnlab filter` and image decoding attacked as an outsider would (issue 15): no file access unless asked,
short escaped error messages, capped parameters and bounded work, hostile files, NaN images, no warnings, no -0."""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data.images import decode_image, open_image, read_image
from cnnlab.errors import UsageError
from cnnlab.kernels import (
    MAX_KERNEL_WORK,
    apply_kernel,
    check_work,
    kernel_work,
    parse_matrix,
    resolve_kernel,
    short,
)
from tests.conftest import main_error, run_cli

LONG_MATRIX = ";".join(",".join(["0.004444"] * 15) for _ in range(15))  # 15x15, 1,000+ characters


@pytest.fixture
def png(tmp_path: Path) -> Path:
    """A small RGB picture."""
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def one_error_line(args: list[str], capsys: pytest.CaptureFixture[str], code: int = 2) -> str:
    """Run `cnnlab ARGS` in-process: it must fail with `code` and exactly one `cnnlab: error:` line."""
    got, lines = main_error(args, capsys)
    assert got == code and len(lines) == 1 and lines[0].startswith("cnnlab: error: "), (got, lines)
    return lines[0]


# --- 1. no file access unless the caller allows it; short, escaped messages ------------------------------------------


def test_resolve_kernel_touches_no_file_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "k.txt").write_text("7\n")
    (tmp_path / "1").write_text("9\n")
    monkeypatch.chdir(tmp_path)
    touched: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        touched.append(repr(args[:1]))
        raise AssertionError("the file system was touched")

    specs = ["k.txt", str(tmp_path / "k.txt"), "~/k.txt", "../k.txt", "/etc/passwd", "a" * 300, "1" + ",1" * 200,
             "sharpen", "gaussian:5:1", "box:3", "1", "1/9 1/9;1/9 1/9", "x\x00y", LONG_MATRIX]  # fmt: skip
    with monkeypatch.context() as m:
        for name in ("stat", "is_file", "exists", "open", "read_text", "read_bytes"):
            m.setattr(Path, name, refuse)
        m.setattr(builtins, "open", refuse)
        m.setattr(os, "stat", refuse)
        for spec in specs:
            with contextlib.suppress(UsageError):
                resolve_kernel(spec)
    assert touched == []
    assert resolve_kernel("1").matrix.tolist() == [[1.0]], "text that names a file is still a matrix"
    with pytest.raises(UsageError, match="kernel files are not read here"):
        resolve_kernel("k.txt")
    assert resolve_kernel("k.txt", allow_files=True).matrix.tolist() == [[7.0]]


def test_errors_echo_a_short_escaped_prefix_only(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("x" * 45 + "TOP-SECRET\n" + "root:x:0:0\n" * 100)
    with pytest.raises(UsageError) as e:
        resolve_kernel(str(secret), allow_files=True)  # the CLI reads the user's own file, and still says little
    assert "TOP-SECRET" not in str(e.value) and len(str(e.value)) < 300
    for spec in ("q" * 10_000, "1,2;3" + ",4" * 5000, "\x1b[2J\n" * 100, "gaussian:" + "7" * 9000 + ":1"):
        with pytest.raises(UsageError) as e:
            resolve_kernel(spec)
        message = str(e.value)
        assert len(message) < 300 and "\x1b" not in message and "\n" not in message, message
    assert short("a\nb") == "'a\\nb'" and short("z" * 50, 10) == "'zzzzzzzzzz'... (50 characters)"


# --- 4. every kernel parameter capped, the work bounded --------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "needle"),
    [("gaussian:1001:1", "size must be 1..255"), ("gaussian:2001:1", "size must be 1..255"),
     ("gaussian:0:1", "size must be 1..255"), ("gaussian:5:0", "sigma must be 0.01..1000"),
     ("gaussian:5:-1", "sigma must be"), ("gaussian:5:1e-320", "sigma must be"), ("gaussian:5:1e400", "sigma must be"),
     ("gaussian:5:1e5e5", "expected gaussian:SIZE:SIGMA"), ("gaussian:5", "expected gaussian:SIZE:SIGMA"),
     ("gaussian:", "expected gaussian:SIZE:SIGMA"), ("gaussian:" + "9" * 5000 + ":1", "expected gaussian"),
     ("box:0", "size must be 1..255"), ("box:256", "size must be 1..255"), ("box:x", "expected box:SIZE")],
)  # fmt: skip
def test_kernel_parameters_are_capped_with_a_named_error(spec: str, needle: str) -> None:
    with pytest.raises(UsageError, match=re.escape(needle)):
        resolve_kernel(spec)


def test_the_largest_parameters_still_work() -> None:
    assert resolve_kernel("gaussian:255:1000").matrix.shape == (255, 255)
    assert resolve_kernel("gaussian:3:0.01").matrix[1, 1] == pytest.approx(1.0)
    assert resolve_kernel("box:255").matrix.shape == (255, 255)


def test_the_work_of_one_kernel_is_bounded() -> None:
    k = resolve_kernel("box:101")
    assert kernel_work((3, 600, 512), k) == 3 * 600 * 512 * 101 * 101
    assert kernel_work((1, 10, 10), k, "valid") == 0
    check_work((3, 600, 512), resolve_kernel("gaussian:101:10"))  # 2.8e9 multiply-adds: fine on the CLI
    with pytest.raises(UsageError, match="needs 6e\\+10 multiply-adds, over the limit of 2e\\+10"):
        check_work((3, 600, 512), resolve_kernel("gaussian:255:50"))
    with pytest.raises(UsageError, match="multiply-adds"):
        apply_kernel(torch.zeros(3, 600, 512), resolve_kernel("box:255"))  # refused before any work
    with pytest.raises(UsageError, match="over the limit of 1e\\+03"):
        apply_kernel(torch.zeros(1, 10, 10), resolve_kernel("sobel"), max_work=1000)  # 2 matrices: 1,800
    assert MAX_KERNEL_WORK == 2 * 10**10


@pytest.mark.parametrize(
    ("kernel", "needle"), [("gaussian:1001:1", "size must be 1..255"), ("gaussian:255:80", "512x600 image with 3")]
)
def test_filter_refuses_unbounded_work_quickly(kernel: str, needle: str, tmp_path: Path) -> None:
    # Before: gaussian:1001:1 on the sample photo ran for hours; gaussian:255:80 (6e10 multiply-adds) for a minute.
    out = run_cli("filter", "sample", "-k", kernel, cwd=tmp_path, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("cnnlab: error: kernel"), out.stderr
    assert needle in lines[0] and not list(tmp_path.iterdir())


# --- 8. hostile inline kernels and kernel files ----------------------------------------------------------------------


def test_a_long_valid_inline_matrix_works_in_filter(png: Path, tmp_path: Path) -> None:
    assert len(LONG_MATRIX) > 255
    assert resolve_kernel(LONG_MATRIX, allow_files=True).matrix.shape == (15, 15)
    out = run_cli("filter", str(png), "-k", LONG_MATRIX, "-o", str(tmp_path / "o.png"))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert Image.open(tmp_path / "o.png").size == (50, 40)


def test_a_long_invalid_inline_kernel_is_one_named_line(png: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(["filter", str(png), "-k", "1," * 400 + "x"], capsys)
    assert "not a matrix of numbers" in line and len(line) < 300
    line = one_error_line(["filter", str(png), "-k", "y" * 400], capsys)
    assert "unknown kernel" in line and len(line) < 300


def test_weights_that_overflow_are_a_named_error(png: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for chain in (["1e300"], ["1e39"], ["1e30", "1e30"], ["sobel", "1e37"]):
        args = ["filter", str(png), *(f"--kernel={k}" for k in chain), "--normalize"]
        assert "the result overflows float32" in one_error_line(args, capsys)  # was: NaN pixels and a numpy warning
    with pytest.raises(UsageError, match="overflows"):
        apply_kernel(torch.ones(1, 4, 4), resolve_kernel("1e39"))
    assert apply_kernel(torch.ones(1, 4, 4), resolve_kernel("1e30")).isfinite().all()


@pytest.mark.parametrize("bad", ["1;;2", "1,2;", ";1,2", "1,2;;3,4", "1\n\n2", "1; ;2"])
def test_an_empty_row_in_an_inline_kernel_is_refused(bad: str) -> None:
    with pytest.raises(UsageError, match="is empty"):
        parse_matrix(bad)
    with pytest.raises(UsageError, match="is empty"):
        resolve_kernel(bad)


def test_kernel_files_keep_blank_and_comment_lines(tmp_path: Path) -> None:
    path = tmp_path / "k.txt"
    path.write_text("# a kernel\n\n0 1\n\n# the second row\n2 3\n\n")
    assert resolve_kernel(str(path), allow_files=True).matrix.tolist() == [[0, 1], [2, 3]]


def test_a_deeply_nested_json_kernel_is_a_named_error(
    tmp_path: Path, png: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in one_error_line(["filter", str(png), "-k", str(deep)], capsys)
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({"kernel": [[[1, 2], [3, 4]]]}))
    assert "expected a non-empty 2-D matrix" in one_error_line(["filter", str(png), "-k", str(wide)], capsys)


def test_huge_exponents_do_not_hang() -> None:
    # fractions.Fraction('1e99999999') would build a 100-million-digit integer
    for text in ("1e99999999", "1e-99999999/1", "1/1e99999999"):
        try:
            m = parse_matrix(text)
            assert np.isfinite(m).all()
        except UsageError as e:
            assert "finite" in str(e) or "not a number" in str(e)


# --- 8. float TIFFs with NaN / inf, in filter and in predict's decoding ---------------------------------------------


def float_tiff(path: Path, value: float) -> Path:
    """A 'F' mode (32-bit float) TIFF with one special pixel."""
    a = np.full((12, 12), 0.5, dtype=np.float32)
    a[3, 4] = value
    Image.fromarray(a, mode="F").save(path)
    return path


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_float_images_are_a_named_error(
    value: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = float_tiff(tmp_path / "f.tif", value)
    line = one_error_line(["filter", str(path), "-k", "sharpen"], capsys)
    assert line == f"cnnlab: error: {path}: float image with NaN or infinite pixel values"
    with pytest.raises(UsageError, match="NaN or infinite"):
        open_image(path)  # what `predict` and the training folders decode with
    with pytest.raises(UsageError, match="NaN or infinite"):
        decode_image(io.BytesIO(path.read_bytes()), "upload")  # explore's uploads


def test_nan_float_image_in_predict(digit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = float_tiff(tmp_path / "nan.tif", np.nan)
    line = one_error_line(["predict", str(digit_run), str(path)], capsys)
    assert "NaN or infinite" in line


def test_float_images_beyond_16_bits_are_a_named_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = float_tiff(tmp_path / "huge.tif", 3e38)
    line = one_error_line(["filter", str(path), "-k", "sharpen"], capsys)
    assert "huge.tif: float image with values up to 3e+38" in line


def test_filter_success_prints_no_warnings(tmp_path: Path) -> None:
    path = float_tiff(tmp_path / "ok.tif", 0.75)  # Pillow hands out a read-only array: torch warned about it
    deep = tmp_path / "deep.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 65536, (9, 9)).astype(np.uint16)).save(deep)
    for image in (path, deep):
        out = run_cli("filter", str(image), "-k", "sharpen", "--side-by-side", "-o", str(tmp_path / "o.png"))
        assert out.returncode == 0 and out.stderr == "", out.stderr
    pixels, _ = read_image(path)
    assert pixels.flags.writeable


# --- 10. --explain never prints -0 ----------------------------------------------------------------------------------


def test_explain_prints_0_not_minus_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cnnlab.cli import main

    path = tmp_path / "lecture.png"
    Image.fromarray(np.array([[0, 0, 0], [0, 1, 1], [0, 1, 2]], dtype=np.uint8)).save(path)
    minus = "-1,-1,-1;-1,-1,-1;-1,-1,-1"
    assert main(["filter", str(path), f"--kernel={minus}", "--explain", "0,0"]) == 0
    assert main(["filter", str(path), "--kernel=-1", "--pool", "max", "--size", "1", "--explain", "1,0"]) == 0
    assert main(["filter", str(path), "--kernel=0,-1;0,0", "--kernel=-1", "--explain", "0,0", "--json"]) == 0
    out = capsys.readouterr().out
    assert "= -1" in out and "in[-1,-1] =        0 x       -1 =          0" in out
    minus_zero = re.compile(r"(?<![\w.])-0(?:\.0+)?(?![\d.])")  # -0 or -0.0, not -0.5
    assert not minus_zero.search(out), [line for line in out.splitlines() if minus_zero.search(line)]
