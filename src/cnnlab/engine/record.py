"""A run's record, typed: what was trained (model), on what (data), how (train options), where (runtime).

config.json is this record written as JSON. Everything that reads a run (resume, predict, evaluate, export, explore,
the Python API) goes through `RunRecord.read`, which checks the file first: a hand-edited, truncated or foreign
config.json is one named error, never a KeyError deep inside a command. No torch here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.engine import rundir
from cnnlab.engine.config import TrainConfig
from cnnlab.errors import UsageError

MODULE_PREFIX = "module:"  # model.name of a run that trained the user's own nn.Module ("module:MyNet")


@dataclass(frozen=True)
class ModelRecord:
    """The network: registered name, shape of its input and output, and what cnnlab changed in it."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    params: int = 0
    args: dict[str, Any] = field(default_factory=dict)  # --model-args
    changes: tuple[str, ...] = ()  # e.g. "fc: new head for 10 classes"
    pretrained: dict[str, Any] | None = None  # torchvision weights it started from: name, mean, std, categories
    classifier: tuple[str, ...] | None = None  # the module(s) freeze="features" keeps trainable

    @property
    def own_module(self) -> str | None:
        """The class name of the user's own nn.Module this run trained, or None for a registered model."""
        return self.name[len(MODULE_PREFIX) :] if self.name.startswith(MODULE_PREFIX) else None


@dataclass(frozen=True)
class DataRecord:
    """The images: source, class names, size and the normalisation the model expects."""

    name: str
    classes: tuple[str, ...]
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: tuple[str, ...] = ()
    train_size: int = 0
    val_size: int = 0
    test_size: int = 0
    validation: str = ""
    multi_label: bool = False  # a set of labels per image (sigmoid outputs, thresholds.json) rather than one class
    extra: dict[str, Any] = field(default_factory=dict)  # what the source adds: folder, files skipped, ...


@dataclass(frozen=True)
class Runtime:
    """Where it ran."""

    device: str
    precision: str
    torch: str
    threads: int
    world_size: int = 1
    global_batch: int = 0


