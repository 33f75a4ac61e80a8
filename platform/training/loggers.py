"""Loggers whose files go to the run directory unless told otherwise.

`save_dir=None` means the Trainer's `default_root_dir` (filled in by the command line), so one
`--trainer.default_root_dir` moves checkpoints, config and logs together. The W&B logger keeps its
run id in `<save_dir>/wandb_run_id`, so a resumed or requeued run continues the same W&B run instead
of starting a new one; with WANDB_MODE=offline it writes local files only.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.utilities import rank_zero_only

RUN_ID_FILE = "wandb_run_id"


class CSVLogger(_CSVLogger):
    def __init__(self, save_dir: str | None = None, name: str = "csv", **kwargs):
        super().__init__(save_dir=save_dir or "runs", name=name, **kwargs)


class TensorBoardLogger(_TensorBoardLogger):
    def __init__(self, save_dir: str | None = None, name: str = "tensorboard", **kwargs):
        super().__init__(save_dir=save_dir or "runs", name=name, **kwargs)


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
