"""Kernels: every named kernel x every padding mode against a direct NumPy reference; explain; image files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data.images import array_to_image, read_image, save_image
from cnnlab.errors import CnnlabError, UsageError
from cnnlab.filtering import run_filter
from cnnlab.kernels import (
    PADDINGS,
    apply_kernel,
    correlate,
    explain_pixel,
    format_explanation,
    list_kernels,
    parse_matrix,
    pool,
    resolve_kernel,
    to_display_range,
)

_NP_MODE = {"zero": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def reference(image: np.ndarray, k: np.ndarray, padding: str) -> np.ndarray:
    """out[c, y, x] = sum_ij pad(image)[c, y + i, x + j] * k[i, j], in float64 with explicit loops over (i, j)."""
    kh, kw = k.shape
    if padding == "valid":
        p = image
    else:
        top, left = (kh - 1) // 2, (kw - 1) // 2
        p = np.pad(image, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left)), mode=_NP_MODE[padding])
    h, w = p.shape[1] - kh + 1, p.shape[2] - kw + 1
    out = np.zeros((image.shape[0], h, w))
    for i in range(kh):
        for j in range(kw):
            out += k[i, j] * p[:, i : i + h, j : j + w]
    return out


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("name", list_kernels())
def test_every_named_kernel_matches_the_numpy_reference(name: str, padding: str) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 23, 31)).astype(np.float32)
    kernel = resolve_kernel(name)
    got = apply_kernel(torch.from_numpy(image), kernel, padding).double().numpy()
    refs = [reference(image.astype(np.float64), m, padding) for m in kernel.matrices]
    want = refs[0] if len(refs) == 1 else np.sqrt(sum(r * r for r in refs))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("name", list_kernels())
def test_opencvs_filter_and_torchs_conv_give_the_same_output(name: str, padding: str) -> None:
    from cnnlab.kernels import _opencv_correlate

    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.integers(0, 256, (3, 40, 52)).astype(np.float32))
    for m in resolve_kernel(name).matrices:
        k = torch.from_numpy(np.asarray(m, dtype=np.float32))
        fast = _opencv_correlate(image, k, padding)
        odd_small = k.shape[0] % 2 == 1 and k.shape[1] % 2 == 1 and max(k.shape) <= 9
        assert (fast is not None) == (odd_small and padding != "circular"), "OpenCV takes what it computes exactly"
        if fast is not None:  # torch's conv2d in float64, the other path
            slow = correlate(image.double(), k.double(), padding).float()
            assert fast.shape == slow.shape
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("padding", PADDINGS)
def test_identity_is_bit_exact(padding: str) -> None:
    image = torch.randint(0, 65536, (3, 17, 19)).float()
    out = apply_kernel(image, resolve_kernel("identity"), padding)
    assert torch.equal(out, image if padding != "valid" else image[:, 1:-1, 1:-1])


def test_correlation_is_what_nn_conv2d_computes_and_convolve_flips() -> None:
    image = torch.rand(1, 12, 14)
    k = np.array([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0], [4.0, 0.0, -2.0]])
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    conv.weight.data = torch.tensor(k, dtype=torch.float32)[None, None]
    torch.testing.assert_close(correlate(image, k, "zero"), conv(image[None])[0].detach())
    torch.testing.assert_close(correlate(image, k, "zero", convolve=True), correlate(image, k[::-1, ::-1].copy()))


def test_even_kernels_put_the_extra_padding_right_and_bottom() -> None:
    image = np.arange(30, dtype=np.float32).reshape(1, 5, 6)
    k = np.array([[1.0, 2.0], [3.0, 4.0]])
    got = correlate(torch.from_numpy(image), k, "zero").numpy()
    np.testing.assert_allclose(got, reference(image.astype(np.float64), k, "zero"))
    assert got.shape == (1, 5, 6)


def test_the_lecture_example_sums_nine_products_to_minus_8() -> None:
    image = torch.tensor([[[0.0, 0, 0], [0, 1, 1], [0, 1, 2]]])
    (e,) = explain_pixel(image, parse_matrix("4,0,0;0,0,0;0,0,-4"), 1, 1)
    assert e.total == -8.0 and e.products.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, -8]]
    text = format_explanation(e, "gray", "zero", False)
    assert text.count(" x ") == 9 and text.rstrip().endswith("sum = -8")
    assert "in[2,2] =        2 x       -4 =         -8" in text


def test_explain_marks_padding_and_agrees_with_the_filtered_value() -> None:
    image = torch.rand(3, 9, 8) * 255
    kernel = resolve_kernel("sobel-x")
    out = apply_kernel(image, kernel, "reflect")
    for x, y in ((0, 0), (7, 8), (3, 4)):
        for e in explain_pixel(image, kernel.matrix, x, y, "reflect"):
            assert e.total == pytest.approx(float(out[e.channel, y, x]), abs=1e-3)
    (corner,) = explain_pixel(image[:1], kernel.matrix, 0, 0, "zero")
    assert corner.padded[0].all() and corner.padded[:, 0].all() and not corner.padded[1:, 1:].any()
    with pytest.raises(UsageError, match="outside the 8x9 output"):
        explain_pixel(image, kernel.matrix, 8, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0,-1,0;-1,5,-1;0,-1,0", [[0, -1, 0], [-1, 5, -1], [0, -1, 0]]), ("1/9 1/9; 1/9 1/9", [[1 / 9] * 2] * 2),
     ("1,2,3,4", [[1, 2, 3, 4]]), ("2.5", [[2.5]])],
)  # fmt: skip
def test_inline_matrices(text: str, expected: list[list[float]]) -> None:
    np.testing.assert_allclose(parse_matrix(text), expected)


@pytest.mark.parametrize("bad", ["1,2;3", "1,x;3,4", "", "1,inf", "1/0"])
def test_malformed_inline_matrices_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_matrix(bad)


def test_kernel_files(tmp_path: Path) -> None:
    k = [[0.0, 1.0], [2.0, 3.0]]
    (tmp_path / "k.txt").write_text("# my kernel\n0 1\n2 3\n")
    (tmp_path / "k.json").write_text(json.dumps({"kernel": k}))
    np.save(tmp_path / "k.npy", np.array(k))
    for name in ("k.txt", "k.json", "k.npy"):
        np.testing.assert_array_equal(resolve_kernel(str(tmp_path / name), allow_files=True).matrix, k)
    np.save(tmp_path / "obj.npy", np.array([object()]), allow_pickle=True)
    with pytest.raises(UsageError, match="cannot read kernel file"):
        resolve_kernel(str(tmp_path / "obj.npy"), allow_files=True)
    with pytest.raises(UsageError, match="no such kernel file"):
        resolve_kernel(str(tmp_path / "missing.json"), allow_files=True)


def test_parametrised_kernels() -> None:
    g = resolve_kernel("gaussian:7:2.0").matrix
    assert g.shape == (7, 7) and g.sum() == pytest.approx(1.0) and g[3, 3] == g.max()
    assert resolve_kernel("box:4").matrix.sum() == pytest.approx(1.0)
    with pytest.raises(UsageError, match="unknown kernel 'sharpn'; did you mean 'sharpen'"):
        resolve_kernel("sharpn")


def test_pooling_matches_torch() -> None:
    image = torch.rand(3, 10, 12)
    torch.testing.assert_close(pool(image, "max", 2), torch.nn.MaxPool2d(2)(image[None])[0])
    torch.testing.assert_close(pool(image, "avg", 3, 2), torch.nn.AvgPool2d(3, 2)(image[None])[0])
    with pytest.raises(UsageError):
        pool(image, "max", 20)


def test_display_ranges() -> None:
    x = torch.tensor([[[-20.0, 100.0, 300.0]]])
    assert to_display_range(x, 255, "clip").tolist() == [[[0.0, 100.0, 255.0]]]
    assert to_display_range(x, 255, "abs").tolist() == [[[20.0, 100.0, 255.0]]]
    assert to_display_range(x, 255, "normalize").tolist() == [[[0.0, 120 / 320 * 255, 255.0]]]


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif", ".webp"])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_image_formats_and_modes_read_and_filter(tmp_path: Path, ext: str, mode: str) -> None:
    if (ext in (".jpg", ".bmp") and mode == "RGBA") or (ext == ".jpg" and mode == "P"):
        pytest.skip(f"{ext} cannot store mode {mode}")
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
    path = tmp_path / f"in{ext}"
    img.save(path)
    pixels, max_value = read_image(path)
    gray = mode == "L" and ext != ".webp"  # WebP has no grayscale mode: Pillow reads it back as RGB
    assert max_value == 255 and pixels.shape == ((1 if gray else 3), 20, 30)
    report = run_filter(str(path), ["box-blur"], out=str(tmp_path / "out.png"))
    assert Image.open(report.output).size == (30, 20)


def test_16_bit_grayscale_stays_16_bit(tmp_path: Path) -> None:
    data = np.random.default_rng(2).integers(0, 65536, (16, 18)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(data).save(path)
    pixels, max_value = read_image(path)
    assert max_value == 65535 and pixels.max() > 255
    np.testing.assert_array_equal(pixels[0], data)
    report = run_filter(str(path), ["identity"], out=str(tmp_path / "same.png"))
    back = np.asarray(Image.open(report.output))
    np.testing.assert_array_equal(back, data)
    assert report.bits == 16


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("L", (40, 20), 0)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    pixels, _ = read_image(path)
    assert pixels.shape == (1, 40, 20)


def test_bad_image_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:300])
    for name in ("empty.png", "text.png"):
        with pytest.raises(UsageError, match="not an image"):
            read_image(tmp_path / name)
    with pytest.raises(CnnlabError, match="damaged or truncated"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(UsageError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(UsageError, match="is a directory"):
        read_image(tmp_path)


def test_decompression_bombs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cnnlab.data.images as images

    path = tmp_path / "big.png"
    Image.new("L", (200, 200)).save(path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(CnnlabError, match="decompression bomb"):
        read_image(path)


def test_saving_refuses_unknown_extensions(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown image extension"):
        save_image(array_to_image(np.zeros((1, 2, 2)), 255), tmp_path / "x.xyz")


def test_chain_and_side_by_side(tmp_path: Path) -> None:
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (24, 32), dtype=np.uint8)).save(path)
    report = run_filter(
        str(path), ["gaussian", "sharpen"], out=str(tmp_path / "o.png"), side_by_side=True, pool_kind="max", pool_size=2
    )
    assert report.out_shape == (1, 12, 16) and len(report.steps) == 3
    pixels, _ = read_image(path)
    chained = pool(
        apply_kernel(apply_kernel(torch.from_numpy(pixels), resolve_kernel("gaussian")), resolve_kernel("sharpen")),
        "max",
        2,
    )
    saved = np.asarray(Image.open(report.output), dtype=np.float64)
    np.testing.assert_allclose(saved, np.rint(chained.clamp(0, 255).numpy()[0]), atol=0)
    side = Image.open(report.side_by_side)
    assert side.width > side.height > 100
