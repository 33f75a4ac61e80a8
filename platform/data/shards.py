"""Token shards on disk: flat binary arrays of token ids plus an `index.json`, written atomically.

Each split (train, val) is a list of shards; a shard is a raw little-endian array of uint16 (or uint32
for vocabularies above 65536) token ids in which documents follow each other, each ended by the
tokenizer's end-of-text id. Synthetic tasks add, per shard, a uint8 array of the same length that is 1
on answer tokens. The index records token counts, dtype, tokenizer, vocab size and sha256 checksums.
Hashing runs at a few hundred MB/s, so a verified file is remembered in `.verified.json` beside the
shards, by its size, mtime and ctime, and not hashed again while those stay the same.

Why not a streaming library's format (litdata, docs/design.md): litdata pulls in torchvision, which breaks
the pinned CPU torch, and the "streams" layout and exact resume need control over which block each row
reads. Reading a flat array is a memory map and a slice, which any number of ranks and workers share for
free; it is also what nanoGPT, Megatron and OLMo use for pre-tokenized text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

INDEX = "index.json"
FORMAT = "lctrain-tokens/1"
TOKENIZER_FILE = "tokenizer.json"  # a JSON tokenizer is also saved beside the shards, for other tools
VERIFIED_FILE = ".verified.json"  # files whose checksum was verified, with the stat they had then
VERIFY_MODES = ("once", "always", "never")
VerifyMode = Literal["once", "always", "never"]

log = logging.getLogger(__name__)


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


class ShardWriter:
    """Appends documents (each followed by `eot_id`) to one split's shards of about `shard_tokens` ids.

    With `with_mask`, every document comes with a 0/1 mask of its answer tokens (the end-of-text id is
    never an answer). A document is never split across shards.
    """

    def __init__(
        self,
        directory: Path,
        split: str,
        *,
        eot_id: int,
        dtype: np.dtype,
        with_mask: bool = False,
        shard_tokens: int = 1 << 26,
    ):
        self.directory, self.split, self.eot_id, self.dtype = directory, split, eot_id, dtype
        self.with_mask, self.shard_tokens = with_mask, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.pending = self.documents = self.max_id = 0

    def add(self, ids: list[int] | np.ndarray, mask: list[int] | np.ndarray | None = None) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self.ids.append(np.append(ids, self.eot_id))
        if self.with_mask:
            if mask is None or len(mask) != len(ids):
                raise ValueError(f"split '{self.split}' has answer masks: every document needs one of its length")
            self.masks.append(np.append(np.asarray(mask), 0).astype(np.uint8))
        self.max_id = max(self.max_id, int(ids.max()) if ids.size else 0, self.eot_id)
        self.pending += ids.size + 1
        self.documents += 1
        if self.pending >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        name = f"{self.split}-{len(self.shards):05d}"
        array = np.concatenate(self.ids).astype(self.dtype)
        array.tofile(self.directory / f"{name}.bin")
        shard = {"file": f"{name}.bin", "tokens": int(array.size), "sha256": sha256_of(self.directory / f"{name}.bin")}
        if self.with_mask:
            np.concatenate(self.masks).tofile(self.directory / f"{name}.mask")
            shard.update(mask_file=f"{name}.mask", mask_sha256=sha256_of(self.directory / f"{name}.mask"))
        self.shards.append(shard)
        self.ids, self.masks, self.pending = [], [], 0

    def close(self) -> dict[str, Any]:
        """Write what is left; the split's entry of the index."""
        self.flush()
        tokens = sum(s["tokens"] for s in self.shards)
        return {
            "tokens": tokens,
            "documents": self.documents,
            "max_id": self.max_id,
            "answer_mask": self.with_mask,
            "shards": self.shards,
        }


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
    writer = ShardWriter(directory, split, eot_id=eot_id, dtype=dtype, shard_tokens=shard_tokens)
    for ids in documents:
        writer.add(ids)
    return writer.close()


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
    if tokenizer["kind"] == "json":
        (directory / TOKENIZER_FILE).write_text(tokenizer["json"])
    (directory / INDEX).write_text(json.dumps(index, indent=2))


def verify_mode(value: bool | str, key: str = "verify_checksums") -> VerifyMode:
    """The mode "once", "always" or "never"; the booleans of earlier configs read as True = "once", False = "never"."""
    if value is True or value is False:
        return "once" if value else "never"
    if value not in VERIFY_MODES:
        raise ValueError(f"{key}={value!r} is not one of: once, always, never (or true = once, false = never)")
    return value


