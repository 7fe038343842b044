"""Named training recipes: tuned sets of TrainConfig options for the shortest time to a good model.

A recipe only fills options: anything the user sets explicitly wins. `--time-budget SECONDS` (TrainConfig.time_budget)
works with any recipe or none: the trainer times a few steps and plans the schedule to end on time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cnnlab.errors import unknown_name


@dataclass(frozen=True)
class Recipe:
    """A named set of training options and what it was measured to reach (benchmarks/RESULTS.md)."""

    name: str
    summary: str
    settings: dict[str, Any]
    measured: str
    # Settings that replace those of `settings` on a CUDA GPU, all together (none if the user sets any of them).
    gpu: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Builder options that differ on a CUDA GPU, merged over the settings' model_args there (None removes one).
    gpu_model_args: dict[str, Any] = dataclasses.field(default_factory=dict)


# Shared by the recipes: SGD-Nesterov with a one-cycle schedule peaking at lr 0.2 for batches of 128 ...
_SGD_ONE_CYCLE: dict[str, Any] = {
    "batch_size": 128, "optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "onecycle",
    "warmup": 0.2, "label_smoothing": 0.1,
}  # fmt: skip
# ... and a schedule fixed in advance, which leaves early stopping nothing to choose: all images train, none validate.
_FIXED_SCHEDULE_NATIVE: dict[str, Any] = {"val_split": 0.0, "patience": 0, "precision": "native", "channels_last": True}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "fast",
            "cnn-fast with a fixed whitening stem (16 maps on grey images) then 32-64, 3 epochs, batch 128, "
            "SGD-Nesterov lr 0.2 one-cycle, label smoothing 0.1, no augmentation, all 60k training images (no "
            "validation split), bf16 where the CPU/GPU computes it natively, channels-last",
            {
                "model": "cnn-fast",
                "model_args": {"widths": "32-64", "depth": 1, "stem": "whiten", "whiten_keep": "aligned"},
                "epochs": 3,
                **_SGD_ONE_CYCLE,
                "augment": (),
                **_FIXED_SCHEDULE_NATIVE,
                "tta": False,
            },
            "Fashion-MNIST, 3 seeds on a 2-core AMD EPYC with AVX-512 BF16: 91.8-91.9% in 14-20 s in bf16 (two VMs), "
            "91.6-91.8% in 19 s with fp32 forced (16-map stem); with the 18-map stem before, 91.7-91.9% in 17-32 s in "
            "bf16 (three VMs) and 91.8-92.1% in 29-62 s in fp32 without AVX-512 (two VMs)",
        ),
        Recipe(
            "accurate",
            "cnn-fast with a fixed whitening stem (16 maps on grey images, 18 on a GPU) then 64-128, 2 convs per "
            "stage, 15 epochs, batch 128, SGD-Nesterov lr 0.2 one-cycle (batch 512 and lr 0.8 on a GPU), label "
            "smoothing 0.1, flip augmentation (no crop: it cost about a point in 3-minute runs), flip test-time "
            "augmentation, no validation split, bf16 where native, channels-last",
            {
                "model": "cnn-fast",
                "model_args": {"widths": "64-128", "depth": 2, "stem": "whiten", "whiten_keep": "aligned"},
                "epochs": 15,
                **_SGD_ONE_CYCLE,
                "augment": ("flip",),
                **_FIXED_SCHEDULE_NATIVE,
                "tta": True,
            },
            "Fashion-MNIST with --time-budget 175, 3 seeds on a 2-core AMD EPYC with AVX-512 BF16: 93.9-94.4% in "
            "167-168 s in bf16 (12-14 epochs, two VMs), 93.9-94.1% with fp32 forced (8-9 epochs; 16-map stem); with "
            "the 18-map stem, 94.0-94.3% in bf16 (three VMs, 10-12 epochs) and 93.2-93.9% in fp32 without AVX-512 (two "
            "VMs, 3-6 epochs by the VM's speed). One NVIDIA H200 on 16-core Xeon hosts: 94.06-94.10% with "
            "--time-budget 5 (4.3 s, in a warm process, 18 maps) on a fast host, 93.4-93.9% on two slower ones (16 "
            "and 18 maps); 94.0-94.4% with --epochs 16 (7.6-10.3 s)",
            # A GPU's step costs the host's kernel launches, not the batch (about 1 ms of GPU work in 4-12 ms per step
            # of 128 or 512 images on an H200): 4x the images per step, 4x the learning rate, ~3x the epochs in 5 s.
            gpu={"batch_size": 512, "lr": 0.8},
            # Every patch direction on a GPU (18 maps): the 16-map stem saves a CPU's vector work, nothing on a GPU,
            # and at 16 epochs there it tested 0.14-0.19 points lower on the mean (weak evidence: docs/speed.md).
            gpu_model_args={"whiten_keep": None},
        ),
    )
}


def list_recipes() -> list[str]:
    """Names of the registered recipes."""
    return list(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called `name` (UsageError naming the known ones otherwise)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise unknown_name("recipe", name, RECIPES, "see `cnnlab train --help`") from None


def native_bf16(device: Any) -> bool:
    """Whether bf16 autocast is fast on torch.device `device`: CUDA with bf16, or a CPU with AVX-512 BF16 / AMX."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def apply_recipe(cfg: Any, name: str, keep: Iterable[str] = ()) -> Any:
    """A copy of TrainConfig `cfg` with recipe `name`'s options, except the fields in `keep` (set by the user)."""
    from cnnlab.engine.device import resolve_device

    recipe = get_recipe(name)
    keep = set(keep)
    device = resolve_device(getattr(cfg, "device", "auto"))
    # The GPU settings go together (batch 512 wants lr 0.8): a user who sets any of them gets the CPU's for the rest.
    gpu = recipe.gpu if device.type == "cuda" and not keep & recipe.gpu.keys() else {}
    settings = {**recipe.settings, **gpu}
    changes = {k: v for k, v in settings.items() if k not in keep}
    if device.type == "cuda" and recipe.gpu_model_args and "model_args" in changes:
        merged = {**changes["model_args"], **recipe.gpu_model_args}
        changes["model_args"] = {k: v for k, v in merged.items() if v is not None}
    if changes.get("model_args") is not None and "model" in keep:
        changes.pop("model_args")  # the recipe's builder options belong to the recipe's model
    if changes.get("precision") == "native":
        # bf16 halves the work only where the hardware computes it natively; emulated bf16 is slower than fp32.
        changes["precision"] = "bf16" if native_bf16(device) else ("auto" if device.type == "cuda" else "fp32")
    if "model_args" in changes:
        changes["model_args"] = dict(changes["model_args"])
    return dataclasses.replace(cfg, recipe=name, **changes)
