"""The Python way in: `run = cnnlab.train(...)`, `run = cnnlab.load_run(path)`, then run.predict / evaluate / export.

Every `cnnlab train` option is a keyword of train() with the same name (`--batch-size` is `batch_size=`); errors name
the keyword. `model` may also be any nn.Module, `data` arrays or tensors `(x, y)` or a torch Dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnlab.data.sources import Dataset, ImageSet
from cnnlab.engine import rundir
from cnnlab.engine.callbacks import Callback
from cnnlab.engine.config import TrainConfig, option_names
from cnnlab.engine.inference import Evaluation, LoadedRun, Prediction
from cnnlab.engine.lr_find import LRFind
from cnnlab.engine.record import RunRecord
from cnnlab.engine.reporter import Reporter
from cnnlab.engine.result import TrainResult
from cnnlab.errors import UsageError, unknown_name
from cnnlab.memory import check_fits

ARRAY_DATA = "<arrays>"  # config.json's data name for images passed in memory (resume and evaluate need them again)


def train(
    model: str | nn.Module | None = None,
    data: Any = None,
    *,
    runs_dir: str | Path | None = "runs",
    name: str | None = None,
    resume: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    classes: Sequence[str] | None = None,
    **options: Any,
) -> Run:
    """Train `model` on `data` with cnnlab's defaults and any train option as a keyword; returns the Run.

    model: a registered name (`cnnlab models`; None: lenet5-modern, or the recipe's) or your own nn.Module (trained
    in place; its output must have one logit per class). data: a dataset name (None: mnist-mini, or the recipe's),
    an image folder, a cnnlab Dataset, a torch Dataset of (image, label), or arrays/tensors `(x, y)` - or
    `((x, y), (x_test, y_test))` to also test. `x` holds images as (N, H, W), (N, C, H, W) or (N, H, W, C), uint8
    or floats in [0, 1]; `y` holds class indices or class names.
    runs_dir=None writes nothing to disk. progress: a live bar (a notebook's own, or the terminal's).
    """
    cfg, dataset, module = _config(model, data, classes, options, "train()")
    from cnnlab.engine.trainer import train_run

    reporter = make_reporter(progress)
    try:
        trainer, result = train_run(
            cfg if resume is None else None, runs_dir=runs_dir, run_name=name, reporter=reporter, dataset=dataset,
            resume=resume, callbacks=callbacks, module=module,
        )  # fmt: skip
    finally:
        getattr(reporter, "close", lambda: None)()
    if trainer is None:  # resume="auto" of a run that had finished
        return load_run(result.run_dir, model=module)
    weights = (trainer.run / rundir.BEST) if trainer.run else None
    loaded = LoadedRun(path=trainer.run, record=trainer.record(), model=trainer.model.eval(), weights=weights)
    return Run(loaded, result.history, result, dataset)


def _config(model: str | nn.Module | None, data: Any, classes: Sequence[str] | None, options: dict[str, Any],
            caller: str) -> tuple[TrainConfig, Dataset | None, nn.Module | None]:  # fmt: skip
    """The options as a TrainConfig, the data in memory (None for a name or folder) and the user's own module."""
    unknown = sorted(set(options) - option_names())
    if unknown:
        raise unknown_name("option", unknown[0], option_names(), f"{caller} takes every `cnnlab train` option")
    module = model if isinstance(model, nn.Module) else None
    if module is None and not isinstance(model, str | None):
        raise UsageError(f"model: expected a registered name or an nn.Module, got {type(model).__name__}")
    data = str(data) if isinstance(data, Path) else data
    dataset = as_dataset(data, classes) if data is not None else None
    given = {**options}  # what the caller chose: a recipe fills in only the rest, as on the command line
    if model is not None:
        given["model"] = model if module is None else f"module:{type(module).__name__}"
    if data is not None:
        given["data"] = data if isinstance(data, str) else (dataset.name if dataset is not None else ARRAY_DATA)
    cfg = TrainConfig(**given)
    if cfg.recipe:
        from cnnlab.engine.recipes import apply_recipe

        cfg = apply_recipe(cfg, cfg.recipe, keep=given)
    return cfg, dataset, module


def lr_find(
    model: str | nn.Module | None = None,
    data: Any = None,
    *,
    steps: int = 100,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    classes: Sequence[str] | None = None,
    **options: Any,
) -> LRFind:
    """The learning-rate range test on `model` and `data` with any train option as a keyword; nothing is written.

    The rate rises exponentially from start_lr to end_lr over at most `steps` optimizer steps of ordinary training;
    the result has `.suggested_lr` (the steepest descent of the smoothed loss), `.lrs`, `.losses` (smoothed),
    `.raw_losses` and `.plot(path=None)`, a matplotlib Figure. model, data and classes are as in train().
    """
    from cnnlab.engine.lr_find import find_lr

    cfg, dataset, module = _config(model, data, classes, options, "lr_find()")
    return find_lr(cfg, start_lr=start_lr, end_lr=end_lr, steps=steps, dataset=dataset, module=module)


def make_reporter(progress: bool) -> Reporter:
    """A notebook's bar inside Jupyter, the terminal's bar elsewhere, or silence."""
    if not progress:
        return Reporter()
    from cnnlab.notebook import NotebookReporter, in_notebook

    if in_notebook():
        return NotebookReporter()
    from cnnlab.reporting import ConsoleReporter

    return ConsoleReporter()


def load_run(path: str | Path, device: str = "cpu", model: nn.Module | None = None) -> Run:
    """A finished (or stopped) run from its directory: its best weights, metrics and results.

    A run that trained your own nn.Module needs `model`: a module of the same architecture to load the weights into.
    """
    from cnnlab.engine.inference import load_run as load_weights_of_run

    run = rundir.resolve_run(path)
    loaded = _load_into(run, model, device) if model is not None else load_weights_of_run(run, device=device)
    history = rundir.read_metrics(run) if (run / rundir.METRICS).is_file() else []
    results = run / rundir.RESULTS
    result = None
    if results.is_file():
        from cnnlab.engine.setup import finished_result

        result = finished_result(run)
        result.history = history
    return Run(loaded, history, result, None)


def _load_into(run: Path, model: nn.Module, device: str) -> LoadedRun:
    from cnnlab.engine.checkpoint import load_weights

    record = RunRecord.read(run)
    load_weights(model, run / rundir.BEST)
    return LoadedRun.of(run, record, model, run / rundir.BEST, device)


class Run:
    """A trained network and its record: `.model`, `.metrics`, `.dir`, `.result`; predict, evaluate, export, plot."""

    def __init__(self, loaded: LoadedRun, metrics: list[dict[str, Any]], result: TrainResult | None,
                 dataset: Dataset | None) -> None:  # fmt: skip
        self._loaded, self._dataset = loaded, dataset
        self.metrics = metrics  # one dict per epoch, as in metrics.csv
        self.result = result  # test metrics and timings (None for a run that has not finished)

    @property
    def model(self) -> nn.Module:
        """The network with the run's best weights, in eval mode."""
        return self._loaded.model

    @property
    def dir(self) -> Path | None:
        """The run directory (None when trained with runs_dir=None)."""
        return self._loaded.path

    @property
    def loaded(self) -> LoadedRun:
        """What the lower-level functions take (cnnlab.evaluate_run, predict_files, export_run)."""
        return self._loaded

    @property
    def record(self) -> RunRecord:
        """The run's config.json as types: .model, .data, .train (every option), .runtime."""
        return self._loaded.record

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, in the order of the model's outputs."""
        return self._loaded.classes

    def __repr__(self) -> str:
        name, data = self._loaded.record.model.name, self._loaded.record.data.name
        done = (
            f"{self.result.headline(details=False)}, " if self.result and not math.isnan(self.result.test_acc) else ""
        )
        epochs = f"{len(self.metrics)} epoch{'s' if len(self.metrics) != 1 else ''}"
        return f"Run({name} on {data}: {done}{epochs}, {self.dir or 'not saved'})"

    def predict(self, x: Any, top_k: int = 5) -> Prediction | list[Prediction]:
        """Top-k labels of an image - a file path, a PIL image, a numpy array or a tensor - or of a list of them.

        One image gives one Prediction (`.label`, `.prob`, `.labels`, `.probs`); a list or a batch (N, ...) gives a
        list. Images are decoded, resized and normalised as in training. A multi-label run gives every label whose
        probability reaches its threshold (chosen on the validation split), most probable first, and `.thresholds`.
        """
        from cnnlab.engine.inference import logits_of, predictions

        images, names, single = to_images(x, self._loaded)
        out = predictions(self._loaded, logits_of(self._loaded, images), names, top_k)
        return out[0] if single else out

    def evaluate(self, data: str | Any | None = None, split: str = "test") -> Evaluation:
        """Accuracy, loss, per-class report, confusion matrix and worst mistakes on the test split (or on `data`)."""
        from cnnlab.engine.inference import evaluate_run

        if data is not None and not isinstance(data, str):
            ds = as_dataset(data, self.classes)
            return evaluate_run(self._loaded, images=ds.test if len(ds.test) else ds.train, name=ds.name)
        if data is None and self._dataset is not None:
            chosen = {"test": self._dataset.test, "train": self._dataset.train}.get(split)
            if chosen is None:
                raise UsageError(f"split: {split!r}; in-memory data has 'train' and 'test'")
            return evaluate_run(self._loaded, images=chosen, name=self._dataset.name, split=split)
        return evaluate_run(self._loaded, data=data, split=split)

    def export(self, format: str = "onnx", path: str | Path | None = None) -> Path:
        """Write the model as ONNX or TorchScript (checked against the model on real images); returns the file."""
        from cnnlab.engine.export import export_run
        from cnnlab.engine.inference import eval_data

        if self.dir is None and path is None:
            raise UsageError("path: this run has no directory (runs_dir=None); say where to write the file")
        if self._dataset is not None:
            some = self._dataset.test if len(self._dataset.test) else self._dataset.train
        else:
            some = eval_data(self._loaded, None, None, "test")[0]
        images = some.final(torch.arange(min(32, len(some))))
        return export_run(self._loaded, format, images, path).path

    def plot(self) -> Picture:
        """Loss and accuracy per epoch, train vs validation: a notebook shows it; `.save(path)`, `.figure`."""
        from cnnlab.inspect.visualize import curves_figure

        best = self.result.best_epoch if self.result else None
        return Picture(curves_figure(self.metrics, self._loaded.record.title, best))


class Picture:
    """A matplotlib Figure that a notebook displays as a PNG (a bare Figure, made without pyplot, would not show)."""

    def __init__(self, figure: Any) -> None:
        self.figure = figure

    def _repr_png_(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write the picture as a PNG; returns the path."""
        self.figure.savefig(path, dpi=120, bbox_inches="tight")
        return Path(path)

    def __repr__(self) -> str:
        return f"<cnnlab picture: {len(self.figure.axes)} panels; .save(path) writes a PNG>"


# --- inputs -----------------------------------------------------------------------------------------------------------


def as_dataset(data: Any, classes: Sequence[str] | None = None) -> Dataset | None:
    """`data` as a Dataset in memory; None for a name or folder (loaded by the trainer, which records where from)."""
    if isinstance(data, str | Path):
        return None
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(p, tuple | list) for p in data):
        train, test = data
        x_tr, y_tr = train
        x_te, y_te = test
        names = classes or _class_names(list(_labels(y_tr)) + list(_labels(y_te)))
        return Dataset(ARRAY_DATA, _image_set(x_tr, y_tr, names), _image_set(x_te, y_te, names), tuple(names),
                       default_augment=())  # fmt: skip
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = data
        names = classes or _class_names(_labels(y))
        train = _image_set(x, y, names)
        empty = ImageSet(train.images[:0], train.labels[:0])
        return Dataset(ARRAY_DATA, train, empty, tuple(names), default_augment=())
    if isinstance(data, torch.utils.data.Dataset):
        return _from_torch_dataset(data, classes)
    raise UsageError(
        f"data: expected a dataset name, a folder, (x, y) arrays or a torch Dataset, got {type(data).__name__}"
    )


def _labels(y: Any) -> list[Any]:
    return y.tolist() if hasattr(y, "tolist") else list(y)


def _class_names(labels: Sequence[Any]) -> list[str]:
    """Class names: the sorted distinct strings, or 0..max for integer labels (0..K-1 for multi-hot rows of K)."""
    if labels and isinstance(labels[0], list):
        return [str(i) for i in range(len(labels[0]))]
    if labels and isinstance(labels[0], str):
        return sorted(set(labels))
    if any(not float(v).is_integer() or v < 0 for v in labels):
        raise UsageError("data: labels must be class indices 0..K-1 or class names")
    return [str(i) for i in range(int(max(labels)) + 1)] if labels else []


def _image_set(x: Any, y: Any, names: Sequence[str]) -> ImageSet:
    images = _as_uint8_nchw(x, "data")
    labels = _labels(y)
    if len(labels) != len(images):
        raise UsageError(f"data: {len(images)} images but {len(labels)} labels")
    if labels and isinstance(labels[0], list):  # multi-hot rows (N, K): multi-label data
        hot = torch.as_tensor(labels)
        if hot.dim() != 2 or hot.shape[1] != len(names) or not bool(((hot == 0) | (hot == 1)).all()):
            raise UsageError(f"data: multi-label rows must hold {len(names)} values of 0 or 1, got shape "
                             f"{tuple(hot.shape)}")  # fmt: skip
        return ImageSet(images, hot.to(torch.uint8))
    if labels and isinstance(labels[0], str):
        index = {n: i for i, n in enumerate(names)}
        missing = sorted(set(labels) - set(index))
        if missing:
            raise UsageError(f"data: label {missing[0]!r} is not one of classes")
        labels = [index[v] for v in labels]
    t = torch.as_tensor(labels, dtype=torch.int64)
    if len(t) and (t.min() < 0 or t.max() >= len(names)):
        raise UsageError(f"data: labels must be in 0..{len(names) - 1}, got {int(t.min())}..{int(t.max())}")
    return ImageSet(images, t)


def _as_uint8_nchw(x: Any, what: str) -> torch.Tensor:
    """Images (N, H, W), (N, C, H, W) or (N, H, W, C), uint8 or floats in [0, 1] -> uint8 (N, C, H, W)."""
    t = torch.as_tensor(np.array(x) if not isinstance(x, torch.Tensor) else x).detach().cpu()
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise UsageError(f"{what}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), got {tuple(t.shape)}")
    if t.shape[1] not in (1, 3) and t.shape[3] in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] not in (1, 3):
        raise UsageError(f"{what}: images need 1 (grey) or 3 (RGB) channels, got shape {tuple(t.shape)}")
    check_fits(f"{what}: {tuple(t.shape)} images as uint8", t.numel(), "cpu")
    if t.dtype == torch.uint8:
        return t.contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8).mul_(255).contiguous()
    t = t.float()
    if not torch.isfinite(t).all():
        raise UsageError(f"{what}: images hold NaN or infinite values")
    if t.min() < 0 or t.max() > 255:
        raise UsageError(f"{what}: pixel values must be in [0, 1] (floats) or [0, 255], got {t.min():g}..{t.max():g}")
    scale = 255.0 if t.max() <= 1.0 else 1.0
    return t.mul(scale).round_().clamp_(0, 255).to(torch.uint8).contiguous()


def _from_torch_dataset(data: torch.utils.data.Dataset, classes: Sequence[str] | None) -> Dataset:
    """A map-style torch Dataset of (image, label) pairs (PIL images, arrays or tensors), read into memory."""
    n = len(data)  # type: ignore[arg-type]
    if n == 0:
        raise UsageError("data: the torch Dataset is empty")
    first = _one_image(data[0][0])
    check_fits(f"data: {n:,} images of {tuple(first.shape)}", n * first.numel(), "cpu")
    images, labels = [], []
    for i in range(n):
        image, label = data[i]
        images.append(_one_image(image))
        labels.append(int(label) if not isinstance(label, str) else label)
    if any(im.shape != first.shape for im in images):
        raise UsageError("data: the torch Dataset's images differ in size; give it a Resize transform")
    names = list(classes or getattr(data, "classes", None) or _class_names(labels))
    train = _image_set(torch.stack(images), labels, names)
    empty = ImageSet(train.images[:0], train.labels[:0])
    return Dataset(type(data).__name__, train, empty, tuple(names), default_augment=())


def _one_image(image: Any) -> torch.Tensor:
    """One image (PIL, array or tensor, HW / CHW / HWC) -> uint8 (C, H, W)."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB" if image.mode not in ("L", "1", "I", "I;16", "F") else "L"))
    return _as_uint8_nchw(torch.as_tensor(np.array(image)).unsqueeze(0), "data")[0]


