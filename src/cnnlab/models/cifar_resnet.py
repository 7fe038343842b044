"""ResNet-20/32/44/56/110 for 32x32 images (He, Zhang, Ren, Sun 2016, section 4.2).

3x3 conv (16) -> three stages of n basic blocks with 16, 32, 64 channels (stride 2 at the start of stages 2 and
3) -> global average pooling -> linear; depth = 6n + 2. Shortcuts are the paper's option A: identity, with
stride-2 subsampling and zero-padded channels where the shape changes, so they add no parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.models.registry import register_model


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by `stride`, then zero-pad channels up to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Pad the channel dimension (dim 1) with extra/2 zero maps on each side, as in the paper's option A.
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        same = stride == 1 and in_channels == out_channels
        self.shortcut: nn.Module = nn.Identity() if same else ShortcutA(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        c_in = 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 32, 32) -> (B, 64, 8, 8)."""
        return self.layers(F.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 64, h, w) -> logits (B, num_classes)."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _register(depth: int) -> None:
    @register_model(
        f"resnet{depth}", family="ResNet (CIFAR)", default_image_size=32, default_in_channels=3, tags=("ours",),
        description=f"ResNet-{depth} for 32x32 images (He et al. 2016): {(depth - 2) // 6} blocks per stage, "
        "16/32/64 channels, option-A shortcuts",
    )  # fmt: skip
    def build(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
        return CifarResNet(depth, num_classes, in_channels)


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
