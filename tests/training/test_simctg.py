"""SimCTG (docs/architectures.md): its values at the extremes, pads, the float64 pair loop,
and its place in training as the named aux loss "simctg"."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lctrain.training.losses import simctg_loss
from lctrain.training.module import LanguageModelModule
from tests.reference.lswt import simctg


def test_identical_representations_cost_the_margin():
    hidden = torch.randn(1, 1, 16).expand(3, 7, 16) * torch.rand(3, 7, 1)  # one direction, any length
    assert simctg_loss(hidden, torch.ones(3, 7, dtype=torch.bool), margin=0.5).item() == pytest.approx(0.5)


def test_mutually_orthogonal_representations_cost_nothing():
    hidden = torch.eye(8)[None, :6] * 3.0  # 6 orthogonal directions of one sequence
    assert simctg_loss(hidden, torch.ones(1, 6, dtype=torch.bool), margin=0.5).item() == 0.0


def test_pads_are_masked():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 12, generator=g)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 5:] = False
    changed = hidden.clone()
    changed[1, 5:] = torch.randn(4, 12, generator=g)
    assert simctg_loss(hidden, valid).item() == simctg_loss(changed, valid).item()


def test_matches_the_float64_pair_loop():
    """Random hidden states with pads, margin 0.7: ≤1e-6 (fp32 against the float64 loop)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 5, generator=g) + 1.0  # shared offset: many pairs inside the margin
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    assert simctg_loss(hidden, valid, margin=0.7).item() == pytest.approx(simctg(hidden, valid, 0.7), abs=1e-6)


class _Batches(L.LightningDataModule):
    def train_dataloader(self):
        ids = torch.randint(0, 64, (2, 3, 11), generator=torch.Generator().manual_seed(0))
        targets = ids[:, :, 1:].clone()
        targets[:, 0, -3:] = -100  # pads
        batches = [{"input_ids": i[:, :-1], "targets": t} for i, t in zip(ids, targets)]
        return torch.utils.data.DataLoader(batches, batch_size=None)


class _Record(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss, self.metrics = outputs["loss"].item(), dict(trainer.callback_metrics)


def test_training_adds_the_weighted_simctg_loss_and_logs_it(tmp_path):
    torch.manual_seed(0)
    lm = LanguageModelModule(
        "lswt", "debug", vocab_size=64, aux_loss_weights={"simctg": 2.0}, simctg_margin=0.5, scheduler=None
    )
    record = _Record()
    L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[record],
    ).fit(lm, datamodule=_Batches())  # fmt: skip
    ce, contrastive = record.metrics["train/ce"].item(), record.metrics["train/simctg"].item()
    assert 0.0 < contrastive <= 0.5
    assert record.loss == pytest.approx(ce + 2.0 * contrastive, rel=1e-6)
