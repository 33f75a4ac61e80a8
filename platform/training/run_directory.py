"""One run per run directory: a lock held while a fit runs, and no fresh start over an earlier run's checkpoints.

`<root>/run.lock` records the host, process and SLURM job of the run's rank 0. A second fit into the same
directory stops at once while that process lives; a lock whose process has ended on this host (a kill), or
that an earlier attempt of the same SLURM job left (a requeue, on any node), is taken over. A fit without
`--ckpt_path` into a directory that already holds checkpoints is refused: it would mix its checkpoints with
the earlier run's and make `config.yaml` disagree with the weights; `--overwrite_run true` removes them first.
A fit that stops on a user's error before its first step takes back the files it created (UndoFailedStart).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from .checkpoints import process_alive

log = logging.getLogger(__name__)

LOCK = "run.lock"


def _owner() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID")}


class RunLock:
    """`with RunLock(root):` holds the run directory for this process (its rank 0); one-line error if held."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = Path(root) / LOCK

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_owner(), f)
            return self

    def _take_over_or_refuse(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (json.JSONDecodeError, UnicodeDecodeError):
            holder = {}  # a lock written halfway by a killed process
        me = _owner()
        same_job = me["slurm_job"] is not None and holder.get("slurm_job") == me["slurm_job"]
        ended = holder.get("host") == me["host"] and not process_alive(int(holder.get("pid", -1)))
        if holder and not (same_job or ended):
            raise ValueError(
                f"trainer.default_root_dir {self.path.parent} is in use by process {holder.get('pid')} on "
                f"{holder.get('host')}; wait for that run, choose another directory, or remove {self.path} if "
                "that run is gone"
            )
        log.info("taking over %s from an earlier process that has ended (%s)", self.path, holder or "unreadable")
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def check_fresh_start(root: str | os.PathLike, checkpoint_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a fresh fit over an earlier run's checkpoints; with `overwrite`, remove them first."""
    earlier = sorted([*Path(checkpoint_dir).glob("*.ckpt"), *Path(root).glob("hpc_ckpt_*.ckpt")])
    if not earlier:
        return
    if not overwrite:
        raise ValueError(
            f"trainer.default_root_dir {root} already holds checkpoints of a run ({earlier[-1].name}, ...); resume "
            "it with --ckpt_path auto, start it over with --overwrite_run true, or choose another directory"
        )
    log.warning("--overwrite_run: removing the earlier run's checkpoints in %s", root)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    for path in Path(root).glob("hpc_ckpt_*.ckpt"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


class UndoFailedStart:
    """`with UndoFailedStart(root, started):` removes what a fit created in `root` (config.yaml, logger
    folders) when it fails before `started()` is true: a bad setting found while the Trainer sets up leaves
    the directory as it was. Files that were there before are never touched."""

    def __init__(self, root: str | os.PathLike, started) -> None:
        self.root, self.started = Path(root), started
        self.before = set(self.root.rglob("*")) if self.root.is_dir() else set()
        self.root_existed = self.root.is_dir()

    def __enter__(self) -> UndoFailedStart:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or not issubclass(exc_type, Exception) or self.started():
            return
        created = sorted(set(self.root.rglob("*")) - self.before, key=lambda p: len(p.parts), reverse=True)
        for path in created:  # deepest first, so folders are empty when their turn comes
            if path.is_dir() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
        if not self.root_existed:
            with contextlib.suppress(OSError):
                self.root.rmdir()
