"""What several test files share: the repository path, a free port, quick-run arguments, the configuration a
command line resolves to, and a gate that holds a run at a chosen step until the test lets it go.

Kept apart from conftest.py (which holds fixtures only): pytest loads conftest.py itself, and a module
imported under two names would run twice.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import time
from pathlib import Path

import lightning as L
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def resolved_config(args: list[str]) -> dict:
    """The configuration `python -m platform.fit <args> --print_config` prints (stacked `--config` files
    merged, the model's config resolved to its size), read back as a dict; nothing is built or trained."""
    from lctrain.training.cli import fit

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        fit([*args, "--print_config"])
    assert exit_.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quick_fit_args(run_dir, data_dir, *extra: str, steps: int = 6, config: str = "configs/tiny.yaml") -> list[str]:
    """Arguments that turn a config (the default job unless given) into a run of a few seconds."""
    return [
        "--config", str(REPO / config),
        "--trainer.default_root_dir", str(run_dir),
        "--data.data_dir", str(data_dir),
        "--data.seq_len", "64",
        "--data.batch_size", "4",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--checkpoint.every_n_train_steps", "3",
        "--grad_norm.every_n_steps", "1",
        "--trainer.log_every_n_steps", "1",
        *extra,
    ]  # fmt: skip


class PauseAtStep(L.Callback):
    """Holds every rank at the end of optimizer step `step` while `<directory>/hold` exists.

    A test that must act at a moment of a run (send a signal once a checkpoint exists) makes the run wait
    for it instead of polling for a file that a fast run may already have passed or deleted: it creates
    `hold`, waits for `reached-<rank>` (which holds the process id), acts, then removes `hold`. While held, a
    rank whose requeue callback has seen its signal writes `signalled-<rank>`, so a test can release the run
    only once the signal has arrived. Checkpoint
    callbacks run after this one, so the save of step `step` happens after the release: hold at the step
    after the checkpoint you need. Without `hold` (a restarted attempt) the gate lets the run pass.
    """

    def __init__(self, step: int, directory: str, timeout_s: float = 600.0) -> None:
        self.step, self.directory, self.timeout_s = step, Path(directory), timeout_s

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        hold = self.directory / "hold"
        if trainer.global_step != self.step or not hold.exists():
            return
        reached = self.directory / f"reached-{trainer.global_rank}"
        tmp = reached.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(reached)  # the test never reads a half-written pid
        deadline = time.monotonic() + self.timeout_s
        signalled = self.directory / f"signalled-{trainer.global_rank}"
        while hold.exists() and time.monotonic() < deadline:
            if any(getattr(callback, "signal_received", False) for callback in trainer.callbacks):
                signalled.touch()
            time.sleep(0.05)


def pause_at_step_callback(step: int, directory: Path) -> str:
    """The `--trainer.callbacks+` value that adds a PauseAtStep gate, with `hold` already in place."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hold").touch()
    return f'{{"class_path": "tests.helpers.PauseAtStep", "init_args": {{"step": {step}, "directory": "{directory}"}}}}'


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class KillInsideSave(L.Callback):
    """SIGKILLs its own process inside the save of optimizer step `step`: the temporary file is written, the
    rename over `step-<step>.ckpt` never happens. What a preemption or an OOM kill does at the worst moment."""

    def __init__(self, step: int) -> None:
        self.step = step

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        rename, target = os.replace, f"step-{self.step:07d}.ckpt"

        def replace(src, dst):
            if Path(dst).name == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return rename(src, dst)

        os.replace = replace  # this process is about to die; nothing else runs in it afterwards


class PoisonGradients(L.Callback):
    """Turns every gradient into NaN after the backward of the given optimizer steps (numbered from 1), as a
    batch that overflows would."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 in self.steps:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))


class KillAtStep(L.Callback):
    """SIGKILLs its own process at the end of optimizer step `step`, before that step's checkpoint (checkpoint
    callbacks run last): a preemption between two saves, after which `--ckpt_path auto` resumes from the
    newest earlier checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
