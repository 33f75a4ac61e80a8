"""SelfExtend in float64, written from the equations of docs/architectures.md as plain loops.

Every score uses the official decoding form: the query stays unrotated and the key is rotated by
minus its merged distance (plus under reversed RoPE), one pair at a time; the platform instead rotates
queries and keys separately per kind of distance, so the two share no code path. Registers have no
position: their keys score against the unrotated query as they are. Never imported by platform/.
"""

from __future__ import annotations

import functools
import math

import torch


def merged_distance(i: int, j: int, group_size: int, window_size: int) -> int:
    """Paper §3 / Fig. 3: i - j inside the window, else ⌊i/G⌋ + W - ⌊W/G⌋ - ⌊j/G⌋ (mirrored for keys ahead)."""
    G, W = group_size, window_size
    if abs(i - j) < W:
        return i - j
    if i - j >= W:
        return (i // G + W - W // G) - j // G
    return -((j // G + W - W // G) - i // G)


@functools.cache
def _frequency(a: int, head_dim: int, base: float) -> float:
    return base ** (-2 * a / head_dim)


def rotate_by(x: list[float], angle: float, base: float) -> list[float]:
    """Rotate-half RoPE: component a pairs with a + Dh/2 and turns by angle * base^(-2a/Dh)."""
    half = len(x) // 2
    y = list(x)
    for a in range(half):
        phi = angle * _frequency(a, len(x), base)
        c, s = math.cos(phi), math.sin(phi)
        y[a] = x[a] * c - x[a + half] * s
        y[a + half] = x[a + half] * c + x[a] * s
    return y


def self_extend_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int,
    window_size: int,
    rope_base: float = 10000.0,
    reversed: bool = False,
    causal: bool = True,
    key_offset: int = 0,
    pads: list[int] | None = None,
    starts: list[int] | None = None,
    register_keys: torch.Tensor | None = None,
    register_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, H, T, Dh), k and v (B, Hkv, S, Dh): the queries are the last T keys, key j sits at absolute
    position key_offset + j. Row b hides its first pads[b] keys and counts positions from starts[b]
    (default: its first real key when it has pads, else 0). Registers (Hkv, R, Dh) are seen by every query."""
    B, H, T, Dh = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    R = 0 if register_keys is None else register_keys.shape[1]
    ql, kl, vl = q.double().tolist(), k.double().tolist(), v.double().tolist()
    out = torch.zeros(B, H, T, Dh, dtype=torch.float64)
    for b in range(B):
        pad = 0 if pads is None else pads[b]
        start = starts[b] if starts is not None else (key_offset + pad if pad else 0)
        for h in range(H):
            kh = h // (H // Hkv)
            for t in range(T):
                i = S - T + t
                scores, rows = [], []
                for r in range(R):  # no position: the unrotated query against the key as it is
                    key = register_keys[kh, r].double().tolist()
                    scores.append(sum(a * c for a, c in zip(ql[b][h][t], key)) / math.sqrt(Dh))
                    rows.append(register_values[kh, r].double().tolist())
                for j in range(pad, S):
                    if causal and j > i:
                        continue
                    d = merged_distance(key_offset + i - start, key_offset + j - start, group_size, window_size)
                    key = rotate_by(kl[b][kh][j], d if reversed else -d, rope_base)
                    scores.append(sum(a * c for a, c in zip(ql[b][h][t], key)) / math.sqrt(Dh))
                    rows.append(vl[b][kh][j])
                if not scores:
                    continue  # a padding query that sees no key: zeros
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for w, row in zip(weights, rows):
                    for c in range(Dh):
                        out[b, h, t, c] += w / total * row[c]
    return out
