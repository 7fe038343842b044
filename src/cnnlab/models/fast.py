"""cnn-fast: a CNN shaped for time-to-accuracy on small images, the model of the `fast` and `accurate` recipes.

Each stage is conv3x3 -> max-pool 2 -> BatchNorm -> ReLU: pooling *before* normalising leaves BN and ReLU a quarter of
the pixels (on 2 CPU cores the full-resolution BN/ReLU/pool work costs more than the convolutions). The first stage is
narrow (16 maps at full resolution, where compute is dearest); the width grows as the resolution falls. A stage may
add more conv3x3-BN-ReLU layers at its pooled resolution. Global max pooling and one linear layer make the head.

`stem="whiten"` puts a fixed first stage in front of the learned ones (the patch-whitening layer of Keller Jordan's
airbench and of hlb-CIFAR10): a 3x3 conv whose 2 x C x 9 filters are the eigenvectors of the covariance of the
training images' 3x3 patches, each scaled by 1/sqrt(its eigenvalue + WHITEN_EPS) and kept with its negation, then
max-pool, BN and ReLU. Its outputs are decorrelated from the first step, so the learned layers converge in fewer
epochs. The filters depend on the data: the trainer calls `fit_whitening` once, before the first step; a checkpoint
keeps them. `whiten_keep=K` keeps only the K patch directions of largest variance (2K maps); `whiten_keep=aligned`
(the `fast` recipe, and `accurate` on a CPU) the largest multiple of 8: 8 of a grey image's 9, because on the 2-core
AMD EPYC measured a training step with 16 maps took 14-27% less time than with 18, and the extra epochs made up for
the direction dropped (docs/speed.md). On a GPU, where it saves nothing, `accurate` keeps every direction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
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


STEMS = ("conv", "whiten")
WHITEN_EPS = 5e-3  # added to each eigenvalue: the flattest patch directions (mostly noise) are not blown up


class FastCNN(nn.Module):
    """Stages of [conv3x3 -> max-pool -> BN -> ReLU] + (depth - 1) x [conv3x3 -> BN -> ReLU]; max pool -> linear."""

    __jit_unused_properties__: ClassVar[list[str]] = ["whitening"]  # torch.jit.script cannot type an Optional module
    # The class whose forward engine.stem_cache.AfterStem reproduces (features, then head): a subclass that changes
    # how the model computes is trained through its own forward.
    forward_owner: ClassVar[type]

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 widths: int | str | Sequence[int] = (16, 64, 128),
                 depth: int | str | Sequence[int] = 1, stem: str = "conv",
                 whiten_keep: int | str | None = None) -> None:  # fmt: skip
        super().__init__()
        widths = _int_list(widths, "widths")
        depths = _int_list(depth, "depth")
        if len(depths) == 1:
            depths = depths * len(widths)
        if len(depths) != len(widths):
            raise UsageError(f"cnn-fast: depth needs one number or one per stage ({len(widths)}), got {depth!r}")
        if stem not in STEMS:
            raise UsageError(f"cnn-fast: stem must be one of {', '.join(STEMS)}, got {stem!r}")
        keep = _whiten_keep(whiten_keep, stem, in_channels)
        _check_size(widths, depths, in_channels, num_classes, stem, keep)
        layers: list[nn.Module] = []
        c_in, side = in_channels, image_size
        self.stem = stem
        if stem == "whiten":
            # 2 x K fixed filters (K = 9C by default: 18 filters for grey images): the K whitened patch directions of
            # largest variance and their negations, so that max-pooling and ReLU keep both signs. Never trained:
            # fit_whitening sets them from the training images.
            whitening = nn.Conv2d(in_channels, 2 * keep, 3, padding=1, bias=False)
            # A buffer, not a parameter: no optimizer, weight decay, freezing or DDP gradient ever touches it, and
            # the checkpoint keeps it under the same name (features.0.weight).
            weight = whitening.weight.detach().clone()
            del whitening.weight
            whitening.register_buffer("weight", weight)
            # 1 once fit_whitening has run (saved with the weights): a fitted stem, a trained module trained again
            # or a checkpoint's, is never refitted under the layers that learned on its outputs.
            self.register_buffer("whitening_fitted", torch.zeros(()))
            c_in = whitening.out_channels
            layers.append(whitening)
            if side >= 2:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            layers += [nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
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

    @property
    def whitening(self) -> nn.Conv2d | None:
        """The fixed whitening conv (features.0) with stem="whiten", else None."""
        return self.features[0] if self.stem == "whiten" else None  # type: ignore[return-value]

    @torch.no_grad()
    def fit_whitening(self, batches: Iterable[torch.Tensor], max_patches: int = 4_000_000, stride: int = 1) -> int:
        """stem="whiten": set the fixed filters from normalised training batches (B, C, H, W); the patches used.

        stride > 1 takes every stride-th patch position in each direction (bounded memory on large images).
        """
        if self.whitening is None:
            return 0
        conv = self.whitening
        c = conv.in_channels
        d = c * 9
        cov = torch.zeros(d, d, dtype=torch.float64, device=conv.weight.device)
        seen = 0
        for x in batches:
            # (B, C, H, W) -> (B * H * W, C * 9): the conv's own zero-padded 3x3 patches, in its (c, ky, kx) order.
            patches = F.unfold(x.float(), 3, padding=1, stride=stride).transpose(1, 2).reshape(-1, d)
            patches = patches[: max_patches - seen].double()
            cov += patches.T @ patches
            seen += len(patches)
            if seen >= max_patches:
                break
        if seen == 0:
            raise UsageError("cnn-fast: stem whiten needs training images to fit its filters")
        values, vectors = torch.linalg.eigh((cov / seen).cpu())  # ascending eigenvalues; vectors (d, d) in columns
        keep = conv.out_channels // 2  # the last `keep` columns: the directions of largest variance
        values, vectors = values[d - keep :], vectors[:, d - keep :]
        filters = (vectors.T / torch.sqrt(values.clamp(min=0) + WHITEN_EPS)[:, None]).reshape(keep, c, 3, 3)
        conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight))
        self.whitening_fitted.fill_(1)
        return seen

    def fixed_stem_layers(self) -> int:
        """How many first layers of `features` are a fixed function of the image (0 if none): the trainer may keep them.

        The fitted whitening conv and its max-pool: 2, or 1 on images too small to pool; 0 before fitting.
        """
        if self.whitening is None or not bool(self.whitening_fitted):
            return 0
        return 2 if len(self.features) > 1 and isinstance(self.features[1], nn.MaxPool2d) else 1

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, widths[-1], H / 2^stages, W / 2^stages)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps -> logits (B, num_classes)."""
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


