"""The peer that `cnnlab bench train` races: the training loop a CNN lecture has its students write.

torchvision's FashionMNIST (or MNIST/KMNIST) dataset class with `ToTensor` + `Normalize`, a `DataLoader` with batch 64,
a 2-conv CNN (32 and 64 maps, 3x3, BatchNorm, max pooling, a 128-unit dense layer), Adam at 1e-3, and a test evaluation
after every epoch. Written plainly on purpose: it is the baseline, not something to tune.
"""

from __future__ import annotations

import gzip
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.data.locate import cache_root
from cnnlab.data.sources import FILE_SPECS, locate_files
from cnnlab.errors import UsageError

# The datasets with a torchvision class reading IDX files, and the (mean, std) a lecture normalises each with.
PEER_NORMALIZE = {"fashion-mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081), "kmnist": (0.1918, 0.3483)}
PEER_DATASETS = tuple(PEER_NORMALIZE)


class PeerCNN(nn.Module):
    """conv(32)-BN-ReLU-pool, conv(64)-BN-ReLU-pool, dense 128, dense 10: 421,834 parameters on 28x28 images."""

    def __init__(self, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def torchvision_root(data: str, data_dir: str | Path | None, download: bool) -> Path:
    """A folder in torchvision's layout (<Class>/raw/<uncompressed IDX files>) made from the files cnnlab finds."""
    if data not in PEER_DATASETS:
        raise UsageError(f"--data {data}: the peer loop runs on {', '.join(PEER_DATASETS)}")
    spec = FILE_SPECS[data]
    files, _ = locate_files(spec, data_dir, download)
    root = cache_root() / "peer-data"
    raw = root / spec.torchvision_class / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        target = raw / name
        stamp = raw / f".{name}.source"
        source = f"{path.resolve()} {path.stat().st_size} {path.stat().st_mtime_ns}"
        if target.is_file() and stamp.is_file() and stamp.read_text() == source:
            continue
        tmp = raw / f".{name}.tmp"
        with gzip.open(path) if path.suffix == ".gz" else path.open("rb") as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(target)
        stamp.write_text(source)
    return root


def run_peer(
    data: str = "fashion-mnist",
    data_dir: str | Path | None = None,
    *,
    target: float | None = 0.91,
    max_epochs: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    download: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the peer until its test accuracy reaches `target` (or for `max_epochs`); the per-epoch curve and times.

    `seconds` count from the first training step: the dataset objects are built before (`load_seconds`).
    """
    import torchvision.datasets
    from torchvision import transforms

    t_load = time.perf_counter()
    root = torchvision_root(data, data_dir, download)
    cls = getattr(torchvision.datasets, FILE_SPECS[data].torchvision_class)
    torch.manual_seed(seed)
    mean, std = PEER_NORMALIZE[data]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    train = cls(str(root), train=True, download=False, transform=tf)
    test = cls(str(root), train=False, download=False, transform=tf)
    train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test, batch_size=1000)
    model = PeerCNN(len(train.classes))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    load_seconds = time.perf_counter() - t_load
    curve: list[dict[str, Any]] = []
    reached = None
    started = time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        model.train()
        for x, y in train_loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        row = {"epoch": epoch, "seconds": time.perf_counter() - started, "test_acc": correct / len(test)}
        curve.append(row)
        if on_epoch:
            on_epoch(row)
        if target is not None and row["test_acc"] >= target:
            reached = row["seconds"]
            break
    return {
        "name": "peer",
        "seed": seed,
        "load_seconds": load_seconds,
        "curve": curve,
        "test_acc": curve[-1]["test_acc"] if curve else float("nan"),
        "seconds": curve[-1]["seconds"] if curve else 0.0,
        "seconds_to_target": reached,
    }
