"""Loss terms computed by the training module from a model's output."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def token_nll(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed next-token negative log-likelihood (fp32) and the number of targets it covers.

    logits (B, T, V), targets (B, T) holding `ignore_index` where nothing is predicted.
    """
    nll_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index, reduction="sum"
    )
    return nll_sum, (targets != ignore_index).sum()


def combine_losses(ce: Tensor, aux_losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """ce + sum of weight * aux loss. Every aux loss needs a weight: a silent default would hide a
    loss the model reports but training ignores."""
    missing = sorted(set(aux_losses) - set(weights))
    if missing:
        raise ValueError(
            f"the model returns aux loss '{missing[0]}' but model.aux_loss_weights has no weight for it; "
            f"set model.aux_loss_weights.{missing[0]} (0 logs it without training on it)"
        )
    total = ce
    for name, value in aux_losses.items():
        if weights[name]:
            total = total + weights[name] * value
    return total
