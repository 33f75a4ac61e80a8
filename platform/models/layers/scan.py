"""A diagonal linear recurrence h_t = a * h_{t-1} + u_t, computed in parallel over time.

SerriformNet's sparse recurrence (docs/architectures.md) needs it; any family with a
per-channel, time-invariant decay can use it. Within a chunk of C steps the recurrence is a
lower-triangular Toeplitz matrix L[t, s] = a^(t-s), applied as one batched matmul, and every entry
lies in [0, 1]: nothing is divided by a small power of `a`, which is what makes the cumulative-product
form h_t = a^t * cumsum(a^-s * u_s) overflow on long sequences. The states entering successive chunks
obey the same recurrence with decay a^C, so the same function solves them one level up: log_C(T)
levels, O(T * C) work, no Python loop over time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_scan(u: Tensor, log_a: Tensor, h0: Tensor | None = None, *, chunk_size: int = 64) -> Tensor:
    """All states h (B, T, N) of h_t = exp(log_a) * h_{t-1} + u_t with h_{-1} = h0.

    u (B, T, N) inputs; log_a (N,) per-channel log decays, <= 0 (pass logsigmoid of a parameter to
    keep a in (0, 1) without ever forming log 0); h0 (B, N), zeros when None. Computed and returned in
    fp32, or fp64 for fp64 inputs. The last row h[:, -1] is the state to carry into the next call.
    """
    dtype = torch.promote_types(u.dtype, torch.float32)
    # channels first and time last, so that chunks are contiguous views and the per-channel matmuls
    # batch over a leading dimension (a batched matmul over a unit batch stride is ~100x slower on CPU)
    u_NBT = u.to(dtype).permute(2, 0, 1).contiguous()  # (N, B, T)
    h0_NB = u_NBT.new_zeros(u_NBT.shape[:2]) if h0 is None else h0.to(dtype).t()  # (N, B)
    h_NBT = _scan(u_NBT, log_a.to(dtype), h0_NB, chunk_size)
    return h_NBT.permute(1, 2, 0)  # (B, T, N)


def _scan(u_NBT: Tensor, log_a: Tensor, h0_NB: Tensor, chunk_size: int) -> Tensor:
    N, B, T = u_NBT.shape
    n_chunks = -(-T // chunk_size)
    if n_chunks <= 1:
        return _within_chunk(u_NBT, log_a) + _carry(log_a, T).unsqueeze(1) * h0_NB.unsqueeze(-1)  # (N, B, T)

    if T % chunk_size:  # zeros appended after the end cannot reach any earlier step; cut off again below
        u_NBT = F.pad(u_NBT, (0, n_chunks * chunk_size - T))
    u = u_NBT.view(N, B, n_chunks, chunk_size)  # (N, B, n, C)
    local = _within_chunk(u, log_a)  # (N, B, n, C): each chunk as if it started from zero
    # the state at the end of chunk j is a^C * (state at the end of chunk j-1) + local end of chunk j
    ends = _scan(local[..., -1], log_a * chunk_size, h0_NB, chunk_size)  # (N, B, n)
    starts = torch.cat([h0_NB.unsqueeze(-1), ends[..., :-1]], dim=-1)  # (N, B, n): state entering each chunk
    h = local + _carry(log_a, chunk_size).view(N, 1, 1, chunk_size) * starts.unsqueeze(-1)  # (N, B, n, C)
    return h.view(N, B, n_chunks * chunk_size)[..., :T]  # (N, B, T)


def _within_chunk(u: Tensor, log_a: Tensor) -> Tensor:
    """u (N, ..., C) -> zero-start states (N, ..., C), h_t = sum_{s <= t} a^(t-s) u_s: one matmul per channel."""
    N, C = u.shape[0], u.shape[-1]
    steps = torch.arange(C, device=u.device, dtype=u.dtype)
    lag = steps - steps.unsqueeze(1)  # (C, C): [s, t] = t - s
    decay = _powers(lag.clamp(min=0) * log_a.view(N, 1, 1)).triu()  # (N, C, C): a^(t-s) where s <= t, else 0
    # contiguous: the chunk ends handed up a level arrive strided, and a strided bmm leaves the BLAS fast path
    u_NLC = u.reshape(N, -1, C).contiguous()  # (N, L, C), L = every middle index
    return torch.bmm(u_NLC, decay).view(u.shape)  # (N, L, C) @ (N, C, C) -> (N, ..., C)


def _carry(log_a: Tensor, length: int) -> Tensor:
    """(N, length): a^(t+1), the weight of the state entering a chunk at its step t."""
    steps = torch.arange(1, length + 1, device=log_a.device, dtype=log_a.dtype)
    return _powers(log_a.unsqueeze(1) * steps)  # (N, C)


def _powers(exponent: Tensor) -> Tensor:
    """exp of exponents <= 0, with those below -60 (weights under 1e-26, far below the resolution of
    a sum that also holds a weight of 1) set to exactly 0: subnormal floats slow CPU matmuls badly."""
    return torch.where(exponent > -60, exponent, float("-inf")).exp()
