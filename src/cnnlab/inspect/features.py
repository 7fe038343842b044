"""What a trained CNN computes inside: convolution layers, their activation maps for one image, and Grad-CAM.

All functions take a model in eval mode and normalised input batches (B, C, H, W) as the model sees them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.errors import UsageError

MAX_STAGES = 8  # default activation pictures: at most this many layers


Hook = tuple[nn.Module, Callable[..., Any]]  # a module and a hook to register on it


def hooked_forward(model: nn.Module, x: torch.Tensor, hooks: Sequence[Hook] = (), pre_hooks: Sequence[Hook] = ()
                   ) -> torch.Tensor:  # fmt: skip
    """model(x) without gradients, with forward (and forward-pre) hooks registered for the call only; its output."""
    handles = [m.register_forward_pre_hook(h) for m, h in pre_hooks] + [m.register_forward_hook(h) for m, h in hooks]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


def calls_in_order(model: nn.Module, x: torch.Tensor, types: tuple[type, ...]) -> list[tuple[str, torch.Size]]:
    """(name, output shape) of every module of `types` with a 4-D output, in forward order (each name once)."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[str, torch.Size]] = []

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if names[module] not in {c[0] for c in calls} and isinstance(output, torch.Tensor) and output.dim() == 4:
            calls.append((names[module], output.shape))

    hooked_forward(model, x, [(m, hook) for m in model.modules() if isinstance(m, types)])
    return calls


def conv_layers_in_order(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Size]]:
    """(name, output shape) of every Conv2d in the order the forward pass calls them (a module called twice: once)."""
    return calls_in_order(model, x, (nn.Conv2d,))


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
    """The outputs of the named modules for input x (1, C, H, W): {name: (C', H', W')} on the CPU, in `layers` order."""
    _, outs, _ = layer_inputs_and_outputs(model, x, layers)
    return {name: outs[name] for name in layers if name in outs}


@dataclass
class GradCam:
    """A Grad-CAM heat map (H, W) in [0, 1] at input resolution, for one class, at one layer."""

    heatmap: torch.Tensor
    class_index: int
    prob: float
    layer: str


def grad_cam(model: nn.Module, x: torch.Tensor, layer: str | None = None, class_index: int | None = None,
             multi_label: bool = False) -> GradCam:  # fmt: skip
    """Grad-CAM (Selvaraju et al., 2017): ReLU(sum_c w_c A_c), w_c = mean gradient of the class score over A_c.

    `layer` defaults to the last convolution the forward pass calls (the last conv stage, the finest semantics
    that still has a spatial layout). `class_index` defaults to the predicted class. `multi_label`: the model's
    outputs are independent labels, and the probability reported is the label's sigmoid, not a softmax.
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
            probs = logits.detach().sigmoid()[0] if multi_label else logits.detach().softmax(1)[0]
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


STAGE_TYPES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
MAX_EXPLORE_LAYERS = 12


def stage_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Conv and pooling layers in forward order (for a deep network: the last conv of each stage)."""
    calls = calls_in_order(model, x, STAGE_TYPES)
    if len(calls) <= MAX_EXPLORE_LAYERS:
        return [n for n, _ in calls]
    convs = [(n, s) for n, s in calls if isinstance(model.get_submodule(n), nn.Conv2d)]
    return default_stages(convs)


def layer_inputs_and_outputs(
    model: nn.Module, x: torch.Tensor, layers: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """For input x (1, C, H, W): each named layer's input and output (first sample, CPU), and the model's logits."""
    hooks, ins, outs = _io_hooks(model, layers)
    return ins, outs, hooked_forward(model, x, hooks).float().cpu()


def _io_hooks(model: nn.Module, layers: Sequence[str]
              ) -> tuple[list[Hook], dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # fmt: skip
    """Hooks that keep each named layer's input and output, and the two dicts they fill."""
    check_layers(model, layers)
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks: list[Hook] = []
    for name in layers:

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
            if name not in outs and isinstance(output, torch.Tensor):
                # clone: a later in-place ReLU would overwrite what we keep (the conv's own output is wanted)
                ins[name] = inputs[0].detach()[0].float().cpu().clone()
                outs[name] = output.detach()[0].float().cpu().clone()

        hooks.append((modules[name], hook))
    return hooks, ins, outs


def layer_maps(model: nn.Module, x: torch.Tensor, layers: Sequence[str]
               ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, torch.Tensor]], torch.Tensor]:  # fmt: skip
    """One forward pass for the network view: each named layer's output, `activations_after`'s maps, the logits."""
    hooks, _, outs = _io_hooks(model, layers)
    pre, after, post = _activation_hooks(model, layers)
    return outs, post, hooked_forward(model, x, hooks + after, pre).float().cpu()


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid)  # fmt: skip
PASS_THROUGH = (nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout2d)  # between a conv and its activation


