"""LSWT in float64, written from the equations of docs/architectures.md as plain loops over tokens.

Every token is rotated by an explicit angle sign * position * w_i, every score is one dot product,
and which keys a query sees is a predicate, so the reference says nothing about caches, reversed
position counting or kernels: the tests express those through `positions`, `angle_sign` and
`visible`. A `distance` function replaces the positions by any relative distance per pair (SelfExtend's
merged distances): the query stays unrotated and the key turns by minus that distance, as in the
official decoding form. Registers score against the un-rotated query (§0). Also SimCTG (§3.3) as a
pair loop. Never imported by platform/.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = sum(x) / len(x)
    var = sum((xi - mean) ** 2 for xi in x) / len(x)
    return (x - mean) / math.sqrt(var + eps) * weight + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / math.sqrt(sum(xi**2 for xi in x) / len(x) + eps) * weight


def rotate(x: torch.Tensor, angle: float, base: float) -> torch.Tensor:
    """Rotate-half RoPE: component a pairs with a + Dh/2 and turns by angle * base^(-2a/Dh)."""
    half = len(x) // 2
    y = x.clone()
    for a in range(half):
        phi = angle * base ** (-2 * a / len(x))
        y[a] = x[a] * math.cos(phi) - x[a + half] * math.sin(phi)
        y[a + half] = x[a + half] * math.cos(phi) + x[a] * math.sin(phi)
    return y


def linear(x: torch.Tensor, weights: dict, name: str) -> torch.Tensor:
    y = weights[f"{name}.weight"] @ x
    return y + weights[f"{name}.bias"] if f"{name}.bias" in weights else y


def lswt_logits(
    model: torch.nn.Module,
    ids: list[int],
    *,
    positions: list[float] | None = None,
    angle_sign: float = 1.0,
    visible: Callable[[int, int], bool] | None = None,
    base: float | None = None,
    distance: Callable[[int, int], int] | None = None,
) -> torch.Tensor:
    """Logits (T, V) of one sequence. Token t is rotated by angle_sign * positions[t] (default t);
    query i sees key j where visible(i, j) (default j <= i); `base` defaults to the model's rope_base.
    With `distance`, the score of (i, j) is q_i . rotate(k_j, -angle_sign * distance(i, j)) instead
    (equal to the default when distance(i, j) = positions[i] - positions[j])."""
    config = model.config
    w = {k: v.detach().double() for k, v in model.state_dict().items()}
    T, H, Dh = len(ids), config.n_heads, config.head_dim
    positions = list(range(T)) if positions is None else positions
    visible = visible or (lambda i, j: j <= i)
    base = config.rope_base if base is None else base

    h = [layer_norm(linear(w["embed.weight"][t], w, "input_proj"), w["input_norm.weight"], w["input_norm.bias"])
         for t in ids]  # fmt: skip
    for layer in range(config.n_layers):
        p = f"blocks.{layer}."
        x = [layer_norm(ht, w[p + "attention_norm.weight"], w[p + "attention_norm.bias"]) for ht in h]
        q = [linear(xt, w, p + "attention.query").view(H, Dh) for xt in x]
        k = [linear(xt, w, p + "attention.key").view(H, Dh) for xt in x]
        v = [linear(xt, w, p + "attention.value").view(H, Dh) for xt in x]
        if config.qk_norm:
            q = [torch.stack([rms_norm(qt[n], w[p + "attention.q_norm.weight"]) for n in range(H)]) for qt in q]
            k = [torch.stack([rms_norm(kt[n], w[p + "attention.k_norm.weight"]) for n in range(H)]) for kt in k]
        attended = []
        for i in range(T):
            heads = []
            for n in range(H):
                qi = rotate(q[i][n], angle_sign * positions[i], base)
                scores, values = [], []
                for r in range(config.n_registers):  # un-rotated query against the register key
                    scores.append(q[i][n] @ w[p + "attention.register_keys"][n, r] / math.sqrt(Dh))
                    values.append(w[p + "attention.register_values"][n, r])
                for j in range(T):
                    if not visible(i, j):
                        continue
                    if distance is None:
                        scores.append(qi @ rotate(k[j][n], angle_sign * positions[j], base) / math.sqrt(Dh))
                    else:
                        scores.append(q[i][n] @ rotate(k[j][n], -angle_sign * distance(i, j), base) / math.sqrt(Dh))
                    values.append(v[j][n])
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                heads.append(sum(wt * vt for wt, vt in zip(weights, values)) / sum(weights))
            attended.append(linear(torch.cat(heads), w, p + "attention.out"))
        h = [ht + at for ht, at in zip(h, attended)]
        for t in range(T):
            xt = layer_norm(h[t], w[p + "feed_forward_norm.weight"], w[p + "feed_forward_norm.bias"])
            u, g = linear(xt, w, p + "feed_forward.up").chunk(2)
            h[t] = h[t] + linear(u * g / (1 + torch.exp(-g)), w, p + "feed_forward.down")
    out = [linear(layer_norm(ht, w["norm.weight"], w["norm.bias"]), w, "output_proj") for ht in h]
    return torch.stack([w["embed.weight"] @ ot for ot in out])  # (T, V)


def simctg(hidden: torch.Tensor, valid: torch.Tensor, margin: float) -> float:
    """Su et al. 2022: mean over ordered pairs i != j of valid tokens of the same sequence of
    max(0, margin - 1 + cos(h_i, h_j)). hidden (B, T, D), valid (B, T) bool."""
    total, pairs = 0.0, 0
    for b in range(hidden.shape[0]):
        for i in range(hidden.shape[1]):
            for j in range(hidden.shape[1]):
                if i != j and valid[b, i] and valid[b, j]:
                    hi, hj = hidden[b, i].double(), hidden[b, j].double()
                    cos = float(hi @ hj / (hi.norm() * hj.norm()))
                    total += max(0.0, margin - 1.0 + cos)
                    pairs += 1
    return total / max(pairs, 1)
