"""Exact resume through the Trainer: a run resumed from a checkpoint taken mid-epoch or at the last batch of
an epoch sees exactly the batches the uninterrupted run saw after that point (no duplicate, no gap), on
1 rank and on 2 ranks (`ddp_fork`), with 0 and 2 workers, in the random and streams layouts."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lctrain.data.datamodule import TokenDataModule
from lctrain.data.layouts import Geometry, TokenStream, make_layout
from lctrain.data.shards import ShardWriter, TokenShards, atomic_directory, token_dtype, write_index
from lctrain.data.tokenizer import ByteTokenizer


class Recorder(L.LightningModule):
    """Trains one parameter and records every batch it is given; each rank saves its record at the end."""

    def __init__(self, out_dir, tag: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.out_dir, self.tag, self.seen = out_dir, tag, []

    def training_step(self, batch, batch_idx):
        self.seen.append({k: v.clone() for k, v in batch.items()})
        return (self.weight**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_fit_end(self):
        torch.save(self.seen, self.out_dir / f"{self.tag}-rank{self.global_rank}.pt")


class SaveAt(L.Callback):
    """Checkpoints right after the optimizer steps in `steps`, where the periodic checkpoint would."""

    def __init__(self, out_dir, steps):
        self.out_dir, self.steps, self.saved = out_dir, set(steps), set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in self.steps and step not in self.saved:
            self.saved.add(step)
            trainer.save_checkpoint(self.out_dir / f"step{step}.ckpt")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """About 340 tokens of documents: a few steps per epoch, so runs cross several epochs in seconds."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("data") / "small"
    with atomic_directory(path) as tmp:
        splits = {}
        for split in ("train", "val"):
            writer = ShardWriter(tmp, split, eot_id=256, dtype=token_dtype(257), shard_tokens=100)
            for _ in range(12):
                writer.add(rng.integers(0, 256, size=int(rng.integers(10, 45))))
            splits[split] = writer.close()
        write_index(tmp, tokenizer=ByteTokenizer().describe(), splits=splits, dtype=token_dtype(257))
    return path


def fit(out_dir, data_dir, tag, *, world, workers, layout, accumulate, max_steps, save_at=(), ckpt=None):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp_fork" if world > 1 else "auto",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveAt(out_dir, save_at)],
    )
    data = TokenDataModule(str(data_dir), seq_len=8, batch_size=2, layout=layout, num_workers=workers)
    trainer.fit(Recorder(out_dir, tag), datamodule=data, ckpt_path=ckpt)
    return [torch.load(out_dir / f"{tag}-rank{r}.pt") for r in range(world)]


def equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


@pytest.mark.parametrize(
    "world, workers, layout, accumulate",
    [(1, 0, "random", 1), (1, 2, "streams", 2), (2, 0, "streams", 1), (2, 2, "random", 1)],
    ids=[
        "1rank-0workers-random",
        "1rank-2workers-streams-accumulate2",
        "2ranks-0workers-streams",
        "2ranks-2workers-random",
    ],
)
def test_a_resumed_run_sees_exactly_the_batches_of_the_uninterrupted_run(
    tmp_path, small_data, world, workers, layout, accumulate
):
    shards = TokenShards.open(small_data)
    stream = TokenStream([(str(a.filename), a.shape[0]) for a in shards.arrays("train")], "uint16", None, 256)
    geometry = Geometry(seq_len=8, batch_size=2, world_size=world, accumulate=accumulate)
    mid, boundary = 2, len(make_layout(layout, stream, geometry, seed=0, shuffle=True)) // accumulate
    total = boundary + 3  # into the second epoch
    settings = dict(world=world, workers=workers, layout=layout, accumulate=accumulate)
    full = fit(tmp_path, small_data, "full", max_steps=total, save_at=(mid, boundary), **settings)
    assert all(len(rank) == total * accumulate for rank in full)
    for stop in (mid, boundary):
        resumed = fit(
            tmp_path, small_data, f"from{stop}", max_steps=total, ckpt=tmp_path / f"step{stop}.ckpt", **settings
        )
        for rank in range(world):
            head = full[rank][: stop * accumulate]
            assert equal(head + resumed[rank], full[rank]), f"rank {rank}, resumed at step {stop}"
