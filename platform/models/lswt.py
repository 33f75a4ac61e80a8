"""LSWT, the Long-Short-Working Transformer (docs/architectures.md; seed 002).

A pre-norm Transformer whose token embedding lives in its own width (`d_vocab`) with projections
to and from `d_model`, tied input/output embeddings, SwiGLU feed-forward layers and RoPE attention
(reversed by default: the newest token is always at position 0; optional NTK/dynamic scaling) with
optional attention registers. Its state is a per-layer KV cache of keys rotated once (values beside), which serves both
decoding and Transformer-XL training: with `cache_len > 0` the state is trimmed to the newest
`cache_len` positions after every call, and `reset_rows` drops the past of rows that begin a new
stream (and records where they began). `self_extend` switches every attention layer to SelfExtend
without changing the parameters; registers stay position-free under it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from .layers.attention import Backend, CausalSelfAttention, KVState
from .layers.feed_forward import SwiGLU
from .layers.norm import LayerNorm, RMSNorm
from .layers.rope import RotaryScaling
from .layers.self_extend import SelfExtendConfig, as_self_extend_config
from .output import ModelOutput, ModelState
from .seed_names import rename


@dataclasses.dataclass
class LSWTConfig:
    vocab_size: int = 50272
    """Number of token ids the embedding holds."""
    d_vocab: int = 768
    """Width of the token embedding; projected to d_model on the way in and back on the way out."""
    d_model: int = 768
    """Width of the residual stream."""
    n_layers: int = 12
    """Number of Transformer blocks."""
    n_heads: int = 12
    """Attention heads; head_dim = d_model // n_heads."""
    d_ff: int = 3072
    """Feed-forward width after gating (SwiGLU)."""
    rope_base: float = 500000.0
    """RoPE base frequency (500k: 'RoPE ABF', as the seed)."""
    rope_reversed: bool = True
    """Count positions back from the newest token (reversed RoPE); False gives standard RoPE."""
    rope_ntk_scale: float = 1.0
    """NTK-aware RoPE scaling: the base becomes rope_base * s^(d/(d-2)) (1 leaves it unchanged)."""
    rope_dynamic: bool = False
    """Dynamic NTK: past rope_positions keys, scale by s = keys / rope_positions (and a q/k temperature)."""
    rope_positions: int | None = None
    """Trained context length that dynamic scaling counts from (needed with rope_dynamic)."""
    rope_yarn_a: float = 0.07
    """Dynamic scaling multiplies queries and keys by rope_yarn_a * ln(s) + rope_yarn_b."""
    rope_yarn_b: float = 1.0
    """See rope_yarn_a."""
    n_registers: int = 0
    """Learned attention registers per layer, seen by every query and never cached (0: none)."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head before rotation."""
    bias: bool = True
    """Biases in the attention and feed-forward projections."""
    cache_len: int = 0
    """Transformer-XL: keep at most this many past positions in the state (0 keeps all, for decoding)."""
    dropout: float = 0.0
    """Dropout on each residual branch during training."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix and the embedding."""
    self_extend: SelfExtendConfig | None = None
    """SelfExtend in every attention layer ({group_size, window_size, ...}); None: plain RoPE attention."""
    attention_backend: Backend = "auto"
    """Attention kernel: auto (flash-attn on CUDA when installed, else SDPA) | flash (required) | sdpa."""

    def __post_init__(self) -> None:
        self.self_extend = as_self_extend_config(self.self_extend)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "pick n_heads from the divisors of d_model"
            )
        if self.attention_backend not in ("auto", "flash", "sdpa"):
            raise ValueError(f"model.attention_backend={self.attention_backend!r}; choose auto, flash or sdpa")
        if self.cache_len < 0:
            raise ValueError(f"model.cache_len={self.cache_len} must be >= 0 (0 keeps the whole past)")
        if self.n_registers < 0:
            raise ValueError(f"model.n_registers={self.n_registers} must be >= 0 (0 turns registers off)")
        if self.rope_dynamic and (self.rope_positions is None or self.rope_positions < 1):
            raise ValueError(
                f"model.rope_dynamic=true needs model.rope_positions >= 1 (the trained context), "
                f"got {self.rope_positions}"
            )
        if self.rope_ntk_scale <= 0:
            raise ValueError(f"model.rope_ntk_scale={self.rope_ntk_scale} must be > 0 (1 turns NTK scaling off)")
        if self.self_extend is not None and self.rope_scaling is not None:
            raise ValueError(
                f"model.self_extend does not combine with RoPE scaling (rope_ntk_scale={self.rope_ntk_scale}, "
                f"rope_dynamic={self.rope_dynamic}): both change the rotary positions; turn one of them off"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rope_scaling(self) -> RotaryScaling | None:
        """None when RoPE is unscaled (static scale 1, not dynamic)."""
        if self.rope_ntk_scale == 1.0 and not self.rope_dynamic:
            return None
        positions = self.rope_positions if self.rope_dynamic else None
        return RotaryScaling(self.rope_ntk_scale, positions, self.rope_yarn_a, self.rope_yarn_b)


# The seed's LSWTConfig names (docs/architectures.md) for fields named as in the other families here: its own
# fields, then the attribute_map of its Hugging Face config. `from_seed_names` accepts them.
SEED_NAMES = {
    "d_ffn": "d_ff",
    "rope_base_freq": "rope_base",
    "enable_bias": "bias",
    "hidden_size": "d_model",
    "num_attention_heads": "n_heads",
    "num_hidden_layers": "n_layers",
    "intermediate_size": "d_ff",
    "max_position_embeddings": "rope_positions",
}


def from_seed_names(overrides: dict[str, Any]) -> dict[str, Any]:
    """LSWTConfig fields from overrides that may use the seed's names (d_ffn, rope_base_freq, enable_bias, and
    the Hugging Face attribute_map's hidden_size, ...); a field given under two names is an error naming both."""
    return rename(overrides, SEED_NAMES, "lswt")


@dataclasses.dataclass(frozen=True)
class LSWTState(ModelState):
    layers: list[KVState]  # one per block: keys/values (B, H, M, Dh), M <= cache_len when cache_len > 0
    position: int  # absolute position of the next token (counts every token seen, trimmed or not)
    stream_start: Tensor | None = None  # (B,) int64: position where each row's stream began; None: 0 for all

    def reset_rows(self, rows: Tensor) -> LSWTState:
        """Drop the past of the rows where `rows` (B,) is True (a new stream begins there); the other
        rows keep theirs. Hidden positions are masked until trimming pushes them out of the cache; the
        stream's start stays, since SelfExtend groups a row's positions counted from it."""
        start = self.stream_start
        if start is None:  # kept beside the keys, which SelfExtend positions from it
            start = torch.zeros(rows.shape, dtype=torch.long, device=self.layers[0].keys.device)
        start = torch.where(rows.to(start.device), self.position, start)  # (B,)
        return LSWTState([kv.reset_rows(rows) for kv in self.layers], self.position, start)


class LSWTBlock(nn.Module):
    """x + Attn(LN(x)), then + SwiGLU(LN(x)): pre-norm with LayerNorm, as the original."""

    def __init__(self, config: LSWTConfig):
        super().__init__()
        self.attention_norm = LayerNorm(config.d_model)
        self.attention = CausalSelfAttention(
            config.d_model,
            config.n_heads,
            bias=config.bias,
            qk_norm=config.qk_norm,
            rope_base=config.rope_base,
            rope_reversed=config.rope_reversed,
            self_extend=config.self_extend,
            n_registers=config.n_registers,
            rope_scaling=config.rope_scaling,
            backend=config.attention_backend,
        )
        self.feed_forward_norm = LayerNorm(config.d_model)
        self.feed_forward = SwiGLU(config.d_model, config.d_ff, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, state: KVState | None, offset: int, stream_start: Tensor | None = None
    ) -> tuple[Tensor, KVState]:
        a, state = self.attention(self.attention_norm(x), state, offset, stream_start)
        x = x + self.dropout(a)
        x = x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))
        return x, state


