"""Checkpoint files that are never half-written, and a resume that never picks a damaged one.

A save writes `<name>.tmp-<pid>` in the checkpoint's own directory, flushes it to disk and renames it over
`<name>` (one filesystem, so the rename is atomic): a kill or a full disk leaves the previous file as it
was, and at most a temporary file that the next start of the run removes. `last.ckpt` is replaced the same
way. `--ckpt_path auto` and `last` check a candidate before they pick it (a `torch.save` file is a zip
archive whose directory sits at its end, so an empty or truncated file fails at once without being read
whole) and fall back to the newest one that passes, naming the ones they skip. A sharded (DCP) checkpoint is
a directory that many ranks write; it counts as complete only once rank 0 has written the marker `.complete`
into it, after every rank's shard and the metadata (cluster/strategies.py). A save that cannot be written
(a full disk, a read-only directory) stops the run with one line naming the file and the space it needs.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

TMP = re.compile(r"\.tmp-(\d+)$")  # `<name>.tmp-<pid>`: a save still in progress, or one that was killed
MiB = 2**20
META = "meta.pt"  # Lightning's part of a sharded checkpoint: loops, callbacks, hyperparameters
COMPLETE = ".complete"  # written last into a sharded checkpoint directory: every shard and the metadata are there
# What a write that cannot succeed in this directory fails with, and how the error line says it.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class StorageError(ValueError):
    """A checkpoint could not be written where it was asked to go: the disk is full, or the directory is
    read-only. The previous checkpoints are untouched."""


def atomic_write(path: str | os.PathLike, write, needed_bytes: int | None = None) -> None:
    """`write(tmp_path)` to a temporary file beside `path`, flushed to disk, then renamed over `path`.
    A full disk or a read-only directory raises StorageError, which names the directory and, for a full
    disk, `needed_bytes` (an estimate of the file's size) against the space free."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        written = tmp.stat().st_size if tmp.exists() else 0
        _discard(tmp)
        if (error := storage_error(e, path, max(needed_bytes or 0, written))) is not None:
            raise error from e
        raise
    finally:
        _discard(tmp)
    _fsync_directory(path.parent)  # the rename itself reaches the disk


def _discard(tmp: Path) -> None:
    if os.path.lexists(tmp):  # unlink on a read-only filesystem fails even for a file that is not there
        tmp.unlink()


def storage_error(exc: BaseException, path: Path, needed_bytes: int) -> StorageError | None:
    """The one-line StorageError for a write of `path` that failed with `exc`, or None when the failure is
    not about the storage. The OSError may sit anywhere in the exception's chain (torch.save wraps it)."""
    code, cause = None, exc
    while cause is not None and code is None:
        code = cause.errno if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS else None
        cause = cause.__cause__ or cause.__context__
    free = _free_bytes(path.parent)
    if code is None and isinstance(exc, (OSError, RuntimeError)) and free is not None and free < needed_bytes:
        code = errno.ENOSPC  # a writer that lost the OSError: the numbers say what happened
    if code is None:
        return None
    if code in (errno.ENOSPC, errno.EDQUOT):
        space = f"needs ~{needed_bytes / MiB:.1f} MiB, {(free or 0) / MiB:.1f} MiB free"
        return StorageError(
            f"{STORAGE_ERRNOS[code]} writing {path}: {space}; free space or set checkpoint.dirpath elsewhere"
        )
    return StorageError(
        f"{STORAGE_ERRNOS[code]} writing {path}: {path.parent} cannot be written; "
        "make it writable or set checkpoint.dirpath elsewhere"
    )


def _free_bytes(directory: Path) -> int | None:
    for candidate in (directory, *directory.parents):  # the directory may not exist yet
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def tensor_bytes(tree: Any) -> int:
    """Bytes of the tensors in a nested dict/list (a checkpoint), roughly the size of its file. A DTensor
    counts with its global shape, so a sharded state dict gives the size of the whole checkpoint."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


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
        atomic_write(path, lambda tmp: _save_to_file(checkpoint, tmp), needed_bytes=tensor_bytes(checkpoint))


def _save_to_file(checkpoint: dict[str, Any], path: Path) -> None:
    # Through a Python file object, so a failed write keeps its OSError (ENOSPC) in the exception's chain.
    with open(path, "wb") as f:
        torch.save(checkpoint, f)


def mark_complete(directory: str | os.PathLike) -> None:
    """Write the completion marker of a sharded checkpoint directory (rank 0, after every rank has written)."""
    atomic_write(Path(directory) / COMPLETE, lambda tmp: tmp.write_text("every shard and the metadata are written\n"))


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


def sharded_kind(path: Path) -> str | None:
    """'dcp' (FSDP2/FSDP1: DCP's `.metadata` and Lightning's `meta.pt`), 'deepspeed' (ZeRO partitions), or
    None when `path` is not a sharded checkpoint directory."""
    if (path / META).is_file() and (path / ".metadata").is_file():
        return "dcp"
    if (path / "checkpoint").is_dir() or (path / "latest").is_file():
        return "deepspeed"
    return None


def damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be loaded, or None when it looks whole. A file must be a complete
    torch.save archive; a directory must be a DCP checkpoint with Lightning's `meta.pt`, DCP's `.metadata`
    and the completion marker, or a DeepSpeed checkpoint."""
    if path.is_dir():
        if sharded_kind(path) == "deepspeed":
            return None
        if not ((path / META).is_file() or (path / ".metadata").is_file()):
            return "a directory that is not a sharded checkpoint"
        if not (path / COMPLETE).is_file():
            return f"a sharded checkpoint without its completion marker {COMPLETE} (a save that did not finish)"
        if not ((path / META).is_file() and (path / ".metadata").is_file()):
            return "a sharded checkpoint without its meta.pt or .metadata"
        return None
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
