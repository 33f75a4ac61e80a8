"""Data throughput: how fast `prepare` writes tokens and the datamodule reads them, against how fast the
debug and tiny LSWT consume tokens in training, measured in the same run on the same machine.

The corpus is the built-in one written `--copies` times as text files (so prepare goes through the file
reader). Read throughput is per process: tokens of the batches the training loader hands out per second
(B x T each), for the random and streams layouts with 0 and 2 workers. Training throughput is
forward + backward + AdamW step of the model on the same batch shape (tiny uses fewer rows: it is slow
on CPU; tokens/s is what counts). The loader must read at least 100x faster than the tiny model trains.
Run from the repository root:

    python -m benchmarks.data_throughput [--copies 4] [--seq_len 256] [--batch_size 16] [--read_batches 400]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from lctrain.data.corpus import builtin_documents
from lctrain.data.datamodule import ResumableLoader, TokenDataModule
from lctrain.data.prepare import prepare
from lctrain.models.registry import build_model
from lctrain.training.losses import token_nll


def prepare_rate(root: Path, inputs: Path, name: str, **kwargs) -> float:
    started = time.perf_counter()
    splits = prepare(str(root / name), inputs=[str(inputs)], progress=False, **kwargs)
    return sum(s["tokens"] for s in splits.values()) / (time.perf_counter() - started)


def read_rate(data_dir: Path, layout: str, workers: int, seq_len: int, batch_size: int, n_batches: int) -> float:
    data = TokenDataModule(str(data_dir), seq_len=seq_len, batch_size=batch_size, layout=layout, num_workers=workers)
    data.setup()
    loader: ResumableLoader = data.train_dataloader()
    tokens, started = 0, time.perf_counter()  # worker start-up included: a real epoch pays it too
    while tokens < n_batches * batch_size * seq_len:
        for batch in loader:
            tokens += batch["input_ids"].numel()
            if tokens >= n_batches * batch_size * seq_len:
                break
    return tokens / (time.perf_counter() - started)


def train_rate(size: str, vocab_size: int, seq_len: int, batch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model("lswt", size, vocab_size=vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1))
    elapsed = 0.0
    for step in range(steps + 1):  # the first step warms up and is not timed
        started = time.perf_counter()
        out = model(ids[:, :-1])
        nll, n = token_nll(out.logits, ids[:, 1:])
        (nll / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed += (time.perf_counter() - started) if step else 0.0
    return steps * batch_size * seq_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=4, help="copies of the built-in corpus (~466k bytes each)")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--read_batches", type=int, default=400)
    parser.add_argument("--train_steps", type=int, default=3)
    parser.add_argument("--tiny_batch_size", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root, inputs = Path(tmp), Path(tmp) / "inputs"
        inputs.mkdir()
        for copy in range(args.copies):
            for i, doc in enumerate(builtin_documents()):
                (inputs / f"{copy:02d}-{i:04d}.txt").write_text(doc)
        rows.append(("prepare, bytes, 1 process", prepare_rate(root, inputs, "bytes1")))
        rows.append(("prepare, bytes, 2 processes", prepare_rate(root, inputs, "bytes2", num_proc=2)))
        rows.append(
            (
                "prepare, BPE 4096 (training included), 2 processes",
                prepare_rate(root, inputs, "bpe", tokenizer="bpe", bpe_vocab_size=4096, num_proc=2),
            )
        )
        for layout in ("random", "streams"):
            for workers in (0, 2):
                rate = read_rate(root / "bytes1", layout, workers, args.seq_len, args.batch_size, args.read_batches)
                rows.append((f"read, {layout}, {workers} workers", rate))
    debug = train_rate("debug", 257, args.seq_len, args.batch_size, args.train_steps)
    tiny = train_rate("tiny", 257, args.seq_len, args.tiny_batch_size, args.train_steps)
    rows += [
        (f"train LSWT debug (B={args.batch_size}, T={args.seq_len})", debug),
        (f"train LSWT tiny (B={args.tiny_batch_size}, T={args.seq_len})", tiny),
    ]

    print(
        f"threads: {torch.get_num_threads()}, corpus: {args.copies} x built-in, T={args.seq_len}, B={args.batch_size}"
    )
    print(f"| {'what':<52} | {'tokens/s':>12} | {'/ debug train':>13} | {'/ tiny train':>12} |")
    print(f"|{'-' * 54}|{'-' * 14}|{'-' * 15}|{'-' * 14}|")
    for name, rate in rows:
        print(f"| {name:<52} | {rate:>12,.0f} | {rate / debug:>12.1f}x | {rate / tiny:>11.0f}x |")
    slowest_read = min(rate for name, rate in rows if name.startswith("read"))
    verdict = "OK" if slowest_read >= 100 * tiny else "TOO SLOW"
    print(f"slowest read / tiny training = {slowest_read / tiny:,.0f}x (needs >= 100x): {verdict}")


if __name__ == "__main__":
    main()
