"""Augmentations: every registered one on 1- and 3-channel batches, MixUp/CutMix, the printed default, the picture."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cnnlab.data import BatchLoader, ImageSet, Normalization
from cnnlab.data.pipeline import AUGMENTATIONS, batch_mixer
from cnnlab.engine.loss import class_loss
from tests.conftest import run_main


def images(channels: int, n: int = 16, side: int = 24) -> ImageSet:
    """Smooth random images (gradients with a bright square), so that every operation visibly changes them."""
    g = torch.Generator().manual_seed(channels)
    base = torch.linspace(0, 200, side).view(1, 1, 1, side).expand(n, channels, side, side).clone()
    base += torch.rand(n, channels, 1, 1, generator=g) * 50
    base[:, :, 4:10, 6:14] = 255
    return ImageSet(base.round().to(torch.uint8), torch.arange(n) % 4)


def batch(data: ImageSet, ops: tuple[str, ...], seed: int) -> torch.Tensor:
    norm = Normalization((0.5,) * data.channels, (0.25,) * data.channels)
    loader = BatchLoader(
        data, len(data), norm, shuffle=False, augment=ops, generator=torch.Generator().manual_seed(seed)
    )
    return next(iter(loader))[0]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", list(AUGMENTATIONS))
def test_every_augmentation_changes_a_batch_reproducibly_per_seed(op: str, channels: int) -> None:
    data = images(channels)
    plain = batch(data, (), 0)
    a, b, c = batch(data, (op,), 0), batch(data, (op,), 0), batch(data, (op,), 1)
    assert a.shape == plain.shape and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b), "the same seed draws the same batch"
    assert not torch.equal(a, plain), f"{op} changed nothing"
    assert not torch.equal(a, c), "another seed, other draws"
    changed = [i for i in range(len(data)) if not torch.equal(a[i], plain[i])]
    if op not in ("jitter",):  # jitter changes every image; the others leave some images alone
        assert len(changed) > 0, op


def test_torchvision_draws_leave_the_global_generator_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    batch(images(3), ("trivial", "jitter"), 0)
    assert torch.equal(torch.rand(3), before), "per-image draws come from the run's generator, not torch's global one"


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_and_cutmix_blend_images_and_labels_alike(mixup: float, cutmix: float) -> None:
    mixer = batch_mixer(mixup, cutmix, 4)
    assert mixer is not None and batch_mixer(0.0, 0.0, 4) is None
    x = torch.randn(8, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixed, target = mixer(x.clone(), y, torch.Generator().manual_seed(0))
    again, target2 = mixer(x.clone(), y, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again) and torch.equal(target, target2), "seeded by the run's generator"
    assert target.shape == (8, 4) and torch.allclose(target.sum(1), torch.ones(8))
    partner = y.roll(1)  # torchvision mixes each image with its neighbour in the batch
    lam = target[torch.arange(8), y]
    assert torch.allclose(target[torch.arange(8), partner], 1 - lam)
    assert torch.allclose(lam, lam[0].expand(8)), "one draw per batch"
    # The images are mixed in the same proportion as the labels: pixel-wise for MixUp, by area for CutMix.
    from_first = float((mixed - x.roll(1, 0)).abs().sum() / (x - x.roll(1, 0)).abs().sum())
    if cutmix == 0:
        assert math.isclose(from_first, float(lam[0]), rel_tol=1e-4)
    elif mixup == 0:
        assert abs(from_first - float(lam[0])) < 0.15  # the box's share of the area, on random pixels
    assert 0 < from_first <= 1


def test_soft_labels_take_the_class_weights_of_their_classes() -> None:
    logits = torch.randn(5, 3)
    hard = torch.tensor([0, 1, 2, 0, 1])
    weight = torch.tensor([1.0, 2.0, 0.5])
    one_hot = torch.nn.functional.one_hot(hard, 3).float()
    assert torch.allclose(class_loss(logits, one_hot, 0.1, weight), class_loss(logits, hard, 0.1, weight))
    half = 0.5 * one_hot + 0.5 * one_hot.roll(1, 0)
    per = torch.nn.functional.cross_entropy(logits, half, label_smoothing=0.1, reduction="none")
    assert torch.allclose(class_loss(logits, half, 0.1, weight), (per * (half @ weight)).mean())


def test_the_default_augmentation_is_printed_with_its_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_main(["train", "--epochs", "1", "--max-steps", "2", "--runs-dir", str(tmp_path)], capsys)
    assert code == 0 and "augment: crop, this data's default" in err and "a mirrored 2 is not a 2" in err
    code, _, err = run_main(["train", "--epochs", "1", "--max-steps", "2", "--augment", "flip", "--runs-dir",
                             str(tmp_path)], capsys)  # fmt: skip
    assert code == 0 and "this data's default" not in err


def test_visualize_batch_draws_what_the_model_saw(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["train", "--epochs", "1", "--max-steps", "2", "--runs-dir", str(tmp_path), "--name", "mix", "--mixup",
            "0.4", "--augment", "trivial,crop"]  # fmt: skip
    assert run_main(args, capsys)[0] == 0
    code, out, _ = run_main(["visualize", "batch", str(tmp_path / "mix"), "--count", "8"], capsys)
    assert code == 0 and Path(out.strip()) == tmp_path / "mix" / "batch.png"
    assert (tmp_path / "mix" / "batch.png").stat().st_size > 5000
    from cnnlab.engine.inference import load_run, training_batch

    pictures, captions, title = training_batch(load_run(tmp_path / "mix"), 8, 0)
    assert pictures.shape == (8, 1, 28, 28) and pictures.dtype == torch.uint8
    assert "augment trivial,crop" in title and "mixup 0.4" in title and all("%" in c for c in captions)
    code, _, err = run_main(["visualize", "batch", str(tmp_path / "mix"), "--count", "0"], capsys)
    assert code == 2 and err.strip().endswith("give 1 to 256 images") and len(err.strip().splitlines()) == 1
