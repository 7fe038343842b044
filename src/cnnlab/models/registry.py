"""Model registry: `@register_model` builders, `create_model(name, ...)`, `list_models(pattern)`."""

from __future__ import annotations

import fnmatch
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from cnnlab.errors import OptionError, UsageError, unknown_name

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model before building it."""

    name: str
    builder: Builder
    family: str
    description: str
    default_image_size: int
    default_in_channels: int
    min_image_size: int = 1
    tags: tuple[str, ...] = field(default_factory=tuple)


_REGISTRY: dict[str, ModelInfo] = {}
# Functions that register more models, run the first time a name is missing or every name is listed. torchvision's
# ~80 models are registered this way: importing torchvision (it imports torch._dynamo) doubles the start-up of a run
# that trains LeNet-5 (measured 4.4 s for `import torch`, 8.9 s with torchvision.models, 2-core AMD EPYC).
_PENDING: list[Callable[[], object]] = []


def register_lazily(load: Callable[[], object]) -> None:
    """Add a function that registers more models when they are first needed (a missing name, or a listing)."""
    _PENDING.append(load)


_LOADING = threading.RLock()  # re-entrant: a pending loader registers models, and registering loads what is pending


def _load_pending() -> None:
    # Under the lock, a second thread asking for a model waits for the import instead of finding the name missing.
    with _LOADING:
        while _PENDING:
            load = _PENDING.pop(0)  # taken first: what it registers calls back here, and must not run it again
            try:
                load()
            except BaseException:
                _PENDING.insert(0, load)  # a failed or interrupted load is tried again, and fails with its own error
                raise


def register_model(
    name: str,
    *,
    family: str,
    description: str,
    default_image_size: int,
    default_in_channels: int = 3,
    min_image_size: int = 1,
    tags: tuple[str, ...] = (),
) -> Callable[[Builder], Builder]:
    """Register a builder `fn(num_classes, in_channels, image_size, **kwargs) -> nn.Module` under `name`."""

    def decorate(fn: Builder) -> Builder:
        _load_pending()  # so that a name taken by a lazily registered model is refused here, not shadowed later
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(
            name, fn, family, description, default_image_size, default_in_channels, min_image_size, tags
        )
        return fn

    return decorate


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style wildcard pattern, sorted."""
    _load_pending()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def model_info(name: str) -> ModelInfo:
    """The registry entry for `name`; a UsageError naming close matches if it is unknown."""
    if name not in _REGISTRY:
        _load_pending()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_name("model", name, _REGISTRY, "see `cnnlab models`") from None


# Builder parameters that other options set (--num-classes, --pretrained, --weights, ...), not --model-args.
_SET_ELSEWHERE = ("num_classes", "in_channels", "image_size", "pretrained", "weights_file", "weights_name",
                  "architecture_only")  # fmt: skip


def model_options(name: str) -> tuple[str, ...]:
    """The builder options of `name` that `--model-args` may set (cnn-fast: widths, depth)."""
    params = inspect.signature(model_info(name).builder).parameters.values()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                 and p.name not in _SET_ELSEWHERE)  # fmt: skip


def _check_options(name: str, kwargs: dict[str, object]) -> None:
    """A UsageError naming an option the builder does not take, and the ones it does (not a TypeError later)."""
    params = inspect.signature(model_info(name).builder).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return  # a builder that forwards **kwargs checks them itself
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key in kwargs:
        if key not in accepted:
            options = ", ".join(model_options(name)) or "no options"
            raise OptionError("model_args", f": {name} does not take {key!r}; it takes {options}")


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int | None = None,
    image_size: int | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a registered model for `in_channels` x `image_size` x `image_size` inputs and `num_classes` outputs."""
    info = model_info(name)
    in_channels = info.default_in_channels if in_channels is None else in_channels
    image_size = info.default_image_size if image_size is None else image_size
    if num_classes < 1:
        raise UsageError(f"num_classes must be at least 1, got {num_classes}")
    if in_channels < 1:
        raise UsageError(f"in_channels must be at least 1, got {in_channels}")
    if image_size < info.min_image_size:
        raise UsageError(
            f"model {name!r} needs images of at least {info.min_image_size}x{info.min_image_size}, "
            f"got {image_size}x{image_size}"
        )
    _check_options(name, kwargs)
    return info.builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
