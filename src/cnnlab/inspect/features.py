"""What a trained CNN computes inside: convolution layers, their activation maps for one image, and Grad-CAM.

All functions take a model in eval mode and normalised input batches (B, C, H, W) as the model sees them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.errors import UsageError

MAX_STAGES = 8  # default activation pictures: at most this many layers


def conv_layers_in_order(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Size]]:
    """(name, output shape) of every Conv2d in the order the forward pass calls them (a module called twice: once)."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[str, torch.Size]] = []

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if names[module] not in {c[0] for c in calls}:
            calls.append((names[module], output.shape))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def default_stages(calls: Sequence[tuple[str, torch.Size]]) -> list[str]:
    """Every conv if there are few; else the last conv at each spatial size (the output of each stage)."""
    if len(calls) <= MAX_STAGES:
        return [name for name, _ in calls]
    stages = []
    for i, (name, shape) in enumerate(calls):
        last_at_size = i + 1 == len(calls) or calls[i + 1][1][-2:] != shape[-2:]
        if last_at_size:
            stages.append(name)
    return stages[-MAX_STAGES:]


def check_layers(model: nn.Module, layers: Sequence[str]) -> None:
    """UsageError naming the first layer name the model does not have, with the conv layers it does have."""
    names = dict(model.named_modules())
    for layer in layers:
        if layer not in names or layer == "":
            convs = [n for n, m in names.items() if isinstance(m, nn.Conv2d)]
            shown = ", ".join(convs[:12]) + (" ..." if len(convs) > 12 else "")
            raise UsageError(f"--layer {layer!r}: no such layer; conv layers: {shown}")


def activations(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """The outputs of the named modules for input x (1, C, H, W): {name: (C', H', W')} on the CPU."""
    check_layers(model, layers)
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in layers:

        def hook(module: nn.Module, inputs: object, output: torch.Tensor, name: str = name) -> None:
            if name not in out and isinstance(output, torch.Tensor):
                out[name] = output.detach()[0].float().cpu()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {name: out[name] for name in layers if name in out}


@dataclass
class GradCam:
    """A Grad-CAM heat map (H, W) in [0, 1] at input resolution, for one class, at one layer."""

    heatmap: torch.Tensor
    class_index: int
    prob: float
    layer: str


def grad_cam(model: nn.Module, x: torch.Tensor, layer: str | None = None, class_index: int | None = None) -> GradCam:
    """Grad-CAM (Selvaraju et al., 2017): ReLU(sum_c w_c A_c), w_c = mean gradient of the class score over A_c.

    `layer` defaults to the last convolution the forward pass calls (the last conv stage, the finest semantics
    that still has a spatial layout). `class_index` defaults to the predicted class.
    """
    model = copy.deepcopy(model).eval()
    for m in model.modules():  # in-place activations would overwrite the feature map whose gradient we need
        if hasattr(m, "inplace"):
            m.inplace = False
    if layer is None:
        calls = conv_layers_in_order(model, x)
        if not calls:
            raise UsageError("this model has no convolution layer for Grad-CAM")
        layer = calls[-1][0]
    check_layers(model, [layer])
    saved: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if "act" not in saved:
            saved["act"] = output
            output.register_hook(lambda g: saved.__setitem__("grad", g))

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x).float()
            probs = logits.detach().softmax(1)[0]
            k = int(probs.argmax()) if class_index is None else class_index
            if not 0 <= k < logits.shape[1]:
                raise UsageError(f"--class index {k} is outside 0..{logits.shape[1] - 1}")
            model.zero_grad(set_to_none=True)
            logits[0, k].backward()
    finally:
        handle.remove()
    if "grad" not in saved or saved["act"].dim() != 4:
        raise UsageError(f"--layer {layer}: its output is not a feature map that the class score depends on")
    act, grad = saved["act"].detach()[0].float(), saved["grad"][0].float()  # (C, h, w) each
    weights = grad.mean(dim=(1, 2))  # (C,): global-average-pooled gradients
    cam = F.relu((weights[:, None, None] * act).sum(0))  # (h, w)
    cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam / cam.max() if float(cam.max()) > 0 else cam
    return GradCam(cam.cpu(), k, float(probs[k]), layer)
