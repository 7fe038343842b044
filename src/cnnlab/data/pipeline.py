"""uint8 images in memory -> batched augmentation on the training device -> normalised float batches.

No per-sample Python work: each batch is one index into the resident tensor, then a few whole-batch ops.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cnnlab.data.balance import balanced_order
from cnnlab.data.resize import fit
from cnnlab.data.types import ImageSet
from cnnlab.errors import OptionError, UsageError

AUGMENTATIONS: dict[str, str] = {
    "trivial": "TrivialAugmentWide: one of 14 operations (colour, contrast, shear, ...) at a random strength per image",
    "jitter": "colour jitter: brightness, contrast and saturation each scaled by 0.6-1.4, per image",
    "crop": "random translation: pad by ~7% of the side with black, crop back to size",
    "flip": "horizontal flip with probability 0.5 (off by default for digits)",
    "rotate": "random rotation of up to +-10 degrees with scaling 0.9-1.1",
    "erase": "random erasing (cutout) of one rectangle, 2-20% of the area, with probability 0.5",
}
# Applied first, to the uint8 images, one image at a time through torchvision's v2 transforms (their drawn
# parameters differ per image); then the batched float operations above, then normalisation, then `erase`.
BYTE_AUGMENTATIONS = ("trivial", "jitter")


@contextlib.contextmanager
def seeded_from(g: torch.Generator | None) -> Iterator[None]:
    """torch's global CPU generator, forked and seeded from one draw of `g`, for the duration of the block.

    torchvision's transforms draw from the global generator; drawing their seed from the run's generator makes
    them depend on the run's seed alone (so runs resume exactly), and nothing else's random state moves.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device if g is not None else "cpu").item())
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


@functools.cache
def _byte_transform(name: str) -> Any:
    from torchvision.transforms import v2

    if name == "trivial":
        return v2.TrivialAugmentWide()
    return v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)


def augment_bytes(x: torch.Tensor, ops: Sequence[str], g: torch.Generator | None = None) -> torch.Tensor:
    """torchvision v2's per-image augmentations on uint8 (B, C, H, W): each image draws its own parameters, from
    torch's global generator seeded from `g` for the batch (`seeded_from`)."""
    transforms = [_byte_transform(op) for op in ops]
    with seeded_from(g):
        out = []
        for image in x:
            for t in transforms:
                image = t(image)
            out.append(image)
    return torch.stack(out) if out else x


