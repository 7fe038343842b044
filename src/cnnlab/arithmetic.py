"""Convolution and pooling arithmetic: output shapes (torch's formulas), parameters, MACs, receptive fields.

    conv / pool:      out = floor((in + 2p - d(k - 1) - 1) / s) + 1
    pool, ceil_mode:  out = ceil((in + 2p - d(k - 1) - 1) / s) + 1, minus 1 if that last window would start in
                      the right padding ((out - 1)s >= in + p)
    transposed conv:  out = (in - 1)s - 2p + d(k - 1) + output_padding + 1

padding='same' (stride 1) pads d(k - 1) in all, half on each side; for an even total torch puts the extra row /
column at the bottom / right, as nn.Conv2d(padding='same') does.

Shapes are (C, H, W) as torch writes them; the lecture writes H x W x C (32x32x3 -> 28x28x6).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from cnnlab.errors import UsageError

Shape = tuple[int, int, int]  # (C, H, W)


class ShapeError(UsageError):
    """An impossible layer configuration (exit code 2)."""


def conv_output_size(n: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    """torch's output length for Conv2d / MaxPool2d / AvgPool2d along one axis (may be <= 0 if impossible)."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def tconv_output_size(n: int, k: int, s: int = 1, p: int = 0, d: int = 1, output_padding: int = 0) -> int:
    """torch's output length for ConvTranspose2d along one axis."""
    return (n - 1) * s - 2 * p + d * (k - 1) + output_padding + 1


def pool_output_size(n: int, k: int, s: int, p: int = 0, d: int = 1, ceil_mode: bool = False) -> int:
    """torch's output length for pooling, including ceil_mode's rule that the last window starts inside."""
    if not ceil_mode:
        return conv_output_size(n, k, s, p, d)
    out = _ceil_div(n + 2 * p - d * (k - 1) - 1, s) + 1
    if _drops_last_window(n, s, p, out):
        out -= 1
    return out


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)  # exact for any size, unlike math.ceil(a / b) through a float


def _drops_last_window(n: int, s: int, p: int, out: int) -> bool:
    """ceil_mode: torch drops the last window when it would start in the right padding (not inside input + left pad)."""
    return (out - 1) * s >= n + p


def parse_shape(text: str, option: str = "--input") -> Shape:
    """'3x32x32', '3,32,32' (C, H, W) or '32x32' (one channel) -> (C, H, W)."""
    parts = [p for p in re.split(r"[x,×\s]+", text.strip().lower()) if p]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ShapeError(f"{option} {text!r}: expected C x H x W such as 3x32x32") from None
    if len(nums) == 2:
        nums = [1, *nums]
    if len(nums) != 3 or min(nums) < 1:
        raise ShapeError(f"{option} {text!r}: expected three positive sizes C x H x W such as 3x32x32")
    return (nums[0], nums[1], nums[2])


def fmt_shape(shape: tuple[int, ...]) -> str:
    """(6, 28, 28) -> '6x28x28'."""
    return "x".join(str(v) for v in shape)


def lecture_shape(shape: Shape) -> str:
    """(6, 28, 28) -> '28x28x6', the H x W x C order of the lecture's pictures."""
    c, h, w = shape
    return f"{h}x{w}x{c}"


@dataclass(frozen=True)
class Layer:
    """One layer of a `--layers` stack."""

    kind: str  # conv, tconv, pool, fc, gap, flatten, bn, relu, tanh, sigmoid, dropout
    out: int = 0  # conv/tconv: out channels; fc: out features
    k: tuple[int, int] = (1, 1)
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] | str = (0, 0)  # or 'same' / 'valid'
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    pool: str = "max"
    output_padding: tuple[int, int] = (0, 0)
    ceil_mode: bool = False
    text: str = ""


@dataclass
class LayerRow:
    """The walk's answer for one layer."""

    index: int
    layer: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    macs: int
    receptive_field: tuple[int, int] | None  # (rows, cols) of input pixels one output unit sees; None = all
    formula: list[str] = field(default_factory=list)
    padding: tuple[tuple[int, int], tuple[int, int]] | None = None  # ((top, bottom), (left, right)) of conv/pool


_KINDS = ("conv", "tconv", "pool", "fc", "gap", "flatten", "bn", "relu", "tanh", "sigmoid", "dropout")
_NOOP = ("relu", "tanh", "sigmoid", "dropout")


