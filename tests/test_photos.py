"""Photos of any number and shape: the decode cache on disk, the resize policies, and the automatic choice of path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import cnnlab.data.folders as folders
from cnnlab.data import BatchLoader, Normalization
from cnnlab.data.folders import DATA_CACHE_MODES, load_image_folder, model_input
from cnnlab.data.images import open_image
from cnnlab.data.pipeline import channel_stats
from cnnlab.data.resize import (
    CROP_RATIO,
    CROP_SCALE,
    EVAL_CROP,
    RESIZE_POLICIES,
    apply,
    apply_batched,
    canvas_side,
    fit,
    plan,
)
from cnnlab.data.store import DiskImages
from cnnlab.errors import CnnlabError, UsageError

NORM = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def photos(root: Path, n: int = 12, seed: int = 0) -> Path:
    """Two classes of RGB JPEGs/PNGs of varied shapes (landscape, portrait, square, panorama)."""
    rng = np.random.default_rng(seed)
    shapes = [(48, 36), (36, 48), (40, 40), (90, 30), (30, 70), (64, 48)]
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        d = root / "ab"[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / f"{i}.{'png' if i % 3 else 'jpg'}")
    return root


def epoch(ds_set: object, seed: int, **kw: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of batches of a loader seeded with `seed`."""
    loader = BatchLoader(ds_set, 5, NORM, generator=torch.Generator().manual_seed(seed), **kw)  # type: ignore[arg-type]
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("resize", list(RESIZE_POLICIES))
def test_streaming_and_in_memory_give_the_same_batches_for_the_same_seed(resize: str, tmp_path: Path) -> None:
    root = photos(tmp_path / "data")
    mem = load_image_folder(root, image_size=16, data_cache="memory", resize=resize)
    disk = load_image_folder(root, image_size=16, data_cache="disk", resize=resize)
    assert not mem.train.on_disk and disk.train.on_disk and disk.extra["data_cache"] == "disk"
    assert any(
        "read from the disk cache per batch: as asked (data_cache='disk', --data-cache disk)" in n for n in disk.notes
    )
    for kw in ({"shuffle": True, "augment": ("flip", "erase")}, {"shuffle": False}):
        a, b = epoch(mem.train, 3, **kw), epoch(disk.train, 3, **kw)
        assert len(a) == len(b) == math.ceil(len(mem.train) / 5)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert xa.shape == (len(ya), 3, 16, 16) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(mem.test.final(), disk.test.final())
    assert channel_stats(mem.train) == channel_stats(disk.train) == channel_stats(mem.train.final())


def test_training_batches_are_random_crops_and_evaluation_is_fixed(tmp_path: Path) -> None:
    ds = load_image_folder(photos(tmp_path / "data"), image_size=16)
    a, b = epoch(ds.train, 1, shuffle=True), epoch(ds.train, 2, shuffle=True)
    assert not torch.equal(a[0][0], b[0][0]), "another seed, other crops"
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(epoch(ds.test, 1), epoch(ds.test, 2), strict=True))


