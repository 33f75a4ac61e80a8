"""Loading a trained model and its tokenizer from a checkpoint or a run directory."""

from __future__ import annotations

import dataclasses
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.tokenizer import Tokenizer, load_tokenizer
from ..models.layers.self_extend import as_self_extend_config
from ..models.spec import ModelSpec


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its checkpoints/last.ckpt)."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoints" / "last.ckpt").exists():
        path = path / "checkpoints" / "last.ckpt"
    if path.is_dir() and (path / "meta.pt").is_file():
        raise FileNotFoundError(
            f"--checkpoint {path} is a sharded checkpoint; make one file with "
            f"`python -m platform.export --checkpoint {path} --out model.ckpt` and pass that"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"--checkpoint {path} is neither a checkpoint file nor a run directory with checkpoints/last.ckpt"
        )
    return path


def read_checkpoint(path: str | Path, option: str = "--checkpoint") -> dict[str, Any]:
    """The contents of a checkpoint file written by fit or export (memory-mapped: tensors are read when used),
    or a one-line error naming the file and `option` when it is damaged or not one of ours."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"{option} {path} is empty (a save that did not finish?); pass another checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:  # what torch.save writes; a cut-off file has no central directory
            archive.namelist()
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ValueError(f"{option} {path} is truncated or not a checkpoint ({reason}); pass another file") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{option} {path} is not a checkpoint of `lctrain fit` or `lctrain export` (no state_dict)")
    try:
        ModelSpec.from_checkpoint(checkpoint)
    except KeyError:
        raise ValueError(
            f"{option} {path} does not say which model it holds (no model_spec); pass a checkpoint "
            "of `lctrain fit` or `lctrain export`"
        ) from None
    return checkpoint


def with_trained_context(spec: ModelSpec, trained_len: int | None) -> ModelSpec:
    """`spec` whose SelfExtend config, if it has one without `pretrained_len`, gets the trained context: the
    data's seq_len plus any XL cache, so SelfExtend can warn when an input grows past what it covers."""
    self_extend = as_self_extend_config(spec.overrides.get("self_extend"))
    if self_extend is None or self_extend.pretrained_len is not None or trained_len is None:
        return spec
    context = trained_len + (getattr(spec.config(), "cache_len", 0) or 0)
    return spec.replace(self_extend=dataclasses.replace(self_extend, pretrained_len=context))


def load_model(path: str | Path, *, device: str = "cpu", **overrides: Any) -> tuple[nn.Module, Tokenizer]:
    """Rebuild the model a checkpoint was trained with, load its weights, and its tokenizer.

    `overrides` replace model config fields with inference-only options, e.g. `self_extend`; a SelfExtend
    config without `pretrained_len` gets the trained context (the data's seq_len plus any XL cache), so
    it can warn when a prompt grows past what SelfExtend covers.
    """
    ckpt = read_checkpoint(checkpoint_file(path))
    spec = ModelSpec.from_checkpoint(ckpt).replace(**overrides)
    spec = with_trained_context(spec, (ckpt.get("datamodule_hyper_parameters") or {}).get("seq_len"))
    model = spec.build()
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(
            f"--checkpoint {path}: its weights do not fit the model it names ({str(e).splitlines()[1:2]})"
        ) from None
    tokenizer = load_tokenizer(ckpt.get("tokenizer") or {"kind": "bytes"})
    return model.to(device).eval(), tokenizer
