"""Rotary position embeddings (Su et al. 2021), standard or reversed, in the rotate-half layout.

Standard RoPE rotates a token at absolute position p by angle p * w_i. Reversed RoPE (LSWT,
docs/architectures.md) counts positions back from the newest token of the call, which sits at 0:
the scores then depend on the negated relative offset, i.e. reversed RoPE is standard RoPE with
negated angles. Frequencies are computed on the fly from the positions (no buffers), so a model
built on the meta device needs nothing re-initialised here. `RotaryScaling` is LSWT's NTK-aware and
dynamic scaling (§3.1): a larger base for the call, and a temperature on queries and keys.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor


def inverse_frequencies(
    head_dim: int, base: float, *, ntk_scale: float = 1.0, device=None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """w_i = base'^(-2i/d) for i < d/2, with NTK-aware scaling base' = base * s^(d/(d-2))."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    if ntk_scale != 1.0:
        base = base * ntk_scale ** (head_dim / (head_dim - 2))
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim
    return base ** (-exponent)  # (Dh/2,)


def rotary_angles(
    positions: Tensor, head_dim: int, base: float, *, ntk_scale: float = 1.0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos and sin of shape positions.shape + (head_dim,), in `dtype` (fp32 unless asked for fp64)."""
    inv_freq = inverse_frequencies(head_dim, base, ntk_scale=ntk_scale, device=positions.device, dtype=dtype)
    angles = positions.to(dtype).unsqueeze(-1) * inv_freq  # (..., Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., Dh): rotate-half pairs i and i + Dh/2
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., T, Dh) by the angles in cos/sin (broadcastable to x), in fp32 (fp64 when x or the
    angles are fp64), cast back."""
    x32 = x.to(torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32))
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated_half * sin).to(x.dtype)


def rotate(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """RoPE at `positions` applied to x (B, H, T, Dh): positions (T,) are shared by the batch, (B, T) are
    per row. Angles are fp32, or fp64 for an fp64 x (so float64 checks are not limited by the angles)."""
    cos, sin = rotary_angles(positions, x.shape[-1], base, dtype=torch.promote_types(x.dtype, torch.float32))
    if positions.ndim == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, Dh): shared by the heads
    return apply_rotary(x, cos, sin)


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


@dataclasses.dataclass(frozen=True)
class RotaryScaling:
    """NTK-aware RoPE scaling, static or dynamic (LSWT, docs/architectures.md).

    Static: the base becomes base * ntk_scale^(d/(d-2)) for every call. Dynamic (`dynamic_positions`
    set to the trained length L): a call over S keys uses s = max(S / L, 1), ntk = ntk_scale * s^2, and
    multiplies queries and keys by a * ln(s) + b (YaRN-style temperature; 1 while S <= L). Because the
    scale depends on the call's key count, dynamic mode is not decode-consistent past L: a token's
    angles change with the length of the call that processes it.
    """

    ntk_scale: float = 1.0
    dynamic_positions: int | None = None
    yarn_a: float = 0.07
    yarn_b: float = 1.0

    def base_and_temperature(self, base: float, head_dim: int, n_keys: int) -> tuple[float, float]:
        """The RoPE base and the q/k multiplier of a call that attends over `n_keys` keys."""
        ntk, temperature = self.ntk_scale, 1.0
        if self.dynamic_positions is not None:
            s = max(n_keys / self.dynamic_positions, 1.0)
            ntk, temperature = ntk * s**2, (self.yarn_a * math.log(s) + self.yarn_b if s > 1.0 else 1.0)
        if ntk != 1.0:
            base = base * ntk ** (head_dim / (head_dim - 2))
        return base, temperature
