"""`prepare`: shards read back equal the tokenized input for every tokenizer kind and source format; the
output is atomic; bad input gets a one-line error that names it and overwrites nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lctrain.data import prepare as prepare_module
from lctrain.data.corpus import split_documents
from lctrain.data.prepare import prepare
from lctrain.data.shards import TokenShards
from lctrain.data.tasks import PasskeyTask
from lctrain.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
from tests.helpers import REPO

TEXTS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i % 5) for i in range(12)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Eight text files (one in a subdirectory), a jsonl with two rows and a parquet with two rows, and the
    documents they hold in the documented order: text files sorted by path, then jsonl, then parquet."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "sub").mkdir()
    paths = [root / f"{i:02d}.txt" for i in range(7)] + [root / "sub" / "07.txt"]
    for path, text in zip(paths, TEXTS):
        path.write_text(text)
    (root / "rows.jsonl").write_text("".join(json.dumps({"body": t, "id": 1}) + "\n" for t in TEXTS[8:10]))
    pq.write_table(pa.table({"body": TEXTS[10:12]}), root / "rows.parquet")
    (root / ".hidden.txt").write_text("never read")
    return root, TEXTS


def expected_tokens(tokenizer, documents, split):
    docs = split_documents(documents)[split]
    return np.concatenate([np.array([*tokenizer.encode(d), tokenizer.eot_id]) for d in docs])


def bpe_file(tmp_path, eot="<|endoftext|>"):
    tok = train_bpe(TEXTS * 3, 300)
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.json.replace("<|endoftext|>", eot))
    return path


@pytest.mark.parametrize("kind", ["bytes", "bpe", "tokenizer.json", "hf-directory"])
def test_prepared_shards_equal_the_tokenized_documents(tmp_path, inputs, kind):
    root, documents = inputs
    tokenizer = {"bytes": "bytes", "bpe": "bpe"}.get(kind)
    if kind == "tokenizer.json":
        tokenizer = str(bpe_file(tmp_path))
    if kind == "hf-directory":
        (tmp_path / "hf").mkdir()
        bpe_file(tmp_path / "hf", eot="</s>")
        (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
        tokenizer = str(tmp_path / "hf")
    out = tmp_path / "out"
    prepare(str(out), inputs=[str(root)], tokenizer=tokenizer, bpe_vocab_size=300, text_field="body", progress=False)
    shards = TokenShards.open(out, verify_checksums=True)
    tok = load_tokenizer(shards.index["tokenizer"])
    assert tok.vocab_size == shards.vocab_size == (257 if kind == "bytes" else 300)
    for split in ("train", "val"):
        assert np.array_equal(np.concatenate(shards.arrays(split)), expected_tokens(tok, documents, split)), split
    if kind != "bytes":
        assert (out / "tokenizer.json").read_text() == shards.index["tokenizer"]["json"]


def test_a_directory_with_only_slow_tokenizer_files_is_converted_offline(tmp_path):
    train_bpe(TEXTS * 3, 300).backend.model.save(str(tmp_path))  # vocab.json + merges.txt, as GPT-2 ships them
    config = {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    from lctrain.data.tokenizer import tokenizer_from_path

    tok = tokenizer_from_path(tmp_path)
    assert tok.encode(TEXTS[0]) == train_bpe(TEXTS * 3, 300).encode(TEXTS[0])
    assert tok.eot_token == "<|endoftext|>"


def test_the_index_tokenizer_rebuilds_without_the_data_directory(tmp_path, inputs):
    out = tmp_path / "out"
    prepare(str(out), inputs=[str(inputs[0])], tokenizer="bpe", bpe_vocab_size=300, text_field="body", progress=False)
    spec = TokenShards.open(out).index["tokenizer"]
    first = np.concatenate(TokenShards.open(out).arrays("train"))[:40].tolist()
    shutil.rmtree(out)
    tok = load_tokenizer(json.loads(json.dumps(spec)))  # what a checkpoint stores
    assert tok.decode(first).startswith("Document 0: the quick")


def test_more_tokenizer_processes_write_the_same_shards(tmp_path, inputs, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 200)  # many chunks, so both processes work
    for n in (1, 2):
        prepare(str(tmp_path / f"n{n}"), inputs=[str(inputs[0])], text_field="body", num_proc=n, progress=False)
    one, two = (json.loads((tmp_path / f"n{n}" / "index.json").read_text())["splits"] for n in (1, 2))
    assert one == two


def test_text_units_split_a_file_into_paragraphs_or_lines(tmp_path):
    (tmp_path / "book.txt").write_text("one\ntwo\n\nthree\n\nfour\nfive\n")
    counts = {}
    for unit in ("paragraph", "line"):
        prepare(str(tmp_path / unit), inputs=[str(tmp_path / "book.txt")], text_unit=unit, progress=False)
        splits = TokenShards.open(tmp_path / unit).index["splits"]
        counts[unit] = splits["train"]["documents"] + splits["val"]["documents"]
    assert counts == {"paragraph": 3, "line": 5}


def test_synthetic_task_shards_carry_answer_masks_aligned_with_the_tokens(tmp_path):
    task = PasskeyTask(length=240, train_examples=4, val_examples=2)
    prepare(str(tmp_path / "pk"), task=task, progress=False)
    shards = TokenShards.open(tmp_path / "pk", verify_checksums=True)
    tokens, masks = np.concatenate(shards.arrays("val")), np.concatenate(shards.masks("val"))
    expected = list(task.examples(ByteTokenizer(), "val"))
    assert tokens.tolist() == [t for ids, _ in expected for t in [*ids, 256]]
    assert masks.tolist() == [m for _, mask in expected for m in [*mask, 0]]
    assert shards.index["source"]["task"] == "PasskeyTask" and shards.index["source"]["length"] == 240


def test_an_interrupted_prepare_leaves_the_previous_output_intact(tmp_path, inputs, monkeypatch):
    out = tmp_path / "out"
    prepare(str(out), inputs=[str(inputs[0])], text_field="body", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        yield from []
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "tokenize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(out), inputs=[str(inputs[0])], tokenizer="bpe", overwrite=True, text_field="body", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory or cache left


def test_an_existing_output_is_replaced_only_when_asked(tmp_path, inputs):
    out = tmp_path / "out"
    prepare(str(out), builtin=True, progress=False)
    with pytest.raises(ValueError, match=f"output '{out}' already holds prepared data; pass --overwrite true"):
        prepare(str(out), builtin=True, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a prepared data directory"):
        prepare(str(tmp_path / "mine"), builtin=True, overwrite=True, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "case, kwargs, error",
    [
        ("no source", {}, "give exactly one source"),
        ("missing input", {"inputs": ["{tmp}/nothing/*.txt"]}, "input '.*nothing/\\*.txt' matches no file"),
        ("jsonl field", {"inputs": ["{inputs}/rows.jsonl"]}, "have no field 'text' \\(they have: body, id\\)"),
        ("one document", {"inputs": ["{inputs}/00.txt"]}, "1 document\\(s\\), too few .* --text_unit paragraph"),
        ("no such tokenizer", {"builtin": True, "tokenizer": "{tmp}/none.json"}, "is neither 'bytes', 'bpe'"),
        ("no end-of-text", {"builtin": True, "tokenizer": "{tmp}/noeot.json"}, "has no end-of-text token"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_bad_input_is_named_and_nothing_is_written(tmp_path, inputs, case, kwargs, error):
    bpe_file(tmp_path).rename(tmp_path / "noeot.json")
    text = (tmp_path / "noeot.json").read_text().replace("<|endoftext|>", "<|something|>")
    (tmp_path / "noeot.json").write_text(text)
    kwargs = {
        k: [s.format(tmp=tmp_path, inputs=inputs[0]) for s in v] if isinstance(v, list) else v
        for k, v in kwargs.items()
    }
    if isinstance(kwargs.get("tokenizer"), str):
        kwargs["tokenizer"] = kwargs["tokenizer"].format(tmp=tmp_path)
    with pytest.raises((ValueError, FileNotFoundError, KeyError), match=error):
        prepare(str(tmp_path / "out"), progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "platform.prepare", *args], cwd=REPO, capture_output=True, text=True)


def test_the_command_writes_a_passkey_evaluation_set_at_the_requested_length(tmp_path):
    out = tmp_path / "passkey-300"
    args = ["--config", "configs/data/passkey.yaml", "--output", str(out), "--task.length", "300"]
    done = run_prepare(*args, "--task.train_examples", "0", "--task.val_examples", "6", "--task.depths", "[0, 0.5, 1]")
    assert done.returncode == 0, done.stderr[-2000:]
    shards = TokenShards.open(out, verify_checksums=True)
    val = np.concatenate(shards.arrays("val"))
    ends = np.flatnonzero(val == 256)
    assert len(ends) == 6 and np.all(np.diff([-1, *ends]) == 300)  # six examples of exactly 300 tokens
    assert shards.index["splits"]["train"]["tokens"] == 0 and shards.index["source"]["depths"] == [0, 0.5, 1]


def test_the_command_reports_bad_input_in_one_line(tmp_path):
    done = run_prepare("--output", str(tmp_path / "x"), "--inputs", str(tmp_path / "missing.txt"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: input '{tmp_path / 'missing.txt'}' matches no file; " + (
        "give files, directories or globs that exist"
    )


def test_help_explains_every_option_and_each_task_lists_its_parameters(capsys):
    from lctrain.data.prepare import prepare_cli

    with pytest.raises(SystemExit):
        prepare_cli(["--help"])
    text = capsys.readouterr().out
    for option in ("--inputs", "--builtin", "--task", "--tokenizer", "--bpe_vocab_size", "--num_proc", "--overwrite"):
        assert option in text
    with pytest.raises(SystemExit):
        prepare_cli(["--task.help", "PasskeyTask"])
    text = capsys.readouterr().out
    assert "--task.length" in text and "--task.depths" in text and "Depths of the key" in text
