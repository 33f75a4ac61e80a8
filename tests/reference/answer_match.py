"""Answer exact match and the answer-weighted cross-entropy written as plain loops: a row counts when it
has an answer token, and is correct when every answer token's highest logit is its target. Never imported by
platform/."""

from __future__ import annotations

import math


def answer_exact_match(logits, targets, answer_mask) -> float:
    """logits (B, T, V), targets (B, T), answer_mask (B, T) as nested lists or tensors."""
    scored = correct = 0
    for b in range(len(targets)):
        positions = [t for t in range(len(targets[b])) if bool(answer_mask[b][t])]
        if not positions:
            continue
        scored += 1
        ok = True
        for t in positions:
            row = [float(x) for x in logits[b][t]]
            best = max(range(len(row)), key=lambda v: (row[v], -v))  # first index of the maximum, as argmax
            ok = ok and best == int(targets[b][t])
        correct += ok
    return correct / max(scored, 1)


def answer_weighted_ce(logits, targets, answer_mask, answer_weight: float, ignore_index: int = -100) -> float:
    """sum(w·nll) / sum(w) over the non-ignored targets, w = answer_weight on answer tokens and 1 elsewhere,
    nll = log(sum_v exp(logit_v)) - logit_target, in float64."""
    total = weight_sum = 0.0
    for b in range(len(targets)):
        for t in range(len(targets[b])):
            target = int(targets[b][t])
            if target == ignore_index:
                continue
            row = [float(x) for x in logits[b][t]]
            top = max(row)
            nll = top + math.log(sum(math.exp(x - top) for x in row)) - row[target]
            w = answer_weight if bool(answer_mask[b][t]) else 1.0
            total += w * nll
            weight_sum += w
    return total / weight_sum
