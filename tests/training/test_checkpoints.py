"""Checkpoints are never half-written, and `--ckpt_path auto|last` never picks a damaged one."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys

import pytest
import torch

from lctrain.training.checkpoints import (
    COMPLETE,
    StorageError,
    atomic_write,
    damage,
    link_atomically,
    mark_complete,
    remove_stale_temporaries,
    resolve_ckpt_path,
)
from tests.helpers import REPO, quick_fit_args


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"step": 1}, path)

    def full_disk(tmp):
        tmp.write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    line = f"^no space left on device writing {path}: needs ~64.0 MiB, [0-9.]+ MiB free; free space or set checkpoint"
    with pytest.raises(StorageError, match=line):
        atomic_write(path, full_disk, needed_bytes=64 * 2**20)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_a_failure_that_is_not_about_storage_passes_through_and_leaves_no_temporary(tmp_path):
    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("a bug in the writer")

    with pytest.raises(RuntimeError, match="a bug in the writer"):
        atomic_write(tmp_path / "model.ckpt", broken, needed_bytes=4)
    assert list(tmp_path.iterdir()) == []


def test_damage_names_empty_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, good)
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.ckpt").touch()
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    assert damage(good) is None
    assert damage(tmp_path / "empty.ckpt") == "empty"
    assert damage(tmp_path / "truncated.ckpt").startswith("truncated or corrupt")
    assert damage(tmp_path / "text.ckpt").startswith("truncated or corrupt")
    assert damage(tmp_path / "nothing").startswith("missing")


def test_a_relink_replaces_last_in_one_step(tmp_path):
    for name in ("a.ckpt", "b.ckpt"):
        (tmp_path / name).write_text(name)
    link_atomically(tmp_path / "a.ckpt", tmp_path / "last.ckpt")
    link_atomically(tmp_path / "b.ckpt", tmp_path / "last.ckpt")
    assert os.readlink(tmp_path / "last.ckpt") == "b.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "b.ckpt", "last.ckpt"]


def test_only_temporaries_of_ended_processes_are_removed(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = tmp_path / f"step-0000006.ckpt.tmp-{ended.stdout.strip()}", tmp_path / f"x.ckpt.tmp-{os.getpid()}"
    dead.touch(), live.touch()
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert not dead.exists() and live.exists()


def test_auto_and_last_skip_damaged_checkpoints_and_name_them(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (3, 6, 9):
        torch.save({"global_step": step}, ckpts / f"step-{step:07d}.ckpt")
        os.utime(ckpts / f"step-{step:07d}.ckpt", (step, step))  # mtimes in step order
    link_atomically(ckpts / "step-0000009.ckpt", ckpts / "last.ckpt")
    (ckpts / "step-0000009.ckpt").write_bytes((ckpts / "step-0000006.ckpt").read_bytes()[:100])  # truncated
    os.utime(ckpts / "step-0000009.ckpt", (9, 9))
    with caplog.at_level(logging.WARNING):
        assert resolve_ckpt_path("auto", ckpts, tmp_path) == str(ckpts / "step-0000006.ckpt")
        assert resolve_ckpt_path("last", ckpts, tmp_path) == str(ckpts / "step-0000006.ckpt")
    assert "skipping" in caplog.text and "step-0000009.ckpt" in caplog.text and "truncated" in caplog.text
    with pytest.raises(ValueError, match="step-0000009.ckpt cannot be resumed from: it is truncated"):
        resolve_ckpt_path(str(ckpts / "step-0000009.ckpt"), ckpts, tmp_path)
    for path in ckpts.glob("step-*.ckpt"):
        path.write_bytes(b"")
    assert resolve_ckpt_path("auto", ckpts, tmp_path) is None  # nothing loads: a fresh start, with warnings
    with pytest.raises(ValueError, match="no checkpoint in .* can be loaded"):
        resolve_ckpt_path("last", ckpts, tmp_path)


def weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_a_kill_inside_a_save_resumes_with_auto_exactly_as_an_uninterrupted_run(tmp_path, builtin_data):
    """SIGKILL after step 6's file is written but before it is renamed: step 3 stays the newest checkpoint,
    `auto` resumes from it, the killed save's temporary file is removed, and the weights at step 9 equal an
    uninterrupted run's bit for bit."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    def run(*args: str) -> subprocess.CompletedProcess:  # every run in a fresh process, under equal settings
        return subprocess.run([sys.executable, "-m", "platform.fit", *args], cwd=REPO, capture_output=True, text=True)

    kill = '{"class_path": "tests.helpers.KillInsideSave", "init_args": {"step": 6}}'
    process = run(*quick_fit_args(killed, builtin_data, "--trainer.callbacks+", kill, steps=9))
    assert process.returncode == -9, process.stderr[-3000:]
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names[:2] == ["last.ckpt", "step-0000003.ckpt"] and names[2].startswith("step-0000006.ckpt.tmp-")
    assert (killed / "checkpoints" / "last.ckpt").resolve().name == "step-0000003.ckpt"

    for process in (run(*quick_fit_args(killed, builtin_data, "--ckpt_path", "auto", steps=9)),
                    run(*quick_fit_args(whole, builtin_data, steps=9))):  # fmt: skip
        assert process.returncode == 0, process.stderr[-3000:]
    assert not list((killed / "checkpoints").glob("*.tmp-*"))
    resumed, uninterrupted = weights(killed), weights(whole)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_sharded_directory_is_complete_only_with_its_marker(tmp_path, caplog):
    """Every rank's shard and the metadata may be there while the marker is not: a save that has not
    finished (or whose last rank died). `auto` skips it and names it; the marker makes it whole."""
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4):
        directory = ckpts / f"step-{step:07d}.ckpt"
        directory.mkdir(parents=True)
        for name in ("meta.pt", ".metadata", "__0_0.distcp", "__1_0.distcp"):
            (directory / name).write_bytes(b"shard")
    mark_complete(ckpts / "step-0000002.ckpt")
    for step in (2, 4):
        os.utime(ckpts / f"step-{step:07d}.ckpt", (step, step))  # mtimes in step order
    assert (ckpts / "step-0000002.ckpt" / COMPLETE).is_file() and damage(ckpts / "step-0000002.ckpt") is None
    assert "without its completion marker .complete" in damage(ckpts / "step-0000004.ckpt")
    with caplog.at_level(logging.WARNING):
        assert resolve_ckpt_path("auto", ckpts, tmp_path) == str(ckpts / "step-0000002.ckpt")
    assert "skipping" in caplog.text and "step-0000004.ckpt" in caplog.text
    mark_complete(ckpts / "step-0000004.ckpt")
    assert resolve_ckpt_path("auto", ckpts, tmp_path) == str(ckpts / "step-0000004.ckpt")
    (ckpts / "step-0000004.ckpt" / ".metadata").unlink()  # marked, but DCP's metadata is gone
    assert "without its meta.pt or .metadata" in damage(ckpts / "step-0000004.ckpt")
