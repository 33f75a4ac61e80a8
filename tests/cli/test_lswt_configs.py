"""configs/lswt/*.yaml: every size's config is read by the CLI, names its size, carries the XL cache on the
streams layout, and follows the seed's schedule (ARCHITECTURES.md §3.2-3.3, §5 item 22)."""

from __future__ import annotations

import pytest
import torch

from platform.models import build_model, count_parameters
from platform.training.cli import PlatformCLI, fit
from platform.training.optimizers import WarmupCosine
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs" / "lswt").glob("*.yaml"))


def test_there_is_a_config_for_every_size():
    assert {c.stem for c in CONFIGS} == {"debug", "tiny", "small", "medium", "large", "xl", "xxl"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_is_read_by_the_cli_and_builds_its_size(config, builtin_data, tmp_path):
    # the real data of the large sizes is not here: the built-in corpus stands in
    assert "layout: streams" in config.read_text()
    args = ["--config", str(config), "--data.data_dir", str(builtin_data), "--data.source", "builtin"]
    cli = PlatformCLI([*args, "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu"])
    module = cli.model
    assert module.hparams.arch == "lswt" and module.hparams.size == config.stem
    assert module.hparams.carry_state
    assert module.model_config.cache_len == cli.datamodule.hparams.seq_len
    overrides = dict(cli.config.model.model_config)
    with torch.device("meta"):
        model = build_model("lswt", config.stem, **overrides)
    assert count_parameters(model) > 0


def test_the_seed_schedule_is_zero_at_step_0_full_at_2000_and_a_tenth_at_30e9_tokens():
    """§5.22: lr_max at step 2000; 0.1 x lr_max at 30e9 tokens = 30518 steps of 480 x 2048 tokens."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=6e-4)
    total = round(30e9 / (480 * 2048))
    schedule = WarmupCosine(optimizer, warmup_steps=2000, total_steps=total, min_lr_ratio=0.1)
    assert total == 30518
    assert schedule.factor(0) == 0.0
    assert schedule.factor(2000) == pytest.approx(1.0)
    assert schedule.factor(total) == pytest.approx(0.1)


@pytest.mark.slow
def test_the_debug_config_trains_with_the_xl_cache_on_streams(builtin_data, tmp_path):
    run = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "lswt" / "debug.yaml"), "--data.data_dir", str(builtin_data),
            "--trainer.default_root_dir", str(run), "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
            "--trainer.limit_val_batches", "2", "--checkpoint.every_n_train_steps", "2",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    cli = fit(args)
    assert cli.trainer.global_step == 4
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(checkpoint["carried_state"]["ranks"][0]) == {"train:0", "train:1"}
