"""SerriformNet through the command line: the ablation configs train, expert usage and aux losses reach
the CSV log (read from its metrics.csv) and the W&B logger (checked through W&B's public API only), and
`python -m platform.generate` streams greedy tokens equal to full forwards.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb

from lctrain.data.shards import atomic_directory, token_dtype, write_index, write_split
from lctrain.data.tokenizer import ByteTokenizer
from lctrain.inference import load_model
from lctrain.models.sampling import generate
from lctrain.training.cli import fit
from lctrain.training.loggers import WandbLogger
from tests.helpers import REPO, quick_fit_args

STAGES = ("conv", "recurrence", "moe", "feed_forward")
ABLATIONS = {  # config -> the stages its blocks hold (MoE takes the dense feed-forward's place)
    "full": {"conv", "recurrence", "moe"},
    "conv-only": {"conv"},
    "recurrence-only": {"recurrence"},
    "moe-only": {"moe"},
}
USAGE_KEYS = [f"moe/layer{i}/{name}" for i in range(3) for name in ("min_fraction", "max_fraction", "imbalance")]


def config_args(name: str, run_dir, data_dir, *extra: str, steps: int = 2) -> list[str]:
    """A configs/serriform/ file cut down to a few steps of short rows."""
    return [
        "--config", str(REPO / "configs" / "serriform" / f"{name}.yaml"),
        "--trainer.default_root_dir", str(run_dir),
        "--data.data_dir", str(data_dir),
        "--data.seq_len", "32",
        "--data.batch_size", "2",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--checkpoint.every_n_train_steps", str(steps),
        *extra,
    ]  # fmt: skip


def read_csv(run_dir) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def logged_keys(rows: list[dict]) -> set[str]:
    return {k for row in rows for k, v in row.items() if v}


# --- the ablation configs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_each_ablation_config_trains_the_stages_it_names(name, tmp_path, builtin_data):
    cli = fit(config_args(name, tmp_path / name, builtin_data, "--expert_usage.every_n_steps", "1"))
    assert cli.trainer.global_step == 2
    model = cli.model.model
    assert model.config.d_model == 64 and len(model.blocks) == 3  # the `debug` size
    for block in model.blocks:
        assert {stage for stage in STAGES if getattr(block, stage) is not None} == ABLATIONS[name]
    rows = read_csv(tmp_path / name)
    assert all(math.isfinite(float(r["train/loss"])) for r in rows if r.get("train/loss"))
    keys = logged_keys(rows)
    if "moe" in ABLATIONS[name]:
        assert {"train/moe_balance", "val/moe_balance", *USAGE_KEYS} <= keys
    else:
        assert not any("moe" in k for k in keys)


def test_expert_usage_logs_nothing_for_a_model_without_experts(tmp_path, builtin_data):
    cli = fit(quick_fit_args(tmp_path / "lswt", builtin_data, "--expert_usage.every_n_steps", "1", steps=2))
    assert cli.model.hparams.arch == "lswt" and cli.trainer.global_step == 2
    assert not any(k.startswith("moe/") for k in logged_keys(read_csv(tmp_path / "lswt")))


# --- expert usage and aux losses in the CSV and W&B logs --------------------------------------------


def test_expert_usage_and_aux_losses_reach_the_csv_and_the_offline_wandb_run(tmp_path, builtin_data, monkeypatch):
    """What reaches the logs is read back from the CSV logger's metrics.csv; for W&B, from what the monitor and the
    module hand the WandbLogger (histograms through wandb.Histogram's public `bins` and `histogram`) and the offline
    run it keeps in the run directory, never from W&B's private binary run file."""
    handed = []  # (step, metrics) of every WandbLogger.log_metrics call
    log_metrics = WandbLogger.log_metrics

    def recording_log_metrics(self, metrics, step=None):
        handed.append((step, dict(metrics)))
        log_metrics(self, metrics, step)

    monkeypatch.setattr(WandbLogger, "log_metrics", recording_log_metrics)
    loggers = tmp_path / "loggers.yaml"
    loggers.write_text(
        "trainer:\n  logger:\n    - class_path: lctrain.training.loggers.CSVLogger\n"
        "    - class_path: lctrain.training.loggers.WandbLogger\n      init_args: {project: serriform-test}\n"
    )
    run = tmp_path / "run"
    cli = fit(
        config_args("full", run, builtin_data, "--config", str(loggers), "--expert_usage.every_n_steps", "2", steps=4)
    )
    experiment = cli.trainer.loggers[1].experiment
    run_id, run_files, offline = experiment.id, Path(experiment.dir), experiment.offline
    experiment.finish()

    rows = read_csv(run)
    aux = {"train/moe_balance", "train/router_entropy", "val/moe_balance", "val/router_entropy"}
    assert aux | set(USAGE_KEYS) <= logged_keys(rows)
    usage_steps = sorted(int(r["step"]) for r in rows if r.get(USAGE_KEYS[0]))
    assert usage_steps == [0, 2]  # every 2 optimizer steps of 4
    for row in rows:
        if row.get("moe/layer1/imbalance"):
            low, high = float(row["moe/layer1/min_fraction"]), float(row["moe/layer1/max_fraction"])
            assert 0 <= low <= 1 / 4 <= high <= 1  # 4 experts
            assert float(row["moe/layer1/imbalance"]) == pytest.approx(4 * high)

    # the W&B run: offline, in the run directory, under the id the run directory keeps for a resume
    assert offline and (run / "wandb_run_id").read_text().strip() == run_id
    assert run_files.is_dir() and run_files.resolve().is_relative_to((run / "wandb").resolve())
    assert aux | set(USAGE_KEYS) <= {key for _, metrics in handed for key in metrics}
    histograms = [
        (step, m["moe/layer2/tokens_per_expert"]) for step, m in handed if "moe/layer2/tokens_per_expert" in m
    ]
    assert [step for step, _ in histograms] == [0, 2]
    for _, histogram in histograms:
        assert isinstance(histogram, wandb.Histogram)
        assert histogram.bins == [0, 1, 2, 3, 4]  # one bin per expert
        assert sum(histogram.histogram) == pytest.approx(1.0)
    usage = [m for _, m in handed if USAGE_KEYS[0] in m]
    csv_usage = [r for r in rows if r.get(USAGE_KEYS[0])]
    assert [m[USAGE_KEYS[0]] for m in usage] == pytest.approx([float(r[USAGE_KEYS[0]]) for r in csv_usage])


# --- generation from a SerriformNet checkpoint ------------------------------------------------------


@pytest.fixture(scope="module")
def serriform_run(tmp_path_factory):
    """The full config trained on one repeated sentence until it continues it: greedy text of an
    untrained model, or of one trained for a few steps on real text, repeats one byte."""
    tokenizer = ByteTokenizer()
    doc = tokenizer.encode(("the quick brown fox jumps over the lazy dog. " * 3)[: 4 * 32])  # 4 blocks of 32 + 1
    data = tmp_path_factory.mktemp("data") / "sentence"
    with atomic_directory(data) as tmp:
        dtype = token_dtype(tokenizer.vocab_size)
        splits = {s: write_split(tmp, s, [doc], eot_id=tokenizer.eot_id, dtype=dtype) for s in ("train", "val")}
        write_index(tmp, tokenizer=tokenizer.describe(), splits=splits, dtype=dtype)
    run = tmp_path_factory.mktemp("runs") / "serriform"
    fast = ["--model.optimizer.init_args.lr", "0.01", "--model.scheduler.init_args.warmup_steps", "5"]
    fit(config_args("full", run, data, "--data.batch_size", "4", *fast, steps=40))
    return run


def test_greedy_generation_streams_one_token_per_call_equal_to_the_argmax_of_full_forwards(serriform_run):
    model, tokenizer = load_model(serriform_run)
    prompt = torch.tensor([tokenizer.encode("the ")])
    calls = []
    forward = model.forward
    model.forward = lambda ids, state=None, **kw: calls.append(ids.shape[1]) or forward(ids, state=state, **kw)
    streamed = [t.item() for t in generate(model, prompt, 24, temperature=0)]
    assert calls == [4] + [1] * 23  # the prompt once, then one token per call with the state
    ids = prompt
    with torch.no_grad():
        for token in streamed:  # each position recomputed from scratch, without any state
            assert forward(ids).logits[0, -1].argmax().item() == token
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)  # (1, T + 1)
    assert len(set(streamed)) > 5  # trained enough to continue the sentence, not to repeat one byte


def test_generate_cli_prints_the_greedy_continuation_of_a_serriform_checkpoint(serriform_run):
    args = ["--checkpoint", str(serriform_run), "--prompt", "the ", "--max_new_tokens", "24", "--temperature", "0"]
    out = subprocess.run(
        [sys.executable, "-m", "platform.generate", *args, "--stop_at_end_of_text", "false"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    model, tokenizer = load_model(serriform_run)
    tokens = [t.item() for t in generate(model, torch.tensor([tokenizer.encode("the ")]), 24, temperature=0)]
    assert out.stdout == "the " + tokenizer.decode(tokens) + "\n"
