"""The data through `python -m platform.fit`: a synthetic task logs its answer accuracy, the streams layout
drives a model that carries its state, and a resume on data of another tokenizer is refused."""

from __future__ import annotations

import csv

import pytest

from lctrain.data.prepare import prepare
from lctrain.data.tasks import CopyTask
from lctrain.training.cli import fit
from tests.helpers import quick_fit_args


def metric_keys(run_dir) -> set[str]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {key for row in csv.DictReader(f) for key, value in row.items() if value}


def test_a_synthetic_task_logs_answer_accuracy_in_training_and_validation(tmp_path):
    prepare(
        str(tmp_path / "copy"), task=CopyTask(length=10, vocab=8, train_examples=64, val_examples=8), progress=False
    )
    run = tmp_path / "run"
    fit(quick_fit_args(run, tmp_path / "copy", "--data.layout", "documents", "--data.seq_len", "21", steps=3))
    assert {"train/answer_acc", "val/answer_acc"} <= metric_keys(run)


def test_the_streams_layout_trains_a_model_that_carries_state_and_resume_refuses_another_tokenizer(
    tmp_path, builtin_data
):
    run = tmp_path / "run"
    streams = ("--data.layout", "streams", "--model.carry_state", "true", "--trainer.accumulate_grad_batches", "2")
    cli = fit(quick_fit_args(run, builtin_data, *streams, steps=3))
    assert cli.trainer.global_step == 3 and set(cli.model._carried) == {"train:0", "train:1", "val:0"}
    prepare(str(tmp_path / "bpe"), builtin=True, tokenizer="bpe", bpe_vocab_size=300, progress=False)
    with pytest.raises(
        ValueError,
        match="the checkpoint was trained with tokenizer bytes \\(vocab 257\\), but the "
        "data is tokenized with json \\(vocab 300, sha256 [0-9a-f]{12}\\)",
    ):
        fit(quick_fit_args(run, tmp_path / "bpe", *streams, "--ckpt_path", "last", steps=4))
