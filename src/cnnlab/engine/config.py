"""The one table of training options: each is declared once, here, with its type, default, unit, help and checks.

The `cnnlab train` parser, the keywords of `cnnlab.train(...)`, config.json's "train" section and the README's option
table are all generated from `TrainConfig`'s fields. Importing this module does not import torch (fast `--help`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.errors import OptionError, UsageError, flag

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "step", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FREEZE_CHOICES = ("none", "features")
NAN_POLICIES = ("stop", "skip")
BAD_IMAGE_POLICIES = ("error", "skip")
CLASS_WEIGHTS = ("none", "auto")
RESIZE_CHOICES = ("crop", "squash", "pad")  # data.resize.RESIZE_POLICIES (this module does not import torch)
DATA_CACHE_CHOICES = ("auto", "memory", "disk", "none")  # data.folders.DATA_CACHE_MODES
SAMPLERS = ("shuffle", "balanced")
LOGGERS = ("tensorboard", "mlflow")
DEFAULT_LR = {"adamw": 3e-3, "adam": 3e-3, "sgd": 0.05}
# Seeds feed torch generators as seed + 7919 * rank + step: keep the sum inside a signed 64-bit integer.
MAX_SEED = 2**62
LR_SCALING = ("none", "linear", "sqrt")  # --scale-lr: how the peak lr grows with the data-parallel process count
# The groups of `cnnlab train --help` and of the README table, in order.
GROUPS = ("what to train", "speed", "optimisation", "validation and early stopping", "run", "logging")


@dataclass(frozen=True)
class Option:
    """How one TrainConfig field is shown and checked: help, unit, group, allowed values, the CLI's spelling."""

    help: str
    group: str
    unit: str = ""
    choices: tuple[str, ...] | None = None
    lo: float | None = None  # smallest allowed value (inclusive unless lo_open)
    hi: float | None = None  # largest allowed value (exclusive unless hi_closed)
    lo_open: bool = False
    hi_closed: bool = False
    metavar: str | None = None
    cli: bool = True  # a flag --name-with-dashes; False: set by the trainer or through another flag
    text: str = ""  # how the CLI reads the text: "" by the field's type; "list" comma list; "kv" KEY=VALUE list


def option(default: Any, help: str, group: str, **how: Any) -> Any:
    """A TrainConfig field with its Option metadata (mutable defaults are copied per instance)."""
    meta = {"option": Option(help=help, group=group, **how)}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_G_WHAT, _G_SPEED, _G_OPT, _G_VAL, _G_RUN, _G_LOG = GROUPS


