"""Loss terms computed by the training module from a model's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_nll(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed next-token negative log-likelihood (fp32, or fp64 for fp64 logits) and the number of
    targets it covers.

    logits (B, T, V), targets (B, T) holding `ignore_index` where nothing is predicted.
    """
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))  # (B*T, V)
    nll_sum = F.cross_entropy(logits, targets.flatten(), ignore_index=ignore_index, reduction="sum")
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


def simctg_loss(hidden: Tensor, valid: Tensor, margin: float = 0.5) -> Tensor:
    """SimCTG's contrastive term (Su et al. 2022; ARCHITECTURES.md §3.3), unweighted.

    With r_i = h_i / |h_i| the final hidden states of one sequence, every ordered pair i != j of valid
    tokens costs max(0, margin - 1 + r_i . r_j): identical directions cost `margin`, orthogonal ones
    nothing. The mean is over those pairs; pads (valid False) and the diagonal are excluded.
    hidden (B, T, D), valid (B, T) bool.
    """
    r = F.normalize(hidden.float(), dim=-1)
    similarity = r @ r.transpose(1, 2)  # (B, T, T)
    eye = torch.eye(hidden.shape[1], dtype=torch.bool, device=hidden.device)
    pairs = valid[:, :, None] & valid[:, None, :] & ~eye  # (B, T, T)
    cost = (margin - 1.0 + similarity).clamp(min=0.0)
    return (cost * pairs).sum() / pairs.sum().clamp(min=1)