@dataclass(frozen=True)
class RunRecord:
    """A run's config.json as types. `train` is None for a record that only serves inference."""

    model: ModelRecord
    data: DataRecord
    train: TrainConfig | None = None
    runtime: Runtime | None = None
    cnnlab_version: str = ""
    created: str = ""

    @property
    def title(self) -> str:
        """'lenet5-modern on mnist-mini': how pictures and reports name the run."""
        return f"{self.model.name} on {self.data.name}"

    @property
    def tta(self) -> bool:
        """Whether the run evaluates with test-time augmentation."""
        return bool(self.train and self.train.tta)

    def with_train(self, train: TrainConfig) -> RunRecord:
        """The same record with other train options (a time budget re-planned the run)."""
        return dataclasses.replace(self, train=train)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object config.json holds."""
        model = dataclasses.asdict(self.model)
        model["changes"] = list(self.model.changes)
        model["classifier"] = list(self.model.classifier) if self.model.classifier is not None else None
        data = dataclasses.asdict(self.data)
        extra = data.pop("extra")
        for key in ("classes", "mean", "std", "augment"):
            data[key] = list(data[key])
        return {
            "cnnlab_version": self.cnnlab_version, "created": self.created, "model": model,
            "data": {**data, **extra}, "train": self.train.to_dict() if self.train is not None else None,
            "runtime": dataclasses.asdict(self.runtime) if self.runtime is not None else None,
        }  # fmt: skip

    def write(self, run: Path) -> Path:
        """Write config.json in RUN atomically."""
        return rundir.write_config(run, self.to_dict())

    @classmethod
    def read(cls, run: Path, need_train: bool = False) -> RunRecord:
        """The checked record of run directory RUN."""
        return cls.from_dict(rundir.read_config(run), run / rundir.CONFIG, need_train)

    @classmethod
    def from_dict(cls, config: Any, path: Path, need_train: bool = False) -> RunRecord:
        """Check a config.json object (hand-edited, truncated, from elsewhere) and type it; PATH names it in errors."""
        return _Reader(path).record(config, need_train)


class _Reader:
    """Checks each entry a command relies on, naming the first wrong one with the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def bad(self, key: str, why: str) -> UsageError:
        return UsageError(f"{self.path}: {key} {why}; not a usable cnnlab run config")

    def section(self, config: dict[str, Any], key: str) -> dict[str, Any]:
        part = config.get(key)
        if not isinstance(part, dict):
            raise self.bad(key, "is missing or not an object")
        return part

    def count(self, part: dict[str, Any], key: str, where: str, lo: int = 1, default: int | None = None) -> int:
        v = part.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise self.bad(f"{where}.{key}", f"must be a whole number >= {lo}, got {v!r:.40}")
        return v

    def text(self, part: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
        v = part.get(key, default)
        if not isinstance(v, str):
            raise self.bad(f"{where}.{key}", "is missing or not a text")
        return v

    def flag(self, part: dict[str, Any], key: str, where: str) -> bool:
        v = part.get(key, False)
        if not isinstance(v, bool):
            raise self.bad(f"{where}.{key}", f"must be true or false, got {v!r:.40}")
        return v

    def numbers(self, part: dict[str, Any], key: str, n: int) -> tuple[float, ...]:
        v = part.get(key)
        finite = isinstance(v, list) and all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v
        )
        if not finite or len(v) != n:
            raise self.bad(f"data.{key}", f"must be {n} finite numbers, got {v!r:.60}")
        return tuple(float(x) for x in v)

    def names(self, part: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
        v = part.get(key, [])
        if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
            raise self.bad(f"{where}.{key}", "must be a list of names")
        return tuple(v)

    def model(self, m: dict[str, Any]) -> ModelRecord:
        args, pretrained, classifier = m.get("args") or {}, m.get("pretrained"), m.get("classifier")
        if not isinstance(args, dict):
            raise self.bad("model.args", "must be an object")
        if not isinstance(pretrained, dict | None):
            raise self.bad("model.pretrained", "must be an object or null")
        return ModelRecord(
            name=self.text(m, "name", "model"), num_classes=self.count(m, "num_classes", "model"),
            in_channels=self.count(m, "in_channels", "model"), image_size=self.count(m, "image_size", "model"),
            params=self.count(m, "params", "model", lo=0, default=0), args=dict(args),
            changes=self.names(m, "changes", "model"), pretrained=pretrained,
            classifier=None if classifier is None else self.names(m, "classifier", "model"),
        )  # fmt: skip

    def data(self, d: dict[str, Any], model: ModelRecord) -> DataRecord:
        classes = self.names(d, "classes", "data")
        if "classes" not in d:
            raise self.bad("data.classes", "must be a list of names")
        if len(classes) != model.num_classes:
            raise self.bad("data.classes", f"has {len(classes)} names for {model.num_classes} model outputs")
        if d.get("channels") != model.in_channels or d.get("image_size") != model.image_size:
            raise self.bad("data.channels/image_size", "differ from the model's in_channels/image_size")
        mean, std = self.numbers(d, "mean", model.in_channels), self.numbers(d, "std", model.in_channels)
        if not all(x > 0 for x in std):
            raise self.bad("data.std", "must be positive")
        known = {f.name for f in dataclasses.fields(DataRecord)} - {"extra"}
        return DataRecord(
            name=self.text(d, "name", "data"), classes=classes, channels=model.in_channels,
            image_size=model.image_size, mean=mean, std=std, augment=self.names(d, "augment", "data"),
            train_size=self.count(d, "train_size", "data", lo=0, default=0),
            val_size=self.count(d, "val_size", "data", lo=0, default=0),
            test_size=self.count(d, "test_size", "data", lo=0, default=0),
            validation=self.text(d, "validation", "data", default=""),
            multi_label=self.flag(d, "multi_label", "data"),
            extra={k: v for k, v in d.items() if k not in known},
        )  # fmt: skip

    def train(self, t: Any, need: bool) -> TrainConfig | None:
        if t is None and not need:
            return None  # inference needs no training options
        if not isinstance(t, dict):
            raise self.bad("train", "is missing or not an object")
        for key in ("data", "data_dir", "on_bad_image", "weights_name"):
            if not isinstance(t.get(key), str | None):
                raise self.bad(f"train.{key}", "must be a text")
        try:
            # Types and ranges are checked where the options are used (resume validates them, naming the option).
            return TrainConfig.from_dict(t)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{self.path}: train options unusable ({str(e)[:120]})") from None

    def runtime(self, r: Any) -> Runtime | None:
        if not isinstance(r, dict):
            return None  # only reported, never relied on
        fields = {f.name for f in dataclasses.fields(Runtime)}
        try:
            return Runtime(**{k: v for k, v in r.items() if k in fields})
        except TypeError:
            return None

    def record(self, config: Any, need_train: bool) -> RunRecord:
        if not isinstance(config, dict):
            raise self.bad("the file", "is not a JSON object")
        model = self.model(self.section(config, "model"))
        data = self.data(self.section(config, "data"), model)
        return RunRecord(
            model=model, data=data, train=self.train(config.get("train"), need_train),
            runtime=self.runtime(config.get("runtime")), cnnlab_version=str(config.get("cnnlab_version", "")),
            created=str(config.get("created", "")),
        )  # fmt: skip