@dataclass
class TrainConfig:
    """Every training option in one place, with its unit. The defaults train LeNet-5 on mnist-mini to >= 98%."""

    model: str = option("lenet5-modern", "registered model name, see `cnnlab models`", _G_WHAT)
    data: str = option(
        "mnist-mini", "a dataset name, an image folder (one sub-folder per class; optional train/ val/ test/) "
        "or a CSV of file,label[,split] rows", _G_WHAT)  # fmt: skip
    data_dir: str | None = option(
        None, "look here first for dataset files; then $CNNLAB_DATA, the user cache, system locations", _G_WHAT,
        metavar="DIR")  # fmt: skip
    download: bool = option(True, "download a missing dataset with torchvision (needs internet)", _G_WHAT)
    image_size: int | None = option(
        None, "resize images to this square side (image folders: 64, or 224 with pretrained weights)", _G_WHAT,
        unit="pixels", lo=1)  # fmt: skip
    on_bad_image: str = option(
        "error", "image folders and CSVs: stop at a corrupt image or bad CSV row naming it, or skip and list it",
        _G_WHAT, choices=BAD_IMAGE_POLICIES)  # fmt: skip
    resize: str | None = option(
        None, "photos of any shape (image folders, CSVs): crop = train on random resized crops, evaluate on the "
        "centre (default); squash = whole image, aspect ignored; pad = whole image, black borders", _G_WHAT,
        choices=RESIZE_CHOICES)  # fmt: skip
    data_cache: str = option(
        "auto", "image folders and CSVs are decoded once to a cache file; auto keeps it in memory when it takes at "
        "most 1/4 of the free memory, else reads it per batch (disk); none: no file, in memory", _G_WHAT,
        choices=DATA_CACHE_CHOICES)  # fmt: skip
    csv_image_column: str | None = option(
        None, "CSV data: the column naming each image file (default: one named image/file/path/id, else the first)",
        _G_WHAT, metavar="NAME")  # fmt: skip
    csv_label_column: str | None = option(
        None, "CSV data: the column of labels, `a;b` for several (default: one named label/class/..., else the "
        "second)", _G_WHAT, metavar="NAME")  # fmt: skip
    pretrained: bool = option(
        False, "start from torchvision's pretrained weights (downloaded to torch's hub cache if online)", _G_WHAT
    )
    weights: str | None = option(
        None, "pretrained weights from a local file (.pth state dict or .safetensors), same code path", _G_WHAT,
        metavar="FILE")  # fmt: skip
    weights_name: str | None = option(None, "which torchvision weights, e.g. IMAGENET1K_V2 (None: DEFAULT)", _G_WHAT)
    freeze: str = option(
        "none", "features: train only the new classifier; the (pretrained) feature extractor stays fixed", _G_WHAT,
        choices=FREEZE_CHOICES)  # fmt: skip
    unfreeze_after: int | None = option(
        None, "with freeze=features: fine-tune everything after this many epochs", _G_WHAT, unit="epochs", lo=1,
        metavar="N")  # fmt: skip
    backbone_lr_mult: float = option(
        0.1, "fine-tuning: the feature extractor's lr = lr x this", _G_WHAT, lo=0.0, lo_open=True
    )
    model_args: dict[str, Any] = option(  # noqa: RUF009 (option() copies a dict default per instance)
        {}, "builder options, e.g. 'width=16,stages=2,act=elu' for cnn-compact", _G_WHAT, metavar="K=V,...",
        text="kv")  # fmt: skip
    recipe: str | None = option(None, "a tuned set of options, fast or accurate (the options you give win)", _G_SPEED)
    time_budget: float | None = option(
        None, "time a few steps, then plan the schedule (steps, epochs, lr) so the whole run ends within this time",
        _G_SPEED, unit="seconds", lo=0.0, lo_open=True, metavar="SECONDS")  # fmt: skip
    planned_steps: int | None = option(
        None, "the step count a time budget planned (set by the trainer; resume reuses it)", _G_SPEED, cli=False
    )
    channels_last: bool = option(False, "NHWC memory format for model and batches (faster convolutions)", _G_SPEED)
    compile: bool = option(False, "torch.compile the training forward/backward (pays compile time up front)", _G_SPEED)
    tta: bool = option(
        False, "evaluate with test-time augmentation (the mean over each image and its mirror)", _G_SPEED
    )
    epochs: int = option(40, "passes over the training split", _G_OPT, unit="epochs", lo=1)
    batch_size: int = option(64, "images per optimizer step (per process)", _G_OPT, unit="images", lo=1)
    accumulate: int = option(
        1, "add up the gradients of this many batches before each optimizer step (an effective batch of "
        "batch_size x accumulate); the schedule counts optimizer steps", _G_OPT, unit="batches", lo=1,
        metavar="N")  # fmt: skip
    optimizer: str = option("adamw", "adamw, adam or sgd (Nesterov)", _G_OPT, choices=OPTIMIZERS)
    lr: float | None = option(
        None, "peak learning rate (None: 3e-3 for adam/adamw, 0.05 for sgd)", _G_OPT, lo=0.0, lo_open=True
    )
    momentum: float = option(0.9, "SGD Nesterov momentum", _G_OPT, lo=0.0, hi=1.0)
    weight_decay: float = option(
        5e-4, "weight decay on conv/linear weights, not biases or norms (decoupled for adamw)", _G_OPT, lo=0.0
    )
    schedule: str = option("onecycle", "per-step learning-rate schedule", _G_OPT, choices=SCHEDULES)
    warmup: float = option(
        0.25, "onecycle: fraction of all steps rising to the peak lr", _G_OPT, unit="fraction", lo=0.0, lo_open=True,
        hi=1.0)  # fmt: skip
    step_epochs: int = option(10, "step schedule: epochs between lr drops", _G_OPT, unit="epochs", lo=1)
    step_gamma: float = option(0.1, "step schedule: lr multiplier at each drop", _G_OPT, lo=0.0, lo_open=True)
    label_smoothing: float = option(
        0.1, "fraction of the target mass spread over all classes", _G_OPT, unit="fraction", lo=0.0, hi=1.0
    )
    class_weights: str = option(
        "none", "auto: weight each image's loss by N / (K x its class's count), for imbalanced classes", _G_OPT,
        choices=CLASS_WEIGHTS)  # fmt: skip
    sampler: str = option(
        "shuffle", "epoch order: shuffle (every image once), or balanced (each draw picks a class evenly, then one "
        "of its images)", _G_OPT, choices=SAMPLERS)  # fmt: skip
    augment: tuple[str, ...] | None = option(
        None, "comma list of trivial, jitter, crop, flip, rotate, erase, or none (None: the dataset's default, "
        "printed at the start; digits: crop)", _G_OPT, text="list")  # fmt: skip
    mixup: float = option(
        0.0, "MixUp: blend each image with the one before it in the batch, weight ~ Beta(A, A), labels alike (0: off; "
        "0.2-0.8 usual)", _G_OPT, lo=0.0, metavar="A")  # fmt: skip
    cutmix: float = option(
        0.0, "CutMix: paste a box of the image before it in the batch, area ~ Beta(A, A), labels by area (0: off; 1.0 "
        "usual); with mixup too, each batch uses one of the two", _G_OPT, lo=0.0, metavar="A")  # fmt: skip
    ema: float | None = option(
        None, "keep an exponential moving average of the weights with this decay (e.g. 0.999); it is evaluated and "
        "saved as the run's weights", _G_OPT, lo=0.0, lo_open=True, metavar="DECAY")  # fmt: skip
    max_steps: int | None = option(None, "cap on optimizer steps over the whole run", _G_OPT, unit="steps", lo=1)
    clip_grad: float | None = option(
        None, "clip the global gradient norm to this value (None: off)", _G_OPT, lo=0.0, lo_open=True,
        metavar="MAX_NORM")  # fmt: skip
    val_split: float = option(
        0.1, "fraction of the training split held out (stratified) for validation", _G_VAL, unit="fraction", lo=0.0,
        hi=1.0)  # fmt: skip
    patience: int = option(
        10, "stop after this many epochs without a lower validation loss; 0 = never stop early", _G_VAL,
        unit="epochs", lo=0)  # fmt: skip
    eval_batch_size: int = option(1000, "images per evaluation batch (lowered to what fits)", _G_VAL, lo=1)
    seed: int = option(0, "random seed for split, init, order, augmentation", _G_RUN, lo=0, hi=MAX_SEED, hi_closed=True)
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", _G_RUN)
    precision: str = option(
        "auto", "autocast dtype; auto = bf16 on CUDA (fp16 where unsupported), fp32 elsewhere", _G_RUN,
        choices=PRECISIONS)  # fmt: skip
    on_nan: str = option(
        "stop", "a non-finite loss or gradient: stop naming epoch and step, or skip that step", _G_RUN,
        choices=NAN_POLICIES)  # fmt: skip
    checkpoint_steps: int = option(
        0, "also write last.ckpt every this many steps inside an epoch; 0 = at epoch ends only "
        "(CLI: --checkpoint-every N)", _G_RUN, unit="steps", lo=0, cli=False)  # fmt: skip
    checkpoint_minutes: float = option(
        0.0, "...or every this many minutes (CLI: --checkpoint-every Nm)", _G_RUN, unit="minutes", lo=0.0, cli=False
    )
    sync_bn: bool = option(False, "data-parallel: BatchNorm statistics over the global batch (CUDA only)", _G_RUN)
    scale_lr: str = option(
        "none", "data-parallel: the peak lr times the process count N (linear: Goyal et al. 2017; measured best in "
        "few-epoch runs, with AdamW too) or its square root (sqrt: the rule for Adam in long runs); the one-cycle "
        "schedule's rise is the warm-up", _G_RUN,
        choices=LR_SCALING)  # fmt: skip
    logger: tuple[str, ...] = option(
        (), "experiment loggers besides metrics.csv: tensorboard, mlflow (comma list; optional extras)", _G_LOG,
        text="list")  # fmt: skip

    def resolved_lr(self) -> float:
        """The peak learning rate, defaulting per optimizer."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def fine_tuning(self) -> bool:
        """Whether the model starts from pretrained features (or freezes them): then the backbone gets a lower lr."""
        return bool(self.pretrained or self.weights or self.weights_name or self.freeze != "none")

    def validate(self, custom_model: bool = False) -> TrainConfig:
        """Raise an OptionError naming the option (its Python keyword) for any impossible value; return self.

        `custom_model`: the network is the user's own module, so `model` is only its name (not a registered one).
        """
        from cnnlab.data.pipeline import parse_augment
        from cnnlab.data.sources import is_csv_name, is_folder_name
        from cnnlab.engine.device import resolve_device
        from cnnlab.models.registry import model_info

        if isinstance(self.augment, str):  # 'crop,flip'
            self.augment = parse_augment(self.augment)
        if isinstance(self.logger, str):
            self.logger = tuple(s.strip() for s in self.logger.split(",") if s.strip())
        check_types(self)  # a hand-edited config.json (resume) or a notebook can hold anything
        check_ranges(self)
        tags = () if custom_model else model_info(self.model).tags  # unknown model -> UsageError with suggestions
        if not self.data.strip():
            raise OptionError("data", "is empty; give a dataset name or an image folder path")
        resolve_device(self.device)  # an unknown or absent device fails here, before any data is loaded
        for key, value in self.model_args.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise OptionError("model_args", f"{key}={value}: not a finite number")
        if (self.pretrained or self.weights or self.weights_name) and "pretrained" not in tags:
            raise OptionError("pretrained", f"{self.model} has no pretrained weights; see `cnnlab models --pretrained`")
        if self.patience and self.val_split == 0:
            raise OptionError("patience", "needs a validation split ({val_split} > 0); use {patience=0} to turn it off")
        if self.unfreeze_after is not None and self.freeze == "none":
            raise OptionError("unfreeze_after", "needs {freeze=features}")
        if self.scale_lr != "none" and self.schedule != "onecycle":
            raise OptionError("scale_lr", f"needs a warm-up: the onecycle schedule (the default), not {self.schedule}")
        if self.ema is not None and not self.ema < 1:
            raise OptionError("ema", f"must be a decay in (0, 1), e.g. 0.999; got {self.ema}")
        for name in self.logger:
            if name not in LOGGERS:
                raise OptionError("logger", f"unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
        if self.recipe is not None:
            from cnnlab.engine.recipes import get_recipe

            get_recipe(self.recipe)
        if self.augment is not None:
            self.augment = parse_augment(self.augment)
        for name in ("csv_image_column", "csv_label_column"):
            if getattr(self, name) is not None and not (is_folder_name(self.data) and is_csv_name(self.data)):
                raise OptionError(name, f"names a column of a CSV labels file; {self.data} is not one")
        if is_folder_name(self.data):
            # An absolute path, so that resume and evaluate find the folder from any working directory.
            try:
                self.data = str(Path(self.data).expanduser().resolve())
            except RuntimeError:  # '~name' of a user that does not exist
                raise OptionError("data", f"{self.data!r}: no such folder (cannot expand '~')") from None
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every option."""
        d = dataclasses.asdict(self)
        for name in ("augment", "logger"):
            d[name] = list(d[name]) if d[name] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of to_dict; unknown keys (from newer versions) are ignored."""
        kwargs = {k: v for k, v in d.items() if k in option_names()}
        for name in ("augment", "logger"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)


def options() -> list[tuple[dataclasses.Field, Option]]:
    """Every train option, in declaration order, with its metadata."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(TrainConfig)]


