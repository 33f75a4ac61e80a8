"""`LengthSweep`: a small perplexity-by-length measurement every few validations, so that a long run shows how
its use of long context develops while it trains, not only once it is over.

It runs the protocol of `python -m platform.evaluate` (evaluation/perplexity.py) on the model being trained:
the same scored tokens of the data's validation split, predicted from windows of each length. It logs one
scalar per length (`length_sweep/ppl_<L>`), and where the logger can show them, the table as text and the
perplexity-by-length plot as an image (TensorBoard, W&B). Off by default (`every_n_validations: 0`).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from ..data.tokenizer import load_tokenizer
from ..evaluation.perplexity import perplexity_by_length, read_tokens
from ..evaluation.ranks import Ranks
from ..evaluation.report import perplexity_figure, perplexity_table
from ..evaluation.results import ModelResults, PerplexityByLength
from ..evaluation.sources import LoadedModel
from ..models.registry import count_parameters

PREFIX = "length_sweep"


class GatheredHead(nn.Module):
    """An FSDP2-sharded model whose output head can be called after its forward: the forward may leave the
    root's parameters (the embedding the head shares, the head) sharded again, so they are gathered first."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def output_head(self, hidden: Tensor) -> Tensor:
        self.model.unshard()
        return self.model.output_head(hidden)


