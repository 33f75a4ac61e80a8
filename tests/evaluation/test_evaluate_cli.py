"""The evaluate command end to end: every kind of model source scores the same, two processes give the numbers
of one, and the validate mode goes through the same entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from lctrain.cluster.consolidate import export_cli
from lctrain.entry import run_entry_point
from lctrain.evaluation.cli import DataOptions, PerplexityOptions, evaluate
from tests.helpers import REPO

SWEEP = ["--perplexity.lengths", "[32, 64, 128]", "--perplexity.score_len", "32", "--limit", "256", "--threads", "1"]


def numbers(evaluation) -> list:
    """Every measured number of an Evaluation (or of its results.json), model by model."""
    models = evaluation["models"] if isinstance(evaluation, dict) else [vars(m) for m in evaluation.models]
    out = []
    for m in models:
        ppl, pos = m["perplexity"], m["position"]
        ppl = ppl if isinstance(ppl, dict) else vars(ppl)
        pos = pos if isinstance(pos, dict) else vars(pos)
        out.append((m["label"], ppl["nll"], pos["nll"]))
    return out


def test_a_run_its_checkpoint_and_its_hugging_face_export_score_the_same(trained_run, builtin_data, tmp_path):
    hf_dir = tmp_path / "hf"
    assert run_entry_point(export_cli, ["--checkpoint", str(trained_run), "--out", str(hf_dir), "--format", "hf"]) == 0
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    models = [str(trained_run), {"path": str(checkpoint), "label": "file"}, {"path": str(hf_dir), "label": "hf"}]
    data, sweep = DataOptions(str(builtin_data)), PerplexityOptions(lengths=[32, 64], score_len=32)
    result = evaluate(models=models, data=data, perplexity=sweep, limit=256)
    run, file, hf = numbers(result)
    assert run[1] == file[1] == hf[1] and run[2] == file[2] == hf[2]
    assert result.models[0].trained_len == 64 and result.models[2].trained_len is None  # an export has no data
    assert result.settings["windows"] == 8 and result.models[0].n_params > 0


def test_two_processes_give_the_numbers_of_one(trained_run, builtin_data, tmp_path):
    """`--devices 2` starts a second rank (Lightning Fabric, gloo); windows are split, gathered in order."""
    args = ["--models+", str(trained_run), "--data.data_dir", str(builtin_data), *SWEEP]
    args += ["--retrieval.tasks", "[passkey]", "--retrieval.lengths", "[200]", "--retrieval.examples", "3"]
    reports = {}
    for devices in (1, 2):
        out = tmp_path / f"devices-{devices}"
        process = subprocess.run(
            [sys.executable, "-m", "platform.evaluate", *args, "--devices", str(devices), "--output", str(out)],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert process.returncode == 0, process.stderr[-3000:]
        reports[devices] = json.loads((out / "results.json").read_text())
        assert (out / "report.md").is_file() and (out / "perplexity.png").stat().st_size > 0
        assert "# Evaluation" in process.stdout  # the report is printed once, by rank 0
        assert process.stdout.count("# Evaluation") == 1
    one, two = reports[1], reports[2]
    assert two["settings"]["world_size"] == 2 and one["settings"]["world_size"] == 1
    assert numbers(one) == numbers(two)  # bit for bit
    grid = lambda r: r["models"][0]["retrieval"]["passkey"]["accuracy"]  # noqa: E731
    assert grid(one) == grid(two)


def test_validate_mode_runs_from_the_same_command(trained_run, capsys):
    metrics = evaluate(mode="validate", checkpoint=str(trained_run), limit=2)
    assert metrics["val/loss"] > 0 and "val/ppl" in metrics
    assert "val/loss" in capsys.readouterr().out
