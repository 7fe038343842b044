"""Models: the registry and every registered architecture (importing this package registers them).

cnnlab's own models register on import; torchvision's register when first needed (see registry.register_lazily).
"""

import importlib

import torch

from cnnlab.models import cifar_resnet, compact, fast, lenet  # noqa: F401  (importing registers models)
from cnnlab.models.registry import ModelInfo, create_model, list_models, model_info, register_lazily, register_model


def _register_torchvision() -> None:
    # The first torchvision name may be asked for inside a `with torch.device("meta")` build (the memory check):
    # torchvision's own import-time tensors still belong on the CPU.
    with torch.device("cpu"):
        importlib.import_module("cnnlab.models.torchvision")


register_lazily(_register_torchvision)

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
