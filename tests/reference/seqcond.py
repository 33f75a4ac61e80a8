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


def condensed_readout_loop(
    keys: Tensor,
    weights: Tensor,
    theta: Tensor,
    phase_scale: Tensor,
    integration: Tensor,
    log_decay: Tensor,
    queries: Tensor,
    initial_re: Tensor | None,
    initial_im: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The condenser's recurrence and un-normalised readout, one step at a time, in complex128:

        S_t = a S_{t-1} + p_t x_t e^{i softsign(c x_t) theta},   r_t = sum_m w S_t conj(q_t)

    keys (B, T, K, H), weights (B, T, K), theta and integration (K, H, M), phase_scale and log_decay (K,),
    queries (B, T, Kq, H, M, 2); returns r (B, T, K, 2, H) as [Re, Im] and the last Re S, Im S (B, K, H, M).
    """
    B, T, K, H = keys.shape
    rep = K // queries.shape[2]
    a = torch.exp(log_decay)[:, None, None]  # (K, 1, 1)
    S = torch.zeros(B, K, *theta.shape[1:], dtype=torch.complex128)
    if initial_re is not None:
        S = torch.complex(initial_re, initial_im)
    readout = []
    for t in range(T):
        x = keys[:, t]  # (B, K, H)
        u = phase_scale[:, None] * x
        phase = (u / (1 + u.abs()))[..., None] * theta  # (B, K, H, M)
        S = a * S + (weights[:, t, :, None, None] * x[..., None]) * torch.exp(1j * phase)
        q = queries[:, t].repeat_interleave(rep, dim=1)  # (B, K, H, M, 2): each memory head's query head
        r = (integration * S * torch.complex(q[..., 0], q[..., 1]).conj()).sum(-1)  # (B, K, H)
        readout.append(torch.stack([r.real, r.imag], dim=-2))  # (B, K, 2, H)
    return torch.stack(readout, dim=1), S.real, S.imag
