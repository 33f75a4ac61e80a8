"""Fixtures of the Hugging Face tests: tiny random-weight models of every family, exported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lctrain.models.spec import ModelSpec


@pytest.fixture
def export_random():
    """export_random(spec, out, tokenizer=None) -> the platform model (random weights, eval) exported to `out`."""
    from lctrain.hf import write_hf

    def export(spec: ModelSpec, out: Path, tokenizer: dict | None = None) -> nn.Module:
        torch.manual_seed(0)
        model = spec.build().eval()
        checkpoint = {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "model_spec": spec.to_dict(),
        }
        if tokenizer is not None:
            checkpoint["tokenizer"] = tokenizer
        write_hf(checkpoint, out)
        return model

    return export


@pytest.fixture
def lctrain_site(tmp_path_factory) -> Path:
    """A folder that, on PYTHONPATH, makes `lctrain` importable as an installed package does: a directory
    named lctrain (this checkout's platform/) on the path, with no `platform` trick in the process."""
    site = tmp_path_factory.mktemp("site")
    (site / "lctrain").symlink_to(Path(__file__).resolve().parents[2] / "platform", target_is_directory=True)
    return site
