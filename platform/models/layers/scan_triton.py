"""The diagonal recurrence h_t = a * h_{t-1} + u_t as fused Triton kernels, forward and backward.

`linear_scan` (scan.py) solves it with chunked matmuls: right on any device, but on a GPU eager PyTorch
launches a dozen small kernels per call and keeps their intermediates for the backward pass. Here one
kernel walks the sequence once, each program holding the state of one batch row and a block of channels
in registers; it reads a tile of steps at a time and solves the tile with a parallel scan, so a step
costs no memory round trip of its own. The backward pass is one more kernel walking back in time.
Between the two passes only the inputs are kept: the backward pass recomputes the states with the
forward kernel (one cheap, memory-bound pass) instead of storing them.

Gradients, with g_t = dL/dh_t summed over every path (the reverse recurrence g_t = dL/dh_t + a g_{t+1}):
    dL/du_t = g_t,    dL/dh0 = a g_0,    dL/dlog_a = a * sum_{b, t} g_t h_{t-1}  (h_{-1} = h0).

Triton is optional: without it this module still imports and `kernel_available` is False. Setting
TRITON_INTERPRET=1 before Triton is first imported runs the same kernels on CPU tensors (slowly), which
is how the tests check them on a machine without a GPU.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path needs nothing from here
    triton = None

# Tile sizes: BLOCK_C channels (128 contiguous bytes of fp32 per step) by up to MAX_BLOCK_T steps, one load
# and one parallel scan per tile. The interpreter scans element by element in Python, so it gets small
# tiles, which also put more tile boundaries into short test sequences.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
GPU_TILES = {"BLOCK_C": 32, "MIN_BLOCK_T": 16, "MAX_BLOCK_T": 64}
BLOCK_C = 8 if INTERPRETED else GPU_TILES["BLOCK_C"]
MIN_BLOCK_T, MAX_BLOCK_T = (1, 16) if INTERPRETED else (GPU_TILES["MIN_BLOCK_T"], GPU_TILES["MAX_BLOCK_T"])
NUM_WARPS = 4


def _block_t(T: int) -> int:
    """Steps per tile: a power of two (as tl.arange needs) in [MIN_BLOCK_T, MAX_BLOCK_T], no longer than T needs."""
    return max(MIN_BLOCK_T, min(MAX_BLOCK_T, triton.next_power_of_2(T)))


def kernel_available(tensor: Tensor) -> bool:
    """True where the kernels can run on `tensor`: a CUDA tensor with Triton importable, or any tensor
    under Triton's CPU interpreter (TRITON_INTERPRET=1, read by Triton when it is imported)."""
    if triton is None:
        return False
    return tensor.is_cuda or INTERPRETED


def decayed_scan(u: Tensor, log_a: Tensor, h0: Tensor | None = None) -> Tensor:
    """All states h (B, T, C) of h_t = exp(log_a) * h_{t-1} + u_t with h_{-1} = h0 (zeros when None).

    The same function and dtype contract as `linear_scan`: u (B, T, C) in any float dtype, log_a (C,),
    h0 (B, C) or None; accumulated and returned in fp32, or fp64 for fp64 inputs. Differentiable in all three.
    """
    if triton is None:
        raise ImportError("decayed_scan needs Triton (pip install triton)")
    return _DecayedScan.apply(u, log_a, h0)


class _DecayedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, log_a: Tensor, h0: Tensor | None) -> Tensor:
        dtype = torch.promote_types(u.dtype, torch.float32)
        ctx.log_a_dtype, ctx.h0_dtype = log_a.dtype, None if h0 is None else h0.dtype
        u = u.contiguous()
        a = log_a.to(dtype).exp().contiguous()  # (C,)
        h0 = None if h0 is None else h0.to(dtype).contiguous()  # (B, C)
        ctx.save_for_backward(u, a, h0)
        return _forward(u, a, h0, dtype)

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        u, a, h0 = ctx.saved_tensors
        B, T, C = u.shape
        h = _forward(u, a, h0, a.dtype)  # (B, T, C): the states again, rather than kept since the forward
        grad_u = torch.empty_like(u)  # (B, T, C) in u's dtype
        grad_h0 = torch.zeros(B, C, device=u.device, dtype=a.dtype)
        grad_a = torch.zeros(B, C, device=u.device, dtype=a.dtype)  # per row: sum_t g_t h_{t-1}
        if T:
            grid = (B, triton.cdiv(C, BLOCK_C))
            _backward_kernel[grid](
                grad_h.contiguous(),
                h,
                a,
                h if h0 is None else h0,  # unread without h0
                grad_u,
                grad_h0,
                grad_a,
                T,
                C,
                HAS_H0=h0 is not None,
                BLOCK_T=_block_t(T),
                BLOCK_C=BLOCK_C,
                num_warps=NUM_WARPS,
            )
        grad_log_a = (a * grad_a.sum(0)).to(ctx.log_a_dtype)  # (C,): rows summed in a fixed order, no atomics
        grad_h0 = None if h0 is None else grad_h0.to(ctx.h0_dtype)
        return grad_u, grad_log_a, grad_h0


