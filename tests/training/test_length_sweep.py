"""The length sweep during training: `length_sweep/ppl_<L>` at the validation steps, equal to the perplexity of
the same weights measured afterwards (by the evaluation code and by a plain float64 loop), under DDP too; the
table and the plot in TensorBoard and W&B; nothing at all when it is off (the default)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import wandb
from lightning.pytorch.loggers import WandbLogger

from lctrain.evaluation.perplexity import perplexity_by_length, read_tokens, window_ends
from lctrain.evaluation.sources import ModelEntry, load_entry
from lctrain.training.cli import fit
from lctrain.training.length_sweep import LengthSweep
from tests.helpers import REPO, free_port, quick_fit_args

LENGTHS, LIMIT, SCORE_LEN = [32, 64], 64, 32
SWEEP = [
    "--length_sweep.every_n_validations", "1",
    "--length_sweep.lengths", "[32, 64]",
    "--length_sweep.limit", str(LIMIT),
    "--data.seq_len", "32",
    "--trainer.val_check_interval", "2",
]  # fmt: skip
LOGGERS = [
    "--trainer.logger=lctrain.training.loggers.CSVLogger",
    "--trainer.logger+=lctrain.training.loggers.TensorBoardLogger",
    "--trainer.logger+=lctrain.training.loggers.WandbLogger",
]


def csv_rows(run) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def reference_ppl(model: torch.nn.Module, tokens: np.ndarray, length: int, ends: list[int]) -> float:
    """exp of the mean NLL of the last SCORE_LEN tokens of each window ending at `ends`, from the whole window
    in one forward pass, in float64."""
    total, count = 0.0, 0
    for end in ends:
        window = torch.from_numpy(tokens[end - length : end + 1].astype(np.int64))[None]  # (1, L + 1)
        logits = model(window[:, :-1]).logits[0].double()  # (L, V)
        nll = -F.log_softmax(logits, dim=-1)[torch.arange(length), window[0, 1:]]  # (L,)
        for value in nll[-SCORE_LEN:].tolist():
            total, count = total + value, count + 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def swept_run(tmp_path_factory, builtin_data):
    """4 steps, validating at steps 2 and 4, sweeping at each; the last checkpoint holds the step-4 weights.
    Also returns (step, metrics) of every call of the (offline) WandbLogger's log_metrics."""
    run = tmp_path_factory.mktemp("sweep") / "run"
    handed = []
    log_metrics = WandbLogger.log_metrics

    def recording_log_metrics(self, metrics, step=None):
        handed.append((step, dict(metrics)))
        log_metrics(self, metrics, step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setattr(WandbLogger, "log_metrics", recording_log_metrics)
        cli = fit(quick_fit_args(run, builtin_data, *SWEEP, *LOGGERS, steps=4))
        cli.trainer.loggers[2].experiment.finish()
    return run, handed


def test_the_sweep_logs_each_length_at_every_validation_equal_to_the_final_weights_measured_afterwards(
    swept_run, builtin_data
):
    run, _ = swept_run
    rows = [r for r in csv_rows(run) if r.get("length_sweep/ppl_32")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(r["length_sweep/ppl_64"] for r in rows)
    for row in rows:
        for n in LENGTHS:
            assert 1 < float(row[f"length_sweep/ppl_{n}"]) < 1000  # a byte model: between certain and hopeless

    # The sweep at step 4 saw the weights of the final checkpoint (validation runs after the step's update).
    loaded = load_entry(ModelEntry(str(run / "checkpoints" / "last.ckpt")))
    tokens = read_tokens(str(builtin_data), "val")
    result, _ = perplexity_by_length(loaded, tokens, LENGTHS, score_len=SCORE_LEN, limit=LIMIT, with_positions=False)
    logged = [float(rows[-1][f"length_sweep/ppl_{n}"]) for n in LENGTHS]
    assert logged == result.ppl  # the same computation on the same weights: the same bits

    model = loaded.model.double()
    ends = window_ends(len(tokens), max(LENGTHS), SCORE_LEN, None, LIMIT)
    assert len(ends) == LIMIT // SCORE_LEN
    with torch.no_grad():
        expected = [reference_ppl(model, tokens, n, ends) for n in LENGTHS]
    assert logged == pytest.approx(expected, rel=1e-5)


def test_tensorboard_receives_the_table_and_the_plot_at_every_sweep(swept_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(swept_run[0] / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("length_sweep/ppl_64")] == [2, 4]
    images = events.Images("length_sweep/perplexity")
    assert [e.step for e in images] == [2, 4]
    assert all(e.encoded_image_string.startswith(b"\x89PNG") and e.width > 100 for e in images)
    texts = events.Tensors("length_sweep/table/text_summary")
    assert [e.step for e in texts] == [2, 4]
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert "| step 4 |" in table and "32 (1x)" in table and "64 (2x)" in table


def test_wandb_receives_the_scalars_a_table_and_the_plot_at_every_sweep(swept_run):
    run, handed = swept_run
    sweeps = [(step, m) for step, m in handed if "length_sweep/table" in m]
    assert [step for step, _ in sweeps] == [2, 4]
    step_4 = {
        float(r["length_sweep/ppl_64"]) for r in csv_rows(run) if r["step"] == "4" and r.get("length_sweep/ppl_64")
    }
    for _, metrics in sweeps:
        assert {"length_sweep/ppl_32", "length_sweep/ppl_64"} <= set(metrics)
        assert isinstance(metrics["length_sweep/perplexity"], wandb.Image)
        table = metrics["length_sweep/table"]
        assert isinstance(table, wandb.Table) and table.columns == ["length", "perplexity", "nll"]
        assert [row[0] for row in table.data] == LENGTHS
        assert [row[1] for row in table.data] == [metrics[f"length_sweep/ppl_{n}"] for n in LENGTHS]
        assert table.data[1][1] == pytest.approx(math.exp(table.data[1][2]), rel=1e-12)
    assert step_4 == {sweeps[-1][1]["length_sweep/ppl_64"]}


def test_nothing_is_logged_under_length_sweep_when_it_is_off(tmp_path, builtin_data):
    run = tmp_path / "run"
    fit(quick_fit_args(run, builtin_data, "--data.seq_len", "32", "--trainer.val_check_interval", "2", steps=4))
    rows = csv_rows(run)
    assert any(r.get("val/loss") for r in rows)  # validation ran
    assert not [key for key in rows[0] if key.startswith("length_sweep/")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_validations": -1}, "length_sweep.every_n_validations=-1 must be >= 0"),
        ({"lengths": [1, 64]}, r"length_sweep.lengths=\[1, 64\]: give window lengths of at least 2"),
        ({"limit": 0}, "length_sweep.limit=0"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LengthSweep(**kwargs)


def test_a_missing_split_or_too_short_a_split_is_named_before_training(tmp_path, builtin_data):
    with pytest.raises(ValueError, match="length_sweep.split=nope: .* has the splits train, val; choose one of them"):
        fit(quick_fit_args(tmp_path / "a", builtin_data, *SWEEP, "--length_sweep.split", "nope", steps=1))
    with pytest.raises(ValueError, match=r"length_sweep.lengths=\[32, 100000000\]: split 'val' .* give shorter"):
        fit(quick_fit_args(tmp_path / "b", builtin_data, *SWEEP, "--length_sweep.lengths", "[32, 100000000]", steps=1))


@pytest.mark.slow
def test_under_ddp_the_ranks_share_the_windows_and_log_what_one_process_measures(tmp_path, builtin_data):
    """2 CPU ranks, 3 windows (one rank scores two, the other one): the logged perplexity equals one process's
    measurement of the final weights, to the bit."""
    run = tmp_path / "run"
    args = quick_fit_args(
        run, builtin_data, *SWEEP, "--length_sweep.limit", "96", "--length_sweep.score_len", str(SCORE_LEN),
        "--trainer.devices", "2", "--parallelism.strategy", "ddp", steps=4,
    )  # fmt: skip
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    done = subprocess.run(
        [sys.executable, "-m", "platform.fit", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rows = [r for r in csv_rows(run) if r.get("length_sweep/ppl_32")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    loaded = load_entry(ModelEntry(str(run / "checkpoints" / "last.ckpt")))
    tokens = read_tokens(str(builtin_data), "val")
    result, _ = perplexity_by_length(loaded, tokens, LENGTHS, score_len=SCORE_LEN, limit=96, with_positions=False)
    assert result.windows == 3
    assert [float(rows[-1][f"length_sweep/ppl_{n}"]) for n in LENGTHS] == result.ppl


def test_a_resumed_run_counts_the_validations_of_the_attempt_before(tmp_path, builtin_data):
    """Validating at every step and sweeping at every 3rd validation: steps 1-2 in one attempt, 3-4 in the next, which
    sweeps at step 3, as an uninterrupted run would."""
    run = tmp_path / "run"
    every_step = [*SWEEP, "--trainer.val_check_interval", "1", "--length_sweep.every_n_validations", "3"]
    fit(quick_fit_args(run, builtin_data, *every_step, steps=2))
    fit(quick_fit_args(run, builtin_data, *every_step, "--ckpt_path", "last", steps=4))
    assert [int(r["step"]) for r in csv_rows(run) if r.get("length_sweep/ppl_32")] == [3]
