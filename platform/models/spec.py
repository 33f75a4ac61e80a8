"""ModelSpec: which model a run trains — an architecture, a named size, and the fields that differ from it.

One object says it everywhere: the training module builds it once from its arguments and saves it in every
checkpoint (`checkpoint["model_spec"]`), and everything that rebuilds the model reads it back: inference,
export and consolidation of sharded checkpoints, and the memory planner. Plain data (strings, numbers,
dicts), so a weights-only `torch.load` accepts it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .registry import config_for, family, legacy_defaults

FORMAT = 2
"""Format of `ModelSpec.to_dict` (its "format" key; 1 before that key). Raised with every change of a config
default (registry.DEFAULT_CHANGES), since a spec records only the fields that differ from its time's defaults."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    arch: str
    """Architecture name in the registry (lswt, seqcond, serriform)."""
    size: str = "debug"
    """Named size of that architecture."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Config fields that differ from the named size's (nested configs as dicts)."""
    format: dataclasses.InitVar[int] = FORMAT
    """Format the overrides were written in (`to_dict`'s): an older one left out fields whose default has
    changed since, which then take the default of its time (registry.DEFAULT_CHANGES)."""

    def __post_init__(self, format: int) -> None:
        if not isinstance(format, int) or not 1 <= format <= FORMAT:
            raise ValueError(f"model_spec has format {format!r}; this lctrain reads 1 to {FORMAT} (upgrade for newer)")
        if format < FORMAT:
            object.__setattr__(self, "overrides", {**legacy_defaults(self.arch, format), **self.overrides})
        self.config()  # unknown architecture, size or field: fail here, naming it

    @classmethod
    def from_config(cls, arch: str, size: str, config: Any) -> ModelSpec:
        """The spec of a full config (a dataclass or a dict of its fields): only what differs from the size.

        A dict written before a field existed (an older export's config) lacks it; such a field takes the
        value that model had, its default before it changed (registry.DEFAULT_CHANGES), else the size's."""
        fields = {**legacy_defaults(arch, 1), **_plain(config)}
        base = _plain(config_for(arch, size))
        return cls(arch, size, {k: v for k, v in fields.items() if base.get(k) != v})

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ModelSpec:
        """The spec `to_dict` wrote, in this format or an older one (format 1 had no "format" key)."""
        return cls(**{"format": 1, **saved})

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> ModelSpec:
        """The spec a checkpoint was trained with (older checkpoints: from the module's hyper-parameters)."""
        if "model_spec" in checkpoint:
            return cls.from_dict(checkpoint["model_spec"])
        hp = checkpoint.get("hyper_parameters")
        if not hp or "arch" not in hp:
            raise KeyError("model_spec")
        overrides = dict(hp.get("model_config") or {})
        if hp.get("vocab_size") is not None:
            overrides["vocab_size"] = hp["vocab_size"]
        return cls.from_dict({"arch": hp["arch"], "size": hp.get("size", "debug"), "overrides": overrides})

    def replace(self, **overrides: Any) -> ModelSpec:
        """The same model with more fields replaced (e.g. an inference-only `self_extend`)."""
        return ModelSpec(self.arch, self.size, {**self.overrides, **_plain(overrides)})

    def config(self):
        """The family's config dataclass."""
        return config_for(self.arch, self.size, **self.overrides)

    def build(self) -> nn.Module:
        """The model; under `with torch.device("meta"):` nothing is allocated."""
        return family(self.arch).model(self.config())

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint; `from_dict` reads it back, in any later version too."""
        return {"format": FORMAT, "arch": self.arch, "size": self.size, "overrides": _plain(self.overrides)}


def _plain(value: Any) -> Any:
    """Dataclasses (and namespaces with `as_dict`) as dicts, recursively; anything else as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "as_dict"):
        return _plain(value.as_dict())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
