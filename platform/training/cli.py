"""The command line of `python -m platform.fit`: LightningCLI without subcommands, plus our options.

LightningCLI with `run=False` reads `--config` files and dotted overrides into the Trainer, the
LanguageModelModule and the TokenDataModule; unknown keys are rejected. On top of it:
- `--ckpt_path` takes `last`, `auto` (the newest checkpoint of any kind in the run directory that loads, or a
  fresh start when there is none: what a requeued job wants) or a path (training/checkpoints.py); one run
  per directory: a lock while it runs, and `--overwrite_run` to start afresh over checkpoints (run_directory.py);
- always-on callbacks with their own sections: `checkpoint` (ModelCheckpoint, plus the final step), `nan_guard`
  (skips steps with NaN/inf gradients, stops after a few in a row), `loss_spike` (logs losses far above
  their recent values), `grad_norm`,
  `lr_monitor`, `expert_usage` (tokens per expert of MoE models; nothing for the others), `progress` (a
  plain-text line every few steps when the output is not a terminal, which then gets no progress bar unless
  `trainer.enable_progress_bar` is set; the bar counts optimizer steps), and `length_sweep` (off by default:
  perplexity by context length every few validations, logged as scalars, a table and a plot; length_sweep.py);
- files default to the run directory `trainer.default_root_dir`: checkpoints in `<root>/checkpoints`,
  logs in `<root>`, the resolved config in `<root>/config.yaml` (overwritten on resume);
- the model's config is typed: `model.model_config` takes the fields of the chosen architecture's config
  (found in the `--config` files and `--model.arch`/`--model.size` before parsing), defaulting to the named
  size's values, so `--help` documents them, `--print_config` shows them and a wrong field or type is named;
- the vocabulary size is read from the data and given to the model (`link_arguments`);
- `--model.init_from PATH` starts a new run from a trained model's weights (init_from.py): read before
  parsing like arch and size, the source's arch, size and config become the defaults, so only what the
  command line sets differs from it (and a setting that changes a weight's shape is refused, naming it);
- training batches draw from a random stream of their own that checkpoints keep, per rank, so a resumed run
  repeats the dropout and router noise of an uninterrupted one (random_state.py);
- `parallelism` picks the strategy (cluster/strategies.py), `--dry_run` with `cluster` prints the
  memory plan instead of training (cluster/planner.py), and SIGUSR1 saves and requeues
  (cluster/requeue.py).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError, Namespace, set_parsing_settings
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from ..cluster.planner import ClusterShape, check_fits, format_plan, plan_from_config
from ..cluster.requeue import RequeueOnSignal
from ..cluster.strategies import Parallelism, build_strategy, check_supported
from ..data.datamodule import TokenDataModule
from ..entry import one_line, read_config_file, run_entry_point  # noqa: F401  (entry points import run_entry_point)
from ..inference.loading import read_checkpoint
from ..models.registry import config_for, family
from ..models.spec import ModelSpec
from .callbacks import ExpertUsageMonitor, GradNormMonitor, LossSpikeDetector, NonFiniteGuard, PeriodicCheckpoint
from .checkpoints import remove_stale_temporaries, resolve_ckpt_path
from .init_from import WeightsSource, read_source
from .length_sweep import LengthSweep
from .module import LanguageModelModule
from .progress import ProgressLine, progress_bar_settings
from .random_state import TrainingRandomState
from .run_directory import RunLock, UndoFailedStart, check_fresh_start

DEFAULT_ROOT = "runs/default"
log = logging.getLogger(__name__)

# The model configs document their fields with attribute docstrings; `--help` shows them.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class SaveConfigToRunDir(SaveConfigCallback):
    """Writes the resolved config to `<default_root_dir>/config.yaml` (replacing the one of an earlier
    attempt of the same run), rather than into the first logger's versioned directory, and gives it to every
    logger as hyper-parameters: a W&B run's config then holds the optimizer, schedule and Trainer settings,
    not only the module's arguments. Lightning calls this on global rank zero only."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = Path(trainer.default_root_dir) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_unset=False, overwrite=True, multifile=self.multifile)
        config = yaml.safe_load(self.parser.dump(self.config, skip_unset=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class PlatformCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs: Any):
        argv = sys.argv[1:] if args is None else args
        init_from = given_model_args(argv).get("init_from")
        self.init_source = None if init_from in (None, "", "null", "None") else read_source(init_from)
        self.arch, self.size = chosen_model(argv, self.init_source)
        self.config_type = family(self.arch).config  # an unknown arch is named here, before parsing
        self.default_config = default_model_config(self.arch, self.size, self.init_source)
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
        if self.init_source is not None:
            parser.set_defaults({"model.arch": self.arch, "model.size": self.size})
        defaults_from = f"model.size={self.size}'s"
        if self.init_source is not None and self.default_config != config_for(self.arch, self.size):
            defaults_from = f"model.init_from {self.init_source.path}'s"
        parser.add_dataclass_arguments(
            self.config_type,
            "model.model_config",
            default=self.default_config,
            help=f"{self.config_type.__name__}: the fields of model.arch={self.arch}, with {defaults_from} "
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
        parser.add_lightning_class_args(LossSpikeDetector, "loss_spike")
        parser.add_lightning_class_args(ProgressLine, "progress")
        parser.add_lightning_class_args(LengthSweep, "length_sweep")
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
            check_trainer(config.trainer)
        check_vocab_size_not_given(config.model.model_config, self.default_config)
        if config.model.carry_state and config.data.layout != "streams":
            raise ValueError(
                f"model.carry_state=true needs data.layout=streams (row r of a batch continuing row r of the one "
                f"before), not {config.data.layout!r}; set --data.layout streams or carry_state false"
            )
        root = config.trainer.default_root_dir or DEFAULT_ROOT
        if Path(root).exists() and not Path(root).is_dir():
            raise ValueError(f"trainer.default_root_dir {root} is a file; name a directory for the run")
        config.trainer.default_root_dir = root
        source = self.init_source
        if source and config.overwrite_run and source.location.resolve().is_relative_to(Path(root).resolve()):
            raise ValueError(
                f"--model.init_from {source.path} lies in the run directory {root}, which --overwrite_run would "
                "clear before reading it; start the new run in another directory"
            )
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
        try:
            super().instantiate_classes()
        except MisconfigurationException as e:  # Lightning's checks of Trainer and callback arguments
            raise ValueError(one_line(str(e)).replace("`", "")) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer with the strategy of the `parallelism` section, the requeue and random-state callbacks,
        and Lightning's own SLURM requeue handler switched off (RequeueOnSignal replaces it)."""
        trainer_config = self.config_init.trainer
        strategy = build_strategy(self.config_init.parallelism, self.model, self.config.data.batch_size)
        if strategy is not None:
            kwargs["strategy"] = strategy
        callbacks = trainer_config.callbacks or []
        kwargs["callbacks"] = [
            *(callbacks if isinstance(callbacks, list) else [callbacks]),
            RequeueOnSignal(),
            TrainingRandomState(),
        ]
        kwargs["enable_progress_bar"], kwargs["callbacks"] = progress_bar_settings(
            trainer_config.enable_progress_bar, kwargs["callbacks"], self.config_init.progress
        )
        if SLURMEnvironment.detect():
            plugins = trainer_config.plugins or []
            kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), SLURMEnvironment(False)]
        return super().instantiate_trainer(**kwargs)


