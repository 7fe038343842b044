"""A fixed stem computed once per training image, not at every step.

cnn-fast's whitening stem (a 3x3 conv whose filters are fitted to the data and never trained, then a 2x2 max-pool) is a
fixed function of the image. When the training images are resident in memory and not augmented (the `fast` recipe),
the trainer keeps each image's stem output the first time a batch draws it, and the later epochs read it back instead
of computing it again. The first epoch costs what it did; each later one skips the stem's forward pass (docs/speed.md
has the measurements). On a GPU every output is computed at once before the first step, so that no step waits for
the host to learn what is known.

The outputs are the ones a step would compute: a convolution computes each image on its own, and on the CPUs
measured every batch of two or more images gives the same bits. A batch of one takes another kernel (fp32,
channels-last), so an output is never kept from one image computed alone, and a batch of one image (an epoch's last,
say) computes its stem as the step always did. A GPU may pick another convolution algorithm per batch size, which
changes the last bits. Nothing is kept when the images are augmented (an augmentation changes them before the stem:
keeping the flip's mirror images as well doubled the memory and gained the `accurate` recipe no measurable time),
mixed (mixup/cutmix), read from disk or cut from photos per batch, when the step is compiled (the compiled graph
fuses the stem with what follows), when the model's forward is not its class's own or has hooks (a step would skip
them), in data-parallel, single-epoch or batch-of-one training, or when the outputs would take more than the share of
memory below: the stem then runs at every step, as before.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.data.pipeline import BatchLoader
from cnnlab.engine.device import autocast
from cnnlab.memory import available_bytes, gib

MAX_BYTES = 4 * 2**30  # never more than this for the kept outputs,
MAX_SHARE = 0.25  # nor more than this share of the memory available on the device
CHUNK = 512  # images per forward pass when computing all at once (GPU)


def stem_layers(model: nn.Module) -> int:
    """How many first layers of `model.features` are a fixed function of the image (0: nothing to keep)."""
    count = getattr(model, "fixed_stem_layers", None)
    return int(count()) if callable(count) and isinstance(getattr(model, "features", None), nn.Sequential) else 0


class AfterStem(nn.Module):
    """The model from its first layer after the fixed stem: what a step calls when its batch holds stem outputs.

    It holds the model itself (no copy): its parameters are the model's, which the optimizer steps.
    """

    def __init__(self, model: nn.Module, skip: int) -> None:
        super().__init__()
        self.model = model
        self.rest = model.features[skip:]  # type: ignore[index]  # the same modules, not copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem outputs (B, C', H', W') -> logits (B, classes)."""
        return self.model.forward_head(self.rest(x))  # type: ignore[operator]


@torch.no_grad()
def _stem_forward(stem: nn.Module, loader: BatchLoader, dtype: torch.dtype, rows: torch.Tensor) -> torch.Tensor:
    """The stem's outputs (B, C', H', W') for images `rows` (B,), normalised and cast as a training step does."""
    with autocast(loader.device, dtype):
        return stem(loader.prepare(loader.images[rows]))


class StemMemo:
    """Row i: image i's stem output (C', H', W'), computed the first time a batch draws image i."""

    def __init__(self, stem: nn.Module, loader: BatchLoader, dtype: torch.dtype, outputs: torch.Tensor) -> None:
        self.stem, self.loader, self.dtype, self.outputs = stem, loader, dtype, outputs
        self.known = torch.zeros(len(outputs), dtype=torch.bool, device=outputs.device)
        self.complete = False  # every row known: no more checks (and no host sync on a GPU)

    def compute(self, rows: torch.Tensor) -> None:
        """Compute and keep the outputs of `rows` (distinct image indices), as a training step computes them."""
        if len(rows) == 1:  # a batch of one takes another kernel (its last bits differ in fp32): never alone
            rows = rows.repeat(2)
        self.outputs[rows] = _stem_forward(self.stem, self.loader, self.dtype, rows)
        self.known[rows] = True

    def compute_all(self) -> None:
        """Every row at once (a GPU: milliseconds, and no step has to ask what is known)."""
        for start in range(0, len(self.outputs), CHUNK):
            self.compute(torch.arange(start, min(start + CHUNK, len(self.outputs)), device=self.outputs.device))
        self.complete = True

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """The outputs of `rows` (B,) -> (B, C', H', W'), computing those not known yet."""
        if len(rows) == 1:  # computed alone, as the step would (another kernel), and not kept
            return _stem_forward(self.stem, self.loader, self.dtype, rows)
        if not self.complete:
            missing = rows[~self.known[rows]]
            if len(missing):
                self.compute(missing.unique())
                self.complete = bool(self.known.all())
        return self.outputs[rows]


