"""Float64 reference for the mixture of experts (docs/architectures.md): one token at a time, plain loops.

Written from the equations, not from platform/models/layers/moe.py, and never imported by platform/.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ACTIVATIONS = {
    "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))),
    "silu": lambda v: v / (1 + torch.exp(-v)),
    "relu": lambda v: torch.clamp(v, min=0),
}


def route_token(x_D: Tensor, router_ED: Tensor, top_k: int) -> tuple[list[int], list[float], Tensor]:
    """The chosen experts (most probable first), their renormalised weights and all probabilities."""
    x_D, router_ED = x_D.detach().double(), router_ED.detach().double()
    logits = [float(router_ED[e] @ x_D) for e in range(router_ED.shape[0])]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    probs = [v / sum(exps) for v in exps]
    chosen = sorted(range(len(probs)), key=lambda e: -probs[e])[:top_k]
    total = sum(probs[e] for e in chosen)
    return chosen, [probs[e] / total for e in chosen], torch.tensor(probs, dtype=torch.float64)


def moe_forward(params: dict[str, Tensor], x_TD: Tensor, top_k: int, activation: str = "gelu") -> Tensor:
    """y_t = sum over the top-k experts e of w_e * (W_up,e act(W_down,e x_t + b_down,e) + b_up,e)."""
    act = ACTIVATIONS[activation]
    y = torch.zeros_like(x_TD, dtype=torch.float64)
    for t in range(x_TD.shape[0]):
        x = x_TD[t].double()
        chosen, weights, _ = route_token(x, params["router.weight"].double(), top_k)
        for e, w in zip(chosen, weights):
            hidden = act(params["down_weight"][e].double().T @ x + params["down_bias"][e].double())
            y[t] += w * (params["up_weight"][e].double().T @ hidden + params["up_bias"][e].double())
    return y


def balance_loss(probs_TE: Tensor, experts_TK: Tensor) -> float:
    """E * sum_e f_e * P_e, f_e = slots routed to e / all slots, P_e = mean probability of e."""
    probs_TE = probs_TE.detach().double()
    T, E = probs_TE.shape
    slots = [int(e) for row in experts_TK.tolist() for e in row]
    total = 0.0
    for e in range(E):
        f = slots.count(e) / len(slots)
        P = sum(float(probs_TE[t, e]) for t in range(T)) / T
        total += f * P
    return E * total


def router_entropy(probs_TE: Tensor) -> float:
    """log E - H(mean_t p_t)."""
    probs_TE = probs_TE.detach().double()
    T, E = probs_TE.shape
    mean = [sum(float(probs_TE[t, e]) for t in range(T)) / T for e in range(E)]
    return math.log(E) + sum(p * math.log(p) for p in mean if p > 0)
