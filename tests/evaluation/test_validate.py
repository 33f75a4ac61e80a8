"""`--mode validate`: a checkpoint's validation metrics equal what training logged for it (the same rows, the
same carried state), on one process and on two DDP ranks, from a file, a run directory or a sharded directory;
they are the token averages a float64 reference computes; bad checkpoints are named in one line."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from lctrain.data.datamodule import TokenDataModule
from lctrain.evaluation import validate
from lctrain.evaluation.validate import SameTokenizer, format_metrics, validate_checkpoint
from lctrain.inference.loading import load_model
from lctrain.training.checkpoints import COMPLETE
from lctrain.training.cli import fit
from tests.helpers import REPO, free_port, quick_fit_args

LIMIT = 2  # quick_fit_args validates on 2 batches
METRICS = ("val/loss", "val/ce", "val/ppl", "val/acc", "val/top5_acc")


def val_rows(run_dir) -> list[dict[str, float]]:
    """The validation rows of a run's csv/metrics.csv, in order, as {metric: value}."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    return [{k: float(v) for k, v in r.items() if k.startswith("val/") and v != ""} for r in rows]


def test_each_checkpoint_validates_to_the_numbers_training_logged_for_it(trained_run):
    """The run validated after steps 3 and 6 and saved a checkpoint at each: the same weights, rows and batch
    size give the same values, to the last bit."""
    logged = val_rows(trained_run)
    assert len(logged) == 2
    for checkpoint, row in zip(("step-0000003.ckpt", "step-0000006.ckpt"), logged):
        metrics = validate_checkpoint(str(trained_run / "checkpoints" / checkpoint), limit_batches=LIMIT)
        assert set(metrics) == set(row) >= set(METRICS)
        assert metrics == row, checkpoint
    assert validate_checkpoint(str(trained_run), limit_batches=LIMIT) == logged[-1]  # the run: its last.ckpt


def test_the_metrics_are_token_averages_of_a_float64_reference(trained_run):
    """val/ce: the mean over batches of each batch's mean token NLL; val/ppl: exp of the NLL of all tokens;
    val/acc, val/top5_acc: the fraction of all tokens whose target is the argmax, among the top 5."""
    model, _ = load_model(trained_run)
    model = model.double()
    hp = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    data = TokenDataModule(**{k: v for k, v in hp.items() if not k.startswith("_")})
    data.setup("validate")
    batch_means, nll_total, n_total, top1, top5 = [], 0.0, 0, 0, 0
    for i, batch in enumerate(data.val_dataloader()):
        if i == LIMIT:
            break
        with torch.no_grad():
            logits = model(batch["input_ids"]).logits  # (B, T, V) float64
        nll_sum, n = 0.0, 0
        for row_logits, row_targets in zip(logits, batch["targets"]):
            for position_logits, target in zip(row_logits, row_targets.tolist()):
                if target == -100:
                    continue
                log_z = math.log(sum(math.exp(x) for x in position_logits.tolist()))
                nll_sum += log_z - position_logits[target].item()
                n += 1
                rank = int((position_logits > position_logits[target]).sum())  # tokens scored higher
                top1, top5 = top1 + (rank == 0), top5 + (rank < 5)
        batch_means.append(nll_sum / n)
        nll_total, n_total = nll_total + nll_sum, n_total + n
    metrics = validate_checkpoint(str(trained_run), limit_batches=LIMIT)
    assert metrics["val/ce"] == pytest.approx(sum(batch_means) / len(batch_means), rel=1e-5)
    assert metrics["val/loss"] == metrics["val/ce"]  # no aux losses in this model
    assert metrics["val/ppl"] == pytest.approx(math.exp(nll_total / n_total), rel=1e-5)
    assert abs(metrics["val/acc"] - top1 / n_total) <= 1 / n_total  # float32 may break a near tie otherwise
    assert abs(metrics["val/top5_acc"] - top5 / n_total) <= 1 / n_total


def test_a_model_that_carries_state_validates_as_in_training(tmp_path, builtin_data, monkeypatch):
    """Transformer-XL on the streams layout: the cache is carried from one validation batch to the next and
    started afresh for each validation, so the second batch sees the first one's keys in both runs."""
    run = tmp_path / "xl"
    streams = ("--data.layout", "streams", "--model.carry_state", "true", "--trainer.accumulate_grad_batches", "2")
    fit(quick_fit_args(run, builtin_data, *streams, "--model.model_config.cache_len", "64", steps=3))
    metrics = validate_checkpoint(str(run), limit_batches=LIMIT)
    assert metrics == val_rows(run)[-1]  # micro-batch 6 = step 3, the last checkpoint
    monkeypatch.setitem(validate.TRAINING_ONLY, "carry_state", False)  # each batch without the one before
    assert validate_checkpoint(str(run), limit_batches=LIMIT)["val/ce"] != metrics["val/ce"]