@pytest.mark.parametrize("policy", list(RESIZE_POLICIES))
def test_every_policy_cuts_inside_the_image_and_fills_the_square_as_documented(policy: str) -> None:
    boxes = torch.tensor([[30, 40], [40, 30], [40, 40], [13, 40], [40, 5]] * 40)
    size = 30
    g = torch.Generator().manual_seed(0)
    for train in (True, False):
        p = plan(boxes, size, policy, train, g)
        y0, x0, h, w, oy, ox, oh, ow = p.T
        assert (y0 >= 0).all() and (x0 >= 0).all() and (h >= 1).all() and (w >= 1).all()
        assert (y0 + h <= boxes[:, 0]).all() and (x0 + w <= boxes[:, 1]).all(), "never outside the image"
        assert (oy >= 0).all() and (ox >= 0).all() and (oy + oh <= size).all() and (ox + ow <= size).all()
        if policy == "pad":  # the whole image, aspect kept, centred
            assert (h == boxes[:, 0]).all() and (w == boxes[:, 1]).all()
            assert (torch.maximum(oh, ow) == size).all()
            assert ((oh / ow - boxes[:, 0] / boxes[:, 1]).abs() <= 0.2 * boxes[:, 0] / boxes[:, 1] + 0.05).all()
        elif policy == "squash":
            assert (h == boxes[:, 0]).all() and (w == boxes[:, 1]).all() and (oh == size).all() and (ow == size).all()
        elif not train:  # crop, evaluation: the centre of the shorter side
            short = torch.minimum(boxes[:, 0], boxes[:, 1]).double()
            assert (h == w).all() and (h == (short * EVAL_CROP).round().clamp_min(1)).all()
            assert ((y0 - (boxes[:, 0] - h) // 2).abs() <= 1).all() and ((x0 - (boxes[:, 1] - w) // 2).abs() <= 1).all()
        else:  # crop, training: torchvision's random resized crop
            fits = (boxes[:, 0] >= 13) & (boxes[:, 1] >= 13)  # shapes where a candidate usually fits
            area = (h * w).double() / (boxes[:, 0] * boxes[:, 1]).double()
            ratio = w.double() / h.double()
            assert (area[fits] >= CROP_SCALE[0] * 0.8).all() and (area <= 1.0).all()
            assert (ratio[fits] >= CROP_RATIO[0] * 0.85).all() and (ratio[fits] <= CROP_RATIO[1] / 0.85).all()
            assert len({tuple(r) for r in p.tolist()}) > 100, "random per image"


def test_pad_keeps_every_pixel_with_black_borders_and_crop_evaluates_the_centre() -> None:
    canvas = torch.zeros(1, 1, 40, 40, dtype=torch.uint8)
    canvas[0, 0, :20, :40] = 200  # a 40 wide x 20 high image at the top-left of its canvas
    canvas[0, 0, :20, 15:25] = 255  # with a bright centre
    box = torch.tensor([[20, 40]])
    padded = fit(canvas, box, 20, "pad", train=False)[0, 0]
    assert padded[:5].max() == 0 and padded[-5:].max() == 0 and padded[6:14].min() >= 195, "letterbox"
    squashed = fit(canvas, box, 20, "squash", train=False)[0, 0]
    assert squashed.min() >= 195, "the whole image, stretched"
    centre = fit(canvas, box, 20, "crop", train=False)[0, 0]
    assert centre[:, 8:12].min() == 255 and centre.min() >= 195, "the centre 87.5% of the shorter side"


@pytest.mark.parametrize(("policy", "train", "size"), [("crop", True, 48), ("crop", False, 48), ("squash", False, 48),
                                                     ("pad", False, 48), ("crop", True, 96), ("squash", False, 96),
                                                     ("pad", True, 96)])  # fmt: skip
def test_the_gpus_batched_cut_matches_the_per_image_resize(policy: str, train: bool, size: int) -> None:
    """A GPU cuts a batch in one roi_align call (apply_batched) instead of apply's per-image antialiased resize: the
    same pictures, shrunk (48 px) or enlarged (96): 0.2-0.4 grey levels apart on average on photo-like canvases,
    where a cut one pixel off, or half a pixel (roi_align without aligned=True), is 4-11 apart."""
    g = torch.Generator().manual_seed(3)
    side = canvas_side(size)  # 64 at 48 px, 128 at 96
    smooth = torch.nn.functional.interpolate(torch.rand(60, 3, 6, 8, generator=g) * 255, size=(side, side),
                                             mode="bicubic")  # fmt: skip
    canvases = (smooth + torch.randn(60, 3, side, side, generator=g) * 6).round().clamp(0, 255).to(torch.uint8)
    boxes = torch.tensor([[side, side], [side, side * 3 // 4], [side * 3 // 4, side]] * 20)
    for b, (h, w) in enumerate(boxes.tolist()):  # stored as on a canvas: the image top-left, black around it
        canvases[b, :, h:], canvases[b, :, :, w:] = 0, 0
    plans = plan(boxes, size, policy, train, g)
    index = torch.arange(59, -1, -1)  # a batch picked out of a resident set, in another order
    looped = apply(canvases, plans, size, index)
    batched = apply_batched(canvases, plans, size, index)
    assert batched.shape == looped.shape == (60, 3, size, size) and batched.dtype == torch.uint8
    diff = (batched.float() - looped.float()).abs()
    assert diff.mean() < 1.0 and diff.flatten().quantile(0.99) <= 6, (diff.mean(), diff.flatten().quantile(0.99))
    as_float = apply_batched(canvases, plans, size, index, dtype=torch.float32)
    assert torch.equal(as_float, batched.float()), "a float batch holds the same rounded 0..255 values"
    floats = canvases.float()
    assert torch.equal(apply_batched(floats, plans, size), apply_batched(canvases, plans, size))
    assert torch.equal(floats, canvases.float()), "the source is read, never written (the edges go into a copy)"


@pytest.mark.parametrize("policy", list(RESIZE_POLICIES))
@pytest.mark.parametrize("size", [24, 96])  # shrunk from the 40x30 image, and enlarged
def test_the_batched_cut_takes_nothing_from_beyond_the_cut(policy: str, size: int) -> None:
    """A flat grey image on a black canvas stays flat grey to its last row and column: the cut's edge is repeated
    outwards, as `apply` does, not blended with the black margin (or a crop's neighbours) beside it. Padded, it keeps
    exactly `apply`'s place and black borders."""
    canvases = torch.zeros(6, 3, 48, 48, dtype=torch.uint8)
    boxes = torch.tensor([[30, 40], [40, 30], [30, 40], [40, 30], [30, 40], [40, 30]])
    for b, (h, w) in enumerate(boxes.tolist()):
        canvases[b, :, :h, :w] = 200
    for train in (True, False):
        plans = plan(boxes, size, policy, train, torch.Generator().manual_seed(size))
        looped = apply(canvases, plans, size)
        assert looped.unique().tolist() == ([0, 200] if policy == "pad" else [200])
        assert torch.equal(apply_batched(canvases, plans, size), looped)


def test_the_cache_is_a_safetensors_file_with_boxes_and_the_bad_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))  # this test's cache alone
    root = photos(tmp_path / "data")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ds = load_image_folder(root, image_size=24, on_bad_image="skip", data_cache="disk")
    assert len(ds.train) + len(ds.test) == 12
    (cache,) = folders.decode_dir().glob("*.safetensors")
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("train_images").shape == (13, canvas_side(24), canvas_side(24), 3)
        assert f.get_tensor("train_boxes").max() == canvas_side(24) and int(f.get_tensor("train_ok").sum()) == 12
    assert meta["bad_count"] == "1" and "broken.jpg" in json.loads(meta["bad"])[0]["path"]
    assert meta["canvas"] == str(canvas_side(24)) and meta["size"] == "24"
    with pytest.raises(CnnlabError, match=r"broken\.jpg"):  # read from the cache: the same verdict
        load_image_folder(root, image_size=24)


def test_disk_reads_match_the_file_in_any_order_with_repeats(tmp_path: Path) -> None:
    ds = load_image_folder(photos(tmp_path / "data", n=20), image_size=16, data_cache="disk")
    mem = load_image_folder(tmp_path / "data", image_size=16, data_cache="memory")
    idx = torch.tensor([5, 4, 3, 3, 0, 1, 2, 15, 7, 7, 6])
    assert isinstance(ds.train.images, DiskImages)
    assert torch.equal(ds.train.stored(idx), mem.train.stored(idx))
    assert torch.equal(ds.train.images.read(idx, ds.train.images.buffer_for(32)), mem.train.stored(idx))
    sub = ds.train.subset(torch.tensor([3, 1]))
    assert sub.on_disk and torch.equal(sub.stored(torch.tensor([1, 0])), mem.train.stored(torch.tensor([1, 3])))


def test_each_process_reads_only_its_shard_of_every_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cnnlab.data.store as store

    ds = load_image_folder(photos(tmp_path / "data", n=24), image_size=16, data_cache="disk", resize="squash")

    def loader(batch: int, **kw: object) -> BatchLoader:
        gens = {"generator": torch.Generator().manual_seed(0), "order_generator": torch.Generator().manual_seed(9)}
        return BatchLoader(ds.train, batch, NORM, shuffle=True, **gens, **kw)  # type: ignore[arg-type]

    single = [x for x, _ in loader(10)]
    read: list[int] = []
    original = store.read_into
    monkeypatch.setattr(store, "read_into", lambda fd, out, offset: (read.append(len(out)), original(fd, out, offset)))
    for rank in range(2):
        read.clear()
        shard = list(loader(5, rank=rank, world_size=2))
        assert sum(read) == sum(len(y) for _, y in shard) * ds.train.images.row_bytes, "only its own images are read"
        assert len(shard) in (len(single), len(single) - 1)
        for (x, _), whole in zip(shard, single, strict=False):
            assert torch.equal(x, whole[rank::2]), "every global batch is cut rank::world_size"


def test_auto_keeps_small_sets_in_memory_and_streams_large_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = photos(tmp_path / "data")
    small = load_image_folder(root, image_size=16)
    assert small.extra["data_cache"] == "memory" and not small.train.on_disk
    assert any("kept in memory: at most 25% of the" in n for n in small.notes)
    monkeypatch.setattr(folders, "available_bytes", lambda device="cpu": 10_000)  # as if memory were nearly full
    big = load_image_folder(root, image_size=16)
    assert big.extra["data_cache"] == "disk" and big.train.on_disk
    assert any("more than 25% of the" in n and "--data-cache memory" in n for n in big.notes)


def test_a_set_larger_than_memory_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cnnlab.memory as memory

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))  # this test's cache alone
    root = photos(tmp_path / "data")
    # Enough to decode (a few chunks at a time), not to hold the decoded set in memory.
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10 * 2**20)
    monkeypatch.setattr(folders, "available_bytes", lambda device="cpu": 10 * 2**20)
    with pytest.raises(CnnlabError, match=r"decoding .* needs .* available") as e:
        load_image_folder(root, image_size=16, data_cache="memory")
    assert "\n" not in str(e.value) and not (tmp_path / "cache").exists(), "refused before writing anything"
    assert load_image_folder(root, image_size=16, data_cache="disk").train.on_disk, "streaming still works"


