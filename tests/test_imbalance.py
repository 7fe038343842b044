"""Imbalanced classes: the note on load, class weights, the balanced sampler, balanced accuracy and macro-F1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cnnlab
from cnnlab.cli import main
from cnnlab.data.balance import balanced_order, imbalance_note, inverse_frequency
from cnnlab.data.pipeline import BatchLoader, Normalization
from cnnlab.data.types import Dataset, ImageSet
from cnnlab.engine.loss import class_loss
from cnnlab.engine.metrics import balanced_accuracy, confusion_matrix, macro_f1

FAST = {"epochs": 1, "batch_size": 16, "patience": 0, "device": "cpu", "progress": False}


def skewed(counts: tuple[int, ...], side: int = 8, seed: int = 0) -> ImageSet:
    """A learnable set with `counts[k]` images of class k (class k: a bright band in row-block k)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    images = torch.randint(0, 50, (len(labels), 1, side, side), generator=g, dtype=torch.uint8)
    band = side // len(counts)
    for k in range(len(counts)):
        images[labels == k, :, k * band : (k + 1) * band] += 150
    order = torch.randperm(len(labels), generator=g)
    return ImageSet(images[order], labels[order])


def skewed_dataset(counts: tuple[int, ...] = (120, 24, 12)) -> Dataset:
    return Dataset("skewed", skewed(counts), skewed(tuple(max(4, n // 4) for n in counts), seed=1),
                   classes=tuple("abcdefgh"[: len(counts)]), default_augment=())  # fmt: skip


@pytest.mark.parametrize(
    ("counts", "noted"), [((30, 10), False), ((31, 10), True), ((10, 10, 10), False), ((500, 40, 7, 0), True)]
)
def test_the_note_appears_past_3x_and_names_the_counts(counts: tuple[int, ...], noted: bool) -> None:
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    note = imbalance_note(labels, [f"c{k}" for k in range(len(counts))])
    assert (note is not None) == noted
    if noted:
        assert note.startswith("imbalanced classes") and f"c0 {counts[0]}" in note
        smallest = min(n for n in counts if n)
        assert f"{counts[0] / smallest:.1f}x" in note


def test_the_note_lists_the_largest_and_smallest_of_many_classes() -> None:
    counts = [400, *range(60, 10, -5), 0, 0]  # 11 classes with images, 2 without
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    note = imbalance_note(labels, [f"c{k}" for k in range(len(counts))])
    assert note is not None and "c0 400" in note and "c9 20, c10 15; the largest is 26.7x" in note
    assert "(3 more)" in note and "c11 0" not in note
    assert note.endswith("no training images for class(es) c11, c12: the model cannot learn to predict them")


def test_a_class_without_training_images_is_named_even_when_the_rest_are_balanced() -> None:
    note = imbalance_note(torch.tensor([0] * 5 + [1] * 5), ["a", "b", "c"])
    assert note == "no training images for class(es) c: the model cannot learn to predict them"


def test_inverse_frequency_weights_are_sklearn_balanced_and_average_one_per_image() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    labels = torch.tensor([0] * 90 + [1] * 10 + [3] * 20)  # class 2 absent
    w = inverse_frequency(labels, 4)
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=labels.numpy())
    torch.testing.assert_close(w[[0, 1, 3]], torch.tensor(expected, dtype=torch.float32))
    assert w[2] == 0 and w[labels].mean().item() == pytest.approx(1.0)


def test_class_loss_weights_each_images_whole_loss_and_splits_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(12, 3, generator=g), torch.tensor([0, 1, 2, 0] * 3)
    w = torch.tensor([0.5, 2.0, 3.0])
    per = F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    assert class_loss(logits, labels, 0.1, w).item() == pytest.approx((per * w[labels]).mean().item())
    assert class_loss(logits, labels, 0.1).item() == pytest.approx(per.mean().item())  # unweighted: as before
    halves = sum(class_loss(logits[i : i + 6], labels[i : i + 6], 0.1, w) * 0.5 for i in (0, 6))
    assert halves.item() == pytest.approx(class_loss(logits, labels, 0.1, w).item())  # accumulation stays exact


def test_balanced_order_draws_every_class_evenly() -> None:
    shuffle = torch.randperm(1000, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0] * 900 + [1] * 80 + [2] * 20)[shuffle]
    order = torch.cat([balanced_order(labels, 1000, torch.Generator().manual_seed(s)) for s in range(6)])  # (6000,)
    share = torch.bincount(labels[order], minlength=3).double() / len(order)
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02), share  # 3 sigma: 0.018
    assert len(torch.unique(order[labels[order] == 2])) == 20, "every image of the rare class is drawn"