class LSWT(nn.Module):
    def __init__(self, config: LSWTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_vocab)
        self.input_proj = nn.Linear(config.d_vocab, config.d_model, bias=False)
        self.input_norm = LayerNorm(config.d_model)
        self.blocks = nn.ModuleList(LSWTBlock(config) for _ in range(config.n_layers))
        self.norm = LayerNorm(config.d_model)
        self.output_proj = nn.Linear(config.d_model, config.d_vocab, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, init_std) for every matrix and the embedding, zero biases, unit norms, registers
        N(0, 1/sqrt(Dh)) (the seed's init). Also used after a sharded strategy materialises a
        meta-device model."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
            elif isinstance(module, CausalSelfAttention):
                module.reset_registers()

    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        """None: LSWT has no mixture-of-experts stage (the contract asks every model)."""
        return []

    def output_head(self, h: Tensor) -> Tensor:
        """Final hidden states (..., D) -> logits (..., V) through the tied embedding."""
        return self.output_proj(h) @ self.embed.weight.T  # (..., d_vocab) @ (d_vocab, V) -> (..., V)

    def forward(
        self,
        input_ids: Tensor,
        state: LSWTState | None = None,
        *,
        return_hidden: bool = False,
        return_logits: bool = True,
    ) -> ModelOutput:
        """input_ids (B, T) -> logits (B, T, V); `state` continues a sequence from its last call."""
        offset, stream_start = (0, None) if state is None else (state.position, state.stream_start)
        h = self.input_norm(self.input_proj(self.embed(input_ids)))  # (B, T, D)
        layers = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, None if state is None else state.layers[i], offset, stream_start)
            layers.append(kv.trim(self.config.cache_len) if self.config.cache_len else kv)
        h = self.norm(h)
        new_state = LSWTState(layers, offset + input_ids.shape[1], stream_start)
        logits = self.output_head(h) if return_logits else None  # (B, T, V)
        return ModelOutput(logits, new_state, {}, h if return_hidden else None)


SIZES: dict[str, dict] = {
    # Trains in seconds on a CPU: the default job and the tests. No registers (configs/lswt/debug.yaml adds
    # them for XL training); SelfExtend can be switched on at evaluation time, with or without them.
    "debug": dict(vocab_size=512, d_vocab=64, d_model=64, n_layers=2, n_heads=4, d_ff=192, rope_base=10000.0),
    # The seed's table (Dec-2023 generation): d_ff = 4 * d_model, d_key = 64, a 768-wide OPT vocabulary,
    # 16 registers per layer (2 * 16 * d_model parameters each: under 0.1% of any size).
    "tiny": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, n_registers=16),  # 153M
    "small": dict(d_model=1024, n_layers=18, n_heads=16, d_ff=4096, n_registers=16),  # 343M
    "medium": dict(d_model=1536, n_layers=24, n_heads=24, d_ff=6144, n_registers=16),  # 949M
    "large": dict(d_model=2048, n_layers=36, n_heads=32, d_ff=8192, n_registers=16),  # 2.5B
    "xl": dict(d_model=3072, n_layers=48, n_heads=48, d_ff=12288, n_registers=16),  # 7.3B
    "xxl": dict(d_model=4096, n_layers=48, n_heads=64, d_ff=16384, n_registers=16),  # 13B
}
