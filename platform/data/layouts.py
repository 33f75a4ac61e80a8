"""Which tokens every row of every batch reads: the three data layouts, as plain index arithmetic.

A layout maps (epoch, batch index on this rank, row) to a stretch of the split's token stream (all its
shards end to end). It depends only on the seed, the epoch and the geometry (ranks W, rank r, rows B,
gradient accumulation A, seq_len T), never on the worker count, so the batch sequence is the same with
any number of DataLoader workers and a resumed loader only needs (epoch, batches consumed).

- "random": blocks of T + 1 tokens (block u starts at u·T: consecutive blocks overlap by the one token
  that is the last target of one and the first input of the next), in an order shuffled by (seed, epoch).
  Global batch g takes blocks order[g·W·B : (g+1)·W·B]; rank r reads rows r·B ... (r+1)·B of it.
- "documents": the same, with one whole document per row from its first token (padded), for synthetic
  tasks and evaluation sets whose examples must start at row 0.
- "streams": the split, read as a circle from a point drawn by (seed, epoch), is cut into S = W·A·B
  contiguous stretches, one per stream; stream (r, a, b) is row b of accumulation slot a on rank r, so
  row b of batch n continues row b of batch n − A on the same rank (the training module keeps one
  carried state per slot). Which stretch a stream reads is shuffled by (seed, epoch) too; every stream
  starts over at each epoch (its rows are flagged `reset`).
All three drop the remainder that does not fill a whole global batch; ranks never share a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYOUTS = ("random", "documents", "streams")


@dataclass(frozen=True)
class Geometry:
    seq_len: int  # T
    batch_size: int  # B, rows per batch on each rank
    world_size: int = 1  # W, ranks across all nodes
    rank: int = 0  # global rank
    accumulate: int = 1  # A, micro-batches per optimizer step (streams only)


class TokenStream:
    """A split's shards read as one array of token ids (and answer marks), through memory maps that each
    process opens lazily (after the DataLoader forks its workers)."""

    def __init__(self, files: list[tuple[str, int]], dtype: str, mask_files: list[str] | None, eot_id: int):
        self.files, self.dtype, self.mask_files, self.eot_id = files, dtype, mask_files, eot_id
        self.offsets = np.cumsum([0, *(n for _, n in files)])  # shard i holds tokens offsets[i] ... offsets[i+1]
        self.n_tokens = int(self.offsets[-1])
        self._tokens: list[np.ndarray] | None = None
        self._masks: list[np.ndarray] | None = None

    def __getstate__(self):  # memory maps are reopened in each worker rather than pickled
        return {**self.__dict__, "_tokens": None, "_masks": None}

    def _open(self) -> None:
        self._tokens = [np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)) for path, n in self.files]
        if self.mask_files is not None:
            self._masks = [
                np.memmap(p, dtype=np.uint8, mode="r", shape=(n,)) for p, (_, n) in zip(self.mask_files, self.files)
            ]

    def _read(self, arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        """Tokens start ... stop, on a circle: past the end the split starts over (streams wrap around)."""
        start, n = start % self.n_tokens, stop - start
        if start + n > self.n_tokens:
            return np.concatenate(
                [self._read(arrays, start, self.n_tokens), self._read(arrays, 0, start + n - self.n_tokens)]
            )
        stop = start + n
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces, i = [], first
        while start < stop:  # a stretch may run across shard boundaries
            end = min(stop, int(self.offsets[i + 1]))
            pieces.append(arrays[i][start - self.offsets[i] : end - self.offsets[i]])
            start, i = end, i + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        if self._tokens is None:
            self._open()
        return self._read(self._tokens, start, stop)

    def answers(self, start: int, stop: int) -> np.ndarray | None:
        if self.mask_files is None:
            return None
        if self._tokens is None:
            self._open()
        return self._read(self._masks, start, stop)

    def document_starts(self) -> np.ndarray:
        """Offsets where documents begin, plus n_tokens at the end: document i is starts[i] ... starts[i+1]."""
        if self._tokens is None:
            self._open()
        ends = [np.flatnonzero(a == self.eot_id) + off + 1 for a, off in zip(self._tokens, self.offsets)]
        return np.unique(np.concatenate([[0], *ends, [self.n_tokens]]))


class Layout:
    """Rows of one rank's batches for one epoch: `rows(epoch, index)` -> (starts (B,), stops (B,))."""

    name: str
    n_units: int  # blocks, documents or streams that the epoch permutes

    def __init__(self, stream: TokenStream, geometry: Geometry, *, seed: int, shuffle: bool):
        self.stream, self.geometry, self.seed, self.shuffle = stream, geometry, seed, shuffle
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation), cached: it is the costly part

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n_units) if self.shuffle else np.arange(self.n_units)
            self._order = (epoch, perm)
        return self._order[1]

    def __len__(self) -> int:
        raise NotImplementedError

    def rows(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def rows_available(self) -> int:
        """The most rows per batch with which every rank still gets one batch."""
        return self.n_units // self.geometry.world_size


class RandomBlocks(Layout):
    name = "random"

    def __init__(self, stream: TokenStream, geometry: Geometry, *, seed: int, shuffle: bool):
        super().__init__(stream, geometry, seed=seed, shuffle=shuffle)
        self.n_units = max(stream.n_tokens - 1, 0) // geometry.seq_len

    def __len__(self) -> int:
        g = self.geometry
        return self.n_units // (g.batch_size * g.world_size)

    def units(self, epoch: int, index: int) -> np.ndarray:
        g = self.geometry
        first = (index * g.world_size + g.rank) * g.batch_size
        return self.order(epoch)[first : first + g.batch_size]

    def rows(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        starts = self.units(epoch, index) * self.geometry.seq_len
        return starts, starts + self.geometry.seq_len + 1


class Documents(RandomBlocks):
    name = "documents"

    def __init__(self, stream: TokenStream, geometry: Geometry, *, seed: int, shuffle: bool):
        Layout.__init__(self, stream, geometry, seed=seed, shuffle=shuffle)
        self.starts = stream.document_starts()  # (n_docs + 1,)
        self.n_units = len(self.starts) - 1
        self.longest = int(np.diff(self.starts).max()) if self.n_units else 0

    def rows(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        docs = self.units(epoch, index)
        return self.starts[docs], self.starts[docs + 1]


class Streams(Layout):
    name = "streams"

    def __init__(self, stream: TokenStream, geometry: Geometry, *, seed: int, shuffle: bool):
        super().__init__(stream, geometry, seed=seed, shuffle=shuffle)
        g = geometry
        self.n_units = g.world_size * g.accumulate * g.batch_size  # S streams
        self.stretch = max(stream.n_tokens - 1, 0) // self.n_units  # L tokens per stream (+1 shared with the next)
        self.segments = self.stretch // g.seq_len  # segments of T per stream and epoch

    def __len__(self) -> int:
        return self.geometry.accumulate * self.segments

    def rows(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        g = self.geometry
        slot, segment = index % g.accumulate, index // g.accumulate
        streams = (g.rank * g.accumulate + slot) * g.batch_size + np.arange(g.batch_size)  # (B,)
        starts = self.order(epoch)[streams] * self.stretch + segment * g.seq_len + self.shift(epoch)
        return starts, starts + g.seq_len + 1

    def shift(self, epoch: int) -> int:
        """Where stream 0 starts this epoch: a random point of the split, read as a circle, so even a
        single stream reads other segments in every epoch."""
        return int(np.random.default_rng([self.seed, epoch, 1]).integers(self.stream.n_tokens)) if self.shuffle else 0

    def rows_available(self) -> int:
        g = self.geometry
        return max(self.stream.n_tokens - 1, 0) // (g.world_size * g.accumulate * g.seq_len)

    def is_epoch_start(self, index: int) -> bool:
        """The first segment of every stream: the state carried from the previous epoch must go."""
        return index < self.geometry.accumulate


def make_layout(name: str, stream: TokenStream, geometry: Geometry, *, seed: int, shuffle: bool) -> Layout:
    cls = {"random": RandomBlocks, "documents": Documents, "streams": Streams}[name]
    return cls(stream, geometry, seed=seed, shuffle=shuffle)
