"""`LanguageModelModule`: trains any registered architecture as a causal language model.

One `_shared_step` serves train, validation and test: the model's forward, cross-entropy over the
non-ignored targets, the model's named aux losses times their configured weights, and token metrics
(perplexity, accuracy, top-k accuracy; in validation and test also each aux loss as a token-weighted
mean) as torchmetrics objects that Lightning syncs and resets. The model is built in `configure_model`,
so sharded strategies can wrap it before it is materialised.
With `carry_state`, the model's state is carried from one batch to the next (Transformer-XL memory,
recurrent state): one state per gradient-accumulation slot, detached between steps, kept in the
checkpoint so a resumed run continues exactly. Optional: warm-started embeddings, the SimCTG aux loss
(asks the model for its final hidden states), and SophiaG's Hessian refresh (training/sophia.py).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from ..cluster.strategies import build_for_strategy, named_parameters
from ..data.tokenizer import check_same_tokenizer
from ..models.output import ModelState, state_from_tree, state_to_tree
from ..models.registry import family
from ..models.spec import ModelSpec
from .losses import answer_weighted_ce, combine_losses, simctg_loss, token_nll
from .metrics import AnswerExactMatch, Perplexity, TokenAccuracy, TokenWeightedMean
from .optimizers import WarmupCosine, parameter_groups
from .sophia import SophiaG, gauss_newton_bartlett
from .warm_start import WarmStart, warm_start_embeddings

STAGES = ("train", "val", "test")
EVAL_STAGES = ("val", "test")
DEFAULT_AUX_LOSS_WEIGHTS = {"moe_balance": 0.01, "router_entropy": 0.0, "simctg": 0.0}


def model_spec(arch: str, size: str, model_config: Any, vocab_size: int | None) -> ModelSpec:
    """The spec of the module's arguments: `model_config` is the family's config (the command line gives a
    whole one) or a dict of fields replacing the named size's; the data's `vocab_size` replaces the config's."""
    config_type = family(arch).config
    if model_config is not None and not isinstance(model_config, (dict, config_type)):
        raise ValueError(
            f"model.model_config is a {type(model_config).__name__} but model.arch={arch} takes "
            f"{config_type.__name__} fields; give the config of the chosen architecture"
        )
    if isinstance(model_config, config_type):
        overrides = ModelSpec.from_config(arch, size, model_config).overrides
    else:
        overrides = dict(model_config or {})
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return ModelSpec(arch, size, overrides)


