"""One checkpoint file from a sharded one, for generation, evaluation and export (docs/design.md).

Sharded checkpoints are directories: FSDP2 and FSDP1 with `parallelism.state_dict: sharded` write DCP
files (`.metadata`, `__<rank>_0.distcp`) plus Lightning's `meta.pt`; DeepSpeed writes `checkpoint/` with
per-rank ZeRO partitions. The single file holds the model weights under `state_dict` (keys `model.*`, as
every Lightning checkpoint of the LanguageModelModule) and what rebuilding the model needs (hyper-parameters,
tokenizer, step), so `python -m platform.generate` and `lctrain.inference.load_model` read it like any
other checkpoint. Optimizer states are left out: training resumes from the sharded directory itself. The
weights are read into a model built from the checkpoint's ModelSpec, so only they are loaded (XL: 29 GB of host
memory in fp32, not the 87 GB that weights and Adam states take together). `export --format hf` writes the
same weights as a Hugging Face model directory instead (hf/export.py).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from ..inference.loading import read_checkpoint
from ..models.spec import ModelSpec
from ..training.checkpoints import META, sharded_kind

KEPT = (
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "hyper_parameters",
    "datamodule_hyper_parameters",
    "model_spec",
    "tokenizer",
)


def checkpoint_kind(path: str | Path) -> str:
    """'file', 'dcp' (FSDP2/FSDP1 sharded) or 'deepspeed'."""
    path = Path(path)
    if path.is_file():
        return "file"
    if (kind := sharded_kind(path)) is not None:
        return kind
    raise FileNotFoundError(
        f"--checkpoint {path} is neither a checkpoint file nor a sharded checkpoint directory "
        f"(DCP files with {META}, or a DeepSpeed checkpoint)"
    )


def consolidated(path: str | Path) -> dict[str, Any]:
    """The weights-only, single-file form of the checkpoint at `path`: a file, a sharded directory, or a run
    directory (its checkpoints/last.ckpt)."""
    path = Path(path)
    if (path / "checkpoints" / "last.ckpt").exists():
        path = (path / "checkpoints" / "last.ckpt").resolve()
    kind = checkpoint_kind(path)
    if kind == "file":
        checkpoint = read_checkpoint(path)
    elif kind == "dcp":
        checkpoint = _from_dcp(path)
    else:
        checkpoint = _from_deepspeed(path)
    return {"state_dict": checkpoint["state_dict"], **{k: checkpoint[k] for k in KEPT if k in checkpoint}}


def _from_dcp(path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader, load

    meta = torch.load(path / META, map_location="cpu", weights_only=True)
    reader = FileSystemReader(str(path))
    # FSDP2 (ModelParallelStrategy) stores the module's weights under "state_dict", FSDP1 under "model".
    stored = reader.read_metadata().state_dict_metadata
    section = "state_dict" if any(k.startswith("state_dict.") for k in stored) else "model"
    weights = {f"model.{k}": v for k, v in ModelSpec.from_checkpoint(meta).build().state_dict().items()}
    state = {section: weights}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load(state, storage_reader=reader, no_dist=True)  # fills `weights` in place, reading nothing else
    return {**meta, "state_dict": state[section]}


def _from_deepspeed(path: Path) -> dict[str, Any]:
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as e:
        raise ImportError(
            f"{path} is a DeepSpeed checkpoint; consolidating it needs the deepspeed extra "
            "(`pip install 'deepspeed>=0.16,<1'`)"
        ) from e
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fp32.ckpt"
        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
        return torch.load(out, map_location="cpu", weights_only=False)


def export_checkpoint(source: str | Path, out: str | Path) -> Path:
    """Write the consolidated checkpoint of `source` to `out` (a new file next to it, then renamed, so a
    failure leaves no half-written file)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = consolidated(source)
    tmp = out.with_name(out.name + ".tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_cli(args: list[str] | None = None) -> None:
    from jsonargparse import CLI

    CLI(export, args=args, as_positional=False, exit_on_error=False)


def export(
    checkpoint: str, out: str, overwrite: bool = False, format: Literal["lightning", "hf"] = "lightning"
) -> None:
    """Write one checkpoint file (model weights, hyper-parameters, tokenizer) from any checkpoint, or a
    Hugging Face model directory.

    Args:
        checkpoint: A sharded checkpoint directory (FSDP2, FSDP, DeepSpeed), a checkpoint file, or a run
            directory (its checkpoints/last.ckpt).
        out: The file to write (e.g. model.ckpt); `python -m platform.generate --checkpoint <out>` reads it.
            With --format hf, the directory to write.
        overwrite: Replace `out` when it exists (never a file in a run's checkpoints/ folder, and with
            --format hf only an earlier Hugging Face export).
        format: lightning (one checkpoint file) or hf (a Hugging Face directory: config.json, safetensors
            weights, tokenizer files; `AutoModelForCausalLM.from_pretrained(out)` loads it).
    """
    if format == "hf":
        from ..hf.export import check_hf_out, write_hf

        check_hf_out(out, overwrite)
        write_hf(consolidated(checkpoint), out)
        return
    if format != "lightning":
        raise ValueError(f"--format {format}: choose lightning (one .ckpt file) or hf (a Hugging Face directory)")
    if not out.endswith(".ckpt"):
        raise ValueError(f"--out {out}: name a .ckpt file; it is written as one Lightning checkpoint")
    path = Path(out)
    if path.is_dir() or out.endswith("/"):
        raise ValueError(f"--out {out} is a directory; name a .ckpt file")
    if any(parent.is_file() for parent in path.parents):
        raise ValueError(f"--out {out}: {next(p for p in path.parents if p.is_file())} is a file, not a directory")
    if path.exists() or path.is_symlink():
        if path.parent.name == "checkpoints":
            raise ValueError(
                f"--out {out} is in a run's checkpoints/ folder; export never replaces a training checkpoint: "
                "name a file elsewhere"
            )
        if not overwrite:
            raise ValueError(f"--out {out} exists; pass --overwrite true to replace it, or name another file")
    export_checkpoint(checkpoint, out)
