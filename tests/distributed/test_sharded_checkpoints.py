"""Sharded (DCP) checkpoints through the real command line on 2 CPU ranks (gloo): a directory is complete only
with its `.complete` marker, which `--ckpt_path auto` requires; an asynchronous save (`parallelism.async_save`)
writes the same numbers as a blocking one, resumes exactly, and is finished before a requeue.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import threading
import time

import lightning as L
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from lctrain.training.checkpoints import COMPLETE, damage, resolve_ckpt_path
from tests.distributed.test_strategies import fit_process, run_fit
from tests.helpers import pause_at_step_callback, quick_fit_args, wait_for

pytestmark = pytest.mark.slow
STEPS = 4
SHARDED = [COMPLETE, ".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]


def sharded_args(run_dir, data_dir, *extra: str, steps: int = STEPS) -> list[str]:
    return quick_fit_args(
        run_dir, data_dir, "--trainer.devices", "2", "--parallelism.strategy", "fsdp2",
        "--checkpoint.every_n_train_steps", "2", *extra, steps=steps,
    )  # fmt: skip


class SlowBackgroundWrites(L.Callback):
    """Delays each DCP file write that runs off the main thread by `seconds`, so training has gone on (and
    changed its tensors in place) before an asynchronous save writes its files."""

    def __init__(self, seconds: float = 2.0) -> None:
        self.seconds = seconds

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        from torch.distributed.checkpoint import FileSystemWriter

        write_data, seconds = FileSystemWriter.write_data, self.seconds

        def slow_write_data(writer, plan, planner):
            if threading.current_thread() is not threading.main_thread():
                time.sleep(seconds)
            return write_data(writer, plan, planner)

        FileSystemWriter.write_data = slow_write_data  # this process only: a run of its own


@pytest.fixture(scope="module")
def runs(tmp_path_factory, builtin_data):
    """The same 4 steps saved every 2 steps, with blocking and with asynchronous sharded saves; the
    asynchronous writes are slowed down so that steps 3 and 4 run while step 2 is being written."""
    root = tmp_path_factory.mktemp("sharded")
    run_fit(*sharded_args(root / "blocking", builtin_data))
    slow = '{"class_path": "tests.distributed.test_sharded_checkpoints.SlowBackgroundWrites"}'
    run_fit(
        *sharded_args(root / "async", builtin_data, "--parallelism.async_save", "true", "--trainer.callbacks+", slow)
    )
    return root


def dcp_contents(directory, out) -> dict:
    """Everything a sharded checkpoint holds (weights and optimizer states), gathered into one dict."""
    dcp_to_torch_save(directory, out)
    return torch.load(out, weights_only=True)


def assert_equal_trees(a, b, where: str = "") -> int:
    """Equal nested dicts of tensors and numbers; returns how many tensors were compared."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
        return 1
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        return sum(assert_equal_trees(a[k], b[k], f"{where}/{k}") for k in a)
    assert a == b, where
    return 0


@pytest.mark.parametrize("run", ["blocking", "async"])
def test_every_sharded_save_ends_with_its_completion_marker(runs, run):
    checkpoints = runs / run / "checkpoints"
    for step in (2, STEPS):
        directory = checkpoints / f"step-{step:07d}.ckpt"
        assert sorted(p.name for p in directory.iterdir()) == SHARDED
        assert damage(directory) is None
    assert (checkpoints / "last.ckpt").resolve().name == f"step-{STEPS:07d}.ckpt"


