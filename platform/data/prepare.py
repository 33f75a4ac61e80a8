"""`prepare`: raw text or a synthetic task -> token shards with an index, written atomically (docs/design.md).

Sources: local text, jsonl and parquet files (through `datasets`, offline), the built-in corpus, or a
synthetic task (passkey, MQAR, copy). Documents are split into train and validation by document,
tokenized in `num_proc` processes and written in order, each followed by the end-of-text id. The output
is built in a temporary sibling directory that replaces `output` only once complete, so an interrupted
or failed prepare leaves any previous output as it was.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .corpus import builtin_documents, split_stream
from .shards import INDEX, ShardWriter, atomic_directory, token_dtype, write_index
from .sources import TextUnit, find_files, read_documents
from .tasks import CopyTask, MQARTask, PasskeyTask
from .tokenizer import ByteTokenizer, Tokenizer, tokenizer_from_path, train_bpe

log = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 20  # documents are sent to tokenizer processes in chunks of about 1M characters


def prepare(
    output: str,
    inputs: str | list[str] | None = None,
    builtin: bool = False,
    task: PasskeyTask | MQARTask | CopyTask | None = None,
    tokenizer: str = "bytes",
    bpe_vocab_size: int = 4096,
    eot_token: str | None = None,
    text_field: str = "text",
    text_unit: TextUnit = "file",
    val_fraction: float = 0.05,
    num_proc: int = 1,
    shard_tokens: int = 1 << 26,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize text or a synthetic task into token shards: `python -m platform.prepare --config configs/data/...`.

    Give exactly one source: `inputs`, `builtin` or `task`. `--task.help PasskeyTask` (or MQARTask,
    CopyTask) lists a task's parameters.

    Args:
        output: Directory to write (index.json, shards, tokenizer.json); replaced atomically.
        inputs: Local files, directories or globs: text (.txt, .md, ...), jsonl or parquet.
        builtin: Use the built-in corpus (the standard library's pydoc topics).
        task: A synthetic task with answer marks: PasskeyTask, MQARTask or CopyTask.
        tokenizer: "bytes" (byte-level, built in), "bpe" (a byte-level BPE trained on the train split and
            saved beside the shards), or a path to a tokenizer.json or a Hugging Face tokenizer directory.
        bpe_vocab_size: Vocabulary size of the trained BPE (a small corpus may give fewer).
        eot_token: End-of-text token of a tokenizer file or directory (default: its eos token or a common name).
        text_field: Field holding the text in jsonl and parquet rows.
        text_unit: What a document is in a text file: the whole "file", a "paragraph" or a "line".
        val_fraction: Share of the text (whole documents) that goes to the validation split.
        num_proc: Tokenizer processes.
        shard_tokens: Tokens per shard file (about; documents are never split).
        overwrite: Replace an existing prepared directory at `output`.
        progress: Show a progress bar with tokens/s.
    """
    inputs = [inputs] if isinstance(inputs, str) else inputs
    n_sources = bool(inputs) + bool(builtin) + (task is not None)
    if n_sources != 1:
        raise ValueError(f"give exactly one source: --inputs, --builtin true or --task (got {n_sources})")
    if num_proc < 1 or shard_tokens < 1:
        raise ValueError(f"num_proc={num_proc} and shard_tokens={shard_tokens} must be >= 1")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1): the share of documents kept for validation")
    out = Path(output)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.cache-", dir=out.parent) as cache:
        documents, source = document_source(inputs, builtin, task, text_field, text_unit, cache)
        tok = make_tokenizer(tokenizer, bpe_vocab_size, eot_token, documents, val_fraction)
        if task is not None:
            task.check(tok)  # a bad length or count is named before the progress bar starts
        with atomic_directory(out) as tmp:
            splits = write_splits(tmp, documents, task, tok, val_fraction, num_proc, shard_tokens, progress)
            if task is None and not (splits["train"]["documents"] and splits["val"]["documents"]):
                n = splits["train"]["documents"] + splits["val"]["documents"]
                what = ", ".join(source.get("inputs", [])) or source["kind"]
                raise ValueError(
                    f"--inputs {what} hold {n} document(s), too few for a train and a validation split; "
                    "add documents or set --text_unit paragraph"
                )
            write_index(
                tmp,
                tokenizer=tok.describe(),
                splits=splits,
                dtype=token_dtype(tok.vocab_size),
                extra={"source": source, "val_fraction": val_fraction},
            )
    tokens = sum(s["tokens"] for s in splits.values())
    seconds = time.perf_counter() - started
    log.info(
        "prepared %s: %d train + %d val tokens, vocab %d, in %.1f s (%.0f tokens/s)",
        out,
        splits["train"]["tokens"],
        splits["val"]["tokens"],
        tok.vocab_size,
        seconds,
        tokens / seconds,
    )
    return splits


