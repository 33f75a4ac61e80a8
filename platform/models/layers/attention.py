"""Causal self-attention with a KV state, over the kernels of layers/kernels.py.

`CausalSelfAttention` is shared by every family with RoPE attention. Its state holds each key rotated
once, at its absolute position (RoPE scores depend only on relative offsets, so reversed RoPE is the
same with negated positions), and grows into spare capacity: a decoded token rotates and appends one
key instead of re-rotating and re-copying the cache. Where the rotation depends on the whole call
(SelfExtend's grouped positions, dynamic NTK scaling) the state holds the keys before rotation.
With a `SelfExtendConfig` the layer attends through SelfExtend (layers/self_extend.py) instead, with
the same parameters, so a model trained without it runs with it. Optional: attention registers (LSWT,
§0/§3.1), NTK/dynamic RoPE scaling, and a per-row validity mask on the state, so a batch row can
drop its cached past (a new stream begins) while the other rows keep theirs.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor, nn

from ..contract import exclude_from_weight_decay
from ..output import ModelState
from .kernels import Backend, attention, causal_mask
from .norm import RMSNorm
from .rope import RotaryScaling, apply_rotary, query_key_positions, rotate, rotation_at
from .scan import kernels_agree
from .self_extend import SelfExtendConfig, self_extend_attention


class _Tail:
    """Which state may append in place to a key/value buffer: the one whose keys end where the buffer's
    filled part ends. Shared by the states that view one buffer; never saved (a fresh buffer follows)."""

    __slots__ = ("keys", "values", "end")

    def __init__(self, keys: Tensor, values: Tensor, end: int):
        self.keys, self.values, self.end = keys.untyped_storage().data_ptr(), values.untyped_storage().data_ptr(), end


def _span(t: Tensor) -> tuple[int, int] | None:
    """(capacity, start) of t (B, Hkv, M, Dh) as the slice [start, start + M) of a contiguous buffer
    (B, Hkv, capacity, Dh); None for any other layout."""
    B, Hkv, M, Dh = t.shape
    s0, s1, s2, s3 = t.stride()
    if s3 != 1 or s2 != Dh or s1 % Dh or s0 != Hkv * s1 or t.storage_offset() >= s1 or t.storage_offset() % Dh:
        return None
    capacity, start = s1 // Dh, t.storage_offset() // Dh
    if t.untyped_storage().nbytes() < B * s0 * t.element_size():
        return None
    return capacity, start


@dataclasses.dataclass(frozen=True)
class KVState(ModelState):
    """Keys and values of every token seen so far by one attention layer.

    `keys` are rotated at their absolute positions when `rotary_base` is set (negated positions when
    `rotary_sign` is -1: reversed RoPE), and not rotated when it is None. Both tensors may be views into
    a larger buffer: `extend` then writes the next tokens after them in place, unless another state has
    already done so (the state stays immutable: it only ever sees its own M positions).
    """

    keys: Tensor  # (B, Hkv, M, Dh), rotated as rotary_base/rotary_sign say
    values: Tensor  # (B, Hkv, M, Dh)
    valid: Tensor | None = None  # (B, M) bool, False where `reset_rows` dropped a row's past; None: all valid
    rotary_base: float | None = None  # the RoPE base the keys were rotated with; None: not rotated
    rotary_sign: int = 1  # -1: rotated by negated positions (reversed RoPE); 1 when not rotated
    tail: _Tail | None = dataclasses.field(default=None, compare=False, repr=False, metadata={"transient": True})

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def trim(self, max_length: int) -> KVState:
        """Keep the newest `max_length` positions (all of them when max_length >= length)."""
        if max_length >= self.length:
            return self
        start = self.length - max_length
        valid = None if self.valid is None else self.valid[:, start:]
        if valid is not None and bool(valid.all()):  # a host sync, but only while a reset is still cached
            valid = None
        return dataclasses.replace(self, keys=self.keys[:, :, start:], values=self.values[:, :, start:], valid=valid)

    def reset_rows(self, rows: Tensor) -> KVState:
        """Hide every cached position of the rows where `rows` (B,) is True: they continue as if fresh."""
        valid = self.valid if self.valid is not None else torch.ones_like(self.keys[:, 0, :, 0], dtype=torch.bool)
        return dataclasses.replace(self, valid=valid & ~rows.to(valid.device)[:, None])  # valid (B, M)

    def shifted(self, n: int) -> KVState:
        """The same keys n positions later (rotated keys turn by n more; un-rotated ones do not change):
        what left-padding a row by n positions asks of it."""
        if self.rotary_base is None or n == 0:
            return self
        by = torch.full((1,), self.rotary_sign * n, device=self.keys.device)
        return dataclasses.replace(self, keys=rotate(self.keys, by, self.rotary_base), tail=None)

    def extend(self, keys: Tensor, values: Tensor) -> KVState:
        """The state with T more tokens, keys and values (B, Hkv, T, Dh) in this state's rotation.

        Without autograd, writes them in place after this state's positions when its buffer has room and
        no other state has written there; otherwise copies into a new buffer, with doubled capacity
        while few tokens come at a time (decoding), so a token costs O(1) copies on average. Under
        autograd or compilation it concatenates, as training (and Transformer-XL) expects."""
        B, M, T = keys.shape[0], self.length, keys.shape[2]
        valid = None if self.valid is None else torch.cat([self.valid, self.valid.new_ones(B, T)], dim=1)  # (B, M+T)
        plain = (
            torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad or self.keys.requires_grad)
        ) or torch.compiler.is_compiling()
        if plain or T >= M:
            k_all = torch.cat([self.keys, keys], dim=2)  # (B, Hkv, M + T, Dh)
            v_all = torch.cat([self.values, values], dim=2)
            return dataclasses.replace(self, keys=k_all, values=v_all, valid=valid, tail=None)
        span, tail = _span(self.keys), self.tail
        if (
            span is not None
            and _span(self.values) == span
            and tail is not None
            and tail.keys == self.keys.untyped_storage().data_ptr()
            and tail.values == self.values.untyped_storage().data_ptr()
            and tail.end == span[1] + M
            and span[0] - tail.end >= T
            and (torch.is_inference_mode_enabled() or not self.keys.is_inference())
        ):
            start = span[1]
            k_all = self.keys.as_strided((*keys.shape[:2], M + T, keys.shape[3]), self.keys.stride())
            v_all = self.values.as_strided((*values.shape[:2], M + T, values.shape[3]), self.values.stride())
            k_all[:, :, M:].copy_(keys)
            v_all[:, :, M:].copy_(values)
            tail.end = start + M + T
            return dataclasses.replace(self, keys=k_all, values=v_all, valid=valid)
        capacity = 2 * (M + T)
        k_buf = keys.new_empty(B, keys.shape[1], capacity, keys.shape[3])  # (B, Hkv, capacity, Dh)
        v_buf = values.new_empty(B, values.shape[1], capacity, values.shape[3])
        k_all, v_all = k_buf[:, :, : M + T], v_buf[:, :, : M + T]
        for buffer, old, new in ((k_all, self.keys, keys), (v_all, self.values, values)):
            buffer[:, :, :M].copy_(old)
            buffer[:, :, M:].copy_(new)
        return dataclasses.replace(self, keys=k_all, values=v_all, valid=valid, tail=_Tail(k_buf, v_buf, M + T))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE, optional QK-norm and grouped KV heads (GQA).

    `self_extend` switches the attention to SelfExtend (grouped distances past a neighbour window);
    it adds no parameters and is usually set at evaluation or generation time.

    QK-norm RMS-normalises each query and key head before rotation, with a learned scale per channel
    or (qk_norm_affine=False) none.

    `n_registers` adds R learned key/value pairs per KV head that every query sees and that are never
    cached (attention sinks, LSWT §3.1). Their scores use the *un-rotated* query, which equals rotating
    the register keys with each query's own angle: a token's register scores then do not depend on
    its position or on how many tokens follow it, so decoding equals the full forward (§0).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        bias: bool = False,
        qk_norm: bool = False,
        qk_norm_affine: bool = True,
        rope_base: float = 10000.0,
        rope_reversed: bool = False,
        backend: Backend = "auto",
        self_extend: SelfExtendConfig | None = None,
        n_registers: int = 0,
        rope_scaling: RotaryScaling | None = None,
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pick n_heads from its divisors")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        if self_extend is not None and rope_scaling is not None:
            raise ValueError("SelfExtend attention does not support RoPE scaling; turn one of them off")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.rope_base, self.rope_reversed, self.backend = rope_base, rope_reversed, backend
        self.self_extend, self.n_registers, self.rope_scaling = self_extend, n_registers, rope_scaling
        if n_registers:
            self.register_keys = nn.Parameter(torch.empty(n_kv_heads, n_registers, self.head_dim))
            self.register_values = nn.Parameter(torch.empty(n_kv_heads, n_registers, self.head_dim))
            self.reset_registers()
        self.query = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.key = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.value = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        exclude_from_weight_decay(
            *(linear.bias for linear in (self.query, self.key, self.value, self.out)),
            getattr(self, "register_keys", None),
            getattr(self, "register_values", None),
        )  # registers are learned keys and values, not weights: decay would fade them toward a zero key
        # Without a learned scale (qk_norm_affine=False) the norm commutes with the rotation, which keeps
        # each head vector's length: normalising before RoPE equals normalising after it (SeqCond, §1.2).
        self.q_norm = RMSNorm(self.head_dim, elementwise_affine=qk_norm_affine) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, elementwise_affine=qk_norm_affine) if qk_norm else None

    def reset_registers(self) -> None:
        """N(0, 1/sqrt(Dh)), as the original's register init."""
        if self.n_registers:
            nn.init.normal_(self.register_keys, std=self.head_dim**-0.5)
            nn.init.normal_(self.register_values, std=self.head_dim**-0.5)

    def forward(
        self, x: Tensor, state: KVState | None = None, offset: int = 0, stream_start: Tensor | None = None
    ) -> tuple[Tensor, KVState]:
        """x (B, T, D); `offset` is the absolute position of x's first token; `stream_start` (B,), where
        each row began (SelfExtend groups positions from there; None: rows with a hidden past begin after
        it, the others at 0). Returns the output and the state extended by these T tokens (untrimmed:
        trimming is the caller's policy)."""
        B, T, _ = x.shape
        q = self.query(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.key(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.value(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        n_cached = 0 if state is None else state.length

        if self._rotates_once:
            base = self.rope_base
            if self.rope_scaling is not None:  # static NTK scaling: one base for every call
                base = self.rope_scaling.base_and_temperature(self.rope_base, self.head_dim, 0)[0]
            dtype = torch.promote_types(q.dtype, torch.float32)
            reversed = self.rope_reversed
            cos, sin = rotation_at(offset, T, self.head_dim, base, reversed=reversed, dtype=dtype, device=q.device)
            q_rot, k_rot = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # each token rotated once
            new_state = self._extend(state, k_rot, v, offset, base)
            y = self._attend(q_rot, new_state.keys, new_state.values, q, new_state.valid)  # (B, H, T, Dh)
        else:
            new_state = self._extend(state, k, v, offset, None)
            k, v, valid = new_state.keys, new_state.values, new_state.valid  # (B, Hkv, S, Dh), S = M + T
            if self.self_extend is None:
                y = self._rope_attention(q, k, v, n_cached, offset, valid)  # (B, H, T, Dh)
            else:
                y = self._self_extend_attention(q, k, v, offset - n_cached, valid, stream_start)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*Dh)
        return self.out(y), new_state

    @property
    def _rotates_once(self) -> bool:
        """Whether each key's rotation is fixed once it is computed: not under SelfExtend (grouped positions
        depend on the query) or dynamic scaling (the base depends on the call's length)."""
        return self.self_extend is None and (self.rope_scaling is None or self.rope_scaling.dynamic_positions is None)

    def _extend(self, state: KVState | None, k: Tensor, v: Tensor, offset: int, base: float | None) -> KVState:
        """The state after this call's keys k (rotated with `base`, or not rotated for None) and values v,
        converting a cached state that holds its keys in the other form (an older checkpoint, a switched
        mode) once."""
        sign = -1 if self.rope_reversed and base is not None else 1  # the rotation's sign (1: none)
        if state is None:
            return KVState(k, v, None, base, sign)
        if (state.rotary_base, state.rotary_sign) != (base, sign):
            positions = torch.arange(offset - state.length, offset, device=k.device)  # (M,): the cached keys'
            keys = state.keys
            if state.rotary_base is not None:  # undo the rotation it holds
                keys = rotate(keys, -state.rotary_sign * positions, state.rotary_base)
            if base is not None:
                keys = rotate(keys, sign * positions, base)
            state = KVState(keys, state.values, state.valid, base, sign)
        return state.extend(k, v)

    def _attend(
        self, q_rot: Tensor, k_rot: Tensor, v: Tensor, q: Tensor, valid: Tensor | None, temperature: float = 1.0
    ) -> Tensor:
        """Attention of rotated queries (B, H, T, Dh) over rotated keys (B, Hkv, S, Dh), plus the registers,
        which the un-rotated queries q score. The tokens keep SDPA's fused kernel: the registers are a small
        (T, R) score block merged with them by log-sum-exp, the same softmax as one over both. On CPU that is
        the flash CPU kernel; on CUDA the flash kernel (fp16/bf16, no key mask) or the memory-efficient one,
        each once it has passed its check on the device (`_register_kernel`); otherwise the widened query."""
        if not self.n_registers:
            return attention(q_rot, k_rot, v, causal=True, backend=self.backend, key_mask=valid)
        reg_k, reg_v = self.register_keys, self.register_values
        if temperature != 1.0:
            reg_k = reg_k * temperature
        if q.shape[2] == 1:
            return _one_query_with_registers(q_rot, k_rot, v, q, reg_k, reg_v, valid)
        kernel = _register_kernel(q, valid)
        if kernel is not None:
            return _fused_attention_with_registers(q_rot, k_rot, v, q, reg_k, reg_v, valid, kernel)
        return _widened_query_attention(q_rot, k_rot, v, q, reg_k, reg_v, valid, self.backend)

    def _rope_attention(self, q: Tensor, k: Tensor, v: Tensor, n_cached: int, offset: int, valid: Tensor | None):
        """RoPE attention of un-rotated q (B, H, T, Dh) over un-rotated k, v (B, Hkv, S, Dh), plus the
        registers, rotating every key at this call (dynamic scaling: the base depends on S)."""
        S = k.shape[2]
        base, temperature = self.rope_base, 1.0
        if self.rope_scaling is not None:
            base, temperature = self.rope_scaling.base_and_temperature(self.rope_base, self.head_dim, S)
            if temperature != 1.0:
                q, k = q * temperature, k * temperature
        q_pos, k_pos = query_key_positions(n_cached, q.shape[2], offset, reversed=self.rope_reversed, device=q.device)
        return self._attend(rotate(q, q_pos, base), rotate(k, k_pos, base), v, q, valid, temperature)

    def _self_extend_attention(
        self, q: Tensor, k: Tensor, v: Tensor, key_offset: int, valid: Tensor | None, stream_start: Tensor | None
    ) -> Tensor:
        """SelfExtend over un-rotated q (B, H, T, Dh), the whole key sequence k, v (B, Hkv, S, Dh) and the
        registers; a reset row's hidden past is left padding to it (positions count from the row's restart)."""
        config = self.self_extend
        return self_extend_attention(
            q,
            k,
            v,
            group_size=config.group_size,
            window_size=config.window_size,
            rope_base=self.rope_base,
            reversed=self.rope_reversed,
            key_offset=key_offset,
            key_padding_mask=valid,
            stream_start=stream_start,
            register_keys=getattr(self, "register_keys", None),
            register_values=getattr(self, "register_values", None),
            pretrained_len=config.pretrained_len,
            implementation=config.implementation,
            block_size=config.block_size,
            backend=self.backend,
        )


def _widened_query_attention(
    q_rot: Tensor, k: Tensor, v: Tensor, q: Tensor, reg_k: Tensor, reg_v: Tensor, valid: Tensor | None, backend
) -> Tensor:
    """One softmax over [registers ‖ keys] through the shared kernel, the two query forms stacked along the
    head dim and the half each kind of key does not use zeroed. Exact, and fused on CUDA (flash-attn pads
    the values to the widened head), at twice the head width for the scores: the path where the merge has
    no kernel that returns its log-sum-exp (another device, float64, a CUDA kernel that failed its check,
    or while torch.compile traces on CUDA), and the reference that check compares against."""
    B, R = q.shape[0], reg_k.shape[1]
    reg_k = reg_k.to(k.dtype).expand(B, -1, -1, -1)  # (B, Hkv, R, Dh)
    reg_v = reg_v.to(v.dtype).expand(B, -1, -1, -1)  # (B, Hkv, R, Dh)
    q2 = torch.cat([q_rot, q], dim=-1)  # (B, H, T, 2Dh)
    k2 = torch.cat(
        [torch.cat([torch.zeros_like(reg_k), reg_k], dim=-1), torch.cat([k, torch.zeros_like(k)], dim=-1)], dim=2
    )  # (B, Hkv, R + S, 2Dh)
    v2 = torch.cat([reg_v, v], dim=2)  # (B, Hkv, R + S, Dh)
    if valid is not None:
        valid = torch.cat([valid.new_ones(B, R), valid], dim=1)  # (B, R + S)
    return attention(q2, k2, v2, causal=True, backend=backend, key_mask=valid, scale=q.shape[-1] ** -0.5)


def _one_query_with_registers(
    q_rot: Tensor, k: Tensor, v: Tensor, q: Tensor, reg_k: Tensor, reg_v: Tensor, valid: Tensor | None
) -> Tensor:
    """One query per row (decoding): q_rot, q (B, H, 1, Dh) over k, v (B, Hkv, S, Dh) and the registers
    (Hkv, R, Dh). The scores over [registers ‖ tokens] are one short row per head, so one plain softmax
    costs less than a kernel call and a merge."""
    B, H, _, Dh = q.shape
    Hkv, R = k.shape[1], reg_k.shape[1]
    grouped = (B, Hkv, H // Hkv, Dh)  # the query heads of each kv head
    scores = torch.cat(
        [q.reshape(grouped) @ reg_k.to(q.dtype).transpose(-1, -2), q_rot.reshape(grouped) @ k.transpose(-1, -2)],
        dim=-1,
    )  # (B, Hkv, H/Hkv, R + S)
    if valid is not None:
        scores[..., R:] = scores[..., R:].masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = (scores.to(torch.promote_types(q.dtype, torch.float32)) * Dh**-0.5).softmax(dim=-1).to(q.dtype)
    y = probs[..., :R] @ reg_v.to(q.dtype) + probs[..., R:] @ v  # (B, Hkv, H/Hkv, Dh)
    return y.reshape(B, H, 1, Dh)


# --- the log-sum-exp merge: the tokens through a fused kernel that returns its lse ------------------------
#
# Each token kernel says how it masks (an additive mask and/or its causal flag), runs forward giving the
# token output (B, H, T, Dh), its lse (B, H, T) and what its backward needs, and runs backward given the
# joint output and the joint lse. Everything else (the register block, the merge, the registers' gradient)
# is the same code for every kernel.


def _additive_mask(visible: Tensor, dtype: torch.dtype, row_multiple: int = 1) -> Tensor:
    """0 where `visible`, -inf elsewhere, in `dtype`; each row's storage padded to a multiple of
    `row_multiple` elements (the memory-efficient kernel reads the mask in aligned rows)."""
    S = visible.shape[-1]
    padded = -(-S // row_multiple) * row_multiple
    mask = torch.zeros((*visible.shape[:-1], padded), dtype=dtype, device=visible.device)[..., :S]
    return mask.masked_fill_(~visible, float("-inf"))


def _visible_keys(valid: Tensor | None, T: int, S: int, device) -> tuple[Tensor | None, bool]:
    """Which of the S keys each of the T queries sees (bottom-right causal, and `valid` (B, S) where given):
    a bool mask (B, 1, T, S) or (T, S), or None with the causal flag where T == S needs no mask (or T == 1
    sees every key)."""
    if valid is not None:
        visible = valid[:, None, None, :]  # (B, 1, 1, S)
        return (visible & causal_mask(T, S, device) if T > 1 else visible), False  # (B, 1, T, S)
    if T > 1 and T == S:
        return None, True
    return (causal_mask(T, S, device) if T > 1 else None), False  # (T, S): bottom-right, after a cache


class _CpuFlashKernel:
    """SDPA's flash kernel for CPU: any float dtype, an additive mask, a top-left causal flag."""

    @staticmethod
    def mask(valid: Tensor | None, B: int, H: int, T: int, S: int, q: Tensor) -> tuple[Tensor | None, bool]:
        visible, is_causal = _visible_keys(valid, T, S, q.device)
        # the kernel takes an additive mask in the query's dtype
        return (None if visible is None else _additive_mask(visible, q.dtype)), is_causal

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale
        )  # (B, H, T, Dh), (B, H, T)
        return out, lse, ()

    @staticmethod
    def backward(dy, q, k, v, mask, is_causal, scale, y, lse, saved) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dy, q, k, v, y, lse, 0.0, is_causal, attn_mask=mask, scale=scale
        )


class _CudaFlashKernel:
    """SDPA's flash kernel for CUDA (FlashAttention-2): fp16/bf16, no mask, and a causal flag aligned
    bottom-right, so query i of T sees keys up to S - T + i: just what a call after a cache needs (which
    is why `scaled_dot_product_attention` itself, whose causal flag means top-left, declines it when
    T != S; torch.nn.attention.bias.causal_lower_right calls this op with is_causal=True for it)."""

    @staticmethod
    def mask(valid: Tensor | None, B: int, H: int, T: int, S: int, q: Tensor) -> tuple[Tensor | None, bool]:
        if valid is not None:
            raise ValueError("the flash kernel takes no key mask; registers with a key mask use 'efficient'")
        return None, T > 1

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal, False, scale=scale
        )  # (B, H, T, Dh), (B, H, T) fp32; the rest only concern its backward
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    @staticmethod
    def backward(dy, q, k, v, mask, is_causal, scale, y, lse, saved) -> tuple[Tensor, Tensor, Tensor]:
        cum_q, cum_k, max_q, max_k, seed, offset = saved
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dy, q, k, v, y, lse, cum_q, cum_k, max_q, max_k, 0.0, is_causal, seed, offset, scale=scale
        )


