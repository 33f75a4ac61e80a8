"""Retrieval grids: can the model find, at length L, what it read far back? Passkey and MQAR, scored exactly.

Protocol. The examples are those `platform.prepare` writes for the val split of the task (data/tasks.py),
drawn with the model's own tokenizer from the same seed, so every model answers the same questions. An
example is scored teacher-forced: one forward over its tokens, and an answer token is right when it is the
argmax of the logits at the position before it, which is exactly when greedy decoding writes it. The argmax
is taken in the logits' own dtype, as greedy decoding (models/sampling.py) takes it.

- passkey: rows are lengths L (tokens per example, end-of-text included), columns the depths of the key in
  the filler; a cell is the share of its examples whose whole key is right (the passkey literature's measure).
- mqar: rows are numbers of key-value pairs n (an example holds 4n + 2 tokens: n pairs, a separator, n
  queries that ask every pair once in random order, end-of-text); columns split the pair list into `bins`
  equal shares by where the asked pair sits (0 = the first pairs, the farthest back); a cell is the share
  of its queries answered with the right value (per-query accuracy, the MQAR literature's measure).

Long examples go through the model in chunks with its state, as perplexity.py runs its windows, and only the
hidden states of answer positions reach the output head. Examples are split over ranks and their hits
gathered in example order, so any world size gives the same grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..data.tasks import Example, MQARTask, PasskeyTask
from ..data.tokenizer import Tokenizer
from ..training.metrics import AnswerExactMatch
from .perplexity import chunk_hidden, segment_len
from .ranks import Ranks
from .results import RetrievalGrid
from .sources import LoadedModel


def passkey_examples(
    tokenizer: Tokenizer, length: int, depths: list[float], examples: int, seed: int, key_digits: int
) -> list[Example]:
    """The val split of a passkey task at one length: example i has its key at depths[i % len(depths)]."""
    task = PasskeyTask(
        length=length,
        depths=list(depths),
        key_digits=key_digits,
        seed=seed,
        train_examples=0,
        val_examples=len(depths) * examples,
    )
    shortest = sum(map(len, task.pieces(tokenizer, "9" * key_digits))) + 1  # the prompt without filler, as check()
    if length < shortest:
        raise ValueError(
            f"--retrieval.lengths: {length} tokens cannot hold the passkey prompt; use lengths of at least {shortest}"
        )
    try:
        return list(task.examples(tokenizer, "val"))
    except ValueError:  # a key that tokenizes longer than the nines did
        raise ValueError(
            f"--retrieval.lengths: {length} tokens cannot hold every passkey prompt; use lengths above {shortest}"
        ) from None


def mqar_examples(
    tokenizer: Tokenizer, n_pairs: int, examples: int, seed: int, vocab: int = 64, first_id: int = 33
) -> list[Example]:
    """The val split of an MQAR task with n_pairs pairs, each asked once (n_queries = n_pairs)."""
    if not 1 <= n_pairs <= vocab // 2:
        raise ValueError(
            f"--retrieval.mqar_pairs: {n_pairs} pairs need distinct keys among {vocab // 2} (half of "
            f"--retrieval.mqar_vocab={vocab}); use 1..{vocab // 2} pairs or raise the vocab"
        )
    task = MQARTask(
        n_pairs=n_pairs,
        n_queries=n_pairs,
        vocab=vocab,
        first_id=first_id,
        seed=seed,
        train_examples=0,
        val_examples=examples,
    )
    return list(task.examples(tokenizer, "val"))


@torch.inference_mode()
def answer_logits(model: nn.Module, inputs: Tensor, answers: Tensor, chunk: int | None) -> Tensor:
    """inputs (B, T), answers (B, T) bool marking the positions whose prediction is scored -> their logits
    (N, V), row by row in position order (N = answers.sum()). The model reads the inputs in chunks of `chunk`
    tokens (None: at once) with its state; only the marked hidden states reach the output head."""
    start = int(answers.any(dim=0).nonzero()[0])  # first position scored in any row
    hidden = [h[:, max(a, start) - a :] for a, h in chunk_hidden(model, inputs, chunk, start)]
    hidden = torch.cat(hidden, dim=1)  # (B, T - start, D)
    return model.output_head(hidden[answers[:, start:]])  # (N, D) -> (N, V)


@torch.inference_mode()
def row_hits(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """logits (R, A, V), targets (R, A), mask (R, A) bool -> (R,) long: 1 where every masked target is the
    argmax. The training metric's own rule (AnswerExactMatch), applied one row at a time."""
    metric = AnswerExactMatch().to(logits.device)
    hits = []
    for r in range(logits.shape[0]):
        before = metric.correct.clone()
        metric.update(logits[r : r + 1], targets[r : r + 1], mask[r : r + 1])
        hits.append(metric.correct - before)
    return torch.stack(hits) if hits else torch.zeros(0, dtype=torch.long, device=logits.device)