def _pair(text: str, what: str, layer: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in re.split(r"[x×]", text)]
    except ValueError:
        raise ShapeError(f"layer {layer!r}: {what} {text!r} is not a whole number") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise ShapeError(f"layer {layer!r}: {what} {text!r} should be N or HxW")
    return parts[0], parts[1]


_KEYS = {"s": "stride", "stride": "stride", "p": "padding", "padding": "padding", "d": "dilation",
         "dilation": "dilation", "g": "groups", "groups": "groups", "bias": "bias", "op": "output_padding",
         "output_padding": "output_padding", "ceil": "ceil_mode"}  # fmt: skip


def parse_layer(text: str) -> Layer:
    """Parse one layer: 'conv 6 5 s=1 p=same', 'pool max 2', 'tconv 3 4 s=2 p=1', 'fc 120', 'gap', 'bn', 'relu'."""
    tokens = text.split()
    if not tokens:
        raise ShapeError("empty layer in --layers (two ';' in a row?)")
    kind = tokens[0].lower()
    if kind not in _KINDS:
        raise ShapeError(f"layer {text!r}: unknown kind {kind!r}; use one of {', '.join(_KINDS)}")
    positional = [t for t in tokens[1:] if "=" not in t]
    options: dict[str, object] = {}
    for token in (t for t in tokens[1:] if "=" in t):
        key, _, value = token.partition("=")
        name = _KEYS.get(key.lower())
        if name is None:
            raise ShapeError(f"layer {text!r}: unknown option {key!r}; use s=, p=, d=, g=, op=, bias=, ceil=")
        if name == "padding" and value.lower() in ("same", "valid"):
            options[name] = value.lower()
        elif name in ("groups",):
            options[name] = _pair(value, name, text)[0]
        elif name in ("bias", "ceil_mode"):
            options[name] = value.lower() not in ("0", "false", "no")
        else:
            options[name] = _pair(value, name, text)
    if kind == "pool":
        if not positional or positional[0].lower() not in ("max", "avg"):
            raise ShapeError(f"layer {text!r}: write 'pool max K' or 'pool avg K'")
        if len(positional) != 2:
            raise ShapeError(f"layer {text!r}: pooling needs a window size, e.g. 'pool max 2'")
        return Layer(kind, k=_pair(positional[1], "window", text), pool=positional[0].lower(), text=text, **options)  # type: ignore[arg-type]
    if kind in ("conv", "tconv"):
        if len(positional) != 2:
            raise ShapeError(f"layer {text!r}: write '{kind} OUT_CHANNELS KERNEL', e.g. '{kind} 6 5'")
        out = _pair(positional[0], "out channels", text)[0]
        return Layer(kind, out=out, k=_pair(positional[1], "kernel", text), text=text, **options)  # type: ignore[arg-type]
    if kind == "fc":
        if len(positional) != 1:
            raise ShapeError(f"layer {text!r}: write 'fc OUT_FEATURES', e.g. 'fc 120'")
        return Layer(kind, out=_pair(positional[0], "features", text)[0], text=text, **options)  # type: ignore[arg-type]
    if positional or options:
        raise ShapeError(f"layer {text!r}: {kind} takes no arguments")
    return Layer(kind, text=text)


def parse_layers(text: str) -> list[Layer]:
    """Parse a ';'-separated stack of layers."""
    parts = [p.strip() for p in text.split(";")]
    if parts and parts[-1] == "":
        parts.pop()
    if not parts:
        raise ShapeError("--layers is empty")
    return [parse_layer(p) for p in parts]


Padding = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))


