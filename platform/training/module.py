"""`LanguageModelModule`: trains any registered architecture as a causal language model.

One `_shared_step` serves train, validation and test: the model's forward, cross-entropy over the
non-ignored targets, the model's named aux losses times their configured weights, and token metrics
(perplexity, accuracy, top-k accuracy; in validation and test also each aux loss as a token-weighted
mean) as torchmetrics objects that Lightning syncs and resets. The output head, the cross-entropy and the
accuracies run `loss_chunk_size` tokens at a time (losses.head_losses), so a batch's full logits never
exist; training computes the metrics only on the steps it logs. The model is built in `configure_model`,
so sharded strategies can wrap it before it is materialised.
With `carry_state`, the model's state is carried from one batch to the next (Transformer-XL memory,
recurrent state): one state per gradient-accumulation slot, detached between steps, kept in the
checkpoint so a resumed run continues exactly. Optional: the weights of another model to start from
(`init_from`, training/init_from.py), warm-started embeddings, the SimCTG aux loss
(asks the model for its final hidden states), and SophiaG's Hessian refresh (training/sophia.py).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from ..cluster.strategies import build_for_strategy, named_parameters
from ..data.tokenizer import check_same_tokenizer
from ..models.layers.scan import settle_kernel_checks
from ..models.output import ModelState, state_from_tree, state_to_tree
from ..models.registry import family
from ..models.spec import ModelSpec
from .init_from import WeightsSource, check_fits, load_source_weights, read_source
from .losses import combine_losses, head_losses, simctg_loss, token_weights
from .metrics import HitRate, Perplexity, RowExactMatch, TokenWeightedMean
from .optimizers import WarmupCosine, parameter_groups
from .sophia import SophiaG, gauss_newton_bartlett
from .warm_start import WarmStart, warm_start_embeddings

STAGES = ("train", "val", "test")
EVAL_STAGES = ("val", "test")
DEFAULT_AUX_LOSS_WEIGHTS = {"moe_balance": 0.01, "router_entropy": 0.0, "simctg": 0.0}


def check_optimization(optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None) -> None:
    """Build the optimizer and the schedule once on a stand-in parameter, so that a bad argument (a negative
    learning rate, warmup or decay) is named at start-up rather than when training begins."""
    try:
        trial = optimizer([nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as e:
        raise ValueError(f"model.optimizer: {e}; check --model.optimizer.init_args") from None
    if scheduler is None:
        return
    try:
        scheduler(trial)
    except (ValueError, TypeError) as e:
        raise ValueError(f"model.scheduler: {e}; check --model.scheduler.init_args") from None


COMPILE_OPTIONS = ("mode", "dynamic", "fullgraph", "backend")


def compile_options(value: bool | dict[str, Any] | None) -> dict[str, Any] | None:
    """torch.compile's keyword arguments from `model.compile` (true: the defaults), or None when it is off."""
    if not value:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"model.compile={value!r}: give true/false or a dict of {', '.join(COMPILE_OPTIONS)}")
    unknown = sorted(set(value) - set(COMPILE_OPTIONS))
    if unknown:
        raise ValueError(f"model.compile.{unknown[0]} is not a compile option; use {', '.join(COMPILE_OPTIONS)}")
    return dict(value)


