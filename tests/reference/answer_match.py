"""Answer exact match written as plain loops: a row counts when it has an answer token, and is correct when
every answer token's highest logit is its target. Never imported by platform/."""

from __future__ import annotations


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
