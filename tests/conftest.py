"""Shared fixtures: a clean environment for every test, tiny models, restored global state. Helpers that
tests import live in tests/helpers.py."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.helpers import free_port, quick_fit_args

# `python -m pytest` from the repository root loads platform/ as `platform`, which makes `lctrain` importable
# from this checkout (platform/__init__.py); so does an installed lctrain.
if importlib.util.find_spec("lctrain") is None:
    raise ImportError("run the tests as `python -m pytest` from the repository root, or `pip install -e .` first")

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


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory):
    """The built-in corpus, prepared once for the whole session."""
    from lctrain.data.datamodule import build_builtin_corpus

    path = tmp_path_factory.mktemp("data") / "builtin-bytes"
    build_builtin_corpus(path)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, builtin_data):
    """A run directory with a few steps of the debug LSWT trained on the built-in corpus."""
    from lctrain.training.cli import fit

    run_dir = tmp_path_factory.mktemp("runs") / "quick"
    fit(quick_fit_args(run_dir, builtin_data))
    return run_dir
