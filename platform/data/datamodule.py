"""`TokenDataModule`: streams blocks of `seq_len + 1` tokens from prepared shards.

A batch is `{"input_ids": (B, T), "targets": (B, T)}`: a block of T + 1 tokens is cut into inputs
(its first T) and targets (its last T). This is the only place the next-token shift happens.

Layout "random": blocks in a shuffled order that depends only on the seed and the epoch. Global
batch g takes the blocks perm[g·B·W : (g+1)·B·W] (W ranks); rank r reads rows r·B ... (r+1)·B, so
ranks never overlap. Within a rank, worker w of n builds batches w, w+n, ... after the resume point,
which the DataLoader returns in order. The loader counts the batches it has handed out; that count and
the epoch are its `state_dict`, which Lightning stores in every checkpoint, so a resumed run reads
exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from platform.data.corpus import builtin_documents, split_documents
from platform.data.shards import INDEX, TokenShards, atomic_directory, token_dtype, write_index, write_split
from platform.data.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

# Each worker builds its own batches (see __iter__), so the length holds with any number of workers.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)


def build_builtin_corpus(data_dir: str | Path) -> None:
    """Tokenize the built-in corpus byte by byte into `data_dir` (train/val split by document)."""
    tokenizer = ByteTokenizer()
    dtype = token_dtype(tokenizer.vocab_size)
    with atomic_directory(data_dir) as tmp:
        splits = {
            name: write_split(tmp, name, (tokenizer.encode(d) for d in docs), eot_id=tokenizer.eot_id, dtype=dtype)
            for name, docs in split_documents(builtin_documents()).items()
        }
        write_index(tmp, tokenizer=tokenizer.describe(), splits=splits, dtype=dtype, extra={"source": "builtin"})
    log.info("built the built-in corpus in %s (%d train tokens)", data_dir, splits["train"]["tokens"])


class BlockBatches(IterableDataset):
    """One rank's batches of blocks for one epoch; see the module docstring for the order."""

    def __init__(
        self,
        files: list[tuple[str, int]],
        dtype: str,
        seq_len: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
    ):
        self.files, self.dtype, self.seq_len, self.batch_size = files, dtype, seq_len, batch_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        blocks = [(n - 1) // seq_len for _, n in files]  # blocks of T + 1 tokens overlapping by one
        self.block_starts = np.cumsum([0, *blocks])  # global block id -> file via searchsorted
        self.n_blocks = int(self.block_starts[-1])
        self.epoch, self.start = 0, 0  # set by the loader before each iteration
        self._arrays: list[np.ndarray] | None = None  # opened lazily in each worker process

    def __len__(self) -> int:
        return self.n_blocks // (self.batch_size * self.world_size)

    def _block(self, block_id: int) -> np.ndarray:
        if self._arrays is None:
            self._arrays = [np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)) for path, n in self.files]
        f = int(np.searchsorted(self.block_starts, block_id, side="right")) - 1
        offset = (block_id - int(self.block_starts[f])) * self.seq_len
        return self._arrays[f][offset : offset + self.seq_len + 1]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        else:
            order = np.arange(self.n_blocks)
        first = (index * self.world_size + self.rank) * self.batch_size
        rows = np.stack([self._block(int(b)) for b in order[first : first + self.batch_size]]).astype(np.int64)
        rows = torch.from_numpy(rows)  # (B, T + 1)
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(self.start + worker, len(self), n_workers):
            yield self.batch(self.epoch, index)