def test_auto_and_last_skip_a_sharded_directory_without_its_marker_and_name_it(runs, tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(runs / "blocking" / "checkpoints", checkpoints, symlinks=True)
    (checkpoints / f"step-{STEPS:07d}.ckpt" / COMPLETE).unlink()  # every shard is there, but no marker
    with caplog.at_level(logging.WARNING):
        assert resolve_ckpt_path("auto", checkpoints, tmp_path) == str(checkpoints / "step-0000002.ckpt")
        assert resolve_ckpt_path("last", checkpoints, tmp_path) == str(checkpoints / "step-0000002.ckpt")
    assert f"step-{STEPS:07d}.ckpt" in caplog.text and "without its completion marker" in caplog.text
    with pytest.raises(ValueError, match="cannot be resumed from: it is a sharded checkpoint without its completion"):
        resolve_ckpt_path(str(checkpoints / f"step-{STEPS:07d}.ckpt"), checkpoints, tmp_path)


def test_an_async_save_writes_the_same_weights_and_optimizer_states_as_a_blocking_save(runs, tmp_path):
    """Training goes on while the background write runs, so equal files mean the save copied the states it
    was given (on CPU they are the live tensors, changed in place by the next optimizer step)."""
    for step in (2, STEPS):
        name = f"step-{step:07d}.ckpt"
        blocking = dcp_contents(runs / "blocking" / "checkpoints" / name, tmp_path / f"blocking-{step}.pt")
        background = dcp_contents(runs / "async" / "checkpoints" / name, tmp_path / f"async-{step}.pt")
        assert assert_equal_trees(blocking, background) > 20  # weights, Adam moments and step counts
        assert any(k.startswith("optimizer_0") for k in blocking)


def test_auto_resumes_from_the_newest_complete_async_save_and_continues_exactly(runs, tmp_path, builtin_data):
    """A run that died while writing step 4 in the background: `auto` skips that directory, resumes from step
    2, and its step-4 checkpoint equals the uninterrupted run's, weights and optimizer states alike."""
    run = tmp_path / "run"
    shutil.copytree(runs / "async", run, symlinks=True)
    (run / "checkpoints" / f"step-{STEPS:07d}.ckpt" / COMPLETE).unlink()
    out = run_fit(*sharded_args(run, builtin_data, "--parallelism.async_save", "true", "--ckpt_path", "auto"))
    name = f"step-{STEPS:07d}.ckpt"
    assert f"skipping {run / 'checkpoints' / name}" in out
    assert f"Restoring states from the checkpoint path at {run / 'checkpoints' / 'step-0000002.ckpt'}" in out
    assert sorted(p.name for p in (run / "checkpoints" / name).iterdir()) == SHARDED  # saved again, marked
    resumed = dcp_contents(run / "checkpoints" / name, tmp_path / "resumed.pt")
    uninterrupted = dcp_contents(runs / "blocking" / "checkpoints" / name, tmp_path / "uninterrupted.pt")
    assert assert_equal_trees(resumed, uninterrupted) > 20


def test_a_requeue_waits_for_the_async_save_before_it_calls_scontrol(tmp_path, builtin_data):
    """SIGUSR1 under SLURM, held at step 2: the requeue's save of step 2 is written in the background like any
    other, but `scontrol requeue` (which ends the job) must find it complete. A stand-in `scontrol` records
    what it sees."""
    run, gate, bin_dir = tmp_path / "run", tmp_path / "gate", tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\nls -A "{run}/checkpoints/step-0000002.ckpt" > "{tmp_path}/seen"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    args = sharded_args(
        run, builtin_data, "--parallelism.async_save", "true", "--checkpoint.every_n_train_steps", "100",
        "--trainer.callbacks+", pause_at_step_callback(2, gate), steps=20,
    )  # fmt: skip
    process = fit_process(*args, SLURM_JOB_ID="4242", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    try:
        wait_for(lambda: all((gate / f"reached-{rank}").exists() for rank in (0, 1)), "both ranks at step 2")
        for rank in (0, 1):
            os.kill(int((gate / f"reached-{rank}").read_text()), signal.SIGUSR1)
        wait_for(lambda: all((gate / f"signalled-{rank}").exists() for rank in (0, 1)), "the signal on both ranks")
        (gate / "hold").unlink()
        out, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, out[-4000:]
    assert sorted((tmp_path / "seen").read_text().split()) == SHARDED  # complete when the requeue ran
