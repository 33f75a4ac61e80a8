"""SIGUSR1 outside SLURM: the flag handler, the optimizer-step boundary, and the signal blocked at start-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from lctrain.training.cli import fit
from tests.helpers import REPO, quick_fit_args


class SignalAtBatch(L.Callback):
    """Sends SIGUSR1 to this process at the start of one training batch."""

    def __init__(self, batch: int = 0):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGUSR1)


class FailAtBatch(L.Callback):
    """Raises at the start of one training batch, as a crashing run would."""

    def __init__(self, batch: int = 1):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch:
            raise RuntimeError(f"batch {self.batch} fails")


def test_signal_saves_at_the_next_optimizer_step_not_between_accumulated_batches(tmp_path, builtin_data):
    run = tmp_path / "run"
    callback = '{"class_path": "tests.training.test_requeue.SignalAtBatch", "init_args": {"batch": 0}}'
    handler_before = signal.getsignal(signal.SIGUSR1)
    cli = fit(
        quick_fit_args(
            run, builtin_data, "--trainer.accumulate_grad_batches", "2", "--trainer.callbacks", callback,
            "--checkpoint.every_n_train_steps", "100", steps=6,
        )
    )  # fmt: skip
    assert cli.trainer.global_step == 1  # stopped after the first optimizer step (batches 0 and 1)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 1
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed"] == 2
    assert signal.getsignal(signal.SIGUSR1) is handler_before  # the handler is gone with the Trainer


def test_a_run_that_fails_restores_the_signal_handler_it_replaced(tmp_path, builtin_data):
    """Lightning skips teardown when a run raises; the handler must not outlive the failed run."""
    handler_before = signal.getsignal(signal.SIGUSR1)
    callback = '{"class_path": "tests.training.test_requeue.FailAtBatch", "init_args": {"batch": 1}}'
    with pytest.raises(RuntimeError, match="batch 1 fails"):
        fit(quick_fit_args(tmp_path / "run", builtin_data, "--trainer.callbacks", callback, steps=4))
    assert signal.getsignal(signal.SIGUSR1) is handler_before


def blocked_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))


@pytest.mark.slow
def test_sigusr1_during_start_up_waits_for_the_handler_then_saves_and_stops(tmp_path, builtin_data):
    """Sent while `python -m platform.fit` is still importing, SIGUSR1 would kill it with the default action;
    it is blocked from the entry point's first line, so it waits, and the run saves at its first step."""
    run = tmp_path / "run"
    args = quick_fit_args(run, builtin_data, "--checkpoint.every_n_train_steps", "100", steps=50)
    process = subprocess.Popen(
        [sys.executable, "-m", "platform.fit", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not blocked_signals(process.pid) & (1 << (signal.SIGUSR1 - 1)):
        assert time.monotonic() < deadline and process.poll() is None, "SIGUSR1 was never blocked"
        time.sleep(0.005)
    assert not (run / "checkpoints").exists()  # still starting: nothing trained yet
    process.send_signal(signal.SIGUSR1)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 1  # saved at the first optimizer step and stopped, far before step 50