def option_names() -> set[str]:
    """The names of all train options (the keywords `cnnlab.train` accepts for them)."""
    return {f.name for f in dataclasses.fields(TrainConfig)}


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
    "tuple": (tuple, list), "dict": (dict,),
}  # fmt: skip


def check_types(cfg: TrainConfig) -> None:
    """Raise a UsageError naming the first option whose value has the wrong type (e.g. from an edited file)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        # Annotations are strings here ("float | None", "tuple[str, ...] | None"): their outer type names suffice.
        names = [part.strip().split("[")[0] for part in str(f.type).split("|")]
        allowed = tuple(t for n in names for t in _TYPES.get(n, (object,)))
        wrong = not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)
        if wrong:
            # Plain words, not a flag: the value came from a file (config.json) or Python code, not a command line.
            raise UsageError(f"option {f.name}: expected {f.type!s}, got {type(value).__name__} {value!r:.40}")


def check_ranges(cfg: TrainConfig) -> None:
    """Raise an OptionError for a value outside its option's choices or bounds (as declared in the table)."""
    for f, opt in options():
        value = getattr(cfg, f.name)
        if value is None or isinstance(value, bool):
            continue
        if opt.choices is not None and value not in opt.choices:
            raise OptionError(f.name, f"must be one of {', '.join(opt.choices)}, got {value!r}")
        if opt.lo is None and opt.hi is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(f.name, f"must be a finite number, got {value}")
        if out_of_range(opt, value):
            raise OptionError(f.name, f"must be {describe_range(opt)}, got {_num(value)}")


