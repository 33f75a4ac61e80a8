"""The NaN guard: a step with NaN or inf gradients is skipped and counted; a run that keeps producing them
stops with one line, and every checkpoint it leaves holds finite weights."""

from __future__ import annotations

import csv

import torch

from lctrain.entry import run_entry_point
from lctrain.training.callbacks import NonFiniteGuard
from lctrain.training.cli import fit
from tests.helpers import quick_fit_args


def logged(run, key: str) -> list[tuple[int, float]]:
    with open(run / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def all_finite(path) -> bool:
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_poisoned_steps_are_skipped_and_the_run_goes_on(tmp_path, builtin_data):
    run = tmp_path / "run"
    poison = '{"class_path": "tests.helpers.PoisonGradients", "init_args": {"steps": [2, 3]}}'
    # Callbacks given on the command line run before the always-on ones: the guard sees each poisoned step.
    fit(quick_fit_args(run, builtin_data, "--trainer.callbacks+", poison, steps=6))
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6 and all_finite(run / "checkpoints" / "last.ckpt")
    assert [value for _, value in logged(run, "train/skipped_steps")] == [1.0, 2.0]


def test_a_diverging_run_stops_with_one_line_and_finite_checkpoints(tmp_path, builtin_data, capsys):
    run = tmp_path / "run"
    args = quick_fit_args(
        run, builtin_data, "--model.optimizer.init_args.lr", "1000", "--model.scheduler", "null", steps=30
    )
    assert run_entry_point(fit, args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "training stopped at optimizer step" in err[0] and "NaN or inf" in err[0]
    stopped_at = int(err[0].split("optimizer step ")[1].split(":")[0])
    assert stopped_at < 30
    skipped = logged(run, "train/skipped_steps")
    assert [value for _, value in skipped][-3:] == [1.0, 2.0, 3.0]  # three in a row, then the stop
    checkpoints = list((run / "checkpoints").glob("step-*.ckpt"))
    assert checkpoints and all(all_finite(path) for path in checkpoints)


def test_the_guard_refuses_a_negative_limit():
    try:
        NonFiniteGuard(max_consecutive=-1)
    except ValueError as e:
        assert "nan_guard.max_consecutive=-1" in str(e)
    else:
        raise AssertionError("a negative limit was accepted")
