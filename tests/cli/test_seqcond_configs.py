"""configs/seqcond/: one recipe (the original's, docs/architectures.md) and a size file per size, stacked as
`--config configs/seqcond/recipe.yaml --config configs/seqcond/<size>.yaml`. Every stack is resolved by the
real command line to its size, and its memory plan fits one node of 8 x 80 GB GPUs; the debug config stands
alone."""

from __future__ import annotations

import pytest
import torch
import yaml

from lctrain.models import build_model, config_for, count_parameters
from lctrain.training.cli import PlatformCLI, fit, run_entry_point
from tests.helpers import REPO, resolved_config

DIR = REPO / "configs" / "seqcond"
RECIPE = DIR / "recipe.yaml"
# size -> (parameters with the final norm, micro-batch per GPU, accumulation, strategy): 8 GPUs x batch x
# accumulation x 1024 tokens = 262,144 tokens per optimizer step at every size
SIZES = {
    "small": (133e6, 16, 2, "ddp"),
    "medium": (346e6, 16, 2, "ddp"),
    "large": (372e6, 16, 2, "ddp"),
    "xl": (1.26e9, 8, 4, "fsdp2"),
}


def stack(size: str) -> list[str]:
    return ["--config", str(RECIPE), "--config", str(DIR / f"{size}.yaml")]


def test_there_is_a_recipe_a_size_file_for_every_size_and_the_debug_config():
    assert {c.stem for c in DIR.glob("*.yaml")} == {"recipe", "debug", *SIZES}


@pytest.mark.parametrize("size", list(SIZES))
def test_a_size_file_never_sets_devices_or_nodes(size):
    """The SLURM templates pass the allocation's devices and nodes before a stacked size file's settings."""
    trainer = yaml.safe_load((DIR / f"{size}.yaml").read_text())["trainer"]
    assert not {"devices", "num_nodes", "accelerator"} & set(trainer)


@pytest.mark.parametrize("size", list(SIZES))
def test_each_stack_resolves_to_its_size_with_the_recipe(size):
    params, batch, accumulation, strategy = SIZES[size]
    config = resolved_config(stack(size))
    model = config["model"]
    assert (model["arch"], model["size"]) == ("seqcond", size)
    expected = vars(config_for("seqcond", size))
    resolved = {k: model["model_config"][k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "seqcond_heads")}
    assert resolved == {k: expected[k] for k in resolved}
    assert model["model_config"]["max_seq_len"] == config["data"]["seq_len"] == 1024
    assert (config["data"]["batch_size"], config["trainer"]["accumulate_grad_batches"]) == (batch, accumulation)
    assert config["parallelism"]["strategy"] == strategy
    assert config["trainer"]["default_root_dir"] == f"runs/seqcond-{size}"
    wandb = config["trainer"]["logger"][1]["init_args"]
    assert (wandb["project"], wandb["name"]) == ("lctrain", f"seqcond-{size}")
    assert model["optimizer"]["init_args"]["betas"] == [0.9, 0.999]  # the recipe's, kept under a size's lr
    with torch.device("meta"):
        assert abs(count_parameters(build_model("seqcond", size)) / params - 1) <= 0.01


def test_the_recipe_alone_is_the_small_stack():
    assert resolved_config(["--config", str(RECIPE)]) == resolved_config(stack("small"))


@pytest.mark.parametrize("size", ["small", "xl"])
def test_a_stack_builds_the_module_of_its_size(size, builtin_data, tmp_path):
    args = [*stack(size), "--data.data_dir", str(builtin_data), "--data.source", "builtin",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu"]  # fmt: skip
    module = PlatformCLI(args).model
    assert module.hparams.arch == "seqcond" and module.hparams.size == size


@pytest.mark.parametrize("size", list(SIZES))
def test_the_plan_fits_one_node_of_eight_80gb_gpus(size, capsys):
    code = run_entry_point(fit, [*stack(size), "--dry_run", "--cluster.gpus_per_node", "8"])
    out = capsys.readouterr().out
    assert code == 0 and f"plan: seqcond {size}," in out and "verdict: fits" in out, out
    assert "262,144 tokens per optimizer step" in out