def check_trainer(trainer: Namespace) -> None:
    """The Trainer values Lightning would refuse deep inside a run (or accept and then fail on), named."""
    accumulate = trainer.accumulate_grad_batches
    if isinstance(accumulate, int) and accumulate < 1:
        raise ValueError(f"trainer.accumulate_grad_batches={accumulate} must be >= 1")
    if trainer.max_steps is not None and trainer.max_steps < -1:
        raise ValueError(f"trainer.max_steps={trainer.max_steps} must be >= 0, or -1 for no limit")
    if trainer.gradient_clip_val is not None and float(trainer.gradient_clip_val) < 0:
        raise ValueError(f"trainer.gradient_clip_val={trainer.gradient_clip_val} must be >= 0 (0 or null: no clipping)")
    if trainer.log_every_n_steps is not None and trainer.log_every_n_steps < 1:
        raise ValueError(f"trainer.log_every_n_steps={trainer.log_every_n_steps} must be >= 1")
    accelerator = str(trainer.accelerator)
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={accelerator}: this machine has no CUDA device; use --trainer.accelerator cpu"
        )


def check_vocab_size_not_given(model_config: Any, size_config: Any) -> None:
    """The vocabulary size comes from the data (`data.vocab_size`); a different value in the model's config
    would be silently replaced, so it is refused."""
    given = getattr(model_config, "vocab_size", None)
    if given is not None and given != getattr(size_config, "vocab_size", None):
        raise ValueError(
            f"model.model_config.vocab_size={given} is not used: the vocabulary size is read from the data "
            "(its tokenizer); remove the setting"
        )


PEEKED = ("arch", "size", "init_from")  # the model arguments that shape the parser, read before parsing