def test_too_little_disk_for_the_cache_is_one_line_naming_both_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(UsageError, match=r"the decode cache needs .* and the disk has .* free") as e:
        load_image_folder(photos(tmp_path / "data"), image_size=16, data_cache="disk")
    assert "\n" not in str(e.value)
    ds = load_image_folder(tmp_path / "data", image_size=16)  # auto: decoded into memory instead, and said so
    assert not ds.train.on_disk and any("decoded into memory, without a cache file" in n for n in ds.notes)


def test_options_are_checked(tmp_path: Path) -> None:
    root = photos(tmp_path / "data")
    with pytest.raises(UsageError, match="data_cache"):
        load_image_folder(root, data_cache="ram")
    with pytest.raises(UsageError, match="resize"):
        load_image_folder(root, resize="stretch")
    assert set(DATA_CACHE_MODES) == {"auto", "memory", "disk", "none"}


@pytest.mark.parametrize("resize", list(RESIZE_POLICIES))
def test_predict_sees_a_file_exactly_as_evaluation_saw_it(resize: str, tmp_path: Path) -> None:
    from cnnlab.engine.inference import eval_data, load_files_for_run, load_run
    from cnnlab.engine.trainer import TrainConfig
    from cnnlab.engine.trainer import fit as train

    root = photos(tmp_path / "data", n=10)
    big = np.random.default_rng(5).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(big).save(root / "a" / "big.jpg")  # large enough for JPEG's reduced-scale decoding to apply
    cfg = TrainConfig(model="cnn-compact", data=str(root), image_size=20, resize=resize, epochs=1, max_steps=1,
                      val_split=0, patience=0)  # fmt: skip
    loaded = load_run(train(cfg, runs_dir=tmp_path / "runs").run_dir)
    rows = torch.cat([s.final() for s in (eval_data(loaded, None, None, "all")[0],)])
    for f in sorted((root / "a").iterdir()):
        x = load_files_for_run(loaded, [f])[0]
        assert any(torch.equal(x, r) for r in rows), f"{f.name} under {resize}"
    legacy = model_input(open_image(root / "a" / "big.jpg"), 20, 3, None)
    assert legacy.shape == (3, 20, 20), "runs without a policy (built-in data, older runs) keep the centre square"