def out_of_range(opt: Option, value: float) -> bool:
    """Whether `value` lies outside the option's declared bounds (the CLI's parser and validate() both ask)."""
    below = opt.lo is not None and (value <= opt.lo if opt.lo_open else value < opt.lo)
    above = opt.hi is not None and (value > opt.hi if opt.hi_closed else value >= opt.hi)
    return below or above


def describe_range(opt: Option) -> str:
    """'at least 1', 'in [0, 1)', 'above 0', ... for an option's bounds."""
    lo, hi = _num(opt.lo), _num(opt.hi)
    if opt.hi is None:
        return f"in ({lo}, inf)" if opt.lo_open else f"at least {lo}"
    if opt.lo is None:
        return f"at most {hi}" if opt.hi_closed else f"below {hi}"
    if isinstance(opt.lo, int) and isinstance(opt.hi, int) and not opt.lo_open and opt.hi_closed:
        return f"a whole number in {lo}..{hi}"
    left, right = "(" if opt.lo_open else "[", "]" if opt.hi_closed else ")"
    return f"in {left}{lo}, {hi}{right}"


def _num(x: float | None) -> str:
    return str(x) if x is None or isinstance(x, int) else f"{x:g}"


def type_name(f: dataclasses.Field) -> str:
    """The option's value type for docs: int, float, str, bool, list, dict."""
    outer = [part.strip().split("[")[0] for part in str(f.type).split("|") if part.strip() != "None"]
    return {"tuple": "list"}.get(outer[0], outer[0])


