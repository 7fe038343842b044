"""Speed of the input pipeline, without a model, against torchvision's Dataset + DataLoader path.

    python benchmarks/pipeline.py          (needs Fashion-MNIST: apt install dataset-fashion-mnist, or --data-dir)

1. Fashion-MNIST, 60,000 training images, one epoch of crop (pad 2) + horizontal flip, batch 256, normalised
   float32 batches: cnnlab's BatchLoader (uint8 tensors in memory, batched augmentation) vs torchvision's
   FashionMNIST + DataLoader(RandomCrop, RandomHorizontalFlip, ToTensor, Normalize) with 0 and 2 workers.
   For scale, one training epoch of lenet5-modern on the same batches is timed too.
2. An image folder of 10,000 small JPEGs (10 classes, 32-96 px, generated): cnnlab's first load (decode in
   threads, cache written), a later load (cache read) and one epoch of batches (random resized crop, shift, flip),
   vs torchvision's ImageFolder + DataLoader doing the same, which decodes every image again each epoch.
Each epoch time is the best of 3 (after one warm-up epoch); loads are timed once each.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from _common import machine_line, write_section
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from cnnlab.data import BatchLoader, channel_stats, load_dataset
from cnnlab.data.sources import FILE_SPECS, locate_files
from cnnlab.models import create_model

BATCH = 256
WORKERS = (0, 2)


DEVICE = torch.device("cpu")


def sync() -> None:
    """Wait for queued GPU work, so that wall times mean something."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def best_epoch(make_iter, repeats: int = 3) -> float:
    """Best wall time of iterating one epoch (batches on DEVICE), after a warm-up epoch."""
    for _ in make_iter():
        pass
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for x, _y in make_iter():
            x.to(DEVICE, non_blocking=True)  # the peers' batches must reach the device too
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def torchvision_fashion_root(tmp: Path) -> Path:
    """torchvision's FashionMNIST expects root/FashionMNIST/raw/<uncompressed IDX files>; build that from ours."""
    files, _ = locate_files(FILE_SPECS["fashion-mnist"], None, download=False)
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, path in files.items():
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        (raw / name).write_bytes(data)
    return tmp


def fashion(tmp: Path) -> list[str]:
    """Part 1: the 60,000-image Fashion-MNIST epoch."""
    t0 = time.perf_counter()
    ds = load_dataset("fashion-mnist", download=False)
    load_s = time.perf_counter() - t0
    norm = channel_stats(ds.train)
    gen = torch.Generator().manual_seed(0)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    loader = BatchLoader(ds.train, BATCH, norm, shuffle=True, augment=("crop", "flip"), generator=gen, device=DEVICE)
    ours = best_epoch(lambda: loader)

    tf = T.Compose([T.RandomCrop(28, padding=2), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(norm.mean, norm.std)])  # fmt: skip
    tv = torchvision.datasets.FashionMNIST(str(torchvision_fashion_root(tmp)), train=True, transform=tf)
    peers = {}
    for workers in WORKERS:
        dl = DataLoader(tv, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=DEVICE.type == "cuda")  # fmt: skip
        peers[workers] = best_epoch(lambda dl=dl: dl)

    model = create_model("lenet5-modern", num_classes=10, in_channels=1, image_size=28).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_epoch():
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            yield x, y

    model_s = best_epoch(train_epoch, repeats=1)
    return [
        f"Loading the IDX files (gzip, 60,000 + 10,000 images) into uint8 tensors: {load_s:.2f} s.",
        "",
        "| pipeline (one epoch, 60,000 images, crop+flip, batch 256) | seconds | torchvision / cnnlab |",
        "| --- | --- | --- |",
        f"| **cnnlab BatchLoader** | **{ours:.3f}** | 1.0 |",
        *(
            f"| torchvision FashionMNIST + DataLoader, {w} workers{' (persistent)' if w else ''} | {peers[w]:.2f} | "
            f"{peers[w] / ours:.0f}x |"
            for w in WORKERS
        ),
        f"| for scale: one training epoch of lenet5-modern on cnnlab's batches | {model_s:.2f} | |",
    ]


