"""Softmax attention over a band of query-key offsets, returning its log-sum-exp (lse) as well.

SelfExtend's two-pass merge (docs/architectures.md) attends once over the neighbour band and once over
the grouped band, then combines the passes exactly through their lse. flash-attn returns the lse on
CUDA; elsewhere a blockwise online softmax (running max and sum over key blocks, as FlashAttention
does) computes it without a (T, S) score matrix, so memory grows as T·block instead of T². Measured
with torch 2.13: flex_attention cannot stand in on CPU (compiled, it refuses `return_lse`; eager, it
materialises the scores).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import Backend, flash_attn_available, log_once


def banded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    lo: int | None = None,
    hi: int | None = None,
    key_mask: Tensor | None = None,
    block_size: int = 256,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """Attention of q (B, H, T, Dh) over k, v (B, Hkv, S, Dh), S >= T, H % Hkv == 0, scale 1/sqrt(Dh).

    Query t sits at key index i = S - T + t (bottom-right alignment, as after a cache) and sees key j
    iff lo <= j - i <= hi (None: unbounded) and key_mask[b, j] (B, S) is True. Returns the output
    (B, H, T, Dh), zero for a query that sees no key, and the lse (B, H, T) in fp32 or fp64, -inf there.

    `backend`: "flash" needs flash-attn, CUDA and a causal band (hi <= 0) without key_mask; "auto" takes
    it when that holds and q is fp16/bf16; anything else runs the blockwise torch path.
    """
    flash_fits = hi is not None and hi <= 0 and key_mask is None and q.is_cuda
    use_flash = backend == "flash" or (
        backend == "auto" and flash_fits and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
    )
    if use_flash:
        if not (flash_fits and flash_attn_available()):
            raise ImportError(
                "banded attention backend='flash' needs flash-attn, a CUDA GPU, a causal band and no key mask; "
                "install it with `pip install flash-attn --no-build-isolation` or use backend='sdpa'"
            )
        log_once("banded attention kernel: flash-attn")
        return _flash_band(q, k, v, lo, hi)
    log_once("banded attention kernel: blockwise online softmax")
    return _blockwise_band(q, k, v, lo, hi, key_mask, block_size)


def merge_by_lse(passes: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Combine attention passes over disjoint key sets into the softmax over their union.

    Each pass is (out (B, H, T, Dh), lse (B, H, T)); pass p carries the weight exp(lse_p - lse), with
    lse = log sum_p exp(lse_p). For two passes that is sigmoid(lse_1 - lse_2), the official merge.
    """
    lses = torch.stack([lse for _, lse in passes])  # (P, B, H, T)
    total = torch.logsumexp(lses, dim=0)  # (B, H, T)
    total = total.masked_fill(total == float("-inf"), 0.0)  # a query that sees no key keeps weight 0 everywhere
    out = sum((lse - total).exp().unsqueeze(-1) * o.to(lse.dtype) for o, lse in passes)
    return out.to(passes[0][0].dtype)


def band_mask(offset: Tensor, lo: int | None, hi: int | None) -> Tensor:
    """True where lo <= offset <= hi; offset = key index - query index, any shape."""
    visible = torch.ones_like(offset, dtype=torch.bool)
    if lo is not None:
        visible &= offset >= lo
    if hi is not None:
        visible &= offset <= hi
    return visible


