"""Use a trained run: load it, evaluate it, predict image files; also predict with torchvision's ImageNet models.

Preprocessing is the training run's own, read from its config.json: image size, channels, mean/std, class names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.data.folders import file_input, list_images, model_input
from cnnlab.data.images import open_image
from cnnlab.data.pipeline import Normalization
from cnnlab.data.sources import Dataset, ImageSet, is_folder_name, load_dataset
from cnnlab.engine import rundir
from cnnlab.engine.checkpoint import apply_state_dict, load_checkpoint, load_weights
from cnnlab.engine.evaluate import predict_logits
from cnnlab.engine.loss import class_loss
from cnnlab.engine.metrics import (
    balanced_accuracy,
    confusion_matrix,
    macro_f1,
    most_confused,
    multilabel_report,
    per_class_report,
    topk_correct,
)
from cnnlab.engine.record import RunRecord
from cnnlab.errors import CnnlabError, OptionError, UsageError
from cnnlab.models.registry import create_model, model_info


@dataclass
class LoadedRun:
    """A trained model in eval mode with everything needed to feed it as in training."""

    path: Path
    record: RunRecord
    model: nn.Module
    weights: Path  # the file the weights came from
    _thresholds: torch.Tensor | None = field(default=None, repr=False)
    thresholds_note: str = ""  # how the thresholds were chosen (multi-label runs, once read)

    @classmethod
    def of(
        cls, path: Path, record: RunRecord, model: nn.Module, weights: Path, device: str | torch.device
    ) -> LoadedRun:
        """The run at PATH with MODEL (weights loaded) moved to DEVICE in eval mode."""
        return cls(path=path, record=record, model=model.to(device).eval(), weights=weights)

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, in the order of the model's outputs."""
        return self.record.data.classes

    @property
    def channels(self) -> int:
        """Image channels the model takes (1 grey, 3 RGB)."""
        return self.record.data.channels

    @property
    def image_size(self) -> int:
        """Side of the square images the model takes."""
        return self.record.data.image_size

    @property
    def norm(self) -> Normalization:
        """The normalisation of training."""
        return Normalization(self.record.data.mean, self.record.data.std)

    @property
    def tta(self) -> bool:
        """Whether the run evaluates with test-time augmentation (the mean of each image's and its mirror's logits)."""
        return self.record.tta

    @property
    def resize(self) -> str | None:
        """How training cut photos to the model's square (data.resize); None: the run's images were square already.

        Runs on image folders recorded before the policies existed have none: their photos were cut as
        `data.folders.fit_image` does (shorter side, then the centre square), and still are.
        """
        train = self.record.train
        return train.resize if train is not None else None

    @property
    def multi_label(self) -> bool:
        """Whether the run predicts a set of labels per image (sigmoid outputs, a threshold per label)."""
        return self.record.data.multi_label

    @property
    def thresholds(self) -> torch.Tensor:
        """Multi-label: the probability (K,) at which each label is predicted, as training chose it on validation."""
        if self._thresholds is None:
            values, self.thresholds_note = rundir.read_thresholds(self.path, self.classes)
            self._thresholds = torch.tensor(values)
        return self._thresholds

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) -> probabilities: softmax over the classes, or for multi-label runs a sigmoid per label."""
        return logits.float().sigmoid() if self.multi_label else logits.float().softmax(1)

    def model_input(self, img: Any) -> torch.Tensor:
        """One decoded Pillow image -> uint8 (C, S, S) exactly as evaluation fed training's images to the model."""
        return model_input(img, self.image_size, self.channels, self.resize)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float32 on the model's device."""
        device = next(self.model.parameters()).device
        return self.norm.apply(images.to(device).float().div_(255.0))