class ResumableLoader(DataLoader):
    """A DataLoader whose position (epoch, batches handed out) is saved in checkpoints.

    It has a length, so Lightning does not fetch ahead of the step it runs: the count is exactly the
    number of batches the Trainer has consumed.
    """

    def __init__(self, dataset: BlockBatches, num_workers: int = 0):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available())
        self.epoch, self.consumed = 0, 0

    def __iter__(self):
        if self.consumed >= len(self.dataset):  # the previous epoch was read to its end: start the next
            self.epoch, self.consumed = self.epoch + 1, 0
        self.dataset.epoch, self.dataset.start = self.epoch, self.consumed
        for batch in super().__iter__():
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        d = self.dataset
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "world_size": d.world_size,
            "batch_size": d.batch_size,
            "seq_len": d.seq_len,
            "seed": d.seed,
            "n_blocks": d.n_blocks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        d = self.dataset
        for key, now in (
            ("world_size", d.world_size),
            ("batch_size", d.batch_size),
            ("seq_len", d.seq_len),
            ("seed", d.seed),
            ("n_blocks", d.n_blocks),
        ):
            if state[key] != now:
                raise ValueError(
                    f"cannot resume the data position: the checkpoint was written with {key}={state[key]}, "
                    f"this run has {key}={now}; resume with the same data, batch size, seed and number of ranks"
                )
        self.epoch, self.consumed = state["epoch"], state["consumed"]


class TokenDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str = "data/builtin-bytes",
        seq_len: int = 256,
        batch_size: int = 16,
        layout: Literal["random"] = "random",
        num_workers: int = 0,
        seed: int = 1234,
        source: Literal["builtin"] | None = None,
        verify_checksums: bool = True,
    ):
        """
        Args:
            data_dir: Directory written by `python -m platform.prepare` (index.json and shards).
            seq_len: Tokens per training sequence (each block holds seq_len + 1 tokens).
            batch_size: Sequences per batch on each rank (the micro-batch).
            layout: Order of the blocks: "random" shuffles them every epoch.
            num_workers: DataLoader worker processes per rank.
            seed: Seed of the shuffle (combined with the epoch).
            source: How to build `data_dir` when it holds no shards: "builtin" tokenizes the built-in
                corpus; None means it must already be prepared.
            verify_checksums: Check every shard's sha256 against the index when the data is opened.
        """
        super().__init__()
        self.save_hyperparameters()
        if seq_len < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"data.seq_len={seq_len}, data.batch_size={batch_size} must be >= 1 and "
                f"data.num_workers={num_workers} >= 0"
            )
        self.shards: TokenShards | None = None

    @property
    def vocab_size(self) -> int:
        """Read from the index; known without it for the built-in corpus (byte-level)."""
        index = Path(self.hparams.data_dir) / INDEX
        if not index.is_file() and self.hparams.source == "builtin":
            return ByteTokenizer.vocab_size
        return TokenShards.open(self.hparams.data_dir).vocab_size

    @property
    def tokenizer_spec(self) -> dict[str, Any] | None:
        """The tokenizer description of the index (stored in checkpoints for generation)."""
        return None if self.shards is None else self.shards.index["tokenizer"]

    def prepare_data(self) -> None:
        if not (Path(self.hparams.data_dir) / INDEX).is_file() and self.hparams.source == "builtin":
            build_builtin_corpus(self.hparams.data_dir)

    def setup(self, stage: str | None = None) -> None:
        self.shards = TokenShards.open(self.hparams.data_dir, verify_checksums=self.hparams.verify_checksums)

    def _dataset(self, split: str, *, shuffle: bool) -> BlockBatches:
        arrays = self.shards.arrays(split)
        files = [(str(a.filename), a.shape[0]) for a in arrays]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = BlockBatches(
            files,
            self.shards.index["dtype"],
            self.hparams.seq_len,
            self.hparams.batch_size,
            shuffle=shuffle,
            seed=self.hparams.seed,
            rank=rank,
            world_size=world,
        )
        if len(dataset) == 0:
            raise ValueError(
                f"split '{split}' of {self.hparams.data_dir} has {dataset.n_blocks} blocks of "
                f"data.seq_len+1={self.hparams.seq_len + 1} tokens, fewer than one batch of "
                f"data.batch_size={self.hparams.batch_size} x {world} ranks; lower seq_len or batch_size"
            )
        return dataset

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(self._dataset("train", shuffle=True), self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Evaluation always reads the whole split from its start, so it needs no saved position."""
        return DataLoader(self._dataset("val", shuffle=False), batch_size=None, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        split = "test" if "test" in self.shards.index["splits"] else "val"
        return DataLoader(self._dataset(split, shuffle=False), batch_size=None, num_workers=self.hparams.num_workers)
