"""Photos at scale: memory and speed of cnnlab's decode cache against torchvision's ImageFolder + DataLoader.

    python benchmarks/photos.py [--images 24000] [--folder DIR] [--workers N]

A generated folder of JPEGs of 320x240 (10 classes; smooth colour fields with noise, so that they compress and
decode like photos rather than like white noise), used at --image-size 224 (crop policy: random resized crops for
training). Each measurement runs in a fresh process, whose whole process tree (DataLoader workers included) is
sampled every 20 ms for its resident memory (the sum of RSS over the tree, from /proc: shared pages count in every
process that maps them, so this overstates, never understates).

1. cnnlab's first pass: `load_dataset(folder, image_size=224)` with an empty cache: every image decoded by every core
   onto a canvas and written to the cache file.
2. cnnlab's later epochs: the training loader (batch 256, flip) over the training split, read from the cache; the
   second epoch is timed (the first warms the kernel's page cache, as a real run's first epoch would).
3. torchvision: ImageFolder with RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize, and a
   DataLoader with --workers workers (default: the number of cores, as cnnlab decodes with), batch 256, shuffled;
   the second epoch is timed.
Every path yields the same thing: normalised float32 batches (256, 3, 224, 224), without a model (on a CPU a
ResNet-18 step at 224 px takes far longer than either input path: the comparison is of the input paths).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from _common import machine_line, write_section

SIZE = 224
BATCH = 256


def _one_photo(i: int) -> None:
    from PIL import Image

    root, k = os.environ["PHOTOS_ROOT"], 10
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((320, 240), Image.Resampling.BICUBIC)).astype(np.int16)
    img = (img + rng.integers(-12, 12, (240, 320, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(f"{root}/c{i % k}/{i:06d}.jpg", quality=88)


def make_folder(root: Path, n: int) -> None:
    """n JPEGs of 320x240 in root/c0..c9 (kept between runs: generating them takes a minute)."""
    if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == n:
        return
    shutil.rmtree(root, ignore_errors=True)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True)
    os.environ["PHOTOS_ROOT"] = str(root)
    with Pool(os.cpu_count()) as pool:
        pool.map(_one_photo, range(n), chunksize=256)


def tree_rss(pid: int) -> int:
    """Bytes resident in `pid` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def measured(code: str, env: dict[str, str]) -> dict:
    """Run `code` in a fresh Python; its printed JSON result, with the peak resident memory of its process tree."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    out, _ = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed ({proc.returncode}):\n{code}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss": peak}


FIRST_PASS = """
import json, time
from cnnlab.data import load_dataset
t = time.perf_counter()
ds = load_dataset({folder!r}, image_size={size})
print(json.dumps({{"seconds": time.perf_counter() - t, "mode": ds.extra["data_cache"], "train": len(ds.train)}}))
"""

# Both sides time two epochs of `batches` (the first warms the page cache) the same way.
TWO_EPOCHS = """
times = []
for epoch in range(2):
    t, n = time.perf_counter(), 0
    for x, y in batches:
        n += len(y)
    times.append(time.perf_counter() - t)
"""

CNNLAB_EPOCHS = (
    """
import json, time, torch
from cnnlab.data import BatchLoader, load_dataset
from cnnlab.data.pipeline import Normalization
t = time.perf_counter()
ds = load_dataset({folder!r}, image_size={size}, data_cache={mode!r})
load = time.perf_counter() - t
norm = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
g = torch.Generator().manual_seed(0)
batches = BatchLoader(ds.train, {batch}, norm, shuffle=True, augment=("flip",), generator=g)
"""
    + TWO_EPOCHS
    + """
assert x.shape[1:] == (3, {size}, {size}) and x.dtype == torch.float32
print(json.dumps({{"load": load, "epochs": times, "images": n, "mode": ds.extra["data_cache"]}}))
"""
)

TORCHVISION_EPOCHS = (
    """
import json, time, torch, torchvision
from torchvision import transforms as T
tf = T.Compose([T.RandomResizedCrop({size}), T.RandomHorizontalFlip(), T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
ds = torchvision.datasets.ImageFolder({folder!r}, tf)
n_train = {train}
sub = torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n_train])
batches = torch.utils.data.DataLoader(sub, batch_size={batch}, shuffle=True, num_workers={workers})
"""
    + TWO_EPOCHS
    + """
print(json.dumps({{"epochs": times, "images": n}}))
"""
)


def main() -> None:
    """Run the three measurements and write the section of RESULTS.md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=24_000)
    ap.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "cnnlab-bench-photos")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = ap.parse_args()
    folder = args.folder / f"{args.images}"
    make_folder(folder, args.images)
    cache = Path(tempfile.mkdtemp(prefix="cnnlab-bench-cache-"))
    env = {"CNNLAB_CACHE": str(cache)}
    try:
        first = measured(FIRST_PASS.format(folder=str(folder), size=SIZE), env)
        print("first pass", first, flush=True)
        ours = measured(CNNLAB_EPOCHS.format(folder=str(folder), size=SIZE, batch=BATCH, mode="auto"), env)
        print("cnnlab epochs", ours, flush=True)
        theirs = measured(TORCHVISION_EPOCHS.format(folder=str(folder), size=SIZE, batch=BATCH, workers=args.workers,
                                                     train=ours["images"]), env)  # fmt: skip
        print("torchvision epochs", theirs, flush=True)
        cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    gib = 2**30
    ours_rate, their_rate = ours["images"] / ours["epochs"][1], theirs["images"] / theirs["epochs"][1]
    their_epoch_all = args.images / their_rate  # one ImageFolder epoch over every image, at its measured rate
    where = "read from the cache file per batch" if ours["mode"] == "disk" else "in memory"
    body = f"""
{args.images:,} generated JPEGs of 320x240 (10 classes), `--image-size {SIZE}`, crop policy (random resized crops),
{ours["images"]:,} training images per epoch, batch {BATCH}, normalised float32 batches, no model.
Peak memory: the sum of RSS over the whole process tree (DataLoader workers included), sampled every 20 ms.
Command: `python benchmarks/photos.py` (torchvision with {args.workers} DataLoader workers).

Machine: {machine_line()}

| | seconds | images/s | peak RSS of the process tree |
| --- | --- | --- | --- |
| cnnlab first pass (decode every image, write the cache: {cache_bytes / gib:.1f} GiB) | {first["seconds"]:.1f} | {args.images / first["seconds"]:,.0f} | {first["peak_rss"] / gib:.2f} GiB |
| cnnlab epoch after the first (images {where}) | {ours["epochs"][1]:.1f} | {ours_rate:,.0f} | {ours["peak_rss"] / gib:.2f} GiB |
| torchvision ImageFolder + DataLoader, {args.workers} workers, second epoch | {theirs["epochs"][1]:.1f} | {their_rate:,.0f} | {theirs["peak_rss"] / gib:.2f} GiB |

- Later epochs: cnnlab / torchvision = **{ours_rate / their_rate:.2f}x** the images per second.
- First pass: {first["seconds"]:.1f} s against {their_epoch_all:.1f} s for one ImageFolder epoch over all
  {args.images:,} images at its measured rate: **{first["seconds"] / their_epoch_all:.2f}x**.
- `data_cache=auto` chose **{ours["mode"]}** here (the decoded canvases take {cache_bytes / gib:.1f} GiB).
"""  # noqa: E501
    print(body)
    if not args.no_write:
        write_section(f"Photos at scale: {args.images:,} JPEGs at {SIZE} px", body)


if __name__ == "__main__":
    main()
