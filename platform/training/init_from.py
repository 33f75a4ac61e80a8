"""Starting a new run from trained weights: `--model.init_from PATH` (fine-tuning, continued pre-training).

The source is any place the platform keeps a model: a run directory (its checkpoints/last.ckpt), a
checkpoint file (of `fit` or `export`), a sharded checkpoint directory (FSDP DCP files or DeepSpeed) or a
Hugging Face directory written by `lctrain export --format hf`. Only the weights come from it: the
optimizer, the schedule, the data position and the step start afresh, so the new run may read other data.

Reading a source is split in two, because the command line needs the source's ModelSpec before it parses
(the model's config defaults to the source's) while the weights are needed only once the model is built:
`read_source` reads the description (cheap: a memory-mapped file, `meta.pt` or `config.json`) and
`source_weights` the tensors. `check_fits` says, in one line, why the model a run builds cannot take them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..cluster.consolidate import consolidated
from ..inference.loading import read_checkpoint
from ..models.spec import ModelSpec
from .checkpoints import META, sharded_kind

OPTION = "--model.init_from"
KINDS = "a run directory, a checkpoint file, a sharded checkpoint directory or an exported Hugging Face directory"


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """A model to start from: where it is, what kind of place that is, and which model it holds."""

    path: Path
    """As the user named it (a run directory, say): what messages show."""
    location: Path
    """What is read: the file or directory `path` stands for."""
    kind: str
    """'checkpoint' (one file), 'dcp' (FSDP sharded), 'deepspeed' or 'hf' (an export's directory)."""
    spec: ModelSpec
    tokenizer: dict[str, Any] | None
    """The tokenizer of the data the source was trained on, when the source records it."""
    data: dict[str, Any] | None = None
    """The data module's settings the source was trained with (its `seq_len`, ...), when it records them."""


def source_kind(path: str | Path, option: str = OPTION) -> tuple[Path, str]:
    """The file or directory to read and its kind; a run directory stands for its checkpoints/last.ckpt.
    Errors name `option`, the command-line option that gave the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such file or directory; pass {KINDS}")
    if path.is_file():
        return path, "checkpoint"
    if (path / "checkpoints" / "last.ckpt").exists():
        return (path / "checkpoints" / "last.ckpt").resolve(), "checkpoint"
    if (kind := sharded_kind(path)) is not None:
        return path, kind
    if (path / "config.json").is_file():
        return path, "hf"
    if (path / "checkpoints").is_dir():
        raise FileNotFoundError(f"{option} {path} is a run directory without checkpoints/last.ckpt; name a checkpoint")
    raise FileNotFoundError(f"{option} {path} is a directory that holds no checkpoint or exported model; pass {KINDS}")


def read_source(path: str | Path, option: str = OPTION) -> WeightsSource:
    """The source at `path` without its weights, or a one-line error naming the path (and `option`)."""
    location, kind = source_kind(path, option)
    if kind == "hf":
        from ..hf.reading import read_hf_config, spec_from_hf_config

        return WeightsSource(Path(path), location, kind, spec_from_hf_config(read_hf_config(location)), None)
    if kind == "checkpoint":
        described = read_checkpoint(location, option)  # memory-mapped: the weights are not read here
    elif kind == "dcp":
        described = torch.load(location / META, map_location="cpu", weights_only=True)
    else:  # deepspeed: the partitions hold the description too, so consolidate to read it
        described = consolidated(location)
    spec = ModelSpec.from_checkpoint(described)
    data = described.get("datamodule_hyper_parameters")
    return WeightsSource(Path(path), location, kind, spec, described.get("tokenizer"), data)


def source_weights(source: WeightsSource) -> dict[str, Tensor]:
    """The state_dict of the source's model (the keys of `source.spec.build()`)."""
    if source.kind == "hf":
        from ..hf.reading import read_hf_model

        return read_hf_model(source.location)[1]
    location = source.location
    checkpoint = read_checkpoint(location, OPTION) if source.kind == "checkpoint" else consolidated(location)
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def load_source_weights(model: torch.nn.Module, source: WeightsSource) -> None:
    """Copy the source's weights into `model` (built from a spec that `check_fits` accepted)."""
    model.load_state_dict(source_weights(source))


def check_fits(source: WeightsSource, spec: ModelSpec) -> None:
    """Refuse, in one line naming the setting, a model whose parameters differ in name or shape from the
    source's: another architecture or size, a vocabulary of other data, or a config field that changes a
    shape. Fields that leave every shape alone (dropout, SelfExtend, the attention kernel) may differ."""
    theirs, ours, where = source.spec, spec, source.path
    if ours.arch != theirs.arch:
        raise ValueError(f"model.arch={ours.arch} but {where} holds a {theirs.arch} model; remove model.arch")
    ours_config, theirs_config = ours.config(), theirs.config()
    if ours_config.vocab_size != theirs_config.vocab_size:
        raise ValueError(
            f"the data's vocabulary has {ours_config.vocab_size} tokens (data.vocab_size) but {where} was trained "
            f"on {theirs_config.vocab_size}; prepare the data with the tokenizer the source was trained with"
        )
    if _shapes(ours) == _shapes(theirs):
        return
    differing = [
        f.name
        for f in dataclasses.fields(ours_config)
        if getattr(ours_config, f.name) != getattr(theirs_config, f.name)
    ]
    culprits = [name for name in differing if _changes_shapes(theirs, name, getattr(ours_config, name))]
    if ours.size != theirs.size and (not culprits or any(name not in ours.overrides for name in culprits)):
        raise ValueError(
            f"model.size={ours.size} but {where} holds model.size={theirs.size}; remove model.size "
            "(the model's config comes from the source)"
        )
    shown = culprits or differing
    settings = ", ".join(f"model.model_config.{name}={getattr(ours_config, name)}" for name in shown)
    held = ", ".join(f"{name}={getattr(theirs_config, name)}" for name in shown)
    them = "it" if len(shown) == 1 else "them"
    raise ValueError(f"{settings} but {where} holds {held}; remove {them} to take the source's weights")


def _shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer name with its shape, from a build on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in spec.build().state_dict().items()}


def _changes_shapes(spec: ModelSpec, field: str, value: Any) -> bool:
    """Whether replacing one field of `spec` changes a parameter's name or shape (or makes no valid model)."""
    try:
        return _shapes(spec.replace(**{field: value})) != _shapes(spec)
    except ValueError:
        return True
