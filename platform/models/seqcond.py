"""SeqCond, the Sequence Condenser hybrid (docs/architectures.md; seed 000).

A stack of pre-norm residual blocks: most are sequence condensers (condenser.py, no
feed-forward), and every (seqcond_ratio + 1)-th is a Transformer block with RoPE attention (GQA, optional
parameter-free QK-norm) and a gated feed-forward layer (§1.2). Tied embeddings initialised with std
1/sqrt(d_model) and an optional final RMSNorm (on by default) replace the original's N(0, 1) embedding.
"""

from __future__ import annotations

import dataclasses
import warnings

from torch import Tensor, nn

from .condenser import CondenserState, SequenceCondenser
from .layers.attention import CausalSelfAttention, KVState
from .layers.feed_forward import SwiGLU
from .layers.norm import RMSNorm
from .output import ModelOutput, ModelState
from .seqcond_config import SeqCondConfig

__all__ = ["SIZES", "SeqCond", "SeqCondConfig", "SeqCondState"]


@dataclasses.dataclass(frozen=True)
class SeqCondState(ModelState):
    """Per block the condenser's fixed-size state or the attention's keys and values.

    Condenser states count positions per row and can batch rows at different positions; the model's
    position is one number because its attention states hold one length for every row.
    """

    layers: list[CondenserState | KVState]  # per block: condenser state (O(1) in length) or keys/values (B, H, M, Dh)
    position: int  # absolute position of the next token, shared by the rows (the KV states have one length)

    def reset_rows(self, reset: Tensor) -> SeqCondState:
        """Rows where `reset` (B,) is True start a new stream: their condenser states start over and their
        cached keys are hidden (RoPE scores depend only on distances, so the shared position is harmless)."""
        return SeqCondState([layer.reset_rows(reset) for layer in self.layers], self.position)


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
            config.n_kv_heads,
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

    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        """None: SeqCond has no mixture-of-experts stage (the contract asks every model)."""
        return []

    def output_head(self, h: Tensor) -> Tensor:
        """Final hidden states (..., D) -> logits (..., V): the head, or the embedding when tied."""
        return self.lm_head(h) if self.lm_head is not None else h @ self.embed.weight.T

    def forward(
        self,
        input_ids: Tensor,
        state: SeqCondState | None = None,
        *,
        return_hidden: bool = False,
        return_logits: bool = True,
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
        logits = self.output_head(h) if return_logits else None  # (B, T, V)
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
        n_kv_heads=2,
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
        n_kv_heads=4,
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
        n_kv_heads=5,
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
        n_kv_heads=4,
        seqcond_heads=16,
        num_query_heads=16,
        num_thetas=2,
        seqcond_ratio=2,
        qk_norm=True,
    ),  # fmt: skip
    # 1.26B: the width the original reaches by duplicating large's heads. Named `xl`, the size vocabulary
    # every family shares (debug, tiny, small, medium, large, xl, xxl); the original called it xlarge.
    "xl": dict(
        d_model=2048,
        d_ff=5460,
        n_layers=24,
        n_heads=32,
        n_kv_heads=8,
        seqcond_heads=32,
        num_query_heads=32,
        num_thetas=2,
        seqcond_ratio=2,
        qk_norm=True,
    ),  # fmt: skip
}
