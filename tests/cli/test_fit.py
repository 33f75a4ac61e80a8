"""`python -m platform.fit`: in-process runs through the CLI, resume, errors, and one real subprocess."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

from lctrain.data.shards import atomic_directory, token_dtype, write_index, write_split
from lctrain.data.tokenizer import ByteTokenizer
from lctrain.training.cli import fit, run_entry_point
from tests.helpers import REPO, quick_fit_args


def read_metrics(run_dir) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def logged(rows, key) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


@pytest.fixture(scope="module")
def one_batch_data(tmp_path_factory):
    """A corpus of exactly one batch: 4 blocks of 33 bytes, so every step sees the same rows."""
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    doc = rng.integers(97, 123, size=4 * 32).tolist()  # 4 blocks of 32 + 1 overlapping tokens, EOT last
    path = tmp_path_factory.mktemp("data") / "one-batch"
    with atomic_directory(path) as tmp:
        dtype = token_dtype(tok.vocab_size)
        splits = {s: write_split(tmp, s, [doc], eot_id=tok.eot_id, dtype=dtype) for s in ("train", "val")}
        write_index(tmp, tokenizer=tok.describe(), splits=splits, dtype=dtype)
    return path


def test_loss_falls_on_a_repeated_batch_and_a_checkpoint_is_written(tmp_path, one_batch_data):
    run = tmp_path / "run"
    args = quick_fit_args(
        run,
        one_batch_data,
        "--data.seq_len",
        "32",
        "--model.optimizer.init_args.lr",
        "0.01",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.val_check_interval",
        "20",
        steps=40,
    )
    cli = fit(args)
    assert cli.trainer.global_step == 40
    losses = logged(read_metrics(run), "train/loss")
    first, last = losses[0][1], losses[-1][1]
    assert last < 0.5 * first, losses
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 40
    assert (run / "config.yaml").is_file()


def test_training_logs_loss_metrics_grad_norms_and_learning_rate(trained_run):
    rows = read_metrics(trained_run)
    keys = set().union(*(r.keys() for r in rows))
    for key in [
        "train/loss",
        "train/ppl",
        "train/acc",
        "train/top5_acc",
        "val/loss",
        "val/ppl",
        "val/acc",
        "train/grad_norm",
        "grad_norm/blocks.0",
        "grad_norm/blocks.1",
        "grad_norm/embed",
        "lr-AdamW/pg1",
    ]:
        assert key in keys, key
    assert all(v > 0 for _, v in logged(rows, "train/grad_norm"))
    lrs = [v for _, v in logged(rows, "lr-AdamW/pg1")]
    assert lrs[0] < lrs[-1]  # still warming up over these few steps


def test_grad_norm_per_block_adds_up_to_the_total(trained_run):
    rows = [r for r in read_metrics(trained_run) if r.get("train/grad_norm")]
    for row in rows:
        parts = [float(v) ** 2 for k, v in row.items() if k.startswith("grad_norm/") and v]
        assert np.sqrt(sum(parts)) == pytest.approx(float(row["train/grad_norm"]), rel=1e-4)


def test_resume_from_last_continues_at_the_saved_step(tmp_path, builtin_data):
    run = tmp_path / "run"
    fit(quick_fit_args(run, builtin_data, steps=6))
    cli = fit(quick_fit_args(run, builtin_data, "--ckpt_path", "last", steps=9))
    assert cli.trainer.global_step == 9
    steps = [s for s, _ in logged(read_metrics(run), "train/loss")]
    assert steps == list(range(9))  # one file for the run: each step once (Lightning counts from 0)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert state["combined_loader"][0]["consumed"] == 9


def test_auto_resume_starts_fresh_without_checkpoints_and_resumes_with_them(tmp_path, builtin_data):
    run = tmp_path / "run"
    assert fit(quick_fit_args(run, builtin_data, "--ckpt_path", "auto", steps=3)).trainer.global_step == 3
    resumed = fit(quick_fit_args(run, builtin_data, "--ckpt_path", "auto", steps=5))
    assert resumed.trainer.global_step == 5
    assert resumed.trainer.ckpt_path is not None  # resumed, not started afresh
    assert [s for s, _ in logged(read_metrics(run), "train/loss")] == list(range(5))


def run_fit(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "platform.fit", *args], cwd=cwd, capture_output=True, text=True)


def run_fit_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The entry point's behaviour without a new interpreter: exit code and captured stderr."""
    code = run_entry_point(fit, list(args))
    return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one error line of a failed run: exit code 2, no traceback, a single `error:` line, last."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert sum(line.startswith("error:") for line in lines) == 1 and lines[-1].startswith("error:"), out.stderr
    return lines[-1]


@pytest.mark.slow
def test_fit_runs_as_a_subprocess_and_writes_its_files(tmp_path, builtin_data):
    run = tmp_path / "run"
    out = run_fit(*quick_fit_args(run, builtin_data, steps=3))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "config.yaml").is_file()
    assert logged(read_metrics(run), "train/loss")


def test_misspelled_key_fails_with_one_line_naming_it():
    line = error_line(run_fit("--config", "configs/tiny.yaml", "--trainer.max_step", "5"))
    assert "--trainer.max_step" in line


def test_misspelled_key_in_a_config_file_is_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text((REPO / "configs" / "tiny.yaml").read_text().replace("seq_len:", "seq_lenn:"))
    assert "seq_lenn" in error_line(run_fit_in_process(capsys, "--config", str(config)))


def test_unknown_model_size_is_a_one_line_error(capsys):
    line = error_line(run_fit_in_process(capsys, "--config", "configs/tiny.yaml", "--model.size", "huge"))
    assert line == "error: unknown size 'huge' for lswt; choose one of: debug, tiny, small, medium, large, xl, xxl"


def test_resume_from_a_missing_last_checkpoint_is_a_one_line_error(tmp_path, capsys):
    out = run_fit_in_process(
        capsys, "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"
    )
    assert "last.ckpt does not exist" in error_line(out)


@pytest.mark.slow
def test_lightning_relaunches_python_m_platform_fit_for_a_second_ddp_rank(tmp_path, builtin_data, port):
    """Lightning's DDP launcher starts rank 1 as `python -m platform.fit ...` from the same directory."""
    run = tmp_path / "run"
    env = {**__import__("os").environ, "MASTER_PORT": str(port)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "platform.fit",
            *quick_fit_args(run, builtin_data, "--trainer.devices", "2", "--trainer.strategy", "ddp", steps=3),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["world_size"] == 2
    assert state["global_step"] == 3


def test_grad_norms_are_logged_only_at_the_steps_they_were_measured(tmp_path, builtin_data):
    run = tmp_path / "run"
    fit(quick_fit_args(run, builtin_data, "--grad_norm.every_n_steps", "3", steps=7))
    steps = [s for s, _ in logged(read_metrics(run), "train/grad_norm")]
    assert steps == [0, 3, 6]
