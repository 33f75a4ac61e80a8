"""The command line of `python -m platform.fit`: LightningCLI without subcommands, plus our options.

LightningCLI with `run=False` reads `--config` files and dotted overrides into the Trainer, the
LanguageModelModule and the TokenDataModule; unknown keys are rejected. On top of it:
- `--ckpt_path` takes `last`, `auto` (the newest checkpoint of any kind in the run directory that loads, or a
  fresh start when there is none: what a requeued job wants) or a path (training/checkpoints.py); one run
  per directory: a lock while it runs, and `--overwrite_run` to start afresh over checkpoints (run_directory.py);
- always-on callbacks with their own sections: `checkpoint` (ModelCheckpoint, plus the final step), `nan_guard`
  (skips steps with NaN/inf gradients, stops after a few in a row), `grad_norm`,
  `lr_monitor`, `expert_usage` (tokens per expert of MoE models; nothing for the others);
- files default to the run directory `trainer.default_root_dir`: checkpoints in `<root>/checkpoints`,
  logs in `<root>`, the resolved config in `<root>/config.yaml` (overwritten on resume);
- the model's config is typed: `model.model_config` takes the fields of the chosen architecture's config
  (found in the `--config` files and `--model.arch`/`--model.size` before parsing), defaulting to the named
  size's values, so `--help` documents them, `--print_config` shows them and a wrong field or type is named;
- the vocabulary size is read from the data and given to the model (`link_arguments`);
- `parallelism` picks the strategy (cluster/strategies.py), `--dry_run` with `cluster` prints the
  memory plan instead of training (cluster/planner.py), and SIGUSR1 saves and requeues
  (cluster/requeue.py).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, Namespace, set_parsing_settings
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from ..cluster.planner import ClusterShape, check_fits, format_plan, plan_from_config
from ..cluster.requeue import RequeueOnSignal
from ..cluster.strategies import Parallelism, build_strategy, check_supported
from ..data.datamodule import TokenDataModule
from ..entry import run_entry_point  # noqa: F401  (the entry points import it from here)
from ..models.registry import config_for, family
from .callbacks import ExpertUsageMonitor, GradNormMonitor, NonFiniteGuard, PeriodicCheckpoint
from .checkpoints import remove_stale_temporaries, resolve_ckpt_path
from .module import LanguageModelModule
from .run_directory import RunLock, check_fresh_start

DEFAULT_ROOT = "runs/default"
log = logging.getLogger(__name__)

# The model configs document their fields with attribute docstrings; `--help` shows them.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class SaveConfigToRunDir(SaveConfigCallback):
    """Writes the resolved config to `<default_root_dir>/config.yaml` (replacing the one of an earlier
    attempt of the same run), rather than into the first logger's versioned directory."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = Path(trainer.default_root_dir) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_unset=False, overwrite=True, multifile=self.multifile)


class PlatformCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs: Any):
        self.arch, self.size = chosen_model(sys.argv[1:] if args is None else args)
        self.config_type = family(self.arch).config  # an unknown arch is named here, before parsing
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
                "logger": {"class_path": "lctrain.training.loggers.CSVLogger"},
            },
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Lightning's trainer and data sections; the model's section with `model_config` typed as the chosen
        architecture's config dataclass (its fields documented in `--help`), defaulting to the named size."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_class_arguments(
            self._model_class, "model", fail_untyped=False, instantiate=True, sub_configs=True, skip={"model_config"}
        )
        parser.add_dataclass_arguments(
            self.config_type,
            "model.model_config",
            default=config_for(self.arch, self.size),
            help=f"{self.config_type.__name__}: the fields of model.arch={self.arch}, with model.size={self.size}'s "
            "values as defaults (another arch or size lists its own: `--model.arch ... --help`)",
        )
        parser.add_lightning_class_args(self._datamodule_class, "data")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            if "model.model_config" not in str(e):
                raise
            raise ArgumentError(
                None,
                f"{e} (model.model_config takes the fields of {self.config_type.__name__}, for model.arch="
                f"{self.arch}; `--help` lists them)",
            ) from e

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Resume from 'last', 'auto' (newest checkpoint in the run directory, or start fresh) or a path.",
        )
        parser.add_argument(
            "--overwrite_run",
            type=bool,
            default=False,
            help="Start afresh in a run directory that holds an earlier run's checkpoints, removing them first "
            "(without it such a start is refused: resume with --ckpt_path auto instead).",
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
                "checkpoint.enable_version_counter": False,  # one run per directory: last.ckpt is the newest
            }
        )
        parser.add_lightning_class_args(GradNormMonitor, "grad_norm")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(ExpertUsageMonitor, "expert_usage")
        parser.add_lightning_class_args(NonFiniteGuard, "nan_guard")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.add_class_arguments(Parallelism, "parallelism", fail_untyped=False)
        parser.link_arguments("parallelism.activation_checkpointing", "model.activation_checkpointing")
        parser.add_class_arguments(ClusterShape, "cluster", fail_untyped=False)
        parser.add_argument(
            "--dry_run",
            action="store_true",
            help="Print the memory plan of this config on the `cluster` shape and exit (nothing is trained).",
        )

    def before_instantiate_classes(self) -> None:
        """Point checkpoints and loggers at the run directory unless they were given a place; refuse
        strategies this machine cannot run (a dry run only plans, so it may name any)."""
        config = self.config
        if not config.dry_run:
            check_supported(config.parallelism, config.trainer.strategy, config.trainer.accelerator)
        root = config.trainer.default_root_dir or DEFAULT_ROOT
        config.trainer.default_root_dir = root
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path(root) / "checkpoints")
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = logger.get("init_args", {}) if isinstance(logger, Namespace) else {}
            if "save_dir" in init_args and init_args.save_dir is None:
                init_args.save_dir = root

    def instantiate_classes(self) -> None:
        if self.config.dry_run:  # a plan needs no data, model or trainer (nor the GPUs the config names)
            self.config_init, self.model, self.datamodule, self.trainer = self.config, None, None, None
            return
        super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer with the strategy of the `parallelism` section, the requeue callback, and Lightning's
        own SLURM requeue handler switched off (RequeueOnSignal replaces it)."""
        trainer_config = self.config_init.trainer
        strategy = build_strategy(self.config_init.parallelism, self.model, self.config.data.batch_size)
        if strategy is not None:
            kwargs["strategy"] = strategy
        callbacks = trainer_config.callbacks or []
        kwargs["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), RequeueOnSignal()]
        if SLURMEnvironment.detect():
            plugins = trainer_config.plugins or []
            kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), SLURMEnvironment(False)]
        return super().instantiate_trainer(**kwargs)


def chosen_model(args: list[str]) -> tuple[str, str]:
    """(arch, size) as the command line will resolve them: the module's defaults, then each `--config` file's
    `model.arch`/`model.size` and each `--model.arch`/`--model.size`, in order (the last one wins)."""
    defaults = inspect.signature(LanguageModelModule.__init__).parameters
    choice = {"arch": defaults["arch"].default, "size": defaults["size"].default}
    i = 0
    while i < len(args):
        key, has_value, value = args[i].partition("=")
        if not has_value and i + 1 < len(args) and key in ("--config", "-c", "--model.arch", "--model.size"):
            value, i = args[i + 1], i + 1
        if key in ("--config", "-c") and Path(value).is_file():
            try:
                section = (yaml.safe_load(Path(value).read_text()) or {}).get("model") or {}
            except (yaml.YAMLError, AttributeError):
                section = {}  # the parser reports a broken file with its own message
            choice.update({k: str(section[k]) for k in ("arch", "size") if isinstance(section, dict) and k in section})
        elif key in ("--model.arch", "--model.size"):
            choice[key.removeprefix("--model.")] = value
        i += 1
    return choice["arch"], choice["size"]


def fit(args: list[str] | None = None) -> PlatformCLI:
    cli = PlatformCLI(args)
    if cli.config.dry_run:
        plan = plan_from_config(cli.config)
        print(format_plan(plan))
        check_fits(plan)
        return cli
    root, checkpoint_dir = cli.config.trainer.default_root_dir, cli.config.checkpoint.dirpath
    # Rank 0 holds the run directory; the other ranks of the same run start under its lock.
    with RunLock(root) if cli.trainer.global_rank == 0 else contextlib.nullcontext():
        if cli.trainer.global_rank == 0:
            if cli.config.ckpt_path is None:
                check_fresh_start(root, checkpoint_dir, cli.config.overwrite_run)
            for directory in (checkpoint_dir, root):  # saves killed midway: no process writes them now
                for path in remove_stale_temporaries(directory):
                    log.info("removed %s, the temporary file of a save that did not finish", path)
        ckpt_path = resolve_ckpt_path(cli.config.ckpt_path, checkpoint_dir, root)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli
