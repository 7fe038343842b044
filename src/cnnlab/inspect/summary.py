"""Per-layer summary of a model on a real forward pass: output shape, parameters, multiply-accumulates."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SummaryRow:
    """One leaf module's entry, in execution order."""

    name: str
    kind: str
    out_shape: tuple[int, ...]  # without the batch dimension
    params: int
    macs: int


@contextlib.contextmanager
def quiet_shape_walk() -> Iterator[None]:
    """Silence torch's performance note for an even kernel with padding='same' (a copy of the input is made):
    irrelevant to a walk that only reads shapes, and a command's output stays clean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using padding='same' with even kernel", category=UserWarning)
        yield


def module_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    """Multiply-accumulates of one call for one sample (batch of 1), counted as torchvision's tables count them."""
    custom = getattr(module, "count_macs", None)
    if callable(custom):
        return int(custom(inputs, output))
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return output[0].numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.ConvTranspose2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return inputs[0][0].numel() * (module.out_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return output[0].numel() * module.in_features
    return 0


def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> list[SummaryRow]:
    """Run one (1, C, H, W) zero batch through `model` in eval mode and record every leaf module it calls."""
    rows: list[SummaryRow] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
        if not isinstance(output, torch.Tensor):
            return
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append(
            SummaryRow(
                names.get(module, "?"),
                type(module).__name__,
                tuple(output.shape[1:]),
                params,
                module_macs(module, inputs, output),
            )
        )

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    device = next(model.parameters()).device  # works on the meta device too: shapes without compute
    try:
        model.eval()
        with torch.no_grad(), quiet_shape_walk():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rows


@dataclass
class SummaryTotals:
    """Totals under the per-layer table."""

    params: int
    trainable: int
    macs: int
    activation_bytes: int  # float32 outputs of every leaf module for one image


def totals(model: nn.Module, rows: list[SummaryRow]) -> SummaryTotals:
    """Whole-model parameter counts (shared parameters once), MACs and activation memory."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    acts = sum(4 * _numel(r.out_shape) for r in rows)
    return SummaryTotals(params, trainable, sum(r.macs for r in rows), acts)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
