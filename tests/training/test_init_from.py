"""`--model.init_from` starts a new run from trained weights: step 0, the source's weights exactly, a fresh
optimizer and data position, on other data; the model's config comes from the source; a setting or data that
does not fit the weights, or a path that holds no model, is one `error:` line naming it (exit 2)."""

from __future__ import annotations

import json
import re
import shutil

import lightning as L
import pytest
import torch

from lctrain.cluster.consolidate import consolidated, export_checkpoint
from lctrain.data.prepare import prepare_cli
from lctrain.data.tokenizer import ByteTokenizer
from lctrain.entry import run_entry_point
from lctrain.hf import write_hf
from lctrain.models.spec import ModelSpec
from lctrain.training.cli import fit
from tests.helpers import quick_fit_args, resolved_config

CAPTURE = '{"class_path": "tests.training.test_init_from.CaptureStart"}'


class CaptureStart(L.Callback):
    """What a run starts from, seen before its first optimizer step."""

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.step = trainer.global_step
        self.batches_done = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        self.weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.optimizer_states = len(trainer.optimizers[0].state)
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]


def captured(cli) -> CaptureStart:
    return next(c for c in cli.trainer.callbacks if isinstance(c, CaptureStart))


def checkpoint_weights(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """Byte-level shards of a text unlike the built-in corpus."""
    root = tmp_path_factory.mktemp("other")
    text = root / "notes.txt"
    text.write_text(
        "".join(f"note {i}: {i * 7 % 13} apples and {i * 5 % 11} pears were counted.\n" for i in range(600))
    )
    prepare_cli(["--inputs", str(text), "--output", str(root / "data"), "--text_unit", "line"])
    return root / "data"


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, trained_run, other_data):
    """Two steps on `other_data` from the trained run's weights."""
    run = tmp_path_factory.mktemp("fine") / "run"
    cli = fit(
        quick_fit_args(run, other_data, "--model.init_from", str(trained_run), "--trainer.callbacks+", CAPTURE, steps=2)
    )
    return run, cli


def test_a_run_directory_starts_a_new_run_at_step_0_with_its_weights_on_other_data(trained_run, fine_tuned):
    run, cli = fine_tuned
    source = checkpoint_weights(trained_run / "checkpoints" / "last.ckpt")
    start = captured(cli)
    assert (start.step, start.batches_done, start.optimizer_states) == (0, 0, 0)
    assert_same_weights(start.weights, source)
    assert start.lr < 0.003 / 10  # the warmup of a fresh schedule: configs/tiny.yaml warms up to 0.003 in 50 steps
    assert cli.trainer.global_step == 2
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
    assert saved["hyper_parameters"]["init_from"] == str(trained_run)
    source_spec = ModelSpec.from_checkpoint(torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True))
    assert ModelSpec.from_checkpoint(saved) == source_spec
    trained = checkpoint_weights(run / "checkpoints" / "last.ckpt")
    assert not torch.equal(trained["embed.weight"], source["embed.weight"])  # it trained on the other data


def test_a_resumed_run_takes_its_checkpoint_not_the_source(trained_run, other_data, fine_tuned):
    run, _ = fine_tuned
    args = ["--model.init_from", str(trained_run), "--trainer.callbacks+", CAPTURE, "--ckpt_path", "last"]
    cli = fit(quick_fit_args(run, other_data, *args, steps=3))
    start = captured(cli)
    assert start.step == 2 and start.optimizer_states > 0
    assert_same_weights(start.weights, checkpoint_weights(run / "checkpoints" / "step-0000002.ckpt"))
    assert cli.trainer.global_step == 3


def write_source_file(path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """What `lctrain export` writes, for a freshly built model of `spec`: its weights and its spec."""
    weights = spec.build().state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in weights.items()}, "model_spec": spec.to_dict()}, path)
    return weights


