"""The `evaluate` command: what does the context buy? Several models, the same tokens, one report.

    python -m platform.evaluate --models+ runs/tiny \
        --models+ '{path: runs/tiny, self_extend: {group_size: 4, window_size: 64}}' \
        --data.data_dir data/builtin-bytes --retrieval.tasks '[passkey]' --output eval/tiny

Also `--mode validate --checkpoint RUN`: the validation metrics of the run's own training config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

from .ranks import Ranks
from .results import Evaluation, ModelResults
from .sources import LoadedModel, as_entry, load_entry

log = logging.getLogger(__name__)

DEFAULT_MULTIPLES = (1, 2, 4, 8, 16)  # lengths, in units of the first model's trained length
FALLBACK_TRAINED_LEN = 256  # when no model records its trained length


@dataclasses.dataclass
class DataOptions:
    """Where the tokens of the perplexity sweep come from."""

    data_dir: str | None = None
    """A prepared data directory (`python -m platform.prepare`); None: no perplexity or position loss."""
    split: str = "val"
    """The split whose token stream is scored."""


@dataclasses.dataclass
class PerplexityOptions:
    """Perplexity by context length and loss by position (protocol: lctrain/evaluation/perplexity.py)."""

    lengths: list[int] | None = None
    """Window lengths in tokens (default: 1, 2, 4, 8 and 16 times the first model's trained length)."""
    score_len: int = 128
    """The last score_len tokens of every window are scored: the same tokens at every length."""
    stride: int | None = None
    """Tokens between window ends (default score_len: scored tokens tile the split)."""
    chunk_len: int | None = 1024
    """Tokens per model call within a window (memory bound; None: whole windows). XL models use their trained
    segment length."""
    positions: bool = True
    """Also the mean loss by token position over the windows of the longest length."""


@dataclasses.dataclass
class RetrievalOptions:
    """Synthetic retrieval grids: the same examples for every model."""

    tasks: list[Literal["passkey", "mqar"]] = dataclasses.field(default_factory=list)
    """Which grids: passkey (length x key depth), mqar (multi-query associative recall by number of pairs)."""
    lengths: list[int] | None = None
    """Passkey example lengths in tokens (default: the perplexity lengths, at least the prompt's length)."""
    depths: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Key depths (0 = start of the filler, 1 = its end)."""
    examples: int = 10
    """Examples per cell."""
    key_digits: int = 3
    """Digits of the pass key (configs/passkey/ trains on 3)."""
    mqar_pairs: list[int] = dataclasses.field(default_factory=lambda: [4, 8, 16, 32])
    """MQAR: key-value pairs per example (one row each; every pair is asked once)."""
    mqar_bins: int = 4
    """MQAR: columns, each the queries of one quarter (for 4) of the pairs, oldest first."""
    seed: int = 4321
    """Seed of the examples."""


NO_DATA, SWEEP, NO_RETRIEVAL = DataOptions(), PerplexityOptions(), RetrievalOptions()  # defaults, never changed


def evaluate(
    models: list[str | dict] | None = None,
    mode: Literal["context", "validate"] = "context",
    checkpoint: str | None = None,
    data: DataOptions = NO_DATA,
    perplexity: PerplexityOptions = SWEEP,
    retrieval: RetrievalOptions = NO_RETRIEVAL,
    output: str | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    accelerator: Literal["cpu", "cuda"] = "cpu",
    devices: int = 1,
    dtype: Literal["float32", "bfloat16", "float64"] = "float32",
    threads: int | None = None,
) -> Evaluation | dict[str, float]:
    """Evaluate models on what their context buys: perplexity by length, loss by position, retrieval grids.

    Args:
        models: The models, each a path (run directory, checkpoint file, sharded checkpoint, Hugging Face export)
            or a mapping {path, label, self_extend: {group_size, window_size}, trained_len} (the fields of
            lctrain.evaluation.sources.ModelEntry). Repeat `--models+ X` to add one.
        mode: 'context': the length sweep, loss by position and retrieval grids; 'validate': the validation
            metrics of a run's training config on --checkpoint.
        checkpoint: --mode validate: a run directory, checkpoint file or sharded checkpoint.
        data: Prepared data for the perplexity sweep (validate: replaces the run's data directory).
        perplexity: Perplexity by length and loss by position.
        retrieval: Passkey and MQAR grids.
        output: A directory for report.md, its plots, CSV and JSON files, and evaluate.log (None: print only).
        limit: Quick runs: at most this many scored tokens per length, examples per retrieval cell, or (validate)
            validation batches.
        batch_size: Windows or examples per model call (default 4; validate: the run's batch size).
        accelerator: cpu or cuda.
        devices: Processes on this machine (data parallel: windows and examples split across them, the same
            numbers as one process).
        dtype: The models' dtype (bfloat16 on a GPU; float64 for reference checks).
        threads: torch CPU threads per process (None: torch's default).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if devices < 1:
        raise ValueError(f"--devices={devices} must be at least 1")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError("--accelerator cuda: no CUDA device is visible here; use --accelerator cpu")
    if mode == "validate":
        return _validate(checkpoint, data, limit, batch_size, accelerator, devices)
    batch_size = batch_size or 4
    if checkpoint is not None:
        raise ValueError("--checkpoint is for --mode validate; give the models to compare with --models")
    if not models:
        raise ValueError("--models is empty; give one or more, e.g. --models+ runs/tiny --models+ runs/other")
    if data.data_dir is None and not retrieval.tasks:
        raise ValueError("nothing to measure: give --data.data_dir (perplexity by length) and/or --retrieval.tasks")
    entries = [as_entry(m) for m in models]
    ranks, device = _launch(accelerator, devices)
    out_dir = Path(output) if output else None
    if out_dir is not None and ranks.is_first:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--output {out_dir} is a file; name a directory")
        out_dir.mkdir(parents=True, exist_ok=True)
    with logging_to(out_dir / "evaluate.log" if out_dir is not None and ranks.is_first else None):
        evaluation = _evaluate_all(
            entries, data, perplexity, retrieval, limit, batch_size, dtype, accelerator, ranks, device
        )
        if ranks.is_first:
            from .report import markdown_tables, write_report

            text = write_report(evaluation, out_dir) if out_dir is not None else markdown_tables(evaluation)
            print(text)
            if out_dir is not None:
                log.info("wrote %s", out_dir / "report.md")
    ranks.barrier()
    return evaluation


def _evaluate_all(
    entries, data, perplexity, retrieval, limit, batch_size, dtype, accelerator, ranks, device
) -> Evaluation:
    """Every model in turn, on the same tokens and lengths (the first model's trained length sets the default)."""
    tokens = None
    if data.data_dir is not None:
        from .perplexity import read_tokens

        tokens = read_tokens(data.data_dir, data.split)

    started, results, lengths = time.perf_counter(), [], None
    for entry in entries:
        loaded = load_entry(entry, device=device, dtype=dtype)
        if lengths is None:
            trained = loaded.trained_len or FALLBACK_TRAINED_LEN
            lengths = perplexity.lengths or [m * trained for m in DEFAULT_MULTIPLES]
        results.append(_evaluate_one(loaded, tokens, lengths, perplexity, retrieval, limit, batch_size, ranks))
        del loaded

    settings = _settings(data, perplexity, retrieval, lengths, limit, dtype, accelerator, ranks, results)
    settings["seconds"] = round(time.perf_counter() - started, 1)
    return Evaluation(results, settings)


def _evaluate_one(
    loaded: LoadedModel,
    tokens,
    lengths: list[int],
    perplexity: PerplexityOptions,
    retrieval: RetrievalOptions,
    limit: int | None,
    batch_size: int,
    ranks: Ranks,
) -> ModelResults:
    from .perplexity import perplexity_by_length
    from .retrieval import mqar_grid, passkey_grid

    self_extend = loaded.self_extend
    result = ModelResults(
        loaded.label,
        loaded.arch,
        loaded.n_params,
        loaded.trained_len,
        None if self_extend is None else f"G={self_extend.group_size} W={self_extend.window_size}",
    )
    started = time.perf_counter()
    with Progress(loaded.label, enabled=ranks.is_first) as progress:
        if tokens is not None:
            result.perplexity, result.position = perplexity_by_length(
                loaded,
                tokens,
                lengths,
                score_len=perplexity.score_len,
                stride=perplexity.stride,
                limit=limit,
                batch_size=batch_size,
                chunk_len=perplexity.chunk_len,
                with_positions=perplexity.positions,
                ranks=ranks,
                progress=progress.add,
            )
        examples = min(retrieval.examples, limit) if limit else retrieval.examples
        if "passkey" in retrieval.tasks:
            result.retrieval["passkey"] = passkey_grid(
                loaded,
                retrieval.lengths or lengths,
                retrieval.depths,
                examples,
                retrieval.seed,
                retrieval.key_digits,
                ranks,
                batch_size=batch_size,
                chunk_len=perplexity.chunk_len,
                progress=progress.add,
            )
        if "mqar" in retrieval.tasks:
            result.retrieval["mqar"] = mqar_grid(
                loaded,
                retrieval.mqar_pairs,
                examples,
                retrieval.seed,
                bins=retrieval.mqar_bins,
                ranks=ranks,
                batch_size=batch_size,
                chunk_len=perplexity.chunk_len,
                progress=progress.add,
            )
    result.seconds = round(time.perf_counter() - started, 1)
    if ranks.is_first:
        log.info("%s: done in %.1f s", loaded.label, result.seconds)
    return result


class Progress:
    """Tokens run through the model, with tokens/s: a bar on a terminal, and a log line every 10 s (the log file,
    and stderr when no bar is shown)."""

    def __init__(self, label: str, enabled: bool = True, every_s: float = 10.0):
        self.label, self.enabled, self.every_s = label, enabled, every_s
        self.tokens, self.bar = 0, None

    def __enter__(self) -> Progress:
        self.started = self.logged = time.perf_counter()
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=self.label, unit="tok", unit_scale=True, dynamic_ncols=True, leave=False)
        return self

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(tokens)
        now = time.perf_counter()
        if self.enabled and now - self.logged >= self.every_s:
            self.logged = now
            log.info("%s: %d tokens, %.0f tok/s", self.label, self.tokens, self.tokens / (now - self.started))

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _launch(accelerator: str, devices: int) -> tuple[Ranks, str]:
    """One process, or `devices` data-parallel processes started by Lightning Fabric (this command re-run for
    ranks 1 ... devices - 1, joined by a process group: gloo on CPU, NCCL on CUDA)."""
    if devices == 1:
        return Ranks(), "cuda" if accelerator == "cuda" else "cpu"
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, strategy="ddp")
    fabric.launch()
    return Ranks(fabric.global_rank, fabric.world_size), str(fabric.device)


@contextlib.contextmanager
def logging_to(path: Path | None):
    """Progress and results also go to a log file beside the report (None: nowhere else), for this call only."""
    if path is None:
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("lctrain")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def _settings(data, perplexity, retrieval, lengths, limit, dtype, accelerator, ranks, results) -> dict[str, Any]:
    """The protocol, as the report states it."""
    settings: dict[str, Any] = {}
    first = next((r.perplexity for r in results if r.perplexity is not None), None)
    if first is not None:
        settings.update(
            data=f"{data.data_dir} ({data.split} split)",
            lengths=lengths,
            score_len=perplexity.score_len,
            stride=perplexity.stride or perplexity.score_len,
            windows=first.windows,
            scored_tokens_per_length=first.scored_tokens,
        )
    if retrieval.tasks:
        settings.update(
            retrieval_tasks=retrieval.tasks,
            retrieval_examples_per_cell=min(retrieval.examples, limit) if limit else retrieval.examples,
            retrieval_seed=retrieval.seed,
        )
    settings.update(dtype=dtype, device=accelerator, world_size=ranks.world_size, limit=limit)
    return settings


def _validate(checkpoint, data, limit, batch_size, accelerator, devices) -> dict[str, float]:
    from .validate import format_metrics, validate_checkpoint

    if checkpoint is None:
        raise ValueError("--mode validate needs --checkpoint (a run directory, checkpoint file or sharded checkpoint)")
    metrics = validate_checkpoint(
        checkpoint,
        data_dir=data.data_dir,
        limit_batches=limit,
        batch_size=batch_size,
        accelerator=accelerator,
        devices=devices,
    )
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(format_metrics(metrics))
    return metrics


def evaluate_cli(args: list[str] | None = None) -> None:
    from jsonargparse import CLI

    CLI(evaluate, args=args, as_positional=False, exit_on_error=False)
