"""The answer-weighted cross-entropy (model.answer_loss_weight) against a float64 loop reference."""

from __future__ import annotations

import pytest
import torch

from lctrain.training.losses import answer_weighted_ce, token_nll
from lctrain.training.module import LanguageModelModule
from tests.reference.answer_match import answer_weighted_ce as reference
from tests.training.test_answer_metric import answer_batch

IGNORE = -100


def weighted_batch(seed=0):
    logits, targets, mask = answer_batch(seed)
    targets[1, :3] = IGNORE  # ignored targets count neither in the loss nor in the weights
    return logits, targets, mask


@pytest.mark.parametrize("weight", [1.0, 0.5, 20.0])
def test_weighted_ce_equals_the_loop_reference(weight):
    logits, targets, mask = weighted_batch()
    got = answer_weighted_ce(logits, targets, mask, weight, IGNORE).item()
    assert got == pytest.approx(reference(logits, targets, mask, weight, IGNORE), rel=1e-12)  # float64 throughout


def test_weight_one_is_the_plain_mean_and_a_larger_weight_moves_toward_the_answer_tokens():
    logits, targets, mask = weighted_batch(1)
    nll_sum, n = token_nll(logits, targets, IGNORE)
    assert answer_weighted_ce(logits, targets, mask, 1.0, IGNORE).item() == pytest.approx((nll_sum / n).item())
    answer_only = token_nll(logits, torch.where(mask, targets, IGNORE), IGNORE)
    answer_mean = (answer_only[0] / answer_only[1]).item()
    heavy = answer_weighted_ce(logits, targets, mask, 1e6, IGNORE).item()
    assert heavy == pytest.approx(answer_mean, rel=1e-4)


def test_a_non_positive_answer_weight_is_refused():
    with pytest.raises(ValueError, match="model.answer_loss_weight=0"):
        LanguageModelModule(answer_loss_weight=0.0, vocab_size=257)
