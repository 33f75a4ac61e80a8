"""The models an evaluation compares: where each is, under what label, and with which SelfExtend setting.

Any place the platform keeps a model works (a run directory, a checkpoint file, a sharded checkpoint, an
export of `lctrain export --format hf`): the weights are read as `--model.init_from` reads them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.tokenizer import Tokenizer, load_tokenizer
from ..inference.loading import with_trained_context
from ..models.layers.self_extend import SelfExtendConfig, as_self_extend_config
from ..models.registry import count_parameters
from ..training.init_from import read_source, source_weights

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class ModelEntry:
    """One model of an evaluation."""

    path: str
    """A run directory, a checkpoint file, a sharded checkpoint directory or a Hugging Face export."""
    label: str | None = None
    """Its name in tables and plots (default: the path, plus the SelfExtend setting)."""
    self_extend: SelfExtendConfig | None = None
    """Evaluate with SelfExtend (training-free context extension of RoPE attention), e.g.
    {group_size: 4, window_size: 64}; pretrained_len defaults to the trained context."""
    trained_len: int | None = None
    """Tokens per training row, marked on the plots (default: read from the checkpoint when it records it)."""


@dataclasses.dataclass
class LoadedModel:
    """A model ready to score: in eval mode, on its device, with what the reports say about it."""

    label: str
    model: nn.Module
    tokenizer: Tokenizer
    arch: str
    n_params: int
    trained_len: int | None
    """Tokens per training row (None when the source does not record it)."""
    self_extend: SelfExtendConfig | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def as_entry(value: ModelEntry | str | dict[str, Any]) -> ModelEntry:
    """A ModelEntry from a path or a mapping (the YAML or command-line forms)."""
    if isinstance(value, ModelEntry):
        return value
    if isinstance(value, str):
        return ModelEntry(value)
    fields = {f.name for f in dataclasses.fields(ModelEntry)}
    unknown = sorted(set(value) - fields)
    if unknown or "path" not in value:
        raise ValueError(
            f"--models entry {value}: "
            + (f"unknown key '{unknown[0]}'" if unknown else "no path")
            + f"; its keys are {', '.join(sorted(fields))}, e.g. {{path: runs/tiny, self_extend: {{group_size: 4, "
            "window_size: 64}}"
        )
    return ModelEntry(**{**value, "self_extend": as_self_extend_config(value.get("self_extend"))})


def default_label(entry: ModelEntry) -> str:
    label = entry.label or Path(entry.path).name or str(entry.path)
    if entry.label is None and entry.self_extend is not None:
        label += f" SelfExtend G={entry.self_extend.group_size} W={entry.self_extend.window_size}"
    return label


def load_entry(entry: ModelEntry, *, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Build the model of `entry`, load its weights, and move it to `device` and `dtype`, or a one-line error."""
    source = read_source(entry.path, "--models")
    trained_len = entry.trained_len or (source.data or {}).get("seq_len")
    spec = source.spec
    if entry.self_extend is not None:
        if not hasattr(spec.config(), "self_extend"):
            raise ValueError(
                f"--models {entry.path}: a {spec.arch} model has no RoPE attention for SelfExtend; "
                "remove its self_extend"
            )
        spec = with_trained_context(spec.replace(self_extend=entry.self_extend), trained_len)
    model = spec.build()
    model.load_state_dict(source_weights(source))
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    tokenizer = load_tokenizer(source.tokenizer or {"kind": "bytes"})
    return LoadedModel(
        default_label(entry), model, tokenizer, spec.arch, count_parameters(model), trained_len, entry.self_extend
    )
