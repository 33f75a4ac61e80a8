"""Perplexity by length and loss by position against a plain float64 loop over windows (one full forward per
window, no state, no chunks, no batching), and chunked against one-shot evaluation for every family."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lctrain.evaluation.perplexity import perplexity_by_length, position_bins, window_ends
from lctrain.evaluation.sources import LoadedModel
from lctrain.models.registry import build_model, count_parameters

VOCAB = 64
FAMILY_OVERRIDES = {
    "lswt": {"n_registers": 2},
    "seqcond": {},
    "serriform": {"dropout": 0.0},
}


def loaded(arch: str, **overrides) -> LoadedModel:
    torch.manual_seed(0)
    model = build_model(arch, "debug", vocab_size=VOCAB, **{**FAMILY_OVERRIDES[arch], **overrides}).double().eval()
    return LoadedModel(arch, model, None, arch, count_parameters(model), 32, None)


def tokens(n: int = 140) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=n).astype(np.uint16)


def reference_nll(model, stream: np.ndarray, end: int, length: int) -> np.ndarray:
    """NLL of the targets stream[end - length + 1 ... end] from one forward over the window, in float64."""
    ids = torch.from_numpy(stream[end - length : end + 1].astype(np.int64))[None]
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[0].double()  # (L, V)
    nll = [-(logits[p].log_softmax(-1)[ids[0, p + 1]]).item() for p in range(length)]
    return np.array(nll)


@pytest.mark.parametrize("arch", ["lswt", "seqcond", "serriform"])
def test_each_length_scores_the_same_tokens_as_a_plain_loop_over_windows(arch):
    m, stream = loaded(arch), tokens()
    lengths, score_len = [16, 40, 96], 8
    result, position = perplexity_by_length(m, stream, lengths, score_len=score_len, batch_size=3, chunk_len=24)
    ends = window_ends(len(stream), 96, score_len, None, None)
    assert result.windows == len(ends) and result.scored_tokens == len(ends) * score_len
    for length, nll in zip(lengths, result.nll):
        expected = np.mean([reference_nll(m.model, stream, e, length)[-score_len:] for e in ends])
        assert nll == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert result.ppl == pytest.approx([math.exp(v) for v in result.nll])
    per_position = np.stack([reference_nll(m.model, stream, e, 96) for e in ends])  # (windows, 96)
    for a, b, nll in zip(position.starts, position.ends, position.nll):
        assert nll == pytest.approx(per_position[:, a:b].mean(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("arch", ["lswt", "seqcond", "serriform"])
def test_chunked_evaluation_equals_one_shot(arch):
    m, stream = loaded(arch), tokens(120)
    one_shot, pos_one = perplexity_by_length(m, stream, [30, 90], score_len=10, chunk_len=None)
    chunked, pos_chunked = perplexity_by_length(m, stream, [30, 90], score_len=10, chunk_len=7, batch_size=2)
    assert chunked.nll == pytest.approx(one_shot.nll, rel=1e-12)
    assert pos_chunked.nll == pytest.approx(pos_one.nll, rel=1e-12)


def test_an_xl_model_runs_in_segments_of_its_trained_length():
    """With a cache, a window is fed as the model trained: segments of trained_len, the cache carried between."""
    m = loaded("lswt", cache_len=16)
    m.trained_len = 16
    stream = tokens()
    result, _ = perplexity_by_length(m, stream, [64], score_len=16, chunk_len=None, with_positions=False)
    ends = window_ends(len(stream), 64, 16, None, None)
    total = 0.0
    for e in ends:
        ids = torch.from_numpy(stream[e - 64 : e + 1].astype(np.int64))[None]
        state = None
        with torch.no_grad():
            for a in range(0, 64, 16):
                out = m.model(ids[:, a : a + 16], state=state)
                state = out.state
        logp = out.logits[0].log_softmax(-1)
        total += -logp[torch.arange(16), ids[0, 49:65]].sum().item()
    assert result.nll[0] == pytest.approx(total / (len(ends) * 16), rel=1e-12)


def test_windows_end_at_the_same_places_and_limit_spreads_them():
    ends = window_ends(1000, 256, 64, None, None)
    assert ends[0] == 256 and ends[-1] <= 999 and all(b - a == 64 for a, b in zip(ends, ends[1:]))
    limited = window_ends(1000, 256, 64, None, limit=192)
    assert len(limited) == 3 and limited[0] == ends[0] and limited[-1] == ends[-1]
    assert position_bins(16) == [0, 1, 2, 3, 4, 6, 8, 11, 16]


@pytest.mark.parametrize(
    "lengths, score_len, n, match",
    [
        ([1, 8], 1, 100, "at least 2"),
        ([8, 16], 12, 100, "score_len"),
        ([8, 512], 4, 100, "fewer than the longest length 512"),
        ([], 4, 100, "lengths is empty"),
    ],
)
def test_bad_lengths_are_named(lengths, score_len, n, match):
    with pytest.raises(ValueError, match=match):
        perplexity_by_length(loaded("serriform"), tokens(n), lengths, score_len=score_len)