def activations_after(model: nn.Module, x: torch.Tensor, layers: Sequence[str]
                      ) -> dict[str, tuple[str, torch.Tensor]]:  # fmt: skip
    """For each named conv whose output goes (through batch norm at most) into an activation module, that module's
    name and output (first sample, CPU): the map after ReLU (or tanh, ...) next to the conv's own.

    Found from the leaf modules' calls: the activation must take the very tensor the conv (or its batch norm) gave,
    so a ReLU applied after a residual sum (ResNet's blocks) is not passed off as the conv's own. An activation
    applied as a function (F.relu) is not seen.
    """
    pre, after, post = _activation_hooks(model, layers)
    hooked_forward(model, x, after, pre)
    return post


def _activation_hooks(model: nn.Module, layers: Sequence[str]
                      ) -> tuple[list[Hook], list[Hook], dict[str, tuple[str, torch.Tensor]]]:  # fmt: skip
    """activations_after's pre-hooks and hooks on every leaf module, and the dict they fill."""
    wanted = set(layers)
    names = {m: n for n, m in model.named_modules()}
    post: dict[str, tuple[str, torch.Tensor]] = {}
    # The shown conv whose activation is awaited, the tensor that activation must take, and a copy of its values
    # (an in-place residual sum, `out += identity`, keeps the tensor but changes them).
    pending: list = [None, None, None]
    taking: list[bool] = [False]  # whether the module being called takes exactly that tensor

    def before(module: nn.Module, inputs: tuple) -> None:
        given = inputs[0] if inputs else None
        taking[0] = (pending[0] is not None and given is pending[1] and isinstance(given, torch.Tensor)
                     and torch.equal(given, pending[2]))  # fmt: skip

    def after(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = names[module]
        if pending[0] is not None and taking[0] and isinstance(output, torch.Tensor):
            if isinstance(module, ACTIVATIONS):
                post.setdefault(pending[0], (name, output.detach()[0].float().cpu().clone()))
                pending[:] = [None, None, None]
            elif isinstance(module, PASS_THROUGH):  # batch norm between the conv and its activation
                pending[1:] = [output, output.detach().clone()]
            else:
                pending[:] = [None, None, None]
        elif pending[0] is not None:
            pending[:] = [None, None, None]
        if name in wanted and isinstance(module, nn.Conv2d) and name not in post and isinstance(output, torch.Tensor):
            pending[:] = [name, output, output.detach().clone()]

    leaves = [m for m in model.modules() if not list(m.children())]
    return [(m, before) for m in leaves], [(m, after) for m in leaves], post


SKIPPED_IN_PIPELINE = (nn.Dropout, nn.Dropout2d, nn.Identity)  # the identity at evaluation: no stage of its own
LENET_NAMES = ("C1", "S2", "C3", "S4", "C5", "F6", "output")  # LeCun et al. (1998)'s names, in forward order


def pipeline(model: nn.Module, x: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
    """Every stage of the forward pass for one input x (1, C, H, W), in order: each leaf module called (dropout and
    identities left out, a module called twice shown once) with its name, type, output (first sample, CPU),
    parameter count and, for convolution and pooling, kernel, stride and padding; and the model's own output (its
    last module is not always its last step: squeezenet flattens after it)."""
    names = {m: n for n, m in model.named_modules()}
    rows: list[dict] = []
    seen: set[str] = set()

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        name = names[module]
        if name in seen or isinstance(module, SKIPPED_IN_PIPELINE) or not isinstance(output, torch.Tensor):
            return
        seen.add(name)
        row = {"name": name, "kind": type(module).__name__, "output": output.detach()[0].float().cpu().clone(),
               "params": sum(p.numel() for p in module.parameters())}  # fmt: skip
        if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            pair = nn.modules.utils._pair
            pad = module.padding if isinstance(module.padding, str) else list(pair(module.padding))
            row.update(kernel=list(pair(module.kernel_size)), stride=list(pair(module.stride or module.kernel_size)),
                       padding=pad)  # fmt: skip
        rows.append(row)

    out = hooked_forward(model, x, [(m, hook) for m in model.modules() if not list(m.children())])
    return rows, out.detach()[0].float().cpu()


def lecture_names(rows: list[dict], model_name: str) -> list[str | None]:
    """LeNet-5's stage names (C1, S2, C3, S4, C5, F6, output) on its convolutions, poolings and linear layers."""
    if not model_name.startswith("lenet5"):
        return [None] * len(rows)
    out: list[str | None] = []
    named = iter(LENET_NAMES)
    for row in rows:
        weighted = row["kind"] in ("Conv2d", "MaxPool2d", "AvgPool2d", "Linear")
        out.append(next(named, None) if weighted else None)
    return out


def stages(shapes: list[tuple[int, ...]]) -> list[int]:
    """A stage index per row: consecutive rows with the same spatial size (or all the vectors) form one stage."""
    out, stage, last = [], -1, None
    for shape in shapes:
        key = tuple(shape[1:]) if len(shape) == 3 else ("vector",)
        if key != last:
            stage, last = stage + 1, key
        out.append(stage)
    return out


def explain_pool_pixel(pool: nn.Module, inp: torch.Tensor, channel: int, y: int, x: int) -> dict:
    """What output pixel (channel, y, x) of a max or average pooling layer is, given its input (C, H, W): the window
    and, for max pooling, which value won (its row and column in the window); for average pooling the mean."""
    if not isinstance(pool, nn.MaxPool2d | nn.AvgPool2d):
        raise UsageError(f"{type(pool).__name__}: only MaxPool2d and AvgPool2d windows are shown")
    pair = nn.modules.utils._pair
    (kh, kw), (sh, sw), (ph, pw) = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size), pair(pool.padding)
    if (isinstance(pool, nn.MaxPool2d) and pair(pool.dilation) != (1, 1)) or pool.ceil_mode:
        raise UsageError("this pooling layer is dilated or rounds its output size up: its windows are not shown")
    if not 0 <= channel < inp.shape[0]:
        raise UsageError(f"channel {channel} outside 0..{inp.shape[0] - 1}")
    is_max = isinstance(pool, nn.MaxPool2d)
    fill = float("-inf") if is_max else 0.0  # max pooling pads with -inf, average pooling with zeros
    padded = F.pad(inp[channel].double(), (pw, pw, ph, ph), value=fill)
    out_h, out_w = (padded.shape[0] - kh) // sh + 1, (padded.shape[1] - kw) // sw + 1
    if not (0 <= y < out_h and 0 <= x < out_w):
        raise UsageError(f"pixel ({x}, {y}) outside the {out_w}x{out_h} output")
    window = padded[y * sh : y * sh + kh, x * sw : x * sw + kw]
    shown = torch.where(torch.isfinite(window), window, torch.zeros_like(window))  # -inf padding shown as 0
    result = {"channel": channel, "x": x, "y": y, "kind": "max" if is_max else "mean", "window": shown.tolist(),
              "origin": [y * sh - ph, x * sw - pw], "size": [kh, kw]}  # fmt: skip
    if is_max:
        flat = int(window.flatten().argmax())
        result.update(winner=[flat // kw, flat % kw], total=float(window.max()))
    else:
        inside = torch.ones_like(window)
        if not pool.count_include_pad:  # the mean over the window's real pixels only
            inside = F.pad(torch.ones_like(inp[channel]).double(), (pw, pw, ph, ph))[
                y * sh : y * sh + kh, x * sw : x * sw + kw
            ]
        divisor = pool.divisor_override or float(inside.sum())
        result.update(count=divisor, total=float(window.sum()) / divisor)
    return result


def explain_conv_pixel(conv: nn.Conv2d, inp: torch.Tensor, channel: int, y: int, x: int) -> dict:
    """The weighted sum behind output pixel (channel, y, x) of a conv layer, given its input (C_in, H, W).

    Uses the same code as `cnnlab filter --explain` on the zero-padded input: one window x kernel product grid per
    input channel of the group, their subtotals, the bias and the total (= the layer's output there).
    """
    from cnnlab.kernels import explain_pixel

    if conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UsageError("this layer uses dilation, non-zero or named padding: its sums are not shown")
    out_c = conv.out_channels
    if not 0 <= channel < out_c:
        raise UsageError(f"channel {channel} outside 0..{out_c - 1}")
    (ph, pw), (sh, sw) = conv.padding, conv.stride
    padded = F.pad(inp, (pw, pw, ph, ph))  # (C_in, H + 2ph, W + 2pw)
    kh, kw = conv.kernel_size
    out_h, out_w = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
    if not (0 <= y < out_h and 0 <= x < out_w):
        raise UsageError(f"pixel ({x}, {y}) outside the {out_w}x{out_h} output")
    per_group = conv.in_channels // conv.groups
    first = (channel // (out_c // conv.groups)) * per_group
    weight = conv.weight.detach().double().cpu()[channel]  # (C_in / groups, kh, kw)
    terms = []
    for i in range(per_group):
        e = explain_pixel(padded[first + i : first + i + 1], weight[i].numpy(), x * sw, y * sh, padding="valid")[0]
        terms.append({"input_channel": first + i, "window": e.window.tolist(), "kernel": e.kernel.tolist(),
                      "products": e.products.tolist(), "subtotal": e.total})  # fmt: skip
    bias = float(conv.bias.detach()[channel]) if conv.bias is not None else 0.0
    # origin: the window's top-left in the (unpadded) input, negative where it overlaps the zero padding.
    return {"channel": channel, "x": x, "y": y, "terms": terms, "bias": bias, "kind": "conv",
            "total": sum(t["subtotal"] for t in terms) + bias, "origin": [y * sh - ph, x * sw - pw],
            "size": [kh, kw]}  # fmt: skip
