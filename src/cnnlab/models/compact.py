"""cnn-compact: the best-practice CNN builder of the lecture, every choice a parameter.

Stages of stacked 3x3 convolutions (stride 1, 'same' padding) with BatchNorm and a selectable activation; the
width doubles per stage; max pooling and dropout between stages; global average pooling and a dense head.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.errors import UsageError
from cnnlab.models.options import MAX_CHANNELS, MAX_CONV_LAYERS, check_weights_fit, fraction, whole_number
from cnnlab.models.registry import register_model

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "gelu": nn.GELU}


class CompactCNN(nn.Module):
    """[conv3x3-BN-act] x convs_per_stage, then max-pool + dropout, per stage; GAP -> dropout -> linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: int = 32,
                 stages: int = 3, convs_per_stage: int = 2, act: str = "relu", dropout: float = 0.25,
                 head_dropout: float = 0.5) -> None:  # fmt: skip
        super().__init__()
        width, stages, convs_per_stage = _check_size(width, stages, convs_per_stage, in_channels, num_classes)
        if act not in ACTIVATIONS:
            raise UsageError(f"cnn-compact: act must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
        dropout = fraction("cnn-compact", "dropout", dropout)
        head_dropout = fraction("cnn-compact", "head_dropout", head_dropout)
        layers: list[nn.Module] = []
        c_in, side = in_channels, image_size
        for stage in range(stages):
            c_out = width * 2**stage
            for _ in range(convs_per_stage):
                # bias=False: BatchNorm's shift makes a conv bias redundant.
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), ACTIVATIONS[act]()]
                c_in = c_out
            if stage < stages - 1 and side >= 2:  # pool between stages while there is resolution to spare
                layers += [nn.MaxPool2d(2), nn.Dropout2d(dropout) if dropout else nn.Identity()]
                side //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(head_dropout), nn.Linear(c_in, num_classes)
        )
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, width * 2^(stages-1), H / 2^(stages-1), W / 2^(stages-1))."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps -> logits (B, num_classes)."""
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_size(width: object, stages: object, convs: object, in_channels: int, num_classes: int) -> tuple[int, ...]:
    """Whole numbers >= 1, at most MAX_CHANNELS maps and MAX_CONV_LAYERS convs, weights that fit in memory."""
    w, n, c = (whole_number("cnn-compact", k, v) for k, v in (("width", width), ("stages", stages),
                                                              ("convs_per_stage", convs)))  # fmt: skip
    if w * 2 ** (n - 1) > MAX_CHANNELS:
        raise UsageError(f"cnn-compact: width x 2^(stages - 1) = {w} x 2^{n - 1} channels in the last stage; "
                         f"at most {MAX_CHANNELS:,}")  # fmt: skip
    if n * c > MAX_CONV_LAYERS:
        raise UsageError(f"cnn-compact: stages x convs_per_stage = {n * c:,} conv layers; at most {MAX_CONV_LAYERS:,}")
    params, c_in = 0, in_channels
    for stage in range(n):
        c_out = w * 2**stage
        params += (c_in * c_out + (c - 1) * c_out * c_out) * 9 + c * 2 * c_out  # 3x3 convs (no bias) + BatchNorms
        c_in = c_out
    check_weights_fit(f"cnn-compact with width {w}, stages {n}, convs_per_stage {c}",
                      params + c_in * num_classes + num_classes)  # fmt: skip
    return w, n, c


@register_model(
    "cnn-compact", family="cnn-compact", default_image_size=28, default_in_channels=1, tags=("ours",),
    description="best-practice CNN: stacked 3x3 conv + BN + ReLU, width doubling per stage, max pool + dropout, "
    "GAP head (options: width, stages, convs_per_stage, act, dropout, head_dropout)",
)  # fmt: skip
def cnn_compact(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, *, width: int = 32,
                stages: int = 3, convs_per_stage: int = 2, act: str = "relu", dropout: float = 0.25,
                head_dropout: float = 0.5) -> CompactCNN:  # fmt: skip
    """The compact best-practice CNN (width 32, 3 stages of 2 convs: 288,170 params for 10 classes, 1 channel)."""
    return CompactCNN(num_classes, in_channels, image_size, width, stages, convs_per_stage, act, dropout, head_dropout)
