"""Rotary position embeddings (Su et al. 2021), standard or reversed, in the rotate-half layout.

Standard RoPE rotates a token at absolute position p by angle p * w_i. Reversed RoPE (LSWT,
docs/architectures.md) counts positions back from the newest token of the call, which sits at 0:
the scores then depend on the negated relative offset, i.e. reversed RoPE is standard RoPE with
negated angles. Scores depend only on the relative offset (R(a)q · R(b)k = q · R(b - a)k), so both
variants rotate every token once, at its absolute position (negated for reversed RoPE): a key keeps
its rotation however many tokens follow, and a KV state can hold rotated keys. Angles are computed
in fp64 from the positions, so large absolute positions lose no precision, and on the fly (no
buffers), so a model built on the meta device needs nothing re-initialised here. `RotaryScaling` is LSWT's NTK-aware and
dynamic scaling (§3.1): a larger base for the call, and a temperature on queries and keys.
"""

from __future__ import annotations

import dataclasses
import functools
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
    cos, sin = rotation(positions, x.shape[-1], base, torch.promote_types(x.dtype, torch.float32))
    if positions.ndim == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, Dh): shared by the heads
    return apply_rotary(x, cos, sin)


def rotation(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin (positions.shape + (head_dim,)) in `dtype`, from angles computed in fp64 (fp32 on MPS,
    which has no fp64): at absolute position 10^6 fp32 angles would be off by up to 0.06 rad."""
    exact = torch.float32 if positions.device.type == "mps" else torch.float64
    cos, sin = rotary_angles(positions, head_dim, base, dtype=exact)
    return cos.to(dtype), sin.to(dtype)


def rotation_at(start: int, n: int, head_dim: int, base: float, *, reversed: bool, dtype: torch.dtype, device=None):
    """cos and sin (n, head_dim) of the tokens at absolute positions start ... start + n - 1 (`rotation` of
    `rotation_positions`). Every layer of a model asks for the same ones in a call, so the last few are
    kept (never while compiling, and apart for inference mode, whose tensors autograd may not save)."""
    if torch.compiler.is_compiling():
        return rotation(rotation_positions(start, n, reversed=reversed, device=device), head_dim, base, dtype)
    key = (start, n, head_dim, base, reversed, dtype, torch.device(device or "cpu"), torch.is_inference_mode_enabled())
    return _rotation_memo(*key)


@functools.lru_cache(maxsize=8)
def _rotation_memo(start, n, head_dim, base, reversed, dtype, device, inference) -> tuple[Tensor, Tensor]:
    return rotation(rotation_positions(start, n, reversed=reversed, device=device), head_dim, base, dtype)


def rotation_positions(start: int, n: int, *, reversed: bool, device=None) -> Tensor:
    """The rotation positions of n tokens at absolute positions start ... start + n - 1: the positions
    themselves, negated for reversed RoPE (standard RoPE with negated angles)."""
    positions = torch.arange(start, start + n, device=device)
    return -positions if reversed else positions


def query_key_positions(
    n_cached: int, n_new: int, offset: int, *, reversed: bool, device=None
) -> tuple[Tensor, Tensor]:
    """Rotation positions of the n_new queries and the n_cached + n_new keys of one attention call.

    `offset` is the absolute position of the first new token (the state's position): queries at
    offset + i, keys at offset - n_cached + j, both negated for reversed RoPE. Reversed RoPE counts
    back from the newest token (at 0: n_new - 1 - i and n_cached + n_new - 1 - j); these positions
    differ from those by one constant, which the scores do not see.
    """
    q = rotation_positions(offset, n_new, reversed=reversed, device=device)
    k = rotation_positions(offset - n_cached, n_cached + n_new, reversed=reversed, device=device)
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