def write_sharded_source(directory, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """A DCP directory as FSDP2 writes it: the module's weights under `state_dict`, the rest in meta.pt."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    weights = spec.build().state_dict()
    state = {"state_dict": {f"model.{k}": v.clone() for k, v in weights.items()}}
    save(state, storage_writer=FileSystemWriter(str(directory)), no_dist=True)
    torch.save({"model_spec": spec.to_dict(), "global_step": 40}, directory / "meta.pt")
    return weights


# A model unlike its named size (registers, a narrower feed-forward layer), so that its weights load only into a
# model whose config was taken from it.
CUSTOM = ModelSpec("lswt", "debug", {"vocab_size": ByteTokenizer.vocab_size, "n_registers": 2, "d_ff": 96})


@pytest.mark.parametrize("kind", ["checkpoint file", "exported file", "sharded directory", "hugging face directory"])
def test_every_kind_of_source_starts_at_step_0_with_its_weights(kind, tmp_path, trained_run, builtin_data):
    if kind == "checkpoint file":
        source = trained_run / "checkpoints" / "step-0000003.ckpt"
        weights = checkpoint_weights(source)
    elif kind == "exported file":
        source = export_checkpoint(trained_run, tmp_path / "model.ckpt")
        weights = checkpoint_weights(trained_run / "checkpoints" / "last.ckpt")
    elif kind == "sharded directory":
        source = tmp_path / "sharded"
        weights = write_sharded_source(source, CUSTOM)
    else:
        source = write_hf(consolidated(trained_run), tmp_path / "hf")
        weights = checkpoint_weights(trained_run / "checkpoints" / "last.ckpt")
    args = ["--model.init_from", str(source), "--trainer.callbacks+", CAPTURE]
    cli = fit(quick_fit_args(tmp_path / "run", builtin_data, *args, steps=1))
    start = captured(cli)
    assert (start.step, start.optimizer_states) == (0, 0)
    assert_same_weights(start.weights, weights)


def test_the_model_config_comes_from_the_source_unless_set(tmp_path, builtin_data):
    source = tmp_path / "custom.ckpt"
    weights = write_source_file(source, CUSTOM)
    config = resolved_config(["--model.init_from", str(source)])
    assert (config["model"]["arch"], config["model"]["size"]) == ("lswt", "debug")
    assert (config["model"]["model_config"]["n_registers"], config["model"]["model_config"]["d_ff"]) == (2, 96)
    # A field that leaves every shape alone may differ from the source's.
    args = ["--model.init_from", str(source), "--model.model_config.dropout", "0.1", "--trainer.callbacks+", CAPTURE]
    cli = fit(quick_fit_args(tmp_path / "run", builtin_data, *args, steps=1))
    assert cli.model.spec.overrides == {**CUSTOM.overrides, "dropout": 0.1}
    assert_same_weights(captured(cli).weights, weights)


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            ["--model.model_config.d_model", "128"],
            r"model\.model_config\.d_model=128 but \S+ holds d_model=64; remove it",
        ),
        (["--model.model_config.n_registers", "0"], r"model\.model_config\.n_registers=0 but \S+ holds n_registers=2"),
        (["--model.size", "tiny"], r"model\.size=tiny but \S+ holds model\.size=debug; "),
        (["--model.arch", "seqcond"], r"model\.arch=seqcond but \S+ holds a lswt model; "),
    ],
    ids=["d_model", "n_registers", "size", "arch"],
)
def test_a_setting_that_changes_a_weight_shape_is_one_line_naming_it(setting, message, tmp_path, builtin_data, capsys):
    source = tmp_path / "custom.ckpt"
    write_source_file(source, CUSTOM)
    run = tmp_path / "run"
    args = quick_fit_args(run, builtin_data, "--model.init_from", str(source), *setting, steps=1)
    assert run_entry_point(fit, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (run / "checkpoints").exists()


def test_data_of_another_vocabulary_is_one_line_naming_both_sizes(tmp_path, trained_run, capsys):
    text = tmp_path / "words.txt"
    text.write_text("".join(f"word{i % 97} other{i % 31}\n" for i in range(4000)))
    data = tmp_path / "bpe"
    prepare_cli(f"--inputs {text} --output {data} --text_unit line --tokenizer bpe --bpe_vocab_size 300".split())
    vocab = json.loads((data / "index.json").read_text())["vocab_size"]
    assert vocab != ByteTokenizer.vocab_size
    capsys.readouterr()  # the progress of prepare
    args = quick_fit_args(tmp_path / "run", data, "--model.init_from", str(trained_run), steps=1)
    assert run_entry_point(fit, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"the data's vocabulary has {vocab} tokens (data.vocab_size) but {trained_run}" in err
    assert f"was trained on {ByteTokenizer.vocab_size};" in err


@pytest.mark.parametrize("case", ["missing", "empty directory", "text file"])
def test_a_path_that_holds_no_model_is_one_line_naming_it(case, tmp_path, builtin_data, capsys):
    path = tmp_path / "source"
    if case == "empty directory":
        path.mkdir()
    elif case == "text file":
        path.write_text("not weights")
    args = quick_fit_args(tmp_path / "run", builtin_data, "--model.init_from", str(path), steps=1)
    assert run_entry_point(fit, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --model.init_from {path}")
    assert not (tmp_path / "run").exists()


def test_a_source_inside_a_run_directory_that_overwrite_run_would_clear_is_refused(
    tmp_path, trained_run, builtin_data, capsys
):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    source = run / "checkpoints" / "last.ckpt"
    args = quick_fit_args(run, builtin_data, "--model.init_from", str(source), "--overwrite_run", "true", steps=1)
    assert run_entry_point(fit, args) == 2
    assert "which --overwrite_run would clear before reading it" in capsys.readouterr().err
    assert source.is_file()