def test_a_sharded_checkpoint_validates_like_the_file_it_was_made_from(trained_run, tmp_path):
    """A DCP directory as FSDP2 writes it: the weights in shards, the rest (data settings too) in meta.pt."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    sharded = tmp_path / "step-0000006.ckpt"
    save({"state_dict": checkpoint.pop("state_dict")}, storage_writer=FileSystemWriter(str(sharded)), no_dist=True)
    torch.save({k: v for k, v in checkpoint.items() if k != "optimizer_states"}, sharded / "meta.pt")
    with pytest.raises(ValueError, match=f"--checkpoint {sharded} is a sharded checkpoint without its completion"):
        validate_checkpoint(str(sharded), limit_batches=LIMIT)
    (sharded / COMPLETE).touch()
    assert validate_checkpoint(str(sharded), limit_batches=LIMIT) == val_rows(trained_run)[-1]


def bad_checkpoint(kind: str, tmp_path, trained_run):
    path = tmp_path / "bad.ckpt"
    if kind == "missing":
        return tmp_path / "nowhere"
    if kind == "empty":
        path.touch()
    elif kind == "truncated":
        path.write_bytes((trained_run / "checkpoints" / "last.ckpt").read_bytes()[:50_000])
    elif kind == "directory without a checkpoint":
        path = tmp_path / "somewhere"
        path.mkdir()
    elif kind == "run without last.ckpt":
        path = tmp_path / "run"
        (path / "checkpoints").mkdir(parents=True)
    elif kind == "export without data settings":
        checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
        torch.save({k: checkpoint[k] for k in ("state_dict", "hyper_parameters", "model_spec", "tokenizer")}, path)
    return path


@pytest.mark.parametrize(
    "kind, error, says",
    [
        ("missing", FileNotFoundError, "no such file or directory"),
        ("empty", ValueError, "is empty"),
        ("truncated", ValueError, "is truncated or not a checkpoint"),
        ("directory without a checkpoint", FileNotFoundError, "holds no checkpoint"),
        ("run without last.ckpt", FileNotFoundError, "without checkpoints/last.ckpt"),
        ("export without data settings", ValueError, "does not record the data it was trained on"),
    ],
)
def test_a_bad_checkpoint_is_named_in_one_line(kind, error, says, tmp_path, trained_run):
    path = bad_checkpoint(kind, tmp_path, trained_run)
    with pytest.raises(error, match=f"^--checkpoint {re.escape(str(path))}.*{says}") as caught:
        validate_checkpoint(str(path))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("option, value", [("limit_batches", 0), ("batch_size", 0), ("devices", 0)])
def test_a_count_below_one_is_refused(option, value, trained_run):
    with pytest.raises(ValueError, match=f"--{'limit' if option == 'limit_batches' else option} 0 must be >= 1"):
        validate_checkpoint(str(trained_run), **{option: value})


def test_data_of_another_tokenizer_is_refused():
    """The data module refuses a larger vocabulary; one of the same size but another tokenizer is refused here."""
    saved = {"kind": "bytes", "vocab_size": 257, "eot_id": 256}
    other = {"kind": "json", "vocab_size": 257, "eot_id": 0, "sha256": "0" * 64}
    trainer = types.SimpleNamespace(datamodule=types.SimpleNamespace(tokenizer_spec=dict(saved)))
    SameTokenizer(saved, "--checkpoint x").setup(trainer, None, "validate")  # type: ignore[arg-type]
    trainer.datamodule.tokenizer_spec = other
    with pytest.raises(
        ValueError,
        match=r"--checkpoint x was trained with tokenizer bytes \(vocab 257\), but the data "
        r"is tokenized with json",
    ):
        SameTokenizer(saved, "--checkpoint x").setup(trainer, None, "validate")  # type: ignore[arg-type]


def test_format_metrics_is_a_markdown_table_in_logging_order():
    table = format_metrics({"val/loss": 5.541557312011719, "val/acc": 0.001953125})
    assert table.splitlines() == [
        "| metric | value |",
        "| --- | --- |",
        "| val/loss | 5.54156 |",
        "| val/acc | 0.00195312 |",
    ]


@pytest.mark.slow
def test_two_ddp_ranks_on_the_command_line_give_the_numbers_of_one(trained_run):
    """Two CPU ranks (gloo) of 2 rows each read the 4 rows a batch of one process reads (rank r takes rows
    2r, 2r+1 of every global batch), so they reproduce the logged values; rank 0 alone prints the table."""
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    args = ["--mode", "validate", "--checkpoint", str(trained_run), "--limit", str(LIMIT), "--batch_size", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "platform.evaluate", *args, "--devices", "2"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("| metric | value |") == 1, done.stdout
    printed = dict(re.findall(r"^\| (val/\S+) \| (\S+) \|$", done.stdout, re.MULTILINE))
    logged = val_rows(trained_run)[-1]
    assert set(printed) == set(logged)
    for name, value in logged.items():
        assert float(printed[name]) == pytest.approx(value, rel=1e-5), name  # printed to 6 digits
