"""Attention with registers as the layer computed it before the log-sum-exp merge: one softmax over
[registers ‖ keys], with the query widened to [rotated ‖ un-rotated] and each key zeroed in the half it
does not use, and every key re-rotated at each call (reversed RoPE counts back from the newest key).
Float64 tensors, written plainly: explicit scores, masks and softmax, no kernels. Never imported by
platform/.
"""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE of x (..., S, Dh) at `positions` (S,), component a turning by p * base^(-2a/Dh)."""
    Dh = x.shape[-1]
    half = Dh // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float64) * 2 / Dh)  # (Dh/2,)
    angles = positions.to(torch.float64)[:, None] * freqs  # (S, Dh/2)
    cos, sin = angles.cos(), angles.sin()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def old_register_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    register_keys: torch.Tensor,
    register_values: torch.Tensor,
    *,
    n_cached: int,
    offset: int,
    reversed: bool,
    base: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Un-rotated q (B, H, T, Dh) over un-rotated k, v (B, Hkv, S, Dh), S = n_cached + T, and the registers
    (Hkv, R, Dh) -> (B, H, T, Dh). `valid` (B, S) hides keys where False; query i sees key j <= n_cached + i."""
    B, H, T, Dh = q.shape
    Hkv, S, R = k.shape[1], k.shape[2], register_keys.shape[1]
    if reversed:  # the newest token at 0
        q_pos, k_pos = torch.arange(T - 1, -1, -1), torch.arange(S - 1, -1, -1)
    else:
        q_pos, k_pos = torch.arange(offset, offset + T), torch.arange(offset - n_cached, offset + T)
    q_rot, k_rot = rotate(q, q_pos, base), rotate(k, k_pos, base)
    repeat = H // Hkv
    k_rot, v = k_rot.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (B, H, S, Dh)
    reg_k, reg_v = register_keys.repeat_interleave(repeat, dim=0), register_values.repeat_interleave(repeat, dim=0)

    q2 = torch.cat([q_rot, q], dim=-1)  # (B, H, T, 2Dh)
    reg_k2 = torch.cat([torch.zeros_like(reg_k), reg_k], dim=-1).expand(B, -1, -1, -1)  # (B, H, R, 2Dh)
    k2 = torch.cat([reg_k2, torch.cat([k_rot, torch.zeros_like(k_rot)], dim=-1)], dim=2)  # (B, H, R + S, 2Dh)
    v2 = torch.cat([reg_v.expand(B, -1, -1, -1), v], dim=2)  # (B, H, R + S, Dh)
    scores = q2 @ k2.transpose(-1, -2) / Dh**0.5  # (B, H, T, R + S)

    seen = torch.ones(B, T, R + S, dtype=torch.bool)
    for i in range(T):
        for j in range(S):
            seen[:, i, R + j] = j <= n_cached + i  # causal: the queries are the last T keys
            if valid is not None:
                seen[:, i, R + j] &= valid[:, j]
    scores = scores.masked_fill(~seen[:, None], float("-inf"))
    return scores.softmax(dim=-1) @ v2  # (B, H, T, Dh)