def write_splits(
    tmp: Path, documents, task, tok: Tokenizer, val_fraction: float, num_proc: int, shard_tokens: int, progress: bool
) -> dict[str, dict[str, Any]]:
    """Tokenize the documents (or generate the task's examples) into the train and val shards of `tmp`."""
    dtype = token_dtype(tok.vocab_size)
    writers = {
        s: ShardWriter(tmp, s, eot_id=tok.eot_id, dtype=dtype, with_mask=task is not None, shard_tokens=shard_tokens)
        for s in ("train", "val")
    }
    # The bar ends its line when the loop ends or fails, so an error is printed on a line of its own.
    with tqdm(unit="tok", unit_scale=True, desc="tokens", disable=not progress, smoothing=0.1) as bar:
        if task is not None:
            for split, writer in writers.items():
                for ids, mask in task.examples(tok, split):
                    writer.add(ids, mask)
                    bar.update(len(ids) + 1)
        else:
            for split, ids in tokenize(split_stream(documents(), val_fraction), tok, num_proc):
                writers[split].add(ids)
                bar.update(len(ids) + 1)
    return {s: w.close() for s, w in writers.items()}


def check_output(out: Path, overwrite: bool) -> None:
    """Only a prepared data directory is ever replaced, and only when asked."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / INDEX).is_file():
        raise ValueError(f"output '{out}' exists and is not a prepared data directory; choose a new or empty path")
    if not overwrite:
        raise ValueError(f"output '{out}' already holds prepared data; pass --overwrite true to replace it")


def document_source(inputs, builtin, task, text_field, text_unit, cache) -> tuple[Callable[[], Iterator[str]], dict]:
    """A function that yields the documents (again on every call: BPE training reads them once more),
    and what the index records about the source."""
    if task is not None:
        return (lambda: iter(())), {"kind": "task", **task.describe()}
    if builtin:
        return (lambda: iter(builtin_documents())), {"kind": "builtin"}
    files = find_files(inputs)
    source = {"kind": "files", "inputs": list(inputs), "files": len(files), "text_unit": text_unit}
    return (lambda: read_documents(files, text_field=text_field, text_unit=text_unit, cache_dir=cache)), source


def make_tokenizer(
    name: str, bpe_vocab_size: int, eot_token: str | None, documents: Callable[[], Iterator[str]], val_fraction: float
) -> Tokenizer:
    if name == "bytes":
        return ByteTokenizer()
    if name == "bpe":
        train = (doc for split, doc in split_stream(documents(), val_fraction) if split == "train")
        return train_bpe(train, bpe_vocab_size)
    return tokenizer_from_path(name, eot_token)


def tokenize(documents: Iterator[tuple[str, str]], tokenizer: Tokenizer, num_proc: int) -> Iterator[tuple[str, list]]:
    """(split, ids) for every (split, document), in order, tokenized in `num_proc` processes."""
    for splits, ids in _tokenized_chunks(_chunks(documents), tokenizer, num_proc):
        yield from zip(splits, ids)


def _chunks(documents: Iterator[tuple[str, str]]) -> Iterator[tuple[list[str], list[str]]]:
    splits, texts, chars = [], [], 0
    for split, text in documents:
        splits.append(split)
        texts.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS:
            yield splits, texts
            splits, texts, chars = [], [], 0
    if texts:
        yield splits, texts


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One flat array and the lengths: pickling numpy arrays back is much cheaper than lists of ints."""
    ids = _worker_tokenizer.encode_batch(texts)
    lengths = np.array([len(i) for i in ids], dtype=np.int64)
    return np.fromiter((t for i in ids for t in i), dtype=np.int64, count=int(lengths.sum())), lengths


def _tokenized_chunks(chunks, tokenizer: Tokenizer, num_proc: int):
    if num_proc == 1:
        for splits, texts in chunks:
            yield splits, tokenizer.encode_batch(texts)
        return
    # Forked workers must not use the Rust thread pool a parent may have started (BPE training): one
    # thread per process, and the pool of processes gives the parallelism.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with multiprocessing.get_context("fork").Pool(num_proc, _init_worker, (tokenizer,)) as pool:
            pending: deque = deque()  # at most 2 chunks per process in flight: memory stays bounded
            for splits, texts in chunks:
                pending.append((splits, pool.apply_async(_encode, (texts,))))
                if len(pending) >= 2 * num_proc:
                    yield _unpack(*pending.popleft())
            while pending:
                yield _unpack(*pending.popleft())
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _unpack(splits: list[str], result) -> tuple[list[str], list[np.ndarray]]:
    flat, lengths = result.get()
    return splits, np.split(flat, np.cumsum(lengths)[:-1])


def prepare_from_config(config: str, **overrides: Any) -> dict[str, Any]:
    """Run the preparation a config file describes (e.g. when the datamodule finds its data missing)."""
    args = ["--config", config, *(f"--{k}={v}" for k, v in overrides.items())]
    return prepare_cli(args)


def prepare_cli(args: list[str] | None = None) -> dict[str, Any]:
    from jsonargparse import CLI, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the tasks' fields document themselves
    return CLI(prepare, args=args, as_positional=False, exit_on_error=False)