def file_stamp(path: Path) -> dict[str, int]:
    """What changes when a file's bytes do: its size, and its mtime and ctime in nanoseconds (ctime also
    changes when the file is copied or its mtime is set back)."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


class VerifiedFiles:
    """The files of a data directory whose checksum was verified: name -> {size, mtime_ns, ctime_ns, sha256}.

    A file counts as verified while its stamp is unchanged and the index still expects the same checksum.
    The record is rewritten atomically (a temporary file, then a rename), so ranks that open the data at
    the same time read a whole record; where the directory cannot be written, nothing is remembered.
    """

    def __init__(self, root: Path):
        self.path = root / VERIFIED_FILE
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: verify again
            entries = {}
        self.entries: dict[str, dict[str, Any]] = entries if isinstance(entries, dict) else {}
        self.changed = False

    def is_verified(self, path: Path, digest: str) -> bool:
        entry = self.entries.get(path.name)
        return entry == {**file_stamp(path), "sha256": digest}

    def add(self, path: Path, stamp: dict[str, int], digest: str) -> None:
        self.entries[path.name] = {**stamp, "sha256": digest}
        self.changed = True

    def save(self, names: set[str]) -> None:
        """Write the entries of `names` (the files the index lists) if anything was verified."""
        if not self.changed:
            return
        entries = {name: entry for name, entry in sorted(self.entries.items()) if name in names}
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=VERIFIED_FILE + ".", suffix=".tmp", dir=self.path.parent)
            os.fchmod(fd, 0o644)  # readable by whoever reads the shards (mkstemp makes it private)
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only data directory: verified again next time
            log.info("data: cannot record verified checksums in %s (%s); they are hashed at every start", self.path, e)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


@dataclass(frozen=True)
class TokenShards:
    """A prepared data directory, validated on open: index present, files present, sizes as recorded,
    token ids below the vocabulary size, and (per `verify_checksums`) every checksum.

    verify_checksums: "once" hashes the files not verified since they last changed; "always" hashes every
    file; "never" checks sizes only. True and False, the values of earlier versions, mean "once" and
    "never". With `remember`, files verified here are recorded (VerifiedFiles) for later opens; ranks that
    open the data together let one process per node write the record.
    """

    root: Path
    index: dict[str, Any]

    @classmethod
    def open(
        cls, root: str | os.PathLike, *, verify_checksums: bool | VerifyMode = False, remember: bool = True
    ) -> TokenShards:
        mode = verify_mode(verify_checksums)
        root = Path(root)
        index_path = root / INDEX
        if not index_path.is_file():
            state = "is empty" if root.is_dir() and not any(root.iterdir()) else f"holds no shards ({INDEX} missing)"
            state = state if root.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"data.data_dir '{root}' {state}; run `python -m platform.prepare --config ...` first"
            )
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_path} is not valid JSON ({e}); prepare the data again") from e
        if index.get("format") != FORMAT:
            raise ValueError(f"{index_path} has format {index.get('format')!r}, expected {FORMAT!r}; prepare again")
        itemsize = np.dtype(index["dtype"]).itemsize
        verified = VerifiedFiles(root) if mode != "never" else None
        listed: set[str] = set()
        for name, split in index["splits"].items():
            if split.get("max_id", 0) >= index["vocab_size"]:
                raise ValueError(
                    f"split '{name}' of {index_path} holds token id {split['max_id']}, not below its "
                    f"vocab_size={index['vocab_size']}; prepare the data again"
                )
            for shard in split["shards"]:
                files = [(shard["file"], shard["tokens"] * itemsize, shard["sha256"])]
                if "mask_file" in shard:
                    files.append((shard["mask_file"], shard["tokens"], shard["mask_sha256"]))
                for file, size, digest in files:
                    path = root / file
                    check_file(path, size, index_path)
                    listed.add(file)
                    if verified is None or (mode == "once" and verified.is_verified(path, digest)):
                        continue
                    stamp = file_stamp(path)  # taken before hashing: a write during it shows as a change later
                    if sha256_of(path) != digest:
                        raise ValueError(f"shard {path} fails its sha256 checksum: corrupted; prepare the data again")
                    verified.add(path, stamp, digest)
        if verified is not None and remember:
            verified.save(listed)
        tokenizer_file = root / TOKENIZER_FILE
        if index["tokenizer"]["kind"] == "json" and tokenizer_file.is_file():
            digest = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
            if digest != index["tokenizer"]["sha256"]:
                raise ValueError(
                    f"{tokenizer_file} does not match the tokenizer recorded in {index_path} (sha256 "
                    f"{digest[:12]} vs {index['tokenizer']['sha256'][:12]}); restore it or prepare the data again"
                )
        return cls(root, index)

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    def split(self, split: str) -> dict[str, Any]:
        if split not in self.index["splits"]:
            raise KeyError(f"split '{split}' not in {self.root / INDEX}; it has: {', '.join(self.index['splits'])}")
        return self.index["splits"][split]

    def arrays(self, split: str) -> list[np.ndarray]:
        """Read-only memory maps of the split's shards, in order."""
        dtype = np.dtype(self.index["dtype"])
        shards = self.split(split)["shards"]
        return [np.memmap(self.root / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],)) for s in shards]

    def masks(self, split: str) -> list[np.ndarray] | None:
        """The split's answer masks (uint8, 1 on answer tokens) aligned with `arrays`, or None."""
        shards = self.split(split)["shards"]
        if not self.split(split).get("answer_mask"):
            return None
        return [np.memmap(self.root / s["mask_file"], dtype=np.uint8, mode="r", shape=(s["tokens"],)) for s in shards]


def check_file(path: Path, size: int, index_path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} listed in {index_path} is missing; prepare the data again")
    if path.stat().st_size != size:
        raise ValueError(
            f"shard {path} holds {path.stat().st_size} bytes, the index says {size}: truncated or corrupted; "
            "prepare the data again"
        )
