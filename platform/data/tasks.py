"""Synthetic tasks for long-context and recurrent models: passkey retrieval, multi-query associative
recall (MQAR) and copy.

Each task writes documents of token ids with a mask of the answer tokens, so evaluation can score
exact-match accuracy on them (docs/design.md). Example i of a split is drawn from its own generator
seeded with (seed, split, i): the same seed gives the same examples, whatever else changes. Passkey is
text (filler sentences, any tokenizer); MQAR and copy are sequences of symbol ids
`first_id ... first_id + vocab - 1` plus a separator `first_id + vocab` (33 = '!' keeps them printable
with the byte tokenizer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .tokenizer import Tokenizer

Example = tuple[list[int], list[int]]  # token ids (without the end-of-text id) and their answer mask (0/1)
SPLITS = ("train", "val")

# The filler of the passkey literature (Mohtashami & Jaggi 2023, "Landmark Attention").
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it."


@dataclass
class SyntheticTask:
    """What every task has: how many examples per split, and the seed they are drawn from."""

    train_examples: int = 2000
    """Examples in the train split (0 for an evaluation-only set)."""
    val_examples: int = 200
    """Examples in the validation split."""
    seed: int = 1234
    """Seed of the examples: equal seeds give equal data."""

    def __post_init__(self):
        if self.train_examples < 0 or self.val_examples < 1:
            raise ValueError(
                f"task.train_examples={self.train_examples} must be >= 0 and task.val_examples={self.val_examples} "
                ">= 1; raise them"
            )

    def example(self, tokenizer: Tokenizer, rng: np.random.Generator, i: int) -> Example:
        raise NotImplementedError

    def examples(self, tokenizer: Tokenizer, split: str) -> Iterator[Example]:
        n = self.train_examples if split == "train" else self.val_examples
        self.check(tokenizer)
        for i in range(n):
            yield self.example(tokenizer, np.random.default_rng([self.seed, SPLITS.index(split), i]), i)

    def check(self, tokenizer: Tokenizer) -> None:
        """Raise before writing anything when the task cannot be expressed with this tokenizer."""

    def describe(self) -> dict[str, Any]:
        return {"task": type(self).__name__, **dataclasses.asdict(self)}


@dataclass
class PasskeyTask(SyntheticTask):
    """Passkey retrieval: a random number hidden at some depth of filler text, asked for at the end."""

    length: int = 512
    """Tokens per example, the end-of-text id included (evaluation sets vary it: 1x-8x the training length)."""
    depths: list[float] | None = None
    """Depths of the key in the filler (0 = start, 1 = end); example i uses depths[i % len(depths)]. None draws
    one uniformly per example."""
    key_digits: int = 5
    """Digits of the pass key."""

    def __post_init__(self):
        super().__post_init__()
        if any(not 0.0 <= d <= 1.0 for d in self.depths or []):
            raise ValueError(f"task.depths={self.depths} must lie in [0, 1]; 0 is the start of the filler, 1 its end")
        if not 1 <= self.key_digits <= 18:
            raise ValueError(f"task.key_digits={self.key_digits} must be in 1..18")

    def pieces(self, tokenizer: Tokenizer, key: str) -> tuple[list[int], list[int], list[int], list[int]]:
        intro = tokenizer.encode(INTRO + "\n")
        needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
        question = tokenizer.encode("\nWhat is the pass key? The pass key is ")
        return intro, needle, question, tokenizer.encode(key)

    def check(self, tokenizer: Tokenizer) -> None:
        fixed = sum(map(len, self.pieces(tokenizer, "9" * self.key_digits))) + 1
        if fixed > self.length:
            raise ValueError(f"task.length={self.length} is shorter than the passkey prompt ({fixed} tokens); raise it")

    def example(self, tokenizer: Tokenizer, rng: np.random.Generator, i: int) -> Example:
        key = str(rng.integers(10 ** (self.key_digits - 1), 10**self.key_digits))
        intro, needle, question, answer = self.pieces(tokenizer, key)
        n_filler = self.length - 1 - len(intro) - len(needle) - len(question) - len(answer)
        if n_filler < 0:
            raise ValueError(f"task.length={self.length} is shorter than the passkey prompt of example {i}; raise it")
        sentences = [tokenizer.encode(" " + s) for s in FILLER]
        filler, bounds = [], [0]  # filler tokens, and the sentence boundaries where the key may go
        while len(filler) < n_filler:
            filler += sentences[(len(bounds) - 1) % len(sentences)]
            bounds.append(min(len(filler), n_filler))
        filler = filler[:n_filler]
        depth = self.depths[i % len(self.depths)] if self.depths else rng.random()
        cut = min(bounds, key=lambda b: abs(b - depth * n_filler))  # nearest boundary to the depth
        ids = intro + filler[:cut] + needle + filler[cut:] + question + answer
        return ids, [0] * (len(ids) - len(answer)) + [1] * len(answer)


@dataclass
class SymbolTask(SyntheticTask):
    """Tasks over symbol ids `first_id .. first_id + vocab - 1`, with `first_id + vocab` as separator."""

    vocab: int = 64
    """Distinct symbols."""
    first_id: int = 33
    """Token id of the first symbol."""

    def check(self, tokenizer: Tokenizer) -> None:
        last = self.first_id + self.vocab
        if self.first_id < 0 or last >= tokenizer.vocab_size or self.first_id <= tokenizer.eot_id <= last:
            raise ValueError(
                f"task symbols {self.first_id}..{last} (task.first_id, task.vocab + a separator) must be ids of the "
                f"tokenizer (vocab {tokenizer.vocab_size}) other than its end-of-text id {tokenizer.eot_id}; "
                "change task.first_id or task.vocab"
            )


@dataclass
class MQARTask(SymbolTask):
    """Multi-query associative recall (Arora et al. 2023, "Zoology"): key-value pairs, a separator, then
    queries `key value` whose values are the answers. Keys come from the first half of the symbols, values
    from the second half."""

    n_pairs: int = 16
    """Key-value pairs per example (distinct keys: at most vocab / 2)."""
    n_queries: int = 16
    """Queries per example, each a key of the pairs (distinct while n_queries <= n_pairs)."""

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.n_pairs <= self.vocab // 2 or self.n_queries < 1:
            raise ValueError(
                f"task.n_pairs={self.n_pairs} must be in 1..vocab/2={self.vocab // 2} and "
                f"task.n_queries={self.n_queries} >= 1; raise task.vocab or lower them"
            )

    def example(self, tokenizer: Tokenizer, rng: np.random.Generator, i: int) -> Example:
        half = self.vocab // 2
        keys = self.first_id + rng.choice(half, size=self.n_pairs, replace=False)
        values = self.first_id + half + rng.integers(0, self.vocab - half, size=self.n_pairs)
        asked = rng.choice(self.n_pairs, size=self.n_queries, replace=self.n_queries > self.n_pairs)
        pairs = np.stack([keys, values], axis=1).reshape(-1)  # (2·n_pairs,) k1 v1 k2 v2 ...
        queries = np.stack([keys[asked], values[asked]], axis=1).reshape(-1)  # (2·n_queries,) q1 a1 q2 a2 ...
        ids = [*pairs.tolist(), self.first_id + self.vocab, *queries.tolist()]
        answers = [0] * (2 * self.n_pairs + 1) + [0, 1] * self.n_queries
        return ids, answers


@dataclass
class CopyTask(SymbolTask):
    """Copy: a random sequence of symbols, a separator, then the same sequence again (the answer)."""

    length: int = 64
    """Symbols to copy (an example holds 2 * length + 2 tokens with the separator and end-of-text)."""

    def __post_init__(self):
        super().__post_init__()
        if self.length < 1:
            raise ValueError(f"task.length={self.length} must be >= 1")

    def example(self, tokenizer: Tokenizer, rng: np.random.Generator, i: int) -> Example:
        sequence = (self.first_id + rng.integers(0, self.vocab, size=self.length)).tolist()
        return [*sequence, self.first_id + self.vocab, *sequence], [0] * (self.length + 1) + [1] * self.length
