"""Transfer learning: pretrained-format weights from a local file, a frozen feature extractor, then unfreezing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file

from cnnlab.engine import trainer
from cnnlab.engine.trainer import TrainConfig, build_optimizer, classifier_modules, fit
from cnnlab.models import create_model, list_models
from cnnlab.models.registry import model_info


def make_folder(root: Path, mode: str = "RGB", n: int = 8) -> Path:
    """Two classes of small images: dark ones and bright ones."""
    for c, level in (("dark", 40), ("bright", 210)):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new(mode, (36, 36), level + i if mode == "L" else (level + i, level, 255 - level)).save(
                root / c / f"{i}.png"
            )
    return root


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet-18 weights in torchvision's format (ImageNet head, 1000 classes), saved locally: the --weights path."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _fit(tmp_path: Path, weights: Path, data: Path, **kw: object) -> tuple[dict, dict, Path]:
    """Train; return the state right after set-up, the trained best weights and the run directory."""
    start: dict = {}
    original = trainer._Trainer.__init__

    def capture(self: trainer._Trainer, *a: object, **k: object) -> None:
        original(self, *a, **k)
        start.update(copy.deepcopy(self.model.state_dict()))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer._Trainer, "__init__", capture)
        cfg = TrainConfig(model="resnet18", weights=str(weights), data=str(data), image_size=32, batch_size=4,
                          val_split=0.25, patience=0, **kw)  # fmt: skip
        run = fit(cfg, runs_dir=tmp_path / "runs").run_dir
    return start, load_file(str(run / "best.safetensors")), run


def test_frozen_features_stay_fixed_and_only_the_new_head_learns(weights_file: Path, tmp_path: Path) -> None:
    start, trained, _ = _fit(tmp_path, weights_file, make_folder(tmp_path / "data"), freeze="features", epochs=2)
    pretrained = torch.load(weights_file, weights_only=True)
    for key, value in trained.items():
        if key.startswith("fc."):
            assert value.shape[0] == 2 and not torch.equal(value, start[key]), f"{key}: the head must learn"
        else:
            # Every backbone tensor, BatchNorm running statistics included, is exactly the pretrained one.
            assert torch.equal(value, pretrained[key]), f"{key} changed while frozen"


def test_unfreeze_after_fine_tunes_the_backbone_at_a_lower_lr(weights_file: Path, tmp_path: Path) -> None:
    _, _, run = _fit(tmp_path, weights_file, make_folder(tmp_path / "data"), freeze="features",
                     unfreeze_after=1, epochs=2)  # fmt: skip
    from cnnlab.engine.checkpoint import load_checkpoint

    # The weights after the unfrozen epoch (best.safetensors may hold the frozen epoch, if it validated better).
    trained = load_checkpoint(run / "last.ckpt")["model"]
    pretrained = torch.load(weights_file, weights_only=True)
    assert not torch.equal(trained["layer4.1.conv2.weight"], pretrained["layer4.1.conv2.weight"])
    assert not torch.equal(trained["layer1.0.bn1.running_mean"], pretrained["layer1.0.bn1.running_mean"])


def test_grayscale_folder_with_pretrained_weights_adapts_the_first_conv(weights_file: Path, tmp_path: Path) -> None:
    _, trained, run = _fit(tmp_path, weights_file, make_folder(tmp_path / "gray", mode="L"), freeze="features",
                           epochs=1)  # fmt: skip
    pretrained = torch.load(weights_file, weights_only=True)
    assert trained["conv1.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(trained["conv1.weight"], pretrained["conv1.weight"].sum(1, keepdim=True))
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["classifier"] == ["fc"] and config["data"]["channels"] == 1
    assert config["train"]["freeze"] == "features"


def test_backbone_gets_the_lower_learning_rate() -> None:
    model = create_model("resnet18", num_classes=3, in_channels=3, image_size=32)
    cfg = TrainConfig(model="resnet18", lr=0.01, backbone_lr_mult=0.1, freeze="features")
    opt = build_optimizer(model, cfg, ["fc"])
    head_ids = {id(p) for p in model.fc.parameters()}
    for group in opt.param_groups:
        is_head = all(id(p) in head_ids for p in group["params"])
        assert group["lr"] == pytest.approx(0.01 if is_head else 0.001)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("name", [n for n in list_models() if "pretrained" in model_info(n).tags])
def test_every_pretrained_family_has_a_classifier_to_keep_trainable(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name, num_classes=7, in_channels=1)
        size = model_info(name).default_image_size
        head = classifier_modules(model, torch.zeros(1, 1, size, size))
    module = model.get_submodule(head[0])
    outputs = getattr(module, "out_features", getattr(module, "out_channels", None))
    assert outputs == 7, f"{name}: {head[0]} is not the 7-class classifier"


def test_freeze_options_are_checked() -> None:
    from cnnlab.errors import UsageError

    with pytest.raises(UsageError, match="unfreeze_after needs freeze='features'"):
        TrainConfig(unfreeze_after=2).validate()
    with pytest.raises(UsageError, match="freeze must be one of"):
        TrainConfig(freeze="all").validate()
