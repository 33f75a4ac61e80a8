"""The registry: one size vocabulary across families, and each family's converter of the seed's names."""

from __future__ import annotations

import pytest

from lctrain.models import config_for, list_sizes
from lctrain.models.registry import FAMILIES, SIZE_NAMES


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_every_family_names_its_sizes_from_one_vocabulary_in_its_order(arch):
    sizes = list_sizes(arch)
    assert "debug" in sizes and set(sizes) <= set(SIZE_NAMES), sizes
    assert sizes == sorted(sizes, key=SIZE_NAMES.index)  # smallest first, as in the vocabulary


@pytest.mark.parametrize(
    "arch,seed_name,name",
    [("lswt", "num_hidden_layers", "n_layers"), ("seqcond", "num_layers", "n_layers"), ("serriform", "dim", "d_model")],
)
def test_config_for_applies_each_familys_converter(arch, seed_name, name):
    assert getattr(config_for(arch, "debug", **{seed_name: 64}), name) == 64
    with pytest.raises(ValueError, match=f"'{seed_name}' and as '{name}'"):
        config_for(arch, "debug", **{seed_name: 64, name: 64})


def test_the_converters_leave_field_names_and_unknown_keys_to_config_for():
    for arch, fam in FAMILIES.items():
        assert fam.from_seed_names({"n_layers": 2, "no_such_key": 1}) == {"n_layers": 2, "no_such_key": 1}, arch
        with pytest.raises(ValueError, match=f"unknown {arch} config key 'no_such_key'"):
            config_for(arch, "debug", no_such_key=1)
