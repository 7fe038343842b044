"""On-disk dataset sources (IDX, CIFAR), where they are looked for, downloads and damaged files.

Every registered file source is tested from generated files in its real format, so adding one to FILE_SPECS
(and the registry) tests it automatically.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.data import list_sources, load_dataset
from cnnlab.data import sources as src
from cnnlab.data.formats import read_idx
from cnnlab.data.locate import dpkg_dirs
from cnnlab.data.sources import FILE_SPECS, IDX_FILES, FileSpec, source_info
from cnnlab.errors import CnnlabError, UsageError
from tests.conftest import run_cli, write_idx

FILE_SOURCES = [n for n in list_sources() if n in FILE_SPECS]


def make_files(spec: FileSpec, folder: Path, n_train: int = 50, n_test: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Write a small dataset in `spec`'s real file format into `folder`; return the training images and labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(spec.name))
    if spec.torchvision_class.startswith("CIFAR"):
        k = 10 if spec.name == "cifar10" else 100
        train = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
        test = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
        ytr, yte = np.arange(n_train) % k, np.arange(n_test) % k
        names = [f"class{i}".encode() for i in range(k)]

        def dump(name: str, obj: object) -> None:
            (folder / name).write_bytes(pickle.dumps(obj, protocol=2))

        if spec.name == "cifar10":
            for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
                dump(f"data_batch_{i}", {b"data": train[part].reshape(len(part), -1), b"labels": ytr[part].tolist()})
            dump("test_batch", {b"data": test.reshape(n_test, -1), b"labels": yte.tolist()})
            dump("batches.meta", {b"label_names": names})
        else:
            dump("train", {b"data": train.reshape(n_train, -1), b"fine_labels": ytr.tolist()})
            dump("test", {b"data": test.reshape(n_test, -1), b"fine_labels": yte.tolist()})
            dump("meta", {b"fine_label_names": names})
        return train, ytr
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    ytr = (np.arange(n_train) % 10).astype(np.uint8)
    # Training files gzip-compressed, test files plain: both forms are read.
    write_idx(folder / (IDX_FILES[0] + ".gz"), train)
    write_idx(folder / (IDX_FILES[1] + ".gz"), ytr)
    write_idx(folder / IDX_FILES[2], rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    write_idx(folder / IDX_FILES[3], (np.arange(n_test) % 10).astype(np.uint8))
    return train[:, None], ytr


def test_every_downloadable_source_has_a_file_spec() -> None:
    assert set(FILE_SOURCES) == {n for n in list_sources() if not source_info(n).offline}


@pytest.mark.parametrize("name", FILE_SOURCES)
def test_file_source_reads_its_real_format_into_uint8_tensors(name: str, tmp_path: Path) -> None:
    spec = FILE_SPECS[name]
    images, labels = make_files(spec, tmp_path / spec.subdirs[0])
    ds = load_dataset(name, data_dir=tmp_path, download=False)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert torch.equal(ds.train.images, torch.from_numpy(images)), "pixels land exactly, (N, C, H, W)"
    assert ds.train.labels.tolist() == labels.tolist()
    assert len(ds.test) == 20 and ds.test.images.shape[1:] == ds.train.images.shape[1:]
    assert len(ds.classes) == int(labels.max()) + 1 or len(ds.classes) in (10, 100)
    assert "(data_dir)" in ds.notes[0] and str(tmp_path) in ds.notes[0]


@pytest.mark.parametrize("name", FILE_SOURCES)
def test_file_source_found_in_torchvisions_own_layout_in_the_user_cache(name: str, tmp_path: Path) -> None:
    spec = FILE_SPECS[name]
    cache_data = Path(os.environ["CNNLAB_CACHE"]) / "data"
    target = cache_data / spec.subdirs[1]
    try:
        make_files(spec, target)
        ds = load_dataset(name, download=False)
        assert "user cache" in ds.notes[0] and len(ds.train) == 50
    finally:
        shutil.rmtree(cache_data, ignore_errors=True)


def test_search_order_data_dir_then_env_then_cache_then_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = FILE_SPECS["kmnist"]
    places = {k: tmp_path / k for k in ("arg", "env", "cache", "system")}
    make_files(spec, places["arg"] / "kmnist", n_train=11)
    make_files(spec, places["env"] / "kmnist", n_train=12)
    make_files(spec, places["cache"] / "data" / "kmnist", n_train=13)
    make_files(spec, places["system"], n_train=14)  # a package's folder holds the files directly
    monkeypatch.setenv("CNNLAB_DATA", str(places["env"]))
    monkeypatch.setenv("CNNLAB_CACHE", str(places["cache"]))
    monkeypatch.setitem(FILE_SPECS, "kmnist", FileSpec(**{**spec.__dict__, "system_dirs": (str(places["system"]),)}))
    seen = [len(load_dataset("kmnist", data_dir=places["arg"], download=False).train)]
    seen.append(len(load_dataset("kmnist", download=False).train))
    monkeypatch.delenv("CNNLAB_DATA")
    seen.append(len(load_dataset("kmnist", download=False).train))
    shutil.rmtree(places["cache"] / "data")
    ds = load_dataset("kmnist", download=False)
    seen.append(len(ds.train))
    assert seen == [11, 12, 13, 14]
    assert "(system)" in ds.notes[0]


def test_missing_dataset_offline_says_where_it_looked_and_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(src, "dpkg_dirs", lambda package: ())  # as on a machine without the Debian package
    spec = FILE_SPECS["fashion-mnist"]
    monkeypatch.setitem(FILE_SPECS, "fashion-mnist", FileSpec(**{**spec.__dict__, "system_dirs": ()}))
    with pytest.raises(CnnlabError) as e:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    msg, cli = str(e.value), e.value.cli_message()  # Python's words, and the command line's
    assert "\n" not in msg
    assert f"--data-dir {tmp_path}" in cli and "user cache" in msg and "downloading is off" in msg
    assert "train-images-idx3-ubyte" in msg and "pass --data-dir DIR" in cli and "pass data_dir='DIR'" in msg
    with pytest.raises(CnnlabError, match="apt install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)


def test_failed_download_is_one_line_with_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    class Offline:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            raise RuntimeError("Error downloading x.gz:\nTried https://a/, got:\n<urlopen error no network>\n")

    monkeypatch.setattr(torchvision.datasets, "KMNIST", Offline)
    with pytest.raises(CnnlabError) as e:
        load_dataset("kmnist", data_dir=tmp_path)
    assert "download failed (Error downloading x.gz: <urlopen error no network>)" in str(e.value)
    assert "\n" not in str(e.value)


def test_download_goes_through_torchvision_into_the_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls = []

    class FakeDownload:
        """Stands in for torchvision's KMNIST: writes the files where torchvision puts them (root/KMNIST/raw)."""

        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            print("Downloading ...")  # torchvision's chatter must not reach stdout
            make_files(FILE_SPECS["kmnist"], Path(root) / "KMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "KMNIST", FakeDownload)
    cache_data = Path(os.environ["CNNLAB_CACHE"]) / "data"
    try:
        ds = load_dataset("kmnist")
        assert [c[1:] for c in calls] == [(True, True), (False, True)]
        assert calls[0][0] == str(cache_data) and "downloaded" in ds.notes[0] and len(ds.train) == 50
    finally:
        shutil.rmtree(cache_data, ignore_errors=True)


def _idx_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "mnist"
    make_files(FILE_SPECS["mnist"], folder)
    return folder


@pytest.mark.parametrize(
    ("file", "content", "expected"),
    [
        # mtime=0 and explicit ids: pytest-xdist workers must collect the same test ids, and gzip's header
        # otherwise carries the second it was built in.
        (IDX_FILES[0] + ".gz", gzip.compress(b"\x00\x00\x08", mtime=0), "not an IDX file"),
        (IDX_FILES[1] + ".gz", gzip.compress(b"\x08\x01\x00\x00hello", mtime=0), "not an IDX file"),  # wrong magic
        (IDX_FILES[0] + ".gz", b"not gzip at all", "cannot read"),
    ],
    ids=["short-header", "wrong-magic", "not-gzip"],
)
def test_damaged_idx_files_name_the_file(
    tmp_path: Path, file: str, content: bytes, expected: str
) -> None:  # fmt: skip
    folder = _idx_dir(tmp_path)
    (folder / file).write_bytes(content)
    with pytest.raises(CnnlabError, match=expected) as e:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    assert file in str(e.value)


def test_idx_size_count_and_label_checks(tmp_path: Path) -> None:
    folder = _idx_dir(tmp_path)
    labels = folder / (IDX_FILES[1] + ".gz")
    write_idx(labels, np.zeros(49, dtype=np.uint8))
    with pytest.raises(CnnlabError, match="49 labels for 50 images"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    write_idx(labels, np.full(50, 10, dtype=np.uint8))
    with pytest.raises(CnnlabError, match=r"labels range 10..10, expected 0..9"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    cut = folder / IDX_FILES[2]
    cut.write_bytes(cut.read_bytes()[:-5])
    with pytest.raises(CnnlabError, match="IDX header says 20x28x28 values but the file has"):
        read_idx(cut)


def test_cifar_batches_never_run_pickled_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_files(FILE_SPECS["cifar10"], folder)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, ...]:
            return (open, (str(marker), "w"))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}, protocol=2))
    with pytest.raises(CnnlabError, match=r"data_batch_3: not a CIFAR python batch .*refusing to load .*open"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert not marker.exists()


def test_image_size_resizes_any_source(tmp_path: Path) -> None:
    make_files(FILE_SPECS["mnist"], tmp_path / "mnist")
    ds = load_dataset("mnist", data_dir=tmp_path, download=False, image_size=32)
    assert ds.train.images.shape[1:] == (1, 32, 32) and ds.test.images.shape[1:] == (1, 32, 32)
    assert ds.train.images.dtype == torch.uint8 and "resized from 28x28 to 32x32" in ds.notes[-1]


def test_bad_policy_and_size_are_usage_errors() -> None:
    # The library names its keyword; the command line (cli_message) the flag.
    with pytest.raises(UsageError, match=r"^on_bad_image: expected one of") as e:
        load_dataset("mnist-mini", on_bad_image="ignore")
    assert e.value.cli_message().startswith("--on-bad-image: expected one of")
    with pytest.raises(UsageError, match=r"^image_size must be at least 1") as e:
        load_dataset("mnist-mini", image_size=0)
    assert e.value.cli_message().startswith("--image-size must be at least 1")


def test_cli_missing_dataset_is_one_line_and_leaves_no_run(tmp_path: Path) -> None:
    r = run_cli("train", "--data", "mnist", "--data-dir", str(tmp_path), "--no-download", "--runs-dir",
                str(tmp_path / "runs"), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("cnnlab: error: mnist: files not found")
    assert not (tmp_path / "runs").exists()


FASHION_DIRS = dpkg_dirs("dataset-fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(
    not FASHION_DIRS and not os.environ.get("CNNLAB_REQUIRE_FASHION_MNIST"),
    reason="the Debian package dataset-fashion-mnist is not installed (CI installs it, CNNLAB_REQUIRE_FASHION_MNIST=1)",
)
def test_real_fashion_mnist_from_the_debian_package_trains_one_epoch(tmp_path: Path) -> None:
    ds = load_dataset("fashion-mnist", download=False)
    assert len(ds.train) == 60_000 and len(ds.test) == 10_000 and ds.classes[9] == "Ankle boot"
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    r = run_cli("train", "--data", "fashion-mnist", "--no-download", "--epochs", "1", "--json", "--runs-dir",
                str(tmp_path / "runs"), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "(system)" in r.stderr
    result = json.loads(r.stdout)
    assert result["test_acc"] > 0.75, result  # one epoch of LeNet-5 on Fashion-MNIST: about 80-85%


def test_system_location_comes_from_dpkg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "dpkg"
    listed = tmp_path / "share" / "fashion"
    make_files(FILE_SPECS["fashion-mnist"], listed)
    files = "\n".join(str(p) for p in sorted(listed.iterdir()))
    fake.write_text(
        f"#!/bin/sh\n[ \"$2\" = dataset-fashion-mnist ] && printf '%s\\n' /. {listed} '{files}' && exit 0\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    dpkg_dirs.cache_clear()
    try:
        assert dpkg_dirs("dataset-fashion-mnist") == (listed,)
        assert dpkg_dirs("no-such-package") == ()
        assert FILE_SPECS["fashion-mnist"].system_roots()[0] == listed
    finally:
        dpkg_dirs.cache_clear()
