"""Shared fixtures: a clean environment for every test, tiny models, restored global state."""

from __future__ import annotations

import os
import socket

import pytest
import torch

# Nothing in the test suite may reach a hub or the network.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Variables that make Lightning believe it runs inside a cluster or a launched process group.
_CLUSTER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PL_")
_CLUSTER_NAMES = (
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith(_CLUSTER_PREFIXES) or name in _CLUSTER_NAMES:
            monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture(autouse=True)
def restore_torch_state():
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory):
    """The built-in corpus, prepared once for the whole session."""
    from platform.data.datamodule import build_builtin_corpus

    path = tmp_path_factory.mktemp("data") / "builtin-bytes"
    build_builtin_corpus(path)
    return path


def quick_fit_args(run_dir, data_dir, *extra: str, steps: int = 6, config: str = "configs/tiny.yaml") -> list[str]:
    """Arguments that turn a config (the default job unless given) into a run of a few seconds."""
    return [
        "--config", str(REPO / config),
        "--trainer.default_root_dir", str(run_dir),
        "--data.data_dir", str(data_dir),
        "--data.seq_len", "64",
        "--data.batch_size", "4",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--checkpoint.every_n_train_steps", "3",
        "--grad_norm.every_n_steps", "1",
        "--trainer.log_every_n_steps", "1",
        *extra,
    ]  # fmt: skip


REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, builtin_data):
    """A run directory with a few steps of the debug LSWT trained on the built-in corpus."""
    from platform.training.cli import fit

    run_dir = tmp_path_factory.mktemp("runs") / "quick"
    fit(quick_fit_args(run_dir, builtin_data))
    return run_dir
