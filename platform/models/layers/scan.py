"""A diagonal linear recurrence h_t = a * h_{t-1} + u_t, computed in parallel over time.

SerriformNet's sparse recurrence (ARCHITECTURES.md §0 and §4) needs it; any family with a
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
    u, log_a = u.to(dtype), log_a.to(dtype)
    B, T, N = u.shape
    h0 = u.new_zeros(B, N) if h0 is None else h0.to(dtype)
    if chunk_size >= T:
        return _within_chunk(u, log_a) + _carry(log_a, T) * h0.unsqueeze(1)

    n_chunks = -(-T // chunk_size)
    # zeros appended after the end cannot reach any earlier step; they are cut off again below
    u = F.pad(u, (0, 0, 0, n_chunks * chunk_size - T)).view(B, n_chunks, chunk_size, N)  # (B, n, C, N)
    local = _within_chunk(u, log_a)  # (B, n, C, N): each chunk as if it started from zero
    # the state at the end of chunk j is a^C * (state at the end of chunk j-1) + local end of chunk j
    ends = linear_scan(local[:, :, -1], log_a * chunk_size, h0, chunk_size=chunk_size)  # (B, n, N)
    starts = torch.cat([h0.unsqueeze(1), ends[:, :-1]], dim=1)  # (B, n, N): state entering each chunk
    h = local + _carry(log_a, chunk_size) * starts.unsqueeze(2)  # (B, n, C, N)
    return h.view(B, n_chunks * chunk_size, N)[:, :T]


def _within_chunk(u: Tensor, log_a: Tensor) -> Tensor:
    """u (..., C, N) -> zero-start states (..., C, N), h_t = sum_{s <= t} a^(t-s) u_s, by one matmul per channel."""
    steps = torch.arange(u.shape[-2], device=u.device, dtype=u.dtype)
    lag = (steps.unsqueeze(1) - steps).unsqueeze(-1)  # (C, C, 1): t - s
    # mask before exp: for s > t the exponent is positive and could overflow
    decay = torch.where(lag >= 0, lag * log_a, float("-inf")).exp()  # (C, C, N)
    return torch.einsum("tsn,...sn->...tn", decay, u)  # (..., C, N)


def _carry(log_a: Tensor, length: int) -> Tensor:
    """(length, N): a^(t+1), the weight of the state entering a chunk at its step t."""
    steps = torch.arange(1, length + 1, device=log_a.device, dtype=log_a.dtype)
    return (steps.unsqueeze(1) * log_a).exp()  # (C, N)
