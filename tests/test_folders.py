"""Image folders: every image mode, the train/val/test layouts, bad files under both policies, the decode cache."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data import load_dataset
from cnnlab.data.folders import load_image_folder
from cnnlab.errors import CnnlabError, UsageError
from tests.conftest import run_cli


def save(img: Image.Image, path: Path, **kw: object) -> Path:
    """Save an image, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def rgb(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A random RGB image of (width, height)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def two_classes(root: Path, n: int = 5) -> Path:
    """root/a and root/b with n RGB PNGs each."""
    for c, name in enumerate("ab"):
        for i in range(n):
            save(rgb(10 * c + i), root / name / f"{i}.png")
    return root


def every_mode(root: Path) -> dict[str, Path]:
    """One image per mode the loader must handle, in class folder root/modes (plus root/other)."""
    d = root / "modes"
    gray16 = Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))
    pal = Image.new("P", (20, 20))
    pal.putpalette([255, 0, 0] * 256)
    pal.info["transparency"] = 0
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))  # pure red in CMYK
    files = {
        "L": save(Image.new("L", (20, 20), 200), d / "l.png"),
        "1": save(Image.new("1", (20, 20), 1), d / "bilevel.png"),
        "LA": save(Image.new("LA", (20, 20), (100, 50)), d / "la.png"),
        "RGB": save(rgb(1, (50, 20)), d / "rgb.jpg"),
        "RGBA": save(Image.new("RGBA", (20, 20), (0, 0, 255, 0)), d / "rgba.png"),
        "P": save(pal, d / "palette.png"),
        "I;16": save(gray16, d / "gray16.png"),
        "CMYK": save(cmyk, d / "cmyk.jpg"),
        "webp": save(rgb(2), d / "photo.webp"),
        "gif": save(rgb(3).convert("P"), d / "anim.gif"),
        "bmp": save(rgb(4), d / "pic.bmp"),
        "tiff": save(rgb(5), d / "pic.tiff"),
    }
    save(rgb(6), root / "other" / "x.png")
    return files


def test_every_image_mode_loads_as_rgb_of_the_requested_size(tmp_path: Path) -> None:
    files = every_mode(tmp_path / "data")
    ds = load_image_folder(tmp_path / "data", image_size=16)
    n = len(files) + 1
    assert len(ds.train) + len(ds.test) == n and ds.classes == ("modes", "other")
    images = torch.cat([ds.train.final(), ds.test.final()])
    assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.uint8
    # A 16-bit white image is white at 8 bits (scaled by 255/65535, not clipped).
    single = load_image_folder(_only(tmp_path / "g16", files["I;16"]), image_size=8)
    everything = torch.cat([single.train.final(), single.test.final()])
    assert int(everything[torch.cat([single.train.labels, single.test.labels]) == 0].min()) == 255


def _only(root: Path, image: Path) -> Path:
    """A two-class folder with `image` in class x and a black PNG in class y."""
    (root / "x").mkdir(parents=True)
    (root / "x" / image.name).write_bytes(image.read_bytes())
    save(Image.new("L", (8, 8), 0), root / "y" / "black.png")
    return root


def test_grayscale_only_folder_is_one_channel(tmp_path: Path) -> None:
    for c in "ab":
        for i in range(3):
            save(Image.new("L", (30, 20), 40 * i), tmp_path / c / f"{i}.png")
    save(Image.fromarray(np.zeros((9, 9), dtype=np.uint16)), tmp_path / "a" / "deep.png")
    ds = load_image_folder(tmp_path, image_size=12)
    assert ds.channels == 1 and ds.image_size == 12


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high, left half white; EXIF orientation 6 says "rotate 90 degrees clockwise to view",
    # so the viewed image is 20 wide x 40 high with the white half on top.
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    save(Image.fromarray(arr), tmp_path / "a" / "rot.jpg", exif=exif, quality=95)
    save(Image.new("L", (8, 8)), tmp_path / "b" / "x.png")
    ds = load_dataset(str(tmp_path / "a" / ".."), image_size=20, resize="squash")
    img = torch.cat([ds.train.final(), ds.test.final()])[torch.cat([ds.train.labels, ds.test.labels]) == 0][0, 0]
    assert img[:8].float().mean() > 200 and img[-8:].float().mean() < 50, "white on top after orientation"


