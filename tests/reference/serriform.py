"""Float64 reference for SerriformNet (docs/architectures.md): one token at a time, plain loops.

Runs every token through every block as a recurrent decoder would, from the equations: rotary gate,
RMSNorm, causal dilated depthwise conv as a sum over past inputs, h_t = alpha h_{t-1} + beta x_t,
gated fusion, low-rank FF or top-k MoE. Reads parameters by their state_dict names; written apart from
platform/models/serriform.py and never imported by platform/.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tests.reference.moe import ACTIVATIONS, route_token


def rotary_gate(x_D: Tensor, position: int, base: float) -> Tensor:
    """Rotate channel pairs (d, d + D/2) by position * base^(-d / (D/2))."""
    half = x_D.shape[0] // 2
    out = x_D.clone()
    for d in range(half):
        angle = position * base ** (-d / half)
        a, b = float(x_D[d]), float(x_D[d + half])
        out[d] = a * math.cos(angle) - b * math.sin(angle)
        out[d + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


def rms_norm(x_D: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    return x_D / torch.sqrt((x_D * x_D).mean() + eps) * weight


def recurrence_loop(x: Tensor, alpha: Tensor, beta: Tensor, h0: Tensor | None = None) -> Tensor:
    """x (B, T, N) -> h (B, T, N), h_t = alpha * h_{t-1} + beta * x_t, h_{-1} = h0 (zeros if None)."""
    x = x.double()
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0.double().clone()
    out = []
    for t in range(x.shape[1]):
        h = alpha.double() * h + beta.double() * x[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def _low_rank(p: dict[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    hidden = ACTIVATIONS["gelu"](p[f"{prefix}.down.weight"] @ x + p[f"{prefix}.down.bias"])
    return p[f"{prefix}.up.weight"] @ hidden + p[f"{prefix}.up.bias"]


def _moe(p: dict[str, Tensor], prefix: str, x: Tensor, top_k: int) -> Tensor:
    chosen, weights, _ = route_token(x, p[f"{prefix}.router.weight"], top_k)
    y = torch.zeros_like(x)
    for e, w in zip(chosen, weights):
        hidden = ACTIVATIONS["gelu"](p[f"{prefix}.down_weight"][e].T @ x + p[f"{prefix}.down_bias"][e])
        y += w * (p[f"{prefix}.up_weight"][e].T @ hidden + p[f"{prefix}.up_bias"][e])
    return y


def serriform_forward(model, ids: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
    """Logits (B, T, V) and the state {"position", "tails": [per layer (B, M, D)], "h": [per layer (B, m)]}.

    `model` supplies its config and parameters (cast to float64); nothing else of it is used.
    """
    c = model.config
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    B, T = ids.shape
    m, k = c.d_model // c.memory_dim_factor, c.conv_kernel_size
    dilations = [int(c.conv_dilation_growth ** (i % 3)) for i in range(c.n_layers)]
    position = 0 if state is None else state["position"]
    logits = torch.zeros(B, T, c.vocab_size, dtype=torch.float64)
    new_state = {"position": position + T, "tails": [], "h": []}
    tails = [[None] * B for _ in range(c.n_layers)]
    hs = [[None] * B for _ in range(c.n_layers)]
    for b in range(B):
        # per layer: every conv input so far, the first (k-1)*d of them from the state (zeros at the start)
        history = []
        for i, d in enumerate(dilations):
            start = torch.zeros((k - 1) * d, c.d_model, dtype=torch.float64) if state is None else state["tails"][i][b]
            history.append(list(start.double()))
        h = [
            torch.zeros(m, dtype=torch.float64) if state is None else state["h"][i][b].double()
            for i in range(c.n_layers)
        ]
        for t in range(T):
            x = p["embed.weight"][ids[b, t]]
            if c.positions == "rotary":  # "none": no absolute position at all
                x = rotary_gate(x, position + t, c.rope_base)
            for i, d in enumerate(dilations):
                q = f"blocks.{i}"
                y = rms_norm(x, p[f"{q}.norm.weight"])
                if c.use_conv:
                    history[i].append(y)
                    w = p[f"{q}.conv.depthwise.weight"][:, 0]  # (D, k); tap j sees the input (k-1-j)*d steps back
                    conv = p[f"{q}.conv.depthwise.bias"].clone()
                    for j in range(k):
                        conv += w[:, j] * history[i][-1 - (k - 1 - j) * d]
                    y = ACTIVATIONS[c.activation](
                        p[f"{q}.conv.pointwise.weight"] @ conv + p[f"{q}.conv.pointwise.bias"]
                    )
                if c.use_recurrence:
                    alpha = 1 / (1 + torch.exp(-p[f"{q}.recurrence.alpha_logit"]))
                    h[i] = alpha * h[i] + p[f"{q}.recurrence.beta"] * y[:m]
                    y = torch.cat([h[i], y[m:]])
                gate = torch.sigmoid(p[f"{q}.fusion.gate.weight"] @ y + p[f"{q}.fusion.gate.bias"])
                y = y + gate * torch.tanh(p[f"{q}.fusion.value.weight"] @ y + p[f"{q}.fusion.value.bias"])
                if c.use_moe:
                    y = _moe(p, f"{q}.moe", y, c.top_k_experts)
                elif c.use_lowrank_ff:
                    y = _low_rank(p, f"{q}.feed_forward", y)
                x = x + y
            logits[b, t] = p["lm_head.weight"] @ rms_norm(x, p["norm.weight"]) + p["lm_head.bias"]
        for i, d in enumerate(dilations):
            kept = history[i][len(history[i]) - (k - 1) * d :]
            tails[i][b] = torch.stack(kept) if kept else torch.zeros(0, c.d_model, dtype=torch.float64)
            hs[i][b] = h[i]
    new_state["tails"] = [torch.stack(rows) for rows in tails]
    new_state["h"] = [torch.stack(rows) for rows in hs]
    return logits, new_state
