"""Synthetic tasks: a trivial oracle that reads the prompt scores 100%, and the answer marks point at the answer."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lctrain.data.tasks import CopyTask, MQARTask, PasskeyTask
from lctrain.data.tokenizer import ByteTokenizer, train_bpe

BYTES = ByteTokenizer()


def answer_of(ids, mask):
    """The marked tokens, which must be one contiguous run at the end of a passkey or copy example."""
    return [t for t, m in zip(ids, mask) if m]


def passkey_oracle(tokenizer, ids, mask) -> list[int]:
    """Read the number after 'The pass key is' in the prompt; answer with its tokens."""
    prompt = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    return tokenizer.encode(re.search(r"The pass key is (\d+)\. Remember it", prompt).group(1))


def mqar_oracle(task, ids) -> list[int]:
    """Build the key -> value table before the separator, then look up every query after it."""
    sep = ids.index(task.first_id + task.vocab)
    table = dict(zip(ids[0:sep:2], ids[1:sep:2]))
    return [table[q] for q in ids[sep + 1 :: 2]]


def copy_oracle(task, ids) -> list[int]:
    return ids[: ids.index(task.first_id + task.vocab)]


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_passkey_oracle_scores_every_example_and_the_marks_cover_exactly_the_key(tokenizer):
    tok = BYTES if tokenizer == "bytes" else train_bpe(["The grass is green. The pass key is 12345."] * 20, 300)
    task = PasskeyTask(length=300, val_examples=20, depths=[0.0, 0.25, 0.5, 0.75, 1.0])
    for ids, mask in task.examples(tok, "val"):
        assert len(ids) + 1 == task.length  # the end-of-text id completes the requested length
        assert mask[-sum(mask) :] == [1] * sum(mask) and sum(mask) > 0  # one run of marks, at the end
        assert answer_of(ids, mask) == passkey_oracle(tok, ids, mask)


def test_passkey_key_sits_at_the_requested_depth():
    task = PasskeyTask(length=2000, val_examples=5, depths=[0.0, 0.25, 0.5, 0.75, 1.0])
    for depth, (ids, _) in zip(task.depths, task.examples(BYTES, "val")):
        text = BYTES.decode(ids)
        intro_end, question = text.index("\n") + 1, text.index("\nWhat is the pass key?")
        needle = text.index(" The pass key is")
        filler = question - intro_end - len(" The pass key is 12345. Remember it. 12345 is the pass key.")
        assert abs((needle - intro_end) - depth * filler) <= 25  # within one filler sentence of the depth


def test_mqar_oracle_scores_every_query_and_marks_are_the_values():
    task = MQARTask(n_pairs=8, n_queries=6, vocab=32, val_examples=30)
    for ids, mask in task.examples(BYTES, "val"):
        assert len(ids) == 2 * 8 + 1 + 2 * 6
        assert answer_of(ids, mask) == mqar_oracle(task, ids)
        marked = np.flatnonzero(mask)
        assert all(ids[i - 1] < task.first_id + task.vocab // 2 for i in marked)  # each answer follows its key


def test_copy_oracle_scores_every_example():
    task = CopyTask(length=12, vocab=10, val_examples=30)
    for ids, mask in task.examples(BYTES, "val"):
        assert len(ids) == 2 * 12 + 1 and sum(mask) == 12
        assert answer_of(ids, mask) == copy_oracle(task, ids)


@pytest.mark.parametrize("task", [PasskeyTask(length=200), MQARTask(), CopyTask()], ids=lambda t: type(t).__name__)
def test_equal_seeds_give_equal_examples_and_other_seeds_or_splits_differ(task):
    def first(seed, split="val"):
        task.seed = seed
        return [ids for ids, _ in list(task.examples(BYTES, split))[:5]]

    assert first(1) == first(1)
    assert first(1) != first(2)
    assert first(1, "train") != first(1, "val")


def test_tasks_refuse_parameters_they_cannot_honour():
    with pytest.raises(ValueError, match="task.length=50 is shorter than the passkey prompt"):
        list(PasskeyTask(length=50).examples(BYTES, "val"))
    with pytest.raises(ValueError, match=r"task.n_pairs=40 must be in 1..vocab/2=32"):
        MQARTask(n_pairs=40, vocab=64)
    with pytest.raises(ValueError, match="other than its end-of-text id 256"):
        list(CopyTask(vocab=250, first_id=6).examples(BYTES, "val"))
    with pytest.raises(ValueError, match=r"task.depths=\[1.5\] must lie in \[0, 1\]"):
        PasskeyTask(depths=[1.5])
