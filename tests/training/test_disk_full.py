"""A checkpoint directory that cannot take the next save (a full disk, a read-only mount) ends the run with
one `error:` line naming the file and what to do, exit code 2, and the previous checkpoint still loads.

The directories are real small tmpfs mounts, so the errors are the kernel's own; mounting needs root, and the
tests are skipped, saying why, where it is not allowed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lctrain.training.checkpoints import resolve_ckpt_path
from tests.helpers import REPO, pause_at_step_callback, quick_fit_args, wait_for

MiB = 2**20


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh directory with a tmpfs mounted on it; unmounted after the test."""
    mounted = []

    def mount(options: str):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (os.geteuid() != 0)")
        directory = tmp_path / f"mount{len(mounted)}"
        directory.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True, text=True
        )
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(directory)
        return directory

    yield mount
    for directory in mounted:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fit_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "platform.fit", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_one_line_and_the_previous_checkpoint_loads(tmp_path, builtin_data, tmpfs):
    """Step 3's checkpoint is written; then the disk is filled until half a checkpoint is free, so step 6's
    save fails: the line names the file, the size it needs and the space free, and no temporary file stays."""
    checkpoints, gate = tmpfs("size=64m"), tmp_path / "gate"
    args = quick_fit_args(
        tmp_path / "run", builtin_data, "--checkpoint.dirpath", str(checkpoints),
        "--trainer.callbacks+", pause_at_step_callback(4, gate), steps=6,
    )  # fmt: skip
    process = fit_process(*args)
    try:
        wait_for(lambda: (gate / "reached-0").exists() or process.poll() is not None, "the run to reach step 4")
        size = (checkpoints / "step-0000003.ckpt").stat().st_size
        disk = os.statvfs(checkpoints)
        with open(checkpoints / "ballast", "wb") as f:  # leaves half a checkpoint free
            os.posix_fallocate(f.fileno(), 0, disk.f_bavail * disk.f_frsize - size // 2)
        (gate / "hold").unlink()
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 2, stderr[-3000:]
    [line] = error_lines(stderr)
    assert line.startswith(f"error: no space left on device writing {checkpoints / 'step-0000006.ckpt'}: needs ~")
    assert line.endswith("MiB free; free space or set checkpoint.dirpath elsewhere")
    needed, free = (float(x) for x in re.search(r"needs ~([\d.]+) MiB, ([\d.]+) MiB free", line).groups())
    assert needed == pytest.approx(size / MiB, rel=0.1)  # the tensors' bytes; the file adds its zip structure
    assert free == pytest.approx(size / 2 / MiB, rel=0.05)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["ballast", "last.ckpt", "step-0000003.ckpt"]
    resumable = Path(resolve_ckpt_path("auto", checkpoints, tmp_path / "run"))
    assert resumable.resolve() == checkpoints / "step-0000003.ckpt"  # last.ckpt still points at it
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_read_only_checkpoint_directory_ends_the_run_with_one_line(tmp_path, builtin_data, tmpfs):
    checkpoints = tmpfs("ro,size=1m")
    process = fit_process(*quick_fit_args(tmp_path / "run", builtin_data, "--checkpoint.dirpath", str(checkpoints)))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr[-3000:]
    assert error_lines(stderr) == [
        f"error: read-only file system writing {checkpoints / 'step-0000003.ckpt'}: {checkpoints} cannot be "
        "written; make it writable or set checkpoint.dirpath elsewhere"
    ]
