"""fit(): train a registered model on a registered dataset with best practices by default.

Device and precision are resolved once; data lives on the device; every epoch writes metrics.csv and last.ckpt
(and best.safetensors when validation loss improves), each atomically, so a run stopped at any point can resume.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cnnlab
from cnnlab.data.pipeline import BatchLoader, Normalization, channel_stats, parse_augment
from cnnlab.data.sources import BAD_IMAGE_POLICIES, Dataset, is_folder_name, load_dataset, stratified_split
from cnnlab.engine import distributed, rundir
from cnnlab.engine.checkpoint import (
    apply_state_dict,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from cnnlab.engine.metrics import topk_correct
from cnnlab.engine.reporter import Reporter
from cnnlab.errors import CnnlabError, UsageError
from cnnlab.fileio import atomic_write_json
from cnnlab.inspect.visualize import plot_curves
from cnnlab.memory import HEADROOM, available_bytes, check_fits, model_memory
from cnnlab.models.registry import create_model, model_info

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "step", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FREEZE_CHOICES = ("none", "features")
DEFAULT_LR = {"adamw": 3e-3, "adam": 3e-3, "sgd": 0.05}
# --time-budget planning: the fraction of the budget planned for, seconds per checkpoint, seconds to finish a run.
BUDGET_SAFETY, BUDGET_SAVE_S, BUDGET_FINISH_S = 0.96, 0.05, 0.5
# Seeds feed torch generators as seed + 7919 * rank + step: keep the sum inside a signed 64-bit integer.
MAX_SEED = 2**62


@dataclass
class TrainConfig:
    """Every training option in one place, with its unit. The defaults train LeNet-5 on mnist-mini to >= 98%."""

    model: str = "lenet5-modern"
    data: str = "mnist-mini"
    data_dir: str | None = None  # looked in first; then $CNNLAB_DATA, the user cache, system locations
    download: bool = True  # fetch a missing dataset with torchvision's code (online only)
    image_size: int | None = None  # resize images to this square side; image folders: 64, or 224 when pretrained
    on_bad_image: str = "error"  # image folders: a bad file stops loading (error) or is left out and listed (skip)
    epochs: int = 40  # passes over the training split
    batch_size: int = 64  # images per optimizer step
    optimizer: str = "adamw"
    lr: float | None = None  # peak learning rate; None: 3e-3 for adam/adamw, 0.05 for sgd
    momentum: float = 0.9  # sgd only (Nesterov)
    weight_decay: float = 5e-4  # decoupled for adamw; not applied to biases and normalisation parameters
    schedule: str = "onecycle"  # per-step learning-rate schedule
    warmup: float = 0.25  # onecycle: fraction of all steps spent rising to the peak lr
    step_epochs: int = 10  # step schedule: multiply the lr by step_gamma every this many epochs
    step_gamma: float = 0.1
    label_smoothing: float = 0.1  # fraction of the target mass spread over all classes
    val_split: float = 0.1  # fraction of the training split held out (stratified) for validation
    patience: int = 10  # stop after this many epochs without a lower validation loss; 0 = never stop early
    augment: tuple[str, ...] | None = None  # None: the dataset's default (digits: crop only)
    seed: int = 0
    device: str = "auto"  # auto = cuda > mps > cpu
    precision: str = "auto"  # auto = bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 elsewhere
    max_steps: int | None = None  # cap on optimizer steps over the whole run (smoke tests of big models)
    pretrained: bool = False  # torchvision weights through torchvision's API (hub cache, download if online)
    weights: str | None = None  # the same from a local file
    weights_name: str | None = None  # e.g. IMAGENET1K_V2; None = DEFAULT
    model_args: dict[str, Any] = field(default_factory=dict)  # builder options (cnn-compact: width, stages, ...)
    eval_batch_size: int = 1000
    checkpoint_steps: int = 0  # also write last.ckpt every this many steps inside an epoch; 0 = at epoch ends only
    checkpoint_minutes: float = 0.0  # ...or every this many minutes
    on_nan: str = "stop"  # a non-finite loss or gradient: stop (naming epoch and step) or skip that step
    clip_grad: float | None = None  # clip the global gradient norm to this value
    freeze: str = "none"  # "features": train only the new classifier; the pretrained feature extractor stays fixed
    unfreeze_after: int | None = None  # with freeze: after this many epochs, fine-tune everything
    backbone_lr_mult: float = 0.1  # with pretrained weights or freeze: the feature extractor's lr = lr x this
    sync_bn: bool = False  # data-parallel: BatchNorm statistics over the global batch (CUDA only)
    recipe: str | None = None  # the named recipe these options came from (recorded; see engine/recipes.py)
    time_budget: float | None = None  # seconds for the whole run: steps are timed and the schedule planned to fit
    planned_steps: int | None = None  # the step count a time budget planned (set by the trainer; resume reuses it)
    channels_last: bool = False  # NHWC memory format for model and batches (faster convolutions on CPU and GPU)
    compile: bool = False  # torch.compile the training forward/backward (pays a compile time up front)
    tta: bool = False  # test-time augmentation: evaluation averages the logits of each image and its mirror

    def resolved_lr(self) -> float:
        """The peak learning rate, defaulting per optimizer."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def fine_tuning(self) -> bool:
        """Whether the model starts from pretrained features (or freezes them): then the backbone gets a lower lr."""
        return bool(self.pretrained or self.weights or self.weights_name or self.freeze != "none")

    def validate(self) -> TrainConfig:
        """Raise a UsageError naming the option for any impossible value; return self."""

        def bad(option: str, why: str) -> UsageError:
            return UsageError(f"--{option.replace('_', '-')} {why}")

        if isinstance(self.augment, str):  # the CLI's 'crop,flip'
            self.augment = parse_augment(self.augment)
        check_types(self)  # a hand-edited config.json (resume) can hold anything
        info = model_info(self.model)  # unknown model -> UsageError with suggestions
        if not self.data.strip():
            raise bad("data", "is empty; give a dataset name (see `cnnlab train --help`) or an image folder path")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"must be a whole number in 0..{MAX_SEED}, got {self.seed}")
        resolve_device(self.device)  # an unknown or absent device fails here, before any data is loaded
        for key, value in self.model_args.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise bad("model_args", f"{key}={value}: not a finite number")
        if (self.pretrained or self.weights or self.weights_name) and "pretrained" not in info.tags:
            raise UsageError(
                f"--pretrained/--weights: {self.model} has no pretrained weights; see `cnnlab models --pretrained`"
            )
        for name in ("epochs", "batch_size", "eval_batch_size", "step_epochs"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", f"must be at least 1, got {self.max_steps}")
        if self.checkpoint_steps < 0 or self.checkpoint_minutes < 0:
            raise bad("checkpoint_every", "must be 0 (off) or more")
        if self.patience < 0:
            raise bad("patience", f"must be 0 (off) or more, got {self.patience}")
        if not 0.0 <= self.val_split < 1.0:
            raise bad("val_split", f"must be in [0, 1), got {self.val_split}")
        if self.patience and self.val_split == 0:
            raise bad("patience", "needs a validation split (--val-split > 0); use --patience 0 to turn it off")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise bad("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.warmup < 1.0:
            raise bad("warmup", f"must be in (0, 1), got {self.warmup}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", f"must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.momentum < 0 or self.step_gamma <= 0:
            raise UsageError("--weight-decay and --momentum must be >= 0, --step-gamma > 0")
        if self.clip_grad is not None and not (self.clip_grad > 0 and math.isfinite(self.clip_grad)):
            raise bad("clip_grad", f"must be a positive number, got {self.clip_grad}")
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("precision", PRECISIONS),
            ("on_nan", ("stop", "skip")),
        ):
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.freeze not in FREEZE_CHOICES:
            raise bad("freeze", f"must be one of {', '.join(FREEZE_CHOICES)}, got {self.freeze!r}")
        if self.unfreeze_after is not None and (self.freeze == "none" or self.unfreeze_after < 1):
            raise bad("unfreeze_after", "needs --freeze features and a number of epochs >= 1")
        if not (self.backbone_lr_mult > 0 and math.isfinite(self.backbone_lr_mult)):
            raise bad("backbone_lr_mult", f"must be a positive number, got {self.backbone_lr_mult}")
        if self.image_size is not None and self.image_size < 1:
            raise bad("image_size", f"must be at least 1, got {self.image_size}")
        if self.time_budget is not None and not (self.time_budget > 0 and math.isfinite(self.time_budget)):
            raise bad("time_budget", f"must be a positive number of seconds, got {self.time_budget}")
        if self.recipe is not None:
            from cnnlab.engine.recipes import get_recipe

            get_recipe(self.recipe)
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise bad("on_bad_image", f"must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {self.on_bad_image!r}")
        if self.augment is not None:
            self.augment = parse_augment(self.augment)
        if is_folder_name(self.data):
            # An absolute path, so that resume and evaluate find the folder from any working directory.
            try:
                self.data = str(Path(self.data).expanduser().resolve())
            except RuntimeError:  # '~name' of a user that does not exist
                raise bad("data", f"{self.data!r}: no such folder (cannot expand '~')") from None
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every option."""
        d = dataclasses.asdict(self)
        d["augment"] = list(self.augment) if self.augment is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of to_dict; unknown keys (from newer versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("augment") is not None:
            kwargs["augment"] = tuple(kwargs["augment"])
        return cls(**kwargs)


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
    "tuple": (tuple, list), "dict": (dict,),
}  # fmt: skip


def check_types(cfg: TrainConfig) -> None:
    """Raise a UsageError naming the first option whose value has the wrong type (e.g. from an edited config.json)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        # Annotations are strings here ("float | None", "tuple[str, ...] | None"): their outer type names suffice.
        names = [part.strip().split("[")[0] for part in str(f.type).split("|")]
        allowed = tuple(t for n in names for t in _TYPES.get(n, (object,)))
        wrong = not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)
        if wrong:
            raise UsageError(f"option {f.name}: expected {f.type!s}, got {type(value).__name__} {value!r:.40}")


@dataclass
class TrainResult:
    """What a finished fit() reports: test metrics of the best-validation weights and where the run lives."""

    run_dir: Path | None
    model: str
    data: str
    test_acc: float
    test_loss: float
    test_top5: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float
    device: str
    skipped_steps: int = 0  # steps skipped by --on-nan skip
    steps: int = 0  # optimizer steps taken
    time_budget: float | None = None  # seconds, when the schedule was planned to a time budget
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the per-epoch history)."""
        d = dataclasses.asdict(self)
        d.pop("history")
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        return d


class TrainingInterrupted(CnnlabError):
    """SIGINT/SIGTERM stopped training after a step; the checkpoint to resume from is on disk (exit code 130)."""

    exit_code = 130


@dataclass
class EpochProgress:
    """Where an epoch stands: its sample order, batches done, and running sums (all resumable)."""

    order: torch.Tensor  # (N,) sample indices of this epoch
    batch: int  # batches done
    loss_sum: torch.Tensor  # () sum of per-sample loss
    correct: torch.Tensor  # () top-1 hits
    first_bad: torch.Tensor  # () global step of the first non-finite loss, -1 if none
    seen: int  # samples done
    lr: float  # learning rate when the epoch started (the metrics row reports it)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, step: int) -> None:
        """Account for one step without a host sync."""
        self.first_bad = torch.where(
            (self.first_bad < 0) & ~torch.isfinite(loss), torch.full_like(self.first_bad, step), self.first_bad
        )
        self.loss_sum = self.loss_sum + loss * y.numel()
        self.correct = self.correct + (logits.argmax(1) == y).sum()
        self.batch += 1
        self.seen += y.numel()

    def state(self) -> dict[str, Any]:
        """Plain tensors and numbers for the checkpoint."""
        return {
            "order": self.order.cpu(),
            "batch": self.batch,
            "loss_sum": self.loss_sum.cpu(),
            "correct": self.correct.cpu(),
            "first_bad": self.first_bad.cpu(),
            "seen": self.seen,
            "lr": self.lr,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any], device: torch.device) -> EpochProgress:
        """Inverse of state()."""
        return cls(
            d["order"].to(device),
            d["batch"],
            d["loss_sum"].to(device),
            d["correct"].to(device),
            d["first_bad"].to(device),
            d["seen"],
            d["lr"],
        )


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; an explicit device must exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r}: not a device name (use auto, cpu, cuda, cuda:N or mps)") from e
    if device.type not in ("cpu", "cuda", "mps"):  # xpu, meta, ...: torch knows the name, cnnlab cannot train there
        raise UsageError(f"--device {name}: not supported (use auto, cpu, cuda, cuda:N or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: float32 means no autocast."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass (a no-op in fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a clock reading means it is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def classifier_modules(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The classifier: the last module with its own parameters that the forward pass calls, for input x (1, C, H, W).

    Everything before it is the feature extractor ("backbone") that --freeze features keeps fixed.
    """
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []

    def hook(module: nn.Module, inputs: object, output: object) -> None:
        order.append(names[module])

    # Not the root: its own parameters (ViT's class token) are used first, but its hook would fire last.
    own = [m for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(hook) for m in own]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not order:
        raise CnnlabError("the model has no parameters to train")
    return [order[-1]]


