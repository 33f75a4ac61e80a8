"""Save and requeue on SIGUSR1, at a batch end that every rank agrees on (docs/design.md, SLURM).

SLURM sends SIGUSR1 some time before a job's limit (`#SBATCH --signal=SIGUSR1@90` in slurm/*.sbatch, or
`sbatch --signal=SIGUSR1@<seconds>`): that lead time must cover the optimizer step in flight and a whole save,
which `--dry_run` estimates and compares with `cluster.signal_lead_s` (cluster/planner.py). Saving inside the
signal handler, as Lightning's own requeue handler does, starts a collective at a different point on each
rank and hangs sharded strategies; here the handler only sets a flag. At the end of each optimizer step the
ranks agree whether any of them saw the signal; if so they save a checkpoint together, rank 0 runs `scontrol
requeue`, and training stops. The restarted job resumes with `--ckpt_path auto`. Outside SLURM the signal
saves and stops. `python -m platform.fit` blocks SIGUSR1 as its first statement and the callback unblocks
it once its handler is installed, so an early signal waits instead of killing the process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning as L

from .strategies import FSDP2Strategy

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR1


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: `<array job>_<task>` for an array task, else SLURM_JOB_ID."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class RequeueOnSignal(L.Callback):
    """On SIGUSR1: checkpoint at the next optimizer-step boundary on all ranks, requeue the SLURM job (rank 0),
    stop training."""

    def __init__(self) -> None:
        self.signal_received = False
        self._checked_step = -1
        self._previous_handler = None  # set while this callback's handler is installed

    def _on_signal(self, signum, frame) -> None:
        self.signal_received = True  # nothing else: a signal can arrive in the middle of a collective

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after the Trainer has recorded the process's handlers (which it restores when a run
        # ends or fails), so this handler never outlives the run; until now the signal waited, blocked.
        self._checked_step = trainer.global_step
        if self._previous_handler is None:
            self._previous_handler = signal.signal(REQUEUE_SIGNAL, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {REQUEUE_SIGNAL})

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()  # a failed run skips teardown; its handler must not outlive it

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(REQUEUE_SIGNAL, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Decide only right after an optimizer step: a checkpoint between accumulation micro-batches would
        # lose the gradients accumulated so far.
        if trainer.global_step == self._checked_step:
            return
        self._checked_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.signal_received, all=False):
            return
        path = save_now(trainer)
        if isinstance(trainer.strategy, FSDP2Strategy):
            trainer.strategy.finish_pending_save()  # a background write must end before the job is requeued
        for logger in trainer.loggers:
            logger.save()  # buffered metrics (CSV) reach the disk before SLURM ends the job
        trainer.strategy.barrier("requeue")  # every rank's shard is on disk before the job is requeued
        job_id = slurm_job_id()
        if trainer.is_global_zero:
            log.info("SIGUSR1: saved step %d to %s", trainer.global_step, path)
            if job_id is not None:
                requeue(job_id)
        trainer.should_stop = True


def save_now(trainer: L.Trainer) -> str:
    """Save through the run's checkpoint callback when it has one (so `last` and the kept files stay in step
    and the end-of-training save is skipped), else to `<root>/hpc_ckpt_<step>.ckpt`."""
    from ..training.callbacks import PeriodicCheckpoint

    callback = trainer.checkpoint_callback
    if isinstance(callback, PeriodicCheckpoint):
        return callback.save_now(trainer)
    path = str(Path(trainer.default_root_dir) / f"hpc_ckpt_{trainer.global_step}.ckpt")
    trainer.save_checkpoint(path)
    return path


def requeue(job_id: str) -> None:
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode:
        log.warning("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
    else:
        log.info("requeued SLURM job %s", job_id)
