"""What an evaluation measures, as plain data: report.py turns it into tables, CSV/JSON and plots."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass
class PerplexityByLength:
    """The same scored tokens, predicted from windows of each length: the last `score_len` tokens of every window."""

    lengths: list[int]
    """Window lengths L in tokens (the context of the last scored token)."""
    nll: list[float]
    """Mean negative log-likelihood (nats per token) of the scored tokens at each length."""
    scored_tokens: int
    """Tokens scored at every length (windows x score_len)."""
    windows: int

    @property
    def ppl(self) -> list[float]:
        return [math.exp(v) for v in self.nll]


@dataclasses.dataclass
class LossByPosition:
    """Mean loss of the token predicted at each position of windows of the longest length, in log-spaced bins."""

    starts: list[int]
    """Bin b holds the predictions made from positions starts[b] <= p < ends[b] (p + 1 tokens of context)."""
    ends: list[int]
    nll: list[float]
    """Mean NLL (nats per token) in each bin."""
    windows: int


@dataclasses.dataclass
class RetrievalGrid:
    """Exact-match accuracy of a retrieval task over a grid: rows x columns (e.g. length x key depth)."""

    task: str
    """'passkey' or 'mqar'."""
    row_name: str
    """What the rows vary, e.g. 'length' (tokens per example)."""
    rows: list[int]
    column_name: str
    """What the columns vary, e.g. 'depth' (0 = start of the filler, 1 = its end)."""
    columns: list[float]
    accuracy: list[list[float]]
    """accuracy[r][c] in [0, 1], greedy: passkey, the share of examples whose whole key is right; mqar, the share
    of queries answered right."""
    examples: int
    """Examples per cell (passkey) or per row (mqar): the same examples for every model."""


@dataclasses.dataclass
class ModelResults:
    """Everything measured for one model (one entry of --models)."""

    label: str
    arch: str
    n_params: int
    trained_len: int | None
    self_extend: str | None
    """'G=4 W=64' or None."""
    perplexity: PerplexityByLength | None = None
    position: LossByPosition | None = None
    retrieval: dict[str, RetrievalGrid] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    """Wall-clock time spent evaluating this model."""


@dataclasses.dataclass
class Evaluation:
    """The results of every model, and the protocol they were measured with (data, lengths, windows, device)."""

    models: list[ModelResults]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