def build_run_model(record: RunRecord) -> nn.Module:
    """The architecture a run trained, built from its record, with fresh (untrained) weights."""
    m = record.model
    kwargs: dict[str, Any] = dict(m.args)
    if m.pretrained:
        # Fine-tuned from torchvision weights: the same architecture (heads, stems), nothing downloaded.
        weights_name = record.train.weights_name if record.train else None
        kwargs.update(pretrained=True, weights_name=weights_name, architecture_only=True)
    model_info(m.name)  # an unknown name (a run from a newer cnnlab) is a clear error
    return create_model(m.name, num_classes=m.num_classes, in_channels=m.in_channels, image_size=m.image_size,
                        **kwargs)  # fmt: skip


def load_run(run: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedRun:
    """Load RUN (a run directory, or a weights/checkpoint file inside one) for inference."""
    given = Path(run)
    path = rundir.resolve_run(given)
    record = RunRecord.read(path)
    own = record.model.own_module
    if own is not None:  # no registry can rebuild the user's class: cnnlab.load_run(run, model=...) brings it
        raise UsageError(f"{path}: trained your own {own}; pass model=<a new {own}> to load its weights into")
    model = build_run_model(record)
    if given.is_file() and given.suffix == ".ckpt":
        apply_state_dict(model, load_checkpoint(given).get("model"), str(given))
        weights = given
    else:
        weights = given if given.is_file() else path / rundir.BEST
        if not weights.is_file():
            raise UsageError(f"{path}: no {rundir.BEST} yet (the run has not finished an epoch)")
        load_weights(model, weights)
    return LoadedRun.of(path, record, model, weights, device)


@torch.no_grad()
def logits_of(loaded: LoadedRun, images: torch.Tensor | ImageSet, batch_size: int = 256) -> torch.Tensor:
    """Raw model outputs (N, K) in float32 on the CPU for uint8 images (N, C, H, W) or an ImageSet (read per batch)."""

    def batch(i: int) -> torch.Tensor:
        end = min(len(images), i + batch_size)
        return images.final(torch.arange(i, end)) if isinstance(images, ImageSet) else images[i:end]

    out = [predict_logits(loaded.model, loaded.prepare(batch(i)), loaded.tta).float().cpu()
           for i in range(0, len(images), batch_size)]  # fmt: skip
    return torch.cat(out) if out else torch.empty(0, len(loaded.classes))


# --- evaluate ---------------------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Every number `cnnlab evaluate` reports, plus what the pictures need."""

    run: str
    data: str
    split: str
    n: int
    top1: float
    top5: float
    loss: float  # mean cross-entropy, without label smoothing
    classes: tuple[str, ...]
    confusion: torch.Tensor  # (K, K): rows true, columns predicted
    report: dict[str, Any]
    confused: list[dict[str, Any]]
    worst: list[dict[str, Any]]  # most confident mistakes: index, true, predicted, confidence
    images: torch.Tensor = field(repr=False)  # uint8 images of the worst mistakes, for the picture
    balanced_accuracy: float = float("nan")  # mean recall over the classes present (imbalanced data's accuracy)
    macro_f1: float = float("nan")  # mean F1 over the classes seen, each class counting the same

    multi_label = False

    def headline(self) -> str:
        """The first line `cnnlab evaluate` prints: accuracies, loss, balanced accuracy and macro-F1."""
        absent = int((self.confusion.sum(1) == 0).sum())
        # Balanced accuracy and macro-F1 leave out classes without test images (as scikit-learn does); the per-class
        # table's macro average counts them as 0, so the two disagree exactly then: say which is which.
        left_out = f" (over the classes with test images; {absent} have none)" if absent else ""
        return (f"{self.data} {self.split} split, {self.n:,} images: top-1 {self.top1:.2%} "
                f"(error {1 - self.top1:.2%}), top-5 {self.top5:.2%} (error {1 - self.top5:.2%}), "
                f"loss {self.loss:.4f}; "
                f"balanced accuracy {self.balanced_accuracy:.2%}, macro-F1 {self.macro_f1:.3f}{left_out}")  # fmt: skip

    def mistake_captions(self) -> list[str]:
        """One caption per worst mistake, for the picture: 'true 4 / pred 9 (97%)' on two lines."""
        return [f"true {w['true']}\npred {w['predicted']} ({w['confidence']:.0%})" for w in self.worst]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able numbers (no pictures)."""
        return {
            "run": self.run, "data": self.data, "split": self.split, "n": self.n, "top1": self.top1,
            "top5": self.top5, "top1_error": 1 - self.top1, "top5_error": 1 - self.top5, "loss": self.loss,
            "balanced_accuracy": self.balanced_accuracy, "macro_f1": self.macro_f1,
            "classes": list(self.classes), "confusion_matrix": self.confusion.tolist(), **self.report,
            "most_confused": self.confused, "worst": self.worst,
        }  # fmt: skip


@dataclass
class MultiLabelEvaluation:
    """Every number `cnnlab evaluate` reports for a multi-label run, plus what the pictures need."""

    run: str
    data: str
    split: str
    n: int
    mAP: float  # the field's name in the literature and in `evaluate --json`
    exact_match: float  # images whose every label is predicted right at the run's thresholds
    loss: float  # mean binary cross-entropy per label, without label smoothing
    classes: tuple[str, ...]
    report: dict[str, Any]  # per label: AP, threshold, precision, recall, F1, support; macro and micro averages
    worst: list[dict[str, Any]]  # the images with the highest loss among those with a wrong label
    images: torch.Tensor = field(repr=False)
    thresholds: str = ""  # how the thresholds were chosen

    multi_label = True

    def headline(self) -> str:
        """The first line `cnnlab evaluate` prints: mAP, exact match, micro and macro F1, loss."""
        absent = sum(1 for r in self.report["per_class"] if r["support"] == 0)
        left_out = (f" (over the labels present; {absent} {'has' if absent == 1 else 'have'} no {self.split} image)"
                    if absent else "")  # fmt: skip
        return (f"{self.data} {self.split} split, {self.n:,} images: mAP {self.mAP:.3f}{left_out}, exact match "
                f"{self.exact_match:.2%}, micro-F1 {self.report['micro']['f1']:.3f}, macro-F1 "
                f"{self.report['macro']['f1']:.3f}, loss {self.loss:.4f} (thresholds: {self.thresholds})")  # fmt: skip

    def mistake_captions(self) -> list[str]:
        """One caption per worst image: its true labels and the predicted ones, on two lines."""
        return [f"true {w['true'] or '-'}\npred {w['predicted'] or '-'}" for w in self.worst]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able numbers (no pictures)."""
        return {
            "run": self.run, "data": self.data, "split": self.split, "n": self.n, "multi_label": True,
            "mAP": self.mAP, "exact_match": self.exact_match, "loss": self.loss, "classes": list(self.classes),
            "thresholds_chosen": self.thresholds, **{k: v for k, v in self.report.items() if k != "mAP"},
            "worst": self.worst,
        }  # fmt: skip


def eval_data(loaded: LoadedRun, data: str | None, data_dir: str | None, split: str) -> tuple[ImageSet, str]:
    """The images to evaluate: the run's own test split by default, or another dataset/folder with the same classes."""
    train = loaded.record.train
    name = data or (train.data if train else None) or loaded.record.data.name
    own_dir = train.data_dir if train else None
    ds: Dataset = load_dataset(
        name, data_dir if data else (data_dir or own_dir), download=bool(train and train.download),
        image_size=loaded.image_size, on_bad_image=train.on_bad_image if train and not data else "error",
        resize=loaded.resize if is_folder_name(name) else None,
        csv_image_column=train.csv_image_column if train and not data else None,
        csv_label_column=train.csv_label_column if train and not data else None,
    )  # fmt: skip
    if tuple(ds.classes) != loaded.classes:
        raise OptionError("data", f"{name}: its classes ({_short(ds.classes)}) differ from the run's "
                                  f"({_short(loaded.classes)})")  # fmt: skip
    if ds.multi_label != loaded.multi_label:
        kinds = ("one class per image", "several labels per image")
        raise OptionError("data", f"{name}: {kinds[ds.multi_label]}, the run predicts {kinds[loaded.multi_label]}")
    if ds.channels != loaded.channels:
        raise OptionError("data", f"{name}: {ds.channels}-channel images, the model takes {loaded.channels}")
    parts = {"test": [ds.test], "train": [ds.train], "val": [ds.val] if ds.val is not None else [],
             "all": [s for s in (ds.train, ds.val, ds.test) if s is not None]}  # fmt: skip
    if not parts[split]:
        raise OptionError("split", f"{split}: {name} has no separate validation split (it is held out of train)")
    chosen = parts[split]
    if len(chosen) == 1:
        return chosen[0], ds.name
    # "all": the model's inputs of every split in one set (read into memory; a rare request)
    return ImageSet(torch.cat([s.final() for s in chosen]), torch.cat([s.labels for s in chosen])), ds.name


def _short(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (f", ... {len(names)} in all" if len(names) > 4 else "")


def evaluate_run(
    loaded: LoadedRun, data: str | None = None, data_dir: str | None = None, split: str = "test", worst: int = 16,
    images: ImageSet | None = None, name: str = "",
) -> Evaluation | MultiLabelEvaluation:  # fmt: skip
    """Top-1/top-5, loss, per-class metrics, confusion matrix and the most confident mistakes of a trained run.

    The images are the run's `split` of `data` (default: its own dataset), or `images` (named `name`) if given.
    A multi-label run gives a MultiLabelEvaluation: mAP, exact match, per-label AP/P/R/F1 at its thresholds.
    """
    if images is None:
        images, name = eval_data(loaded, data, data_dir, split)
    if len(images) == 0:
        raise UsageError(f"{name}: the {split} split is empty")
    if images.multi_label != loaded.multi_label:
        raise UsageError(f"{name}: {'multi' if images.multi_label else 'single'}-label images for a "
                         f"{'multi' if loaded.multi_label else 'single'}-label run")  # fmt: skip
    logits = logits_of(loaded, images)
    if loaded.multi_label:
        return _evaluate_multi_label(loaded, images, logits, name, split, worst)
    labels = images.labels
    k = len(loaded.classes)
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    c1, c5 = topk_correct(logits, labels, (1, 5))
    cm = confusion_matrix(pred, labels, k)
    wrong = (pred != labels).nonzero().flatten()
    order = wrong[torch.argsort(conf[wrong], descending=True, stable=True)][:worst]
    mistakes = [{"index": i, "true": loaded.classes[int(labels[i])], "predicted": loaded.classes[int(pred[i])],
                 "confidence": float(conf[i])} for i in order.tolist()]  # fmt: skip
    n = len(labels)
    return Evaluation(
        run=str(loaded.path), data=name, split=split, n=n, top1=c1.item() / n, top5=c5.item() / n,
        loss=F.cross_entropy(logits, labels).item(), classes=loaded.classes, confusion=cm,
        report=per_class_report(cm, loaded.classes), confused=most_confused(cm, loaded.classes),
        worst=mistakes, images=images.final(order), balanced_accuracy=balanced_accuracy(cm), macro_f1=macro_f1(cm),
    )  # fmt: skip


def _evaluate_multi_label(loaded: LoadedRun, images: ImageSet, logits: torch.Tensor, name: str, split: str,
                          worst: int) -> MultiLabelEvaluation:  # fmt: skip
    """mAP, exact match, per-label AP/precision/recall/F1 at the run's thresholds, and the worst images."""
    truth = images.labels.cpu()
    probs, thresholds = logits.sigmoid(), loaded.thresholds
    report = multilabel_report(probs, truth, thresholds, loaded.classes)
    per_image = class_loss(logits, truth, reduction="none", multi_label=True)  # (N,)
    pred = probs >= thresholds[None, :]
    wrong = (pred != (truth > 0)).any(1).nonzero().flatten()
    order = wrong[torch.argsort(per_image[wrong], descending=True, stable=True)][:worst]

    def names(row: torch.Tensor) -> str:
        return ";".join(loaded.classes[k] for k in row.nonzero().flatten().tolist())

    mistakes = [{"index": i, "true": names(truth[i]), "predicted": names(pred[i]), "loss": float(per_image[i])}
                for i in order.tolist()]  # fmt: skip
    return MultiLabelEvaluation(
        run=str(loaded.path), data=name, split=split, n=len(truth), mAP=report["mAP"],
        exact_match=report["exact_match"], loss=float(per_image.mean()), classes=loaded.classes, report=report,
        worst=mistakes, images=images.final(order), thresholds=loaded.thresholds_note,
    )  # fmt: skip


def training_batch(loaded: LoadedRun, count: int = 32, seed: int = 0) -> tuple[torch.Tensor, list[str], str]:
    """A batch drawn as the run's training draws them: uint8 images (B, C, S, S) as the model saw them (normalisation
    undone), a caption per image (its label, or the two labels MixUp/CutMix blended, with their weights), a title."""
    from cnnlab.data.pipeline import BatchLoader, batch_mixer
    from cnnlab.engine.setup import load_training_data

    cfg = loaded.record.train
    if cfg is None:
        raise UsageError(f"{loaded.path}: the run was trained on data given in Python; it cannot be loaded again")
    data = load_training_data(cfg)
    augment = tuple(cfg.augment) if cfg.augment is not None else data.default_augment
    g = torch.Generator().manual_seed(seed)
    loader = BatchLoader(data.train, count, loaded.norm, shuffle=True, augment=augment, generator=g)
    x, y = next(iter(loader))
    classes = loaded.classes
    mixer = batch_mixer(cfg.mixup, cfg.cutmix, len(classes))
    if y.dim() == 2:  # multi-label: each image's labels
        captions = [";".join(classes[k] for k in row.nonzero().flatten().tolist()) for row in y]
    else:
        captions = [classes[int(i)] for i in y]
    if mixer is not None:
        x, target = mixer(x, y, g)
        # The two largest weights: the two classes blended (multi-label: every label of both sets, by weight).
        top = target.topk(target.shape[1] if y.dim() == 2 else min(2, target.shape[1]), dim=1)
        captions = [" / ".join(f"{classes[int(k)]} {v:.0%}" for v, k in zip(vals, idx, strict=True) if v > 0.005)
                    for vals, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True)]  # fmt: skip
    mean = torch.tensor(loaded.norm.mean).view(1, -1, 1, 1)
    std = torch.tensor(loaded.norm.std).view(1, -1, 1, 1)
    images = (x.float() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)
    mixing = [f"mixup {cfg.mixup:g}"] * (cfg.mixup > 0) + [f"cutmix {cfg.cutmix:g}"] * (cfg.cutmix > 0)
    title = (f"{data.name}: a training batch, augment {','.join(augment) or 'none'}"
             + (f", resize {cfg.resize}" if cfg.resize else "") + "".join(f", {m}" for m in mixing))  # fmt: skip
    return images, captions, title


# --- predict ----------------------------------------------------------------------------------------------------------


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image arguments: files as given, folders expanded to every non-hidden file below them, sorted."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise UsageError(f"{p}: folder holds no files")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise UsageError(f"{p}: no such file or folder")
    return files


@dataclass
class Prediction:
    """The top-k labels of one image, most probable first; for a multi-label run, every label above its threshold."""

    file: str
    labels: list[str]
    probs: list[float]
    thresholds: list[float] | None = None  # multi-label: the threshold each of `labels` reached

    @property
    def multi_label(self) -> bool:
        """Whether these are the labels of a multi-label run (possibly none)."""
        return self.thresholds is not None

    @property
    def label(self) -> str | None:
        """The most probable label (None when no label of a multi-label run reaches its threshold)."""
        return self.labels[0] if self.labels else None

    @property
    def prob(self) -> float | None:
        """Its probability."""
        return self.probs[0] if self.probs else None

    def to_dict(self) -> dict[str, Any]:
        """{'file', 'top': [{'label', 'prob'}]}; multi-label: {'file', 'labels': [{'label', 'prob', 'threshold'}]}."""
        if self.thresholds is not None:
            rows = zip(self.labels, self.probs, self.thresholds, strict=True)
            return {"file": self.file, "labels": [{"label": la, "prob": p, "threshold": t} for la, p, t in rows]}
        return {
            "file": self.file,
            "top": [{"label": la, "prob": p} for la, p in zip(self.labels, self.probs, strict=True)],
        }


def predictions(loaded: LoadedRun, logits: torch.Tensor, names: Sequence[Any], top_k: int = 5) -> list[Prediction]:
    """Predictions from a run's logits (N, K): the top-k classes, or (multi-label) every label above its threshold."""
    probs = loaded.probabilities(logits)
    if not loaded.multi_label:
        return _topk(probs, names, loaded.classes, top_k)
    th = loaded.thresholds.tolist()
    out = []
    for name, row in zip(names, probs.tolist(), strict=True):
        above = sorted((k for k in range(len(row)) if row[k] >= th[k]), key=lambda k: -row[k])
        out.append(Prediction(str(name), [loaded.classes[k] for k in above], [round(row[k], 6) for k in above],
                              [round(th[k], 6) for k in above]))  # fmt: skip
    return out


def _topk(probs: torch.Tensor, files: Sequence[Path], classes: Sequence[str], k: int) -> list[Prediction]:
    values, idx = probs.topk(min(k, probs.shape[1]), dim=1)
    return [Prediction(str(f), [classes[j] for j in row], [round(v, 6) for v in vals])
            for f, row, vals in zip(files, idx.tolist(), values.tolist(), strict=True)]  # fmt: skip


def load_files_for_run(loaded: LoadedRun, files: Sequence[Path], invert: bool = False) -> torch.Tensor:
    """Decode image files exactly as training decoded its images: uint8 (N, C, S, S)."""
    x = torch.stack([file_input(f, loaded.image_size, loaded.channels, loaded.resize) for f in files])
    return 255 - x if invert else x


def predict_files(
    loaded: LoadedRun, inputs: Sequence[str], top_k: int = 5, invert: bool = False, batch_size: int = 256
) -> list[Prediction]:
    """Top-k labels and probabilities for each image file (folders expanded), in batches (see `predictions`)."""
    files = expand_inputs(inputs)
    out: list[Prediction] = []
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        out += predictions(loaded, logits_of(loaded, load_files_for_run(loaded, chunk, invert), batch_size), chunk,
                           top_k)  # fmt: skip
    return out


@torch.no_grad()
def predict_pretrained(
    model_name: str, inputs: Sequence[str], top_k: int = 5, weights_name: str | None = None,
    weights_file: str | None = None, batch_size: int = 32,
) -> list[Prediction]:  # fmt: skip
    """torchvision's ImageNet model with its own preprocessing (weights.transforms()) and category names."""
    from cnnlab.models.torchvision import resolve_weights

    info = model_info(model_name)
    if "pretrained" not in info.tags:
        raise OptionError("model", f"{model_name}: has no pretrained weights; see `cnnlab models --pretrained`")
    files = expand_inputs(inputs)
    weights = resolve_weights(model_name, weights_name)
    classes = weights.meta.get("categories")
    if not classes:
        raise CnnlabError(f"{model_name} {weights.name}: the weights carry no category names")
    model = create_model(model_name, num_classes=len(classes), in_channels=3, pretrained=True,
                         weights_file=weights_file, weights_name=weights_name).eval()  # fmt: skip
    preprocess = weights.transforms()  # resize, centre crop, normalise: exactly what the weights were evaluated with
    out: list[Prediction] = []
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        x = torch.stack([preprocess(open_image(f).convert("RGB")) for f in chunk])
        out += _topk(model(x).float().softmax(1), chunk, classes, top_k)
    return out