def test_a_cache_replaced_by_another_run_stays_readable(tmp_path: Path) -> None:
    root = photos(tmp_path / "data")
    ds = load_image_folder(root, image_size=16, data_cache="disk")
    before = ds.test.final()
    (cache,) = [p for p in folders.decode_dir().glob("*.safetensors") if str(root.resolve()) in _source(p)]
    cache.unlink()  # what a newer decode of the changed folder, or `cnnlab cache --clear`, does meanwhile
    assert torch.equal(ds.test.final(), before), "the open file is still read"


def _source(path: Path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["source"]


@pytest.mark.parametrize(
    "damage",
    ["label", "negative label", "box", "zero box", "canvas", "ok", "bad_count", "channels"],
)
def test_a_tampered_cache_is_decoded_again(damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import struct

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    root = photos(tmp_path / "data")
    first = load_image_folder(root, image_size=16, data_cache="disk")
    (cache,) = folders.decode_dir().glob("*.safetensors")
    raw = bytearray(cache.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8 : 8 + n])
    start = 8 + n
    lab, box, ok = (head[f"train_{t}"]["data_offsets"][0] + start for t in ("labels", "boxes", "ok"))
    meta = head["__metadata__"]
    if damage == "label":
        raw[lab : lab + 8] = struct.pack("<q", 7)
    elif damage == "negative label":
        raw[lab : lab + 8] = struct.pack("<q", -1)
    elif damage == "box":
        raw[box : box + 4] = struct.pack("<hh", 30000, 30000)
    elif damage == "zero box":
        raw[box : box + 4] = struct.pack("<hh", 0, 0)
    elif damage == "ok":
        raw[ok] = 7
    else:
        meta.update({"canvas": "-21"} if damage == "canvas" else {"bad_count": "-5"} if damage == "bad_count"
                    else {"channels": "2"})  # fmt: skip
        text = json.dumps(head).encode()
        raw[8 : 8 + n] = text + b" " * (n - len(text))
    cache.write_bytes(bytes(raw))
    again = load_image_folder(root, image_size=16, data_cache="disk")
    assert not any("read from the cache" in note for note in again.notes), "not trusted: decoded again"
    assert torch.equal(again.test.final(), first.test.final()) and torch.equal(again.train.labels, first.train.labels)


def test_decoding_memory_is_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cnnlab.memory as memory

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10**6)
    with pytest.raises(CnnlabError, match=r"decoding at 2667x2667 needs .* available"):
        load_image_folder(photos(tmp_path / "data"), image_size=2000, data_cache="disk")


