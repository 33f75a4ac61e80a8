"""Progress a SLURM user can read: plain lines when the output is a file (and then no bar), and a bar that
counts optimizer steps against the run's total, also after a resume."""

from __future__ import annotations

import csv
import logging
import re

import pytest
from lightning.pytorch.callbacks import RichProgressBar

from lctrain.training.cli import fit
from lctrain.training.progress import (
    ProgressLine,
    StepProgressBar,
    format_count,
    format_duration,
    progress_bar_settings,
)
from tests.helpers import quick_fit_args

TRAIN_LINE = re.compile(
    r"^step (\d+)/6 \| loss (\d+\.\d{3}) \| [\d.]+[kMG]? tok/s \| ETA [\dhms]+ \| mem \d+ MiB$"  # durations: 45s, 1m32s
)
VAL_LINE = re.compile(r"^val step (\d+) \| loss \d+\.\d{3} \| ppl [\d.]+$")


def without_bar_setting(args: list[str]) -> list[str]:
    i = args.index("--trainer.enable_progress_bar")
    return args[:i] + args[i + 2 :]


def test_a_file_gets_a_line_every_n_steps_with_the_mean_loss_and_no_bar(tmp_path, builtin_data, capsys, caplog):
    run = tmp_path / "run"
    args = quick_fit_args(run, builtin_data, "--progress.every_n_steps", "2")
    with caplog.at_level(logging.INFO, logger="lctrain.training.progress"):
        cli = fit(without_bar_setting(args))  # pytest's captured stdout is not a terminal
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("step ", "val step "))]
    assert [line for line in lines if TRAIN_LINE.match(line) or VAL_LINE.match(line)] == lines, lines
    assert [int(TRAIN_LINE.match(line)[1]) for line in lines if TRAIN_LINE.match(line)] == [2, 4, 6]
    assert [int(VAL_LINE.match(line)[1]) for line in lines if VAL_LINE.match(line)] == [3, 6]
    assert [r.getMessage() for r in caplog.records if r.name == "lctrain.training.progress"] == lines
    assert cli.trainer.progress_bar_callback is None

    # Each line's loss is the mean of the steps since the previous line (the CSV logs every step).
    with open(run / "csv" / "metrics.csv", newline="") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]
    printed = [float(TRAIN_LINE.match(line)[2]) for line in lines if TRAIN_LINE.match(line)]
    expected = [sum(losses[i : i + 2]) / 2 for i in (0, 2, 4)]
    assert printed == pytest.approx(expected, abs=6e-4)  # printed to 3 decimals


def test_the_line_follows_log_every_n_steps_and_can_be_turned_off(tmp_path, builtin_data, capsys):
    fit(quick_fit_args(tmp_path / "a", builtin_data, "--trainer.log_every_n_steps", "3"))
    assert re.findall(r"^step (\d+)/6 ", capsys.readouterr().out, re.MULTILINE) == ["3", "6"]
    fit(quick_fit_args(tmp_path / "b", builtin_data, "--progress.show", "never", steps=3))
    assert not re.search(r"^(val )?step \d", capsys.readouterr().out, re.MULTILINE)


def test_the_bar_is_off_while_the_line_is_shown_unless_asked_for():
    shown, hidden = ProgressLine(show="always"), ProgressLine(show="never")
    assert progress_bar_settings(None, [], shown) == (False, [])
    enabled, callbacks = progress_bar_settings(None, [], hidden)
    assert enabled and [type(c) for c in callbacks] == [StepProgressBar]
    enabled, callbacks = progress_bar_settings(True, [], shown)
    assert enabled and [type(c) for c in callbacks] == [StepProgressBar]
    rich = RichProgressBar()
    assert progress_bar_settings(None, [rich], hidden) == (True, [rich])  # a bar of the user's own stays
    assert progress_bar_settings(False, [], hidden) == (False, [])


def test_after_a_resume_the_bar_counts_optimizer_steps_against_max_steps(tmp_path, builtin_data):
    run = tmp_path / "run"
    bar_on = ("--trainer.enable_progress_bar", "true", "--trainer.accumulate_grad_batches", "2")
    fit(quick_fit_args(run, builtin_data, *bar_on, steps=3))
    cli = fit(quick_fit_args(run, builtin_data, *bar_on, "--ckpt_path", "last", steps=5))
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    train = bar.train_progress_bar
    # Lightning's bar would read batch 10 of this epoch against min(batches per epoch, 5 - 3 steps) = 2.
    assert (train.n, train.total, train.initial) == (5, 5, 3)
    assert train.desc.startswith("step") and train.unit == "step"
    assert "v_num" not in train.postfix and "epoch=0" in train.postfix


def test_counts_and_durations_read_at_a_glance():
    assert [format_count(x) for x in (812, 5300, 12_400_000, 3.2e9)] == ["812", "5.3k", "12.4M", "3.2G"]
    assert [format_duration(s) for s in (45, 92, 7500, 3 * 86400 + 4 * 3600)] == ["45s", "1m32s", "2h05m", "3d04h"]


def test_an_unknown_show_value_is_named():
    with pytest.raises(ValueError, match="progress.show='sometimes' is not one of: auto, always, never"):
        ProgressLine(show="sometimes")
