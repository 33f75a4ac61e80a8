"""Parameter groups and learning-rate schedules.

Weight decay applies to every parameter except those the model flags `_no_weight_decay = True` (each
layer flags its own in `__init__`: biases, norm scales, attention registers, SeqCond's frequency grid,
recurrence and MoE biases), which go to a group with weight_decay 0. Frozen parameters are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..models.contract import NO_WEIGHT_DECAY


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters flagged not to decay; read before a sharded strategy wraps the model (or a
    meta-device build is materialised), since that replaces the parameter objects and their flags but keeps
    their names."""
    return {n for n, p in model.named_parameters() if getattr(p, NO_WEIGHT_DECAY, False)}


def parameter_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], no_decay: set[str]) -> list[dict]:
    decay, plain = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (plain if name in no_decay else decay).append(p)
    return [{"params": decay}, {"params": plain, "weight_decay": 0.0}]


class WarmupCosine(LambdaLR):
    """Linear warmup from 0 to the base LR over `warmup_steps`, then cosine decay to
    `min_lr_ratio` x base LR at `total_steps` (held there after). Stepped once per optimizer step.

    `total_steps=None` means "the run's length": the LightningModule fills it from the Trainer.
    """

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int = 100, total_steps: int | None = None, min_lr_ratio: float = 0.1
    ):
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(
                f"WarmupCosine needs warmup_steps >= 0 and min_lr_ratio in [0, 1], got {warmup_steps}, {min_lr_ratio}"
            )
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        total = self.total_steps if self.total_steps is not None else step
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
