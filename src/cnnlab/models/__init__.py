"""Models: the registry and every registered architecture (importing this package registers them)."""

from cnnlab.models import lenet  # noqa: F401  (registers lenet5, lenet5-modern)
from cnnlab.models.registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
