"""A run killed with SIGKILL and resumed with `--ckpt_path auto` ends bit for bit where the uninterrupted run
ends, for every family with dropout on (and router noise for SerriformNet), killed after a checkpoint or
inside the save of one: weights, optimizer state, the random-number state and every metric logged after the
resume.

Each run is a fresh process under the same settings. The kill comes after the checkpoint of an earlier step,
so the resumed run repeats the steps in between; the uninterrupted run evaluates right after that checkpoint
(and so starts a validation loader, which draws a seed) while the resumed one does not.
"""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lctrain.models.registry import FAMILIES
from tests.helpers import REPO, quick_fit_args

STEPS = 8  # checkpoints at steps 3 and 6 and at the end; validation every 3 batches, so after steps 3 and 6
KILL_STEP = 7  # after step 6's checkpoint: the resumed run repeats step 7 and trains step 8
RESUMED_LOGS = "resumed-logs"
RANDOM_KILL_STEP = random.Random(2031).randrange(4, STEPS + 1)  # after the checkpoint of step 3 or 6

# family -> (config, overrides that turn every source of randomness on)
RUNS = {
    # Transformer-XL style: carried state, streams layout, 2 accumulated micro-batches per step
    "lswt": ("configs/lswt/debug.yaml", ["--model.model_config.dropout", "0.1"]),
    "seqcond": ("configs/seqcond/debug.yaml", ["--model.model_config.dropout", "0.1"]),
    "serriform": (
        "configs/serriform/full.yaml",
        ["--model.model_config.dropout", "0.1", "--model.model_config.router_noise", "0.1"],
    ),
}

# What must be equal in the final checkpoints; the rest names run directories (callbacks, hyperparameters)
# or counts loop events that a resumed run counts differently (loops).
COMPARED = ("state_dict", "optimizer_states", "lr_schedulers", "random_state", "carried_state", "global_step")


def fit_process(family: str, run_dir: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    config, overrides = RUNS[family]
    args = quick_fit_args(run_dir, data_dir, *overrides, *extra, steps=STEPS, config=config)
    return subprocess.run([sys.executable, "-m", "platform.fit", *args], cwd=REPO, capture_output=True, text=True)


def killed_and_resumed(family: str, run_dir: Path, data_dir: Path, kill_step: int, killer: str = "KillAtStep") -> None:
    kill = f'{{"class_path": "tests.helpers.{killer}", "init_args": {{"step": {kill_step}}}}}'
    killed = fit_process(family, run_dir, data_dir, "--trainer.callbacks+", kill)
    assert killed.returncode == -9, killed.stderr[-3000:]
    # the resumed attempt logs on its own, so its metrics are told apart from the killed attempt's
    logs = run_dir / RESUMED_LOGS
    logger = f'{{"class_path": "lctrain.training.loggers.CSVLogger", "init_args": {{"save_dir": "{logs}"}}}}'
    resumed = fit_process(family, run_dir, data_dir, "--ckpt_path", "auto", "--trainer.logger", logger)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, builtin_data):
    """family -> the run directory of its uninterrupted run, trained once for the whole module."""
    runs: dict[str, Path] = {}

    def run(family: str) -> Path:
        if family not in runs:
            run_dir = tmp_path_factory.mktemp("uninterrupted") / family
            process = fit_process(family, run_dir, builtin_data)
            assert process.returncode == 0, process.stderr[-3000:]
            runs[family] = run_dir
        return runs[family]

    return run


def final_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def differences(a, b, path: str = "") -> list[str]:
    """Where two nested checkpoint values differ; tensors must match in dtype, shape and every byte."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}/{i}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def logged_values(log_dir: Path) -> dict[tuple[int, str], list[str]]:
    """(step, metric) -> the values of the one CSV log under `log_dir`, as written (a float's text is exact);
    the wall-clock throughput (`perf/...`) is left out."""
    (path,) = log_dir.glob("csv/**/metrics.csv")
    values: dict[tuple[int, str], list[str]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and key not in ("step", "epoch") and not key.startswith("perf/"):
                    values.setdefault((int(row["step"]), key), []).append(value)
    return values


def assert_same_end(resumed_dir: Path, whole_dir: Path, resumed_from: int) -> None:
    resumed, whole = final_checkpoint(resumed_dir), final_checkpoint(whole_dir)
    assert resumed["global_step"] == STEPS
    assert "random_state" in whole
    keys = [k for k in COMPARED if k in whole or k in resumed]
    assert differences({k: resumed.get(k) for k in keys}, {k: whole.get(k) for k in keys}) == []

    after_resume, reference = logged_values(resumed_dir / RESUMED_LOGS), logged_values(whole_dir)
    train_losses = sorted(step for step, key in after_resume if key == "train/loss")
    # the CSV log numbers optimizer step k as k - 1: the second attempt trained only the steps after the checkpoint
    assert train_losses and train_losses[0] == resumed_from
    assert train_losses[-1] == max(step for step, key in reference if key == "train/loss")
    assert after_resume == {k: reference.get(k) for k in after_resume}


def test_every_family_is_covered():
    assert set(RUNS) == set(FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(RUNS))
def test_a_run_killed_after_a_checkpoint_resumes_bit_for_bit(family, tmp_path, builtin_data, uninterrupted):
    killed_and_resumed(family, tmp_path / "killed", builtin_data, KILL_STEP)
    assert_same_end(tmp_path / "killed", uninterrupted(family), resumed_from=6)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(RUNS))
def test_a_run_killed_inside_a_save_resumes_bit_for_bit(family, tmp_path, builtin_data, uninterrupted):
    """SIGKILL after step 6's checkpoint is written to its temporary file, before the rename: step 3 is the
    newest whole checkpoint, and `auto` resumes from it."""
    killed_and_resumed(family, tmp_path / "killed", builtin_data, 6, killer="KillInsideSave")
    assert not list((tmp_path / "killed" / "checkpoints").glob("*.tmp-*"))
    assert_same_end(tmp_path / "killed", uninterrupted(family), resumed_from=3)


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", [RANDOM_KILL_STEP], ids=[f"serriform-kill-at-step-{RANDOM_KILL_STEP}"])
def test_a_run_killed_at_a_random_step_resumes_bit_for_bit(kill_step, tmp_path, builtin_data, uninterrupted):
    killed_and_resumed("serriform", tmp_path / "killed", builtin_data, kill_step)
    resumed_from = 3 * ((kill_step - 1) // 3)  # the newest checkpoint written before the kill
    assert_same_end(tmp_path / "killed", uninterrupted("serriform"), resumed_from)