def parse_augment(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Parse `crop,flip` / `none` into a tuple of known augmentation names (UsageError on unknown ones)."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [s.strip() for s in spec]
    if items in ([], [""], ["none"]):  # '' (and an empty tuple) mean no augmentation, as 'none' does
        return ()
    if "" in items:  # ',,' or 'crop,' is a typo, not a request for no augmentation
        raise OptionError("augment", f"{','.join(items)!r}: empty item; give names like crop,flip or none")
    for s in items:
        if s not in AUGMENTATIONS:
            raise OptionError(
                "augment", f": unknown augmentation {s!r}; choose from {', '.join(AUGMENTATIONS)} or none"
            )
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of pixel values in [0, 1], as recorded in a run's config.json."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) floats in [0, 1] -> standardised floats."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def apply_to_bytes_(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) floats of 0..255 values -> standardised floats, in place: x / (255 std) - mean / std."""
        std = torch.tensor(self.std, dtype=torch.float64)
        scale = (1.0 / (255.0 * std)).to(x.device, x.dtype).view(1, -1, 1, 1)
        shift = (torch.tensor(self.mean, dtype=torch.float64) / std).to(x.device, x.dtype).view(1, -1, 1, 1)
        return x.mul_(scale).sub_(shift)


def channel_stats(images: torch.Tensor | ImageSet, chunk_bytes: int = 2**24) -> Normalization:
    """Mean and std per channel of uint8 images (N, C, H, W) over all pixels, exactly, without copying the set.

    A float64 copy of a training split would be 8x its size (a 3.6 GB folder would need 29 GB). A histogram of the
    256 pixel values per channel, filled in chunks of at most `chunk_bytes`, gives the same sums exactly. For an
    ImageSet of photos, the pixels are those of the model's input as evaluation sees it (canvases cut per `resize`).
    """
    if isinstance(images, ImageSet):
        data = images
        n, c, per_image = len(data), data.channels, data.channels * data.side**2

        def block_at(i: int, j: int) -> torch.Tensor:
            return data.final(torch.arange(i, j))
    else:
        n, c = images.shape[:2]
        per_image = max(1, images[:1].numel())

        def block_at(i: int, j: int) -> torch.Tensor:
            return images[i:j]

    hist = torch.zeros(c, 256, dtype=torch.float64)
    step = max(1, chunk_bytes // max(1, per_image))
    for i in range(0, n, step):
        block = block_at(i, min(n, i + step))  # (b, C, H, W) uint8
        for ch in range(c):
            hist[ch] += torch.bincount(block[:, ch].reshape(-1).to(torch.int64).cpu(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    count = hist.sum(1).clamp_min(1)
    mean = (hist * values).sum(1) / count
    var = (hist * (values - mean[:, None]).square()).sum(1) / (count - 1).clamp_min(1)
    std = var.sqrt().clamp_min(1e-6)
    return Normalization(tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist()))


def random_crop(x: torch.Tensor, pad: int, g: torch.Generator | None) -> torch.Tensor:
    """Shift each image by up to `pad` pixels in x and y, filling with 0: (B, C, H, W) -> (B, C, H, W)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]  # (1, C, 1, 1)
    return xp[torch.arange(b, device=x.device)[:, None, None, None], chans, rows, cols]


def random_flip(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """Mirror a random half of the batch left-right, in place."""
    chosen = torch.rand(x.shape[0], generator=g, device=x.device) < 0.5  # (B,) bool
    if x.device.type != "cpu":
        return flip_where(x, chosen)
    flip = chosen.nonzero().flatten()
    if x[0].numel() < 64 * 64 * 3:  # small images: one indexed copy (a 28 px batch: 0.3 ms, against 2 per image)
        x[flip] = x[flip].flip(3)
        return x
    for i in flip.tolist():  # large ones: per image, 10x faster at 224 px on CPU than the indexed copy
        x[i] = x[i].flip(-1)
    return x


def flip_where(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Mirror the images (B, C, H, W) where `chosen` (B,) is True, in place, without reading the mask on the host.

    A GPU's flip: `random_flip`'s CPU ways read the mask (a host sync on a GPU, which idles it while the next step is
    prepared) and, at 224 px, launch two copies per image.
    """
    return x.copy_(torch.where(chosen[:, None, None, None], x.flip(3), x))


def random_rotate(x: torch.Tensor, g: torch.Generator | None, degrees: float = 10.0) -> torch.Tensor:
    """Rotate each image by up to +-`degrees` and scale by 0.9-1.1 about its centre (bilinear, black fill)."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=g, device=x.device) * 2 - 1) * math.radians(degrees)
    scale = 1.0 + (torch.rand(b, generator=g, device=x.device) * 2 - 1) * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_erase(x: torch.Tensor, g: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    """Set one random rectangle (2-20% of the area, aspect 0.3-3.3) of each image to 0, with probability p."""
    b, _, h, w = x.shape
    dev = x.device
    area = (torch.rand(b, generator=g, device=dev) * 0.18 + 0.02) * h * w
    log_ratio = (torch.rand(b, generator=g, device=dev) * 2 - 1) * math.log(10 / 3)
    eh = (area * log_ratio.exp()).sqrt().round().clamp(1, h)
    ew = (area / log_ratio.exp()).sqrt().round().clamp(1, w)
    top = (torch.rand(b, generator=g, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(b, generator=g, device=dev) * (w - ew + 1)).floor()
    on = torch.rand(b, generator=g, device=dev) < p
    r = torch.arange(h, device=dev)[None, :, None]
    c = torch.arange(w, device=dev)[None, None, :]
    inside = (r >= top[:, None, None]) & (r < (top + eh)[:, None, None]) & (c >= left[:, None, None])
    inside &= c < (left + ew)[:, None, None]
    mask = (inside & on[:, None, None])[:, None]  # (B, 1, H, W)
    return x.masked_fill(mask, 0.0)


class BatchMixer:
    """MixUp and/or CutMix through torchvision's v2 transforms: (x, labels) -> (mixed x, label probabilities (B, K)).

    torchvision mixes each batch with itself rolled by one; its draws are seeded from the run's generator per batch
    (`seeded_from`), so runs repeat and resume exactly. Multi-hot labels (B, K) are mixed with the images' own
    weights: torchvision mixes the images' positions in the batch (labels 0..B-1 as B "classes"), and those weights
    (B, B) times the multi-hot labels (B, K) give each mixed image its blend of both label sets.
    """

    def __init__(self, mixup: float, cutmix: float, classes: int) -> None:
        self.mixup, self.cutmix, self.classes = mixup, cutmix, classes
        self._by_classes: dict[int, Any] = {}

    def _transform(self, classes: int) -> Any:
        if classes not in self._by_classes:
            from torchvision.transforms import v2

            ways = ([v2.MixUp(alpha=self.mixup, num_classes=classes)] if self.mixup > 0 else []) + (
                [v2.CutMix(alpha=self.cutmix, num_classes=classes)] if self.cutmix > 0 else [])  # fmt: skip
            # Each batch one of the two, as timm does.
            self._by_classes[classes] = ways[0] if len(ways) == 1 else v2.RandomChoice(ways)
        return self._by_classes[classes]

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor, g: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Mixed images (B, C, H, W) and their label probabilities (multi-label: label weights) (B, K)."""
        if labels.dim() == 2:
            slots = torch.arange(len(labels), device=labels.device)
            with seeded_from(g):
                mixed, weights = self._transform(len(labels))(x, slots)  # weights (B, B): image i's share of each
            return mixed, weights @ labels.to(weights.dtype)
        with seeded_from(g):
            mixed, target = self._transform(self.classes)(x, labels)
        return mixed, target


def batch_mixer(mixup: float, cutmix: float, classes: int) -> BatchMixer | None:
    """The run's MixUp/CutMix, or None when both are off."""
    return BatchMixer(mixup, cutmix, classes) if mixup > 0 or cutmix > 0 else None


def augment_batch(x: torch.Tensor, ops: Sequence[str], g: torch.Generator | None = None) -> torch.Tensor:
    """Apply the named augmentations to a float batch (except `erase`, applied after normalisation).

    Every one is independent of the pixels' scale (black is 0), so the batch may hold [0, 1] or 0..255 values.
    """
    side = min(x.shape[2], x.shape[3])
    for op in ops:
        if op == "crop":
            x = random_crop(x, max(1, side // 14), g)
        elif op == "flip":
            x = random_flip(x, g)
        elif op == "rotate":
            x = random_rotate(x, g)
        elif op != "erase" and op not in BYTE_AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {op!r}")
    return x


class BatchLoader:
    """Iterate over (images, labels) batches of an in-memory ImageSet, resident on `device`.

    Each epoch draws one permutation from `order_generator` (default: `generator`, which also drives the
    augmentation), or with `balanced` as many class-first draws as there are images. With `world_size` > 1
    (data-parallel training) every process draws the same order, cuts it into global batches of
    batch_size x world_size and takes every world_size-th sample of each: all processes take the same number of
    steps, and each drawn sample is used once per epoch across them. A last global batch smaller than
    world_size (at most world_size - 1 samples) is left out of that epoch, since some process would get none.
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        norm: Normalization,
        *,
        shuffle: bool = False,
        augment: Sequence[str] = (),
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        order_generator: torch.Generator | None = None,
        channels_last: bool = False,
        balanced: bool = False,
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        # uint8 (N, C, H, W) (4x less memory than float) on the device, or a DiskImages read per batch
        self.images = data.images if data.on_disk else data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.boxes = data.boxes.to(self.device) if data.boxes is not None else None  # canvases: (N, 2) image boxes
        self.side, self.resize = data.side, data.resize
        self.byte_ops = tuple(op for op in augment if op in BYTE_AUGMENTATIONS)
        self.batch_size, self.norm, self.shuffle = batch_size, norm, shuffle
        self.augment, self.generator, self.drop_last = tuple(augment), generator, drop_last
        self.rank, self.world_size = rank, world_size
        self.order_generator = order_generator if order_generator is not None else generator
        self.channels_last = channels_last
        self.balanced = balanced  # shuffle class-first (data.balance.balanced_order): as many draws as images
        # engine.stem_cache.StemMemo: image indices (B,) -> a fixed stem's outputs (B, C', H', W'). When set (the
        # images are not augmented), the batches hold those outputs instead of the images.
        self.stem_memo: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._copier: torch.cuda.Stream | None = None  # a GPU's copies of rows read from a cache file

    def __len__(self) -> int:
        n, step = len(self.labels), self.batch_size * self.world_size
        if self.drop_last:
            return n // step
        full, rest = divmod(n, step)
        return full + (1 if rest >= self.world_size else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self.epoch_order())

    def epoch_order(self) -> torch.Tensor:
        """This epoch's sample order: a fresh permutation when shuffling (the same on every process)."""
        n = len(self.labels)
        if self.shuffle and self.balanced:
            return balanced_order(self.labels, n, self.order_generator)
        if self.shuffle:
            return torch.randperm(n, generator=self.order_generator, device=self.device)
        return torch.arange(n, device=self.device)

    def batches(self, order: torch.Tensor, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's batches of `order` from batch index `start` on (a resumed epoch continues mid-way)."""
        step = self.batch_size * self.world_size
        indices = (order[i * step : (i + 1) * step][self.rank :: self.world_size] for i in range(start, len(self)))
        if self.stem_memo is not None:
            for idx in indices:
                yield self.stem_memo(idx), self.labels[idx]
            return
        if self.boxes is None:  # images already at the model's size: one index into the resident tensor
            for idx in indices:
                yield self.prepare(self.images[idx]), self.labels[idx]
            return
        yield from self._photo_batches(indices, order, start)

    def _photo_batches(self, indices: Iterator[torch.Tensor], order: torch.Tensor, start: int
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """Batches cut from canvases, a helper thread preparing the next batch while this one is cut.

        The helper reads the next batch's rows (from the cache file, into one of two reused buffers) and, on the
        CPU, allocates and touches its output: the page faults of a fresh 150 MB batch cost as much as cutting it
        (86 against 142 ms per 256 images at 224 px here), and so run on the other core. On a GPU its buffers are
        pinned and it copies the rows over on a stream of its own, so the copy overlaps the training step and the
        training thread never waits for the GPU's queue to drain (a copy from ordinary memory would make it wait).
        It draws nothing random: a checkpoint taken between batches resumes exactly.
        """
        from concurrent.futures import ThreadPoolExecutor

        on_disk = not isinstance(self.images, torch.Tensor)
        cuda = self.device.type == "cuda"
        buffers = [self.images.buffer_for(self.batch_size, pin=cuda) for _ in range(2)] if on_disk else []
        if on_disk and cuda and self._copier is None:  # one per loader: the allocator keeps a pool per stream
            self._copier = torch.cuda.Stream(self.device)
        copier = self._copier if on_disk and cuda else None
        host = order.cpu() if on_disk else None  # the rows to read, on the host: one sync per epoch, not per batch
        dtype = torch.uint8 if self.byte_ops else torch.float32  # torchvision's per-image ops take uint8
        channels = self.images.shape[1]
        step = self.batch_size * self.world_size

        def ahead(n: int, idx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            rows = None
            if host is not None:
                rows = self.images.read(host[n * step : (n + 1) * step][self.rank :: self.world_size], buffers[n % 2])
            if copier is not None:
                with torch.cuda.stream(copier):
                    rows = rows.to(self.device, non_blocking=True)
                copier.synchronize()  # this thread waits (not the training one): the pinned buffer is free again
            out = None
            if self.device.type == "cpu":  # channels last, as data.resize.apply writes it
                out = torch.zeros((len(idx), self.side, self.side, channels), dtype=dtype).permute(0, 3, 1, 2)
            return rows, out

        with ThreadPoolExecutor(max_workers=1) as helper:
            pending = None
            for n, idx in enumerate(indices, start=start):
                nxt = (helper.submit(ahead, n, idx), idx)
                if pending is not None:
                    yield self._cut(*pending, dtype)
                pending = nxt
            if pending is not None:
                yield self._cut(*pending, dtype)

    def _cut(self, job: Any, idx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: canvases cut under the resize policy (random crops if training), augmented, normalised."""
        rows, out = job.result()
        if rows is not None and rows.is_cuda:
            # Copied on the helper's stream, read by this one's queued kernels: without this the allocator could hand
            # the block to the helper's next copy (its own stream) while the cut of this batch still waits to run.
            rows.record_stream(torch.cuda.current_stream(rows.device))
        elif rows is not None:
            rows = rows.to(self.device, non_blocking=True)
        source, pick = (rows, None) if rows is not None else (self.images, idx)
        x = fit(source, self.boxes[idx], self.side, self.resize, train=self.shuffle, g=self.generator,
                index=pick, dtype=dtype, out=out)  # fmt: skip
        return self.prepare(x), self.labels[idx]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) (or float of 0..255 values, which it may change) -> augmented, normalised float32.

        The augmentations before normalisation do not depend on the scale (black is 0 either way), so /255 is
        folded into the normalisation: one multiply-add in place, no copies of the batch.
        """
        if self.byte_ops:
            images = augment_bytes(images, self.byte_ops, self.generator)
        x = images.float() if images.dtype == torch.uint8 else images
        if self.augment:
            x = augment_batch(x, self.augment, self.generator)
        x = self.norm.apply_to_bytes_(x)
        if "erase" in self.augment:
            x = random_erase(x, self.generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
