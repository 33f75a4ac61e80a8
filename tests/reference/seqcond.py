"""The SeqCond condenser (docs/architectures.md with §0's relative decay) as float64 loops over positions.

Written from the equations, not from platform/: complex numbers are complex128, the conv is a loop over
taps, and each condensed state is the direct double sum over the tokens seen, without any scan:

    S_t = sum_{s<=t} w(t, s) p_s k_s e^{i phi_s} / max(sum_{s<=t} w(t, s) p_s, 1e-4)
    w(t, s) = exp(-lambda (t - s)) for decay heads, exp(-lambda s) for anchor heads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def softplus(x: Tensor) -> Tensor:
    return torch.log1p(torch.exp(-x.abs())) + x.clamp(min=0)


def condenser(
    x: Tensor, params: dict[str, Tensor], *, query_heads: int, anchor_heads: int, kernel: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, T, D) float64 -> out (B, T, D), final den (B, K), final complex sum (B, K, H, M).

    `params` are the mixer's float64 parameters by name; `kernel` None means no conv.
    """
    B, T, D = x.shape
    K, H, M = params["theta_raw"].shape
    E = params["readout"].shape[2] // 2
    Kq, rep = query_heads, K // query_heads

    # 1-2. projection, causal depthwise conv over the previous kernel - 1 tokens, SiLU
    z = x @ params["in_proj.weight"].T  # (B, T, C)
    if kernel is not None:
        w = params["conv_weight"]  # (C, kernel); tap kernel - 1 multiplies the current token
        conv = torch.zeros_like(z)
        for t in range(T):
            for j in range(kernel):
                s = t - (kernel - 1) + j
                if s >= 0:
                    conv[:, t] += w[:, j] * z[:, s]
        z = conv
    z = z * torch.sigmoid(z)

    # 3. split
    keys = z[..., : K * H].reshape(B, T, K, H)
    scores = z[..., K * H : K * H + K]
    queries = z[..., K * H + K :].reshape(B, T, Kq, H, M, 2)
    q = torch.complex(queries[..., 0], queries[..., 1])  # (B, T, Kq, H, M)

    # 4-5. frequency grid and integration weights
    raw = params["theta_raw"]
    if M == 1:
        theta = 0.001 + 2.999 / (1 + torch.exp(-raw))
    else:
        steps = softplus(raw) + 1e-4
        theta = torch.zeros_like(raw)
        running = torch.zeros_like(raw[..., 0])
        for m in range(M):
            running = running + steps[..., m]
            theta[..., m] = 0.001 + 2.999 * running / steps.sum(-1)
    w_int = torch.exp(params["integration_raw"])
    w_int = w_int / w_int.sum(-1, keepdim=True)  # (Kq, rep, H, M)

    # 6-9. decay rates, token weights, phases, complex contributions
    lam = softplus(params["decay_raw"])  # (K,)
    p = softplus(params["score_scale"] * scores + params["score_bias"]).clamp(1e-4, 5000.0)  # (B, T, K)
    u = params["phase_scale"][:, None] * keys
    phi = (u / (1 + u.abs()))[..., None] * theta  # (B, T, K, H, M)
    contribution = keys[..., None] * torch.exp(1j * phi)  # k e^{i phi}, without p

    out = torch.zeros(B, T, K, 2 * H, dtype=x.dtype)
    for t in range(T):
        num = torch.zeros(B, K, H, M, dtype=torch.complex128)
        den = torch.zeros(B, K, dtype=x.dtype)
        for s in range(t + 1):
            for k in range(K):
                anchor = k >= K - anchor_heads
                weight = math.exp(-lam[k].item() * (s if anchor else t - s)) * p[:, s, k]  # (B,)
                num[:, k] += weight[:, None, None] * contribution[:, s, k]
                den[:, k] += weight
        S = num / den.clamp(min=1e-4)[..., None, None]  # 10. (B, K, H, M)
        for k in range(K):  # 11. memory head k is read by query head k // rep
            g, r = k // rep, k % rep
            match = S[:, k] * q[:, t, g].conj() / math.sqrt(H)  # (B, H, M)
            o = (w_int[g, r] * match).sum(-1)  # (B, H)
            out[:, t, k] = torch.cat([o.real, o.imag], dim=-1)

    # 12. gated RMSNorm over all heads, eps 1e-6
    gate = x @ params["gate.weight"].T
    y = out.reshape(B, T, K * 2 * H) * gate * torch.sigmoid(gate)
    y = y / torch.sqrt((y**2).mean(-1, keepdim=True) + 1e-6) * params["norm.weight"]
    # 13-14. per-head sigmoid-GLU readout, output projection
    y = torch.einsum("btkc,kce->btke", y.reshape(B, T, K, 2 * H), params["readout"])
    a = y[..., :E] * torch.sigmoid(y[..., E:])
    return a.reshape(B, T, K * E) @ params["out.weight"].T, den, num
