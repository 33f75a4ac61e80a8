"""SelfExtend (Jin et al. 2024, "LLM Maybe LongLM"): a longer context for a RoPE model, without training.

Keys closer than W to the query keep their true distance; farther keys are seen from grouped positions,
query ⌊i/G⌋ + W - ⌊W/G⌋ and key ⌊j/G⌋, so distances grow G times slower past the window and stay inside
the trained range. Scores of the two kinds are merged before one softmax. This is the official
algorithm (docs/architectures.md, integer ⌊W/G⌋), with two implementations that agree: the
replacement merge (the reference, (T, S) scores) and the two-pass merge (memory linear in length).
Attention registers (LSWT) have no position: they join the same softmax with the un-rotated query.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
from torch import Tensor

from .banded_attention import band_mask, banded_attention, merge_by_lse
from .kernels import Backend, attention
from .rope import query_key_positions, rotate

log = logging.getLogger(__name__)

Implementation = Literal["two_pass", "replacement"]
IMPLEMENTATIONS = ("two_pass", "replacement")


@dataclasses.dataclass
class SelfExtendConfig:
    group_size: int
    """G: past the neighbour window, G consecutive positions share one grouped position."""
    window_size: int
    """W: keys fewer than W positions back keep their true distance (the neighbour window)."""
    pretrained_len: int | None = None
    """The context the model was trained at (L_pre); longer inputs than `max_length` warn. None: no check."""
    implementation: Implementation = "two_pass"
    """'two_pass': neighbour and grouped passes joined by log-sum-exp, memory linear in length (default);
    'replacement': one (T, S) score matrix per kind, merged by replacement (the reference)."""
    block_size: int = 256
    """Query and key block of the two-pass torch path (scores take B·H·block_size² numbers): 256 was fastest
    on CPU; on an H100 at 8k-32k tokens, 2048 ran 10-25x faster than 256 (benchmarks/self_extend_memory.py)."""

    def __post_init__(self) -> None:
        for key in ("group_size", "window_size", "block_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.self_extend.{key}={getattr(self, key)} must be >= 1")
        if self.pretrained_len is not None and self.pretrained_len <= self.window_size:
            raise ValueError(
                f"model.self_extend.window_size={self.window_size} must be smaller than "
                f"pretrained_len={self.pretrained_len}; grouped distances start at W and must stay below L_pre"
            )
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"model.self_extend.implementation='{self.implementation}' is unknown; "
                f"choose one of: {', '.join(IMPLEMENTATIONS)}"
            )

    @property
    def max_length(self) -> int | None:
        """Longest input whose merged distances all stay below pretrained_len (None when it is unknown)."""
        if self.pretrained_len is None:
            return None
        return extension_length(self.pretrained_len, self.group_size, self.window_size)


def as_self_extend_config(value: SelfExtendConfig | dict | None) -> SelfExtendConfig | None:
    """A family config's `self_extend` field as a SelfExtendConfig; YAML and command-line overrides give dicts."""
    if not isinstance(value, dict):
        return value
    fields = {f.name for f in dataclasses.fields(SelfExtendConfig)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(f"unknown model.self_extend key '{unknown[0]}'; valid keys: {', '.join(sorted(fields))}")
    missing = [key for key in ("group_size", "window_size") if key not in value]
    if missing:
        raise ValueError(f"model.self_extend needs {' and '.join(missing)}, e.g. {{group_size: 4, window_size: 256}}")
    return SelfExtendConfig(**value)


def grouped_query_positions(positions: Tensor, group_size: int, window_size: int) -> Tensor:
    """⌊i/G⌋ + W - ⌊W/G⌋: the shift makes grouped distances continue from W where the window ends."""
    return positions // group_size + window_size - window_size // group_size


def grouped_key_positions(positions: Tensor, group_size: int) -> Tensor:
    return positions // group_size


def merged_distances(query_positions: Tensor, key_positions: Tensor, group_size: int, window_size: int) -> Tensor:
    """The distance SelfExtend gives each (query, key) pair: (T,) and (S,) positions -> (T, S) integers.

    i - j inside the window (|i - j| < W), the grouped distance g_q(i) - g_k(j) for keys W or more
    behind, and its mirror -(g_q(j) - g_k(i)) for keys W or more ahead (non-causal attention only).
    """
    qp, kp = query_positions.unsqueeze(-1), key_positions.unsqueeze(-2)  # (T, 1), (1, S)
    true = qp - kp  # (T, S)
    behind = grouped_query_positions(qp, group_size, window_size) - grouped_key_positions(kp, group_size)
    ahead = grouped_key_positions(qp, group_size) - grouped_query_positions(kp, group_size, window_size)
    return torch.where(true >= window_size, behind, torch.where(true <= -window_size, ahead, true))


def extension_length(pretrained_len: int, group_size: int, window_size: int) -> int:
    """Longest N whose largest merged distance ⌊(N-1)/G⌋ + W - ⌊W/G⌋ stays below L_pre: (L_pre - W + ⌊W/G⌋)·G.

    That is the paper's (L_pre - W)·G + W when G divides W, and W mod G shorter otherwise (at the
    paper's bound the largest distance would then reach L_pre itself).
    """
    return (pretrained_len - window_size + window_size // group_size) * group_size


def self_extend_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group_size: int,
    window_size: int,
    rope_base: float = 10000.0,
    reversed: bool = False,
    causal: bool = True,
    key_offset: int = 0,
    key_padding_mask: Tensor | None = None,
    stream_start: Tensor | None = None,
    register_keys: Tensor | None = None,
    register_values: Tensor | None = None,
    pretrained_len: int | None = None,
    implementation: Implementation = "two_pass",
    block_size: int = 256,
    backend: Backend = "auto",
) -> Tensor:
    """SelfExtend attention of un-rotated q (B, H, T, Dh) over un-rotated k, v (B, Hkv, S, Dh) -> (B, H, T, Dh).

    The T queries are the last T of the S keys (bottom-right alignment: the earlier keys are a cache).
    `key_offset` is the absolute position of key 0 (keys before it were trimmed away); grouping uses
    each row's positions counted from its own start, so a call after a cache computes what one long
    call would. `reversed` applies reversed RoPE (standard RoPE with negated angles) to the same merged
    distances. Scale 1/sqrt(Dh).

    Rows that start later (padding, or a new stream in a reused cache): `key_padding_mask` (B, S) is True
    for the keys a row sees and hides only a prefix of them (left padding); a query that sees no key
    outputs zeros. `stream_start` (B,) is the absolute position where each row began, so its positions
    count from there; without it, a row with hidden keys begins at its first visible key and the others
    at 0. Pass it when a row's hidden keys may have been trimmed away: the mask no longer shows its start.

    `register_keys` and `register_values` (Hkv, R, Dh) are position-free keys every query sees, scored
    against the un-rotated query, in the same softmax as the tokens (attention registers, LSWT).

    While every key lies inside the window (S <= W, no padding, no registers), no distance is regrouped
    and the call is plain RoPE attention through the shared kernel, bit for bit. Otherwise
    `implementation` decides: "two_pass" (banded_attention, flash-attn or blockwise by `backend`, plus a
    small dense pass over the registers) or "replacement".
    """
    _check_inputs(q, k, v, group_size, window_size, implementation, key_padding_mask)
    _check_starts_and_registers(k, stream_start, register_keys, register_values)
    T, S = q.shape[2], k.shape[2]
    if pretrained_len is not None:
        _warn_beyond_extension(key_offset + S, pretrained_len, group_size, window_size)
    # Neighbour rotations use exactly the plain layer's positions (reversed: the newest key at 0).
    q_pos, k_pos = query_key_positions(S - T, T, key_offset + S - T, reversed=reversed, device=q.device)
    if window_size >= S and key_padding_mask is None and register_keys is None:
        return attention(rotate(q, q_pos, rope_base), rotate(k, k_pos, rope_base), v, causal=causal, backend=backend)

    positions = key_offset + torch.arange(S, device=q.device).unsqueeze(0)  # (1, S): absolute positions
    if stream_start is None and key_padding_mask is not None:
        hidden = (~key_padding_mask).sum(-1)  # (B,): the hidden prefix ends where the row begins
        stream_start = torch.where(hidden > 0, key_offset + hidden, 0)
    if stream_start is not None:
        positions = positions - stream_start.to(q.device).unsqueeze(-1)  # (B, S): counted from each row's start
    sign = -1 if reversed else 1  # reversed RoPE rotates by negated positions
    G, W = group_size, window_size
    # (query rotation positions, key rotation positions, band of key - query offsets it covers)
    passes = [(q_pos, k_pos, -(W - 1), 0 if causal else W - 1)]
    qa, ka = positions[:, S - T :], positions  # absolute positions of the queries and keys
    passes.append((sign * grouped_query_positions(qa, G, W), sign * grouped_key_positions(ka, G), None, -W))
    if not causal:
        passes.append((sign * grouped_key_positions(qa, G), sign * grouped_query_positions(ka, G, W), W, None))
    rotated = [(rotate(q, qp, rope_base), rotate(k, kp, rope_base), lo, hi) for qp, kp, lo, hi in passes]

    registers = None if register_keys is None else (register_keys, register_values)
    if implementation == "replacement":
        return _replacement_merge(rotated, v, key_padding_mask, q, registers)
    outputs = [
        banded_attention(qr, kr, v, lo=lo, hi=hi, key_mask=key_padding_mask, block_size=block_size, backend=backend)
        for qr, kr, lo, hi in rotated
    ]
    if registers is not None:
        outputs.append(_register_pass(q, *registers))
    return merge_by_lse(outputs)


def _register_scores(q: Tensor, keys: Tensor) -> Tensor:
    """Un-rotated q (B, H, T, Dh) against register keys (Hkv, R, Dh) -> (B, Hkv, H/Hkv, T, R), in fp32 or wider."""
    Hkv, Dh = keys.shape[0], q.shape[-1]
    compute = torch.promote_types(q.dtype, torch.float32)
    q = q.unflatten(1, (Hkv, q.shape[1] // Hkv)).to(compute)  # (B, Hkv, H/Hkv, T, Dh)
    return q @ keys.to(compute).unsqueeze(1).transpose(-1, -2) * Dh**-0.5  # (Hkv, 1, Dh, R) broadcasts


def _register_pass(q: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """The registers as one more pass of the merge: output (B, H, T, Dh) and lse (B, H, T). R is small, so
    the (T, R) scores cost what one extra key block does."""
    scores = _register_scores(q, keys)  # (B, Hkv, H/Hkv, T, R)
    out = scores.softmax(dim=-1) @ values.to(scores.dtype).unsqueeze(1)  # (B, Hkv, H/Hkv, T, Dh)
    return out.flatten(1, 2).to(q.dtype), scores.logsumexp(dim=-1).flatten(1, 2)


def _replacement_merge(
    rotated: list[tuple[Tensor, Tensor, int | None, int | None]],
    v: Tensor,
    key_mask: Tensor | None,
    q: Tensor,
    registers: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """One (T, S) score matrix per kind of distance; each pair takes the score of its band, then one softmax
    (over the registers' scores too, which the un-rotated q gives)."""
    B, H, T, Dh = rotated[0][0].shape
    Hkv, S = v.shape[1], v.shape[2]
    compute = torch.promote_types(v.dtype, torch.float32)
    offset = torch.arange(S, device=v.device) - torch.arange(S - T, S, device=v.device).unsqueeze(1)  # (T, S)
    scores = v.new_full((B, Hkv, H // Hkv, T, S), float("-inf"), dtype=compute)
    for q_rot, k_rot, lo, hi in rotated:
        q_rot = q_rot.unflatten(1, (Hkv, H // Hkv)).to(compute)  # (B, Hkv, H/Hkv, T, Dh): heads grouped by kv head
        kind = q_rot @ k_rot.unsqueeze(2).to(compute).transpose(-1, -2) * Dh**-0.5  # (B, Hkv, H/Hkv, T, S)
        scores = torch.where(band_mask(offset, lo, hi), kind, scores)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, None, :], float("-inf"))
    values = v.unsqueeze(2).to(compute)  # (B, Hkv, 1, S, Dh)
    if registers is not None:
        register_keys, register_values = registers
        scores = torch.cat([_register_scores(q, register_keys), scores], dim=-1)  # (B, Hkv, H/Hkv, T, R+S)
        shared = register_values.to(compute).unsqueeze(1).expand(B, -1, -1, -1, -1)  # (B, Hkv, 1, R, Dh)
        values = torch.cat([shared, values], dim=-2)  # (B, Hkv, 1, R + S, Dh)
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # a query that sees no key gets zeros
    out = probs @ values  # (B, Hkv, H/Hkv, T, Dh)
    return out.flatten(1, 2).to(v.dtype)  # (B, H, T, Dh)


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, group_size: int, window_size: int, implementation: str, mask: Tensor | None
) -> None:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"self_extend_attention takes q (B, H, T, Dh) and k, v (B, Hkv, S, Dh); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2]:
        raise ValueError(
            f"query heads {q.shape[1]} must be a multiple of key heads {k.shape[1]}, and queries T={q.shape[2]} "
            f"at most keys S={k.shape[2]} (the queries are the last T keys)"
        )
    if group_size < 1 or window_size < 1:
        raise ValueError(f"group_size={group_size} and window_size={window_size} must both be >= 1")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation='{implementation}' is unknown; choose one of: {', '.join(IMPLEMENTATIONS)}")
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must be bool (B, S) = {(k.shape[0], k.shape[2])}, got {mask.dtype} "
                f"{tuple(mask.shape)}"
            )
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError("key_padding_mask must be left padding (pads before every real token of a row)")


def _check_starts_and_registers(
    k: Tensor, stream_start: Tensor | None, keys: Tensor | None, values: Tensor | None
) -> None:
    B, Hkv, _, Dh = k.shape
    if stream_start is not None and (stream_start.shape != (B,) or stream_start.is_floating_point()):
        raise ValueError(
            f"stream_start must be integer (B,) = ({B},), got {stream_start.dtype} {tuple(stream_start.shape)}"
        )
    if (keys is None) != (values is None):
        raise ValueError("register_keys and register_values go together; pass both or neither")
    if keys is not None and (
        keys.ndim != 3 or keys.shape != values.shape or (keys.shape[0], keys.shape[2]) != (Hkv, Dh)
    ):
        raise ValueError(
            f"register_keys and register_values must both be (Hkv, R, Dh) with Hkv={Hkv}, Dh={Dh}; got "
            f"{tuple(keys.shape)} and {tuple(values.shape)}"
        )


_warned: set[tuple[int, int, int]] = set()


def _warn_beyond_extension(length: int, pretrained_len: int, group_size: int, window_size: int) -> None:
    """Warn once per (L_pre, G, W) and process, on rank zero, when an input outruns the extension."""
    limit = extension_length(pretrained_len, group_size, window_size)
    key = (pretrained_len, group_size, window_size)
    if length <= limit or key in _warned:
        return
    _warned.add(key)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return
    log.warning(
        "SelfExtend input of %d tokens exceeds %d = (pretrained_len - W + W//G)·G for pretrained_len=%d, "
        "group_size=%d, window_size=%d: the largest distances are beyond the trained range; raise group_size",
        length,
        limit,
        pretrained_len,
        group_size,
        window_size,
    )
