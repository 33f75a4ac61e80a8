"""The model's config on the command line: typed per architecture, documented in --help, printed resolved, and
saved once as a ModelSpec that everything rebuilding the model reads."""

from __future__ import annotations

import pytest
import torch

from lctrain.entry import run_entry_point
from lctrain.inference import load_model
from lctrain.models import ModelSpec, config_for
from lctrain.training.cli import chosen_model, fit
from tests.helpers import REPO


def exits_cleanly(args: list[str]) -> None:
    """--help and --print_config print and exit with status 0."""
    with pytest.raises(SystemExit) as exit_:
        run_entry_point(fit, args)
    assert exit_.value.code == 0


def test_help_documents_the_chosen_architectures_fields(capsys):
    exits_cleanly(["--config", str(REPO / "configs/tiny.yaml"), "--help"])
    out = capsys.readouterr().out
    assert "--model.model_config.n_registers" in out and "--model.model_config.rope_reversed" in out
    docs = " ".join(out.split("--model.model_config.n_registers N_REGISTERS\n")[1].split()[:12])
    assert docs.startswith("Learned attention registers per layer, seen by every query")  # the field's docstring
    exits_cleanly(["--model.arch", "seqcond", "--help"])
    out = capsys.readouterr().out
    assert "--model.model_config.seqcond_ratio" in out and "--model.model_config.n_registers" not in out


def test_print_config_shows_every_field_of_the_named_size(capsys):
    args = ["--config", str(REPO / "configs/tiny.yaml"), "--model.size", "small", "--model.model_config.n_layers", "3"]
    exits_cleanly([*args, "--print_config"])
    out = capsys.readouterr().out
    section = out.split("  model_config:\n")[1]
    small = config_for("lswt", "small")
    assert f"    d_model: {small.d_model}\n" in section and f"    n_registers: {small.n_registers}\n" in section
    assert "    n_layers: 3\n" in section  # the override wins over the size


def test_a_wrong_type_or_unknown_field_names_the_field_and_the_family(tmp_path, capsys):
    base = ["--config", str(REPO / "configs/tiny.yaml")]
    assert run_entry_point(fit, [*base, "--model.model_config.n_layers", "two"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.model_config.n_layers" in err and "LSWTConfig" in err
    assert run_entry_point(fit, [*base, "--model.model_config.num_thetas", "2"]) == 2  # a SeqCond field
    err = capsys.readouterr().err.strip()
    assert "num_thetas" in err and "LSWTConfig" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  model_config:\n    d_modle: 64\n")
    assert run_entry_point(fit, [*base, "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "d_modle" in err


def test_the_architecture_is_found_where_the_parser_will_find_it(tmp_path):
    yaml = tmp_path / "m.yaml"
    yaml.write_text("model:\n  arch: serriform\n")
    assert chosen_model([]) == ("lswt", "debug")
    assert chosen_model(["--config", str(yaml)]) == ("serriform", "debug")
    assert chosen_model(["--config", str(yaml), "--model.arch=seqcond", "--model.size", "small"]) == (
        "seqcond",
        "small",
    )
    assert chosen_model(["--model.arch", "seqcond", "--config", str(yaml)]) == ("serriform", "debug")  # last wins


def test_every_checkpoint_carries_the_model_spec_that_rebuilds_it(trained_run):
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    spec = ModelSpec.from_checkpoint(checkpoint)
    assert spec == ModelSpec(**checkpoint["model_spec"]) and spec.arch == "lswt" and spec.size == "debug"
    assert spec.overrides["vocab_size"] == 257  # the data's byte vocabulary, given once by the link
    model, _ = load_model(trained_run)
    assert model.config == spec.config()
    rebuilt = spec.build()
    rebuilt.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()})


def test_a_spec_keeps_only_what_differs_from_the_size_and_names_bad_fields():
    config = config_for("lswt", "tiny", n_layers=3)
    spec = ModelSpec.from_config("lswt", "tiny", config)
    assert spec.overrides == {"n_layers": 3} and spec.config() == config
    try:
        ModelSpec("lswt", "tiny", {"n_layer": 3})
    except ValueError as e:
        assert "n_layer" in str(e)
    else:
        raise AssertionError("an unknown field was accepted")


def test_a_dry_run_never_prepares_data(tmp_path, capsys):
    data = tmp_path / "never-built"
    args = ["--config", str(REPO / "configs/tiny.yaml"), "--data.data_dir", str(data), "--data.source", "builtin"]
    assert run_entry_point(fit, [*args, "--dry_run"]) == 0
    assert "plan: lswt debug" in capsys.readouterr().out
    assert not data.exists()
