"""Models: plain `torch.nn.Module`s behind one contract; nothing here imports Lightning."""

from platform.models.output import ModelOutput, ModelState
from platform.models.registry import build_model, config_for, count_parameters, list_models, list_sizes

__all__ = ["ModelOutput", "ModelState", "build_model", "config_for", "count_parameters", "list_models", "list_sizes"]