def test_train_cli_records_the_policy_and_the_path_taken(tmp_path: Path) -> None:
    from cnnlab.engine.trainer import TrainConfig
    from cnnlab.engine.trainer import fit as train

    root = photos(tmp_path / "data", n=16)
    cfg = TrainConfig(model="cnn-compact", data=str(root), image_size=16, epochs=1, batch_size=4, data_cache="disk",
                      resize="pad", val_split=0.25, patience=0)  # fmt: skip
    run = train(cfg, runs_dir=tmp_path / "runs").run_dir
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["resize"] == "pad" and config["train"]["data_cache"] == "disk"
    assert config["data"]["data_cache"] == "disk"
    default = train(TrainConfig(model="cnn-compact", data=str(root), image_size=16, epochs=1, batch_size=4),
                    runs_dir=tmp_path / "runs").run_dir  # fmt: skip
    assert json.loads((default / "config.json").read_text())["train"]["resize"] == "crop", "recorded for predict"


def test_a_loaded_dataset_records_its_policy_and_refuses_another(tmp_path: Path) -> None:
    import cnnlab

    root = photos(tmp_path / "data", n=16)
    ds = cnnlab.load_dataset(str(root), image_size=16, resize="pad", data_cache="disk")
    run = cnnlab.train(data=ds, model="cnn-compact", epochs=1, max_steps=1, runs_dir=tmp_path / "runs", name="pad")
    assert json.loads((run.dir / "config.json").read_text())["train"]["resize"] == "pad", "evaluate/predict cut as pad"
    with pytest.raises(UsageError, match=r"resize.*loaded with resize='pad'"):
        cnnlab.train(data=ds, resize="crop", epochs=1, runs_dir=None)
    with pytest.raises(UsageError, match=r"image_size.*loaded at 16 px"):
        cnnlab.train(data=ds, image_size=32, epochs=1, runs_dir=None)
