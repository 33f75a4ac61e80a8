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
