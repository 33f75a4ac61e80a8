"""`python -m platform.export` writes one file, and never replaces one it was not told to replace."""

from __future__ import annotations

import shutil

import torch

from lctrain.cluster.consolidate import export_cli
from lctrain.entry import run_entry_point


def test_export_refuses_an_existing_file_unless_told_and_never_a_runs_checkpoint(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    out = tmp_path / "model.ckpt"
    assert run_entry_point(export_cli, ["--checkpoint", str(run), "--out", str(out)]) == 0
    first = out.read_bytes()

    assert run_entry_point(export_cli, ["--checkpoint", str(run), "--out", str(out)]) == 2
    assert "exists; pass --overwrite true" in capsys.readouterr().err
    assert out.read_bytes() == first
    assert run_entry_point(export_cli, ["--checkpoint", str(run), "--out", str(out), "--overwrite", "true"]) == 0
    assert (
        torch.load(out, weights_only=True)["global_step"]
        == torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    )

    last = run / "checkpoints" / "last.ckpt"
    before = last.resolve().read_bytes()
    for overwrite in ("false", "true"):
        args = ["--checkpoint", str(run), "--out", str(last), "--overwrite", overwrite]
        assert run_entry_point(export_cli, args) == 2
        assert "never replaces a training checkpoint" in capsys.readouterr().err
    assert last.is_symlink() and last.resolve().read_bytes() == before
    assert "optimizer_states" in torch.load(last, weights_only=True)  # still a full training checkpoint
