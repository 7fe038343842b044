"""Set-up before a run: its data, its model, the memory it needs, the run to resume, and the checks a launcher makes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab.data.balance import MULTI_LABEL_SAMPLER
from cnnlab.data.pipeline import BatchLoader, Normalization
from cnnlab.data.sources import Dataset, is_csv_name, is_folder_name, load_dataset
from cnnlab.data.types import ImageSet
from cnnlab.engine import rundir
from cnnlab.engine.config import TrainConfig
from cnnlab.engine.device import resolve_device
from cnnlab.engine.record import RunRecord
from cnnlab.engine.result import TrainResult
from cnnlab.errors import OptionError, UsageError
from cnnlab.memory import HEADROOM, available_bytes, check_fits, model_memory
from cnnlab.models.registry import create_model

AUTO = "auto"  # resume="auto": continue the named run if it exists unfinished, else start it


def load_training_data(cfg: TrainConfig, check_model: bool = False) -> Dataset:
    """The dataset `cfg` names, at the size training uses (image folders: 224 px for pretrained weights).

    With `check_model`, photos (which may take hours to decode) are loaded only after the model proved to fit in
    memory at this image and batch size (the full check, with the data's classes and channels, follows the load).
    """
    size = cfg.image_size
    if size is None and is_folder_name(cfg.data) and (cfg.pretrained or cfg.weights or cfg.weights_name):
        size = 224  # the resolution ImageNet weights were trained and evaluated at
    if cfg.sampler == "balanced" and is_folder_name(cfg.data) and is_csv_name(cfg.data):
        from cnnlab.data.csvlabels import read_rows

        # Before any photo is decoded (hours for a large set): the balanced sampler needs one class per image.
        if read_rows(Path(cfg.data), cfg.csv_image_column, cfg.csv_label_column)[3]:
            raise OptionError("sampler", MULTI_LABEL_SAMPLER)
    if check_model and is_folder_name(cfg.data):
        from cnnlab.data.folders import DEFAULT_FOLDER_SIZE
        from cnnlab.data.types import ImageSet

        side = size or DEFAULT_FOLDER_SIZE
        empty = ImageSet(torch.empty((0, 3, side, side), dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
        probe = Dataset("photos", empty, empty, ("a", "b"))  # RGB, 2 classes: the most any folder's model needs
        check_training_memory(dataclasses.replace(cfg), probe, resolve_device(cfg.device))
    data = load_dataset(cfg.data, cfg.data_dir, download=cfg.download, image_size=size, on_bad_image=cfg.on_bad_image,
                        data_cache=cfg.data_cache, resize=cfg.resize, csv_image_column=cfg.csv_image_column,
                        csv_label_column=cfg.csv_label_column)  # fmt: skip
    if cfg.resize is None and is_folder_name(cfg.data):
        # The source's default policy (crop; squash for multi-label CSVs), recorded in config.json: predict and
        # evaluate cut photos as training did (runs without it predate it).
        cfg.resize = data.train.resize
    return data


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
        raise OptionError("model_args", f": {cfg.model} does not take these options ({e})") from None


def prior_bias(model: nn.Module, labels: torch.Tensor) -> str | None:
    """Multi-label: start each output's bias at the log-odds of its label's frequency; what was set, or None.

    A new sigmoid head starts at probability 1/2 for every label and first spends its steps learning that most labels
    are absent; starting at the prior (Lin et al. 2017, RetinaNet) skips that phase (3 epochs of LeNet-5 on 12 digit
    tags: mAP 0.58 -> 0.94). The output layer is the last Linear (or 1x1 Conv2d) with one output per label.
    """
    k = labels.shape[1]
    last = None
    for name, m in model.named_modules():
        linear = isinstance(m, nn.Linear) and m.out_features == k
        if linear or (isinstance(m, nn.Conv2d) and m.out_channels == k and m.kernel_size == (1, 1)):
            last = (name, m)
    if last is None or last[1].bias is None:
        return None
    prior = labels.double().mean(0).clamp(1e-4, 1 - 1e-4)  # (K,) share of images with each label
    with torch.no_grad():
        last[1].bias.copy_(torch.log(prior / (1 - prior)).to(last[1].bias.dtype))
    return f"{last[0]}: bias set to the log-odds of each label's frequency (multi-label prior)"


WHITEN_IMAGES = 5000  # at most this many training images (evenly spaced) fit a whitening stem ...
WHITEN_PATCHES = 4_000_000  # ... and at most this many of their 3x3 patches: 79 photos at 224 px
WHITEN_BATCH_PATCHES = 262_144  # patches per batch (54 MB of float64 for 3 channels); larger images are subsampled


def fit_whitening(model: nn.Module, data: ImageSet, norm: Normalization, device: torch.device) -> str | None:
    """A model with a whitening stem (cnn-fast stem="whiten"): fit its fixed filters on training images; what was set.

    Called before the first step, unless the stem was fitted before (a resumed run then loads the filters it trained
    with, overwriting these). The images are taken evenly over the training split, without augmentation, so every
    process of a data-parallel run fits the same filters.
    """
    if getattr(model, "whitening", None) is None or not hasattr(model, "fit_whitening"):
        return None
    if bool(getattr(model, "whitening_fitted", 0)):
        return None  # fitted before (a trained module trained again): its later layers learned on these filters
    # Every stride-th patch position per direction: at most WHITEN_BATCH_PATCHES from any one image (1 up to 512 px).
    stride = max(1, math.ceil(data.side / math.sqrt(WHITEN_BATCH_PATCHES)))
    per_image = math.ceil(data.side / stride) ** 2
    n = max(1, min(len(data), WHITEN_IMAGES, WHITEN_PATCHES // per_image))
    index = torch.linspace(0, len(data) - 1, n).round().long().unique()
    batch = max(1, min(512, WHITEN_BATCH_PATCHES // per_image))
    loader = BatchLoader(data.subset(index), batch, norm, device=device)
    seen = model.fit_whitening((x for x, _ in loader), max_patches=WHITEN_PATCHES, stride=stride)
    return f"whitening stem: fixed filters from the 3x3 patches of {len(index):,} training images ({seen:,} patches)"


def check_sync_bn(cfg: TrainConfig, device: torch.device) -> None:
    """--sync-bn needs CUDA devices (nccl): refused on CPU by the launch's preflight and by each worker."""
    if cfg.sync_bn and device.type != "cuda":
        raise OptionError("sync_bn", "needs CUDA devices (nccl); on CPU each process keeps its own statistics")


def preflight(
    cfg: TrainConfig, *, runs_dir: str | Path | None, run_name: str | None, resume: str | Path | None
) -> None:
    """What a data-parallel launch checks in one process before it starts workers: options, run name, the run to
    resume, the data and the model. Workers would each report the same error, and a missing dataset on one rank
    surfaces on the others as a lost connection."""
    if run_name is not None:
        rundir.check_run_name(run_name)
    if resume == AUTO:
        resume = auto_resume(runs_dir, run_name)
        if resume is not None and (resume / rundir.RESULTS).is_file():
            return  # the workers will each say that it finished, and succeed
    if resume is not None:
        _, cfg = run_to_resume(resume)
    cfg = dataclasses.replace(cfg).validate()
    check_sync_bn(cfg, resolve_device(cfg.device))  # each worker would say it only after starting up
    from cnnlab.engine.loggers import check_installed

    check_installed(cfg.logger)
    if resume is None and runs_dir is not None:
        rundir.check_writable(Path(runs_dir))
    data = load_training_data(cfg, check_model=True)
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
        on_device = sum(s.resident_bytes() for s in (data.train, data.val, data.test) if s is not None)
    states = {"sgd": 1, "adam": 2, "adamw": 2}.get(cfg.optimizer, 2)
    check_fits(
        f"training {cfg.model} on {shape[1]}x{shape[2]} images at batch {cfg.batch_size}",
        est.training(cfg.batch_size, states) + on_device, str(device),
        hint="lower {batch_size} or {image_size}, or use a smaller model"
        + (", or {data_cache=disk} to read the images per batch instead of holding them there" if on_device else ""),
    )  # fmt: skip
    budget = int(available_bytes(str(device)) * HEADROOM) - on_device
    cfg.eval_batch_size = est.eval_batch_that_fits(budget, cfg.eval_batch_size)


def run_to_resume(resume: str | Path) -> tuple[Path, TrainConfig]:
    """The unfinished run RUN names and the TrainConfig it recorded in its (checked) config.json."""
    run = rundir.resolve_run(resume)
    train = RunRecord.read(run, need_train=True).train
    if (run / rundir.RESULTS).is_file():
        raise UsageError(f"{run}: this run has already finished; nothing to resume")
    assert train is not None  # need_train
    return run, train


def auto_resume(runs_dir: str | Path | None, run_name: str | None) -> Path | None:
    """--resume auto: the named run if it exists and is unfinished (a torchrun restart), else None (start it)."""
    if runs_dir is None or not run_name:
        raise OptionError("resume", "auto needs {name}: the run to continue if it exists, or to start if not")
    run = Path(runs_dir) / rundir.check_run_name(run_name)
    if not (run / rundir.CONFIG).is_file():
        return None
    return run


def finished_result(run: Path) -> TrainResult:
    """The TrainResult a finished run recorded in results.json."""
    path = run / rundir.RESULTS
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        names = {f.name for f in dataclasses.fields(TrainResult)} - {"history", "run_dir"}
        return TrainResult(run_dir=run, **{k: v for k, v in saved.items() if k in names})
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"{path}: unreadable results ({type(e).__name__}: {str(e)[:80]})") from None
