"""configs/lswt/: one recipe (the seed's Dec-2023 one) and a size file per size, stacked as
`--config configs/lswt/recipe.yaml --config configs/lswt/<size>.yaml`. Every stack is resolved by the real
command line to its size, with the XL cache on the streams layout and the seed's schedule (docs/architectures.md
§3.2-3.3, §5 item 22); the debug config stands alone."""

from __future__ import annotations

import pytest
import torch
import yaml

from lctrain.models import build_model, config_for, count_parameters
from lctrain.training.cli import PlatformCLI, fit
from lctrain.training.optimizers import WarmupCosine
from tests.helpers import REPO, resolved_config

DIR = REPO / "configs" / "lswt"
RECIPE = DIR / "recipe.yaml"
# size -> (parameters of the seed's table, the size file's peak learning rate: the seed's for tiny, else GPT-3's)
SIZES = {
    "tiny": (153e6, 6.0e-4),
    "small": (343e6, 3.0e-4),
    "medium": (949e6, 2.5e-4),
    "large": (2.5e9, 1.6e-4),
    "xl": (7.3e9, 1.2e-4),
    "xxl": (13e9, 1.0e-4),
}


def stack(size: str) -> list[str]:
    return ["--config", str(RECIPE), "--config", str(DIR / f"{size}.yaml")]


def test_there_is_a_recipe_a_size_file_for_every_size_and_the_debug_config():
    assert {c.stem for c in DIR.glob("*.yaml")} == {"recipe", "debug", *SIZES}


@pytest.mark.parametrize("size", list(SIZES))
def test_a_size_file_holds_only_what_differs_from_the_recipe(size):
    """The size, its learning rate and run directory; never devices or nodes, which the SLURM templates pass
    before a stacked size file."""
    config = yaml.safe_load((DIR / f"{size}.yaml").read_text())
    assert config == {
        "trainer": {"default_root_dir": f"runs/lswt-{size}"},
        "model": {"size": size, "optimizer": {"init_args": {"lr": SIZES[size][1]}}},
    }


@pytest.mark.parametrize("size", list(SIZES))
def test_each_stack_resolves_to_its_size_with_the_recipe(size):
    config = resolved_config(stack(size))
    model = config["model"]
    assert (model["arch"], model["size"], model["carry_state"]) == ("lswt", size, True)
    expected = vars(config_for("lswt", size, cache_len=2048))
    assert {k: model["model_config"][k] for k in ("d_model", "n_layers", "n_heads", "d_ff", "n_registers")} == {
        k: expected[k] for k in ("d_model", "n_layers", "n_heads", "d_ff", "n_registers")
    }
    assert model["model_config"]["cache_len"] == config["data"]["seq_len"] == 2048  # the cache: one segment
    assert config["data"]["layout"] == "streams" and model["warm_start"]["freeze"] is True
    assert model["aux_loss_weights"] == {"simctg": 1.0}
    assert model["optimizer"]["init_args"]["lr"] == SIZES[size][1]
    assert model["optimizer"]["init_args"]["weight_decay"] == 0.2  # the recipe's, kept under the size's lr
    assert config["trainer"]["default_root_dir"] == f"runs/lswt-{size}"
    assert (config["trainer"]["max_steps"], config["trainer"]["accumulate_grad_batches"]) == (30518, 80)
    with torch.device("meta"):
        params = count_parameters(build_model("lswt", size, cache_len=model["model_config"]["cache_len"]))
    assert abs(params / SIZES[size][0] - 1) <= 0.02


def test_the_recipe_alone_is_the_tiny_stack():
    assert resolved_config(["--config", str(RECIPE)]) == resolved_config(stack("tiny"))


@pytest.mark.parametrize("size", ["tiny", "xxl"])
def test_a_stack_builds_the_module_of_its_size(size, builtin_data, tmp_path):
    # the real data of the large sizes is not here: the built-in corpus stands in
    args = [*stack(size), "--data.data_dir", str(builtin_data), "--data.source", "builtin"]
    cli = PlatformCLI([*args, "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu"])
    module = cli.model
    assert module.hparams.arch == "lswt" and module.hparams.size == size and module.hparams.carry_state
    assert module.model_config.cache_len == cli.datamodule.hparams.seq_len


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
    args = ["--config", str(DIR / "debug.yaml"), "--data.data_dir", str(builtin_data),
            "--trainer.default_root_dir", str(run), "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
            "--trainer.limit_val_batches", "2", "--checkpoint.every_n_train_steps", "2",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    cli = fit(args)
    assert cli.trainer.global_step == 4
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(checkpoint["carried_state"]["ranks"][0]) == {"train:0", "train:1"}
