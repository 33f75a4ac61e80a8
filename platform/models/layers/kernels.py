"""The attention kernels every attention layer calls: flash-attn or PyTorch's SDPA, chosen in one place.

`attention()` takes flash-attn when it is installed, the tensors are on CUDA and in fp16/bf16, and
PyTorch's `scaled_dot_product_attention` otherwise; the choice is logged once. Both scale scores by
1/sqrt(head_dim) and align the causal mask bottom-right, so queries that follow a cache of keys (S > T)
see the whole cache. SelfExtend's banded kernel (banded_attention.py) shares the guard and the log.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

Backend = Literal["auto", "sdpa", "flash"]


def log_once(message: str) -> None:
    """Log a kernel choice once per process, and only on rank zero when distributed. Skipped while
    torch.compile traces: a logging call would split the compiled graph, and the eager call logs it."""
    if not torch.compiler.is_compiling():
        _log_once(message)


@functools.cache
def _log_once(message: str) -> None:
    if (
        not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
        or torch.distributed.get_rank() == 0
    ):
        log.info(message)


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    backend: Backend = "auto",
    key_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention. q (B, H, T, Dk); k (B, Hkv, S, Dk); v (B, Hkv, S, Dv); H % Hkv == 0, S >= T.

    With `causal`, query i sits at key index S - T + i and sees keys up to there (bottom-right
    alignment). `key_mask` (B, S) bool hides keys where False (a row's dropped past); the caller
    keeps at least one key visible per query. `scale` defaults to 1/sqrt(Dk). Returns (B, H, T, Dv).
    """
    use_flash = key_mask is None and (
        backend == "flash"
        or (backend == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available())
    )
    if use_flash:
        if not flash_attn_available():
            raise ImportError(
                "attention backend='flash' needs flash-attn and a CUDA GPU; "
                "install it with `pip install flash-attn --no-build-isolation` or use backend='sdpa'"
            )
        log_once("attention kernel: flash-attn")
        from flash_attn import flash_attn_func

        Dv = v.shape[-1]
        if Dv != q.shape[-1]:  # flash needs one head size: pad the values, drop the padding after
            v = F.pad(v, (0, q.shape[-1] - Dv))  # (B, Hkv, S, Dk)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T|S, H|Hkv, Dk)
        out = flash_attn_func(qt, kt, vt, causal=causal, softmax_scale=scale)  # (B, T, H, Dk)
        return out.transpose(1, 2)[..., :Dv]  # (B, H, T, Dv)

    if key_mask is not None and backend == "flash":
        log_once("attention kernel: torch scaled_dot_product_attention for calls with a key mask")
    log_once("attention kernel: torch scaled_dot_product_attention")
    T, S = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    sdpa = functools.partial(F.scaled_dot_product_attention, scale=scale, enable_gqa=gqa)
    if key_mask is not None:
        mask = key_mask[:, None, None, :]  # (B, 1, 1, S)
        if causal and T > 1:
            mask = mask & causal_mask(T, S, q.device)  # (B, 1, T, S)
        return sdpa(q, k, v, attn_mask=mask)
    if not causal or T == 1:  # one query after a cache sees every key
        return sdpa(q, k, v)
    if T == S:
        return sdpa(q, k, v, is_causal=True)
    return sdpa(q, k, v, attn_mask=causal_mask(T, S, q.device))


def causal_mask(n_queries: int, n_keys: int, device=None) -> Tensor:
    """(T, S) bool, True where query i may see key j: j <= i + (S - T)."""
    i = torch.arange(n_queries, device=device).unsqueeze(1)
    j = torch.arange(n_keys, device=device)
    return j <= i + (n_keys - n_queries)
