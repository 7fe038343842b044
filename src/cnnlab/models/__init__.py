"""Models: the registry and every registered architecture (importing this package registers them)."""

from cnnlab.models import cifar_resnet, compact, fast, lenet, torchvision  # noqa: F401  (importing registers models)
from cnnlab.models.registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
