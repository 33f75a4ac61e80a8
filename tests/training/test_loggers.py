"""Loggers keep one place per run across resumes (`csv/metrics.csv`, `tensorboard/`), show each step once, and
receive the whole resolved config (optimizer, schedule, Trainer settings), W&B included."""

from __future__ import annotations

import csv
import json
import struct

import yaml

from lctrain.training.cli import fit
from lctrain.training.loggers import CSVLogger
from tests.helpers import quick_fit_args

TENSORBOARD = "--trainer.logger+=lctrain.training.loggers.TensorBoardLogger"


def read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def scalar_steps(directory, tag: str) -> list[int]:
    """The steps of `tag` that TensorBoard shows for a folder of event files (events hidden by a restart
    left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_continued_csv_file_keeps_earlier_rows_replaces_redone_steps_and_widens_its_header(tmp_path):
    first = CSVLogger(str(tmp_path))
    for step in range(3):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.finalize("success")
    resumed = CSVLogger(str(tmp_path))  # resumed from a checkpoint of step 2: step 2 is trained again
    resumed.log_metrics({"train/loss": 20.0, "train/grad_norm": 5.0}, step=2)
    resumed.log_metrics({"train/loss": 3.0}, step=3)
    resumed.finalize("success")

    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["csv", "csv/metrics.csv"]
    header, rows = read_csv(tmp_path / "csv" / "metrics.csv")
    assert header == ["step", "train/grad_norm", "train/loss"]
    assert [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in rows] == [
        ("0", "0.0", ""),
        ("1", "1.0", ""),
        ("2", "20.0", "5.0"),
        ("3", "3.0", ""),
    ]


def test_a_resumed_run_has_one_csv_file_and_one_tensorboard_folder_with_each_step_once(tmp_path, builtin_data):
    run = tmp_path / "run"
    fit(quick_fit_args(run, builtin_data, TENSORBOARD, "--grad_norm.per_block", "false", steps=6))
    # As a requeue after a kill just before the save of step 6 would: continue from the checkpoint of step 3,
    # now also logging per-block gradient norms (keys the file did not have).
    checkpoint = run / "checkpoints" / "step-0000003.ckpt"
    fit(quick_fit_args(run, builtin_data, TENSORBOARD, "--ckpt_path", str(checkpoint), steps=6))

    assert sorted(p.name for p in (run / "csv").iterdir()) == ["hparams.yaml", "metrics.csv"]
    header, rows = read_csv(run / "csv" / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(range(6))  # Lightning counts from 0
    assert [int(r["step"]) for r in rows if r["val/loss"]] == [2, 5]
    per_block = [int(r["step"]) for r in rows if r.get("grad_norm/embed")]
    assert "grad_norm/embed" in header and per_block == [3, 4, 5]

    tensorboard = run / "tensorboard"
    assert all(p.is_file() for p in tensorboard.iterdir())  # no version_N folders
    assert len(list(tensorboard.glob("events.out.tfevents.*"))) == 2
    assert scalar_steps(tensorboard, "train/loss") == list(range(6))


def test_tensorboard_alone_writes_to_its_folder_with_the_whole_config(tmp_path, builtin_data):
    run = tmp_path / "run"
    fit(quick_fit_args(run, builtin_data, "--trainer.logger=lctrain.training.loggers.TensorBoardLogger", steps=2))
    assert not (run / "csv").exists()  # the replaced CSV logger's folder name is not carried over
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    hparams = yaml.unsafe_load((run / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["trainer"]["max_steps"] == 2
    assert hparams["model"]["optimizer"]["init_args"]["lr"] == 0.003
    assert hparams["model"]["scheduler"]["init_args"]["warmup_steps"] == 50


def wandb_records(path):
    """The records of a W&B transaction log (`run-<id>.wandb`): LevelDB's log format, 32 KiB blocks of
    chunks with a 7-byte header (checksum, length, type: 1 whole, 2 first, 3 middle, 4 last), after a
    7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 1 << 15, 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_the_wandb_run_config_holds_the_optimizer_and_trainer_settings(tmp_path, builtin_data, monkeypatch):
    """Offline, wandb 0.31 writes no files/config.yaml; the config updates are read from the run's log."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    run = tmp_path / "run"
    try:
        fit(quick_fit_args(run, builtin_data, "--trainer.logger=lctrain.training.loggers.WandbLogger", steps=2))
    finally:
        wandb.finish()
    (log,) = run.glob("wandb/offline-run-*/run-*.wandb")
    config = {}
    for record in wandb_records(log):
        updates = record.config.update if record.HasField("config") else record.run.config.update
        config.update({item.key: json.loads(item.value_json) for item in updates if item.key})
    assert config["trainer"]["max_steps"] == 2
    assert config["model"]["optimizer"]["init_args"]["lr"] == 0.003
    assert config["arch"] == "lswt"  # the module's own hyper-parameters are there too
