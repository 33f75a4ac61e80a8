"""Perplexity by context length and loss by token position, on the same tokens for every model and length.

Protocol. The split's token stream (documents joined by their end-of-text ids) is cut into windows that end
at the same places for every length: window k predicts the tokens `ends[k] - L + 1 ... ends[k]` from the L
tokens before each, and the last `score_len` predictions of it are scored. So a length sweep scores exactly
the same tokens at every L, and only the context before them changes. The window ends are `stride` apart
(`score_len` by default, so scored tokens tile the split without overlap) from the first end that leaves
room for the longest length; `limit` keeps that many scored tokens, spread evenly over the split.

Long windows go through the model contract in chunks (prefill with state), so activations are bounded by the
chunk: what grows with L is only the state a family carries, which is a KV cache of L keys for LSWT and for
SeqCond's attention blocks, a cache of `cache_len` keys for LSWT with Transformer-XL memory, and a fixed-size
recurrent state for SerriformNet and the condensers. For a model without XL memory chunking changes nothing
but memory (decode ≡ forward); an XL model is run in segments of the length it was trained on, as it trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.shards import TokenShards
from .ranks import Ranks
from .results import LossByPosition, PerplexityByLength
from .sources import LoadedModel

HEAD_CHUNK = 256  # positions per output-head call: the logits of a whole window never exist at once


def read_tokens(data_dir: str, split: str = "val", option: str = "--data.split") -> np.ndarray:
    """The token ids of one split of a prepared data directory, its shards joined in order; an unknown split
    is a one-line error naming `option`."""
    shards = TokenShards.open(data_dir)
    if split not in shards.index["splits"]:
        raise ValueError(
            f"{option}={split}: {data_dir} has the splits {', '.join(shards.index['splits'])}; choose one of them"
        )
    arrays = shards.arrays(split)
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def check_lengths(lengths: list[int], score_len: int) -> list[int]:
    """Sorted, distinct lengths, each at least 2 and at least `score_len`, or a one-line error."""
    if not lengths:
        raise ValueError("--perplexity.lengths is empty; give window lengths, e.g. [256, 512, 1024]")
    if min(lengths) < 2:
        raise ValueError(f"--perplexity.lengths={lengths}: every length must be at least 2 tokens")
    if not 1 <= score_len <= min(lengths):
        raise ValueError(
            f"--perplexity.score_len={score_len} must be between 1 and the shortest length {min(lengths)}: "
            "the scored tokens are the last ones of every window"
        )
    return sorted(set(lengths))


def window_ends(n_tokens: int, longest: int, score_len: int, stride: int | None, limit: int | None) -> list[int]:
    """Where the windows end: index e is the last predicted token, inputs are the L tokens before it."""
    stride = stride or score_len
    if stride < 1:
        raise ValueError(f"--perplexity.stride={stride} must be at least 1")
    if n_tokens < longest + 1:
        raise ValueError(
            f"the data has {n_tokens} tokens in its split, fewer than the longest length {longest} plus the token it "
            "predicts; lower --perplexity.lengths or pass a larger --data.data_dir"
        )
    ends = list(range(longest, n_tokens, stride))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit={limit} must be at least 1 (tokens scored per length)")
        keep = max(1, limit // score_len)
        if keep < len(ends):
            ends = [ends[i] for i in np.linspace(0, len(ends) - 1, keep).round().astype(int)]  # spread over the split
    return ends


def position_bins(length: int, per_octave: int = 2) -> list[int]:
    """Edges 0 = e_0 < e_1 < ... = length of log-spaced bins of positions (position p predicts from p + 1 tokens)."""
    steps = int(math.ceil(per_octave * math.log2(max(length, 2))))
    edges = {0, length} | {min(length, round(2 ** (k / per_octave))) for k in range(steps + 1)}
    return sorted(edges)


def segment_len(loaded: LoadedModel, chunk_len: int | None) -> int | None:
    """Tokens per forward call: an XL model's trained segment, else `chunk_len` (None: the whole window)."""
    config = getattr(loaded.model, "config", None)
    if getattr(config, "cache_len", 0) and loaded.trained_len:
        return loaded.trained_len
    return chunk_len


