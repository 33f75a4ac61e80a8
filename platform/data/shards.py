"""Token shards on disk: flat binary arrays of token ids plus an `index.json`, written atomically.

Each split (train, val) is a list of shards; a shard is a raw little-endian array of uint16 (or uint32
for vocabularies above 65536) token ids in which documents follow each other, each ended by the
tokenizer's end-of-text id. The index records token counts, dtype, tokenizer and sha256 checksums.

Why not a streaming library's format: reading is a memory map and a slice, which any number of ranks
and workers share for free, and the "streams" layout and exact resume need control over which block
each row reads; a flat array is also what nanoGPT, Megatron and OLMo use for pre-tokenized text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INDEX = "index.json"
FORMAT = "lctrain-tokens/1"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces `out_dir`, on failure it is removed.

    The previous `out_dir` stays intact until the new one is complete.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_split(
    directory: Path,
    split: str,
    documents: Iterable[list[int]],
    *,
    eot_id: int,
    dtype: np.dtype,
    shard_tokens: int = 1 << 26,
) -> dict[str, Any]:
    """Write one split's documents (each followed by `eot_id`) into shards of about `shard_tokens` ids."""
    shards, buffer, n_docs = [], [], 0

    def flush():
        if not buffer:
            return
        name = f"{split}-{len(shards):05d}.bin"
        array = np.concatenate(buffer).astype(dtype)
        array.tofile(directory / name)
        shards.append({"file": name, "tokens": int(array.size), "sha256": sha256_of(directory / name)})
        buffer.clear()

    pending = 0
    for ids in documents:
        buffer.append(np.asarray([*ids, eot_id], dtype=np.int64))
        pending += len(ids) + 1
        n_docs += 1
        if pending >= shard_tokens:
            flush()
            pending = 0
    flush()
    return {"tokens": sum(s["tokens"] for s in shards), "documents": n_docs, "shards": shards}


def write_index(
    directory: Path,
    *,
    tokenizer: dict[str, Any],
    splits: dict[str, dict[str, Any]],
    dtype: np.dtype,
    extra: dict[str, Any] | None = None,
) -> None:
    index = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer["vocab_size"],
        "tokenizer": tokenizer,
        "splits": splits,
        **(extra or {}),
    }
    (directory / INDEX).write_text(json.dumps(index, indent=2))


@dataclass(frozen=True)
class TokenShards:
    """A prepared data directory, validated on open: index present, files present, sizes as recorded."""

    root: Path
    index: dict[str, Any]

    @classmethod
    def open(cls, root: str | os.PathLike, *, verify_checksums: bool = False) -> TokenShards:
        root = Path(root)
        index_path = root / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(
                f"data.data_dir '{root}' holds no shards ({INDEX} missing); "
                "run `python -m platform.prepare --config ...` first"
            )
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_path} is not valid JSON ({e}); prepare the data again") from e
        if index.get("format") != FORMAT:
            raise ValueError(f"{index_path} has format {index.get('format')!r}, expected {FORMAT!r}; prepare again")
        shards = cls(root, index)
        itemsize = np.dtype(index["dtype"]).itemsize
        for split in index["splits"].values():
            for shard in split["shards"]:
                path = root / shard["file"]
                if not path.is_file():
                    raise FileNotFoundError(f"shard {path} listed in {index_path} is missing; prepare the data again")
                if path.stat().st_size != shard["tokens"] * itemsize:
                    raise ValueError(
                        f"shard {path} holds {path.stat().st_size} bytes, the index says "
                        f"{shard['tokens'] * itemsize}: truncated or corrupted; prepare the data again"
                    )
                if verify_checksums and sha256_of(path) != shard["sha256"]:
                    raise ValueError(f"shard {path} fails its sha256 checksum: corrupted; prepare the data again")
        return shards

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    def arrays(self, split: str) -> list[np.ndarray]:
        """Read-only memory maps of the split's shards, in order."""
        if split not in self.index["splits"]:
            raise KeyError(f"split '{split}' not in {self.root / INDEX}; it has: {', '.join(self.index['splits'])}")
        dtype = np.dtype(self.index["dtype"])
        return [
            np.memmap(self.root / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
            for s in self.index["splits"][split]["shards"]
        ]
