"""Metrics against hand computations, and under two real gloo ranks against one process."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lctrain.training.losses import token_nll
from lctrain.training.metrics import Perplexity, TokenAccuracy, TokenWeightedMean

IGNORE = -100


def hand_perplexity(logits, targets):
    """exp of the mean cross-entropy over non-ignored targets, one token at a time in float64."""
    total, count = 0.0, 0
    for row_logits, row_targets in zip(logits.double(), targets):
        for lg, t in zip(row_logits, row_targets):
            if t != IGNORE:
                total += -(lg[t] - torch.logsumexp(lg, 0)).item()
                count += 1
    return math.exp(total / count)


def hand_accuracy(logits, targets, k):
    hits = count = 0
    for lg, t in zip(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)):
        if t != IGNORE:
            count += 1
            hits += int(t.item() in lg.topk(k).indices.tolist())
    return hits / count


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 11, generator=g)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[0, :3] = IGNORE
    targets[2, 5:] = IGNORE
    return logits, targets


def test_perplexity_is_exp_of_mean_nll_over_non_ignored_tokens(batch):
    logits, targets = batch
    metric = Perplexity()
    nll, n = token_nll(logits, targets, IGNORE)
    metric.update(nll, n)
    assert n.item() == (targets != IGNORE).sum().item() == 16
    assert metric.compute().item() == pytest.approx(hand_perplexity(logits, targets), rel=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_accuracy_counts_only_non_ignored_targets(batch, k):
    logits, targets = batch
    metric = TokenAccuracy(top_k=k, ignore_index=IGNORE)
    metric.update(logits, targets)
    assert metric.compute().item() == pytest.approx(hand_accuracy(logits, targets, k))


def test_ignore_index_zero_matches_the_seeds_ignore_zero_metrics(batch):
    logits, targets = batch
    targets = targets.clamp(min=0)  # now 0 is the padding id
    metric = TokenAccuracy(top_k=1, ignore_index=0)
    metric.update(logits, targets)
    keep = targets != 0
    expected = (logits.argmax(-1)[keep] == targets[keep]).float().mean().item()
    assert metric.compute().item() == pytest.approx(expected)
    nll, n = token_nll(logits, targets, ignore_index=0)
    assert n.item() == keep.sum().item()
    assert (nll / n).item() == pytest.approx(F.cross_entropy(logits[keep], targets[keep]).item(), rel=1e-6)


def test_token_weighted_mean_weighs_each_batch_by_its_tokens():
    """Batches of 6, 2 and 12 tokens: the mean over tokens, not over batches (which would be 2.0)."""
    metric = TokenWeightedMean()
    for value, tokens in ((1.0, 6), (4.0, 2), (1.0, 12)):
        metric.update(torch.tensor(value), tokens)
    assert metric.compute().item() == pytest.approx((1.0 * 6 + 4.0 * 2 + 1.0 * 12) / 20)
    metric.reset()
    assert metric.compute().item() == 0.0


class _MetricsOnRanks(L.LightningModule):
    """Each rank updates the metrics with its own (uneven) share of the tokens."""

    def __init__(self, logits, targets, splits):
        super().__init__()
        self.logits, self.targets, self.splits = logits, targets, splits
        self.ppl, self.acc = Perplexity(), TokenAccuracy(top_k=2, ignore_index=IGNORE)
        self.layer = torch.nn.Linear(1, 1)
        self.results = None

    def training_step(self, batch, batch_idx):
        lo, hi = self.splits[self.global_rank]
        logits, targets = self.logits[lo:hi], self.targets[lo:hi]
        self.ppl.update(*token_nll(logits, targets, IGNORE))
        self.acc.update(logits, targets)
        return self.layer(batch).sum()

    def on_train_end(self):
        self.results = (self.ppl.compute().item(), self.acc.compute().item())
        self.trainer.strategy.barrier()
        if self.global_rank == 0:
            torch.save(self.results, self.out_path)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(1, 1), batch_size=1)


def test_two_ranks_with_uneven_tokens_agree_with_one_process(tmp_path, port, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(port))
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 9, 13, generator=g)
    targets = torch.randint(0, 13, (6, 9), generator=g)
    targets[5, 2:] = IGNORE
    splits = [(0, 5), (5, 6)]  # rank 0 holds 45 targets, rank 1 only 2
    module = _MetricsOnRanks(logits, targets, splits)
    module.out_path = tmp_path / "results.pt"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    ppl, acc = torch.load(module.out_path)
    assert ppl == pytest.approx(hand_perplexity(logits, targets), rel=1e-5)
    assert acc == pytest.approx(hand_accuracy(logits, targets, 2))