def to_images(x: Any, loaded: LoadedRun) -> tuple[torch.Tensor, list[str], bool]:
    """What predict() accepts -> (uint8 (N, C, S, S) as training saw them, a name per image, whether one was given)."""
    from PIL import Image

    from cnnlab.engine.inference import expand_inputs, load_files_for_run

    single = not isinstance(x, list | tuple)
    items = [x] if single else list(x)
    out, names = [], []
    for i, item in enumerate(items):
        if isinstance(item, str | Path):
            files = expand_inputs([str(item)])
            single = single and len(files) == 1 and not Path(item).is_dir()
            out.append(load_files_for_run(loaded, files))
            names += [str(f) for f in files]
            continue
        if isinstance(item, Image.Image):
            batch = [item]
        else:
            t = (
                item if isinstance(item, torch.Tensor) else torch.as_tensor(np.array(item))
            )  # a copy: read-only arrays (PIL) too
            # One image is HW, CHW or HWC; anything else is a batch (N, H, W), (N, C, H, W) or (N, H, W, C).
            one = t.dim() == 2 or (t.dim() == 3 and (t.shape[0] in (1, 3) or t.shape[2] in (1, 3)))
            t = _as_uint8_nchw(t.unsqueeze(0) if one else t, "x")
            single = single and one
            batch = [Image.fromarray(im.permute(1, 2, 0).squeeze(2).numpy()) for im in t]
        out.append(torch.stack([loaded.model_input(im) for im in batch]))
        names += [f"<image {i}>" if len(batch) == 1 else f"<image {i}.{j}>" for j in range(len(batch))]
    return torch.cat(out), names, single


__all__ = ["LRFind", "Run", "as_dataset", "load_run", "lr_find", "train"]