class _CudaEfficientKernel:
    """SDPA's memory-efficient kernel for CUDA: fp32 too, and an additive mask (its causal flag is
    top-left, so only T == S uses it). Its lse comes padded along T (to a multiple of 32, the backward's
    block); the backward is handed the joint lse in the same padded shape."""

    @staticmethod
    def mask(valid: Tensor | None, B: int, H: int, T: int, S: int, q: Tensor) -> tuple[Tensor | None, bool]:
        visible, is_causal = _visible_keys(valid, T, S, q.device)
        if visible is None:
            return None, is_causal
        # the kernel takes (B, H, T, S) in the query's dtype, rows 16-aligned in memory (broadcast dims are free)
        return _additive_mask(visible, q.dtype, row_multiple=16).expand(B, H, T, S), False

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, 0.0, is_causal, scale=scale
        )  # (B, H, T, Dh), (B, H, T') fp32 with T' >= T
        T = q.shape[2]
        return out, lse[..., :T], (lse[..., T:], seed, offset)

    @staticmethod
    def backward(dy, q, k, v, mask, is_causal, scale, y, lse, saved) -> tuple[Tensor, Tensor, Tensor]:
        padding, seed, offset = saved
        lse = torch.cat([lse, padding], dim=-1)  # (B, H, T'): the shape the kernel gave
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dy, q, k, v, mask, y, lse, seed, offset, 0.0, [True, True, True, False], is_causal, scale=scale
        )
        return dq, dk, dv