FastCNN.forward_owner = FastCNN


def _whiten_keep(value: int | str | None, stem: str, in_channels: int) -> int:
    """The patch directions a whitening stem keeps: `value`, all C x 9 when None, or with "aligned" the largest
    multiple of 8 (2 maps each: a multiple of 16 channels, which CPU kernels handle in whole vectors); UsageError if
    out of range."""
    directions = 9 * in_channels
    if value is None:
        return directions
    if stem != "whiten":
        raise UsageError(f"cnn-fast: whiten_keep applies to stem=whiten, not stem={stem}")
    if isinstance(value, str) and value.strip() == "aligned":
        return directions // 8 * 8  # 8 of 9 for grey images, 24 of 27 for colour ones
    try:
        keep = _whole(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        keep = 0
    if not 1 <= keep <= directions:
        raise UsageError(f"cnn-fast: whiten_keep must be a whole number from 1 to {directions:,} (the 3x3 patch "
                         f"directions of {in_channels} input channel(s)) or aligned, got {value!r}")  # fmt: skip
    return keep


def _check_size(widths: tuple[int, ...], depths: tuple[int, ...], in_channels: int, num_classes: int,
                stem: str, keep: int) -> None:  # fmt: skip
    """At most MAX_CHANNELS maps and MAX_CONV_LAYERS convs, and weights that fit in memory, before building."""
    text = "-".join(map(str, widths))
    if max(widths) > MAX_CHANNELS:
        raise UsageError(f"cnn-fast: widths {text}: at most {MAX_CHANNELS:,} channels per stage")
    params, c_in = 0, in_channels
    if stem == "whiten":
        c_in = 2 * keep  # the whitening stem's maps: each kept patch direction and its negation
        if c_in > MAX_CHANNELS:
            raise UsageError(f"cnn-fast: stem whiten makes {c_in:,} maps (2 per kept patch direction, 9 directions "
                             f"per input channel); at most {MAX_CHANNELS:,}")  # fmt: skip
        params = in_channels * c_in * 9 + 2 * c_in
    if sum(depths) > MAX_CONV_LAYERS:
        shown = depths[0] if len(set(depths)) == 1 else "-".join(map(str, depths))
        raise UsageError(f"cnn-fast: depth {shown} makes {sum(depths):,} conv layers; at most {MAX_CONV_LAYERS:,}")
    for c_out, n in zip(widths, depths, strict=True):
        params += (c_in * c_out + (n - 1) * c_out * c_out) * 9 + n * 2 * c_out  # 3x3 convs (no bias) + BatchNorms
        c_in = c_out
    depth = depths[0] if len(set(depths)) == 1 else "-".join(map(str, depths))
    check_weights_fit(f"cnn-fast with widths {text}, depth {depth}", params + c_in * num_classes + num_classes)


@register_model(
    "cnn-fast", family="cnn-fast", default_image_size=28, default_in_channels=1, tags=("ours",),
    description="CNN shaped for speed (the fast/accurate recipes): conv3x3 -> max-pool -> BN -> ReLU per stage, "
    "narrow at full resolution, global max pool (options: widths=16-64-128, depth=1 or one per stage, "
    "stem=conv or whiten, whiten_keep=K or aligned: the whitening stem's K directions of largest variance, default "
    "all)",
)  # fmt: skip
def cnn_fast(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    *,
    widths: int | str | Sequence[int] = (16, 64, 128),
    depth: int | str | Sequence[int] = 1,
    stem: str = "conv",
    whiten_keep: int | str | None = None,
) -> FastCNN:
    """The speed-shaped CNN (widths 16-64-128, one conv per stage: 84,794 params for 10 classes, 1 channel)."""
    return FastCNN(num_classes, in_channels, image_size, widths, depth, stem, whiten_keep)
