"""Saved specs keep meaning the model they were written for after a config default changes.

A spec records only the fields that differ from the named size's defaults, so when a default changes
(registry.DEFAULT_CHANGES; SerriformNet's `positions` went from "rotary" to "none" in spec format 2), a spec
written before says nothing about that field and must still rebuild the old model.
"""

from __future__ import annotations

import pytest
import torch

from lctrain.hf.configuration import SerriformHFConfig
from lctrain.hf.reading import spec_from_hf_config
from lctrain.inference.loading import load_model
from lctrain.models import registry
from lctrain.models.registry import legacy_defaults
from lctrain.models.spec import FORMAT, ModelSpec

# What a checkpoint written before spec format 2 holds: no "format" key, no `positions`.
OLD_SERRIFORM = {"arch": "serriform", "size": "debug", "overrides": {"vocab_size": 257}}


def test_a_spec_written_before_the_positions_field_rebuilds_the_rotary_model():
    assert ModelSpec.from_dict(OLD_SERRIFORM).config().positions == "rotary"
    assert ModelSpec.from_checkpoint({"model_spec": OLD_SERRIFORM}).config().positions == "rotary"
    older = {"hyper_parameters": {"arch": "serriform", "size": "debug", "model_config": {}, "vocab_size": 257}}
    assert ModelSpec.from_checkpoint(older).config().positions == "rotary"  # before checkpoints held a spec
    assert ModelSpec("serriform", "debug").config().positions == "none"  # today's default


@pytest.mark.parametrize("positions", ["none", "rotary"])
def test_a_new_spec_records_its_format_and_round_trips(positions):
    spec = ModelSpec.from_config("serriform", "debug", registry.config_for("serriform", positions=positions))
    saved = spec.to_dict()
    assert saved["format"] == FORMAT == 2
    for read in (ModelSpec.from_dict(saved), ModelSpec.from_checkpoint({"model_spec": saved}), ModelSpec(**saved)):
        assert read == spec and read.config().positions == positions


def test_an_old_spec_that_names_the_field_keeps_its_value_and_other_families_are_unchanged():
    named = {**OLD_SERRIFORM, "overrides": {"positions": "none"}}
    assert ModelSpec.from_dict(named).config().positions == "none"
    old_lswt = {"arch": "lswt", "size": "debug", "overrides": {"n_layers": 3}}
    assert ModelSpec.from_dict(old_lswt) == ModelSpec("lswt", "debug", {"n_layers": 3})
    assert legacy_defaults("lswt", 1) == {} and legacy_defaults("serriform", FORMAT) == {}


def test_a_field_changed_twice_takes_the_default_of_the_specs_own_format(monkeypatch):
    """rotary until format 2, then (hypothetically) none until format 4: format 1 means rotary, 2 and 3
    mean none, 4 means the field's current default."""
    monkeypatch.setattr(
        registry, "DEFAULT_CHANGES", {"serriform": [(4, "positions", "none"), (2, "positions", "rotary")]}
    )
    assert [legacy_defaults("serriform", f).get("positions") for f in (1, 2, 3, 4)] == ["rotary", "none", "none", None]


@pytest.mark.parametrize("spec_format", [FORMAT + 1, 0, "2"])
def test_a_spec_of_an_unknown_format_is_a_one_line_error(spec_format):
    with pytest.raises(ValueError, match=rf"model_spec has format {spec_format!r}; this lctrain reads 1 to 2") as e:
        ModelSpec.from_dict({**OLD_SERRIFORM, "format": spec_format})
    assert "\n" not in str(e.value)


def test_an_export_config_from_before_the_field_reads_rotary_and_a_new_one_round_trips():
    """An export's config.json holds every field of its time: one without `positions` predates it."""
    spec = ModelSpec("serriform", "debug", {"vocab_size": 257})
    config = SerriformHFConfig.from_spec(spec)
    assert config.model_config["positions"] == "none" and config.spec() == spec
    old = {k: v for k, v in config.model_config.items() if k != "positions"}
    read = spec_from_hf_config({"model_type": "serriform", "size": "debug", "model_config": old})
    assert read.config().positions == "rotary"


def test_an_old_checkpoint_file_loads_as_the_rotary_model_it_was(tmp_path):
    """The whole path of `load_model`: the weights of a rotary model under a spec without the field give
    that model's logits (exactly: same weights, same computation)."""
    torch.manual_seed(0)
    rotary = ModelSpec("serriform", "debug", {"vocab_size": 257, "positions": "rotary"}).build().eval()
    weights = {f"model.{k}": v for k, v in rotary.state_dict().items()}
    torch.save({"state_dict": weights, "model_spec": OLD_SERRIFORM}, tmp_path / "old.ckpt")
    loaded, _ = load_model(tmp_path / "old.ckpt")
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    assert loaded.config.positions == "rotary"
    torch.testing.assert_close(loaded(ids).logits, rotary(ids).logits, rtol=0, atol=0)
