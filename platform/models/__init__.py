"""Models: plain `torch.nn.Module`s behind one contract; nothing here imports Lightning."""

from .output import ModelOutput, ModelState
from .registry import build_model, config_for, count_parameters, list_models, list_sizes
from .spec import ModelSpec

__all__ = [
    "ModelOutput",
    "ModelSpec",
    "ModelState",
    "build_model",
    "config_for",
    "count_parameters",
    "list_models",
    "list_sizes",
]
