"""The random-state helpers: every kind of generator round-trips through a checkpoint file, training batches
draw from a stream that nothing between them disturbs, two ranks keep and resume their own streams, and a
change of world size reseeds reproducibly."""

from __future__ import annotations

import io
import random
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lctrain.training.random_state import (
    TrainingRandomState,
    capture,
    derived_seed,
    module_generators,
    restore,
    seeded,
)


class Noisy(nn.Module):
    """A model that keeps a generator of its own, one level down."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Module()
        self.inner.generator = torch.Generator().manual_seed(7)
        self.linear = nn.Linear(2, 2)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
KINDS = ["python", "numpy", "torch", "model", *(["cuda"] if torch.cuda.is_available() else [])]


def draws(model: Noisy) -> dict[str, object]:
    """A few numbers from every generator the helpers cover."""
    out = {
        "python": [random.random() for _ in range(3)],
        "numpy": np.random.rand(3).tolist() + [np.random.randn()],  # randn leaves a cached Gaussian
        "torch": torch.rand(3).tolist(),
        "model": torch.rand(3, generator=model.inner.generator).tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [torch.rand(3, device=f"cuda:{i}").tolist() for i in range(torch.cuda.device_count())]
    return out


def through_a_file(state):
    """What a checkpoint gives back: torch.save, then torch.load with weights_only (as Lightning resumes)."""
    buffer = io.BytesIO()
    torch.save({"random_state": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["random_state"]


def test_module_generators_finds_generators_on_submodules_by_name():
    model = Noisy()
    assert module_generators(model) == {"inner.generator": model.inner.generator}
    assert module_generators(nn.Linear(2, 2)) == {} and module_generators(None) == {}


def test_every_generator_draws_the_same_numbers_after_a_restore_from_a_file():
    model = Noisy()
    np.random.randn()  # a cached Gaussian is part of NumPy's state
    state = through_a_file(capture(model))
    first = draws(model)
    restore(state, model)
    assert draws(model) == first
    restore(state, model)
    assert draws(model) != draws(model)  # the generators move on: the equality above is not trivial


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_restored_on_its_own(kind):
    """A failure names the kind of generator that a restore missed."""
    model = Noisy()
    state = through_a_file(capture(model))
    first = draws(model)[kind]
    restore(state, model)
    assert draws(model)[kind] == first


def test_seeded_leaves_the_generators_alone_and_depends_only_on_the_seed():
    model = Noisy()
    before = capture(model)
    one, two = seeded(5, model), seeded(5, model)
    assert capture(model)["torch"].equal(before["torch"])
    restore(one, model)
    first = draws(model)
    restore(two, model)
    assert draws(model) == first
    restore(seeded(6, model), model)
    assert draws(model) != first


def fake_trainer(world_size: int, global_rank: int):
    return SimpleNamespace(world_size=world_size, global_rank=global_rank)


def run_batch(callback: TrainingRandomState, model: nn.Module) -> list[float]:
    """One training batch under the callback: what it draws."""
    callback.on_train_batch_start(None, model, None, 0)
    drawn = torch.rand(4).tolist()
    callback.on_train_batch_end(None, model, None, None, 0)
    return drawn


def test_draws_between_batches_do_not_change_what_the_next_batch_draws():
    model = Noisy()
    quiet, busy = TrainingRandomState(), TrainingRandomState()
    torch.manual_seed(0)
    expected = [run_batch(quiet, model) for _ in range(3)]
    torch.manual_seed(0)
    got = []
    for _ in range(3):
        got.append(run_batch(busy, model))
        torch.rand(10)  # a DataLoader seed, an evaluation: draws outside training
    assert got == expected
    outside = capture(model)
    run_batch(busy, model)
    assert capture(model)["torch"].equal(outside["torch"])  # a batch leaves everything else's state alone


def test_a_checkpoint_holds_the_stream_and_a_new_callback_continues_it():
    model = Noisy()
    callback = TrainingRandomState()
    run_batch(callback, model)
    checkpoint = {}
    callback.on_save_checkpoint(fake_trainer(1, 0), model, checkpoint)
    assert checkpoint["random_state"]["world_size"] == 1
    expected = run_batch(callback, model)

    resumed = TrainingRandomState()
    torch.rand(100)  # a resumed process reaches its first batch with other draws behind it
    resumed.on_load_checkpoint(fake_trainer(1, 0), model, through_a_file(checkpoint))
    assert run_batch(resumed, model) == expected


def test_each_rank_takes_its_own_state_when_the_world_size_is_the_same():
    model = Noisy()
    ranks = [seeded(seed, model) for seed in (10, 11)]
    checkpoint = {"random_state": {"world_size": 2, "ranks": ranks}}
    for rank in (0, 1):
        callback = TrainingRandomState()
        callback.on_load_checkpoint(fake_trainer(2, rank), model, checkpoint)
        restore(ranks[rank], model)
        expected = torch.rand(4).tolist()
        assert run_batch(callback, model) == expected


def test_a_new_world_size_warns_and_seeds_each_rank_from_rank_zero_plus_its_rank():
    model = Noisy()
    ranks = [seeded(seed, model) for seed in (10, 11)]
    checkpoint = {"random_state": {"world_size": 2, "ranks": ranks}}
    got = []
    for rank in range(4):
        callback = TrainingRandomState()
        with pytest.warns(UserWarning, match="random-number state of 2 ranks but this run has 4"):
            callback.on_load_checkpoint(fake_trainer(4, rank), model, checkpoint)
        got.append(run_batch(callback, model))
        restore(seeded(derived_seed(ranks[0], rank), model), model)
        assert got[-1] == torch.rand(4).tolist()  # seeded from rank 0's saved state plus the rank
    assert len({tuple(g) for g in got}) == 4  # every rank draws its own numbers
    again = TrainingRandomState()
    with pytest.warns(UserWarning):
        again.on_load_checkpoint(fake_trainer(4, 2), model, checkpoint)
    assert run_batch(again, model) == got[2]  # and the same ones on the next resume


def test_derived_seed_depends_on_the_state_of_rank_zero():
    a, b = seeded(1), seeded(2)
    assert derived_seed(a, 0) == derived_seed(a, 0) != derived_seed(b, 0)
    assert derived_seed(a, 3) == derived_seed(a, 0) + 3


@pytest.mark.parametrize("device", DEVICES)
def test_a_generator_on_the_models_device_round_trips(device):
    model = nn.Module()
    model.generator = torch.Generator(device=device).manual_seed(3)
    state = through_a_file(capture(model))
    first = torch.rand(3, generator=model.generator, device=device)
    restore(state, model)
    assert torch.equal(torch.rand(3, generator=model.generator, device=device), first)


class DrawPerRank(L.LightningModule):
    """Rank r draws r + 1 numbers in every training step, so the ranks' streams part, and keeps what it drew."""

    def __init__(self, out_dir, tag: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.out_dir, self.tag, self.drawn = out_dir, tag, []

    def training_step(self, batch, batch_idx):
        noise = torch.rand(self.global_rank + 1)
        self.drawn.append(noise)
        return (self.weight * noise.sum()).sum()

    def train_dataloader(self):
        return DataLoader(torch.arange(64.0), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self):
        torch.save(self.drawn, self.out_dir / f"{self.tag}-rank{self.global_rank}.pt")


def fit_two_ranks(out_dir, tag: str, max_steps: int, ckpt_path=None) -> list[list[torch.Tensor]]:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            TrainingRandomState(),
            ModelCheckpoint(dirpath=out_dir, filename="step-{step}", every_n_train_steps=3, save_top_k=-1),
        ],
    )
    trainer.fit(DrawPerRank(out_dir, tag), ckpt_path=ckpt_path)
    return [torch.load(out_dir / f"{tag}-rank{rank}.pt") for rank in range(2)]


def test_two_ranks_each_keep_and_resume_their_own_stream(tmp_path):
    whole = fit_two_ranks(tmp_path, "whole", max_steps=6)
    checkpoint = torch.load(tmp_path / "step-step=3.ckpt", weights_only=True)
    saved = checkpoint["random_state"]
    assert saved["world_size"] == 2 and not saved["ranks"][0]["torch"].equal(saved["ranks"][1]["torch"])

    resumed = fit_two_ranks(tmp_path, "resumed", max_steps=6, ckpt_path=tmp_path / "step-step=3.ckpt")
    for rank in range(2):
        assert len(resumed[rank]) == 3
        assert all(torch.equal(a, b) for a, b in zip(resumed[rank], whole[rank][3:], strict=True)), f"rank {rank}"
