"""The zoo table: torchvision's accuracy metadata beside parameters and GFLOPS that cnnlab measures itself.

GFLOPS here means billions of multiply-accumulates per image, as in torchvision's published table; torch's
FlopCounterMode counts 2 FLOPs per MAC, so its total is halved. A module that knows its own count (`count_macs`,
e.g. LeNet-5's partially connected C3) is counted by it, as `cnnlab summary` counts it, so both agree. Everything
is measured on the meta device at the weights' own input size: no memory, no compute, no download.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.inspect.summary import quiet_shape_walk
from cnnlab.models.registry import create_model, list_models, model_info
from cnnlab.models.torchvision import (
    build_meta,
    builder_kwargs,
    torchvision_names,
    weights_enum,
    weights_input_size,
    without_batch_norm,
)


@dataclass
class ZooRow:
    """One weights entry (or one of cnnlab's own models)."""

    model: str
    weights: str
    family: str
    input_size: int
    acc1: float | None  # ImageNet-1K top-1 (%), from torchvision's metadata; None where it has none (or NaN)
    acc5: float | None
    params: int  # measured by cnnlab
    gflops: float  # measured by cnnlab: GMACs per image
    tv_params: int | None  # torchvision's published numbers, for comparison
    tv_gflops: float | None

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return asdict(self)


def count_macs(model: torch.nn.Module, shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one (1, C, H, W) forward in eval mode, via torch's FlopCounterMode (FLOPs / 2).

    A module with a `count_macs(inputs, output)` method replaces what the counter saw inside it by its own count:
    LeNet-5's C3 runs as a dense 6 -> 16 conv with zeros where its connection table has none, but only the 60
    connected kernels do work (the paper's 325,680 MACs for LeNet-5, not 415,680).
    """
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    started: list[int] = []
    correction = 0  # in FLOPs: custom count minus what the counter saw inside the module

    def before(module: torch.nn.Module, inputs: tuple[object, ...]) -> None:
        started.append(counter.get_total_flops())

    def after(module: torch.nn.Module, inputs: tuple[object, ...], output: object) -> None:
        nonlocal correction
        seen = counter.get_total_flops() - started.pop()
        correction += 2 * int(module.count_macs(inputs, output)) - seen  # type: ignore[operator]

    custom = [m for m in model.modules() if callable(getattr(m, "count_macs", None))]
    handles = [h for m in custom for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    was_training = model.training
    try:
        model.eval()
        with counter, torch.no_grad(), quiet_shape_walk():
            model(torch.zeros(1, *shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return (counter.get_total_flops() + correction) // 2


def _number(value: object) -> float | None:
    """A finite metric, or None: torchvision writes NaN for weights with no accuracy (vgg16 IMAGENET1K_FEATURES)."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def torchvision_rows(pattern: str = "*", progress: Callable[[int, int, str], None] | None = None) -> list[ZooRow]:
    """A row per torchvision weights entry of the models matching `pattern`.

    `progress(n, total, "model WEIGHTS")` is called before the n-th entry (from 1) is measured: all of them take a
    minute on 2 CPU cores.
    """
    entries = [(n, w) for n in torchvision_names() if fnmatch.fnmatchcase(n, pattern) for w in weights_enum(n)]
    rows = []
    for number, (name, weights) in enumerate(entries, start=1):
        if progress:
            progress(number, len(entries), f"{name} {weights.name}")
        meta = weights.meta
        size = weights_input_size(weights)
        kwargs = builder_kwargs(name, size, pretrained=False)  # the same family options create_model uses
        kwargs["num_classes"] = len(meta.get("categories") or range(1000))
        if name == "inception_v3":
            # torchvision's parameter count includes Inception v3's auxiliary classifier (27.2M, not 23.8M).
            kwargs["aux_logits"] = True
        model = build_meta(name, **kwargs)
        metrics = next(iter(meta.get("_metrics", {}).values()), {})
        rows.append(ZooRow(
            model=name, weights=weights.name, family=model_info(name).family, input_size=size,
            acc1=_number(metrics.get("acc@1")), acc5=_number(metrics.get("acc@5")),
            params=sum(p.numel() for p in model.parameters()),
            gflops=count_macs(without_batch_norm(model), (3, size, size)) / 1e9,  # counted after the parameters
            tv_params=meta.get("num_params"), tv_gflops=_number(meta.get("_ops")),
        ))  # fmt: skip
    return rows


def own_rows(pattern: str = "*") -> list[ZooRow]:
    """cnnlab's own models at their default input (no ImageNet accuracy: they are not ImageNet models)."""
    rows = []
    for name in list_models(pattern):
        info = model_info(name)
        if "ours" not in info.tags:
            continue
        shape = (info.default_in_channels, info.default_image_size, info.default_image_size)
        model = create_model(name, num_classes=10)
        rows.append(
            ZooRow(
                name,
                "-",
                info.family,
                info.default_image_size,
                None,
                None,
                sum(p.numel() for p in model.parameters()),
                count_macs(model, shape) / 1e9,
                None,
                None,
            )
        )
    return rows


def matches_torchvision(row: ZooRow) -> bool:
    """True when cnnlab's measurement equals torchvision's published Params and GFLOPS (3 decimals)."""
    if row.tv_params is None or row.tv_gflops is None:
        return False
    return row.params == row.tv_params and math.isclose(round(row.gflops, 3), round(row.tv_gflops, 3))
