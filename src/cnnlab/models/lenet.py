"""LeNet-5 as published (LeCun, Bottou, Bengio, Haffner 1998) and a modern ReLU/max-pool variant.

Paper-faithful pieces of `lenet5`: 32x32 input (28x28 digits are centred on a 32x32 field), the scaled
tanh f(a) = 1.7159 tanh(2a/3) after every layer up to F6, trainable subsampling (sum of each 2x2 block,
times a per-map coefficient, plus a per-map bias), C3's partial connection table (Table I of the paper),
C5 as a 5x5 convolution, uniform(-2.4/fan_in, 2.4/fan_in) initialisation, and an output layer of
Euclidean RBF units whose centres are fixed 7x12 bitmaps of the digits, drawn for cnnlab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.models.registry import register_model

# Table I of the paper: which S2 maps (0..5) feed each of the 16 C3 maps. 60 connections in all.
C3_TABLE: tuple[tuple[int, ...], ...] = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)  # fmt: skip

# RBF centres of the ten digit classes ('#' = +1, '.' = -1): stylised 7x12 digits as in the paper, drawn for cnnlab.
# Ten 7x12 pictures side by side, digits 0..9 left to right; each row of the block is one bitmap row.
_DIGIT_PICTURE = """
.#####. ...#... .#####. .#####. ....##. ####### .#####. ####### .#####. .#####.
##...## ..##... #.....# #.....# ...#.#. #...... #...... ......# #.....# #.....#
#.....# .#.#... ......# ......# ..#..#. #...... #...... .....#. #.....# #.....#
#.....# ...#... ......# ......# .#...#. #...... #...... .....#. #.....# #.....#
#.....# ...#... .....#. ..####. #....#. ######. ######. ....#.. .#####. #.....#
#.....# ...#... ....#.. ......# ####### ......# #.....# ....#.. #.....# .######
#.....# ...#... ...#... ......# .....#. ......# #.....# ...#... #.....# ......#
#.....# ...#... ..#.... ......# .....#. ......# #.....# ...#... #.....# ......#
#.....# ...#... .#..... ......# .....#. ......# #.....# ..#.... #.....# ......#
##...## ...#... #...... #.....# .....#. #.....# #.....# ..#.... #.....# #.....#
.#####. .#####. ####### .#####. .....#. .#####. .#####. ..#.... .#####. .#####.
....... ....... ....... ....... ....... ....... ....... ....... ....... .......
"""
_DIGIT_BITMAPS: tuple[str, ...] = tuple(
    "".join(row.split(" ")[d] for row in _DIGIT_PICTURE.strip().splitlines()) for d in range(10)
)
F6_UNITS = 84  # = 7 x 12, the size of one bitmap


def scaled_tanh(a: torch.Tensor) -> torch.Tensor:
    """The paper's squashing function f(a) = A tanh(S a) with A = 1.7159, S = 2/3 (so f(1) = 1, f(-1) = -1)."""
    return 1.7159 * torch.tanh(a * (2.0 / 3.0))


