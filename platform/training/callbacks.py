"""Training callbacks, one concern each."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from platform.training.strategies import all_reduce_squares


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
        metrics = {"train/grad_norm": total}
        if self.per_block:
            metrics.update({f"grad_norm/{name}": value.sqrt() for name, value in squared.items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)


class PeriodicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves the final step when training stops between two periodic saves,
    so `--ckpt_path last` always continues from where the previous run ended."""

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