def _forward(u: Tensor, a: Tensor, h0: Tensor | None, dtype: torch.dtype) -> Tensor:
    B, T, C = u.shape
    h = torch.empty(B, T, C, device=u.device, dtype=dtype)
    if T:
        _forward_kernel[(B, triton.cdiv(C, BLOCK_C))](
            u,
            a,
            h if h0 is None else h0,  # unread without h0
            h,
            T,
            C,
            HAS_H0=h0 is not None,
            BLOCK_T=_block_t(T),
            BLOCK_C=BLOCK_C,
            num_warps=NUM_WARPS,
        )
    return h


if triton is not None:

    @triton.jit
    def _then(decay_1, sum_1, decay_2, sum_2):
        """Two runs of the recurrence in sequence, each as (decay over the run, state it ends in from zero)."""
        return decay_1 * decay_2, decay_2 * sum_1 + sum_2

    @triton.jit
    def _forward_kernel(
        u_ptr, a_ptr, h0_ptr, h_ptr, T, C, HAS_H0: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        """Program (b, j): row b, channels j * BLOCK_C ...; walks the sequence in tiles of BLOCK_T steps.

        A tile is one load; inside it an associative scan gives each step's state from a zero start and
        its decay a^(r+1) since the tile began, so h = local + a^(r+1) * (state entering the tile)."""
        b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B * T * C may pass 2^31
        channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        steps = tl.arange(0, BLOCK_T)
        dtype = h_ptr.dtype.element_ty
        a = tl.load(a_ptr + channels, mask=channels < C, other=0.0)
        decay = tl.broadcast_to(a[None, :], (BLOCK_T, BLOCK_C))
        if HAS_H0:
            h = tl.load(h0_ptr + b * C + channels, mask=channels < C, other=0.0).to(dtype)
        else:
            h = tl.zeros([BLOCK_C], dtype=dtype)
        for start in range(0, T, BLOCK_T):
            t = start + steps  # (BLOCK_T,)
            mask = (t[:, None] < T) & (channels[None, :] < C)
            offsets = (b * T + t[:, None]) * C + channels[None, :]  # (BLOCK_T, BLOCK_C)
            u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(dtype)
            carried, local = tl.associative_scan((decay, u), 0, _then)
            states = local + carried * h[None, :]
            tl.store(h_ptr + offsets, states, mask=mask)
            h = tl.sum(tl.where(steps[:, None] == BLOCK_T - 1, states, 0.0), axis=0)  # the tile's last state

    @triton.jit
    def _backward_kernel(
        grad_h_ptr,
        h_ptr,
        a_ptr,
        h0_ptr,
        grad_u_ptr,
        grad_h0_ptr,
        grad_a_ptr,
        T,
        C,
        HAS_H0: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Program (b, j) walks back from t = T - 1 in tiles, each loaded newest step first so that the same
        forward scan solves g_t = dL/dh_t + a g_{t+1}: that is dL/du_t; sum_t g_t h_{t-1} (h_{-1} = h0) is
        the row's dL/da, and a g_0 is dL/dh0."""
        b = tl.program_id(0).to(tl.int64)
        channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        steps = tl.arange(0, BLOCK_T)
        dtype = h_ptr.dtype.element_ty
        a = tl.load(a_ptr + channels, mask=channels < C, other=0.0)
        decay = tl.broadcast_to(a[None, :], (BLOCK_T, BLOCK_C))
        g = tl.zeros([BLOCK_C], dtype=dtype)  # g at the step after the tile
        grad_a = tl.zeros([BLOCK_C], dtype=dtype)
        for tile in range(0, tl.cdiv(T, BLOCK_T)):
            end = T - 1 - tile * BLOCK_T
            t = end - steps  # (BLOCK_T,): newest first; below 0 in the earliest tile
            in_range = (t[:, None] >= 0) & (channels[None, :] < C)
            offsets = (b * T + t[:, None]) * C + channels[None, :]  # (BLOCK_T, BLOCK_C)
            grad_h = tl.load(grad_h_ptr + offsets, mask=in_range, other=0.0).to(dtype)
            carried, local = tl.associative_scan((decay, grad_h), 0, _then)
            grads = local + carried * g[None, :]  # (BLOCK_T, BLOCK_C): g_t
            tl.store(grad_u_ptr + offsets, grads.to(grad_u_ptr.dtype.element_ty), mask=in_range)
            previous = tl.load(h_ptr + offsets - C, mask=in_range & (t[:, None] >= 1), other=0.0)  # h_{t-1}
            grad_a += tl.sum(grads * previous, axis=0)
            oldest = tl.maximum(end - BLOCK_T + 1, 0)
            g = tl.sum(tl.where(t[:, None] == oldest, grads, 0.0), axis=0)  # g at the tile's oldest step
        if HAS_H0:  # g now holds g_0
            grad_a += g * tl.load(h0_ptr + b * C + channels, mask=channels < C, other=0.0)
        tl.store(grad_h0_ptr + b * C + channels, a * g, mask=channels < C)
        tl.store(grad_a_ptr + b * C + channels, grad_a, mask=channels < C)