def _blockwise_band(
    q: Tensor, k: Tensor, v: Tensor, lo: int | None, hi: int | None, key_mask: Tensor | None, block_size: int
) -> tuple[Tensor, Tensor]:
    B, H, T, Dh = q.shape
    Hkv, S, dtype = k.shape[1], k.shape[2], q.dtype
    compute = torch.promote_types(q.dtype, torch.float32)  # fp32 scores and sums for half inputs
    q = q.unflatten(1, (Hkv, H // Hkv)).to(compute) * Dh**-0.5  # (B, Hkv, H/Hkv, T, Dh): heads grouped by kv head
    k = k.unsqueeze(2).to(compute)  # (B, Hkv, 1, S, Dh), broadcast over the group: no copy of the cache
    v = v.unsqueeze(2).to(compute)  # (B, Hkv, 1, S, Dh)
    mask = None if key_mask is None else key_mask[:, None, None, None, :]  # (B, 1, 1, 1, S)
    key_index = torch.arange(S, device=q.device)
    outs, lses = [], []
    for t0 in range(0, T, block_size):
        t1 = min(t0 + block_size, T)
        rows = key_index[S - T + t0 : S - T + t1]  # key index of each query in the block
        # only key blocks that meet the band for some query of this block are visited
        j0 = 0 if lo is None else max(0, S - T + t0 + lo)
        j1 = S if hi is None else min(S, S - T + t1 + hi)
        q_blk = q[..., t0:t1, :]
        running_max = q.new_full((B, Hkv, H // Hkv, t1 - t0), float("-inf"))
        running_sum = q.new_zeros((B, Hkv, H // Hkv, t1 - t0))
        acc = q.new_zeros((B, Hkv, H // Hkv, t1 - t0, Dh))
        for s0 in range(j0, j1, block_size):
            s1 = min(s0 + block_size, j1)
            scores = q_blk @ k[..., s0:s1, :].transpose(-1, -2)  # (B, Hkv, H/Hkv, bq, bk)
            visible = band_mask(key_index[s0:s1] - rows.unsqueeze(1), lo, hi)  # (bq, bk)
            if mask is not None:
                visible = visible & mask[..., s0:s1]  # (B, 1, 1, bq, bk)
            scores = scores.masked_fill(~visible, float("-inf"))
            new_max = torch.maximum(running_max, scores.amax(dim=-1))
            # rows that have seen no key yet keep max -inf; subtract 0 there so exp gives 0, not nan
            reference = new_max.masked_fill(new_max == float("-inf"), 0.0)
            p = (scores - reference.unsqueeze(-1)).exp()
            rescale = (running_max - reference).exp()
            running_sum = running_sum * rescale + p.sum(dim=-1)
            acc = acc * rescale.unsqueeze(-1) + p @ v[..., s0:s1, :]  # (B, Hkv, H/Hkv, bq, Dh)
            running_max = new_max
        outs.append(acc / running_sum.clamp_min(torch.finfo(compute).tiny).unsqueeze(-1))
        lses.append(running_max + running_sum.log())  # -inf + log 0 = -inf for a query that sees nothing
    out = torch.cat(outs, dim=-2).flatten(1, 2)  # (B, H, T, Dh)
    lse = torch.cat(lses, dim=-1).flatten(1, 2)  # (B, H, T)
    return out.to(dtype), lse


def causal_window(n_queries: int, n_keys: int, lo: int | None, hi: int) -> tuple[int, int, int]:
    """A causal band (hi <= 0) as flash-attn's bottom-right causal call with a left window.

    Shifting the diagonal by -hi keeps keys [0, S + hi) and the last min(T, S + hi) queries (earlier
    ones see no key); query i then sees keys i + lo ... i + hi, a left window of hi - lo (-1: none).
    Returns (queries kept, keys kept, left window).
    """
    n_keys_kept = max(n_keys + hi, 0)
    return min(n_queries, n_keys_kept), n_keys_kept, -1 if lo is None else hi - lo


def _flash_band(q: Tensor, k: Tensor, v: Tensor, lo: int | None, hi: int) -> tuple[Tensor, Tensor]:
    from flash_attn import flash_attn_func

    B, H, T, Dh = q.shape
    n_q, n_k, left = causal_window(T, k.shape[2], lo, hi)
    out = q.new_zeros(B, H, T, Dh)
    lse = q.new_full((B, H, T), float("-inf"), dtype=torch.float32)
    if n_q == 0:
        return out, lse
    o, l_kept, _ = flash_attn_func(
        q[:, :, T - n_q :].transpose(1, 2),  # (B, n_q, H, Dh): flash-attn's layout
        k[:, :, :n_k].transpose(1, 2),  # (B, n_k, Hkv, Dh)
        v[:, :, :n_k].transpose(1, 2),  # (B, n_k, Hkv, Dh)
        causal=True,
        window_size=(left, 0),
        return_attn_probs=True,  # the lse comes second; the probabilities are unused
    )
    out[:, :, T - n_q :] = o.transpose(1, 2)  # (B, H, n_q, Dh)
    lse[:, :, T - n_q :] = l_kept[..., :n_q]  # some flash-attn versions pad the query axis of the lse
    return out, lse
