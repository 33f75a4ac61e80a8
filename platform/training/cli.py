"""The command line of `python -m platform.fit`: LightningCLI without subcommands, plus our options.

LightningCLI with `run=False` reads `--config` files and dotted overrides into the Trainer, the
LanguageModelModule and the TokenDataModule; unknown keys are rejected. On top of it:
- `--ckpt_path` takes `last`, `auto` (the newest checkpoint of any kind in the run directory, or a
  fresh start when there is none: what a requeued job wants) or a path;
- always-on callbacks with their own sections: `checkpoint` (ModelCheckpoint, plus the final step), `grad_norm`,
  `lr_monitor`, `expert_usage` (tokens per expert of MoE models; nothing for the others);
- files default to the run directory `trainer.default_root_dir`: checkpoints in `<root>/checkpoints`,
  logs in `<root>`, the resolved config in `<root>/config.yaml` (overwritten on resume);
- the vocabulary size is read from the data and given to the model (`link_arguments`).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from platform.data.datamodule import TokenDataModule
from platform.training.callbacks import ExpertUsageMonitor, GradNormMonitor, PeriodicCheckpoint
from platform.training.module import LanguageModelModule

DEFAULT_ROOT = "runs/default"
PLATFORM_DIR = Path(__file__).resolve().parent.parent


class SaveConfigToRunDir(SaveConfigCallback):
    """Writes the resolved config to `<default_root_dir>/config.yaml` (replacing the one of an earlier
    attempt of the same run), rather than into the first logger's versioned directory."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = Path(trainer.default_root_dir) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_unset=False, overwrite=True, multifile=self.multifile)


class PlatformCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs: Any):
        super().__init__(
            LanguageModelModule,
            TokenDataModule,
            run=False,
            args=args,
            save_config_callback=SaveConfigToRunDir,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            parser_kwargs={
                "exit_on_error": False,
                "allow_abbrev": False,
                "description": "Train a language model. " + __doc__.split("\n")[0],
            },
            trainer_defaults={
                "default_root_dir": DEFAULT_ROOT,
                "logger": {"class_path": "platform.training.loggers.CSVLogger"},
            },
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Resume from 'last', 'auto' (newest checkpoint in the run directory, or start fresh) or a path.",
        )
        parser.add_lightning_class_args(PeriodicCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.every_n_train_steps": 500,
                "checkpoint.save_last": "link",
                "checkpoint.monitor": "step",  # with mode "max": keep the newest save_top_k checkpoints
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 3,
                "checkpoint.filename": "step-{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(GradNormMonitor, "grad_norm")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(ExpertUsageMonitor, "expert_usage")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Point checkpoints and loggers at the run directory unless they were given a place."""
        config = self.config
        root = config.trainer.default_root_dir or DEFAULT_ROOT
        config.trainer.default_root_dir = root
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path(root) / "checkpoints")
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = logger.get("init_args", {}) if isinstance(logger, Namespace) else {}
            if "save_dir" in init_args and init_args.save_dir is None:
                init_args.save_dir = root


def resolve_ckpt_path(value: str | None, checkpoint_dir: str | Path, root: str | Path) -> str | None:
    """'last' -> <checkpoint_dir>/last.ckpt (must exist); 'auto' -> the newest of the periodic, last and
    SLURM-requeue (hpc_ckpt_*) checkpoints, or None for a fresh start; anything else must exist."""
    if value is None:
        return None
    checkpoint_dir = Path(checkpoint_dir)
    if value == "last":
        last = checkpoint_dir / "last.ckpt"
        if not last.exists():
            raise FileNotFoundError(
                f"--ckpt_path last: {last} does not exist; start without --ckpt_path or use --ckpt_path auto"
            )
        return str(last)
    if value == "auto":
        candidates = [*checkpoint_dir.glob("*.ckpt"), *Path(root).glob("hpc_ckpt_*.ckpt")]
        candidates = [c for c in candidates if c.exists()]  # a dangling last.ckpt link does not count
        return str(max(candidates, key=lambda c: c.stat().st_mtime)) if candidates else None
    if not Path(value).exists():
        raise FileNotFoundError(f"--ckpt_path {value} does not exist")
    return value


def fit(args: list[str] | None = None) -> PlatformCLI:
    cli = PlatformCLI(args)
    ckpt_path = resolve_ckpt_path(
        cli.config.ckpt_path, cli.config.checkpoint.dirpath, cli.config.trainer.default_root_dir
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


USER_ERRORS = (ValueError, FileNotFoundError, ImportError, KeyError)


def raised_by_platform(exc: BaseException) -> bool:
    """True when the innermost frame of the traceback is the platform's own code: a deliberate,
    one-line error about the user's input rather than a bug somewhere below."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PLATFORM_DIR)


def run_entry_point(main, args: list[str] | None = None) -> int:
    """Run an entry point; user errors become one line on stderr and exit code 2."""
    try:
        main(args)
    except ArgumentError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if not raised_by_platform(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
