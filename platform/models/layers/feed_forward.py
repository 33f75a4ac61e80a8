"""Gated feed-forward layers shared by the families."""

import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    """FFN(x) = W2 (silu(g) * u) with [u, g] = W1 x (Shazeer 2020).

    One fused input projection of width 2 * d_ff; `d_ff` is the width after gating.
    """

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = False):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        u, g = self.up(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.down(u * F.silu(g))