class LengthSweep(L.Callback):
    """Perplexity by context length every few validations, logged as scalars, a table and a plot (off by default).

    At every `every_n_validations`-th validation (the sanity check not counted): the perplexity of the same
    `limit` tokens of the data's `split` at each of `lengths`, logged at the step of that validation.

    It runs at the precision validation runs at. Under data parallelism every rank runs the sweep on its share
    of the windows and the results are gathered (the numbers equal one process's); a model sharded with fsdp2
    runs every window on every rank instead, since each forward is a collective (FSDP1 and DeepSpeed are
    refused). Rank 0 writes the logs. The count of validations is kept in
    checkpoints, so a resumed run sweeps at the steps an uninterrupted one would."""

    def __init__(
        self,
        every_n_validations: int = 0,
        lengths: list[int] | None = None,
        limit: int = 1024,
        score_len: int = 128,
        batch_size: int = 4,
        split: str = "val",
    ):
        """
        Args:
            every_n_validations: Sweep at every this many validations (0 turns the sweep off).
            lengths: Window lengths in tokens (default: 1, 2, 4 and 8 times data.seq_len).
            limit: Tokens scored at each length, spread over the split (the same tokens at every length).
            score_len: Tokens scored at the end of each window (capped at the shortest length).
            batch_size: Windows per forward call.
            split: The split of data.data_dir the tokens come from.
        """
        super().__init__()
        if every_n_validations < 0:
            raise ValueError(f"length_sweep.every_n_validations={every_n_validations} must be >= 0 (0: off)")
        if lengths is not None and (not lengths or min(lengths) < 2):
            raise ValueError(
                f"length_sweep.lengths={lengths}: give window lengths of at least 2 tokens, e.g. [256, 512]"
            )
        if limit < 1 or score_len < 1 or batch_size < 1:
            raise ValueError(
                f"length_sweep.limit={limit}, length_sweep.score_len={score_len} and length_sweep.batch_size="
                f"{batch_size} must be >= 1"
            )
        self.every_n_validations, self.lengths, self.limit = every_n_validations, lengths, limit
        self.score_len, self.batch_size, self.split = score_len, batch_size, split
        self.validations = 0  # validations seen, the sanity check not counted
        self.tokens: np.ndarray | None = None
        self.seq_len: int | None = None
        self.tokenizer_spec: dict | None = None

    # --- set-up: every setting checked before the first step ---------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.every_n_validations or stage not in ("fit", "validate"):
            return
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise ValueError(
                f"length_sweep.every_n_validations={self.every_n_validations}: the sweep runs with one process, DDP "
                f"or fsdp2, not {type(trainer.strategy).__name__}; set length_sweep.every_n_validations 0"
            )
        hparams = getattr(trainer.datamodule, "hparams", {})
        if "data_dir" not in hparams:
            raise ValueError(
                "length_sweep.every_n_validations is set but the run has no TokenDataModule with a data_dir to read "
                "windows from; set length_sweep.every_n_validations 0"
            )
        self.seq_len = int(hparams["seq_len"])
        self.tokens = read_tokens(hparams["data_dir"], self.split, option="length_sweep.split")
        self.tokenizer_spec = getattr(trainer.datamodule, "tokenizer_spec", None)
        lengths = self.sweep_lengths()
        if len(self.tokens) < lengths[-1] + 1:
            raise ValueError(
                f"length_sweep.lengths={lengths}: split '{self.split}' of {hparams['data_dir']} has {len(self.tokens)} "
                f"tokens, fewer than the longest length plus the token it predicts; give shorter lengths"
            )

    def sweep_lengths(self) -> list[int]:
        """The lengths asked for, or 1, 2, 4 and 8 times the training length; sorted, each once."""
        return sorted(set(self.lengths or [k * self.seq_len for k in (1, 2, 4, 8)]))

    # --- the sweep ------------------------------------------------------------------------------------------------

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_validations or trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_validations:
            return
        result = self.sweep(trainer, pl_module)  # every rank: the windows are split over them
        if trainer.is_global_zero:
            self.write_logs(trainer, pl_module, result)

    def sweep(self, trainer: L.Trainer, pl_module: L.LightningModule) -> PerplexityByLength:
        """The perplexity of the current weights at every length, in eval mode and without gradients."""
        model = pl_module.model
        sharded = isinstance(model, FSDPModule)  # every rank must run the same forwards: no split
        ranks = Ranks() if sharded else Ranks.current()
        loaded = LoadedModel(
            label=f"step {trainer.global_step}",
            model=GatheredHead(model) if sharded else model,
            tokenizer=load_tokenizer(self.tokenizer_spec or {"kind": "bytes"}),
            arch=pl_module.spec.arch,
            n_params=count_parameters(model),
            trained_len=self.seq_len,
            self_extend=None,
        )
        lengths = self.sweep_lengths()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                result, _ = perplexity_by_length(
                    loaded,
                    self.tokens,
                    lengths,
                    score_len=min(self.score_len, lengths[0]),
                    limit=self.limit,
                    batch_size=self.batch_size,
                    with_positions=False,
                    ranks=ranks,
                )
        finally:
            if sharded:
                model.reshard()  # the gathered root parameters (embedding, head) are freed again
            model.train(was_training)
        return result

    # --- the logs -------------------------------------------------------------------------------------------------

    def write_logs(self, trainer: L.Trainer, pl_module: L.LightningModule, result: PerplexityByLength) -> None:
        """Scalars to every logger; the table and the plot to those that show text and images."""
        step = trainer.global_step
        scalars = {f"{PREFIX}/ppl_{n}": ppl for n, ppl in zip(result.lengths, result.ppl)}
        results = ModelResults(
            label=f"step {step}",
            arch=pl_module.spec.arch,
            n_params=count_parameters(pl_module.model),
            trained_len=self.seq_len,
            self_extend=None,
            perplexity=result,
        )
        pictures = any(isinstance(logger, (TensorBoardLogger, WandbLogger)) for logger in trainer.loggers)
        figure = perplexity_figure([results]) if pictures else None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                table = wandb.Table(
                    columns=["length", "perplexity", "nll"],
                    data=[[n, ppl, nll] for n, ppl, nll in zip(result.lengths, result.ppl, result.nll)],
                )
                media = {f"{PREFIX}/table": table, f"{PREFIX}/perplexity": wandb.Image(figure)}
                logger.log_metrics({**scalars, **media}, step=step)
                continue
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(f"{PREFIX}/table", perplexity_table([results]), global_step=step)
                logger.experiment.add_figure(f"{PREFIX}/perplexity", figure, global_step=step, close=False)

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.validations = state_dict["validations"]
