"""Answer exact match against a loop reference, and under two gloo ranks against one process."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lctrain.training.metrics import AnswerExactMatch
from tests.reference.answer_match import answer_exact_match


def answer_batch(seed=0, B=7, T=11, V=13):
    """Targets equal to the argmax on most answer tokens, so some rows are right and some wrong; one row has no
    answer at all (it must not count)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    targets = logits.argmax(-1)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 7:10] = True
    mask[2] = False
    flip = torch.rand(B, T, generator=g) < 0.15
    targets = torch.where(flip, (targets + 1) % V, targets)
    return logits, targets, mask


def test_exact_match_equals_the_loop_reference():
    values = []
    for seed in range(5):
        logits, targets, mask = answer_batch(seed)
        metric = AnswerExactMatch()
        metric.update(logits, targets, mask)
        values.append(answer_exact_match(logits, targets, mask))
        assert metric.compute().item() == pytest.approx(values[-1], abs=1e-7)
    assert any(0 < v < 1 for v in values), "some batches should hold right and wrong rows"


def test_a_row_is_wrong_when_any_one_answer_token_is_wrong():
    logits, targets, mask = answer_batch()
    metric = AnswerExactMatch()
    metric.update(logits, logits.argmax(-1), mask)
    assert metric.compute().item() == 1.0
    wrong = logits.argmax(-1)
    wrong[0, 9] = (wrong[0, 9] + 1) % 13
    metric.reset()
    metric.update(logits, wrong, mask)
    assert metric.compute().item() == pytest.approx(5 / 6)  # 6 scored rows (row 2 has no answer), one wrong


class _AnswersOnRanks(L.LightningModule):
    def __init__(self, batch, splits, out_path):
        super().__init__()
        self.batch, self.splits, self.out_path = batch, splits, out_path
        self.metric = AnswerExactMatch()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        lo, hi = self.splits[self.global_rank]
        self.metric.update(*(x[lo:hi] for x in self.batch))
        return self.layer(batch).sum()

    def on_train_end(self):
        value = self.metric.compute().item()
        if self.global_rank == 0:
            torch.save(value, self.out_path)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(1, 1), batch_size=1)


def test_two_ranks_with_uneven_rows_agree_with_one_process(tmp_path, port, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(port))
    batch = answer_batch(3)
    module = _AnswersOnRanks(batch, [(0, 6), (6, 7)], tmp_path / "value.pt")
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
    assert torch.load(tmp_path / "value.pt") == pytest.approx(answer_exact_match(*batch))
