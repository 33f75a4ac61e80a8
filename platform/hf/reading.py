"""Reading an exported Hugging Face directory back as the platform's own model, without transformers.

An export (hf/export.py) holds `config.json`, whose `model_type` names the family and whose `model_config`
holds every field of the family's config, and the weights in safetensors under the names of the platform
model's state_dict with the prefix `model.` (the Hugging Face wrapper keeps the platform model as `.model`).
So the platform reads its own exports with `safetensors` alone: fine-tuning from them, comparing them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from ..models.registry import FAMILIES
from ..models.spec import ModelSpec

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # written instead of WEIGHTS when the weights are sharded
PREFIX = "model."  # the wrapper's attribute holding the platform model


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The `config.json` of an export of one of the platform's families, or a one-line error naming the file."""
    path = Path(path)
    config_file = path / CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG}; pass a directory written by `lctrain export --format hf`")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}); export the model again") from None
    arch = config.get("model_type") if isinstance(config, dict) else None
    if arch not in FAMILIES or not isinstance(config.get("model_config"), dict):
        raise ValueError(
            f"{config_file} has model_type {arch!r}, not one of the platform's families ({', '.join(FAMILIES)}) "
            "with a model_config; pass a directory written by `lctrain export --format hf`"
        )
    return config


def spec_from_hf_config(config: dict[str, Any]) -> ModelSpec:
    """The ModelSpec of an export's config: its family, named size and the fields that differ from it."""
    return ModelSpec.from_config(config["model_type"], config.get("size", "debug"), config["model_config"])


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of an export: the one file, or every shard its index names."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    index = path / WEIGHTS_INDEX
    if not index.is_file():
        raise FileNotFoundError(f"{path} has neither {WEIGHTS} nor {WEIGHTS_INDEX}; export the model again")
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ValueError(
            f"{index} is not a safetensors index ({type(e).__name__}: {e}); export the model again"
        ) from None
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names {missing[0]}, which is not in {path}; export the model again")
    return [path / name for name in names]


def read_hf_model(path: str | Path) -> tuple[ModelSpec, dict[str, Tensor]]:
    """The platform ModelSpec and the platform model's state_dict of an exported Hugging Face directory.

    `spec.build().load_state_dict(weights)` gives the model that was exported. A directory that is not an
    export of the platform's families is refused with a one-line error naming its file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_hf_config(path)
    spec = spec_from_hf_config(config)
    weights: dict[str, Tensor] = {}
    for file in weight_files(path):
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is truncated or not a safetensors file ({e}); export the model again") from None
        weights.update(tensors)
    foreign = sorted(k for k in weights if not k.startswith(PREFIX))
    if foreign:
        raise ValueError(f"{path}: weight '{foreign[0]}' is not under '{PREFIX}'; this is not a platform export")
    return spec, {k.removeprefix(PREFIX): v for k, v in weights.items()}