def markdown_table() -> str:
    """The README's table of train options, generated from the option table (a test keeps the README current)."""
    lines = ["| option (CLI / Python) | type | default | unit | what it does |", "|---|---|---|---|---|"]
    defaults = TrainConfig()
    for f, opt in options():
        value = getattr(defaults, f.name)
        shown = "`" + (",".join(value) if isinstance(value, tuple) else repr(value)) + "`" if value != {} else "`{}`"
        cli = f"`{flag(f.name)}`" if opt.cli else "—"
        what = opt.help + "." + (f" One of: {', '.join(opt.choices)}." if opt.choices else "")
        if opt.lo is not None or opt.hi is not None:
            what += f" Must be {describe_range(opt)}."
        lines.append(f"| {cli} / `{f.name}` | {type_name(f)} | {shown} | {opt.unit} | {what} |")
    return "\n".join(lines) + "\n"


README_START, README_END = "<!-- train-options:start -->", "<!-- train-options:end -->"


def update_readme(path: str | Path) -> bool:
    """Rewrite the generated table between the README's markers; True if it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    head, _, rest = text.partition(README_START)
    _, _, tail = rest.partition(README_END)
    new = f"{head}{README_START}\n{markdown_table()}{README_END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":  # python -m cnnlab.engine.config README.md: regenerate the README's option table
    import sys

    for target in sys.argv[1:]:
        print(f"{target}: {'updated' if update_readme(target) else 'current'}")
