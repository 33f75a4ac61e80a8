"""Using a trained model: loading it from a checkpoint, and generating text."""

from .loading import checkpoint_file, load_model

__all__ = ["checkpoint_file", "load_model"]
