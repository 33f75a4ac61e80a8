"""Training callbacks, one concern each."""

from __future__ import annotations

import math
import os
import re
import shutil
import statistics
from collections import deque

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..cluster.strategies import all_reduce_squares
from .checkpoints import AtomicCheckpointIO, link_atomically


def _squared_norm(grads: list[Tensor]) -> Tensor:
    """Sum of squared L2 norms; sharded (DTensor) gradients are reduced across their ranks."""
    total = torch.zeros((), dtype=torch.float32)
    for g in grads:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total = total.to(norm.device) + norm.square()
    return total


def gradient_groups(model: nn.Module) -> dict[str, list[Tensor]]:
    """Gradients grouped by the model's top-level children, each element of a ModuleList (the blocks)
    in a group of its own: {"embed": [...], "blocks.0": [...], ..., "norm": [...]}."""
    groups: dict[str, list[Tensor]] = {}
    for child_name, child in model.named_children():
        members = child.named_children() if isinstance(child, nn.ModuleList) else [(None, child)]
        for index, module in members:
            name = child_name if index is None else f"{child_name}.{index}"
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            if grads:
                groups[name] = grads
    top_level = [p.grad for p in model.parameters(recurse=False) if p.grad is not None]
    if top_level:
        groups["params"] = top_level
    return groups


class GradNormMonitor(L.Callback):
    """Logs `train/grad_norm` (all parameters) and `grad_norm/<block>` every `every_n_steps` optimizer
    steps. Lightning calls `on_before_optimizer_step` after AMP unscaling and before gradient clipping,
    so these are the true gradients the clipping then acts on."""

    def __init__(self, every_n_steps: int = 50, per_block: bool = True):
        """
        Args:
            every_n_steps: Log every this many optimizer steps (0 turns the monitor off).
            per_block: Also log one norm per block and per top-level module.
        """
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"grad_norm.every_n_steps={every_n_steps} must be >= 0")
        self.every_n_steps, self.per_block = every_n_steps, per_block

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self.every_n_steps or trainer.global_step % self.every_n_steps:
            return
        groups = gradient_groups(pl_module.model)
        squared = {name: _squared_norm(grads) for name, grads in groups.items()}
        if not squared:  # DeepSpeed ZeRO-2/3 keep gradients in their own buffers: nothing to measure here
            return
        squared = dict(zip(squared, all_reduce_squares(torch.stack(list(squared.values())), trainer)))
        total = torch.stack(list(squared.values())).sum().sqrt()
        metrics = {"train/grad_norm": total.item()}
        if self.per_block:
            metrics.update({f"grad_norm/{name}": value.sqrt().item() for name, value in squared.items()})
        log_to_loggers(trainer, metrics)


class NonFiniteTrainingError(ValueError):
    """The run stopped because its gradients stayed NaN or inf (a diverging learning rate, bad data)."""


class NonFiniteGuard(L.Callback):
    """Skips an optimizer step whose gradients hold NaN or inf (a non-finite loss makes them so) and stops
    the run after `max_consecutive` such steps in a row.

    A skipped step drops its gradients before the optimizer sees them, so the weights stay finite and every
    checkpoint holds finite weights; the count is logged as `train/skipped_steps`. All ranks take the same
    decision (a sharded gradient may be non-finite on one rank only). The check is one norm over every
    gradient and a host sync per optimizer step.
    """

    def __init__(self, max_consecutive: int = 3):
        """
        Args:
            max_consecutive: Stop after this many skipped steps in a row (0 turns the guard off: non-finite
                steps are then applied).
        """
        super().__init__()
        if max_consecutive < 0:
            raise ValueError(f"nan_guard.max_consecutive={max_consecutive} must be >= 0 (0 turns the guard off)")
        self.max_consecutive = max_consecutive
        self.consecutive = self.skipped = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self.max_consecutive:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:  # DeepSpeed ZeRO-2/3 keep gradients in their own buffers (it skips overflows itself)
            return
        finite = bool(torch.isfinite(all_reduce_squares(_squared_norm(grads), trainer)))
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        optimizer.zero_grad(set_to_none=True)  # optimizers skip parameters without a gradient
        log_to_loggers(trainer, {"train/skipped_steps": self.skipped})
        step = trainer.global_step + 1
        rank_zero_warn(f"optimizer step {step}: NaN or inf gradients, step skipped ({self.consecutive} in a row)")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"training stopped at optimizer step {step}: the gradients were NaN or inf at {self.consecutive} "
                f"steps in a row (nan_guard.max_consecutive={self.max_consecutive}); the weights and checkpoints "
                "stay finite: lower the learning rate or check the data, then resume with --ckpt_path last"
            )

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.consecutive, self.skipped = state_dict["consecutive"], state_dict["skipped"]