@torch.inference_mode()
def example_hits(
    loaded: LoadedModel,
    examples: list[Example],
    *,
    per_token: bool = False,
    batch_size: int = 8,
    chunk_len: int | None = 1024,
    ranks: Ranks | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Greedy exact match of examples of one length: (n,) whole answers right, or with per_token (n, A) each
    answer token right (every example with A answer tokens). The same on every rank, in example order."""
    ranks = ranks or Ranks()
    model, device = loaded.model, loaded.device
    chunk = segment_len(loaded, chunk_len)
    mine = ranks.mine(len(examples))
    hits = []
    for i in range(0, len(mine), batch_size):
        batch = [examples[k] for k in mine[i : i + batch_size]]
        ids = torch.tensor([e[0] for e in batch], device=device)  # (B, T): examples of one length
        marks = torch.tensor([e[1] for e in batch], dtype=torch.bool, device=device)  # (B, T) answer tokens
        inputs, targets, answers = ids[:, :-1], ids[:, 1:], marks[:, 1:]  # (B, T - 1) each
        logits = answer_logits(model, inputs, answers, chunk)  # (N, V), N answer tokens in row-major order
        if per_token:
            flat = row_hits(logits[:, None], targets[answers][:, None], answers.new_ones(len(logits), 1))  # (N,)
            hits.append(flat.view(len(batch), -1).cpu())  # (B, A)
        else:
            counts = answers.sum(dim=1)  # (B,) answer tokens per row (tokenizers may split keys unevenly)
            padded = torch.arange(int(counts.max()), device=device) < counts[:, None]  # (B, A_max)
            row_logits = logits.new_zeros(*padded.shape, logits.shape[-1])  # (B, A_max, V)
            row_logits[padded] = logits
            row_targets = targets.new_zeros(padded.shape)
            row_targets[padded] = targets[answers]
            hits.append(row_hits(row_logits, row_targets, padded).cpu())  # (B,)
        if progress is not None:
            progress(inputs.numel())
    if hits:
        mine_hits = torch.cat(hits)
    else:  # more ranks than examples: this rank still joins the gather
        width = (sum(examples[0][1]),) if per_token else ()
        mine_hits = torch.zeros(0, *width, dtype=torch.long)
    return ranks.collect(mine_hits.to(device), len(examples)).cpu()


def passkey_grid(
    loaded: LoadedModel,
    lengths: list[int],
    depths: list[float],
    examples: int = 10,
    seed: int = 1234,
    key_digits: int = 5,
    ranks: Ranks | None = None,
    batch_size: int = 8,
    chunk_len: int | None = 1024,
    progress: Callable[[int], None] | None = None,
) -> RetrievalGrid:
    """Passkey accuracy by length (rows) and key depth (columns), `examples` examples per cell.

    Args:
        lengths: Tokens per example, end-of-text included.
        depths: Where the key sits in the filler: 0 its start, 1 its end.
        examples: Examples per (length, depth) cell.
        seed: Seed of the examples (the task's own): equal seeds, equal examples.
        key_digits: Digits of the pass key.
        ranks: The ranks sharing the examples (default: this process alone).
        batch_size: Examples per forward.
        chunk_len: Tokens per forward call through the model's state (None: a whole example at once).
        progress: Called with the number of tokens of every batch run through the model.
    """
    if not lengths:
        raise ValueError("--retrieval.lengths is empty; give example lengths, e.g. [512, 1024, 2048]")
    if not depths:
        raise ValueError("--retrieval.depths is empty; give key depths in [0, 1], e.g. [0.0, 0.5, 1.0]")
    if examples < 1:
        raise ValueError(f"--retrieval.examples={examples} must be at least 1 (examples per cell)")
    lengths = sorted(set(lengths))
    accuracy = []
    for length in lengths:
        cases = passkey_examples(loaded.tokenizer, length, depths, examples, seed, key_digits)
        hits = example_hits(
            loaded, cases, batch_size=batch_size, chunk_len=chunk_len, ranks=ranks, progress=progress
        )  # (len(depths) * examples,): example i has depth i % len(depths)
        accuracy.append([hits[d :: len(depths)].sum().item() / examples for d in range(len(depths))])
    return RetrievalGrid("passkey", "length", lengths, "depth", [float(d) for d in depths], accuracy, examples)


def mqar_grid(
    loaded: LoadedModel,
    pairs: list[int],
    examples: int = 10,
    seed: int = 1234,
    bins: int = 4,
    vocab: int = 64,
    first_id: int = 33,
    ranks: Ranks | None = None,
    batch_size: int = 8,
    chunk_len: int | None = 1024,
    progress: Callable[[int], None] | None = None,
) -> RetrievalGrid:
    """MQAR per-query accuracy by number of pairs (rows) and position of the asked pair (columns).

    Column c, valued c / bins, holds the queries whose pair is among pairs c·n/bins ... (c + 1)·n/bins - 1 of
    the n in the example (0: the first pairs, read longest ago); every pair is asked once per example.

    Args:
        pairs: Key-value pairs per example (4n + 2 tokens per example).
        examples: Examples per row.
        seed: Seed of the examples (the task's own): equal seeds, equal examples.
        bins: Shares of the pair list, one column each (1: a single column); at most the fewest pairs.
        vocab: Distinct symbols (keys from the first half, values from the second): the task's vocab.
        first_id: Token id of the first symbol: the task's first_id.
        ranks: The ranks sharing the examples (default: this process alone).
        batch_size: Examples per forward.
        chunk_len: Tokens per forward call through the model's state (None: a whole example at once).
        progress: Called with the number of tokens of every batch run through the model.
    """
    if not pairs:
        raise ValueError("--retrieval.mqar_pairs is empty; give numbers of key-value pairs, e.g. [8, 16, 32]")
    if examples < 1:
        raise ValueError(f"--retrieval.examples={examples} must be at least 1 (examples per row)")
    pairs = sorted(set(pairs))
    if not 1 <= bins <= pairs[0]:
        raise ValueError(
            f"--retrieval.mqar_bins={bins} must be between 1 and the fewest pairs {pairs[0]} (every column needs pairs)"
        )
    accuracy = []
    for n in pairs:
        cases = mqar_examples(loaded.tokenizer, n, examples, seed, vocab, first_id)
        hits = example_hits(
            loaded, cases, per_token=True, batch_size=batch_size, chunk_len=chunk_len, ranks=ranks, progress=progress
        )  # (examples, n): query q of each example right or not
        correct, asked = torch.zeros(bins, dtype=torch.long), torch.zeros(bins, dtype=torch.long)
        for (ids, _), row in zip(cases, hits):
            keys = ids[0 : 2 * n : 2]
            queried = [keys.index(k) for k in ids[2 * n + 1 :: 2]]  # (n,) index of the pair each query asks
            column = torch.tensor([j * bins // n for j in queried])
            correct.index_add_(0, column, row)
            asked.index_add_(0, column, torch.ones_like(row))
        accuracy.append([c / a for c, a in zip(correct.tolist(), asked.tolist())])
    return RetrievalGrid("mqar", "pairs", pairs, "depth", [c / bins for c in range(bins)], accuracy, examples)
