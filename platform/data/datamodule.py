"""`TokenDataModule`: streams batches of prepared token shards, and resumes exactly (docs/design.md).

A batch is `{"input_ids": (B, T), "targets": (B, T)}` int64: a row of T + 1 tokens is cut into inputs
(its first T) and targets (its last T). This is the only place the next-token shift happens; targets
hold -100 where there is nothing to predict (past the end of a document in the "documents" layout).
Data with answer marks (synthetic tasks) adds `answer_mask` (B, T) bool, True on target positions that
are answer tokens. The "streams" layout adds `reset` (B,) bool, True where the model state carried from
this row's previous segment must be dropped (the first segment of every epoch; with
`reset_at_document`, also a segment that begins a document), and `doc_start` (B,) bool, True where the
row's segment begins a document (documents inside a segment are marked by the end-of-text id).

Which rows a batch reads is in `layouts.py`. The training loader counts the batches it has handed out;
that count and the epoch are its `state_dict`, which Lightning stores in every checkpoint (the loader
is built in `train_dataloader()`), so a resumed run reads exactly the batches the uninterrupted run
would have read. The order does not depend on the worker count, so resuming with other
`data.num_workers` is allowed; another number of ranks, rows or accumulation slots is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .layouts import LAYOUTS, Documents, Geometry, Layout, Streams, TokenStream, make_layout
from .shards import INDEX, TokenShards, VerifyMode, verify_mode
from .tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

# Each worker builds its own batches (see __iter__), so the length holds with any number of workers.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)


def build_builtin_corpus(data_dir: str | Path) -> None:
    """Tokenize the built-in corpus byte by byte into `data_dir` (train/val split by document)."""
    from .prepare import prepare

    prepare(output=str(data_dir), builtin=True, overwrite=True, progress=False)


class BlockBatches(IterableDataset):
    """One rank's batches for one epoch, in the layout's order; worker w of n builds batches
    start + w, start + w + n, ..., which the DataLoader hands out in order."""

    def __init__(
        self, layout: Layout, *, reset_at_document: bool = False, vocab_size: int | None = None, where: str = ""
    ):
        self.layout, self.reset_at_document = layout, reset_at_document
        self.vocab_size, self.where = vocab_size, where  # token ids must lie below vocab_size (damaged shards do not)
        self.epoch, self.start = 0, 0  # set by the loader before each iteration

    def __len__(self) -> int:
        return len(self.layout)

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        layout, stream = self.layout, self.layout.stream
        T = layout.geometry.seq_len
        starts, stops = layout.rows(epoch, index)
        tokens = np.full((len(starts), T + 1), stream.eot_id, dtype=np.int64)  # (B, T + 1)
        valid = np.zeros((len(starts), T + 1), dtype=bool)
        answers = np.zeros((len(starts), T + 1), dtype=bool) if stream.mask_files is not None else None
        for row, (start, stop) in enumerate(zip(starts.tolist(), stops.tolist())):
            n = stop - start
            tokens[row, :n] = stream.tokens(start, stop)
            valid[row, :n] = True
            if answers is not None:
                answers[row, :n] = stream.answers(start, stop)
        if self.vocab_size is not None and tokens.max() >= self.vocab_size:
            raise ValueError(
                f"{self.where} holds token id {int(tokens.max())}, beyond its vocabulary ({self.vocab_size}): a "
                "damaged shard; verify it with data.verify_checksums or prepare the data again"
            )
        tokens = torch.from_numpy(tokens)
        targets = tokens[:, 1:].clone()  # (B, T)
        targets[~torch.from_numpy(valid[:, 1:])] = -100
        batch = {"input_ids": tokens[:, :-1].contiguous(), "targets": targets}
        if answers is not None:
            batch["answer_mask"] = torch.from_numpy(answers[:, 1:].copy())  # (B, T) marks on targets
        if isinstance(layout, Streams):
            # A segment starts a document when the token before it ends one; every split ends with the
            # end-of-text id, so this holds at position 0 too (streams read the split as a circle).
            before = [int(stream.tokens(s - 1, s)[0]) for s in starts.tolist()]
            batch["doc_start"] = torch.tensor(before) == stream.eot_id
            reset = torch.full_like(batch["doc_start"], layout.is_epoch_start(index))
            batch["reset"] = reset | batch["doc_start"] if self.reset_at_document else reset
        return batch

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(self.start + worker, len(self), n_workers):
            yield self.batch(self.epoch, index)


class ResumableLoader(DataLoader):
    """A DataLoader whose position (epoch, batches handed out) is saved in checkpoints.

    It has a length, so Lightning does not fetch ahead of the step it runs: the count is exactly the
    number of batches the Trainer has consumed. An iteration that starts after the previous epoch was
    read to its end (including a run resumed from a checkpoint taken at the last batch) starts the next.
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

    def geometry(self) -> dict[str, Any]:
        """What fixes the batch sequence; a checkpoint's position is only meaningful with the same values."""
        layout = self.dataset.layout
        g = layout.geometry
        shape = {"layout": layout.name, "world_size": g.world_size, "batch_size": g.batch_size, "seq_len": g.seq_len}
        if isinstance(layout, Streams):
            shape["accumulate_grad_batches"] = g.accumulate
        shape.update(seed=layout.seed, tokens=layout.stream.n_tokens)  # the same data: its size and order
        return shape

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "num_workers": self.num_workers, **self.geometry()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, now in self.geometry().items():
            if state.get(key) != now:
                raise ValueError(
                    f"cannot resume the data position: the checkpoint was written with {key}={state.get(key)}, "
                    f"this run has {key}={now}; resume with the same data, layout, batch size, seed, gradient "
                    "accumulation and number of ranks (the worker count may change)"
                )
        if state.get("num_workers", self.num_workers) != self.num_workers:
            log.info(
                "data: resuming with %d workers instead of %d; the batch order does not depend on them",
                self.num_workers,
                state["num_workers"],
            )
        self.epoch, self.consumed = state["epoch"], state["consumed"]


class TokenDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str = "data/builtin-bytes",
        seq_len: int = 256,
        batch_size: int = 16,
        layout: Literal["random", "documents", "streams"] = "random",
        num_workers: int = 0,
        seed: int = 1234,
        source: str | None = None,
        reset_at_document: bool = False,
        verify_checksums: bool | VerifyMode = "once",
    ):
        """
        Args:
            data_dir: Directory written by `python -m platform.prepare` (index.json and shards).
            seq_len: Tokens per training sequence (each row reads seq_len + 1 tokens).
            batch_size: Sequences per batch on each rank (the micro-batch).
            layout: "random": blocks in a shuffled order; "documents": one document per row, padded
                (synthetic tasks, evaluation sets); "streams": row r of a batch continues row r of the
                batch one accumulation cycle earlier (for models that carry state across batches).
            num_workers: DataLoader worker processes per rank (may change when resuming).
            seed: Seed of the order (combined with the epoch).
            source: How to build `data_dir` when it holds no shards: "builtin" tokenizes the built-in
                corpus, a path to a prepare config (configs/data/*.yaml) runs that preparation; None
                means it must already be prepared.
            reset_at_document: Streams layout: also flag `reset` on rows whose segment begins a document.
            verify_checksums: Check the shards' sha256 against the index when the data is opened: "once"
                (a verified shard is remembered in `<data_dir>/.verified.json` and hashed again only after its
                size, mtime or ctime change), "always", or "never" (sizes only); true means "once", false "never".
        """
        super().__init__()
        self.save_hyperparameters()
        if seq_len < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"data.seq_len={seq_len}, data.batch_size={batch_size} must be >= 1 and "
                f"data.num_workers={num_workers} >= 0"
            )
        verify_mode(verify_checksums, "data.verify_checksums")
        if layout not in LAYOUTS:
            raise ValueError(f"data.layout={layout!r} is not a layout; choose one of: {', '.join(LAYOUTS)}")
        if source not in (None, "builtin") and not Path(source).is_file():
            raise FileNotFoundError(f"data.source '{source}' is neither 'builtin' nor a prepare config file")
        self.shards: TokenShards | None = None
        self.accumulate = 1

    @property
    def vocab_size(self) -> int:
        """Read from the index (building the data first when `source` says how); the built-in corpus is
        byte-level, so its size is known without building it."""
        index = Path(self.hparams.data_dir) / INDEX
        if not index.is_file() and self.hparams.source == "builtin":
            return ByteTokenizer.vocab_size
        self.prepare_data()
        return TokenShards.open(self.hparams.data_dir).vocab_size

    @property
    def tokenizer_spec(self) -> dict[str, Any] | None:
        """The tokenizer description of the index (stored in checkpoints for generation)."""
        return None if self.shards is None else self.shards.index["tokenizer"]

    def prepare_data(self) -> None:
        source = self.hparams.source
        if (Path(self.hparams.data_dir) / INDEX).is_file() or source is None:
            return
        if source == "builtin":
            build_builtin_corpus(self.hparams.data_dir)
        else:
            from .prepare import prepare_from_config

            prepare_from_config(source, output=self.hparams.data_dir)

    def setup(self, stage: str | None = None) -> None:
        local_rank = self.trainer.local_rank if self.trainer is not None else 0
        self.shards = TokenShards.open(
            self.hparams.data_dir, verify_checksums=self.hparams.verify_checksums, remember=local_rank == 0
        )
        module = self.trainer.lightning_module if self.trainer is not None else None
        model_vocab = getattr(getattr(module, "model_config", None), "vocab_size", None)
        if model_vocab is not None and self.shards.vocab_size > model_vocab:
            raise ValueError(
                f"data.data_dir '{self.hparams.data_dir}' has vocab_size={self.shards.vocab_size}, larger than the "
                f"model's vocab_size={model_vocab}; give the model at least the data's vocabulary"
            )
        self.accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1

    def _dataset(self, split: str, *, shuffle: bool, accumulate: int = 1) -> BlockBatches:
        shards, h = self.shards, self.hparams
        split_info = shards.split(split)
        files = [(str(a.filename), a.shape[0]) for a in shards.arrays(split)]
        masks = shards.masks(split)
        stream = TokenStream(
            files,
            shards.index["dtype"],
            masks and [str(m.filename) for m in masks],
            shards.index["tokenizer"]["eot_id"],
        )
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        geometry = Geometry(h.seq_len, h.batch_size, world, rank, accumulate)
        layout = make_layout(h.layout, stream, geometry, seed=h.seed, shuffle=shuffle)
        if split != "train" and len(layout) == 0 and layout.rows_available() >= 1:
            # A small evaluation split still gets evaluated, in smaller batches (the same on every rank).
            geometry = dataclasses.replace(geometry, batch_size=layout.rows_available())
            layout = make_layout(h.layout, stream, geometry, seed=h.seed, shuffle=shuffle)
            log.info("data: split '%s' is small; it is read in batches of %d rows", split, geometry.batch_size)
        where = f"split '{split}' of {h.data_dir} ({split_info['tokens']} tokens)"
        if isinstance(layout, Documents) and layout.longest - 1 > h.seq_len:
            raise ValueError(
                f"{where} has a document of {layout.longest} tokens, longer than data.seq_len+1={h.seq_len + 1}; "
                f"raise data.seq_len to {layout.longest - 1} or use data.layout=random"
            )
        if isinstance(layout, Streams) and layout.segments == 0:
            raise ValueError(
                f"data.seq_len={h.seq_len} is longer than the document streams: {where} gives each of its "
                f"{layout.n_units} streams ({world} ranks x {accumulate} accumulation slots x data.batch_size="
                f"{h.batch_size}) {layout.stretch} tokens; lower seq_len or batch_size, or prepare more data"
            )
        if len(layout) == 0:
            raise ValueError(
                f"{where} holds {layout.n_units} {'documents' if isinstance(layout, Documents) else 'blocks'} of "
                f"up to data.seq_len+1={h.seq_len + 1} tokens, fewer than one batch of data.batch_size="
                f"{h.batch_size} x {world} ranks; lower seq_len or batch_size, or prepare more data"
            )
        return BlockBatches(layout, reset_at_document=h.reset_at_document, vocab_size=shards.vocab_size, where=where)

    def train_dataloader(self) -> ResumableLoader:
        dataset = self._dataset("train", shuffle=True, accumulate=self.accumulate)
        return ResumableLoader(dataset, self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Evaluation always reads the whole split from its start, so it needs no saved position."""
        return DataLoader(self._dataset("val", shuffle=False), batch_size=None, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        split = "test" if "test" in self.shards.index["splits"] else "val"
        return DataLoader(self._dataset(split, shuffle=False), batch_size=None, num_workers=self.hparams.num_workers)
