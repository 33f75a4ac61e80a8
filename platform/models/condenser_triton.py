"""The condenser's scan and query readout as one fused Triton kernel, forward and backward.

Per memory head k, channel h and frequency m the condenser keeps a complex state
    S_t = a_k S_{t-1} + v_t,    v_t = p_t x_t exp(i softsign(c_k x_t) theta_{k,h,m})
(x the keys, p the token weights, a_k = exp(log_decay_k)), and its query head reads, per h,
    r_t = sum_m w_{k,h,m} S_t conj(q_t),
which the caller divides by the normaliser. The PyTorch path (condenser.py) builds v, the sums S and
the products as (B, T, K, H, M) tensors and keeps several of them for backward. Here a program owns one
batch row, one head and a block of channels: it computes v from the keys in registers, scans a tile of
steps with a parallel scan, and writes only r, which is M times smaller than S. The backward pass walks
back in time: it recomputes each tile's v and states from the state saved at the tile's start (one per
tile, not per step), and solves the reverse recurrence of the gradients G_t = dL/dS_t + a G_{t+1}:

    dL/dv_t = G_t,  dL/dlog_a = sum_t Re(G_t conj(a S_{t-1})) with a S_{t-1} = S_t - v_t,  dL/dS_{-1} = a G_0,

then the chain rule through v (keys, weights, theta, c) and the readout (queries, w). Sums over the
batch and over channel blocks are written per program and added in PyTorch, in a fixed order.

Triton is optional, as for scan_triton: without it this module imports and `condense_and_read_fused`
raises. Under TRITON_INTERPRET=1 the same kernels run on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layers.scan_triton import INTERPRETED, NUM_WARPS, triton

if triton is not None:
    import triton.language as tl

# Tile sizes: BLOCK_T steps by BLOCK_H channels by every frequency (padded to a power of two). The
# interpreter gets small tiles, so short test sequences and few channels still cross tile boundaries.
GPU_TILES = {"BLOCK_T": 16, "CHANNELS_PER_PROGRAM": 64}  # CHANNELS_PER_PROGRAM = BLOCK_H * BLOCK_M
BLOCK_T = 4 if INTERPRETED else GPU_TILES["BLOCK_T"]
CHANNELS_PER_PROGRAM = 4 if INTERPRETED else GPU_TILES["CHANNELS_PER_PROGRAM"]


def condense_and_read_fused(
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
    """The un-normalised readout r (B, T, K, 2, H) ([Re, Im] per head) and the last states Re, Im S (B, K, H, M).

    keys (B, T, K, H) and weights (B, T, K) in fp32 (or fp64); theta and integration (K, H, M), the
    integration weights of each memory head's query head; phase_scale and log_decay (K,); queries
    (B, T, Kq, H, M, 2) in any float dtype, [Re, Im] last, memory head k read by query head k // (K / Kq);
    initial_re / initial_im (B, K, H, M) or None for a zero start. Differentiable in every tensor input.
    """
    if triton is None:
        raise ImportError("condense_and_read_fused needs Triton (pip install triton)")
    return _CondenseAndRead.apply(
        keys, weights, theta, phase_scale, integration, log_decay, queries, initial_re, initial_im
    )


def _blocks(H: int, M: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_M): every frequency of a channel in one program, channels filling the rest."""
    block_m = triton.next_power_of_2(M)
    block_h = max(1, min(triton.next_power_of_2(H), CHANNELS_PER_PROGRAM // block_m))
    return block_h, block_m


class _CondenseAndRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys, weights, theta, phase_scale, integration, log_decay, queries, initial_re, initial_im):
        dtype = torch.promote_types(keys.dtype, torch.float32)
        B, T, K, H = keys.shape
        M, Kq = theta.shape[-1], queries.shape[2]
        ctx.dtypes = [
            None if t is None else t.dtype
            for t in (keys, weights, theta, phase_scale, integration, log_decay, queries, initial_re, initial_im)
        ]
        keys, weights, theta, phase_scale, integration = (
            t.to(dtype).contiguous() for t in (keys, weights, theta, phase_scale, integration)
        )
        a = log_decay.to(dtype).exp().contiguous()  # (K,)
        queries = queries.contiguous()
        has_initial = initial_re is not None
        if has_initial:
            initial_re, initial_im = initial_re.to(dtype).contiguous(), initial_im.to(dtype).contiguous()
        block_h, block_m = _blocks(H, M)
        n_tiles = triton.cdiv(T, BLOCK_T)
        readout = keys.new_empty(B, T, K, 2, H)
        final_re, final_im = keys.new_empty(B, K, H, M), keys.new_empty(B, K, H, M)
        starts_re, starts_im = keys.new_empty(B, K, n_tiles, H, M), keys.new_empty(B, K, n_tiles, H, M)
        if T == 0 and has_initial:  # nothing to scan: the state passes through
            final_re.copy_(initial_re)
            final_im.copy_(initial_im)
        elif T == 0:
            final_re.zero_()
            final_im.zero_()
        else:
            _forward_kernel[(B, K, triton.cdiv(H, block_h))](
                keys, weights, theta, phase_scale, integration, a, queries,
                initial_re if has_initial else keys, initial_im if has_initial else keys,  # unread without them
                readout, final_re, final_im, starts_re, starts_im,
                T, K, H, M, Kq, K // Kq, n_tiles,
                HAS_INITIAL=has_initial, BLOCK_T=BLOCK_T, BLOCK_H=block_h, BLOCK_M=block_m, num_warps=NUM_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(keys, weights, theta, phase_scale, integration, a, queries, starts_re, starts_im)
        ctx.has_initial = has_initial
        return readout, final_re, final_im

    @staticmethod
    def backward(ctx, grad_readout, grad_final_re, grad_final_im):
        keys, weights, theta, phase_scale, integration, a, queries, starts_re, starts_im = ctx.saved_tensors
        B, T, K, H = keys.shape
        M, Kq = theta.shape[-1], queries.shape[2]
        block_h, block_m = _blocks(H, M)
        n_h_blocks = triton.cdiv(H, block_h)
        has_grad_final = grad_final_re is not None or grad_final_im is not None
        if has_grad_final:
            grad_final_re = theta.new_zeros(B, K, H, M) if grad_final_re is None else grad_final_re
            grad_final_im = torch.zeros_like(grad_final_re) if grad_final_im is None else grad_final_im
            grad_final_re, grad_final_im = grad_final_re.contiguous(), grad_final_im.contiguous()
        grad_readout = keys.new_zeros(B, T, K, 2, H) if grad_readout is None else grad_readout
        new = keys.new_zeros
        grad_keys = new(B, T, K, H)
        grad_weights = new(B, T, K, n_h_blocks)  # per channel block; summed below
        grad_theta, grad_integration = new(B, K, H, M), new(B, K, H, M)  # per row; summed below
        grad_scale, grad_log_decay = new(B, K, H), new(B, K, H)  # per row and channel
        grad_queries = new(B, T, K, H, M, 2)  # per memory head; a query head sums its memory heads below
        grad_initial_re, grad_initial_im = new(B, K, H, M), new(B, K, H, M)
        if T:
            _backward_kernel[(B, K, n_h_blocks)](
                keys, weights, theta, phase_scale, integration, a, queries, starts_re, starts_im,
                grad_readout.contiguous(),
                grad_final_re if has_grad_final else keys, grad_final_im if has_grad_final else keys,
                grad_keys, grad_weights, grad_theta, grad_integration, grad_scale, grad_log_decay, grad_queries,
                grad_initial_re, grad_initial_im,
                T, K, H, M, Kq, K // Kq, triton.cdiv(T, BLOCK_T),
                HAS_GRAD_FINAL=has_grad_final, BLOCK_T=BLOCK_T, BLOCK_H=block_h, BLOCK_M=block_m,
                num_warps=NUM_WARPS,
            )  # fmt: skip
        elif has_grad_final:
            grad_initial_re, grad_initial_im = grad_final_re, grad_final_im
        grad_queries = grad_queries.view(B, T, Kq, K // Kq, H, M, 2).sum(3)  # (B, T, Kq, H, M, 2)
        grads = [
            grad_keys,
            grad_weights.sum(-1),
            grad_theta.sum(0),
            grad_scale.sum((0, 2)),
            grad_integration.sum(0),
            grad_log_decay.sum((0, 2)),
            grad_queries,
            grad_initial_re if ctx.has_initial else None,
            grad_initial_im if ctx.has_initial else None,
        ]
        return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))


if triton is not None:

    @triton.jit
    def _then(decay_1, re_1, im_1, decay_2, re_2, im_2):
        """Two runs of the recurrence in sequence: (decay over the run, state it ends in from zero), complex."""
        return decay_1 * decay_2, decay_2 * re_1 + re_2, decay_2 * im_1 + im_2

    @triton.jit
    def _tile_values(keys_ptr, weights_ptr, b, k, t, h, valid, theta, scale, T, K, H):
        """For the steps t (BLOCK_T,) and channels h (BLOCK_H,): keys x and weights p, the squashed keys
        softsign(c x), the amplitudes p x, and v = p x exp(i softsign(c x) theta) as (Re, Im) (BLOCK_T, BLOCK_H,
        BLOCK_M), zero where `valid` (BLOCK_T, BLOCK_H, BLOCK_M) is False."""
        live = (t[:, None] < T) & (h[None, :] < H)
        x = tl.load(keys_ptr + ((b * T + t[:, None]) * K + k) * H + h[None, :], mask=live, other=0.0)  # (BT, BH)
        p = tl.load(weights_ptr + (b * T + t) * K + k, mask=t < T, other=0.0)  # (BT,)
        squashed = scale * x / (1.0 + tl.abs(scale * x))  # softsign(c x)
        amplitude = p[:, None] * x
        phase = squashed[:, :, None] * theta[None, :, :]  # (BT, BH, BM)
        v_re = tl.where(valid, amplitude[:, :, None] * tl.cos(phase), 0.0)
        v_im = tl.where(valid, amplitude[:, :, None] * tl.sin(phase), 0.0)
        return x, p, squashed, amplitude, phase, v_re, v_im

    @triton.jit
    def _forward_kernel(
        keys_ptr, weights_ptr, theta_ptr, scale_ptr, integration_ptr, a_ptr, queries_ptr,
        initial_re_ptr, initial_im_ptr,
        readout_ptr, final_re_ptr, final_im_ptr, starts_re_ptr, starts_im_ptr,
        T, K, H, M, KQ, GROUP, N_TILES,
        HAS_INITIAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """Program (b, k, j): row b, memory head k, channels j * BLOCK_H ...; walks the sequence tile by tile,
        saving the state that enters each tile for the backward pass."""
        b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B * T * K * H * M may pass 2^31
        k = tl.program_id(1)
        h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
        m = tl.arange(0, BLOCK_M)
        steps = tl.arange(0, BLOCK_T)
        dtype = readout_ptr.dtype.element_ty
        channel = (h[:, None] < H) & (m[None, :] < M)  # (BH, BM)
        head_offsets = (k * H + h[:, None]) * M + m[None, :]  # (BH, BM) into (K, H, M)
        theta = tl.load(theta_ptr + head_offsets, mask=channel, other=0.0)
        w = tl.load(integration_ptr + head_offsets, mask=channel, other=0.0)
        scale = tl.load(scale_ptr + k)
        decay = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_M], dtype=dtype) + tl.load(a_ptr + k)
        state_offsets = ((b * K + k) * H + h[:, None]) * M + m[None, :]  # (BH, BM) into (B, K, H, M)
        if HAS_INITIAL:
            s_re = tl.load(initial_re_ptr + state_offsets, mask=channel, other=0.0)
            s_im = tl.load(initial_im_ptr + state_offsets, mask=channel, other=0.0)
        else:
            s_re = tl.zeros([BLOCK_H, BLOCK_M], dtype=dtype)
            s_im = tl.zeros([BLOCK_H, BLOCK_M], dtype=dtype)
        for j in range(0, N_TILES):
            start_offsets = (((b * K + k) * N_TILES + j) * H + h[:, None]) * M + m[None, :]
            tl.store(starts_re_ptr + start_offsets, s_re, mask=channel)
            tl.store(starts_im_ptr + start_offsets, s_im, mask=channel)
            t = j * BLOCK_T + steps
            valid = (t[:, None, None] < T) & channel[None, :, :]  # (BT, BH, BM)
            _, _, _, _, _, v_re, v_im = _tile_values(keys_ptr, weights_ptr, b, k, t, h, valid, theta, scale, T, K, H)
            carried, local_re, local_im = tl.associative_scan((decay, v_re, v_im), 0, _then)
            states_re = local_re + carried * s_re[None, :, :]  # (BT, BH, BM): S_t
            states_im = local_im + carried * s_im[None, :, :]
            q_offsets = ((((b * T + t[:, None, None]) * KQ + k // GROUP) * H + h[None, :, None]) * M + m) * 2
            q_re = tl.load(queries_ptr + q_offsets, mask=valid, other=0.0).to(dtype)
            q_im = tl.load(queries_ptr + q_offsets + 1, mask=valid, other=0.0).to(dtype)
            r_re = tl.sum(w[None, :, :] * (states_re * q_re + states_im * q_im), axis=2)  # (BT, BH)
            r_im = tl.sum(w[None, :, :] * (states_im * q_re - states_re * q_im), axis=2)
            r_offsets = ((b * T + t[:, None]) * K + k) * 2 * H + h[None, :]  # (BT, BH) into (B, T, K, 2, H)
            live = (t[:, None] < T) & (h[None, :] < H)
            tl.store(readout_ptr + r_offsets, r_re, mask=live)
            tl.store(readout_ptr + r_offsets + H, r_im, mask=live)
            last = tl.minimum(j * BLOCK_T + BLOCK_T, T) - 1  # the tile's last step inside the sequence
            s_re = tl.sum(tl.where(t[:, None, None] == last, states_re, 0.0), axis=0)
            s_im = tl.sum(tl.where(t[:, None, None] == last, states_im, 0.0), axis=0)
        tl.store(final_re_ptr + state_offsets, s_re, mask=channel)
        tl.store(final_im_ptr + state_offsets, s_im, mask=channel)

    @triton.jit
    def _backward_kernel(
        keys_ptr, weights_ptr, theta_ptr, scale_ptr, integration_ptr, a_ptr, queries_ptr,
        starts_re_ptr, starts_im_ptr, grad_readout_ptr, grad_final_re_ptr, grad_final_im_ptr,
        grad_keys_ptr, grad_weights_ptr, grad_theta_ptr, grad_integration_ptr, grad_scale_ptr,
        grad_log_decay_ptr, grad_queries_ptr, grad_initial_re_ptr, grad_initial_im_ptr,
        T, K, H, M, KQ, GROUP, N_TILES,
        HAS_GRAD_FINAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """Program (b, k, j) walks the tiles from the last: states from the tile's saved start, then the
        gradient recurrence within the tile by a reverse scan, then every input's gradient at those steps."""
        b = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1)
        block = tl.program_id(2)
        h = block * BLOCK_H + tl.arange(0, BLOCK_H)
        m = tl.arange(0, BLOCK_M)
        steps = tl.arange(0, BLOCK_T)
        dtype = grad_keys_ptr.dtype.element_ty
        channel = (h[:, None] < H) & (m[None, :] < M)
        head_offsets = (k * H + h[:, None]) * M + m[None, :]
        theta = tl.load(theta_ptr + head_offsets, mask=channel, other=0.0)
        w = tl.load(integration_ptr + head_offsets, mask=channel, other=0.0)
        scale = tl.load(scale_ptr + k)
        a = tl.load(a_ptr + k)
        decay = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_M], dtype=dtype) + a
        state_offsets = ((b * K + k) * H + h[:, None]) * M + m[None, :]
        if HAS_GRAD_FINAL:
            final_re = tl.load(grad_final_re_ptr + state_offsets, mask=channel, other=0.0)
            final_im = tl.load(grad_final_im_ptr + state_offsets, mask=channel, other=0.0)
        g_re = tl.zeros([BLOCK_H, BLOCK_M], dtype=dtype)  # G at the step after the tile
        g_im = tl.zeros([BLOCK_H, BLOCK_M], dtype=dtype)
        grad_theta = tl.zeros([BLOCK_H, BLOCK_M], dtype=dtype)
        grad_w = tl.zeros([BLOCK_H, BLOCK_M], dtype=dtype)
        grad_scale = tl.zeros([BLOCK_H], dtype=dtype)
        grad_log_a = tl.zeros([BLOCK_H], dtype=dtype)
        for i in range(0, N_TILES):
            j = N_TILES - 1 - i
            t = j * BLOCK_T + steps
            valid = (t[:, None, None] < T) & channel[None, :, :]
            live = (t[:, None] < T) & (h[None, :] < H)
            x, p, squashed, amplitude, phase, v_re, v_im = _tile_values(
                keys_ptr, weights_ptr, b, k, t, h, valid, theta, scale, T, K, H
            )
            start_offsets = (((b * K + k) * N_TILES + j) * H + h[:, None]) * M + m[None, :]
            s_re = tl.load(starts_re_ptr + start_offsets, mask=channel, other=0.0)
            s_im = tl.load(starts_im_ptr + start_offsets, mask=channel, other=0.0)
            carried, local_re, local_im = tl.associative_scan((decay, v_re, v_im), 0, _then)
            states_re = local_re + carried * s_re[None, :, :]  # S_t, as in the forward pass
            states_im = local_im + carried * s_im[None, :, :]

            q_offsets = ((((b * T + t[:, None, None]) * KQ + k // GROUP) * H + h[None, :, None]) * M + m) * 2
            q_re = tl.load(queries_ptr + q_offsets, mask=valid, other=0.0).to(dtype)
            q_im = tl.load(queries_ptr + q_offsets + 1, mask=valid, other=0.0).to(dtype)
            r_offsets = ((b * T + t[:, None]) * K + k) * 2 * H + h[None, :]
            gr_re = tl.load(grad_readout_ptr + r_offsets, mask=live, other=0.0).to(dtype)[:, :, None]
            gr_im = tl.load(grad_readout_ptr + r_offsets + H, mask=live, other=0.0).to(dtype)[:, :, None]
            # the readout's own gradients: in S_t (then the recurrence), in q_t and in w
            direct_re = w[None, :, :] * (gr_re * q_re - gr_im * q_im)
            direct_im = w[None, :, :] * (gr_re * q_im + gr_im * q_re)
            if HAS_GRAD_FINAL:
                is_last = t[:, None, None] == T - 1
                direct_re += tl.where(is_last, final_re[None, :, :], 0.0)
                direct_im += tl.where(is_last, final_im[None, :, :], 0.0)
            grad_q_re = w[None, :, :] * (gr_re * states_re + gr_im * states_im)
            grad_q_im = w[None, :, :] * (gr_re * states_im - gr_im * states_re)
            gq_offsets = ((((b * T + t[:, None, None]) * K + k) * H + h[None, :, None]) * M + m) * 2
            tl.store(grad_queries_ptr + gq_offsets, grad_q_re, mask=valid)
            tl.store(grad_queries_ptr + gq_offsets + 1, grad_q_im, mask=valid)
            grad_w += tl.sum(
                gr_re * (states_re * q_re + states_im * q_im) + gr_im * (states_im * q_re - states_re * q_im), axis=0
            )

            carried, local_re, local_im = tl.associative_scan((decay, direct_re, direct_im), 0, _then, reverse=True)
            big_re = local_re + carried * g_re[None, :, :]  # (BT, BH, BM): G_t
            big_im = local_im + carried * g_im[None, :, :]
            g_re = tl.sum(tl.where(t[:, None, None] == j * BLOCK_T, big_re, 0.0), axis=0)  # G at the tile's first step
            g_im = tl.sum(tl.where(t[:, None, None] == j * BLOCK_T, big_im, 0.0), axis=0)
            grad_log_a += tl.sum(tl.sum(big_re * (states_re - v_re) + big_im * (states_im - v_im), axis=2), axis=0)

            # through v = p x (cos + i sin)(softsign(c x) theta)
            cos, sin = tl.cos(phase), tl.sin(phase)
            grad_amplitude = tl.sum(tl.where(valid, big_re * cos + big_im * sin, 0.0), axis=2)  # (BT, BH)
            grad_phase = tl.where(valid, amplitude[:, :, None] * (big_im * cos - big_re * sin), 0.0)  # (BT, BH, BM)
            grad_theta += tl.sum(grad_phase * squashed[:, :, None], axis=0)
            grad_squashed = tl.sum(grad_phase * theta[None, :, :], axis=2)  # (BT, BH)
            slope = 1.0 / ((1.0 + tl.abs(scale * x)) * (1.0 + tl.abs(scale * x)))  # softsign'(c x)
            grad_x = grad_amplitude * p[:, None] + grad_squashed * slope * scale
            tl.store(grad_keys_ptr + ((b * T + t[:, None]) * K + k) * H + h[None, :], grad_x, mask=live)
            grad_p = tl.sum(grad_amplitude * x, axis=1)  # (BT,)
            tl.store(grad_weights_ptr + ((b * T + t) * K + k) * tl.num_programs(2) + block, grad_p, mask=t < T)
            grad_scale += tl.sum(grad_squashed * slope * x, axis=0)
        tl.store(grad_theta_ptr + state_offsets, grad_theta, mask=channel)
        tl.store(grad_integration_ptr + state_offsets, grad_w, mask=channel)
        tl.store(grad_initial_re_ptr + state_offsets, a * g_re, mask=channel)
        tl.store(grad_initial_im_ptr + state_offsets, a * g_im, mask=channel)
        row_offsets = (b * K + k) * H + h
        tl.store(grad_scale_ptr + row_offsets, grad_scale, mask=h < H)
        tl.store(grad_log_decay_ptr + row_offsets, grad_log_a, mask=h < H)