def split_parameters(model: nn.Module, head: list[str]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone, head) parameters, given the head's module names."""
    head_ids = {id(p) for name in head for p in model.get_submodule(name).parameters()}
    params = list(model.parameters())
    return [p for p in params if id(p) not in head_ids], [p for p in params if id(p) in head_ids]


def build_optimizer(model: nn.Module, cfg: TrainConfig, head: list[str] | None = None) -> torch.optim.Optimizer:
    """SGD-Nesterov / Adam / AdamW; weight decay only on weights of rank >= 2 (not biases, norms, scales).

    With `head` (fine-tuning), the backbone's groups get lr x backbone_lr_mult. Frozen parameters are in the
    optimizer too: they get no gradient (so no update) until they are unfrozen.
    """
    lr = cfg.resolved_lr()
    parts = [(list(model.parameters()), lr)]
    if head is not None:
        backbone, head_params = split_parameters(model, head)
        parts = [(backbone, lr * cfg.backbone_lr_mult), (head_params, lr)]
    groups = []
    for params, group_lr in parts:
        groups.append({"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr": group_lr})
        groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": group_lr})
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        # Adam's weight decay is L2 added to the gradient (coupled); AdamW's is decoupled.
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-step schedule over `total_steps` optimizer steps."""
    if cfg.schedule == "onecycle":
        if total_steps < 4:  # too few steps for a warm-up and a decay phase (OneCycleLR divides by zero)
            return None
        # At least ~2 warm-up steps, or the first phase has zero length on very short runs.
        pct = min(max(cfg.warmup, 2.0 / total_steps), 0.5)
        # A rebuilt schedule (a time budget re-planned) keeps each group's peak: its current lr is mid-cycle.
        peaks = [g.get("max_lr", g["lr"]) for g in opt.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=peaks, total_steps=total_steps, pct_start=pct,
            cycle_momentum=cfg.optimizer == "sgd",
        )  # fmt: skip
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_epochs * steps_per_epoch, gamma=cfg.step_gamma)
    return None


def predict_logits(model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Logits (B, K) for a batch (B, C, H, W); with `tta`, the mean of the logits of the batch and of its mirror."""
    logits = model(x)
    if tta:
        logits = (logits.float() + model(x.flip(3)).float()) * 0.5
    return logits


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    label_smoothing: float = 0.0,
    dtype: torch.dtype = torch.float32,
    tta: bool = False,
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy of `model` (put in eval mode) over the batches (`tta`: with mirrors)."""
    model.eval()
    loss_sum = correct1 = correct5 = None
    n = 0
    for x, y in batches:
        with autocast(x.device, dtype):
            logits = predict_logits(model, x, tta)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="sum")
        c1, c5 = topk_correct(logits, y, (1, 5))
        # Accumulate on the device: one host sync at the end, not one per batch.
        loss_sum = loss if loss_sum is None else loss_sum + loss
        correct1 = c1 if correct1 is None else correct1 + c1
        correct5 = c5 if correct5 is None else correct5 + c5
        n += y.numel()
    if distributed.env().enabled:  # every process evaluated its own shard: sum them, so all print the same numbers
        zero = torch.zeros((), device=next(model.parameters()).device)
        sums = [t if t is not None else zero for t in (loss_sum, correct1, correct5)] + [zero + n]
        loss_sum, correct1, correct5, total = distributed.all_sum(sums)
        n = int(total.item())
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan"), "top5": float("nan"), "n": 0}
    return {"loss": loss_sum.item() / n, "acc": correct1.item() / n, "top5": correct5.item() / n, "n": n}


def load_training_data(cfg: TrainConfig) -> Dataset:
    """The dataset `cfg` names, at the size training uses (image folders: 224 px for pretrained weights)."""
    size = cfg.image_size
    if size is None and is_folder_name(cfg.data) and (cfg.pretrained or cfg.weights or cfg.weights_name):
        size = 224  # the resolution ImageNet weights were trained and evaluated at
    return load_dataset(cfg.data, cfg.data_dir, download=cfg.download, image_size=size, on_bad_image=cfg.on_bad_image)


def build_model(cfg: TrainConfig, data: Dataset) -> nn.Module:
    """The model `cfg` names, shaped for `data` (classes, channels, size), with pretrained weights if asked."""
    kwargs: dict[str, Any] = dict(cfg.model_args)
    if cfg.pretrained or cfg.weights or cfg.weights_name:
        kwargs.update(pretrained=True, weights_file=cfg.weights, weights_name=cfg.weights_name)
    try:
        return create_model(
            cfg.model, num_classes=len(data.classes), in_channels=data.channels, image_size=data.image_size, **kwargs
        )
    except TypeError as e:
        if not cfg.model_args:  # a builder bug, not the user's options: let it surface as such
            raise
        raise UsageError(f"--model-args: {cfg.model} does not take these options ({e})") from None


def preflight(
    cfg: TrainConfig, *, runs_dir: str | Path | None, run_name: str | None, resume: str | Path | None
) -> None:
    """What a data-parallel launch checks in one process before it starts workers: options, run name, the run to
    resume, the data and the model. Workers would each report the same error, and a missing dataset on one rank
    surfaces on the others as a lost connection."""
    if run_name is not None:
        rundir.check_run_name(run_name)
    if resume == AUTO:
        resume = _auto_resume(runs_dir, run_name)
        if resume is not None and (resume / rundir.RESULTS).is_file():
            return  # the workers will each say that it finished, and succeed
    if resume is not None:
        _, cfg = _run_to_resume(resume)
    cfg = dataclasses.replace(cfg).validate()
    if resume is None and runs_dir is not None:
        rundir.check_writable(Path(runs_dir))
    data = load_training_data(cfg)
    check_training_memory(cfg, data, resolve_device(cfg.device))
    build_model(cfg, data)


def check_training_memory(cfg: TrainConfig, data: Dataset, device: torch.device) -> None:
    """Refuse a run whose model, batch and image size need more memory than `device` has, before allocating it.

    The evaluation batch only sets speed, so it is lowered to what fits (recorded in config.json) instead.
    """
    shape = (data.channels, data.image_size, data.image_size)
    arch = dataclasses.replace(cfg, pretrained=False, weights=None, weights_name=None)  # the same shapes, no file
    est = model_memory(lambda: build_model(arch, data), shape)
    if est is None:
        return
    on_device = 0
    if device.type != "cpu":  # the whole dataset is moved to the device as uint8
        on_device = sum(s.images.numel() for s in (data.train, data.val, data.test) if s is not None)
    states = {"sgd": 1, "adam": 2, "adamw": 2}.get(cfg.optimizer, 2)
    check_fits(
        f"training {cfg.model} on {shape[1]}x{shape[2]} images at batch {cfg.batch_size}",
        est.training(cfg.batch_size, states) + on_device, str(device),
        hint="lower --batch-size or --image-size, or use a smaller model",
    )  # fmt: skip
    budget = int(available_bytes(str(device)) * HEADROOM) - on_device
    cfg.eval_batch_size = est.eval_batch_that_fits(budget, cfg.eval_batch_size)


def _run_to_resume(resume: str | Path) -> tuple[Path, TrainConfig]:
    """The unfinished run RUN names and the TrainConfig it recorded in its (checked) config.json."""
    run = rundir.resolve_run(resume)
    saved = rundir.check_config(rundir.read_config(run), run / rundir.CONFIG, need_train=True)
    if (run / rundir.RESULTS).is_file():
        raise UsageError(f"{run}: this run has already finished; nothing to resume")
    try:
        return run, TrainConfig.from_dict(saved["train"])
    except (TypeError, ValueError) as e:
        raise UsageError(f"{run / rundir.CONFIG}: train options unusable ({str(e)[:120]})") from None


class _Trainer:
    """The state of one fit() call; methods are the steps of the loop, each short."""

    def __init__(
        self, cfg: TrainConfig, reporter: Reporter, dataset: Dataset | None, started: float | None = None
    ) -> None:
        started = time.perf_counter() if started is None else started  # when the run began (--time-budget counts)
        self.dist = distributed.env()
        self.cfg, self.reporter = cfg, reporter if self.dist.is_main else Reporter()  # only rank 0 talks
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_precision(cfg.precision, self.device)
        seed_everything(cfg.seed)  # the same on every process: identical initial weights
        if not self.dist.is_main:
            distributed.barrier()  # rank 0 loads first (and fills an image folder's decode cache for the others)
        self.data = dataset if dataset is not None else self._load_data()
        if self.dist.is_main:
            distributed.barrier()
        self.augment = tuple(cfg.augment) if cfg.augment is not None else self.data.default_augment
        self._split()
        check_training_memory(self.cfg, self.data, self.device)
        self.model = self._create_model().to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 7919 * self.dist.rank)
        # Data-parallel: the epoch permutation must be the same on every process, the augmentation draws not.
        self.order_gen = torch.Generator(device=self.device).manual_seed(cfg.seed) if self.dist.enabled else None
        self.train_loader = BatchLoader(
            self.train_set,
            cfg.batch_size,
            self.norm,
            shuffle=True,
            augment=self.augment,
            generator=self.gen,
            device=self.device,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            order_generator=self.order_gen,
            channels_last=cfg.channels_last,
        )
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.head: list[str] | None = None
        if cfg.fine_tuning():
            probe = torch.zeros(1, self.data.channels, self.data.image_size, self.data.image_size, device=self.device)
            self.head = classifier_modules(self.model, probe)
        if cfg.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise UsageError("--sync-bn needs CUDA devices (nccl); on CPU each process keeps its own statistics")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.opt = build_optimizer(self.model, cfg, self.head)
        self.train_model: nn.Module = self.model
        self._wrap_ddp()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.budget_clock: float | None = None  # --time-budget: when the budgeted run started (None: not re-planned)
        self.budget_fixed = 0.0  # seconds the run needs after its last step (test evaluation, results)
        if cfg.time_budget is not None and cfg.planned_steps is None:
            cfg.planned_steps = self._plan_time_budget(started)
            self.budget_clock = started
        if cfg.planned_steps is not None:  # a time budget's plan (also on resume): the schedule ends right there
            self.total_steps = cfg.planned_steps
            cfg.epochs = math.ceil(cfg.planned_steps / self.steps_per_epoch)
        self.sched = build_scheduler(self.opt, cfg, self.total_steps, self.steps_per_epoch)
        self.epoch, self.step = 0, 0
        self.best_loss, self.best_epoch, self.bad_epochs = math.inf, 0, 0
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0
        self.run: Path | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.progress: EpochProgress | None = None  # set while an epoch is under way
        self.skipped_steps = 0  # steps skipped by --on-nan skip
        self.stop_requested: str | None = None  # the name of the signal asking training to stop
        self.last_save = time.monotonic()

    def _load_data(self) -> Dataset:
        data = load_training_data(self.cfg)
        for note in data.notes:
            self.reporter.message(note)
        return data

    def _create_model(self) -> nn.Module:
        model = build_model(self.cfg, self.data)
        info = getattr(model, "pretrained_info", None)
        if info:
            # Pretrained features expect the weights' own normalisation; a grey image sees the mean over RGB.
            mean, std = info["mean"], info["std"]
            if self.data.channels != len(mean):
                mean, std = [sum(mean) / len(mean)] * self.data.channels, [sum(std) / len(std)] * self.data.channels
            self.norm = Normalization(tuple(mean), tuple(std))
        return model

    def _split(self) -> None:
        cfg, train = self.cfg, self.data.train
        if self.data.val is not None:  # the source has its own validation split (an image folder's val/)
            self.train_set, self.val_set = train, self.data.val
        elif cfg.val_split > 0:
            rest, held = stratified_split(train.labels, cfg.val_split, cfg.seed)
            if len(held) == 0 or len(rest) == 0:
                raise UsageError(
                    f"--val-split {cfg.val_split} leaves an empty split of {len(train)} training images "
                    "(it holds out round(fraction x images) per class); raise it, or use --val-split 0 --patience 0"
                )
            self.train_set, self.val_set = train.subset(rest), train.subset(held)
        else:
            self.train_set, self.val_set = train, None
        # Normalisation comes from the images the model trains on, never from validation or test images.
        self.norm: Normalization = channel_stats(self.train_set.images)

    def eval_loader(self, which: str) -> BatchLoader | None:
        """A loader over the validation or test split, without augmentation."""
        data = self.val_set if which == "val" else self.data.test
        if data is None or len(data) == 0:
            return None
        if self.dist.enabled:  # each process evaluates its own shard; evaluate_batches sums the results
            data = data.subset(torch.arange(self.dist.rank, len(data), self.dist.world_size))
        return BatchLoader(data, self.cfg.eval_batch_size, self.norm, device=self.device,
                           channels_last=self.cfg.channels_last)  # fmt: skip

    def _time_steps(self) -> tuple[float, float]:
        """(seconds per training step, seconds per evaluated image), timed on real batches after a warm-up.

        The weights, BatchNorm statistics, optimizer, scaler and random streams are put back afterwards: the run that
        follows is the same as without the timing.
        """
        cfg, loader = self.cfg, self.train_loader
        saved_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        saved_opt = copy.deepcopy(self.opt.state_dict())
        saved_scaler = self.scaler.state_dict() if self.scaler else None
        saved_rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        saved_gens = loader.generator, loader.order_generator
        loader.generator = loader.order_generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        warmup, stamps = 2, []  # the first steps pay for kernel selection and allocation

        def enough() -> bool:
            if self.dist.enabled:  # every process must take the same number of (collective) steps
                return len(stamps) >= warmup + 10
            return len(stamps) >= warmup + 40 or (len(stamps) > warmup + 3 and stamps[-1] - stamps[warmup] >= 0.5)

        try:
            self.train_model.train()
            while not enough():
                for x, y in loader.batches(loader.epoch_order()):
                    loss, _ = self._forward_backward(x, y)
                    self._optimizer_step()
                    loss.item()
                    synchronize(self.device)
                    stamps.append(time.perf_counter())
                    if enough():
                        break
            step_s = (stamps[-1] - stamps[warmup]) / (len(stamps) - 1 - warmup)
            per_image = self._time_eval()
        finally:
            self.model.load_state_dict(saved_model)
            self.opt.load_state_dict(saved_opt)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler and saved_scaler:
                self.scaler.load_state_dict(saved_scaler)
            torch.set_rng_state(saved_rng[0])
            if saved_rng[1] is not None:
                torch.cuda.set_rng_state_all(saved_rng[1])
            loader.generator, loader.order_generator = saved_gens
        return step_s, per_image

    @torch.no_grad()
    def _time_eval(self) -> float:
        """Seconds per evaluated image (with test-time augmentation if on), timed on a test batch."""
        loader = self.eval_loader("test") or self.eval_loader("val")
        if loader is None:
            return 0.0
        x, _ = next(iter(loader))
        self.model.eval()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            with autocast(self.device, self.dtype):
                predict_logits(self.model, x, self.cfg.tta).float().sum().item()
            times.append(time.perf_counter() - t0)
        self.model.train()
        return min(times[1:]) / len(x)

    def _plan_time_budget(self, started: float) -> int:
        """--time-budget: the number of steps that ends training, evaluation and saving within the budget."""
        cfg = self.cfg
        step_s, image_s = self._time_steps()
        n_val = len(self.val_set) if self.val_set is not None else 0
        per_epoch = n_val * image_s + (BUDGET_SAVE_S if self.dist.is_main else 0.0)  # validation + checkpoint
        fixed = len(self.data.test) * image_s + BUDGET_FINISH_S  # the test evaluation, results and curves
        self.budget_fixed = fixed
        left = cfg.time_budget * BUDGET_SAFETY - (time.perf_counter() - started) - fixed
        # s steps run ceil(s / steps_per_epoch) <= s / steps_per_epoch + 1 epochs, each with its own overhead.
        steps = int((left - per_epoch) / (step_s + per_epoch / self.steps_per_epoch))
        if cfg.max_steps:
            steps = min(steps, cfg.max_steps)
        # Every process must run the same plan: rank 0's.
        steps = distributed.from_rank0(steps)
        if steps < 1:
            # The smallest budget for which the plan below has one step, with the same set-up time.
            one_step = step_s + per_epoch / self.steps_per_epoch
            need = ((time.perf_counter() - started) + fixed + per_epoch + one_step) / BUDGET_SAFETY
            raise UsageError(
                f"--time-budget {cfg.time_budget:g}: too short; one step takes {step_s:.3g} s and evaluation "
                f"{fixed:.3g} s after {time.perf_counter() - started:.3g} s of set-up; give at least "
                f"{max(math.ceil(need), math.floor(cfg.time_budget) + 1)} s"
            )
        self.reporter.message(
            f"time budget {cfg.time_budget:g} s: one step takes {step_s * 1e3:.1f} ms, evaluating one image "
            f"{image_s * 1e6:.0f} us -> {steps} steps ({steps / self.steps_per_epoch:.2f} epochs)"
        )
        return steps

    def config_dict(self) -> dict[str, Any]:
        """Everything config.json records: options, model, data (classes, normalisation), runtime."""
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "cnnlab_version": cnnlab.__version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": {
                "name": self.cfg.model,
                "num_classes": len(self.data.classes),
                "in_channels": self.data.channels,
                "image_size": self.data.image_size,
                "params": n_params,
                "args": dict(self.cfg.model_args),
                "changes": list(getattr(self.model, "cnnlab_changes", [])),
                "pretrained": getattr(self.model, "pretrained_info", None),
                "classifier": self.head,  # the module(s) --freeze features keeps trainable
            },
            "data": {
                "name": self.data.name,
                "classes": list(self.data.classes),
                "channels": self.data.channels,
                "image_size": self.data.image_size,
                "mean": list(self.norm.mean),
                "std": list(self.norm.std),
                "augment": list(self.augment),
                "train_size": len(self.train_set),
                "val_size": len(self.val_set) if self.val_set is not None else 0,
                "test_size": len(self.data.test),
                "validation": "given by the source"
                if self.data.val is not None
                else f"{self.cfg.val_split:g} of train",
                **self.data.extra,
            },
            "train": self.cfg.to_dict(),
            "runtime": {
                "device": str(self.device),
                "precision": str(self.dtype).replace("torch.", ""),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "world_size": self.dist.world_size,
                "global_batch": self.cfg.batch_size * self.dist.world_size,
            },
        }

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything an exact resume needs, as tensors and plain values."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch, "step": self.step, "elapsed": self.elapsed,
            "early_stop": {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs},
            "history": self.history,
            "partial": self.progress.state() if self.progress is not None else None,
            "skipped_steps": self.skipped_steps,
            "rng": rng_state(self._generators()),
        }  # fmt: skip

    def restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint_state() back."""
        apply_state_dict(self.model, state["model"], source="model")
        self.opt.load_state_dict(state["optimizer"])
        if self.sched and state["scheduler"]:
            self.sched.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.elapsed = state["epoch"], state["step"], state["elapsed"]
        es = state["early_stop"]
        self.best_loss, self.best_epoch, self.bad_epochs = es["best_loss"], es["best_epoch"], es["bad_epochs"]
        self.history = list(state["history"])
        self.skipped_steps = state.get("skipped_steps", 0)
        partial = state.get("partial")
        self.progress = EpochProgress.from_state(partial, self.device) if partial else None
        saved = state["rng"]["generators"]
        set_rng_state(state["rng"], {k: g for k, g in self._generators().items() if k in saved})
        if self.dist.rank > 0:  # the checkpoint holds rank 0's augmentation stream; the others draw their own
            self.gen.manual_seed(self.cfg.seed + 7919 * self.dist.rank + self.step)

    def _generators(self) -> dict[str, torch.Generator]:
        gens = {"data": self.gen}
        if self.order_gen is not None:
            gens["order"] = self.order_gen
        return gens

    def _new_progress(self) -> EpochProgress:
        zero = torch.zeros((), device=self.device)
        lr = self.opt.param_groups[-1]["lr"]  # the head's lr (fine-tuning: backbone groups come first)
        return EpochProgress(self.train_loader.epoch_order(), 0, zero.clone(), zero.long(), zero.long() - 1, 0, lr)

    def _wrap_ddp(self) -> None:
        """The module the training step calls: DDP (averages gradients over processes), compiled with --compile."""
        self.train_model = self.model
        if self.dist.enabled and any(p.requires_grad for p in self.model.parameters()):
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP only syncs parameters that need gradients when it is built: rebuilt when the backbone unfreezes.
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        if self.cfg.compile:
            self.train_model = torch.compile(self.train_model)

    def frozen(self) -> bool:
        """Whether the feature extractor is fixed during the coming epoch (--freeze features, --unfreeze-after)."""
        cfg = self.cfg
        return cfg.freeze == "features" and (cfg.unfreeze_after is None or self.epoch < cfg.unfreeze_after)

    def _set_trainable(self) -> None:
        """Freeze or unfreeze the backbone for this epoch; frozen BatchNorm layers keep their running statistics."""
        if self.head is None:
            return
        frozen = self.frozen()
        backbone, _ = split_parameters(self.model, self.head)
        changed = bool(backbone) and backbone[0].requires_grad == frozen
        if (
            self.cfg.unfreeze_after
            and self.epoch == self.cfg.unfreeze_after
            and backbone
            and not backbone[0].requires_grad
        ):
            self.reporter.message(
                f"epoch {self.epoch + 1}: unfreezing the feature extractor (its lr x{self.cfg.backbone_lr_mult:g})"
            )
        for p in backbone:
            p.requires_grad_(not frozen)
        if changed:
            self._wrap_ddp()
        if frozen:
            head_modules = {m for name in self.head for m in self.model.get_submodule(name).modules()}
            for m in self.model.modules():
                # In train mode BN would still update running mean/var from the new data: frozen means fixed.
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in head_modules:
                    m.eval()

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training split (or the rest of it, after a mid-epoch resume): loss and accuracy."""
        model = self.model
        model.train()
        self._set_trainable()
        sync_each_step = self.device.type == "cpu"  # on a GPU, reading the loss every step would stall it
        prog = self.progress if self.progress is not None else self._new_progress()
        self.progress = prog
        self.reporter.epoch_start(self.epoch + 1, min(self.steps_per_epoch - prog.batch, self.total_steps - self.step))
        for x, y in self.train_loader.batches(prog.order, prog.batch):
            loss, logits = self._forward_backward(x, y)
            ok = self._clip_and_check(loss)
            if ok:
                self._optimizer_step()
            if self.sched:
                self.sched.step()
            if not ok:  # --on-nan skip: this step changes no weight and counts in no metric
                self.step += 1
                self.skipped_steps += 1
                prog.batch += 1
                self.reporter.message(f"skipped step {self.step} (epoch {self.epoch + 1}): non-finite loss or gradient")
                if self.step >= self.total_steps:
                    break
                continue
            self.step += 1
            distributed.maybe_inject_fault(self.step, self.dist)
            prog.add(loss.detach(), logits.detach(), y, self.step)
            self.reporter.step(self.epoch + 1, prog.batch, loss.detach().item() if sync_each_step else None)
            if self.step >= self.total_steps:
                break
            if self.stop_requested or self._checkpoint_due():
                self._save_mid_epoch()
        self._check_finite(prog)
        self.progress = None
        loss_sum, correct, seen = distributed.all_sum([prog.loss_sum, prog.correct, prog.correct.new_tensor(prog.seen)])
        return {
            "train_loss": loss_sum.item() / max(1, int(seen.item())),
            "train_acc": correct.item() / max(1, int(seen.item())),
            "lr": prog.lr,
        }

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits of one batch, gradients in .grad (unscaled: ready to clip and step)."""
        with autocast(self.device, self.dtype):
            logits = self.train_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        return loss, logits

    def _optimizer_step(self) -> None:
        """Apply the gradients (through the grad scaler in fp16, which skips steps with inf/nan gradients)."""
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()

    def _clip_and_check(self, loss: torch.Tensor) -> bool:
        """Clip gradients (--clip-grad); with --on-nan skip, False for a non-finite loss or gradient."""
        cfg = self.cfg
        norm = None
        if cfg.clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        if cfg.on_nan != "skip" or self.scaler is not None:  # fp16's grad scaler already skips inf/nan steps
            return True
        if norm is None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # One host sync per step: the price of deciding on the host whether to step.
        return bool(torch.isfinite(loss) and torch.isfinite(norm))

    def _checkpoint_due(self) -> bool:
        cfg = self.cfg
        if cfg.checkpoint_steps and self.step % cfg.checkpoint_steps == 0:
            return True
        return bool(cfg.checkpoint_minutes) and time.monotonic() - self.last_save >= 60 * cfg.checkpoint_minutes

    def _check_finite(self, prog: EpochProgress) -> None:
        bad = int(prog.first_bad.item())
        if bad >= 0:
            raise CnnlabError(
                f"training diverged: non-finite loss at epoch {self.epoch + 1}, step {bad}; the last checkpoint "
                f"is from before it (try a lower --lr or --clip-grad)"
            )

    def _save_mid_epoch(self) -> None:
        """A checkpoint inside an epoch (for --checkpoint-every, or on SIGINT/SIGTERM); then stop if asked to."""
        self._check_finite(self.progress)  # never save weights after a non-finite loss
        if self.run:
            save_checkpoint(self.checkpoint_state(), self.run / rundir.LAST)
            self.last_save = time.monotonic()
        if self.stop_requested:
            self._raise_interrupted()

    def _raise_interrupted(self) -> None:
        where = f"epoch {self.epoch + 1}, step {self.step}"
        if self.run is None:
            raise TrainingInterrupted(
                f"interrupted by {self.stop_requested} at {where}; no run directory, nothing saved"
            )
        raise TrainingInterrupted(
            f"interrupted by {self.stop_requested} at {where}; checkpoint saved, resume "
            f"with: cnnlab train --resume {self.run}"
        )

    def _replan(self, epoch_seconds: float, epoch_steps: int) -> str | None:
        """--time-budget: after an epoch, re-plan the remaining steps at the pace measured over it.

        The first plan rests on a second of timing; a machine whose speed drifts (shared or throttled CPUs) would
        otherwise overrun. The one-cycle schedule is rebuilt over the new total, continuing at the current step.
        """
        cfg = self.cfg
        if self.budget_clock is None or epoch_steps < 1 or self.step >= self.total_steps:
            return None
        pace = epoch_seconds / epoch_steps  # seconds per step, this epoch's validation and checkpoint included
        left = cfg.time_budget * BUDGET_SAFETY - (time.perf_counter() - self.budget_clock) - self.budget_fixed
        total = self.step + max(1, int(left / pace))
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        total = distributed.from_rank0(total)
        if abs(total - self.total_steps) <= max(2, self.total_steps // 200):
            return None  # within 0.5%: keep the schedule as it is
        note = f"time budget: re-planned from {self.total_steps} to {total} steps ({pace * 1e3:.1f} ms per step)"
        self.total_steps = cfg.planned_steps = total
        cfg.epochs = math.ceil(total / self.steps_per_epoch)
        self.sched = build_scheduler(self.opt, cfg, total, self.steps_per_epoch)
        if self.sched is not None:
            with warnings.catch_warnings():  # "step() before optimizer.step()": the optimizer has stepped long ago
                warnings.simplefilter("ignore", UserWarning)
                self.sched.last_epoch = self.step - 1
                self.sched.step()  # the learning rate at step self.step of the new schedule
        if self.run:  # a resumed run follows the new plan
            config = rundir.read_config(self.run)
            config["train"] = cfg.to_dict()
            rundir.write_config(self.run, config)
        return note

    def run_epochs(self) -> bool:
        """Train until the epochs, the step cap or early stopping end it; True if stopped early."""
        cfg, run = self.cfg, self.run
        val_loader = self.eval_loader("val")
        while self.epoch < cfg.epochs and self.step < self.total_steps:
            t0 = time.perf_counter()
            step_before = self.step
            row: dict[str, Any] = {"epoch": self.epoch + 1, **self.train_epoch()}
            if val_loader is not None:
                val = evaluate_batches(self.model, iter(val_loader), cfg.label_smoothing, self.dtype, cfg.tta)
                row.update(val_loss=val["loss"], val_acc=val["acc"])
            self.epoch += 1
            row["seconds"] = time.perf_counter() - t0
            self.elapsed += row["seconds"]
            row["elapsed"] = self.elapsed
            self.history.append(row)
            replanned = self._replan(row["seconds"], self.step - step_before)  # before the checkpoint saves the plan
            improved = val_loader is None or row["val_loss"] < self.best_loss
            if improved:
                self.best_loss = row.get("val_loss", math.inf) if val_loader is not None else math.inf
                self.best_epoch, self.bad_epochs = self.epoch, 0
                if run:
                    save_weights(self.model, run / rundir.BEST)
                else:  # no run directory: keep the best weights in memory instead
                    self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            else:
                self.bad_epochs += 1
            if run:
                save_checkpoint(self.checkpoint_state(), run / rundir.LAST)
                rundir.write_metrics(run, self.history)
            self.reporter.epoch_end(row)
            if replanned:
                self.reporter.message(replanned)
            if self.stop_requested:
                self._raise_interrupted()
            if cfg.patience and self.bad_epochs >= cfg.patience:
                self.reporter.message(
                    f"early stopping: validation loss has not improved for {cfg.patience} "
                    f"epochs; restoring epoch {self.best_epoch}"
                )
                return True
        return False

    def finish(self, stopped_early: bool, started: float) -> TrainResult:
        """Restore the best weights, evaluate on the test split, write results and curves."""
        run = self.run
        if run and (run / rundir.BEST).is_file():
            load_weights(self.model, run / rundir.BEST)
        elif self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        test_loader = self.eval_loader("test")
        test = (
            evaluate_batches(self.model, iter(test_loader), self.cfg.label_smoothing, self.dtype, self.cfg.tta)
            if test_loader
            else {"loss": float("nan"), "acc": float("nan"), "top5": float("nan")}
        )
        result = TrainResult(
            run_dir=run, model=self.cfg.model, data=self.data.name, test_acc=test["acc"], test_loss=test["loss"],
            test_top5=test["top5"], best_epoch=self.best_epoch, epochs_run=self.epoch, stopped_early=stopped_early,
            seconds=time.perf_counter() - started, device=str(self.device),
            skipped_steps=self.skipped_steps, steps=self.step, time_budget=self.cfg.time_budget, history=self.history,
        )  # fmt: skip
        if run:
            atomic_write_json(run / rundir.RESULTS, result.to_dict())
            plot_curves(
                self.history,
                run / rundir.CURVES,
                title=f"{self.cfg.model} on {self.data.name}",
                best_epoch=self.best_epoch if self.val_set is not None else None,
            )
        return result


@contextlib.contextmanager
def _graceful_stop(trainer: _Trainer) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop. A second one: stop at once (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: object) -> None:
        if trainer.stop_requested:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        trainer.stop_requested = signal.Signals(signum).name
        trainer.reporter.message(f"{trainer.stop_requested}: stopping after this step (again to stop at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def fit(
    config: TrainConfig | None = None,
    *,
    runs_dir: str | Path | None = "runs",
    run_name: str | None = None,
    reporter: Reporter | None = None,
    dataset: Dataset | None = None,
    resume: str | Path | None = None,
    device: str | None = None,
) -> TrainResult:
    """Train, validate each epoch, stop early on validation loss, restore the best weights and test them.

    With `runs_dir=None` nothing is written to disk. `resume=RUN` continues a stopped run exactly, with its own
    options (only `device` may be changed). `dataset` passes data in memory instead of loading `config.data`.
    """
    started = time.perf_counter()
    reporter = reporter or Reporter()
    owns_group = not distributed.is_initialized()
    dist_env, dist_device = distributed.setup(device or (config.device if config else "auto"))
    try:
        if run_name is not None:
            rundir.check_run_name(run_name)
        if resume == AUTO:
            resume = _auto_resume(runs_dir, run_name)
            if resume is not None and (resume / rundir.RESULTS).is_file():
                # A torchrun command rerun after it succeeded: every rank says so quietly, none fails.
                reporter.message(f"{resume}: this run has already finished; nothing to resume")
                return _finished_result(resume)
        return _fit(config, runs_dir, run_name, reporter, dataset, resume, dist_device if dist_env.enabled else device,
                    started)  # fmt: skip
    finally:
        if owns_group:
            distributed.teardown()


AUTO = "auto"


def _auto_resume(runs_dir: str | Path | None, run_name: str | None) -> Path | None:
    """--resume auto: the named run if it exists and is unfinished (a torchrun restart), else None (start it)."""
    if runs_dir is None or not run_name:
        raise UsageError("--resume auto needs --name NAME: the run to continue if it exists, or to start if not")
    run = Path(runs_dir) / rundir.check_run_name(run_name)
    if not (run / rundir.CONFIG).is_file():
        return None
    return run


def _finished_result(run: Path) -> TrainResult:
    """The TrainResult a finished run recorded in results.json."""
    path = run / rundir.RESULTS
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        names = {f.name for f in dataclasses.fields(TrainResult)} - {"history", "run_dir"}
        return TrainResult(run_dir=run, **{k: v for k, v in saved.items() if k in names})
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"{path}: unreadable results ({type(e).__name__}: {str(e)[:80]})") from None


