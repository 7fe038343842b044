"""cnnlab: convolutional neural networks from a single 3x3 kernel to the ImageNet model zoo."""

from __future__ import annotations

from cnnlab._lazy import lazy_attributes

# The public API, imported on first use so that `import cnnlab` (and `cnnlab --help`) does not import torch.
# One line per name: where it lives, as "module" (the same name there) or "module:name".
_PUBLIC = {
    "Callback": "cnnlab.engine.callbacks",
    "CnnlabError": "cnnlab.errors",
    "Reporter": "cnnlab.engine",
    "TrainConfig": "cnnlab.engine",
    "TrainResult": "cnnlab.engine",
    "UsageError": "cnnlab.errors",
    "create_model": "cnnlab.models",
    "evaluate_run": "cnnlab.engine.inference",
    "export_run": "cnnlab.engine.export",
    "fit": "cnnlab.engine",
    "list_models": "cnnlab.models",
    "load_dataset": "cnnlab.data",
    "load_run": "cnnlab.api",
    "predict_files": "cnnlab.engine.inference",
    "predict_pretrained": "cnnlab.engine.inference",
    "register_model": "cnnlab.models",
    "Run": "cnnlab.api",
    "train": "cnnlab.api",
}


def _version() -> str:
    """The installed version (importlib.metadata takes tens of milliseconds to import: read on first use)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cnnlab")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+unknown"


__all__ = sorted([*_PUBLIC, "__version__"])
__getattr__, __dir__ = lazy_attributes(globals(), {**_PUBLIC, "__version__": _version})
