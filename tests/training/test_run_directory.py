"""One run per run directory: a live run's lock stops a second fit, a killed run's lock is taken over, and
a fresh fit never mixes its checkpoints with an earlier run's."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from lctrain.entry import run_entry_point
from lctrain.training.cli import fit
from lctrain.training.run_directory import LOCK, RunLock
from tests.helpers import REPO, pause_at_step_callback, quick_fit_args, wait_for


def files(run) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def ended_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)


def test_a_lock_of_a_live_process_refuses_and_one_of_an_ended_process_is_taken_over(tmp_path):
    lock = tmp_path / LOCK
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "slurm_job": None}))
        with pytest.raises(ValueError, match=f"is in use by process {live.pid} on {socket.gethostname()}"):
            RunLock(tmp_path).__enter__()
        live.kill()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": ended_pid(), "slurm_job": None}))
    with RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] != ended_pid()
    assert not lock.exists()


def test_an_earlier_attempt_of_the_same_slurm_job_on_another_node_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / LOCK).write_text(json.dumps({"host": "another-node", "pid": 1, "slurm_job": "4242"}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["slurm_job"] == "4242"
    (tmp_path / LOCK).write_text(json.dumps({"host": "another-node", "pid": 1, "slurm_job": "7"}))
    with pytest.raises(ValueError, match="in use by process 1 on another-node"):
        RunLock(tmp_path).__enter__()


@pytest.mark.slow
def test_a_second_fit_into_a_running_runs_directory_stops_at_once(tmp_path, builtin_data, capsys):
    run, gate = tmp_path / "run", tmp_path / "gate"
    pause = pause_at_step_callback(2, gate)
    args = quick_fit_args(run, builtin_data, "--trainer.callbacks+", pause, steps=4)
    first = subprocess.Popen([sys.executable, "-m", "platform.fit", *args], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (gate / "reached-0").exists(), "the first run at step 2")
        before = files(run)
        assert run_entry_point(fit, quick_fit_args(run, builtin_data, "--ckpt_path", "auto", steps=4)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by process {first.pid}" in err[0]
        assert files(run) == before  # nothing of the running run was touched
    finally:
        (gate / "hold").unlink()
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert not (run / LOCK).exists()


def test_a_fresh_fit_over_checkpoints_is_refused_unless_resumed_or_overwritten(
    trained_run, tmp_path, builtin_data, capsys
):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    before = files(run / "checkpoints")
    assert run_entry_point(fit, quick_fit_args(run, builtin_data, steps=8)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds checkpoints" in err[0] and "--ckpt_path auto" in err[0]
    assert files(run / "checkpoints") == before

    assert run_entry_point(fit, quick_fit_args(run, builtin_data, "--ckpt_path", "auto", steps=8)) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8

    assert run_entry_point(fit, quick_fit_args(run, builtin_data, "--overwrite_run", "true", steps=2)) == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step-0000002.ckpt"]  # the earlier run's checkpoints are gone
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
