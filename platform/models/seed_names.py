"""The seeds' own parameter names, accepted beside the configs' field names.

Each family's config module keeps a `SEED_NAMES` table (seed name -> field) and one converter,
`from_seed_names(overrides) -> overrides`, which `registry.config_for` applies before building the config;
the config dataclasses themselves have one name per field. Giving a field under two names is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def rename(overrides: Mapping[str, Any], seed_names: Mapping[str, str], arch: str) -> dict[str, Any]:
    """`overrides` with every seed name (a key of `seed_names`) replaced by the field it sets; other keys
    pass unchanged (unknown ones are named later, by `config_for`)."""
    renamed: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in overrides.items():
        name = seed_names.get(key, key)
        if name in renamed:
            raise ValueError(
                f"{arch} config field '{name}' is given twice, as '{given_as[name]}' and as '{key}'; give only '{name}'"
            )
        renamed[name], given_as[name] = value, key
    return renamed