def test_evaluation_takes_the_centre_of_the_shorter_side_and_the_cache_keeps_the_whole_photo(tmp_path: Path) -> None:
    arr = np.zeros((60, 180), dtype=np.uint8)  # 180 wide, 60 high: three 60x60 blocks, the middle one white
    arr[:, 60:120] = 255
    save(Image.fromarray(arr), tmp_path / "a" / "wide.png")
    save(Image.new("L", (8, 8)), tmp_path / "b" / "x.png")
    ds = load_image_folder(tmp_path, image_size=30)
    every = torch.cat([ds.train.labels, ds.test.labels]) == 0
    img = torch.cat([ds.train.final(), ds.test.final()])[every][0, 0]
    assert img.shape == (30, 30) and int(img.min()) >= 250, "the centre of the shorter side is the white block"
    stored = torch.cat([ds.train.stored(torch.arange(len(ds.train))), ds.test.stored(torch.arange(len(ds.test)))])
    boxes = torch.cat([ds.train.boxes, ds.test.boxes])[every][0].tolist()
    assert boxes == [13, 40] and stored.shape[2:] == (40, 40), "the whole photo, 3:1, on a canvas of 4/3 x 30"
    canvas = stored[every][0, 0]
    assert int(canvas[:13, :12].max()) < 30 and int(canvas[:13, 15:25].min()) > 225 and int(canvas[13:].max()) == 0


def test_flat_folder_gets_a_fixed_stratified_test_split_and_class_names_in_config(tmp_path: Path) -> None:
    two_classes(tmp_path / "pets", n=10)
    a, b = load_image_folder(tmp_path / "pets"), load_image_folder(tmp_path / "pets", data_cache="none")
    assert torch.bincount(a.test.labels).tolist() == [2, 2] and len(a.train) == 16
    assert torch.equal(a.test.final(), b.test.final()) and a.classes == ("a", "b") and a.val is None
    assert a.name == "pets" and a.image_size == 64 and a.default_augment == ("flip",)


def test_train_val_test_layout_is_honoured(tmp_path: Path) -> None:
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        two_classes(tmp_path / split, n)
    ds = load_image_folder(tmp_path, image_size=8)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 4, 6)
    only_val = tmp_path / "tv"
    two_classes(only_val / "train", 4)
    two_classes(only_val / "val", 2)
    ds = load_image_folder(only_val, image_size=8)
    assert ds.val is None and len(ds.test) == 4 and any("val/ is used as the test split" in n for n in ds.notes)


def test_training_uses_a_given_val_folder_for_validation(tmp_path: Path) -> None:
    from cnnlab.engine.trainer import TrainConfig, fit

    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        two_classes(tmp_path / "data" / split, n)
    cfg = TrainConfig(model="cnn-compact", data=str(tmp_path / "data"), image_size=16, epochs=1, batch_size=4)
    result = fit(cfg, runs_dir=tmp_path / "runs")
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["data"]["val_size"] == 4 and config["data"]["train_size"] == 12
    assert config["data"]["validation"] == "given by the source" and config["data"]["classes"] == ["a", "b"]
    assert config["data"]["folder"] == str((tmp_path / "data").resolve())


def _bomb(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("1", (9500, 9500)).save(path)  # 90 million pixels: just above Pillow's limit, tiny as a PNG


def _truncated(path: Path) -> None:
    buf = io.BytesIO()
    rgb(9, (64, 64)).save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


BAD_FILES = {
    "corrupt.jpg": (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300)), "damaged|not an image"),
    "truncated.jpg": (_truncated, "damaged or truncated"),
    "empty.png": (lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)"),
    "notes.txt": (lambda p: p.write_text("not a picture"), "not an image"),
    "bomb.png": (_bomb, "decompression bomb"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_an_error_naming_it_or_skipped_and_listed(name: str, tmp_path: Path) -> None:
    make, reason = BAD_FILES[name]
    root = two_classes(tmp_path / "data", n=5)
    bad = root / "a" / name
    make(bad)
    with pytest.raises(CnnlabError, match=reason) as e:
        load_image_folder(root, image_size=8)
    assert str(e.value).startswith(str(bad)) and "on_bad_image='skip'" in str(e.value) and "\n" not in str(e.value)
    assert "--on-bad-image skip" in e.value.cli_message()  # the command line names its flag
    ds = load_image_folder(root, image_size=8, on_bad_image="skip")  # from the cache this time: same verdict
    assert len(ds.train) + len(ds.test) == 10
    assert ds.extra["skipped"][0]["path"] == str(bad)
    assert any(n.startswith("skipped 1 bad image(s)") and str(bad) in n for n in ds.notes)


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({"a": 2, "b": 0}, "empty class folder"),
        ({"a": 3}, "only the class 'a'"),
        ({}, "no class sub-folders"),
    ],
)
def test_unusable_folder_layouts_are_usage_errors(layout: dict[str, int], expected: str, tmp_path: Path) -> None:
    for cls, n in layout.items():
        (tmp_path / cls).mkdir()
        for i in range(n):
            save(rgb(i), tmp_path / cls / f"{i}.png")
    with pytest.raises(UsageError, match=expected):
        load_image_folder(tmp_path)


