"""Loggers whose files go to the run directory unless told otherwise, one set of files per run.

`save_dir=None` means the Trainer's `default_root_dir` (filled in by the command line), so one
`--trainer.default_root_dir` moves checkpoints, config and logs together. Each logger keeps one place
for the whole run, across resumes and requeues: `<save_dir>/csv/metrics.csv`, `<save_dir>/tensorboard/`,
and the W&B run whose id is kept in `<save_dir>/wandb_run_id` (with WANDB_MODE=offline it writes local
files only).

A resumed run trains again the steps between its checkpoint and the moment the previous attempt ended.
The CSV and TensorBoard loggers therefore replace what the earlier attempt logged from the first step
this attempt logs: the file shows each step once, as the weights of the newest checkpoint saw it.
"""

from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

RUN_ID_FILE = "wandb_run_id"


class ContinuedMetricsFile(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing `metrics.csv` instead of deleting it.

    The existing header seeds the known keys, so a key new in this attempt rewrites the file once with the
    union of keys (Lightning's own rule) and the earlier rows keep their values. On the first save, rows of
    the earlier attempt whose step is at or past the first step this attempt logs are dropped: that attempt
    trained those steps from weights that no checkpoint kept.
    """

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.is_continuing = os.path.isfile(self.metrics_file_path)
        if self.is_continuing:
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes an existing metrics.csv here; this writer continues it."""

    def save(self) -> None:
        if self.is_continuing and self.metrics:
            self.drop_rows_from(min(row["step"] for row in self.metrics))
            self.is_continuing = False
        super().save()

    def drop_rows_from(self, step: int) -> None:
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        kept = [row for row in rows if not row.get("step") or int(row["step"]) < step]
        if len(kept) == len(rows):
            return
        tmp = f"{self.metrics_file_path}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.metrics_file_path)


class CSVLogger(_CSVLogger):
    """Metrics in `<save_dir>/csv/metrics.csv` (hyper-parameters in `hparams.yaml` beside it), one file per
    run: a resumed run appends to it (see ContinuedMetricsFile)."""

    def __init__(self, save_dir: str | None = None, prefix: str = "", flush_logs_every_n_steps: int = 100):
        super().__init__(
            save_dir=save_dir or "runs",
            name="csv",
            version="",  # no version_N folders: one run per run directory
            prefix=prefix,
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuedMetricsFile:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedMetricsFile(log_dir=self.log_dir)
        return self._experiment


class TensorBoardLogger(_TensorBoardLogger):
    """Event files in `<save_dir>/tensorboard/` directly, one folder per run: a resumed run adds an event
    file there. Its first logged step is marked as a restart (what SummaryWriter's `purge_step` writes), so
    TensorBoard hides the earlier attempt's events from that step on. Not step 0: the hyper-parameters are
    written at step 0 before it, and a restart there would hide them."""

    def __init__(self, save_dir: str | None = None, **kwargs):
        # `name` and `version` are fixed rather than parameters: the command line carries parameters of the
        # same name over from the logger it replaces (the CSV logger's "csv" would become this folder).
        super().__init__(save_dir=save_dir or "runs", name="tensorboard", version="", **kwargs)
        self.restart_marked = False

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        if not self.restart_marked and step:
            self.mark_restart(step)
        super().log_metrics(metrics, step)

    def mark_restart(self, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.experiment._get_file_writer().add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
        self.restart_marked = True


def persistent_run_id(save_dir: str | Path) -> str:
    """The run id stored in `save_dir`, created (by global rank zero only) when there is none."""
    path = Path(save_dir) / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


class WandbLogger(_WandbLogger):
    def __init__(
        self,
        save_dir: str | None = None,
        project: str = "lctrain",
        name: str | None = None,
        id: str | None = None,
        **kwargs,
    ):
        save_dir = save_dir or "runs"
        run_id = id or persistent_run_id(save_dir)
        kwargs.setdefault("resume", "allow")
        super().__init__(save_dir=save_dir, project=project, name=name, id=run_id, **kwargs)
