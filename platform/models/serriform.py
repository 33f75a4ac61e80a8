"""SerriformNet: dilated causal convolutions, a sparse linear recurrence and gates, no attention.

The seed README's *sequential* block (docs/architectures.md, which overrides the drifted public code
described in §4): every block is x + FF(GatedFusion(SparseRecurrence(Conv(RMSNorm(x))))), each stage
switchable. No absolute position enters by default (`positions="none"`): the causal conv and the recurrence
alone give order, the same at every position, so the model meets nothing new past its trained length. The
original's rotary rotation of the token embeddings (`positions="rotary"`) remains an option. The state per
layer is a conv tail and a recurrent vector, plus one position (and, once a row is reset, where each row's
stream began), so decoding costs O(1) per token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import exclude_from_weight_decay
from .layers.feed_forward import ACTIVATIONS, LowRankFF
from .layers.moe import MoE
from .layers.norm import RMSNorm
from .layers.rope import apply_rotary, rotary_angles
from .layers.scan import check_scan_kernel, scan
from .output import ModelOutput, ModelState, zero_rows
from .seed_names import rename

# Keys of the original's arch_config and CLI that set training, not the model; the error says where they went.
_TRAINING_KEYS = {
    "entropy_weight": "the weight of the 'router_entropy' aux loss",
    "load_balancing": "the weight of the 'moe_balance' aux loss (0 turns balancing off)",
    "load_balancing_weight": "the weight of the 'moe_balance' aux loss",
}

# The absolute position signals a SerriformNet can take (SerriformConfig.positions).
POSITIONS = ("none", "rotary")


@dataclasses.dataclass
class SerriformConfig:
    """SerriformNet's settings, named as in the other families; `from_seed_names` accepts the original's
    arch_config dict and CLI names.

    Its `entropy_weight` and load-balancing weight are not here: they are training settings (the
    weights of the unweighted "moe_balance" and "router_entropy" aux losses, each a mean over MoE layers).
    """

    vocab_size: int = 50257
    """Number of token ids (GPT-2's tokenizer by default)."""
    d_model: int = 512
    """Width of the residual stream; even, since the rotary gate rotates channel pairs."""
    n_layers: int = 12
    """Number of Serriform blocks."""
    dropout: float = 0.1
    """Dropout on the embeddings and on each block's update, in training only."""
    positions: str = "none"
    """Absolute position signal: "none" adds none (the causal conv and the recurrence give order alone, the
    same at any length); "rotary" rotates the token embeddings by their position, the original's gate, which
    past the trained length meets angles it never saw (docs/architectures.md measures both by length).
    Checkpoints and exports from before this field load as "rotary"."""
    rope_base: float = 10000.0
    """Base of the rotary gate on the embeddings (the original passed max_seq_len here by mistake); unused
    with positions="none"."""
    use_conv: bool = True
    """Causal depthwise-separable dilated convolution stage."""
    use_recurrence: bool = True
    """Sparse linear recurrence stage on the first d_model // memory_dim_factor channels."""
    use_moe: bool = True
    """Feed-forward stage as a mixture of low-rank experts (takes precedence over use_lowrank_ff)."""
    use_lowrank_ff: bool = True
    """Dense low-rank feed-forward stage; used only when use_moe is False."""
    conv_kernel_size: int = 3
    """Taps of the depthwise convolution."""
    conv_dilation_growth: float = 2.0
    """Layer i dilates by int(growth ** (i % 3)): 2 gives 1, 2, 4, 1, 2, 4, ...; 2.5 gives 1, 2, 6, ..."""
    memory_dim_factor: int = 4
    """The recurrence runs on the first d_model // memory_dim_factor channels; the rest pass through."""
    ff_reduction_factor: int = 4
    """Low-rank feed-forward (and expert) width is d_model // ff_reduction_factor."""
    num_experts: int = 4
    """Experts per MoE stage."""
    top_k_experts: int = 2
    """Experts each token is routed to."""
    router_noise: float = 0.01
    """Std of the Gaussian noise added to router logits in training (exploration); 0 turns it off."""
    activation: str = "silu"
    """Activation after the pointwise convolution: silu, gelu or relu (the feed-forward stages use GELU)."""
    scan_kernel: str = "auto"
    """How the recurrence is computed: "auto" (fused Triton kernels on CUDA when Triton is installed and the
    kernels pass a first check on the device, else PyTorch's chunked scan), "torch" (always the chunked scan)
    or "triton" (the kernels, an error without them). The same function either way, equal to fp32 rounding."""

    def __post_init__(self) -> None:
        if self.d_model < 2 or self.d_model % 2:
            raise ValueError(
                f"model.d_model={self.d_model} must be even: the rotary gate rotates channel pairs; pick an even width"
            )
        for key in ("vocab_size", "n_layers", "conv_kernel_size", "num_experts"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be at least 1")
        for key in ("memory_dim_factor", "ff_reduction_factor"):
            if not 1 <= getattr(self, key) <= self.d_model:
                raise ValueError(
                    f"model.{key}={getattr(self, key)} must be between 1 and model.d_model={self.d_model} "
                    "so that its stage keeps at least one channel"
                )
        if not 1 <= self.top_k_experts <= self.num_experts:
            raise ValueError(
                f"model.top_k_experts={self.top_k_experts} must be between 1 and model.num_experts={self.num_experts}"
            )
        if self.conv_dilation_growth < 1:
            raise ValueError(
                f"model.conv_dilation_growth={self.conv_dilation_growth} must be >= 1 (1 turns dilation off)"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"model.positions='{self.positions}' is unknown; choose one of: {', '.join(POSITIONS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation='{self.activation}' is unknown; choose one of: {', '.join(ACTIVATIONS)}"
            )
        check_scan_kernel(self.scan_kernel)
        if self.router_noise < 0:
            raise ValueError(f"model.router_noise={self.router_noise} must be >= 0 (0 turns router noise off)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")

    @property
    def memory_dim(self) -> int:
        return self.d_model // self.memory_dim_factor

    @property
    def ff_rank(self) -> int:
        return self.d_model // self.ff_reduction_factor

    @property
    def dilations(self) -> list[int]:
        """Per-layer conv dilation: a period of three layers, so the receptive field grows in saw teeth."""
        return [int(self.conv_dilation_growth ** (layer % 3)) for layer in range(self.n_layers)]


# The original's names (docs/architectures.md: its arch_config keys and train.py flags) for fields named as in
# the other families here. `from_seed_names` accepts them, and the arch_config dict itself.
SEED_NAMES = {
    "top_k": "top_k_experts",
    "dim": "d_model",
    "num_layers": "n_layers",
    "dilation_growth": "conv_dilation_growth",
}


def from_seed_names(overrides: dict[str, Any]) -> dict[str, Any]:
    """SerriformConfig fields from overrides that may use the original's names: `arch_config` (its partial dict,
    whose keys override the size's fields) and the names of SEED_NAMES, there or beside it. A field given twice
    (under two names, or both in and beside arch_config) is an error naming both; so are unknown arch_config keys
    and the original's training settings (entropy_weight, load_balancing, load_balancing_weight)."""
    overrides = dict(overrides)
    arch_config = dict(overrides.pop("arch_config", None) or {})
    for key in (*arch_config, *overrides):
        if key in _TRAINING_KEYS:
            where = "model.arch_config key" if key in arch_config else "model.model_config key"
            raise ValueError(
                f"{where} '{key}' is a training setting; set {_TRAINING_KEYS[key]} in the training config instead"
            )
    fields = {f.name for f in dataclasses.fields(SerriformConfig)}
    for key in arch_config:
        if SEED_NAMES.get(key, key) not in fields:
            valid = ", ".join(sorted(fields | set(SEED_NAMES)))
            raise ValueError(f"model.arch_config has unknown key '{key}'; valid keys: {valid}")
    direct = rename(overrides, SEED_NAMES, "serriform")
    nested = rename(arch_config, SEED_NAMES, "serriform")
    for name in sorted(nested.keys() & direct.keys()):
        inner = next(k for k in arch_config if SEED_NAMES.get(k, k) == name)
        given = next(k for k in overrides if SEED_NAMES.get(k, k) == name)
        raise ValueError(
            f"serriform config field '{name}' is given twice, as 'arch_config.{inner}' and as '{given}'; give it once"
        )
    return {**direct, **nested}


@dataclasses.dataclass(frozen=True)
class SerriformLayerState(ModelState):
    conv_tail: Tensor | None  # (B, (k-1)*dilation, D) the newest conv inputs; None without the conv stage
    recurrent: Tensor | None  # (B, memory_dim) h of the last token, fp32; None without the recurrence stage

    def reset_rows(self, reset: Tensor) -> SerriformLayerState:
        """Rows where `reset` (B,) is True start over: zero conv inputs and h = 0, as a fresh call."""
        return self.map_tensors(lambda t: zero_rows(t, reset))


@dataclasses.dataclass(frozen=True)
class SerriformState(ModelState):
    layers: list[SerriformLayerState]  # one per block
    position: int  # absolute position of the next token, counted from the first call
    stream_start: Tensor | None = None  # (B,) int64: position where each row's stream began; None: 0 for all

    def reset_rows(self, reset: Tensor) -> SerriformState:
        """Rows where `reset` (B,) is True start a new stream here: empty layer states, and their rotary gate
        (positions="rotary") counts from 0 again (it rotates by absolute position, so this row offset is needed)."""
        start = self.stream_start if self.stream_start is not None else reset.new_zeros(reset.shape, dtype=torch.long)
        start = torch.where(reset.to(start.device), self.position, start)  # (B,)
        return SerriformState([layer.reset_rows(reset) for layer in self.layers], self.position, start)


class CausalDilatedConv(nn.Module):
    """Depthwise Conv1d (kernel k, dilation d) over time, then a pointwise D x D mix and the activation.

    Causal by left context only: the input is prefixed with the (k-1)*d previous inputs (zeros at the
    start, the state's tail later), so a chunked call sees exactly what a full call would.
    """

    def __init__(self, d_model: int, kernel_size: int, dilation: int, activation: str):
        super().__init__()
        self.tail_len, self.activation = (kernel_size - 1) * dilation, activation
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, dilation=dilation, groups=d_model)
        self.pointwise = nn.Linear(d_model, d_model)
        exclude_from_weight_decay(self.depthwise.bias, self.pointwise.bias)

    def reset_parameters(self) -> None:
        """N(0, 1/k) taps and N(0, 1/D) mixing keep the signal's variance; biases 0."""
        nn.init.normal_(self.depthwise.weight, std=self.depthwise.kernel_size[0] ** -0.5)
        nn.init.normal_(self.pointwise.weight, std=self.pointwise.in_features**-0.5)
        nn.init.zeros_(self.depthwise.bias)
        nn.init.zeros_(self.pointwise.bias)

    def forward(self, x: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (B, T, D), tail (B, M, D) or None -> y (B, T, D) and the new tail (B, M, D), M = (k-1)*d."""
        if tail is None:
            tail = x.new_zeros(x.shape[0], self.tail_len, x.shape[2])
        x = torch.cat([tail, x], dim=1)  # (B, M + T, D)
        y = self.depthwise(x.transpose(1, 2)).transpose(1, 2)  # (B, T, D): M + T - (k-1)*d outputs
        y = ACTIVATIONS[self.activation](self.pointwise(y))
        return y, x[:, x.shape[1] - self.tail_len :].clone()  # a copy: the state must not pin the whole input


class SparseRecurrence(nn.Module):
    """h_t = alpha * h_{t-1} + beta * x_t on the first `memory_dim` channels; the others pass through.

    alpha = sigmoid(a) in (0, 1) and beta are learned per channel, initialised to 0.9 and 0.1 (the
    original's values): an exponential moving average over ~10 tokens with unit gain on a constant input.
    Solved in fp32 by `linear_scan` or, as `scan_kernel` selects, the fused Triton kernels; both equal the step loop.
    """

    def __init__(self, memory_dim: int, scan_kernel: str = "auto"):
        super().__init__()
        self.scan_kernel = scan_kernel
        self.alpha_logit = nn.Parameter(torch.empty(memory_dim))
        self.beta = nn.Parameter(torch.empty(memory_dim))
        exclude_from_weight_decay(self.alpha_logit, self.beta)  # decay would pull alpha to 0.5 and beta to 0

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha_logit, math.log(0.9 / 0.1))  # sigmoid^-1(0.9)
        nn.init.constant_(self.beta, 0.1)

    def kernel_checks(self) -> list[tuple[str, str, None]]:
        """The Triton op this layer may select (`settle_kernel_checks`): the recurrence, with its own check."""
        return [(self.scan_kernel, "recurrence", None)]

    def forward(self, x: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (B, T, D), h0 (B, m) or None -> y (B, T, D) and the last state (B, m) in fp32."""
        m = self.beta.shape[0]
        h = scan(x[..., :m] * self.beta, F.logsigmoid(self.alpha_logit), h0, kernel=self.scan_kernel)  # (B, T, m)
        y = torch.cat([h.to(x.dtype), x[..., m:]], dim=-1)  # (B, T, D)
        return y, h[:, -1].clone()  # a copy: the state must not pin every step's h


class GatedFusion(nn.Module):
    """y = x + sigmoid(W1 x) * tanh(W2 x): a GLU-style update on top of the mixed signal."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        exclude_from_weight_decay(self.gate.bias, self.value.bias)

    def reset_parameters(self) -> None:
        for linear in (self.gate, self.value):
            nn.init.normal_(linear.weight, std=linear.in_features**-0.5)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.sigmoid(self.gate(x)) * torch.tanh(self.value(x))


class SerriformBlock(nn.Module):
    """x + FF(GatedFusion(SparseRecurrence(Conv(RMSNorm(x))))); a disabled stage is the identity."""

    def __init__(self, config: SerriformConfig, layer: int):
        super().__init__()
        c = config
        self.norm = RMSNorm(c.d_model)
        self.conv = (
            CausalDilatedConv(c.d_model, c.conv_kernel_size, c.dilations[layer], c.activation) if c.use_conv else None
        )
        self.recurrence = SparseRecurrence(c.memory_dim, c.scan_kernel) if c.use_recurrence else None
        self.fusion = GatedFusion(c.d_model)
        self.moe = (
            MoE(c.d_model, c.ff_rank, c.num_experts, c.top_k_experts, router_noise=c.router_noise)
            if c.use_moe
            else None
        )
        self.feed_forward = LowRankFF(c.d_model, c.ff_rank) if c.use_lowrank_ff and not c.use_moe else None
        self.dropout = nn.Dropout(c.dropout)

    def forward(
        self, x: Tensor, state: SerriformLayerState | None
    ) -> tuple[Tensor, SerriformLayerState, dict[str, Tensor]]:
        y = self.norm(x)
        tail = recurrent = None
        if self.conv is not None:
            y, tail = self.conv(y, None if state is None else state.conv_tail)
        if self.recurrence is not None:
            y, recurrent = self.recurrence(y, None if state is None else state.recurrent)
        y = self.fusion(y)
        aux = {}
        if self.moe is not None:
            y, aux = self.moe(y)
        elif self.feed_forward is not None:
            y = self.feed_forward(y)
        return x + self.dropout(y), SerriformLayerState(tail, recurrent), aux


class SerriformNet(nn.Module):
    """Token embedding (rotated by position if positions="rotary"), Serriform blocks, a final RMSNorm and an
    untied output head.

    The head is untied, as in the original's code: tying would save vocab_size * d_model parameters
    (25.7M of the default size) but couples the rotated input embedding to the output.
    """

    def __init__(self, config: SerriformConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SerriformBlock(config, layer) for layer in range(config.n_layers))
        self.norm = RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)
        exclude_from_weight_decay(self.lm_head.bias)
        self.init_weights()

    def init_weights(self) -> None:
        """Embedding and head N(0, 0.02^2), head bias 0; each stage's own init (see its reset_parameters);
        MoE counters zeroed. Also used after a sharded strategy materialises a meta-device model.

        The original zero-initialised the head (uniform predictions at the start), which leaves every
        weight below it without gradient on the first step; a small random head avoids that."""
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
        stages = (RMSNorm, CausalDilatedConv, SparseRecurrence, GatedFusion, MoE, LowRankFF)
        for module in self.modules():
            if isinstance(module, stages):
                module.reset_parameters()

    def moe_layers(self) -> list[tuple[str, MoE]]:
        """(name, layer) for every MoE stage, e.g. ("blocks.3.moe", MoE); read `layer.tokens_per_expert`."""
        return [(name, module) for name, module in self.named_modules() if isinstance(module, MoE)]

    def output_head(self, h: Tensor) -> Tensor:
        """Final hidden states (..., D) -> logits (..., V)."""
        return self.lm_head(h)

    def forward(
        self,
        input_ids: Tensor,
        state: SerriformState | None = None,
        *,
        return_hidden: bool = False,
        return_logits: bool = True,
    ) -> ModelOutput:
        """input_ids (B, T) -> logits (B, T, V); `state` continues a sequence from its last call."""
        offset = 0 if state is None else state.position
        h = self.embed(input_ids)  # (B, T, D)
        if self.config.positions == "rotary":
            positions = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)  # (T,)
            if state is not None and state.stream_start is not None:
                positions = positions - state.stream_start.to(positions.device)[:, None]  # (B, T): from row start
            # the "multiplicative RoPE gate": channel pairs (d, d + D/2) rotated by position * base^(-2d/D), with
            # angles in the wider of fp32 and the model's dtype (a float64 model rotates in float64)
            angles_dtype = torch.promote_types(h.dtype, torch.float32)
            angles = rotary_angles(positions, self.config.d_model, self.config.rope_base, dtype=angles_dtype)
            h = apply_rotary(h, *angles)
        h = self.dropout(h)  # (B, T, D)
        layers, aux = [], []
        for i, block in enumerate(self.blocks):
            h, layer_state, block_aux = block(h, None if state is None else state.layers[i])
            layers.append(layer_state)
            aux.append(block_aux)
        h = self.norm(h)
        # mean over layers, so an aux-loss weight means the same at any depth
        aux_losses = {name: torch.stack([a[name] for a in aux]).mean() for name in aux[0]}
        new_state = SerriformState(layers, offset + input_ids.shape[1], None if state is None else state.stream_start)
        logits = self.output_head(h) if return_logits else None  # (B, T, V)
        return ModelOutput(logits, new_state, aux_losses, h if return_hidden else None)


SIZES: dict[str, dict] = {
    # Trains in seconds on a CPU: the default job and the tests. Three layers give dilations 1, 2, 4.
    "debug": dict(vocab_size=512, d_model=64, n_layers=3, dropout=0.0),
    # The seed's defaults (V 50257, D 512, 12 layers, 4 experts of rank 128): 67,350,097 parameters,
    # 25.7M embedding + 25.8M head + 12 x 1.32M blocks (the original's parallel-branch code had 79.2M; it called
    # this size `default`). Named `tiny`, the shared size vocabulary's smallest size after `debug`: 67M is below
    # LSWT tiny (153M) and SeqCond small (133M), far below LSWT small (343M), and far above any `debug`.
    "tiny": dict(),
}
