"""SeqCondConfig: the SeqCond hyper-parameters (docs/architectures.md), read by the model (seqcond.py) and by
its condenser layer (condenser.py), so neither imports the other for it."""

from __future__ import annotations

import dataclasses
from typing import Any

from .layers.scan import check_scan_kernel
from .layers.self_extend import SelfExtendConfig, as_self_extend_config
from .seed_names import rename

# The seed README's factory names (and G3's num_kv_heads) for fields named as in the other families;
# `from_seed_names` accepts them, the dataclass has only the field names.
SEED_NAMES = {"num_layers": "n_layers", "num_heads": "n_heads", "maxlen": "max_seq_len", "num_kv_heads": "n_kv_heads"}


def from_seed_names(overrides: dict[str, Any]) -> dict[str, Any]:
    """SeqCondConfig fields from overrides that may use the seed's names (num_layers, num_heads, maxlen,
    num_kv_heads); a field given under both names is an error naming both."""
    return rename(overrides, SEED_NAMES, "seqcond")


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
    n_kv_heads: int | None = None
    """Key/value heads of the attention (GQA); None uses n_heads (seed name: num_kv_heads)."""
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
    scan_kernel: str = "auto"
    """How the condensers' decayed sums are computed: "auto" (fused Triton kernels on CUDA when Triton is
    installed and the kernels pass a first check on the device, else the chunked PyTorch scan), "torch"
    (always PyTorch) or "triton" (the kernels, an error without them). The kernels ignore chunk_size and
    use_square_matrix; the sums agree to fp32 rounding."""
    use_final_norm: bool = True
    """RMSNorm before the LM head (the original has none; it keeps initial logits near unit scale)."""
    tie_weights: bool = True
    """Use the token embedding as the LM head."""
    dropout: float = 0.0
    """Dropout on each residual branch during training."""
    self_extend: SelfExtendConfig | None = None
    """SelfExtend in the Transformer blocks' attention ({group_size, window_size, ...}); None: plain RoPE."""

    def __post_init__(self) -> None:
        self.self_extend = as_self_extend_config(self.self_extend)
        for name in ("vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "max_seq_len", "num_thetas"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        for name in ("conv_kernel_size", "chunk_size", "out_expand_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        check_scan_kernel(self.scan_kernel)
        if self.seqcond_ratio < 0:
            raise ValueError(f"model.seqcond_ratio={self.seqcond_ratio} must be >= 0 (0 makes every block attention)")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads} into an even "
                "head_dim (RoPE rotates pairs); pick n_heads so that d_model // n_heads is even"
            )
        kv_heads = self.n_kv_heads or self.n_heads
        if kv_heads < 1 or self.n_heads % kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={kv_heads}; "
                "pick n_kv_heads from the divisors of n_heads"
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