_TOKEN_KERNELS = {"cpu": _CpuFlashKernel, "flash": _CudaFlashKernel, "efficient": _CudaEfficientKernel}

FUSED_REGISTER_DEVICES = ("cpu",)
"""Device types whose token kernel (`_TOKEN_KERNELS` under the same name) the merge always uses: SDPA's
flash kernel on CPU, checked by the tests. On CUDA the merge uses SDPA's flash or memory-efficient kernel
once it has passed `_register_pairs` on that device (see `_register_kernel`); elsewhere, or when the
check fails, registers take the widened query."""

_CHECK_TOLERANCE = {torch.float32: 5e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}
"""How far (relative to each value's largest magnitude) the merge may be from the widened query in the
check: fp32 leaves room for TF32 matmuls, 16-bit dtypes for their rounding of outputs and gradients."""


def _tokens_and_registers(q_rot, k, v, q, reg_k, reg_v, mask, is_causal, kernel="cpu"):
    """The joint softmax of the tokens (the fused kernel, with its lse) and the registers (scored here):
    the output (B, H, T, Dh), the joint lse (B, H, T), the registers' probabilities (B, H, T, R) and what
    the kernel's backward needs."""
    scale = q.shape[-1] ** -0.5
    out, lse, saved = _TOKEN_KERNELS[kernel].forward(q_rot, k, v, mask, is_causal, scale)  # (B, H, T, Dh), (B, H, T)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(compute) @ (reg_k.to(compute).transpose(-1, -2) * scale)  # (B, H, T, R)
    total = torch.logaddexp(lse.to(compute), scores.logsumexp(dim=-1))  # (B, H, T): the joint lse
    p_reg = (scores - total.unsqueeze(-1)).exp()  # (B, H, T, R): the registers' joint probabilities
    y = torch.addcmul(p_reg @ reg_v.to(compute), (lse.to(compute) - total).exp().unsqueeze(-1), out.to(compute))
    return y.to(q.dtype), total.to(lse.dtype), p_reg, saved


