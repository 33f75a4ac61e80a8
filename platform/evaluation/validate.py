"""The validation metrics of a run's own training config, on one of its checkpoints (`--mode validate`).

Training logs `val/loss`, `val/ce`, `val/ppl`, `val/acc`, `val/top<k>_acc` (and `val/answer_acc`, the aux
losses, when the data and the model have them) every `val_check_interval`; this computes the same numbers
for any checkpoint, on demand: the LanguageModelModule is rebuilt from the checkpoint's hyper-parameters,
the TokenDataModule from its data hyper-parameters (the data directory and batch size may be replaced), and
Lightning's `Trainer.validate` runs the module's own `validation_step`. So the metrics, their DDP sync and
the state carried across validation batches (Transformer-XL caches, recurrent state: started afresh at the
start of every validation, as in training) are those of training by construction. Run on the devices and
with the batch size and batch limit that training used, the values equal the ones in its `csv/metrics.csv`.

The data settings come from the checkpoint, which records them as they were when it was written (the run's
`config.yaml` holds the same `data` section but is rewritten by every resumed attempt); only a checkpoint
that does not record them (a DeepSpeed one) falls back to the run directory's `config.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException

from ..cluster.consolidate import consolidated
from ..data.datamodule import TokenDataModule
from ..data.tokenizer import check_same_tokenizer
from ..inference.loading import read_checkpoint
from ..training.checkpoints import META, damage
from ..training.init_from import source_kind
from ..training.module import LanguageModelModule

OPTION = "--checkpoint"
# Module arguments that only matter for training: the weights come from the checkpoint (not from an
# `init_from` source or a warm-start directory, which may be gone by now), nothing is backpropagated, and
# compiling would take longer than a validation on CPU while changing only the rounding.
TRAINING_ONLY = {"init_from": None, "warm_start": None, "activation_checkpointing": False, "compile": False}


def validate_checkpoint(
    checkpoint: str,
    data_dir: str | None = None,
    limit_batches: int | None = None,
    batch_size: int | None = None,
    accelerator: str = "cpu",
    devices: int = 1,
    precision: str | None = None,
) -> dict[str, float]:
    """Run the training config's validation on a checkpoint and return its metrics, {name: value}.

    Args:
        checkpoint: A run directory (its checkpoints/last.ckpt), a checkpoint file or a sharded checkpoint.
        data_dir: Prepared data to validate on (default: the run's data.data_dir).
        limit_batches: Validate on the first this many batches of each rank (default: the whole split).
        batch_size: Rows per batch on each rank (default: the run's data.batch_size).
        accelerator: cpu, gpu, ... as the Trainer takes it.
        devices: Devices (processes) to validate on; more than one runs DDP, each rank reading its own rows
            (Lightning starts the other ranks by running the command again, so call this from a script or
            a command, not from `python -c` or an interactive session).
        precision: The Trainer's precision (default: the run's trainer.precision from its config.yaml, or 32-true).
    """
    if limit_batches is not None and limit_batches < 1:
        raise ValueError(f"--limit {limit_batches} must be >= 1 validation batch (or unset for the whole split)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be >= 1")
    if devices < 1:
        raise ValueError(f"--devices {devices} must be >= 1")
    saved, run_config = read_training_checkpoint(checkpoint)
    module = module_from(saved, checkpoint)
    data_args = data_settings(saved, run_config, checkpoint)
    if data_dir is not None:
        data_args["data_dir"] = data_dir
    if batch_size is not None:
        data_args["batch_size"] = batch_size
    datamodule = TokenDataModule(**data_args)
    if precision is None:
        precision = (run_config.get("trainer") or {}).get("precision") or "32-true"
    try:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=limit_batches,
            callbacks=[SameTokenizer(saved.get("tokenizer"), f"{OPTION} {checkpoint}")],
        )
    except (MisconfigurationException, ValueError) as e:
        raise ValueError(
            f"{OPTION} {checkpoint}: {_first_line(e)}; check --accelerator, --devices and the precision"
        ) from None
    (results,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {name: float(value) for name, value in results.items()}


def module_from(checkpoint: dict[str, Any], path: str | Path) -> LanguageModelModule:
    """The LanguageModelModule of the checkpoint's settings, with its weights: the whole model, built before
    the Trainer exists (its `configure_model` then keeps it), which every DDP rank holds as in training."""
    try:
        module = LanguageModelModule(**{**init_args(checkpoint["hyper_parameters"]), **TRAINING_ONLY})
    except TypeError as e:  # a setting this version of the module does not take
        raise ValueError(f"{OPTION} {path}: its module settings do not fit this version ({e})") from None
    module.configure_model()
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{OPTION} {path}: its weights do not fit the model it names ({_first_line(e)})") from None
    return module


def format_metrics(metrics: dict[str, float]) -> str:
    """The metrics as a Markdown table (metric | value), in the order they were logged."""
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {value:.6g} |" for name, value in metrics.items()]
    return "\n".join(lines)


def read_training_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint at `path` with its weights under `state_dict` (a sharded one consolidated), and the
    run's config.yaml as a dict ({} where there is none), or a one-line error naming `--checkpoint`."""
    location, kind = source_kind(path, OPTION)
    if kind == "checkpoint":
        checkpoint = read_checkpoint(location, OPTION)
    elif kind == "hf":
        checkpoint = {}  # an export holds the model only, not the module's settings
    else:
        reason = damage(location) if kind == "dcp" else None
        if reason is not None:
            raise ValueError(f"{OPTION} {path} is {reason}; pass another checkpoint")
        checkpoint = consolidated(location)
        if kind == "dcp":  # Lightning's meta.pt keeps what consolidation leaves out (the data settings)
            meta = torch.load(location / META, map_location="cpu", weights_only=True)
            checkpoint = {**meta, **checkpoint}
    if "hyper_parameters" not in checkpoint:
        raise ValueError(
            f"{OPTION} {path} does not record the module's settings (hyper_parameters); "
            "pass a checkpoint of `lctrain fit`"
        )
    return checkpoint, run_config_of(location)


def run_config_of(location: Path) -> dict[str, Any]:
    """The config.yaml of the run a checkpoint belongs to (the run directory holds checkpoints/), or {}."""
    run_dir = location.parent.parent if location.parent.name == "checkpoints" else location
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    loaded = yaml.safe_load(config.read_text())
    return loaded if isinstance(loaded, dict) else {}


def data_settings(checkpoint: dict[str, Any], run_config: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The TokenDataModule arguments the checkpoint was trained with: its own record, else the run's config."""
    settings = checkpoint.get("datamodule_hyper_parameters") or run_config.get("data")
    if not settings:
        raise ValueError(
            f"{OPTION} {path} does not record the data it was trained on (an export?); pass the run directory "
            "or a checkpoint from its checkpoints/ folder"
        )
    return init_args(settings)


def init_args(hyper_parameters: dict[str, Any]) -> dict[str, Any]:
    """A class's init arguments from its saved hyper-parameters, without Lightning's bookkeeping
    (`_instantiator`, `_class_path`)."""
    return {k: v for k, v in hyper_parameters.items() if not k.startswith("_")}


class SameTokenizer(L.Callback):
    """Refuses data of another tokenizer than the checkpoint's, once the data is open: its ids would mean
    other text (a larger vocabulary is already refused by the data module)."""

    def __init__(self, tokenizer: dict[str, Any] | None, what: str):
        self.tokenizer, self.what = tokenizer, what

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_same_tokenizer(self.tokenizer, getattr(trainer.datamodule, "tokenizer_spec", None), self.what)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