def compile_blocks(model: nn.Module, options: dict[str, Any], device: torch.device | None = None) -> None:
    """Compile each repeated block in place (`Module.compile`): parameter names, FSDP2's per-block sharding
    and the per-block activation checkpointing (an overridden `forward`, traced inside the compiled call)
    stay as they are, and one compiled graph serves every block of the same shape. The Triton kernels'
    checks for `device` run first: a graph traced before them would keep the PyTorch path."""
    if device is not None:
        settle_kernel_checks(model, device)
    for block in model.blocks:
        block.compile(**options)


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
        init_from: str | None = None,
        loss_chunk_size: int | None = 1024,
        compile: bool | dict[str, Any] = False,
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
            init_from: Start from the weights of a run directory, a checkpoint file, a sharded checkpoint or
                an exported Hugging Face directory: a new run (fresh optimizer, schedule, data position, step
                0), e.g. fine-tuning on other data. The model must have the source's parameter shapes (the
                command line takes arch, size and config from the source unless set) and the data its
                vocabulary. A resumed run takes its weights from the checkpoint instead.
            loss_chunk_size: Tokens per chunk of the output head and the cross-entropy (and the accuracies): the
                logits of at most this many tokens exist at once (each chunk's gradient is taken as it goes),
                instead of the whole batch's (B*T*V floats, and as much again for their gradient). 1024 keeps a
                chunk's fp32 logits at 4 KB per vocabulary entry (0.4 GB at 100k) while each chunk's matmuls
                stay large enough to run at full speed; None or 0 computes the full logits at once, as does a
                batch of at most 2^24 logits (losses.SMALL_LOGITS: e.g. a byte-level vocabulary's).
            compile: torch.compile each of the model's blocks (after sharding and activation checkpointing
                are applied, which keep working): true, or the options {mode, dynamic, fullgraph, backend}
                of torch.compile, e.g. {mode: max-autotune} or {dynamic: true} for changing lengths. Every
                family's forward compiles without graph breaks.
        """
        super().__init__()
        if answer_loss_weight <= 0:
            raise ValueError(f"model.answer_loss_weight={answer_loss_weight} must be > 0 (1 trains on plain CE)")
        if accuracy_top_k < 1:
            raise ValueError(f"model.accuracy_top_k={accuracy_top_k} must be >= 1")
        compile_options(compile)  # a bad option is named now
        if loss_chunk_size is not None and loss_chunk_size < 0:
            raise ValueError(f"model.loss_chunk_size={loss_chunk_size} must be >= 1 (or 0/null for full logits)")
        check_optimization(optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "model_config"])
        # The one description of the model (saved in every checkpoint); fails here, before any training starts.
        self.spec = model_spec(arch, size, model_config, vocab_size)
        self.hparams["model_config"] = self.spec.overrides  # plain data, for loggers and weights-only loads
        self.model_config = self.spec.config()
        # The weights to start from: checked against this model now, read when the model is built.
        self.init_source: WeightsSource | None = None
        if init_from is not None:
            if warm_start:
                raise ValueError("model.init_from and model.warm_start both set the weights; give one of them")
            self.init_source = read_source(init_from)
            check_fits(self.init_source, self.spec)
        self.resuming = False  # set by the command line when it resumes: the checkpoint's weights win
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.aux_loss_weights = {**DEFAULT_AUX_LOSS_WEIGHTS, **(aux_loss_weights or {})}
        self.model: nn.Module | None = None
        # One set of metric objects per stage (an attribute each: a ModuleDict key "train" would clash
        # with Module.train), so Lightning syncs and resets each at the end of its own loop.
        for stage in STAGES:
            metrics = {"ppl": Perplexity(), "acc": HitRate(), f"top{accuracy_top_k}_acc": HitRate()}
            setattr(self, f"{stage}_metrics", nn.ModuleDict(metrics))
            setattr(self, f"{stage}_answer_acc", RowExactMatch())  # logged for data with answer marks
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
        options = compile_options(self.hparams.compile)
        if options is not None:
            compile_blocks(self.model, options, strategy.root_device if strategy is not None else None)

    def _build_model(self, config) -> nn.Module:
        """The model, its input embedding warm-started when asked. A sharding strategy also builds a copy on
        the meta device to wrap; that copy takes its weights from the materialised one."""
        model = family(self.spec.arch).model(config)
        if next(model.parameters()).is_meta:
            return model
        if self.hparams.warm_start:
            warm_start_embeddings(model, **self.hparams.warm_start)
        if self.init_source is not None and not self.resuming:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            tokenizer = getattr(datamodule, "tokenizer_spec", None)
            check_same_tokenizer(self.init_source.tokenizer, tokenizer, f"--model.init_from {self.init_source.path}")
            load_source_weights(model, self.init_source)
        return model

    def forward(self, input_ids: Tensor, state: ModelState | None = None, **kwargs):
        return self.model(input_ids, state=state, **kwargs)

    # --- the one step -------------------------------------------------------------------------------
    def _shared_step(self, batch: dict[str, Tensor], stage: str, batch_idx: int) -> Tensor:
        input_ids, targets = batch["input_ids"], batch["targets"]
        key = self._state_key(stage, batch_idx)
        state = self._state_for(key, batch) if self.hparams.carry_state else None
        use_simctg = self.aux_loss_weights["simctg"] > 0
        chunk_size = self.hparams.loss_chunk_size
        want_hidden = use_simctg or bool(chunk_size)
        out = self.model(input_ids, state=state, return_hidden=want_hidden, return_logits=not chunk_size)
        if self.hparams.carry_state:
            self._carried[key] = out.state.detach()
        if stage == "train":
            self._refresh_hessian(out, targets, batch_idx)

        # The loss and, on steps that log them, the accuracies, from one pass over the output head.
        ignore = self.hparams.ignore_index
        with_metrics = stage != "train" or self._logs_this_step()
        head, features = (self._output_head(), out.hidden) if chunk_size else (_identity, out.logits)
        top_k = self.hparams.accuracy_top_k if with_metrics else None
        # the trained CE weighs answer tokens by answer_loss_weight (data with answer marks); `ce` is the plain mean
        weights = token_weights(targets, ignore, batch.get("answer_mask"), self.hparams.answer_loss_weight)
        losses = head_losses(head, features, targets, weights, ignore, chunk_size, top_k)
        if chunk_size and not torch.is_grad_enabled() and isinstance(self.model, FSDPModule):
            self.model.reshard()  # evaluation: gathered by _output_head, nothing else frees them
        trained_ce = losses.loss
        valid = targets != ignore
        nll_sum, n_tokens = losses.nll.sum(), valid.sum()
        ce = nll_sum / n_tokens.clamp(min=1)
        aux_losses = dict(out.aux_losses)
        if use_simctg:
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
        if not with_metrics:  # training steps between two logged ones: the loss alone
            return loss
        metric_args = {"ppl": (nll_sum, n_tokens), "acc": (losses.top1.view_as(valid), valid)}
        for name, metric in getattr(self, f"{stage}_metrics").items():
            args = metric_args.get(name, (losses.topk.view_as(valid), valid))  # the top-k accuracy
            if on_step:
                metric(*args)  # forward() accumulates and keeps this step's value to log
            else:
                metric.update(*args)
            self.log(f"{stage}/{name}", metric, on_step=on_step, on_epoch=not on_step, prog_bar=name == "ppl")
        if "answer_mask" in batch:  # synthetic tasks: exact match of each row's answer tokens
            metric, args = getattr(self, f"{stage}_answer_acc"), (losses.top1.view_as(valid), batch["answer_mask"])
            if on_step:
                metric(*args)
            else:
                metric.update(*args)
            self.log(f"{stage}/answer_acc", metric, on_step=on_step, on_epoch=not on_step)
        return loss

    def _output_head(self):
        """The model's output head, callable after its forward: FSDP2 may have freed the root's gathered
        parameters (the embedding, the head) once the forward returned, so they are gathered again (a no-op
        while they still are); in training its backward frees them."""
        if isinstance(self.model, FSDPModule):
            self.model.unshard()
        return self.model.output_head

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this training step's values to the loggers (every log_every_n_steps):
        the accuracies cost a top-k over the vocabulary for every token, so other steps skip them."""
        if self._trainer is None:
            return True
        return self.trainer._logger_connector.should_update_logs

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test", batch_idx)

    # --- optimizer --------------------------------------------------------------------------------
    def _refresh_hessian(self, out, targets: Tensor, batch_idx: int) -> None:
        """SophiaG: on the first micro-batch of every `hessian_interval`-th optimizer step (step 0
        included, so h is never all zero), estimate the Hessian diagonal from this forward's logits
        (the whole batch's, computed from the hidden states when the loss is chunked).
        The estimate uses autograd.grad, so the gradients being accumulated are left alone."""
        optimizer = self.optimizers(use_pl_optimizer=False)
        if not isinstance(optimizer, SophiaG):
            return
        if batch_idx % self.trainer.accumulate_grad_batches or self.trainer.global_step % optimizer.hessian_interval:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        logits = out.logits if out.logits is not None else self._output_head()(out.hidden)  # (B, T, V)
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


def _identity(x: Tensor) -> Tensor:
    """The output head when the model already returned logits."""
    return x