class ScaledTanh(nn.Module):
    """Module form of `scaled_tanh`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_tanh(x)


class TrainableSubsampling(nn.Module):
    """S2/S4: each unit sums a 2x2 block, multiplies by its map's coefficient, adds its map's bias (2 params/map)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, H/2, W/2); avg_pool * 4 is the 2x2 sum.
        s = F.avg_pool2d(x, 2) * 4.0
        return s * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class PartialConv2d(nn.Module):
    """A convolution in which output map j sees only the input maps listed in `table[j]` (C3: 1,516 params)."""

    def __init__(self, table: tuple[tuple[int, ...], ...], in_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, len(table), kernel_size
        pairs = [(out, inp) for out, inputs in enumerate(table) for inp in inputs]
        # Only the connected kernels are parameters: (connections, k, k). They are scattered into a dense
        # (out, in, k, k) weight at forward time so that one conv2d call does the work.
        self.weight = nn.Parameter(torch.zeros(len(pairs), kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(len(table)))
        self.register_buffer("out_index", torch.tensor([p[0] for p in pairs]), persistent=False)
        self.register_buffer("in_index", torch.tensor([p[1] for p in pairs]), persistent=False)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in, k, k) weight with zeros where the table has no connection."""
        k = self.kernel_size
        w = self.weight.new_zeros(self.out_channels, self.in_channels, k, k)
        return w.index_put((self.out_index, self.in_index), self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dense_weight(), self.bias)

    def count_macs(self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
        """Only connected kernels do work: (H_out x W_out) x connections x k x k per sample."""
        return output.shape[-2] * output.shape[-1] * self.weight.numel()


class EuclideanRBF(nn.Module):
    """Output units y_i = sum_j (x_j - w_ij)^2 with fixed centres; logits are -y_i (no trainable parameters)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("centres", rbf_centres(num_classes, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, F) vs (K, F) -> (B, K). Cross-entropy on -y is the paper's MAP criterion without its rubbish class.
        return -torch.cdist(x, self.centres.to(x.dtype)).square()


def rbf_centres(num_classes: int, features: int = F6_UNITS) -> torch.Tensor:
    """Fixed +-1 RBF centres: the digit bitmaps for 10 classes, else a seeded random +-1 code per class."""
    if num_classes == len(_DIGIT_BITMAPS) and features == F6_UNITS:
        rows = [[1.0 if ch == "#" else -1.0 for ch in bitmap[:features]] for bitmap in _DIGIT_BITMAPS]
        return torch.tensor(rows)
    g = torch.Generator().manual_seed(1998)
    return torch.randint(0, 2, (num_classes, features), generator=g).float() * 2 - 1


def _pad_to_32(image_size: int) -> tuple[int, int, int, int]:
    """Padding (left, right, top, bottom) that centres a smaller image on the paper's 32x32 field."""
    extra = max(0, 32 - image_size)
    return (extra // 2, extra - extra // 2, extra // 2, extra - extra // 2)


def _after_lenet_stages(image_size: int) -> int:
    """Side of the maps after C1 (5x5), S2 (/2), C3 (5x5), S4 (/2) for a padded input."""
    s = max(32, image_size)
    return ((s - 4) // 2 - 4) // 2


class LeNet5(nn.Module):
    """LeNet-5 as in the 1998 paper: C1 6@28x28, S2, C3 16@10x10 (partial), S4, C5 120, F6 84, RBF output."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 32) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d(_pad_to_32(image_size))
        self.c1 = nn.Conv2d(in_channels, 6, 5)  # (B, in, 32, 32) -> (B, 6, 28, 28)
        self.s2 = TrainableSubsampling(6)  # -> (B, 6, 14, 14)
        # Table I assumes 6 input maps; with other channel counts C3 stays the paper's 6 -> 16 table.
        self.c3 = PartialConv2d(C3_TABLE, 6, 5)  # -> (B, 16, 10, 10)
        self.s4 = TrainableSubsampling(16)  # -> (B, 16, 5, 5)
        self.c5 = nn.Conv2d(16, 120, 5)  # -> (B, 120, 1, 1) for 32x32 input
        side = _after_lenet_stages(image_size) - 4
        self.f6 = nn.Linear(120 * side * side, F6_UNITS)
        self.output = EuclideanRBF(F6_UNITS, num_classes)
        self.act = ScaledTanh()
        self.num_classes = num_classes
        self._init_paper()

    def _init_paper(self) -> None:
        # "weights initialized with random numbers uniformly distributed between -2.4/F_i and 2.4/F_i"
        for m in (self.c1, self.c3, self.c5, self.f6, self.s2, self.s4):
            fan_in = _fan_in(m)
            nn.init.uniform_(m.weight, -2.4 / fan_in, 2.4 / fan_in)
            nn.init.uniform_(m.bias, -2.4 / fan_in, 2.4 / fan_in)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> C5 maps (B, 120, h, w)."""
        x = self.act(self.c1(self.pad(x)))
        x = self.act(self.s2(x))
        x = self.act(self.c3(x))
        x = self.act(self.s4(x))
        return self.act(self.c5(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """C5 maps -> logits (B, num_classes)."""
        return self.output(self.act(self.f6(torch.flatten(x, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _fan_in(m: nn.Module) -> int:
    if isinstance(m, TrainableSubsampling):
        return 4
    if isinstance(m, PartialConv2d):
        # Fan-in differs per C3 map (3, 4 or 6 inputs x 25); the paper's rule uses each unit's own fan-in,
        # approximated here by the mean (60 connections x 25 weights / 16 maps).
        return round(m.weight.numel() / m.out_channels)
    return m.weight[0].numel()


class LeNet5Modern(nn.Module):
    """LeNet-5 with today's defaults: ReLU, max pooling, full 6->16 C3, a plain linear output layer."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ZeroPad2d(_pad_to_32(image_size)),
            nn.Conv2d(in_channels, 6, 5),  # (B, in, 32, 32) -> (B, 6, 28, 28)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # -> (B, 6, 14, 14)
            nn.Conv2d(6, 16, 5),  # -> (B, 16, 10, 10)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # -> (B, 16, 5, 5)
        )
        side = _after_lenet_stages(image_size)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 16, 5, 5) for 28x28 or 32x32 input."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps -> logits (B, num_classes)."""
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(
    "lenet5",
    family="LeNet",
    description="LeNet-5 as in LeCun et al. 1998: scaled tanh, trainable subsampling, partial C3, RBF output",
    default_image_size=32,
    default_in_channels=1,
    tags=("ours", "1998"),
)
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 32) -> LeNet5:
    """LeNet-5, faithful to the 1998 paper (60,000 trainable parameters at 32x32, 10 classes)."""
    return LeNet5(num_classes, in_channels, image_size)


@register_model(
    "lenet5-modern",
    family="LeNet",
    description="LeNet-5 with ReLU, max pooling, full C3 and a linear output layer",
    default_image_size=32,
    default_in_channels=1,
    tags=("ours",),
)
def lenet5_modern(num_classes: int = 10, in_channels: int = 1, image_size: int = 32) -> LeNet5Modern:
    """LeNet-5 modernised (61,706 parameters at 32x32, 10 classes)."""
    return LeNet5Modern(num_classes, in_channels, image_size)
