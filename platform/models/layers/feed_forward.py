"""Feed-forward layers shared by the families: SwiGLU and the low-rank bottleneck.

`ACTIVATIONS` is the one table that turns a config's activation name into a function, so every
family validates the same names (and no string is turned into a class by lookup on a module).
"""

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import exclude_from_weight_decay

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class SwiGLU(nn.Module):
    """FFN(x) = W2 (silu(g) * u) with [u, g] = W1 x (Shazeer 2020).

    One fused input projection of width 2 * d_ff; `d_ff` is the width after gating.
    """

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = False):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        exclude_from_weight_decay(self.up.bias, self.down.bias)

    def forward(self, x: Tensor) -> Tensor:
        u, g = self.up(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.down(u * F.silu(g))


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
