"""The project's SLURM templates on a real local SLURM (tests/distributed/slurm_cluster.py), debug LSWT on CPU.

- slurm/multinode.sbatch on two (fake) nodes completes with one rank on each;
- `scancel --signal=USR1` makes every rank save at the next step and rank 0 requeue the job; the restarted
  job resumes at that step, completes, and continues the same W&B run (offline);
- a bare `scontrol requeue` (SIGTERM, nothing saved) resumes from the last periodic checkpoint.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from lctrain.training.checkpoints import process_alive
from tests.distributed.slurm_cluster import INSTALL, LocalSlurm, missing_binaries
from tests.helpers import REPO, pause_at_step_callback, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def slurm():
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM tests need {', '.join(missing)}: run `{INSTALL}` (as .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("SLURM tests start slurmctld and slurmd, which needs root (as in CI)")
    cluster = LocalSlurm().start()
    cluster.env.update(PYTHON=sys.executable, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    yield cluster
    cluster.stop()


def fit_overrides(run: Path, data: Path, *extra: str, steps: int) -> list[str]:
    return [
        "--trainer.default_root_dir", str(run),
        "--data.data_dir", str(data),
        "--data.seq_len", "64",
        "--data.batch_size", "4",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", "1000",  # no validation: these tests are about the job's life
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1",
        "--checkpoint.every_n_train_steps", "5",
        *extra,
    ]  # fmt: skip


def submit(slurm: LocalSlurm, template: str, *options: str, overrides: list[str]) -> str:
    """sbatch a template from the repository root, as a user would; the output file goes to the run dir."""
    run = Path(overrides[overrides.index("--trainer.default_root_dir") + 1])
    run.mkdir(parents=True, exist_ok=True)
    result = slurm.run(
        "sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
        f"--output={run}/slurm-%j.out", *options, template, "configs/tiny.yaml", *overrides, cwd=REPO,
    )  # fmt: skip
    return result.stdout.strip().split(";")[0]


def wait_until_done(slurm: LocalSlurm, job_id: str, run: Path, timeout: float = 400) -> dict[str, str]:
    def done() -> bool:
        return slurm.job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

    try:
        wait_for(done, f"job {job_id}", timeout)
    finally:
        log = run / f"slurm-{job_id}.out"
        print(log.read_text()[-6000:] if log.exists() else "no job output")  # shown when a test fails
    return slurm.job(job_id)


def logged_steps(run: Path) -> list[int]:
    with open(run / "csv" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def printed_steps(run: Path, job_id: str) -> tuple[list[int], list[int]]:
    """The optimizer steps each attempt reported in the job's output (a progress line per step)."""
    first, _, second = (run / f"slurm-{job_id}.out").read_text().partition("attempt 2:")
    return tuple([int(n) for n in re.findall(r"^step (\d+)/", text, re.MULTILINE)] for text in (first, second))


def restored_step(run: Path, job_id: str) -> int | None:
    """The step of the checkpoint the second attempt restored, from Lightning's line in the job's output."""
    _, _, second = (run / f"slurm-{job_id}.out").read_text().partition("attempt 2:")
    found = re.search(r"Restoring states from the checkpoint path at \S*step-(\d+)\.ckpt", second)
    return int(found.group(1)) if found else None


def last_checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def test_multinode_template_completes_with_one_rank_on_each_of_two_nodes(slurm, tmp_path, builtin_data):
    run = tmp_path / "run"
    # The fake nodes n1 and n2 do not resolve as host names, so the rendezvous address is given (the
    # template's comments say when a real cluster needs the same).
    slurm.env["MASTER_ADDR"] = "127.0.0.1"
    try:
        job = submit(
            slurm, "slurm/multinode.sbatch", "--nodes=2", "--ntasks-per-node=1", "--partition=multi",
            overrides=fit_overrides(run, builtin_data, steps=6),
        )  # fmt: skip
        info = wait_until_done(slurm, job, run)
    finally:
        del slurm.env["MASTER_ADDR"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    output = (run / f"slurm-{job}.out").read_text()
    assert "2 node(s) x 1 task(s) on n[1-2]" in output and "srun exited with status 0" in output
    state = last_checkpoint(run)
    assert state["global_step"] == 6
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["world_size"] == 2


def test_usr1_saves_requeues_and_the_restarted_job_resumes_the_same_wandb_run(slurm, tmp_path, builtin_data):
    run, steps, gate = tmp_path / "run", 60, tmp_path / "gate"
    loggers = (
        '[{"class_path": "lctrain.training.loggers.CSVLogger"}, '
        '{"class_path": "lctrain.training.loggers.WandbLogger", "init_args": {"project": "slurm-test"}}]'
    )
    pause = pause_at_step_callback(6, gate)  # both ranks wait at step 6 until the signal is on its way
    job = submit(
        slurm, "slurm/single_node.sbatch", "--ntasks-per-node=2",
        overrides=fit_overrides(run, builtin_data, "--trainer.logger", loggers, "--trainer.callbacks+", pause,
                                steps=steps),
    )  # fmt: skip
    wait_for(lambda: all((gate / f"reached-{rank}").exists() for rank in (0, 1)), "both ranks at step 6")
    slurm.run("scancel", "--signal=USR1", job)
    wait_for(lambda: all((gate / f"signalled-{rank}").exists() for rank in (0, 1)), "SIGUSR1 on both ranks")
    (gate / "hold").unlink()
    info = wait_until_done(slurm, job, run)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info

    first, second = printed_steps(run, job)
    assert first[-1] < steps  # the first attempt stopped early
    # The second resumed where the first saved on the signal (at the held step 6 or later), not from scratch.
    # The first attempt's own progress line for that step may be cut off by its exit, so the saved step is
    # read from the restore, not from the last line printed.
    saved = restored_step(run, job)
    assert saved is not None and saved >= 6 and first[-1] <= saved and second[0] == saved + 1, (saved, first, second)
    assert second[-1] == steps and last_checkpoint(run)["global_step"] == steps
    assert logged_steps(run) == list(range(steps))  # one CSV file for the run, each step once
    output = (run / f"slurm-{job}.out").read_text()
    assert "attempt 1: 2 task(s)" in output and "attempt 2: 2 task(s)" in output

    run_id = (run / "wandb_run_id").read_text().strip()
    attempts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(f"-{run_id}") for a in attempts), attempts


def test_bare_scontrol_requeue_resumes_from_the_last_periodic_checkpoint(slurm, tmp_path, builtin_data):
    """`scontrol requeue` sends SIGTERM and nothing is saved then; the periodic checkpoints carry the run."""
    run, steps, gate = tmp_path / "run", 60, tmp_path / "gate"
    pause = pause_at_step_callback(6, gate)  # held after step 5's checkpoint, until the first attempt is gone
    overrides = fit_overrides(run, builtin_data, "--trainer.callbacks+", pause, steps=steps)
    job = submit(slurm, "slurm/single_node.sbatch", "--ntasks-per-node=1", overrides=overrides)
    wait_for(lambda: (gate / "reached-0").exists(), "the run at step 6")
    assert (run / "checkpoints" / "step-0000005.ckpt").exists()
    first_attempt = int((gate / "reached-0").read_text())
    slurm.run("scontrol", "requeue", job)
    wait_for(lambda: not process_alive(first_attempt), "the first attempt to end")
    (gate / "hold").unlink()  # the restarted attempt passes step 6 without waiting
    info = wait_until_done(slurm, job, run)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    _, second = printed_steps(run, job)
    assert second[0] > 1 and (second[0] - 1) % 5 == 0  # resumed at a periodic checkpoint's step
    assert second[-1] == steps
