"""SeqCond, the Sequence Condenser hybrid (ARCHITECTURES.md §0 and §1; seed 000).

A stack of pre-norm residual blocks: most are sequence condensers (platform/models/condenser.py, no
feed-forward), and every (seqcond_ratio + 1)-th is a Transformer block with RoPE attention (GQA, optional
parameter-free QK-norm) and a gated feed-forward layer (§1.2). Tied embeddings initialised with std
1/sqrt(d_model) and an optional final RMSNorm (on by default) replace the original's N(0, 1) embedding.
"""

from __future__ import annotations

import dataclasses
import warnings

from torch import Tensor, nn

from platform.models.condenser import CondenserState, SequenceCondenser
from platform.models.layers.attention import CausalSelfAttention, KVState
from platform.models.layers.feed_forward import SwiGLU
from platform.models.layers.norm import RMSNorm
from platform.models.output import ModelOutput, ModelState
from platform.models.self_extend import SelfExtendConfig, as_self_extend_config

# The seed README's factory names for the project's common ones; either may be given, the seed name wins.
SEED_NAMES = {"num_layers": "n_layers", "num_heads": "n_heads", "maxlen": "max_seq_len"}


@dataclasses.dataclass
class SeqCondConfig:
    vocab_size: int = 100300
    """Number of token ids the embedding holds (100300: cl100k plus chat tokens, as the original)."""
    d_model: int = 256
    """Width of the residual stream."""
    d_ff: int = 768
    """Feed-forward width after gating in the Transformer blocks."""
    n_layers: int = 12
    """Number of blocks, condensers and Transformer blocks together (seed name: num_layers)."""
    n_heads: int = 8
    """Attention heads of the Transformer blocks; head_dim = d_model // n_heads (seed name: num_heads)."""
    max_seq_len: int = 1024
    """Trained context length (seed name: maxlen). Longer inputs still run, with a warning; nothing is sized by it."""
    seqcond_ratio: int = 3
    """Condensers per Transformer block: layer i is a Transformer block iff (i + 1) % (seqcond_ratio + 1) == 0."""
    num_kv_heads: int | None = None
    """Key/value heads of the attention (GQA); None uses n_heads."""
    qk_norm: bool = False
    """Parameter-free RMS normalisation of every query and key head in the attention."""
    seqcond_heads: int | None = None
    """Memory heads K of each condenser; None uses n_heads."""
    num_query_heads: int | None = None
    """Query heads of each condenser, each reading seqcond_heads // num_query_heads memory heads; None uses K."""
    num_thetas: int = 4
    """Frequencies M at which each condenser channel samples its characteristic function."""
    expand_factor: float = 2.0
    """Condenser width d_model * expand_factor, split into K heads of M frequencies (H channels per head)."""
    out_expand_factor: int = 3
    """Readout width per condenser head, in multiples of its H channels."""
    num_anchor_heads: int = 0
    """The last memory heads weigh token s by exp(-lambda s) (favouring the start) instead of exp(-lambda (t - s))."""
    use_conv: bool = True
    """Causal depthwise conv before the condensation (otherwise only the SiLU)."""
    conv_kernel_size: int = 4
    """Taps of that conv: each token sees conv_kernel_size - 1 previous ones; decoding keeps as many."""
    chunk_size: int = 64
    """Tokens per chunk of the condenser's parallel scan: work per token grows with it, Python steps shrink."""
    use_square_matrix: bool = False
    """Compute each condenser call with one masked T x T matrix (O(T^2) memory, the original's option)."""
    use_final_norm: bool = True
    """RMSNorm before the LM head (the original has none; it keeps initial logits near unit scale)."""
    tie_weights: bool = True
    """Use the token embedding as the LM head."""
    dropout: float = 0.0
    """Dropout on each residual branch during training."""
    self_extend: SelfExtendConfig | None = None
    """SelfExtend in the Transformer blocks' attention ({group_size, window_size, ...}); None: plain RoPE."""
    num_layers: int | None = None
    """Seed name of n_layers; when given it sets n_layers."""
    num_heads: int | None = None
    """Seed name of n_heads; when given it sets n_heads."""
    maxlen: int | None = None
    """Seed name of max_seq_len; when given it sets max_seq_len."""

    def __post_init__(self) -> None:
        self.self_extend = as_self_extend_config(self.self_extend)
        for seed_name, name in SEED_NAMES.items():
            if getattr(self, seed_name) is not None:
                setattr(self, name, getattr(self, seed_name))
                setattr(self, seed_name, None)  # one source of truth, so dataclasses.replace stays correct
        for name in ("vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "max_seq_len", "num_thetas"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        for name in ("conv_kernel_size", "chunk_size", "out_expand_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.seqcond_ratio < 0:
            raise ValueError(f"model.seqcond_ratio={self.seqcond_ratio} must be >= 0 (0 makes every block attention)")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads} into an even "
                "head_dim (RoPE rotates pairs); pick n_heads so that d_model // n_heads is even"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not divisible by model.num_kv_heads={self.kv_heads}; "
                "pick num_kv_heads from the divisors of n_heads"
            )
        if self.memory_heads % self.query_heads:
            raise ValueError(
                f"model.seqcond_heads={self.memory_heads} is not divisible by model.num_query_heads="
                f"{self.query_heads}; pick num_query_heads from the divisors of seqcond_heads"
            )
        if not 0 <= self.num_anchor_heads <= self.memory_heads:
            raise ValueError(
                f"model.num_anchor_heads={self.num_anchor_heads} must be between 0 and model.seqcond_heads="
                f"{self.memory_heads}"
            )
        if self.expand_factor <= 0:
            raise ValueError(f"model.expand_factor={self.expand_factor} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.n_heads

    @property
    def memory_heads(self) -> int:
        """K."""
        return self.seqcond_heads or self.n_heads

    @property
    def query_heads(self) -> int:
        """K_q; K // K_q memory heads share each one."""
        return self.num_query_heads or self.memory_heads

    @property
    def channels_per_head(self) -> int:
        """H = max(1, d_inner // (K * M)) with d_inner = int(d_model * expand_factor)."""
        return max(1, int(self.d_model * self.expand_factor) // (self.memory_heads * self.num_thetas))

    @property
    def out_channels_per_head(self) -> int:
        """E = H * out_expand_factor."""
        return self.channels_per_head * self.out_expand_factor

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Indices of the Transformer blocks; every other block is a condenser."""
        period = self.seqcond_ratio + 1
        return tuple(i for i in range(self.n_layers) if (i + 1) % period == 0)


@dataclasses.dataclass(frozen=True)
class SeqCondState(ModelState):
    """Per block the condenser's fixed-size state or the attention's keys and values.

    Condenser states count positions per row and can batch rows at different positions; the model's
    position is one number because its attention states hold one length for every row.
    """

    layers: list[CondenserState | KVState]  # per block: condenser state (O(1) in length) or keys/values (B, H, M, Dh)
    position: int  # absolute position of the next token, shared by the rows (the KV states have one length)


class CondenserBlock(nn.Module):
    """x + Condenser(RMSNorm(x)); no feed-forward (§1.1)."""

    def __init__(self, config: SeqCondConfig):
        super().__init__()
        self.norm = RMSNorm(config.d_model)
        self.condenser = SequenceCondenser(config)

    def forward(self, x: Tensor, state: CondenserState | None, offset: int) -> tuple[Tensor, CondenserState]:
        y, state = self.condenser(self.norm(x), state)  # its state counts positions itself
        return x + y, state


class AttentionBlock(nn.Module):
    """x + Attn(RMSNorm(x)), then + FFN(RMSNorm(x)) with a biased SiLU-gated feed-forward (§1.2)."""

    def __init__(self, config: SeqCondConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model)
        self.attention = CausalSelfAttention(
            config.d_model,
            config.n_heads,
            config.kv_heads,
            qk_norm=config.qk_norm,
            qk_norm_affine=False,
            self_extend=config.self_extend,
        )
        self.feed_forward_norm = RMSNorm(config.d_model)
        self.feed_forward = SwiGLU(config.d_model, config.d_ff, bias=True)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, state: KVState | None, offset: int) -> tuple[Tensor, KVState]:
        a, state = self.attention(self.attention_norm(x), state, offset)
        x = x + self.dropout(a)
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x))), state


class SeqCond(nn.Module):
    """Token ids -> logits through the hybrid stack; `forward(input_ids, state)` continues a sequence.

    No token id is special: padding (token 0 in the original's data) is an ordinary token here, so pad
    on the right and leave pads out of the loss; a left-padded row would let its pads into the sums.
    """

    def __init__(self, config: SeqCondConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        attention = set(config.attention_layers)
        self.blocks = nn.ModuleList(
            AttentionBlock(config) if i in attention else CondenserBlock(config) for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model) if config.use_final_norm else nn.Identity()
        self.lm_head = None if config.tie_weights else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Embedding N(0, 1/d_model); matrices N(0, 1/fan_in), the ones that write into the residual
        stream further scaled by 1/sqrt(2 n_layers) (GPT-2); zero biases; unit norms; the condensers'
        frequency grid, decay rates and readout as §1.1. Also used after `to_empty()` from the meta device."""
        residual_scale = (2 * self.config.n_layers) ** -0.5
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, SequenceCondenser)):
                module.reset_parameters()
        for block in self.blocks:
            outputs = (
                [block.condenser.out]
                if isinstance(block, CondenserBlock)
                else [block.attention.out, block.feed_forward.down]
            )
            for linear in outputs:
                nn.init.normal_(linear.weight, std=linear.in_features**-0.5 * residual_scale)
        nn.init.normal_(self.embed.weight, std=self.config.d_model**-0.5)

    def forward(
        self, input_ids: Tensor, state: SeqCondState | None = None, *, return_hidden: bool = False
    ) -> ModelOutput:
        """input_ids (B, T) -> logits (B, T, V); `state` continues a sequence from its last call."""
        offset = 0 if state is None else state.position
        if offset + input_ids.shape[1] > self.config.max_seq_len:
            warnings.warn(
                f"SeqCond input runs past model.max_seq_len={self.config.max_seq_len}: positions keep counting "
                "and the state keeps growing (nothing is clamped or overwritten), but the model was not trained "
                "that far",
                stacklevel=1,  # here, whichever torch frames call forward: one warning per process
            )
        h = self.embed(input_ids)  # (B, T, D)
        layers = []
        for i, block in enumerate(self.blocks):
            h, layer_state = block(h, None if state is None else state.layers[i], offset)
            layers.append(layer_state)
        h = self.norm(h)
        logits = self.lm_head(h) if self.lm_head is not None else h @ self.embed.weight.T  # (B, T, V)
        new_state = SeqCondState(layers, offset + input_ids.shape[1])
        return ModelOutput(logits, new_state, {}, h if return_hidden else None)


SIZES: dict[str, dict] = {
    # Trains in seconds on a CPU: one condenser and one Transformer block, every axis a different size.
    "debug": dict(
        vocab_size=512,
        d_model=64,
        d_ff=96,
        n_layers=2,
        n_heads=4,
        num_kv_heads=2,
        max_seq_len=256,
        seqcond_ratio=1,
        seqcond_heads=4,
        num_query_heads=2,
        num_thetas=2,
        qk_norm=True,
    ),
    # The original's presets (seqcond/config.py, §1.4) with expand 2, out_expand 3, QK-norm. Its small and
    # medium presets fail their own K % K_q check (32 % 6, 15 % 6): here num_query_heads is 8 and 5.
    "small": dict(
        d_model=768,
        d_ff=2048,
        n_layers=12,
        n_heads=12,
        num_kv_heads=4,
        seqcond_heads=32,
        num_query_heads=8,
        num_thetas=2,
        seqcond_ratio=5,
        qk_norm=True,
    ),  # fmt: skip
    "medium": dict(
        d_model=960,
        d_ff=2560,
        n_layers=32,
        n_heads=15,
        num_kv_heads=5,
        seqcond_heads=15,
        num_query_heads=5,
        num_thetas=2,
        seqcond_ratio=7,
        qk_norm=True,
    ),  # fmt: skip
    # 371.9M: the logged count of the original's "seqcond_lin5" checkpoint (+1024 for the final norm).
    "large": dict(
        d_model=1024,
        d_ff=2730,
        n_layers=24,
        n_heads=16,
        num_kv_heads=4,
        seqcond_heads=16,
        num_query_heads=16,
        num_thetas=2,
        seqcond_ratio=2,
        qk_norm=True,
    ),  # fmt: skip
    # 1.26B: the width the original reaches by duplicating large's heads.
    "xlarge": dict(
        d_model=2048,
        d_ff=5460,
        n_layers=24,
        n_heads=32,
        num_kv_heads=8,
        seqcond_heads=32,
        num_query_heads=32,
        num_thetas=2,
        seqcond_ratio=2,
        qk_norm=True,
    ),  # fmt: skip
}
