"""The per-user cache: a newer decode replaces the older one, `cnnlab cache` lists sizes and clears."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cnnlab.cli import main
from cnnlab.data import load_dataset
from cnnlab.data.cache import decode_dir, entries
from tests.test_folders import two_classes


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def listed(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["cache", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_changed_folder_replaces_its_cache_and_other_sizes_stay(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = two_classes(tmp_path / "photos", n=4)
    load_dataset(str(root), image_size=8)
    [first] = listed(capsys)["entries"]
    assert first["source"] == f"image folder {root.resolve()}" and first["image_size"] == 8 and first["images"] == 8
    older = decode_dir() / "old-format.safetensors"
    save_file({"x": torch.zeros(1)}, older, metadata={"source": "gone", "size": "8", "version": "0"})
    os.utime(root / "a" / "0.png", ns=(1, 1))  # the folder changed: its cache key changes
    notes = load_dataset(str(root), image_size=8).notes
    assert any("removed 2 outdated decode cache file(s)" in n for n in notes), notes
    load_dataset(str(root), image_size=12)  # another size is another cache, kept beside it
    assert sorted(e.image_size for e in entries()) == [8, 12] and not older.exists()


def test_cache_lists_and_clears_decoded_images_and_downloads_on_request(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cache"]) == 0 and "empty" in capsys.readouterr().out
    load_dataset(str(two_classes(tmp_path / "photos", n=3)), image_size=8)
    (cache / "data" / "mnist").mkdir(parents=True)
    (cache / "data" / "mnist" / "train-images-idx3-ubyte").write_bytes(b"\0" * 5000)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "decoded" in out and "image folder" in out and "download" in out and "4.9 KiB" in out
    assert listed(capsys, "--clear") == {"cache": str(cache), "removed": 1, "freed_bytes": pytest.approx(1, abs=1e6)}
    assert [e["kind"] for e in listed(capsys)["entries"]] == ["download"], "downloads stay unless asked"
    assert listed(capsys, "--clear", "--downloads")["removed"] == 1 and listed(capsys)["entries"] == []
    assert main(["cache", "--downloads"]) == 2 and "only goes with --clear" in capsys.readouterr().err