def test_missing_path_and_file_and_stray_test_class(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such folder"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a folder"):
        load_dataset(str(tmp_path / "f.png"))
    two_classes(tmp_path / "d" / "train")
    two_classes(tmp_path / "d" / "test")
    save(rgb(0), tmp_path / "d" / "test" / "zebra" / "z.png")
    with pytest.raises(UsageError, match="zebra not in"):
        load_dataset(str(tmp_path / "d"))


def test_all_images_of_a_class_skipped_is_an_error(tmp_path: Path) -> None:
    root = two_classes(tmp_path, n=2)
    for p in (root / "b").iterdir():
        p.write_bytes(b"broken")
    with pytest.raises(CnnlabError, match="class\\(es\\) b have no usable images"):
        load_image_folder(root, on_bad_image="skip")


def test_decode_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path: Path) -> None:
    root = two_classes(tmp_path / "data")
    first = load_image_folder(root, image_size=8)
    second = load_image_folder(root, image_size=8)
    assert any("read from the cache" in n for n in second.notes)
    assert torch.equal(first.train.final(), second.train.final())
    save(Image.new("RGB", (40, 30), (255, 255, 255)), root / "a" / "0.png")  # same name, new content
    os.utime(root / "a" / "0.png", ns=(1, 1))  # and a different mtime even on coarse-clock filesystems
    third = load_image_folder(root, image_size=8)
    assert not any("read from the cache" in n for n in third.notes)
    assert not torch.equal(torch.cat([first.train.final(), first.test.final()]),
                           torch.cat([third.train.final(), third.test.final()]))  # fmt: skip


def test_unwritable_cache_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("CNNLAB_CACHE", str(blocker))
    ds = load_image_folder(two_classes(tmp_path / "data"), image_size=8)
    assert len(ds.train) == 8 and any("could not write the decode cache" in n for n in ds.notes)


def test_cli_trains_on_a_folder_and_a_bad_file_fails_in_one_line(tmp_path: Path) -> None:
    root = two_classes(tmp_path / "photos", n=10)
    r = run_cli("train", "--data", str(root), "--model", "cnn-compact", "--image-size", "16", "--epochs", "1",
                "--runs-dir", str(tmp_path / "runs"), "--json", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    run = Path(json.loads(r.stdout)["run_dir"])
    assert run.name.endswith("_cnn-compact_photos")
    assert json.loads((run / "config.json").read_text())["data"]["classes"] == ["a", "b"]
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    r = run_cli("train", "--data", str(root), "--image-size", "16", "--runs-dir", str(tmp_path / "runs2"), cwd=tmp_path)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "broken.jpg" in r.stderr and not (tmp_path / "runs2").exists()


def test_heic_photos_load_with_the_extra_and_name_it_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")  # in the dev extra, so CI runs this
    pillow_heif.register_heif_opener()
    root = two_classes(tmp_path / "photos", n=3)
    photo = rgb(7, (40, 30))
    photo.save(root / "a" / "phone.HEIC", quality=95)  # what an iPhone writes; the suffix's case varies
    (root / "a" / "phone.HEIC").rename(root / "a" / "renamed.jpg")  # found by its bytes, not its name
    ds = load_image_folder(root, image_size=8, data_cache="none")
    assert len(ds.train) + len(ds.test) == 7
    monkeypatch.setitem(__import__("sys").modules, "pillow_heif", None)  # as without the extra
    with pytest.raises(CnnlabError, match=r"renamed.jpg: a HEIC/HEIF photo; reading it needs the heic extra: pip ins"):
        load_image_folder(root, image_size=8, data_cache="none")