def _fit(
    config: TrainConfig | None,
    runs_dir: str | Path | None,
    run_name: str | None,
    reporter: Reporter,
    dataset: Dataset | None,
    resume: str | Path | None,
    device: str | None,
    started: float,
) -> TrainResult:
    state = None
    if resume is not None:
        run, config = _run_to_resume(resume)
        state = load_checkpoint(run / rundir.LAST) if (run / rundir.LAST).is_file() else None
    cfg = dataclasses.replace(config or TrainConfig())
    if device is not None:
        cfg.device = device
    cfg.validate()
    main = distributed.env().is_main  # only rank 0 writes the run directory
    if resume is None and runs_dir is not None and main:
        rundir.check_writable(Path(runs_dir))
    t = _Trainer(cfg, reporter, dataset, started)
    if resume is not None:
        t.run = run if main else None
        if state is not None:
            try:
                t.restore(state)
            except (CnnlabError, KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
                # Another model's checkpoint, or a hand-edited one: name it, never a traceback.
                why = str(e) if isinstance(e, CnnlabError) else f"{type(e).__name__}: {(str(e) or '?').splitlines()[0]}"
                raise UsageError(f"{run / rundir.LAST}: does not fit this run ({why[:160]})") from None
            if t.run is not None:
                # The checkpoint is the source of truth: a kill between it and metrics.csv cost the last row.
                rundir.write_metrics(t.run, t.history)
            inside = f", batch {t.progress.batch} of epoch {t.epoch + 1}" if t.progress is not None else ""
            t.reporter.message(f"resuming {run} after epoch {t.epoch}{inside} (step {t.step})")
    elif runs_dir is not None and main:
        # Created only now, after options, data and model all proved valid: a bad invocation leaves nothing behind.
        t.run = rundir.new_run_dir(runs_dir, cfg.model, t.data.name, run_name)
        rundir.write_config(t.run, t.config_dict())
    if t.dist.enabled:
        t.reporter.message(
            f"data-parallel: {t.dist.world_size} processes ({'nccl' if t.device.type == 'cuda' else 'gloo'}), "
            f"{cfg.batch_size} images each per step, global batch {cfg.batch_size * t.dist.world_size}"
        )
    t.reporter.train_start(
        {
            **t.config_dict(),
            "run_dir": str(t.run) if t.run else None,
            "steps_per_epoch": t.steps_per_epoch,
            "total_steps": t.total_steps,
            "start_epoch": t.epoch,
        }
    )
    with _graceful_stop(t):
        stopped = t.run_epochs()
    result = t.finish(stopped, started)
    t.reporter.train_end(result)
    return result