def test_balanced_sampler_is_the_same_order_split_over_processes() -> None:
    data = skewed((60, 12, 6))
    norm = Normalization((0.5,), (0.25,))

    def labels_seen(rank: int, world: int) -> list[torch.Tensor]:
        loader = BatchLoader(data, 8, norm, shuffle=True, balanced=True, rank=rank, world_size=world,
                             generator=torch.Generator().manual_seed(9))  # fmt: skip
        return [y for _, y in loader]

    single = labels_seen(0, 1)
    r0, r1 = labels_seen(0, 2), labels_seen(1, 2)
    assert len(r0) == len(r1) and sum(len(y) for y in single) == len(data)
    merged = torch.cat([torch.stack([a, b], 1).flatten() for a, b in zip(r0, r1, strict=True)])
    assert torch.equal(merged, torch.cat(single)[: len(merged)])
    assert torch.bincount(torch.cat(single), minlength=3).min() >= 16, "the 6-image class is drawn ~26 times"


def test_training_with_class_weights_uses_the_training_splits_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnlab.engine import trainer

    seen: list[torch.Tensor | None] = []
    real = trainer.class_loss

    def spy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0, weight: torch.Tensor | None = None,
            reduction: str = "mean", multi_label: bool = False) -> torch.Tensor:  # fmt: skip
        seen.append(weight)
        return real(logits, labels, smoothing, weight, reduction, multi_label)

    monkeypatch.setattr(trainer, "class_loss", spy)
    run = cnnlab.train("cnn-compact", skewed_dataset(), class_weights="auto", val_split=0, runs_dir=None, **FAST)
    expected = inverse_frequency(skewed_dataset().train.labels, 3)
    assert seen and all(w is not None and torch.equal(w.cpu(), expected) for w in seen)
    assert run.record.train.class_weights == "auto"

    seen.clear()
    cnnlab.train("cnn-compact", skewed_dataset(), runs_dir=None, val_split=0, **FAST)
    assert seen and all(w is None for w in seen), "off by default"

    seen.clear()  # with class-first draws every class is seen as often: the weights average 1 over the classes
    cnnlab.train("cnn-compact", skewed_dataset(), class_weights="auto", sampler="balanced", val_split=0,
                 runs_dir=None, **FAST)  # fmt: skip
    torch.testing.assert_close(seen[0].cpu(), expected / expected.mean())


def test_cli_prints_the_counts_and_trains_balanced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = skewed_dataset((40, 4, 4))
    for split, images in (("train", data.train), ("test", data.test)):
        for i, (img, label) in enumerate(zip(images.images, images.labels, strict=True)):
            folder = tmp_path / "photos" / split / data.classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy()).save(folder / f"{i}.png")
    args = ["train", "--data", str(tmp_path / "photos"), "--model", "cnn-compact", "--image-size", "8", "--epochs",
            "1", "--batch-size", "8", "--class-weights", "auto", "--sampler", "balanced", "--runs-dir",
            str(tmp_path / "runs"), "--name", "r", "--json"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr()
    # counted after validation is held out (10% of each class, rounded: 4 of a's 40, none of 4)
    assert "imbalanced classes (training images per class: a 36, b 4, c 4; the largest is 9.0x" in out.err
    assert "note: auto class weights with the balanced sampler correct for imbalance twice" in out.err
    config = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert config["train"]["class_weights"] == "auto" and config["train"]["sampler"] == "balanced"


@pytest.mark.parametrize("seed", range(4))
def test_balanced_accuracy_and_macro_f1_equal_sklearns(seed: int) -> None:
    from sklearn.metrics import balanced_accuracy_score, f1_score

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (300,), generator=g)
    labels[labels == 4] = 0  # class 4 never true; with seed > 1 it is also predicted
    other = torch.randint(0, 4 + (seed > 1), (300,), generator=g)
    pred = torch.where(torch.rand(300, generator=g) < 0.6, labels, other)
    cm = confusion_matrix(pred, labels, 5)
    assert balanced_accuracy(cm) == pytest.approx(balanced_accuracy_score(labels.numpy(), pred.numpy()))
    assert macro_f1(cm) == pytest.approx(f1_score(labels.numpy(), pred.numpy(), average="macro"))


def test_evaluate_reports_balanced_accuracy_and_macro_f1(tmp_path: Path) -> None:
    from sklearn.metrics import balanced_accuracy_score, f1_score

    data = skewed_dataset()
    run = cnnlab.train("cnn-compact", data, runs_dir=tmp_path, name="r", **FAST)
    ev = run.evaluate()
    pred = torch.tensor([data.classes.index(p.label) for p in run.predict(data.test.images)])
    truth = data.test.labels.numpy()
    assert ev.balanced_accuracy == pytest.approx(balanced_accuracy_score(truth, pred.numpy()))
    assert ev.macro_f1 == pytest.approx(f1_score(truth, pred.numpy(), average="macro"))
    doc = ev.to_dict()
    assert doc["balanced_accuracy"] == ev.balanced_accuracy and doc["macro_f1"] == ev.macro_f1
    assert ev.headline().endswith(f"balanced accuracy {ev.balanced_accuracy:.2%}, macro-F1 {ev.macro_f1:.3f}")

    no_c = ImageSet(data.test.images[data.test.labels != 2], data.test.labels[data.test.labels != 2])
    ev = run.evaluate((no_c.images[:, 0].numpy(), no_c.labels.numpy()))
    assert ev.headline().endswith("(over the classes with test images; 1 have none)")