class LanguageModelModule(L.LightningModule):
    def __init__(
        self,
        arch: str = "lswt",
        size: str = "debug",
        model_config: Any = None,
        vocab_size: int | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = WarmupCosine,
        aux_loss_weights: dict[str, float] | None = None,
        ignore_index: int = -100,
        accuracy_top_k: int = 5,
        carry_state: bool = False,
        simctg_margin: float = 0.5,
        warm_start: WarmStart | None = None,
        activation_checkpointing: bool = False,
        answer_loss_weight: float = 1.0,
    ):
        """
        Args:
            arch: Architecture name in the model registry (lswt, seqcond, serriform).
            size: Named size of that architecture (debug, tiny, ...).
            model_config: The architecture's config: on the command line its fields, defaulting to the named
                size's (`--help` lists them for the chosen arch); from Python a config or a dict of overrides.
            vocab_size: Vocabulary size; linked from the data, so it is normally not set by hand.
            optimizer: Optimizer class and its arguments; it receives parameter groups (no weight
                decay on biases, norms and flagged parameters).
            scheduler: Learning-rate schedule, stepped every optimizer step.
            aux_loss_weights: Weight of each named aux loss the model returns (0 logs it only).
            ignore_index: Target id excluded from the loss and the metrics (padding).
            accuracy_top_k: k of the top-k accuracy metric (`<stage>/top<k>_acc`).
            carry_state: Carry the model's state across batches (needs the "streams" data layout).
            simctg_margin: Margin rho of the SimCTG loss, computed when aux_loss_weights.simctg > 0.
            warm_start: Load the input embedding from a local Hugging Face directory: {path, freeze}
                (prepare the data with that directory's tokenizer: `--tokenizer <the same directory>`).
            activation_checkpointing: Recompute each block's activations in backward (set from
                parallelism.activation_checkpointing).
            answer_loss_weight: Weight of answer tokens (data with answer marks) in the cross-entropy that is
                trained on, relative to 1 for every other token; `<stage>/ce` stays the plain mean.
        """
        super().__init__()
        if answer_loss_weight <= 0:
            raise ValueError(f"model.answer_loss_weight={answer_loss_weight} must be > 0 (1 trains on plain CE)")
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "model_config"])
        # The one description of the model (saved in every checkpoint); fails here, before any training starts.
        self.spec = model_spec(arch, size, model_config, vocab_size)
        self.hparams["model_config"] = self.spec.overrides  # plain data, for loggers and weights-only loads
        self.model_config = self.spec.config()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.aux_loss_weights = {**DEFAULT_AUX_LOSS_WEIGHTS, **(aux_loss_weights or {})}
        self.model: nn.Module | None = None
        # One set of metric objects per stage (an attribute each: a ModuleDict key "train" would clash
        # with Module.train), so Lightning syncs and resets each at the end of its own loop.
        for stage in STAGES:
            metrics = {"ppl": Perplexity(), "acc": TokenAccuracy(1, ignore_index)}
            metrics[f"top{accuracy_top_k}_acc"] = TokenAccuracy(accuracy_top_k, ignore_index)
            setattr(self, f"{stage}_metrics", nn.ModuleDict(metrics))
            setattr(self, f"{stage}_answer_acc", AnswerExactMatch())  # logged for data with answer marks
        # Evaluation reports each aux loss over the whole evaluation, synced (e.g. `val/moe_balance`);
        # every aux loss a model returns has a weight here (combine_losses insists), so these cover it.
        for stage in EVAL_STAGES:
            aux_metrics = {name: TokenWeightedMean() for name in self.aux_loss_weights}
            setattr(self, f"{stage}_aux_metrics", nn.ModuleDict(aux_metrics))
        self._carried: dict[str, ModelState] = {}

    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self.trainer.strategy if self._trainer is not None else None
        self.model, self._no_decay = build_for_strategy(
            self._build_model, self.model_config, strategy, self.hparams.activation_checkpointing
        )
        if self.hparams.warm_start and self.hparams.warm_start.get("freeze"):
            self.model.embed.weight.requires_grad_(False)  # also on a sharded model built on the meta device

    def _build_model(self, config) -> nn.Module:
        """The model, its input embedding warm-started when asked. A sharding strategy also builds a copy on
        the meta device to wrap; that copy takes its weights from the materialised one."""
        model = family(self.spec.arch).model(config)
        if self.hparams.warm_start and not next(model.parameters()).is_meta:
            warm_start_embeddings(model, **self.hparams.warm_start)
        return model

    def forward(self, input_ids: Tensor, state: ModelState | None = None, **kwargs):
        return self.model(input_ids, state=state, **kwargs)

    # --- the one step -------------------------------------------------------------------------------
    def _shared_step(self, batch: dict[str, Tensor], stage: str, batch_idx: int) -> Tensor:
        input_ids, targets = batch["input_ids"], batch["targets"]
        key = self._state_key(stage, batch_idx)
        state = self._state_for(key, batch) if self.hparams.carry_state else None
        use_simctg = self.aux_loss_weights["simctg"] > 0
        out = self.model(input_ids, state=state, return_hidden=use_simctg)
        if self.hparams.carry_state:
            self._carried[key] = out.state.detach()
        if stage == "train":
            self._refresh_hessian(out.logits, targets, batch_idx)

        nll_sum, n_tokens = token_nll(out.logits, targets, self.hparams.ignore_index)
        ce = nll_sum / n_tokens.clamp(min=1)
        trained_ce = ce
        answer_weight = self.hparams.answer_loss_weight
        if answer_weight != 1.0 and "answer_mask" in batch:
            mask, ignore = batch["answer_mask"], self.hparams.ignore_index
            trained_ce = answer_weighted_ce(out.logits, targets, mask, answer_weight, ignore)
        aux_losses = dict(out.aux_losses)
        if use_simctg:
            valid = targets != self.hparams.ignore_index
            aux_losses["simctg"] = simctg_loss(out.hidden, valid, self.hparams.simctg_margin)
        loss = combine_losses(trained_ce, aux_losses, self.aux_loss_weights)

        on_step, batch_size = stage == "train", input_ids.shape[0]
        log = dict(on_step=on_step, on_epoch=not on_step, batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{stage}/loss", loss, prog_bar=True, **log)
        self.log(f"{stage}/ce", ce, **log)
        for name, value in aux_losses.items():
            if on_step:
                self.log(f"{stage}/{name}", value, **log)
            else:
                aux_metric = getattr(self, f"{stage}_aux_metrics")[name]
                aux_metric.update(value, input_ids.numel())  # the aux losses cover every input token
                self.log(f"{stage}/{name}", aux_metric, on_step=False, on_epoch=True)
        for name, metric in getattr(self, f"{stage}_metrics").items():
            args = (nll_sum, n_tokens) if name == "ppl" else (out.logits, targets)
            if on_step:
                metric(*args)  # forward() accumulates and keeps this step's value to log
            else:
                metric.update(*args)
            self.log(f"{stage}/{name}", metric, on_step=on_step, on_epoch=not on_step, prog_bar=name == "ppl")
        if "answer_mask" in batch:  # synthetic tasks: exact match of each row's answer tokens
            metric, args = getattr(self, f"{stage}_answer_acc"), (out.logits, targets, batch["answer_mask"])
            if on_step:
                metric(*args)
            else:
                metric.update(*args)
            self.log(f"{stage}/answer_acc", metric, on_step=on_step, on_epoch=not on_step)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test", batch_idx)

    # --- optimizer --------------------------------------------------------------------------------
    def _refresh_hessian(self, logits: Tensor, targets: Tensor, batch_idx: int) -> None:
        """SophiaG: on the first micro-batch of every `hessian_interval`-th optimizer step (step 0
        included, so h is never all zero), estimate the Hessian diagonal from this forward's logits.
        The estimate uses autograd.grad, so the gradients being accumulated are left alone."""
        optimizer = self.optimizers(use_pl_optimizer=False)
        if not isinstance(optimizer, SophiaG):
            return
        if batch_idx % self.trainer.accumulate_grad_batches or self.trainer.global_step % optimizer.hessian_interval:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.update_hessian(gauss_newton_bartlett(logits, targets != self.hparams.ignore_index, params))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(parameter_groups(named_parameters(self.model), self._no_decay))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosine) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- state carried across batches ----------------------------------------------------------------
    def _state_key(self, stage: str, batch_idx: int) -> str:
        """Training keeps one state per gradient-accumulation slot: micro-batch k of every optimizer
        step continues micro-batch k of the previous one (the data layout keeps row order per slot)."""
        slot = batch_idx % self.trainer.accumulate_grad_batches if stage == "train" else 0
        return f"{stage}:{slot}"

    def _state_for(self, key: str, batch: dict[str, Tensor]) -> ModelState | None:
        """The carried state of this slot, with the rows where a new stream begins started fresh (every
        family's state offers `reset_rows`, models/contract.py)."""
        state = self._carried.get(key)
        reset = batch.get("reset")  # (B,) True where a row starts a new stream
        if state is None or reset is None or not bool(reset.any()):
            return state
        if bool(reset.all()):
            return None
        return state.reset_rows(reset)

    def on_validation_epoch_start(self) -> None:
        self._carried = {k: v for k, v in self._carried.items() if not k.startswith("val:")}

    def on_test_epoch_start(self) -> None:
        self._carried = {k: v for k, v in self._carried.items() if not k.startswith("test:")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The tokenizer goes into the checkpoint, so generation needs nothing else; so does every rank's
        carried training state (gathered: it is per rank)."""
        checkpoint["model_spec"] = self.spec.to_dict()
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if getattr(datamodule, "tokenizer_spec", None) is not None:
            checkpoint["tokenizer"] = datamodule.tokenizer_spec
        if not self.hparams.carry_state:
            return
        local = {k: state_to_tree(v.to("cpu")) for k, v in self._carried.items() if k.startswith("train:")}
        world = self.trainer.world_size
        gathered = [local]
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, local)
        checkpoint["carried_state"] = {"world_size": world, "ranks": gathered}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        check_same_tokenizer(checkpoint.get("tokenizer"), getattr(datamodule, "tokenizer_spec", None), "the checkpoint")
        saved = checkpoint.get("carried_state")
        if not self.hparams.carry_state or not saved:
            return
        world = self.trainer.world_size if self._trainer is not None else 1
        if saved["world_size"] != world:
            raise ValueError(
                f"the checkpoint carries model state for {saved['world_size']} ranks but this run has {world}; "
                "resume with the same number of devices and nodes"
            )
        rank = self.global_rank if self._trainer is not None else 0
        device = self.device
        self._carried = {k: state_from_tree(v).to(device) for k, v in saved["ranks"][rank].items()}