def chunk_hidden(model: nn.Module, inputs: Tensor, chunk: int | None, start: int = 0) -> Iterator[tuple[int, Tensor]]:
    """Run inputs (B, T) through the model in chunks of `chunk` tokens (None: at once), passing its state on;
    yield (a, hidden (B, b - a, D)) for each chunk [a, b) that ends past position `start`."""
    length = inputs.shape[1]
    chunk = chunk or length
    state = None
    for a in range(0, length, chunk):
        out = model(inputs[:, a : a + chunk], state=state, return_hidden=True, return_logits=False)
        state = out.state
        if a + out.hidden.shape[1] > start:
            yield a, out.hidden


@torch.inference_mode()
def window_losses(model: nn.Module, inputs: Tensor, targets: Tensor, score_from: int, chunk: int | None) -> Tensor:
    """inputs, targets (B, L) -> the NLL (B, L - score_from) of the targets from position `score_from` on."""
    losses = []
    for a, hidden in chunk_hidden(model, inputs, chunk, score_from):
        b = a + hidden.shape[1]
        for lo in range(max(a, score_from), b, HEAD_CHUNK):
            hi = min(lo + HEAD_CHUNK, b)
            logits = model.output_head(hidden[:, lo - a : hi - a])  # (B, hi - lo, V)
            logits = logits.double() if logits.dtype == torch.float64 else logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), targets[:, lo:hi], reduction="none")  # (B, hi - lo)
            losses.append(nll.double())
    return torch.cat(losses, dim=1)


def perplexity_by_length(
    loaded: LoadedModel,
    tokens: np.ndarray,
    lengths: list[int],
    *,
    score_len: int = 128,
    stride: int | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    chunk_len: int | None = 1024,
    with_positions: bool = True,
    ranks: Ranks | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[PerplexityByLength, LossByPosition | None]:
    """The perplexity of the same scored tokens at every length, and (with_positions) the mean loss by position
    over the windows of the longest length, which the longest length's pass computes at no extra cost.

    Windows are split over `ranks` and their per-window sums gathered in window order, so any world size gives
    the same numbers. `progress(n)` is told of every n tokens run through the model."""
    ranks = ranks or Ranks()
    lengths = check_lengths(lengths, score_len)
    longest = lengths[-1]
    ends = window_ends(len(tokens), longest, score_len, stride, limit)
    chunk = segment_len(loaded, chunk_len)
    edges = position_bins(longest)
    mine = ranks.mine(len(ends))
    device = loaded.device
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64))

    nll_by_length = []
    bin_sums = None
    for length in lengths:
        positions = with_positions and length == longest
        sums, per_bin = [], []
        for i in range(0, len(mine), batch_size):
            rows = [ends[k] for k in mine[i : i + batch_size]]
            window = torch.stack([stream[e - length : e + 1] for e in rows]).to(device)  # (B, L + 1)
            score_from = 0 if positions else length - score_len
            nll = window_losses(loaded.model, window[:, :-1], window[:, 1:], score_from, chunk)  # (B, L - score_from)
            sums.append(nll[:, -score_len:].sum(dim=1).cpu())
            if positions:
                per_bin.append(torch.stack([nll[:, a:b].sum(dim=1) for a, b in zip(edges, edges[1:])], 1).cpu())
            if progress is not None:
                progress(len(rows) * length)
        sums = torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64)
        every = ranks.collect(sums.to(device), len(ends)).cpu()  # (windows,) in window order
        nll_by_length.append(every.sum().item() / (len(ends) * score_len))
        if positions:
            mine_bins = torch.cat(per_bin) if per_bin else torch.zeros(0, len(edges) - 1, dtype=torch.float64)
            bin_sums = ranks.collect(mine_bins.to(device), len(ends)).cpu().sum(dim=0)  # (bins,)

    result = PerplexityByLength(lengths, nll_by_length, len(ends) * score_len, len(ends))
    if bin_sums is None:
        return result, None
    widths = [b - a for a, b in zip(edges, edges[1:])]
    mean = [s / (w * len(ends)) for s, w in zip(bin_sums.tolist(), widths)]
    return result, LossByPosition(edges[:-1], edges[1:], mean, len(ends))