def make_jpeg_folder(root: Path, n: int = 10_000, classes: int = 10) -> None:
    """n small JPEGs of varied size: smooth colour fields with a class-dependent stripe frequency, plus noise."""
    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % classes
        h, w = (int(v) for v in rng.integers(32, 97, 2))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.sin((c + 1) * 3.0 * (xx + yy))[..., None] * rng.uniform(40, 90, 3) + rng.uniform(80, 170, 3)
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)


def folder(tmp: Path) -> list[str]:
    """Part 2: 10,000 small JPEGs."""
    root = tmp / "jpegs"
    make_jpeg_folder(root)
    os.environ["CNNLAB_CACHE"] = str(tmp / "cache")
    t0 = time.perf_counter()
    ds = load_dataset(str(root), image_size=64)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = load_dataset(str(root), image_size=64)
    cached = time.perf_counter() - t0
    norm = channel_stats(ds.train)
    loader = BatchLoader(ds.train, BATCH, norm, shuffle=True, augment=("crop", "flip"), device=DEVICE,
                         generator=torch.Generator(device=DEVICE).manual_seed(0))  # fmt: skip
    epoch = best_epoch(lambda: loader)
    # The same work as cnnlab's: a random resized crop (its default resize=crop), the small shift, the flip.
    tf = T.Compose([T.RandomResizedCrop(64), T.RandomCrop(64, padding=4), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(norm.mean, norm.std)])  # fmt: skip
    tv = torchvision.datasets.ImageFolder(str(root), transform=tf)
    dl = DataLoader(tv, batch_size=BATCH, shuffle=True, num_workers=WORKERS[-1], persistent_workers=True)
    peer = best_epoch(lambda: dl, repeats=1)
    n = len(ds.train) + len(ds.test)
    return [
        f"{n:,} JPEGs (10 classes, 32-96 px, quality 90) at --image-size 64 (whole, on 85x85 canvases); cnnlab "
        "trains on the "
        f"{len(ds.train):,} of its training split, torchvision's ImageFolder on all {n:,}.",
        "",
        "| step | seconds |",
        "| --- | --- |",
        f"| cnnlab first load: decode in threads + write cache | {first:.2f} |",
        f"| cnnlab later load: read the cache | {cached:.2f} |",
        f"| cnnlab epoch from memory (random resized crop + crop + flip, batch 256) | {epoch:.3f} |",
        f"| torchvision ImageFolder + DataLoader, {WORKERS[-1]} workers, one epoch (decodes each epoch) | {peer:.2f} |",
    ]


def main() -> None:
    """Run both parts and write the RESULTS.md section."""
    global DEVICE, WORKERS
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu", help="where batches go: cpu or cuda (default cpu)")
    ap.add_argument("--data-dir", default=None, help="folder holding fashion-mnist/ (else the usual search order)")
    args = ap.parse_args()
    DEVICE = torch.device(args.device)
    WORKERS = (0, 2) if (os.cpu_count() or 1) <= 4 else (0, 2, 8)
    if args.data_dir:
        os.environ["CNNLAB_DATA"] = args.data_dir
    tmp = Path(tempfile.mkdtemp(prefix="cnnlab-bench-"))
    try:
        part1 = fashion(tmp)
        part2 = folder(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    body = "\n".join(
        [
            "Command: `python benchmarks/pipeline.py`. The pipeline alone, no model, unless said. Epoch times are",
            f"the best of 3 after a warm-up epoch. Batches end on the {DEVICE.type} device (peers: copied there).",
            "",
            f"Machine: {machine_line()}",
            "",
            "### Fashion-MNIST",
            "",
            *part1,
            "",
            "### An image folder of 10,000 small JPEGs",
            "",
            *part2,
        ]
    )
    print(body)
    suffix = "" if DEVICE.type == "cpu" else f" (batches on {DEVICE.type})"
    write_section(f"Data pipeline: Fashion-MNIST and an image folder{suffix}", body)


if __name__ == "__main__":
    main()