def given_model_args(args: list[str]) -> dict[str, str]:
    """`model.arch`, `model.size` and `model.init_from` where the command line gives them: each `--config`
    file's and each `--model.<key>`, in order (the last one wins)."""
    options = [f"--model.{key}" for key in PEEKED]
    given: dict[str, str] = {}
    i = 0
    while i < len(args):
        key, has_value, value = args[i].partition("=")
        if not has_value and i + 1 < len(args) and key in ("--config", "-c", *options):
            value, i = args[i + 1], i + 1
        if key in ("--config", "-c"):
            section = read_config_file(value).get("model") or {}
            if isinstance(section, dict):
                given.update({k: str(section[k]) for k in PEEKED if section.get(k) is not None})
        elif key in options:
            given[key.removeprefix("--model.")] = value
        i += 1
    return given


def chosen_model(args: list[str], source: WeightsSource | None = None) -> tuple[str, str]:
    """(arch, size) as the command line will resolve them: the module's defaults (or, with `model.init_from`,
    the source's), replaced by what the command line gives (`given_model_args`)."""
    defaults = inspect.signature(LanguageModelModule.__init__).parameters
    choice = {"arch": defaults["arch"].default, "size": defaults["size"].default}
    if source is not None:
        choice = {"arch": source.spec.arch, "size": source.spec.size}
    given = given_model_args(args)
    return given.get("arch", choice["arch"]), given.get("size", choice["size"])


def default_model_config(arch: str, size: str, source: WeightsSource | None) -> Any:
    """The values `model.model_config` starts from: the source's config when the run starts from one of the
    same arch and size, else the named size's (a run of another size then fails its shape check, naming it)."""
    if source is not None and (source.spec.arch, source.spec.size) == (arch, size):
        return source.spec.config()
    return config_for(arch, size)


def check_resumable(path: str, spec: ModelSpec) -> None:
    """A checkpoint file training can continue from: a whole training checkpoint (not an export, which holds
    weights only) of the model this run builds, or a one-line error naming the file and what differs."""
    checkpoint = read_checkpoint(path, "--ckpt_path")
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise ValueError(
            f"--ckpt_path {path} holds weights only (an export), not a training checkpoint with optimizer state "
            "and position; pass a checkpoint from the run's checkpoints/ folder"
        )
    saved = ModelSpec.from_checkpoint(checkpoint)
    if (saved.arch, saved.size) != (spec.arch, spec.size):
        raise ValueError(
            f"--ckpt_path {path} is of another model: it holds model.arch={saved.arch} model.size={saved.size}, "
            f"this run builds {spec.arch} {spec.size}; resume with that run's config"
        )
    # A vocabulary change is named by the data module, with both tokenizers, when the checkpoint records its own.
    ignored = {"vocab_size"} if "tokenizer" in checkpoint else set()
    differing = sorted(
        k
        for k in {*saved.overrides, *spec.overrides} - ignored
        if _plain_json(saved.overrides.get(k)) != _plain_json(spec.overrides.get(k))
    )
    if differing:
        differences = ", ".join(
            f"model.model_config.{k}={saved.overrides.get(k, '(size default)')} there, "
            f"{spec.overrides.get(k, '(size default)')} here"
            for k in differing
        )
        raise ValueError(f"--ckpt_path {path} is of another model: {differences}; resume with that run's config")


def _plain_json(value: Any) -> str:
    """A canonical text of plain data, so that a tuple saved as a list still compares equal."""
    return json.dumps(value, sort_keys=True, default=str)


def fit(args: list[str] | None = None) -> PlatformCLI:
    cli = PlatformCLI(args)
    if cli.config.dry_run:
        plan = plan_from_config(cli.config)
        print(format_plan(plan))
        check_fits(plan)
        return cli
    root, checkpoint_dir = cli.config.trainer.default_root_dir, cli.config.checkpoint.dirpath
    # Rank 0 holds the run directory; the other ranks of the same run start under its lock. A start that fails
    # on a bad setting before the first step leaves the directory as it found it.
    rank_zero = cli.trainer.global_rank == 0
    undo = UndoFailedStart(root, started=lambda: cli.trainer.global_step > 0) if rank_zero else contextlib.nullcontext()
    with undo, RunLock(root) if rank_zero else contextlib.nullcontext():
        if rank_zero:
            if cli.config.ckpt_path is None:
                check_fresh_start(root, checkpoint_dir, cli.config.overwrite_run)
            for directory in (checkpoint_dir, root):  # saves killed midway: no process writes them now
                for path in remove_stale_temporaries(directory):
                    log.info("removed %s, the temporary file of a save that did not finish", path)
        ckpt_path = resolve_ckpt_path(cli.config.ckpt_path, checkpoint_dir, root)
        if ckpt_path is not None and Path(ckpt_path).is_file():
            check_resumable(ckpt_path, cli.model.spec)
        cli.model.resuming = ckpt_path is not None  # a resume's checkpoint wins over model.init_from
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli
