"""Rotary position embeddings (Su et al. 2021), standard or reversed, in the rotate-half layout.

Standard RoPE rotates a token at absolute position p by angle p * w_i. Reversed RoPE (LSWT,
ARCHITECTURES.md §3.1) counts positions back from the newest token of the call, which sits at 0:
the scores then depend on the negated relative offset, i.e. reversed RoPE is standard RoPE with
negated angles. Frequencies are computed on the fly from the positions (no buffers), so a model
built on the meta device needs nothing re-initialised here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inverse_frequencies(head_dim: int, base: float, *, ntk_scale: float = 1.0, device=None) -> Tensor:
    """w_i = base'^(-2i/d) for i < d/2, with NTK-aware scaling base' = base * s^(d/(d-2)) (fp32)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    if ntk_scale != 1.0:
        base = base * ntk_scale ** (head_dim / (head_dim - 2))
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return base ** (-exponent)  # (Dh/2,)


def rotary_angles(positions: Tensor, head_dim: int, base: float, *, ntk_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos and sin of shape positions.shape + (head_dim,), in fp32."""
    inv_freq = inverse_frequencies(head_dim, base, ntk_scale=ntk_scale, device=positions.device)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (..., Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., Dh): rotate-half pairs i and i + Dh/2
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., T, Dh) by the angles in cos/sin (broadcastable to x), in at least fp32, cast back."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated_half * sin).to(x.dtype)


def query_key_positions(
    n_cached: int, n_new: int, offset: int, *, reversed: bool, device=None
) -> tuple[Tensor, Tensor]:
    """Positions of the n_new queries and the n_cached + n_new keys of one attention call.

    `offset` is the absolute position of the first new token (the state's position). Standard:
    queries at offset + i, keys at offset - n_cached + j. Reversed: the newest token is 0, so
    queries sit at n_new - 1 - i and keys at n_cached + n_new - 1 - j; only relative offsets
    matter, so `offset` is not used.
    """
    n_keys = n_cached + n_new
    if reversed:
        q = torch.arange(n_new - 1, -1, -1, device=device)
        k = torch.arange(n_keys - 1, -1, -1, device=device)
    else:
        q = torch.arange(offset, offset + n_new, device=device)
        k = torch.arange(offset - n_cached, offset + n_new, device=device)
    return q, k
