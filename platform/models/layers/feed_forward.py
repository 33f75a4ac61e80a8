"""Feed-forward layers shared by the families: SwiGLU and the low-rank bottleneck.

`ACTIVATIONS` is the one table that turns a config's activation name into a function, so every
family validates the same names (and no string is turned into a class by lookup on a module).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import exclude_from_weight_decay

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class SwiGLU(nn.Module):
    """FFN(x) = W2 (silu(g) * u) with [u, g] = W1 x (Shazeer 2020).

    One fused input projection of width 2 * d_ff; `d_ff` is the width after gating. The gate and the
    down projection run as one autograd step (`gated_linear`) that keeps only [u, g] for backward.
    """

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = False):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        exclude_from_weight_decay(self.up.bias, self.down.bias)

    def forward(self, x: Tensor) -> Tensor:
        return gated_linear(self.up(x), self.down)  # up: (B, T, 2F) = [u, g]


GATES: dict[str, Callable[[Tensor], Tensor]] = {"silu": F.silu, "sigmoid": torch.sigmoid}


def gated_linear(z: Tensor, linear: nn.Linear, gate: str = "silu") -> Tensor:
    """linear(u * gate(g)) for z = [u, g] (..., 2F): a gated linear unit after its input projection
    (SwiGLU with silu; SeqCond's readout with sigmoid).

    Autograd through the plain expression keeps u and g, gate(g) and the product for backward, 4F numbers
    per token; `_GatedLinear` keeps only z, 2F, and recomputes the elementwise part in backward (a few
    passes over (..., F), no matrix product): a LSWT block saves about a third less for the same FLOPs.
    """
    if hasattr(linear.weight, "ds_id"):  # a DeepSpeed ZeRO-3 partition is gathered only when `linear` runs
        u, g = z.chunk(2, dim=-1)  # (..., F) each
        return linear(u * GATES[gate](g))
    return _GatedLinear.apply(z, linear.weight, linear.bias, gate)


class _GatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias, gate):
        ctx.weight_dtype, ctx.bias_dtype, ctx.gate = weight.dtype, None if bias is None else bias.dtype, gate
        weight = weight.to(z.dtype)  # under autocast z is already in the compute dtype
        u, g = z.chunk(2, dim=-1)  # (..., F) each
        ctx.save_for_backward(z, weight)
        return F.linear(u * GATES[gate](g), weight, None if bias is None else bias.to(z.dtype))

    @staticmethod
    def backward(ctx, dy):
        z, weight = ctx.saved_tensors
        u, g = z.chunk(2, dim=-1)  # (..., F) each
        dz = torch.empty_like(z)  # (..., 2F): filled in place, so few (..., F) temporaries live at once
        d_u, d_g = dz.chunk(2, dim=-1)
        sig = torch.sigmoid(g)
        d_u.copy_(sig)
        if ctx.gate == "silu":
            d_u.mul_(g)  # silu(g), for now
        flat = (-1, dy.shape[-1])
        d_weight = dy.reshape(flat).T @ (u * d_u).reshape(-1, u.shape[-1])  # (D, F)
        dh = dy @ weight  # (..., F)
        d_u.mul_(dh)  # dh * gate(g)
        d_g.copy_(sig).neg_().add_(1)  # 1 - sig
        if ctx.gate == "silu":  # silu'(g) = sig (1 + g (1 - sig)); sigmoid'(g) = sig (1 - sig)
            d_g.mul_(g).add_(1)
        d_g.mul_(sig).mul_(u).mul_(dh)  # dh * u * gate'(g)
        d_bias = None if ctx.bias_dtype is None else dy.reshape(flat).sum(0).to(ctx.bias_dtype)
        return dz, d_weight.to(ctx.weight_dtype), d_bias, None


class LowRankFF(nn.Module):
    """x -> W_up act(W_down x): a bottleneck D -> R -> D with R much smaller than D (SerriformNet, §4).

    Initialisation: W_down ~ N(0, 1/D) keeps the bottleneck at the input's scale; W_up ~ N(0, out_std^2)
    (0.02 by default, as GPT-2's output projections) keeps each block's update small; biases start at 0.
    """

    def __init__(self, d_model: int, rank: int, *, activation: str = "gelu", bias: bool = True, out_std: float = 0.02):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation='{activation}' is unknown; choose one of: {', '.join(ACTIVATIONS)}")
        self.activation, self.out_std = activation, out_std
        self.down = nn.Linear(d_model, rank, bias=bias)
        self.up = nn.Linear(rank, d_model, bias=bias)
        exclude_from_weight_decay(self.down.bias, self.up.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.down.weight, std=self.down.in_features**-0.5)
        nn.init.normal_(self.up.weight, std=self.out_std)
        for bias in (self.down.bias, self.up.bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(ACTIVATIONS[self.activation](self.down(x)))
