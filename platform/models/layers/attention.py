"""Causal attention: the kernel choice (flash-attn or SDPA) and the self-attention layer with a KV state.

`attention()` is the one place that picks a kernel: flash-attn when it is installed, the tensors are
on CUDA and in fp16/bf16; PyTorch's `scaled_dot_product_attention` otherwise. The choice is logged
once. Both scale scores by 1/sqrt(head_dim) and align the causal mask bottom-right, so queries that
follow a cache of keys (S > T) see the whole cache.

`CausalSelfAttention` is shared by every family with RoPE attention. Its state holds keys *before*
rotation, so they can be re-rotated at any later length (reversed RoPE, SelfExtend). With a
`SelfExtendConfig` it attends through SelfExtend (platform/models/self_extend.py) instead, with the
same parameters, so a model trained without it runs with it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from platform.models.layers.norm import RMSNorm
from platform.models.layers.rope import query_key_positions, rotate
from platform.models.output import ModelState

if TYPE_CHECKING:
    from platform.models.self_extend import SelfExtendConfig

log = logging.getLogger(__name__)

Backend = Literal["auto", "sdpa", "flash"]


@functools.cache
def _log_once(message: str) -> None:
    """Log a kernel choice once per process, and only on rank zero when distributed."""
    if (
        not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
        or torch.distributed.get_rank() == 0
    ):
        log.info(message)


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, backend: Backend = "auto") -> Tensor:
    """Softmax attention. q (B, H, T, Dh); k, v (B, Hkv, S, Dh) with H % Hkv == 0 and S >= T.

    With `causal`, query i sits at key index S - T + i and sees keys up to there (bottom-right
    alignment). Returns (B, H, T, Dh).
    """
    use_flash = backend == "flash" or (
        backend == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
    )
    if use_flash:
        if not flash_attn_available():
            raise ImportError(
                "attention backend='flash' needs flash-attn and a CUDA GPU; "
                "install it with `pip install flash-attn --no-build-isolation` or use backend='sdpa'"
            )
        _log_once("attention kernel: flash-attn")
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)  # (B, T, H, Dh)
        return out.transpose(1, 2)

    _log_once("attention kernel: torch scaled_dot_product_attention")
    T, S = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if not causal or T == 1:  # one query after a cache sees every key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, q.device), enable_gqa=gqa)


def causal_mask(n_queries: int, n_keys: int, device=None) -> Tensor:
    """(T, S) bool, True where query i may see key j: j <= i + (S - T)."""
    i = torch.arange(n_queries, device=device).unsqueeze(1)
    j = torch.arange(n_keys, device=device)
    return j <= i + (n_keys - n_queries)


@dataclasses.dataclass(frozen=True)
class KVState(ModelState):
    """Keys and values of every token seen so far by one attention layer."""

    keys: Tensor  # (B, Hkv, M, Dh), not rotated
    values: Tensor  # (B, Hkv, M, Dh)

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def trim(self, max_length: int) -> KVState:
        """Keep the newest `max_length` positions (all of them when max_length >= length)."""
        if max_length >= self.length:
            return self
        return KVState(self.keys[:, :, self.length - max_length :], self.values[:, :, self.length - max_length :])


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE, optional QK-norm and grouped KV heads (GQA).

    `self_extend` switches the attention to SelfExtend (grouped distances past a neighbour window);
    it adds no parameters and is usually set at evaluation or generation time.

    QK-norm RMS-normalises each query and key head before rotation, with a learned scale per channel
    or (qk_norm_affine=False) none.
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
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pick n_heads from its divisors")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.rope_base, self.rope_reversed, self.backend = rope_base, rope_reversed, backend
        self.self_extend = self_extend
        self.query = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.key = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.value = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        # Without a learned scale (qk_norm_affine=False) the norm commutes with the rotation, which keeps
        # each head vector's length: normalising before RoPE equals normalising after it (SeqCond, §1.2).
        self.q_norm = RMSNorm(self.head_dim, elementwise_affine=qk_norm_affine) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, elementwise_affine=qk_norm_affine) if qk_norm else None

    def forward(self, x: Tensor, state: KVState | None = None, offset: int = 0) -> tuple[Tensor, KVState]:
        """x (B, T, D); `offset` is the absolute position of x's first token. Returns the output and
        the state extended by these T tokens (untrimmed: trimming is the caller's policy)."""
        B, T, _ = x.shape
        q = self.query(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.key(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.value(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        n_cached = 0
        if state is not None:
            n_cached = state.length
            k = torch.cat([state.keys, k], dim=2)  # (B, Hkv, S, Dh), S = M + T
            v = torch.cat([state.values, v], dim=2)
        new_state = KVState(k, v)

        if self.self_extend is None:
            q_pos, k_pos = query_key_positions(n_cached, T, offset, reversed=self.rope_reversed, device=x.device)
            q_rot, k_rot = rotate(q, q_pos, self.rope_base), rotate(k, k_pos, self.rope_base)
            y = attention(q_rot, k_rot, v, causal=True, backend=self.backend)  # (B, H, T, Dh)
        else:
            y = self._self_extend_attention(q, k, v, key_offset=offset - n_cached)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*Dh)
        return self.out(y), new_state

    def _self_extend_attention(self, q: Tensor, k: Tensor, v: Tensor, key_offset: int) -> Tensor:
        """SelfExtend over un-rotated q (B, H, T, Dh) and the whole key sequence k, v (B, Hkv, S, Dh)."""
        # imported here: self_extend builds on this module's kernels, so importing it at the top would be circular
        from platform.models.self_extend import self_extend_attention

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
            pretrained_len=config.pretrained_len,
            implementation=config.implementation,
            block_size=config.block_size,
            backend=self.backend,
        )
