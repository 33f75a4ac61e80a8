"""Token-level metrics as torchmetrics `Metric`s with sum states, so DDP sync is exact.

Every state is a sum reduced with `dist_reduce_fx="sum"`: ranks holding different numbers of
tokens combine into the value one process would compute over all tokens (a mean of per-rank
perplexities would not). Perplexity reuses the summed NLL the loss already computed instead of a
second softmax over the logits (the stock metric materialises one, in the logits' dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class Perplexity(Metric):
    """exp(summed token NLL / token count), accumulated in float64."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nll_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, count: Tensor) -> None:
        """nll_sum: summed negative log-likelihood (nats) of `count` non-ignored target tokens."""
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.count += count.detach().to(torch.long)

    def compute(self) -> Tensor:
        return torch.exp(self.nll_sum / self.count.clamp(min=1)).float()


class HitRate(Metric):
    """Fraction of counted tokens that are hits (micro average over tokens), from per-token flags.

    The training module computes the flags chunk by chunk beside the loss (losses.chunked_token_losses),
    so the accuracies never need the logits of a whole batch.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, hits: Tensor, counted: Tensor) -> None:
        """hits, counted: bool of one shape; a hit outside `counted` is not counted."""
        self.correct += (hits & counted).sum()
        self.total += counted.sum()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1).float()


class TokenAccuracy(HitRate):
    """Fraction of non-ignored targets found among the top-k logits (micro average over tokens)."""

    def __init__(self, top_k: int = 1, ignore_index: int = -100, **kwargs):
        super().__init__(**kwargs)
        if top_k < 1:
            raise ValueError(f"TokenAccuracy top_k={top_k} must be >= 1")
        self.top_k, self.ignore_index = top_k, ignore_index

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """logits (..., V), targets (...) with `ignore_index` where there is nothing to predict."""
        logits, targets = logits.detach().reshape(-1, logits.shape[-1]), targets.reshape(-1)
        k = min(self.top_k, logits.shape[-1])
        hits = (logits.topk(k, dim=-1).indices == targets.unsqueeze(-1)).any(dim=-1)  # (N,)
        super().update(hits, targets != self.ignore_index)


class RowExactMatch(Metric):
    """Fraction of rows whose answer tokens are all hits (synthetic tasks' exact match), from per-token flags.

    A row counts when it holds at least one answer token (`answer_mask`, on target positions); it is
    correct when every one of them is a hit (the argmax equals the target).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, hits: Tensor, answer_mask: Tensor) -> None:
        """hits (B, T) bool: argmax == target; answer_mask (B, T) bool."""
        wrong = ~hits & answer_mask  # (B, T)
        scored = answer_mask.any(dim=-1)  # (B,)
        self.correct += (scored & ~wrong.any(dim=-1)).sum()
        self.total += scored.sum()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1).float()


class AnswerExactMatch(RowExactMatch):
    """RowExactMatch with the hits taken from logits (B, T, V) and targets (B, T)."""

    def update(self, logits: Tensor, targets: Tensor, answer_mask: Tensor) -> None:
        """logits (B, T, V), targets (B, T), answer_mask (B, T) bool."""
        super().update(logits.detach().argmax(dim=-1) == targets, answer_mask)


class TokenWeightedMean(Metric):
    """Mean of per-batch values weighted by each batch's token count, accumulated in float64.

    For losses a model reports per batch (the MoE load-balance loss): each batch's value is already a
    mean over its tokens, so weighting by tokens gives the mean over the whole evaluation, the same on
    any number of ranks.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("weighted_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: Tensor, tokens: Tensor | int) -> None:
        """value: a scalar for one batch of `tokens` tokens."""
        tokens = torch.as_tensor(tokens, dtype=torch.float64, device=self.weight.device)
        self.weighted_sum += value.detach().to(torch.float64) * tokens
        self.weight += tokens

    def compute(self) -> Tensor:
        return (self.weighted_sum / self.weight.clamp(min=1)).float()
