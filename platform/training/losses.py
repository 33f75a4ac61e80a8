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


def answer_weighted_ce(
    logits: Tensor, targets: Tensor, answer_mask: Tensor, answer_weight: float, ignore_index: int = -100
) -> Tensor:
    """Cross-entropy with weight `answer_weight` on answer tokens and 1 on the others: sum(w·nll) / sum(w).

    A synthetic task's answer is a few tokens of a long row (a passkey: 3-5 of 256), so plain CE gives
    retrieval little weight next to the filler; up-weighting them lets a small model learn it in-window.
    logits (B, T, V), targets (B, T), answer_mask (B, T) bool on target positions.
    """
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))  # (B*T, V)
    nll = F.cross_entropy(logits, targets.flatten(), ignore_index=ignore_index, reduction="none")  # (B*T,)
    valid = (targets != ignore_index).flatten()
    weights = torch.where(answer_mask.flatten(), answer_weight, 1.0).to(nll.dtype) * valid  # (B*T,)
    return (nll * weights).sum() / weights.sum().clamp(min=1e-12)


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
    """SimCTG's contrastive term (Su et al. 2022; docs/architectures.md), unweighted.

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
