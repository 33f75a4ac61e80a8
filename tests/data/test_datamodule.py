"""The datamodule: shards round-trip, batches are shifted blocks, and the position resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from platform.data.corpus import builtin_documents, split_documents
from platform.data.datamodule import BlockBatches, ResumableLoader, TokenDataModule
from platform.data.shards import TokenShards
from platform.data.tokenizer import ByteTokenizer


def test_builtin_corpus_round_trips_through_the_shards(builtin_data):
    shards = TokenShards.open(builtin_data, verify_checksums=True)
    tok = ByteTokenizer()
    docs = split_documents(builtin_documents())["val"]
    expected = np.concatenate([np.array([*tok.encode(d), tok.eot_id]) for d in docs])
    assert np.array_equal(np.concatenate(shards.arrays("val")), expected)
    assert shards.vocab_size == 257 and shards.index["tokenizer"]["kind"] == "bytes"


def test_targets_are_inputs_shifted_by_one(builtin_data):
    dm = TokenDataModule(str(builtin_data), seq_len=16, batch_size=3)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["targets"].shape == (3, 16)
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])


def loader(data_dir, *, rank=0, world=1, workers=0, seed=0):
    shards = TokenShards.open(data_dir)
    files = [(str(a.filename), a.shape[0]) for a in shards.arrays("val")]
    dataset = BlockBatches(files, shards.index["dtype"], 32, 4, shuffle=True, seed=seed, rank=rank, world_size=world)
    return ResumableLoader(dataset, num_workers=workers)


def take(loader, n):
    out = []
    if n == 0:
        return out
    for batch in loader:
        out.append(batch["input_ids"])
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_restored_from_its_state_continues_with_the_next_batch(builtin_data, workers):
    full = loader(builtin_data, workers=workers)
    reference = take(full, len(full)) + take(full, 3)  # one epoch and three batches of the next
    for stop in (5, len(full)):  # mid-epoch and at the epoch boundary
        first = loader(builtin_data, workers=workers)
        head = take(first, stop)
        resumed = loader(builtin_data, workers=workers)
        resumed.load_state_dict(first.state_dict())
        tail = take(resumed, len(full) - stop) + take(resumed, 3)
        assert all(torch.equal(a, b) for a, b in zip(head + tail, reference, strict=True))


def test_ranks_read_disjoint_blocks_and_a_different_world_size_is_refused(builtin_data):
    a, b = loader(builtin_data, rank=0, world=2), loader(builtin_data, rank=1, world=2)
    rows_a = {tuple(r.tolist()) for x in take(a, len(a)) for r in x}
    rows_b = {tuple(r.tolist()) for x in take(b, len(b)) for r in x}
    assert rows_a and rows_b and not rows_a & rows_b
    with pytest.raises(ValueError, match="world_size=2, this run has world_size=1"):
        loader(builtin_data).load_state_dict(a.state_dict())


def test_missing_shards_name_the_directory_and_the_fix(tmp_path):
    dm = TokenDataModule(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="nothing' holds no shards.*platform.prepare"):
        dm.setup()


def test_a_truncated_shard_is_named(tmp_path, builtin_data):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(builtin_data, copy)
    shard = sorted(copy.glob("train-*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"shard {shard} holds .* truncated or corrupted"):
        TokenShards.open(copy)
