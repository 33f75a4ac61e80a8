"""RMSNorm, computed in at least fp32 and cast back, so a bf16 model normalises with full precision
(and a float64 model in float64, so reference checks are not limited by the norm), and LayerNorm. Both
flag their scale and shift to stay out of weight decay."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import exclude_from_weight_decay


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight (Zhang & Sennrich 2019); no mean subtraction and no bias."""

    def __init__(self, dim: int, eps: float = 1e-6, *, elementwise_affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        exclude_from_weight_decay(self.weight)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        return F.rms_norm(x.to(dtype), (self.dim,), weight, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm with its weight and bias out of weight decay (decay would pull the scale to 0)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, elementwise_affine: bool = True, bias: bool = True):
        super().__init__(dim, eps, elementwise_affine=elementwise_affine, bias=bias)
        exclude_from_weight_decay(self.weight, self.bias)
