"""cnn-fast: a CNN shaped for time-to-accuracy on small images, the model of the `fast` and `accurate` recipes.

Each stage is conv3x3 -> max-pool 2 -> BatchNorm -> ReLU: pooling *before* normalising leaves BN and ReLU a quarter of
the pixels (on 2 CPU cores the full-resolution BN/ReLU/pool work costs more than the convolutions). The first stage is
narrow (16 maps at full resolution, where compute is dearest); the width grows as the resolution falls. A stage may
add more conv3x3-BN-ReLU layers at its pooled resolution. Global max pooling and one linear layer make the head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnlab.errors import UsageError
from cnnlab.models.options import MAX_CHANNELS, MAX_CONV_LAYERS, check_weights_fit
from cnnlab.models.registry import register_model


def _whole(value: object) -> int:
    """'16', 16 and 16.0 (a whole float from --model-args) -> 16; 2.5, nan, True and 'x' -> ValueError/TypeError."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)  # type: ignore[call-overload]


def _int_list(value: int | str | Sequence[int], option: str) -> tuple[int, ...]:
    """16-64-128 / '16,64' / [16, 64] / 16 -> a tuple of positive ints (UsageError naming the option otherwise)."""
    if isinstance(value, str):
        parts = [p for p in value.replace(",", "-").split("-") if p.strip()]
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = list(value)
    try:
        out = tuple(_whole(p) for p in parts)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"cnn-fast: {option} must be numbers like 16-64-128, got {value!r}") from None
    if not out or min(out) < 1:
        raise UsageError(f"cnn-fast: {option} must be one or more numbers >= 1, got {value!r}")
    return out


class FastCNN(nn.Module):
    """Stages of [conv3x3 -> max-pool -> BN -> ReLU] + (depth - 1) x [conv3x3 -> BN -> ReLU]; max pool -> linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 widths: int | str | Sequence[int] = (16, 64, 128),
                 depth: int | str | Sequence[int] = 1) -> None:  # fmt: skip
        super().__init__()
        widths = _int_list(widths, "widths")
        depths = _int_list(depth, "depth")
        if len(depths) == 1:
            depths = depths * len(widths)
        if len(depths) != len(widths):
            raise UsageError(f"cnn-fast: depth needs one number or one per stage ({len(widths)}), got {depth!r}")
        _check_size(widths, depths, in_channels, num_classes)
        layers: list[nn.Module] = []
        c_in, side = in_channels, image_size
        for c_out, n in zip(widths, depths, strict=True):
            # bias=False: the BatchNorm shift that follows makes a conv bias redundant.
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
            if side >= 2:  # pool while there is resolution to spare (tiny inputs keep their last pixel)
                layers.append(nn.MaxPool2d(2))
                side //= 2
            layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            for _ in range(n - 1):
                conv = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
                layers += [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, widths[-1], H / 2^stages, W / 2^stages)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps -> logits (B, num_classes)."""
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_size(widths: tuple[int, ...], depths: tuple[int, ...], in_channels: int, num_classes: int) -> None:
    """At most MAX_CHANNELS maps and MAX_CONV_LAYERS convs, and weights that fit in memory, before building."""
    text = "-".join(map(str, widths))
    if max(widths) > MAX_CHANNELS:
        raise UsageError(f"cnn-fast: widths {text}: at most {MAX_CHANNELS:,} channels per stage")
    if sum(depths) > MAX_CONV_LAYERS:
        shown = depths[0] if len(set(depths)) == 1 else "-".join(map(str, depths))
        raise UsageError(f"cnn-fast: depth {shown} makes {sum(depths):,} conv layers; at most {MAX_CONV_LAYERS:,}")
    params, c_in = 0, in_channels
    for c_out, n in zip(widths, depths, strict=True):
        params += (c_in * c_out + (n - 1) * c_out * c_out) * 9 + n * 2 * c_out  # 3x3 convs (no bias) + BatchNorms
        c_in = c_out
    depth = depths[0] if len(set(depths)) == 1 else "-".join(map(str, depths))
    check_weights_fit(f"cnn-fast with widths {text}, depth {depth}", params + c_in * num_classes + num_classes)


@register_model(
    "cnn-fast", family="cnn-fast", default_image_size=28, default_in_channels=1, tags=("ours",),
    description="CNN shaped for speed (the fast/accurate recipes): conv3x3 -> max-pool -> BN -> ReLU per stage, "
    "narrow at full resolution, global max pool (options: widths=16-64-128, depth=1 or one per stage)",
)  # fmt: skip
def cnn_fast(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    *,
    widths: int | str | Sequence[int] = (16, 64, 128),
    depth: int | str | Sequence[int] = 1,
) -> FastCNN:
    """The speed-shaped CNN (widths 16-64-128, one conv per stage: 84,794 params for 10 classes, 1 channel)."""
    return FastCNN(num_classes, in_channels, image_size, widths, depth)
