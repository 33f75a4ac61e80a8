"""The datamodule: batches are shifted rows of the stored tokens in a layout's order, the order depends on the
seed and not on the workers, ranks partition the data, streams continue row by row, and the loader
position resumes exactly. Bad data gets a one-line error naming the file or value."""

from __future__ import annotations

import shutil

import lightning as L
import numpy as np
import pytest
import torch

from lctrain.data.datamodule import BlockBatches, ResumableLoader, TokenDataModule
from lctrain.data.layouts import Geometry, TokenStream, make_layout
from lctrain.data.prepare import prepare
from lctrain.data.shards import ShardWriter, TokenShards, atomic_directory, token_dtype, write_index
from lctrain.data.tasks import CopyTask
from lctrain.data.tokenizer import ByteTokenizer
from lctrain.training.module import LanguageModelModule

EOT = 256


@pytest.fixture(scope="module")
def docs_data(tmp_path_factory):
    """60 documents of 3-70 random bytes in shards of ~300 tokens, so rows run across shard boundaries."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "docs"
    with atomic_directory(path) as tmp:
        splits = {}
        for split, n in (("train", 60), ("val", 12)):
            writer = ShardWriter(tmp, split, eot_id=EOT, dtype=token_dtype(257), shard_tokens=300)
            for _ in range(n):
                writer.add(rng.integers(0, 256, size=int(rng.integers(3, 70))))
            splits[split] = writer.close()
        write_index(tmp, tokenizer=ByteTokenizer().describe(), splits=splits, dtype=token_dtype(257))
    return path


def flat(data_dir, split="train") -> np.ndarray:
    """The split read independently of the loader: the shard files end to end."""
    shards = TokenShards.open(data_dir)
    return np.concatenate([np.fromfile(data_dir / s["file"], dtype=np.uint16) for s in shards.split(split)["shards"]])


def dataset(
    data_dir,
    layout="random",
    *,
    seq_len=8,
    batch=2,
    world=1,
    rank=0,
    accumulate=1,
    seed=0,
    shuffle=True,
    split="train",
    reset_at_document=False,
) -> BlockBatches:
    shards = TokenShards.open(data_dir)
    files = [(str(a.filename), a.shape[0]) for a in shards.arrays(split)]
    masks = shards.masks(split)
    stream = TokenStream(files, "uint16", masks and [str(m.filename) for m in masks], EOT)
    geometry = Geometry(seq_len, batch, world, rank, accumulate)
    return BlockBatches(
        make_layout(layout, stream, geometry, seed=seed, shuffle=shuffle), reset_at_document=reset_at_document
    )


def epoch(ds: BlockBatches, e=0) -> list[dict]:
    return [ds.batch(e, i) for i in range(len(ds))]


def loader(data_dir, layout="random", workers=0, **kw) -> ResumableLoader:
    return ResumableLoader(dataset(data_dir, layout, **kw), num_workers=workers)


def take(loader, n) -> list[dict]:
    out = []
    if n == 0:
        return out
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


LAYOUTS = ["random", "documents", "streams"]


def test_targets_are_inputs_shifted_by_one(builtin_data):
    dm = TokenDataModule(str(builtin_data), seq_len=16, batch_size=3)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["targets"].shape == (3, 16)
    assert batch["input_ids"].dtype == batch["targets"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_row_is_the_stored_tokens_at_its_place(docs_data, layout):
    tokens = flat(docs_data)
    ds = dataset(docs_data, layout, seq_len=80 if layout == "documents" else 8)
    for i, batch in enumerate(epoch(ds)):
        starts, stops = ds.layout.rows(0, i)
        for row, (start, stop) in enumerate(zip(starts, stops)):
            n = stop - start - 1  # predicted positions
            stored = tokens.take(range(start, stop), mode="wrap")  # streams read the split as a circle
            assert batch["input_ids"][row, :n].tolist() == stored[:-1].tolist()
            assert batch["targets"][row, :n].tolist() == stored[1:].tolist()
            assert (batch["targets"][row, n:] == -100).all()  # padding (documents layout) predicts nothing


def test_documents_layout_puts_one_whole_document_per_row(docs_data):
    tokens = flat(docs_data)
    doc_starts = {0, *(np.flatnonzero(tokens == EOT) + 1).tolist()}
    batches = epoch(dataset(docs_data, "documents", seq_len=80))
    for batch in batches:
        for ids, targets in zip(batch["input_ids"], batch["targets"]):
            n = int((targets != -100).sum())
            assert targets[n - 1] == EOT and EOT not in ids[:n].tolist()  # exactly one document, ended
    starts = [
        int(r) for i in range(len(batches)) for r in dataset(docs_data, "documents", seq_len=80).layout.rows(0, i)[0]
    ]
    assert set(starts) <= doc_starts and len(set(starts)) == len(starts) == 60  # 60 documents, 30 batches of 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_equal_seeds_give_equal_batches_and_another_seed_another_order(docs_data, layout):
    seq_len = 80 if layout == "documents" else 8
    a, b = (
        epoch(dataset(docs_data, layout, seq_len=seq_len, seed=1)),
        epoch(dataset(docs_data, layout, seq_len=seq_len, seed=1)),
    )
    c = epoch(dataset(docs_data, layout, seq_len=seq_len, seed=2))
    assert same(a, b) and not same(a, c)
    rows = lambda batches: {tuple(r.tolist()) for x in batches for r in x["input_ids"]}  # noqa: E731
    if layout != "streams":  # the same rows in another order, but for the one row (< B) each drops at the end
        assert len(rows(a) ^ rows(c)) <= 2
    assert not same(a, epoch(dataset(docs_data, layout, seq_len=seq_len, seed=1), e=1))  # epochs differ too


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_worker_count_does_not_change_the_batches(docs_data, layout):
    seq_len = 80 if layout == "documents" else 8
    zero, two = loader(docs_data, layout, seq_len=seq_len), loader(docs_data, layout, workers=2, seq_len=seq_len)
    assert same(take(zero, len(zero) + 3), take(two, len(two) + 3))  # across an epoch boundary


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_rows_that_cover_the_split(docs_data, layout, world):
    seq_len, batch = (80, 2) if layout == "documents" else (8, 2)
    per_rank = [dataset(docs_data, layout, seq_len=seq_len, batch=batch, world=world, rank=r) for r in range(world)]
    assert len({len(ds) for ds in per_rank}) == 1  # every rank runs the same number of steps
    starts = [int(s) for ds in per_rank for i in range(len(ds)) for s in ds.layout.rows(0, i)[0]]
    assert len(starts) == len(set(starts))  # no row is read twice, on any rank
    layout_ = per_rank[0].layout
    if layout == "streams":  # every segment of every stream
        segments = {s * layout_.stretch + k * seq_len for s in range(layout_.n_units) for k in range(layout_.segments)}
        assert set(starts) == {start + layout_.shift(0) for start in segments}
    else:  # every block or document, except fewer than one global batch left over
        assert layout_.n_units - world * batch < len(starts) <= layout_.n_units


def test_streams_continue_row_by_row_one_accumulation_cycle_later(docs_data):
    tokens, A = flat(docs_data), 2
    ds = dataset(docs_data, "streams", seq_len=5, batch=3, accumulate=A)
    batches = epoch(ds)
    assert len(batches) % A == 0 and len(batches) > 2 * A
    for n in range(len(batches) - A):
        here, there = batches[n], batches[n + A]
        assert torch.equal(here["targets"][:, -1], there["input_ids"][:, 0])
        starts = ds.layout.rows(0, n)[0]
        assert (ds.layout.rows(0, n + A)[0] == starts + 5).all()  # the next T tokens of the same stream
    for n, batch in enumerate(batches):
        starts = ds.layout.rows(0, n)[0]
        doc_start = torch.tensor([tokens[(s - 1) % len(tokens)] == EOT for s in starts])
        assert torch.equal(batch["doc_start"], doc_start)
        assert torch.equal(batch["reset"], torch.full((3,), n < A))  # only the first segment of the epoch
    with_docs = epoch(dataset(docs_data, "streams", seq_len=5, batch=3, accumulate=A, reset_at_document=True))
    assert all(torch.equal(b["reset"], b["doc_start"] | (n < A)) for n, b in enumerate(with_docs))
    assert any(b["doc_start"].any() for b in batches[A:])


def test_answer_marks_point_at_the_answer_targets(tmp_path):
    task = CopyTask(length=6, vocab=10, train_examples=8, val_examples=4)
    prepare(str(tmp_path / "copy"), task=task, progress=False)
    for layout in LAYOUTS:
        for batch in epoch(dataset(tmp_path / "copy", layout, seq_len=13, batch=2)):
            ids, targets, marks = batch["input_ids"], batch["targets"], batch["answer_mask"]
            assert marks.dtype == torch.bool and not marks[targets == -100].any()
            if layout == "documents":  # a whole example per row: the answer is the copy of its first 6 symbols
                assert torch.equal(targets[marks].view(2, 6), ids[:, :6])
                assert torch.equal(marks.sum(dim=1), torch.tensor([6, 6]))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_restored_from_its_state_continues_with_the_next_batch(docs_data, layout, workers):
    seq_len = 80 if layout == "documents" else 8
    full = loader(docs_data, layout, workers, seq_len=seq_len)
    reference = take(full, len(full)) + take(full, 3)  # one epoch and three batches of the next
    for stop in (5, len(full)):  # mid-epoch and at the epoch boundary
        first = loader(docs_data, layout, workers, seq_len=seq_len)
        head = take(first, stop)
        resumed = loader(docs_data, layout, workers, seq_len=seq_len)
        resumed.load_state_dict(first.state_dict())
        assert same(head + take(resumed, len(full) - stop) + take(resumed, 3), reference)


def test_a_resume_with_other_ranks_or_rows_is_refused_and_other_workers_are_accepted(docs_data, caplog):
    saved = loader(docs_data, "streams", world=2, accumulate=2)
    take(saved, 3)
    with pytest.raises(ValueError, match="checkpoint was written with world_size=2, this run has world_size=1"):
        loader(docs_data, "streams", accumulate=2).load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="accumulate_grad_batches=2, this run has accumulate_grad_batches=1"):
        loader(docs_data, "streams", world=2).load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="batch_size=2, this run has batch_size=3"):
        loader(docs_data, "random", batch=3).load_state_dict(loader(docs_data, "random").state_dict())
    resumed = loader(docs_data, "streams", workers=2, world=2, accumulate=2)
    with caplog.at_level("INFO"):
        resumed.load_state_dict(saved.state_dict())
    assert resumed.consumed == 3 and "the batch order does not depend on them" in caplog.text


def test_a_missing_or_empty_data_directory_names_it_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="'.*nothing' does not exist; run `python -m platform.prepare"):
        TokenDataModule(str(tmp_path / "nothing")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="'.*empty' is empty; run `python -m platform.prepare"):
        TokenDataModule(str(tmp_path / "empty")).setup()


def test_a_truncated_or_corrupted_shard_is_named(tmp_path, docs_data):
    copy = tmp_path / "copy"
    shutil.copytree(docs_data, copy)
    shard = sorted(copy.glob("train-*.bin"))[1]
    original = shard.read_bytes()
    shard.write_bytes(original[:-10])
    with pytest.raises(ValueError, match=f"shard {shard} holds .* truncated or corrupted"):
        TokenShards.open(copy)
    shard.write_bytes(original[:5] + bytes([original[5] ^ 1]) + original[6:])  # same size, one bit flipped
    TokenShards.open(copy)  # sizes agree: only the checksum can tell
    with pytest.raises(ValueError, match=f"shard {shard} fails its sha256 checksum"):
        TokenDataModule(str(copy)).setup()


def test_a_tokenizer_file_that_does_not_match_the_index_is_refused(tmp_path, builtin_data):
    prepare(str(tmp_path / "bpe"), builtin=True, tokenizer="bpe", bpe_vocab_size=300, progress=False)
    (tmp_path / "bpe" / "tokenizer.json").write_text((tmp_path / "bpe" / "tokenizer.json").read_text() + " ")
    with pytest.raises(ValueError, match="tokenizer.json does not match the tokenizer recorded in .*index.json"):
        TokenDataModule(str(tmp_path / "bpe")).setup()


def test_seq_len_longer_than_the_streams_or_the_documents_is_named(docs_data):
    dm = TokenDataModule(str(docs_data), seq_len=600, batch_size=4, layout="streams")
    dm.setup()
    with pytest.raises(ValueError, match="data.seq_len=600 is longer than the document streams: .* 4 streams"):
        dm.train_dataloader()
    dm = TokenDataModule(str(docs_data), seq_len=20, batch_size=2, layout="documents")
    dm.setup()
    with pytest.raises(ValueError, match="has a document of .* tokens, longer than data.seq_len\\+1=21"):
        dm.train_dataloader()


def test_a_data_vocabulary_larger_than_the_model_is_refused(builtin_data):
    module = LanguageModelModule(arch="lswt", size="debug", vocab_size=200)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="has vocab_size=257, larger than the model's vocab_size=200"):
        trainer.fit(module, datamodule=TokenDataModule(str(builtin_data)))


def test_a_prepare_config_as_source_builds_the_missing_data(tmp_path):
    from tests.helpers import REPO

    dm = TokenDataModule(str(tmp_path / "built"), source=str(REPO / "configs" / "data" / "builtin.yaml"))
    assert dm.vocab_size == 257 and (tmp_path / "built" / "index.json").is_file()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_validation_split_smaller_than_one_batch_is_read_in_smaller_batches(docs_data, layout):
    seq_len = 80 if layout == "documents" else 8
    dm = TokenDataModule(str(docs_data), seq_len=seq_len, batch_size=1000, layout=layout)
    dm.setup()
    val = list(dm.val_dataloader())
    rows = {"documents": 12, "random": (len(flat(docs_data, "val")) - 1) // 8}.get(layout, len(val[0]["input_ids"]))
    assert len(val) == 1 and val[0]["input_ids"].shape == (rows, seq_len) and rows > 1
    with pytest.raises(
        ValueError, match="fewer than one batch of data.batch_size=1000|longer than the document streams"
    ):
        dm.train_dataloader()  # training never shrinks its batches: that would change the run
