"""Named sizes per architecture: ("lswt", "tiny") -> LSWTConfig(...) -> LSWT.

Each family keeps its size table beside its config (`SIZES` in its module), its names drawn from one
vocabulary (SIZE_NAMES), and one converter of the seed's own parameter names (`from_seed_names`); this file
lists the families, turns a name plus overrides into a config, and builds models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from . import lswt, seqcond, seqcond_config, serriform

# The size names every family draws from, smallest first (a family need not have each): debug trains in seconds
# on a CPU; the others follow LSWT's seed table (tiny 153M, small 343M, medium 949M, large 2.5B, xl 7.3B, xxl 13B).
SIZE_NAMES = ("debug", "tiny", "small", "medium", "large", "xl", "xxl")


class Family(NamedTuple):
    config: type  # the family's config dataclass
    model: type[nn.Module]
    sizes: dict[str, dict[str, Any]]  # size name -> overrides of the config's defaults
    from_seed_names: Callable[[dict[str, Any]], dict[str, Any]]  # the seed's parameter names -> the config's


FAMILIES: dict[str, Family] = {
    "lswt": Family(lswt.LSWTConfig, lswt.LSWT, lswt.SIZES, lswt.from_seed_names),
    "serriform": Family(serriform.SerriformConfig, serriform.SerriformNet, serriform.SIZES, serriform.from_seed_names),
    "seqcond": Family(seqcond.SeqCondConfig, seqcond.SeqCond, seqcond.SIZES, seqcond_config.from_seed_names),
}


# Every change of a config field's default, per family: (the spec format that made it, the field, its value
# before). A saved spec records only the fields that differed from the defaults of its time, so one of an older
# format (spec.py FORMAT) means these values where it says nothing; `legacy_defaults` gives them.
DEFAULT_CHANGES: dict[str, list[tuple[int, str, Any]]] = {
    # format 2: SerriformNet drops the rotary position gate, which fails past the trained length
    "serriform": [(2, "positions", "rotary")],
}


def legacy_defaults(arch: str, spec_format: int) -> dict[str, Any]:
    """The fields whose default changed after `spec_format`, each with the value it had then."""
    then: dict[str, Any] = {}
    for changed_in, field, before in sorted(DEFAULT_CHANGES.get(arch, []), key=lambda c: -c[0]):
        if changed_in > spec_format:
            then[field] = before  # newest change first, so the oldest one after spec_format wins
    return then


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
    """The config of a named size with some fields replaced, by their names or the seed's (the family's
    `from_seed_names`); unknown names and keys, and a field given under two names, are errors."""
    fam = family(arch)
    if size not in fam.sizes:
        raise ValueError(f"unknown size '{size}' for {arch}; choose one of: {', '.join(fam.sizes)}")
    overrides = fam.from_seed_names(overrides)
    fields = {f.name for f in dataclasses.fields(fam.config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown {arch} config key '{unknown[0]}' in model.config; valid keys: {', '.join(sorted(fields))}"
        )
    config = fam.config(**{**fam.sizes[size], **overrides})
    check_counts(config)
    return config


# Sizes and counts that a model cannot have zero of; every other whole-number field may be 0 (off), none negative.
POSITIVE_FIELDS = {"vocab_size", "d_vocab", "d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads"}


def check_counts(config: Any) -> None:
    """Name a negative width or count (or a zero one that no model can have) before any tensor is made."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if type(value) is int and value < (1 if f.name in POSITIVE_FIELDS else 0):
            bound = ">= 1" if f.name in POSITIVE_FIELDS else ">= 0"
            raise ValueError(f"model.model_config.{f.name}={value} must be {bound}")


def build_model(arch: str, size: str = "debug", **overrides: Any) -> nn.Module:
    """Build a model of a named size. Under `with torch.device("meta"):` nothing is allocated."""
    return family(arch).model(config_for(arch, size, **overrides))


def count_parameters(model: nn.Module) -> int:
    """Parameters, each shared tensor (tied embeddings) counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
