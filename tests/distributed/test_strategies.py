"""Strategies through the real command line on 2 CPU ranks (gloo): DDP and FSDP2 train the same numbers,
FSDP2 writes sharded checkpoints and resumes from them exactly, a sharded checkpoint exports to one file
that generation reads, two "nodes" on localhost train together, and CUDA-only strategies stop with one line.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from lctrain.cluster.consolidate import export_checkpoint
from lctrain.inference.generation import generate_text
from lctrain.training.cli import fit, run_entry_point
from tests.helpers import REPO, free_port, quick_fit_args

pytestmark = pytest.mark.slow
STEPS = 4


def fit_process(*args: str, **env: str) -> subprocess.Popen:
    """`python -m platform.fit` in a new process group of its own, with a free rendezvous port."""
    env = {**os.environ, "MASTER_PORT": str(free_port()), **env}
    return subprocess.Popen(
        [sys.executable, "-m", "platform.fit", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def run_fit(*args: str, **env: str) -> str:
    process = fit_process(*args, **env)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-4000:]
    return out


def train_rows(run_dir) -> list[dict]:
    """One row per training step: the step's metrics and its gradient norms, which are logged separately."""
    steps: dict[str, dict] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            steps.setdefault(row["step"], {}).update({k: v for k, v in row.items() if v != ""})
    return [row for row in steps.values() if "train/loss" in row]


def two_rank_args(run_dir, data_dir, *extra: str, steps: int = STEPS) -> list[str]:
    # gradient_clip_val 0.05 sits below these early gradient norms (~0.2-0.5), so clipping acts every step
    return quick_fit_args(
        run_dir, data_dir, "--trainer.devices", "2", "--trainer.gradient_clip_val", "0.05",
        "--checkpoint.every_n_train_steps", "2", *extra, steps=steps,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, builtin_data):
    """The same steps under DDP and under FSDP2 (with activation checkpointing), 2 CPU ranks each."""
    root = tmp_path_factory.mktemp("strategies")
    run_fit(*two_rank_args(root / "ddp", builtin_data, "--parallelism.strategy", "ddp"))
    run_fit(
        *two_rank_args(
            root / "fsdp2", builtin_data, "--parallelism.strategy", "fsdp2",
            "--parallelism.activation_checkpointing", "true",
        )
    )  # fmt: skip
    return root


def test_fsdp2_trains_the_same_losses_and_gradient_norms_as_ddp(runs):
    """Equal losses at step 0 mean equal initial weights (rank 0 builds, FSDP2 shards); equal norms at every
    step mean the DTensor gradient norms, clipping and the sharded optimizer step agree with DDP."""
    ddp, fsdp2 = train_rows(runs / "ddp"), train_rows(runs / "fsdp2")
    assert [r["step"] for r in ddp] == [r["step"] for r in fsdp2] == [str(s) for s in range(STEPS)]
    for a, b in zip(ddp, fsdp2):
        for key in ("train/loss", "train/grad_norm", "grad_norm/blocks.0", "grad_norm/embed"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5), (a["step"], key)


def test_ddp_and_fsdp2_runs_use_two_ranks(runs):
    ddp = torch.load(runs / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ddp["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["world_size"] == 2
    meta = torch.load(runs / "fsdp2" / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)
    assert meta["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["world_size"] == 2


def test_fsdp2_checkpoint_is_a_directory_with_one_shard_per_rank(runs):
    checkpoint = runs / "fsdp2" / "checkpoints" / "step-0000002.ckpt"
    shards = [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert sorted(p.name for p in checkpoint.iterdir()) == [".complete", *shards]  # the marker, written last


def test_fsdp2_resumes_from_a_sharded_checkpoint_at_its_step_with_identical_parameters(runs, builtin_data, tmp_path):
    resumed = tmp_path / "resumed"
    checkpoint = runs / "fsdp2" / "checkpoints" / "step-0000002.ckpt"
    run_fit(
        *two_rank_args(
            resumed, builtin_data, "--parallelism.strategy", "fsdp2", "--parallelism.activation_checkpointing", "true",
            "--ckpt_path", str(checkpoint),
        )
    )  # fmt: skip
    assert [int(r["step"]) for r in train_rows(resumed)] == [2, 3]  # continued at the saved step
    original = export_checkpoint(runs / "fsdp2", tmp_path / "original.ckpt")
    again = export_checkpoint(resumed, tmp_path / "again.ckpt")
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (original, again))
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)  # model, optimizer, schedule and data position all resumed


def test_exported_sharded_checkpoint_is_one_file_that_generation_reads(runs, tmp_path, capsys):
    out = export_checkpoint(runs / "fsdp2" / "checkpoints" / "last.ckpt", tmp_path / "model.ckpt")
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["global_step"] == STEPS and checkpoint["hyper_parameters"]["arch"] == "lswt"
    assert "optimizer_states" not in checkpoint
    text = generate_text(str(out), "The ", max_new_tokens=8, stop_at_end_of_text=False)
    assert text and capsys.readouterr().out.startswith("The ")  # the prompt, then the streamed continuation


def test_generation_names_the_export_command_for_a_sharded_checkpoint(runs, capsys):
    code = run_entry_point(lambda a: generate_text(str(runs / "fsdp2"), "The "), [])
    assert code == 2
    assert "python -m platform.export" in capsys.readouterr().err


@pytest.mark.parametrize("launcher", ["env", "torchrun"])
def test_two_nodes_on_localhost_train_together(launcher, tmp_path, builtin_data):
    """Two "nodes" of one device each form one world of two ranks: plain processes told their NODE_RANK and
    the rendezvous address, or one torchrun per node (README "Multi-node without SLURM")."""
    run, port = tmp_path / "run", str(free_port())
    args = quick_fit_args(run, builtin_data, "--trainer.num_nodes", "2", "--trainer.devices", "1", steps=3)
    if launcher == "env":
        env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        nodes = [fit_process(*args, NODE_RANK=str(rank), **env) for rank in (0, 1)]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
        rendezvous = ["--master_addr=127.0.0.1", f"--master_port={port}"]
        nodes = [
            subprocess.Popen(
                [*torchrun, f"--node_rank={rank}", *rendezvous, "-m", "platform.fit", *args], cwd=REPO,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for rank in (0, 1)
        ]  # fmt: skip
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["world_size"] == 2


@pytest.mark.parametrize(
    "args",
    [
        ["--parallelism.strategy", "fsdp"],
        ["--parallelism.strategy", "deepspeed"],
        ["--trainer.strategy", "fsdp"],
        ["--trainer.strategy", "deepspeed_stage_3_offload"],
    ],
    ids=["fsdp", "deepspeed", "trainer-fsdp", "trainer-deepspeed"],
)
def test_cuda_only_strategies_stop_on_cpu_with_one_line_naming_the_alternative(args, tmp_path, capsys):
    code = run_entry_point(fit, ["--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "needs CUDA GPUs" in err[0] and "parallelism.strategy=fsdp2" in err[0]


def test_a_strategy_set_in_both_places_is_refused(tmp_path, capsys):
    args = ["--parallelism.strategy", "ddp", "--trainer.strategy", "ddp_spawn"]
    code = run_entry_point(fit, ["--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path), *args])
    assert code == 2 and "set only parallelism.strategy" in capsys.readouterr().err
