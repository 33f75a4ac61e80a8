"""Checkpoint files that are never half-written, and a resume that never picks a damaged one.

A save writes `<name>.tmp-<pid>` in the checkpoint's own directory, flushes it to disk and renames it over
`<name>` (one filesystem, so the rename is atomic): a kill or a full disk leaves the previous file as it
was, and at most a temporary file that the next start of the run removes. `last.ckpt` is replaced the same
way. `--ckpt_path auto` and `last` check a candidate before they pick it (a `torch.save` file is a zip
archive whose directory sits at its end, so an empty or truncated file fails at once without being read
whole) and fall back to the newest one that passes, naming the ones they skip.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

TMP = re.compile(r"\.tmp-(\d+)$")  # `<name>.tmp-<pid>`: a save still in progress, or one that was killed


def atomic_write(path: str | os.PathLike, write) -> None:
    """`write(tmp_path)` to a temporary file beside `path`, flushed to disk, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)  # the rename itself reaches the disk


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, writing each file through `atomic_write`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def link_atomically(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Point the symlink `link` at `target` (relative), replacing what was there in one rename: no moment
    without a `last.ckpt`."""
    link = Path(link)
    tmp = link.with_name(f"{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of saves whose process has ended (a kill or a full disk); returns them."""
    removed = []
    for path in Path(directory).glob("*.tmp-*"):
        match = TMP.search(path.name)
        if match and not process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process of this host with that id runs; one that has ended but is not yet reaped does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc here: the signal test is all there is
    return state != "Z"


def damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be loaded, or None when it looks whole. A file must be a complete
    torch.save archive; a directory (a sharded checkpoint) must hold Lightning's `meta.pt` and DCP's
    `.metadata`, or be a DeepSpeed checkpoint."""
    if path.is_dir():
        if (path / "meta.pt").is_file() and (path / ".metadata").is_file():
            return None
        if (path / "checkpoint").is_dir() or (path / "latest").is_file():
            return None
        return "a directory that is not a complete sharded checkpoint"
    if not path.exists():
        return "missing (a link to a removed file)"
    if path.stat().st_size == 0:
        return "empty"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "not a torch checkpoint"
    except (zipfile.BadZipFile, OSError) as e:
        return f"truncated or corrupt ({e})"
    return None


def resolve_ckpt_path(value: str | None, checkpoint_dir: str | Path, root: str | Path) -> str | None:
    """'last' -> <checkpoint_dir>/last.ckpt, or the newest good checkpoint when it is damaged; 'auto' -> the
    newest good one of the periodic, last and SLURM-requeue (hpc_ckpt_*) checkpoints, or None for a fresh
    start; anything else must exist and look whole. Damaged candidates are skipped with a warning naming them."""
    if value is None:
        return None
    checkpoint_dir = Path(checkpoint_dir)
    if value not in ("last", "auto"):
        path = Path(value)
        if not path.exists():
            raise FileNotFoundError(f"--ckpt_path {value} does not exist")
        if (why := damage(path)) is not None:
            raise ValueError(f"--ckpt_path {value} cannot be resumed from: it is {why}; pass another checkpoint")
        return value
    last = checkpoint_dir / "last.ckpt"
    if value == "last" and not last.exists():
        raise FileNotFoundError(
            f"--ckpt_path last: {last} does not exist; start without --ckpt_path or use --ckpt_path auto"
        )
    candidates = [*checkpoint_dir.glob("*.ckpt"), *Path(root).glob("hpc_ckpt_*.ckpt")]
    candidates = sorted((c for c in candidates if c.exists()), key=lambda c: c.stat().st_mtime, reverse=True)
    if value == "last":
        candidates = [last, *(c for c in candidates if c != last)]
    for candidate in candidates:
        why = damage(candidate)
        if why is None:
            return str(candidate)
        log.warning("--ckpt_path %s: skipping %s, which is %s", value, candidate, why)
    if value == "last":
        raise ValueError(f"--ckpt_path last: no checkpoint in {checkpoint_dir} can be loaded; start afresh")
    return None