class LossSpikeDetector(L.Callback):
    """Logs a training loss far above its recent values: more than `threshold` standard deviations over the
    mean of the last `window` finite losses. Nothing is skipped (the NaN guard handles non-finite steps); a
    spike is counted as `train/loss_spikes`, its size as `train/loss_spike_z`, and warned about, so a run
    that is starting to diverge is visible before it fails."""

    def __init__(self, window: int = 128, threshold: float = 6.0, min_history: int = 32):
        """
        Args:
            window: Losses (micro-batches) the mean and standard deviation are taken over (0 turns it off).
            threshold: A loss this many standard deviations above the mean is a spike.
            min_history: Losses seen before the first judgement (the first steps fall fast).
        """
        super().__init__()
        if window < 0 or threshold <= 0 or min_history < 2:
            raise ValueError(
                f"loss_spike.window={window} must be >= 0, loss_spike.threshold={threshold} > 0 and "
                f"loss_spike.min_history={min_history} >= 2"
            )
        self.window, self.threshold, self.min_history = window, threshold, min(min_history, max(window, 2))
        self.recent: deque[float] = deque(maxlen=max(window, 1))
        self.spikes = 0
        self.pending: list[tuple[int, Tensor]] = []  # (step, loss) not yet observed

    def observe(self, loss: float) -> float | None:
        """Take one loss; return its z-score when it is a spike, else None."""
        if not math.isfinite(loss):
            return None
        z = None
        if len(self.recent) >= self.min_history:
            mean = statistics.fmean(self.recent)
            std = statistics.pstdev(self.recent, mean)
            score = (loss - mean) / max(std, 1e-12 * max(abs(mean), 1.0))
            if score > self.threshold:
                z, self.spikes = score, self.spikes + 1
        self.recent.append(loss)
        return z

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not self.window or not isinstance(loss, Tensor):
            return
        # Kept on the device and judged every log_every_n_steps steps: reading each loss at once would make
        # the host wait for the device after every batch.
        self.pending.append((trainer.global_step, loss.detach()))
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self.judge_pending(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.judge_pending(trainer)

    def judge_pending(self, trainer: L.Trainer | None) -> None:
        """Observe the losses kept since the last call, in order; log and warn about each spike at its step."""
        if not self.pending:
            return
        steps, losses = zip(*self.pending)
        self.pending = []
        for step, loss in zip(steps, torch.stack(losses).float().tolist()):
            z = self.observe(loss)
            if z is None or trainer is None:
                continue
            log_to_loggers(trainer, {"train/loss_spike_z": z, "train/loss_spikes": self.spikes}, step=step)
            rank_zero_warn(
                f"step {step}: training loss {loss:.4g} is {z:.1f} standard deviations above the mean of the "
                f"last {len(self.recent) - 1} (spike {self.spikes})"
            )

    def state_dict(self) -> dict:
        self.judge_pending(None)  # a checkpoint holds every loss seen so far
        return {"recent": list(self.recent), "spikes": self.spikes}

    def load_state_dict(self, state_dict: dict) -> None:
        self.recent.extend(state_dict["recent"])
        self.spikes = state_dict["spikes"]


def log_to_loggers(trainer: L.Trainer, metrics: dict, step: int | None = None) -> None:
    """Straight to the loggers, at the step the module's metrics of this optimizer step use (or `step`). A
    value measured every N steps logged through `LightningModule.log` would be written again at every later
    flush until the next measurement, i.e. at the wrong steps."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step if step is None else step)


def moe_layer_key(name: str) -> str:
    """The key of an MoE layer in logs: "blocks.3.moe" -> "layer3", after the block that holds it."""
    index = re.search(r"\d+", name)
    return f"layer{index.group()}" if index else name.replace(".", "/")


class ExpertUsageMonitor(L.Callback):
    """Logs how evenly each MoE layer spreads its tokens over its experts, every `every_n_steps` optimizer steps.

    Reads the model contract's monitoring interface (models/contract.py): `model.moe_layers()` lists (name, layer)
    pairs whose `layer.tokens_per_expert` (E,) counts the routed slots of every training forward since the last
    `layer.reset_counters()`. A model without MoE layers lists none and is left alone. The counts
    are summed over data-parallel ranks, so the fractions are those of every token the step(s) trained on,
    then reset: each logged value covers the steps since the previous one. Per layer (`moe/layer<i>/...`):
    `min_fraction` and `max_fraction` of the routed slots an expert received, and `imbalance` = max/mean
    (1 when perfectly even, E when one expert takes every slot); with a WandbLogger attached, also
    `tokens_per_expert` as a W&B histogram with one bin per expert. The aux losses themselves are logged
    by the training module (`train/moe_balance`, `val/moe_balance`, ...).

    Values go straight to the loggers at the step the module's own metrics of that step use, so they are
    written every `every_n_steps` whatever `trainer.log_every_n_steps` is.
    """

    def __init__(self, every_n_steps: int = 50):
        """
        Args:
            every_n_steps: Log every this many optimizer steps (0 turns the monitor off).
        """
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"expert_usage.every_n_steps={every_n_steps} must be >= 0 (0 turns it off)")
        self.every_n_steps = every_n_steps

    @staticmethod
    def moe_layers(pl_module: L.LightningModule) -> list[tuple[str, nn.Module]]:
        return list(pl_module.model.moe_layers())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for _, layer in self.moe_layers(pl_module):
            layer.reset_counters()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        """Here every micro-batch of the step has run its forward (gradient accumulation included)."""
        layers = self.moe_layers(pl_module)
        if not self.every_n_steps or trainer.global_step % self.every_n_steps or not layers:
            return
        local = torch.cat([layer.tokens_per_expert.detach().float() for _, layer in layers])  # (sum of E,)
        counts = trainer.strategy.reduce(local.clone(), reduce_op="sum")  # a collective: every rank calls it
        for _, layer in layers:
            layer.reset_counters()
        if trainer.is_global_zero:
            fractions = {}
            sizes = [layer.tokens_per_expert.numel() for _, layer in layers]
            for (name, _), counts_E in zip(layers, counts.cpu().split(sizes)):
                if counts_E.sum() > 0:
                    fractions[moe_layer_key(name)] = counts_E / counts_E.sum()
            if fractions:
                self._log(trainer, fractions)

    @staticmethod
    def _log(trainer: L.Trainer, fractions: dict[str, Tensor]) -> None:
        scalars = {}
        for key, fraction_E in fractions.items():
            scalars[f"moe/{key}/min_fraction"] = fraction_E.min().item()
            scalars[f"moe/{key}/max_fraction"] = fraction_E.max().item()
            scalars[f"moe/{key}/imbalance"] = (fraction_E.max() / fraction_E.mean()).item()
        for logger in trainer.loggers:
            metrics = dict(scalars)
            if isinstance(logger, WandbLogger):
                import wandb

                for key, fraction_E in fractions.items():
                    bins = list(range(len(fraction_E) + 1))  # one bin per expert: [e, e + 1)
                    metrics[f"moe/{key}/tokens_per_expert"] = wandb.Histogram(np_histogram=(fraction_E.tolist(), bins))
            logger.log_metrics(metrics, step=trainer.global_step)


class PeriodicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves the final step when training stops between two periodic saves,
    so `--ckpt_path last` always continues from where the previous run ended, and never leaves a file
    half-written: single-file saves go through AtomicCheckpointIO and `last.ckpt` is relinked in one rename
    (training/checkpoints.py)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # sharded strategies keep their own
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                shutil.rmtree(linkpath)  # a sharded `last` saved whole before
            link_atomically(filepath, linkpath)
        trainer.strategy.barrier()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._every_n_train_steps and self._last_global_step_saved != trainer.global_step:
            self.save_now(trainer)
        super().on_train_end(trainer, pl_module)

    def save_now(self, trainer: L.Trainer) -> str:
        """Save the current step as a periodic checkpoint (and `last`); returns its path. Used at the end of
        training and by the requeue callback."""
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        return self.last_model_path or self.best_model_path