def _resolve_padding(layer: Layer, where: str) -> Padding:
    """Numbers per side; 'same' splits d(k - 1) as torch does: the odd pixel goes to the bottom / right."""
    if layer.padding == "valid":
        return ((0, 0), (0, 0))
    if layer.padding == "same":
        if (layer.stride or (1, 1)) != (1, 1):
            raise ShapeError(f"{where}: padding 'same' needs stride 1 (torch refuses strided 'same')")
        sides = []
        for k, d in zip(layer.k, layer.dilation, strict=True):
            total = d * (k - 1)
            if total % 2 and layer.kind == "pool":
                raise ShapeError(
                    f"{where}: pooling with padding 'same' and an even window ({k}) would pad one side more, and "
                    "torch's pools take the same padding on both sides; give a number"
                )
            sides.append((total // 2, total - total // 2))
        return (sides[0], sides[1])
    ph, pw = layer.padding  # type: ignore[misc]
    return ((ph, ph), (pw, pw))


def _same_note(layer: Layer, pad: Padding) -> list[str]:
    """The formula line that says how 'same' padding was split (torch pads an even kernel asymmetrically)."""
    if layer.padding != "same":
        return []
    (top, bottom), (left, right) = pad
    if top == bottom and left == right:
        return [f"padding 'same': {top} top and bottom, {left} left and right"]
    return [f"padding 'same': {top} top + {bottom} bottom, {left} left + {right} right "
            "(torch puts the odd row/column at the bottom/right)"]  # fmt: skip


def _check_positive(layer: Layer, where: str) -> None:
    for name in ("k", "dilation"):
        if min(getattr(layer, name)) < 1:
            raise ShapeError(f"{where}: {name.replace('k', 'kernel')} must be at least 1")
    if layer.stride is not None and min(layer.stride) < 1:
        raise ShapeError(f"{where}: stride must be at least 1")
    if isinstance(layer.padding, tuple) and min(layer.padding) < 0:
        raise ShapeError(f"{where}: padding cannot be negative")
    if layer.kind in ("conv", "tconv", "fc") and layer.out < 1:
        raise ShapeError(f"{where}: needs at least 1 output {'feature' if layer.kind == 'fc' else 'channel'}")


def _formula(axis: str, n: int, k: int, s: int, p: tuple[int, int], d: int, out: int, ceil: bool = False,
             dropped: bool = False) -> str:  # fmt: skip
    """One axis's arithmetic, printed so that evaluating it gives `out` (floor, or ceil for ceil_mode pooling)."""
    pads = f"2*{p[0]}" if p[0] == p[1] else f"{p[0]} + {p[1]}"
    rounding = "ceil" if ceil else "floor"
    return f"{axis}_out = {rounding}(({n} + {pads} - {d}*({k} - 1) - 1) / {s}) + 1{' - 1' if dropped else ''} = {out}"


def _tformula(axis: str, n: int, k: int, s: int, p: int, d: int, out: int, op: int) -> str:
    return f"{axis}_out = ({n} - 1)*{s} - 2*{p} + {d}*({k} - 1) + {op} + 1 = {out}"


def walk(layers: list[Layer], input_shape: Shape) -> list[LayerRow]:
    """Shapes, parameters, MACs and receptive field after each layer; ShapeError names the failing layer."""
    rows: list[LayerRow] = []
    shape: tuple[int, ...] = input_shape
    rf: tuple[float, float] | None = (1, 1)
    jump: tuple[float, float] = (1, 1)
    for i, layer in enumerate(layers, 1):
        where = f"layer {i} ({layer.text})"
        _check_positive(layer, where)
        row = _walk_one(layer, shape, where)
        rf, jump = _receptive(layer, rf, jump)
        row.index = i
        row.receptive_field = None if rf is None else (int(rf[0]), int(rf[1]))
        rows.append(row)
        shape = row.out_shape
    return rows


def _walk_one(layer: Layer, shape: tuple[int, ...], where: str) -> LayerRow:
    kind = layer.kind
    if kind == "fc":
        n_in = math.prod(shape)
        params = n_in * layer.out + (layer.out if layer.bias else 0)
        return LayerRow(
            0,
            layer.text,
            shape,
            (layer.out,),
            params,
            n_in * layer.out,
            None,
            [f"params = {n_in} x {layer.out} + {layer.out if layer.bias else 0} = {params:,}"],
        )
    if kind == "flatten":
        return LayerRow(0, layer.text, shape, (math.prod(shape),), 0, 0, None)
    if kind in _NOOP:
        return LayerRow(0, layer.text, shape, shape, 0, 0, None)
    if kind == "bn":
        return LayerRow(0, layer.text, shape, shape, 2 * shape[0], 0, None, [f"params = 2 x {shape[0]} (scale, shift)"])
    if len(shape) != 3:
        raise ShapeError(
            f"{where}: needs (C, H, W) maps but gets a flat vector of {shape[0]}; put it before the first fc/flatten"
        )
    c, _h, _w = shape
    if kind == "gap":
        return LayerRow(0, layer.text, shape, (c, 1, 1), 0, 0, None)
    if kind == "pool":
        return _walk_pool(layer, shape, where)
    return _walk_conv(layer, shape, where)


def _walk_pool(layer: Layer, shape: tuple[int, ...], where: str) -> LayerRow:
    c, h, w = shape
    stride = layer.stride or layer.k
    pad = _resolve_padding(layer, where)
    for k, (p, _) in zip(layer.k, pad, strict=True):
        if p > k // 2:
            raise ShapeError(f"{where}: padding {p} is more than half the window {k} (torch refuses this)")
    if layer.pool == "avg" and layer.dilation != (1, 1):
        raise ShapeError(f"{where}: average pooling has no dilation")
    out_h = pool_output_size(h, layer.k[0], stride[0], pad[0][0], layer.dilation[0], layer.ceil_mode)
    out_w = pool_output_size(w, layer.k[1], stride[1], pad[1][0], layer.dilation[1], layer.ceil_mode)
    if out_h < 1 or out_w < 1:
        raise ShapeError(
            f"{where}: output would be {out_h}x{out_w}: a {layer.k[0]}x{layer.k[1]} window does not "
            f"fit the {h}x{w} input"
        )
    formula, notes = [], []
    for axis, n, k, s, p, d, out in (("H", h, layer.k[0], stride[0], pad[0], layer.dilation[0], out_h),
                                     ("W", w, layer.k[1], stride[1], pad[1], layer.dilation[1], out_w)):  # fmt: skip
        ceiled = _ceil_div(n + 2 * p[0] - d * (k - 1) - 1, s) + 1
        dropped = layer.ceil_mode and _drops_last_window(n, s, p[0], ceiled)
        formula.append(_formula(axis, n, k, s, p, d, out, layer.ceil_mode, dropped))
        if dropped:
            notes.append(f"{axis}: the last ceil-mode window would start at {(ceiled - 1) * s}, past the input and "
                         f"its left padding ({n} + {p[0]}): torch drops it")  # fmt: skip
    return LayerRow(0, layer.text, shape, (c, out_h, out_w), 0, 0, None, [*formula, *notes, "params = 0"],
                    padding=pad)  # fmt: skip


def _walk_conv(layer: Layer, shape: tuple[int, ...], where: str) -> LayerRow:
    c, h, w = shape
    g = layer.groups
    if g < 1 or c % g or layer.out % g:
        raise ShapeError(
            f"{where}: groups={g} must divide both the input channels ({c}) and the output channels ({layer.out})"
        )
    stride = layer.stride or (1, 1)
    if layer.kind == "tconv":
        if layer.padding in ("same", "valid"):
            raise ShapeError(f"{where}: transposed convolutions take a number for the padding")
        pad, op = layer.padding, layer.output_padding
        sides = ((pad[0], pad[0]), (pad[1], pad[1]))
        for o, s, d in zip(op, stride, layer.dilation, strict=True):
            if o >= max(s, d):
                raise ShapeError(f"{where}: output_padding {o} must be smaller than the stride or the dilation")
        out_h = tconv_output_size(h, layer.k[0], stride[0], pad[0], layer.dilation[0], op[0])
        out_w = tconv_output_size(w, layer.k[1], stride[1], pad[1], layer.dilation[1], op[1])
        formula = [
            _tformula("H", h, layer.k[0], stride[0], pad[0], layer.dilation[0], out_h, op[0]),
            _tformula("W", w, layer.k[1], stride[1], pad[1], layer.dilation[1], out_w, op[1]),
        ]
    else:
        sides = _resolve_padding(layer, where)
        (top, bottom), (left, right) = sides
        # The padded length n + top + bottom, as torch computes it: the same formula with 2p split per side.
        out_h = conv_output_size(h + top + bottom, layer.k[0], stride[0], 0, layer.dilation[0])
        out_w = conv_output_size(w + left + right, layer.k[1], stride[1], 0, layer.dilation[1])
        formula = [
            _formula("H", h, layer.k[0], stride[0], sides[0], layer.dilation[0], out_h),
            _formula("W", w, layer.k[1], stride[1], sides[1], layer.dilation[1], out_w),
            *_same_note(layer, sides),
        ]
    if out_h < 1 or out_w < 1:
        raise ShapeError(
            f"{where}: output would be {out_h}x{out_w}: the {layer.k[0]}x{layer.k[1]} kernel "
            f"(dilation {layer.dilation[0]}) does not fit the padded {h}x{w} input"
        )
    kk = layer.k[0] * layer.k[1]
    per_filter = (c // g) * kk
    params = layer.out * per_filter + (layer.out if layer.bias else 0)
    formula.append(
        f"params = {layer.out} filters x ({c // g}x{layer.k[0]}x{layer.k[1]} weights"
        f"{' + 1 bias' if layer.bias else ''}) = {params:,}"
    )
    macs = h * w * c * (layer.out // g) * kk if layer.kind == "tconv" else out_h * out_w * layer.out * per_filter
    return LayerRow(0, layer.text, shape, (layer.out, out_h, out_w), params, macs, None, formula, sides)


def _receptive(
    layer: Layer, rf: tuple[float, float] | None, jump: tuple[float, float]
) -> tuple[tuple[float, float] | None, tuple[float, float]]:
    """Receptive field r and jump j (input pixels between neighbouring units): r += (k_eff - 1) * j; j *= s."""
    if rf is None or layer.kind in ("fc", "gap", "flatten"):
        return None, jump
    if layer.kind not in ("conv", "tconv", "pool"):
        return rf, jump
    stride = layer.stride or (layer.k if layer.kind == "pool" else (1, 1))
    new_rf, new_jump = [], []
    for axis in range(2):
        k_eff = layer.dilation[axis] * (layer.k[axis] - 1) + 1
        if layer.kind == "tconv":
            j = jump[axis] / stride[axis]
            new_rf.append(rf[axis] + (k_eff - 1) * j)
            new_jump.append(j)
        else:
            new_rf.append(rf[axis] + (k_eff - 1) * jump[axis])
            new_jump.append(jump[axis] * stride[axis])
    return (new_rf[0], new_rf[1]), (new_jump[0], new_jump[1])


def conv_output_shape(
    input_shape: Shape,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int | str = 0,
    dilation: int = 1,
    groups: int = 1,
) -> Shape:
    """Output (C, H, W) of nn.Conv2d(in, out_channels, kernel_size, stride, padding, dilation, groups)."""
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    pad: tuple[int, int] | str = padding if isinstance(padding, str) else (padding, padding)
    layer = Layer(
        "conv",
        out=out_channels,
        k=k,
        stride=(stride, stride),
        padding=pad,
        dilation=(dilation, dilation),
        groups=groups,
        text=f"conv {out_channels} {k[0]}x{k[1]}",
    )
    return walk([layer], input_shape)[0].out_shape  # type: ignore[return-value]


def pool_output_shape(
    input_shape: Shape,
    kernel_size: int,
    stride: int | None = None,
    padding: int = 0,
    dilation: int = 1,
    ceil_mode: bool = False,
    kind: str = "max",
) -> Shape:
    """Output (C, H, W) of nn.MaxPool2d / nn.AvgPool2d with these arguments."""
    s = stride or kernel_size
    layer = Layer(
        "pool",
        k=(kernel_size, kernel_size),
        stride=(s, s),
        padding=(padding, padding),
        dilation=(dilation, dilation),
        ceil_mode=ceil_mode,
        pool=kind,
        text=f"pool {kind} {kernel_size}",
    )
    return walk([layer], input_shape)[0].out_shape  # type: ignore[return-value]


def build_stack(layers: list[Layer], input_shape: Shape) -> Any:
    """Real torch modules for a layer stack (checked by walk() first): the same arithmetic, as nn.Sequential."""
    from torch import nn

    rows = walk(layers, input_shape)
    modules: list[nn.Module] = []
    shape: tuple[int, ...] = input_shape
    for layer, row in zip(layers, rows, strict=True):
        modules.append(_module_for(layer, shape, nn))
        shape = row.out_shape
    return nn.Sequential(*modules)


def _module_for(layer: Layer, shape: tuple[int, ...], nn: Any) -> Any:
    k, d = layer.k, layer.dilation
    if layer.kind == "conv":
        return nn.Conv2d(shape[0], layer.out, k, layer.stride or 1, layer.padding, d, layer.groups, layer.bias)
    if layer.kind == "tconv":
        return nn.ConvTranspose2d(shape[0], layer.out, k, layer.stride or 1, layer.padding, layer.output_padding,
                                  layer.groups, layer.bias, d)  # fmt: skip
    if layer.kind == "pool":
        # torch's pools take numbers only: 'same' / 'valid' as the symmetric numbers walk() resolved them to.
        sides = _resolve_padding(layer, layer.text)
        pad = (sides[0][0], sides[1][0])
        if layer.pool == "max":
            return nn.MaxPool2d(k, layer.stride or k, pad, d, ceil_mode=layer.ceil_mode)
        return nn.AvgPool2d(k, layer.stride or k, pad, ceil_mode=layer.ceil_mode)
    if layer.kind == "fc":
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), layer.out, layer.bias))
    simple = {"gap": lambda: nn.AdaptiveAvgPool2d(1), "flatten": nn.Flatten, "relu": nn.ReLU, "tanh": nn.Tanh,
              "sigmoid": nn.Sigmoid, "dropout": nn.Dropout,
              "bn": lambda: nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])}  # fmt: skip
    return simple[layer.kind]()