class _RegisterAttention(torch.autograd.Function):
    """Softmax attention over [registers ‖ tokens], with the tokens through a fused kernel (`_TOKEN_KERNELS`).

    Forward: the kernel gives the token output and its log-sum-exp; the register scores (T, R) join
    them by log-sum-exp. Backward: the kernel's backward, given the merged output and the merged lse,
    recomputes the token probabilities of the joint softmax, which is exactly the tokens' share of the
    joint gradient; the registers' share is the same formula over their small score block.
    """

    @staticmethod
    def forward(ctx, q_rot, k, v, q, reg_k, reg_v, mask, is_causal, kernel):
        # q_rot, q (B, H, T, Dh); k, v (B, H, S, Dh); reg_k, reg_v (H, R, Dh); mask additive or None
        y, total, p_reg, saved = _tokens_and_registers(q_rot, k, v, q, reg_k, reg_v, mask, is_causal, kernel)
        ctx.save_for_backward(q_rot, k, v, q, reg_k, reg_v, mask, y, total, p_reg)
        ctx.is_causal, ctx.kernel, ctx.kernel_saved = is_causal, kernel, saved
        return y

    @staticmethod
    def backward(ctx, dy):
        q_rot, k, v, q, reg_k, reg_v, mask, y, total, p_reg = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        dq_rot, dk, dv = _TOKEN_KERNELS[ctx.kernel].backward(
            dy.contiguous(), q_rot, k, v, mask, ctx.is_causal, scale, y, total, ctx.kernel_saved
        )
        compute = p_reg.dtype
        dy_c = dy.to(compute)
        D = (dy_c * y.to(compute)).sum(-1, keepdim=True)  # (B, H, T, 1): the softmax's row term
        d_scores = p_reg * (dy_c @ reg_v.to(compute).transpose(-1, -2) - D)  # (B, H, T, R)
        dq = (d_scores @ reg_k.to(compute)) * scale  # (B, H, T, Dh)
        d_reg_k = (d_scores.transpose(-1, -2) @ q.to(compute)).sum(0) * scale  # (H, R, Dh)
        d_reg_v = (p_reg.transpose(-1, -2) @ dy_c).sum(0)  # (H, R, Dh)
        return dq_rot, dk, dv, dq.to(q.dtype), d_reg_k.to(reg_k.dtype), d_reg_v.to(reg_v.dtype), None, None, None


