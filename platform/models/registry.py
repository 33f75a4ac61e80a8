"""Named sizes per architecture: ("lswt", "tiny") -> LSWTConfig(...) -> LSWT.

Each family keeps its size table beside its config (`SIZES` in its module); this file lists the
families, turns a name plus overrides into a config, and builds models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from torch import nn

from platform.models import lswt, seqcond, serriform


class Family(NamedTuple):
    config: type  # the family's config dataclass
    model: type[nn.Module]
    sizes: dict[str, dict[str, Any]]  # size name -> overrides of the config's defaults


FAMILIES: dict[str, Family] = {
    "lswt": Family(lswt.LSWTConfig, lswt.LSWT, lswt.SIZES),
    "serriform": Family(serriform.SerriformConfig, serriform.SerriformNet, serriform.SIZES),
    "seqcond": Family(seqcond.SeqCondConfig, seqcond.SeqCond, seqcond.SIZES),
}


def family(arch: str) -> Family:
    if arch not in FAMILIES:
        raise ValueError(f"unknown architecture '{arch}'; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[arch]


def list_sizes(arch: str) -> list[str]:
    return list(family(arch).sizes)


def list_models() -> list[tuple[str, str]]:
    """Every registered (architecture, size) pair."""
    return [(arch, size) for arch, fam in FAMILIES.items() for size in fam.sizes]


def config_for(arch: str, size: str = "debug", **overrides: Any):
    """The config of a named size with some fields replaced; unknown names and keys are errors."""
    fam = family(arch)
    if size not in fam.sizes:
        raise ValueError(f"unknown size '{size}' for {arch}; choose one of: {', '.join(fam.sizes)}")
    fields = {f.name for f in dataclasses.fields(fam.config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown {arch} config key '{unknown[0]}' in model.config; valid keys: {', '.join(sorted(fields))}"
        )
    return fam.config(**{**fam.sizes[size], **overrides})


def build_model(arch: str, size: str = "debug", **overrides: Any) -> nn.Module:
    """Build a model of a named size. Under `with torch.device("meta"):` nothing is allocated."""
    return family(arch).model(config_for(arch, size, **overrides))


def count_parameters(model: nn.Module) -> int:
    """Parameters, each shared tensor (tied embeddings) counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
