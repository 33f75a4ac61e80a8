"""configs/seqcond/*.yaml: every size has a config that the CLI reads, that builds its named size, and
whose memory plan fits one node of 8 x 80 GB GPUs (ARCHITECTURES.md §1.4)."""

from __future__ import annotations

import pytest

from platform.training.cli import PlatformCLI, fit, run_entry_point
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs" / "seqcond").glob("*.yaml"))
CLUSTER = [c for c in CONFIGS if c.stem != "debug"]


def test_there_is_a_config_for_every_size():
    assert {c.stem for c in CONFIGS} == {"debug", "small", "medium", "large", "xlarge"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_is_read_by_the_cli_and_names_its_size(config, builtin_data, tmp_path):
    args = ["--config", str(config), "--data.data_dir", str(builtin_data), "--data.source", "builtin",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu"]  # fmt: skip
    module = PlatformCLI(args).model
    assert module.hparams.arch == "seqcond" and module.hparams.size == config.stem


@pytest.mark.parametrize("config", CLUSTER, ids=lambda c: c.stem)
def test_the_plan_fits_one_node_of_eight_80gb_gpus(config, capsys):
    code = run_entry_point(fit, ["--config", str(config), "--dry_run", "--cluster.gpus_per_node", "8"])
    out = capsys.readouterr().out
    assert code == 0 and f"plan: seqcond {config.stem}," in out and "verdict: fits" in out, out
    assert "262,144 tokens per optimizer step" in out