def _fused_attention_with_registers(
    q_rot: Tensor,
    k: Tensor,
    v: Tensor,
    q: Tensor,
    reg_k: Tensor,
    reg_v: Tensor,
    valid: Tensor | None,
    kernel: str = "cpu",
) -> Tensor:
    """q_rot, q (B, H, T, Dh) over k, v (B, Hkv, S, Dh) (the last T keys are the queries', causal) and the
    registers reg_k, reg_v (Hkv, R, Dh) -> (B, H, T, Dh), the tokens through `_TOKEN_KERNELS[kernel]`."""
    B, H, Hkv, T, S = q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if Hkv != H:  # one key/value head per query head
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, Dh)
        reg_k, reg_v = reg_k.repeat_interleave(H // Hkv, dim=0), reg_v.repeat_interleave(H // Hkv, dim=0)  # (H, R, Dh)
    reg_k, reg_v = reg_k.to(q.dtype), reg_v.to(q.dtype)
    mask, is_causal = _TOKEN_KERNELS[kernel].mask(valid, B, H, T, S, q)
    inputs = (q_rot, k, v, q, reg_k, reg_v)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _RegisterAttention.apply(*inputs, mask, is_causal, kernel)
    return _tokens_and_registers(*inputs, mask, is_causal, kernel)[0]  # decoding: no autograd bookkeeping


def _register_kernel(q: Tensor, valid: Tensor | None) -> str | None:
    """The token kernel that merges the registers here (a name in `_TOKEN_KERNELS`), or None for the
    widened query. Off FUSED_REGISTER_DEVICES a kernel is taken only once it has passed its check on
    this device for this dtype and head size (kernels_agree remembers the verdict; a failure logs one
    warning). While torch.compile traces, an unchecked kernel cannot be checked: the widened query."""
    if q.device.type in FUSED_REGISTER_DEVICES:
        return q.device.type
    if torch.compiler.is_compiling():
        return None
    for kernel in _checked_kernels(q, valid):
        dtype, head_dim = q.dtype, q.shape[-1]
        op = f"register attention ({kernel}, {str(dtype).removeprefix('torch.')}, head dim {head_dim})"
        pairs = functools.partial(_register_pairs, kernel=kernel, dtype=dtype, head_dim=head_dim)
        tolerance = _CHECK_TOLERANCE[dtype]
        if kernels_agree(
            q.device, op, pairs, kernels="SDPA's fused kernels", reference="widened-query", tolerance=tolerance
        ):
            return kernel
    return None


def _checked_kernels(q: Tensor, valid: Tensor | None) -> list[str]:
    """The kernels to try, best first: on CUDA, flash for fp16/bf16 without a key mask (head sizes it
    builds: multiples of 8 up to 256), then memory-efficient (fp32, masks); none elsewhere or for fp64."""
    if q.device.type != "cuda" or q.dtype not in _CHECK_TOLERANCE:
        return []
    head_dim = q.shape[-1]
    if valid is None and q.dtype != torch.float32 and head_dim % 8 == 0 and head_dim <= 256:
        return ["flash", "efficient"]
    return ["efficient"]


def _register_pairs(
    device: torch.device, kernel: str, dtype: torch.dtype, head_dim: int
) -> list[tuple[Tensor, Tensor]]:
    """The merge through `kernel` in `dtype` on `device` against the widened query in fp32 from the same
    (rounded) inputs: the output and the gradients of q_rot, k, v, q and both register tensors, each over
    the reference's largest magnitude, for grouped heads at T == S and after a cache (S > T, bottom-right
    causal), and with a key mask that hides one row's past where the kernel takes masks."""
    generator = torch.Generator().manual_seed(0)
    B, H, Hkv, R, T, M = 2, 4, 2, 3, 40, 24  # T not a multiple of 32: the efficient kernel pads its lse
    valid = torch.ones(B, M + T, dtype=torch.bool)
    valid[0, :M] = False  # row 0 began a new stream after the cache
    cases = [(T, None), (M + T, None)]
    if kernel != "flash":
        cases.append((M + T, valid))
    pairs = []
    for S, key_mask in cases:
        shapes = [(B, H, T, head_dim), (B, Hkv, S, head_dim), (B, Hkv, S, head_dim), (B, H, T, head_dim)]
        shapes += [(Hkv, R, head_dim), (Hkv, R, head_dim), (B, H, T, head_dim)]
        *inputs, dy = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
        key_mask = None if key_mask is None else key_mask.to(device)
        ours = [t.to(device).requires_grad_() for t in inputs]
        theirs = [t.to(device, torch.float32).requires_grad_() for t in inputs]
        y_ours = _fused_attention_with_registers(*ours, key_mask, kernel)
        y_theirs = _widened_query_attention(*theirs, key_mask, "sdpa")
        got = (y_ours, *torch.autograd.grad(y_ours, ours, dy.to(device)))
        want = (y_theirs, *torch.autograd.grad(y_theirs, theirs, dy.to(device, torch.float32)))
        for a, b in zip(got, want, strict=True):
            magnitude = b.detach().abs().max()
            pairs.append((a.float() / magnitude, (b.detach() / magnitude).cpu()))
    return pairs