FORWARDS = ("forward", "forward_features", "forward_head")  # what AfterStem stands in for


def _hooked(model: nn.Module) -> bool:
    """Whether a subclass's forward or a forward hook (the model's, its stem's, a global one) would be skipped."""
    from torch.nn.modules import module as torch_module

    own = getattr(model, "forward_owner", None)  # the class whose forward AfterStem reproduces
    if own is None or any(getattr(type(model), name, None) is not getattr(own, name, None) for name in FORWARDS):
        return True
    hooks = [getattr(torch_module, f"_global_forward{kind}_hooks", {}) for kind in ("", "_pre")]
    for m in (model, model.features, *model.features[: stem_layers(model)]):  # type: ignore[union-attr, index]
        hooks += [getattr(m, "_forward_hooks", {}), getattr(m, "_forward_pre_hooks", {})]
    return any(hooks)


def memo_blocker(model: nn.Module, loader: BatchLoader, *, mixing: bool, distributed: bool, compiled: bool,
                 epochs: int) -> str | None:  # fmt: skip
    """Why stem outputs cannot stand in for this run's training batches, or None if they can."""
    if _hooked(model):
        return "the model's forward is not its class's own, or has hooks"
    if not isinstance(loader.images, torch.Tensor) or loader.boxes is not None:
        return "the images are read or cut per batch"
    if loader.augment:
        return f"augment {','.join(loader.augment)} changes the images before the stem"
    if mixing:
        return "mixup/cutmix mix the images before the stem"
    if compiled:
        return "the compiled step fuses the stem with what follows"
    if distributed:
        return "data-parallel training"
    if epochs < 2:
        return "a single epoch reads each output once"
    if loader.batch_size == 1:
        return "a batch of one computes its stem alone"
    return None


def make_memo(model: nn.Module, loader: BatchLoader, dtype: torch.dtype) -> StemMemo | str:
    """A StemMemo for `loader`'s images, or why not (its outputs would not fit)."""
    stem = model.features[: stem_layers(model)]  # type: ignore[index]
    rows = len(loader.images)
    # (2, C', H', W'): the outputs' shape, dtype and device, from the first two images
    probe = _stem_forward(stem, loader, dtype, torch.arange(min(2, rows), device=loader.device))
    need = rows * probe[0].numel() * probe.element_size()
    allowed = min(MAX_BYTES, int(available_bytes(str(loader.device)) * MAX_SHARE))
    if need > allowed:
        return f"its outputs would take {gib(need)}, more than the {gib(allowed)} allowed"
    fmt = torch.channels_last if loader.channels_last else torch.contiguous_format
    outputs = torch.empty((rows, *probe.shape[1:]), dtype=probe.dtype, device=probe.device, memory_format=fmt)
    memo = StemMemo(stem, loader, dtype, outputs)
    if loader.device.type != "cpu":  # a GPU: no step may wait for the host to learn which outputs are known
        memo.compute_all()
    return memo


def describe(memo: StemMemo) -> str:
    """The line a run prints when its steps read the stem's outputs back."""
    out = memo.outputs
    shape = "x".join(map(str, out.shape[1:]))
    when = "before the first step" if memo.complete else "the first time a batch draws it"
    return (f"whitening stem: its output kept for each training image, computed {when} ({len(out):,} x {shape} "
            f"{str(out.dtype).removeprefix('torch.')}, {gib(out.numel() * out.element_size())})")  # fmt: skip
