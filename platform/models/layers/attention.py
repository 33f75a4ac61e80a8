"""Causal self-attention with a KV state, over the kernels of layers/kernels.py.

`CausalSelfAttention` is shared by every family with RoPE attention. Its state holds keys *before*
rotation, so they can be re-rotated at any later length (reversed RoPE, SelfExtend). With a
`SelfExtendConfig` it attends through SelfExtend (layers/self_extend.py) instead, with the
same parameters, so a model trained without it runs with it. Optional: attention registers (LSWT,
§0/§3.1), NTK/dynamic RoPE scaling, and a per-row validity mask on the state, so a batch row can
drop its cached past (a new stream begins) while the other rows keep theirs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..contract import exclude_from_weight_decay
from ..output import ModelState
from .kernels import Backend, attention
from .norm import RMSNorm
from .rope import RotaryScaling, query_key_positions, rotate
from .self_extend import SelfExtendConfig, self_extend_attention


@dataclasses.dataclass(frozen=True)
class KVState(ModelState):
    """Keys and values of every token seen so far by one attention layer."""

    keys: Tensor  # (B, Hkv, M, Dh), not rotated
    values: Tensor  # (B, Hkv, M, Dh)
    valid: Tensor | None = None  # (B, M) bool, False where `reset_rows` dropped a row's past; None: all valid

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
        return KVState(self.keys[:, :, start:], self.values[:, :, start:], valid)

    def reset_rows(self, rows: Tensor) -> KVState:
        """Hide every cached position of the rows where `rows` (B,) is True: they continue as if fresh."""
        valid = self.valid if self.valid is not None else torch.ones_like(self.keys[:, 0, :, 0], dtype=torch.bool)
        return KVState(self.keys, self.values, valid & ~rows.to(valid.device)[:, None])  # valid (B, M)


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
        if self_extend is not None and (n_registers or rope_scaling is not None):
            raise ValueError("SelfExtend attention supports neither registers nor RoPE scaling; turn one of them off")
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

    def forward(self, x: Tensor, state: KVState | None = None, offset: int = 0) -> tuple[Tensor, KVState]:
        """x (B, T, D); `offset` is the absolute position of x's first token. Returns the output and
        the state extended by these T tokens (untrimmed: trimming is the caller's policy)."""
        B, T, _ = x.shape
        q = self.query(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.key(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.value(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        n_cached, valid = 0, None
        if state is not None:
            n_cached = state.length
            k = torch.cat([state.keys, k], dim=2)  # (B, Hkv, S, Dh), S = M + T
            v = torch.cat([state.values, v], dim=2)
            if state.valid is not None:
                valid = torch.cat([state.valid, state.valid.new_ones(B, T)], dim=1)  # (B, S)
        new_state = KVState(k, v, valid)

        if self.self_extend is None:
            y = self._rope_attention(q, k, v, n_cached, offset, valid)  # (B, H, T, Dh)
        else:
            y = self._self_extend_attention(q, k, v, key_offset=offset - n_cached, valid=valid)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*Dh)
        return self.out(y), new_state

    def _rope_attention(self, q: Tensor, k: Tensor, v: Tensor, n_cached: int, offset: int, valid: Tensor | None):
        """RoPE attention of un-rotated q (B, H, T, Dh) over k, v (B, Hkv, S, Dh), plus the registers."""
        T, S = q.shape[2], k.shape[2]
        base, temperature = self.rope_base, 1.0
        if self.rope_scaling is not None:
            base, temperature = self.rope_scaling.base_and_temperature(self.rope_base, self.head_dim, S)
            if temperature != 1.0:
                q, k = q * temperature, k * temperature
        q_pos, k_pos = query_key_positions(n_cached, T, offset, reversed=self.rope_reversed, device=q.device)
        q_rot, k_rot = rotate(q, q_pos, base), rotate(k, k_pos, base)
        if not self.n_registers:
            return attention(q_rot, k_rot, v, causal=True, backend=self.backend, key_mask=valid)
        # One softmax over [registers ‖ keys] where register scores use the un-rotated query: stack the
        # two query forms along the head dim and zero the half each kind of key does not use.
        B, R = q.shape[0], self.n_registers
        reg_k = (self.register_keys * temperature).to(k.dtype).expand(B, -1, -1, -1)  # (B, Hkv, R, Dh)
        reg_v = self.register_values.to(v.dtype).expand(B, -1, -1, -1)  # (B, Hkv, R, Dh)
        q2 = torch.cat([q_rot, q], dim=-1)  # (B, H, T, 2Dh)
        k2 = torch.cat(
            [torch.cat([torch.zeros_like(reg_k), reg_k], dim=-1), torch.cat([k_rot, torch.zeros_like(k_rot)], dim=-1)],
            dim=2,
        )  # (B, Hkv, R + S, 2Dh)
        v2 = torch.cat([reg_v, v], dim=2)  # (B, Hkv, R + S, Dh)
        if valid is not None:
            valid = torch.cat([valid.new_ones(B, R), valid], dim=1)  # (B, R + S)
        return attention(q2, k2, v2, causal=True, backend=self.backend, key_mask=valid, scale=self.head_dim**-0.5)

    def _self_extend_attention(self, q: Tensor, k: Tensor, v: Tensor, key_offset: int, valid: Tensor | None) -> Tensor:
        """SelfExtend over un-rotated q (B, H, T, Dh) and the whole key sequence k, v (B, Hkv, S, Dh); a
        reset row's hidden past is left padding to it (positions then count from the row's restart)."""
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
            pretrained_len=config.pretrained_len,
            implementation=config.implementation,
            block_size=config.block_size,
            backend=self.backend,
        )
