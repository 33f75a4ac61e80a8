"""RMSNorm, computed in at least fp32 and cast back, so a bf16 model normalises with full precision
(and a float64 model in float64, so reference checks are not limited by the norm), its gated form
`gated_rms_norm` (SeqCond's condenser), and LayerNorm. Both flag their scale and shift to stay out of
weight decay."""

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


def gated_rms_norm(x: Tensor, gate: Tensor, norm: RMSNorm) -> Tensor:
    """norm(x * silu(gate)) in at least fp32, x and gate (..., C): a gated RMSNorm that keeps only x and
    gate for backward (with each row's 1/rms), where autograd through the plain expression also keeps
    silu(gate) and the product; backward recomputes them (elementwise passes, no matrix product)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, gate.dtype), torch.float32)
    return _GatedRMSNorm.apply(x, gate, norm.weight, norm.eps, dtype)


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, eps, dtype):
        p = x.to(dtype) * F.silu(gate.to(dtype))  # (..., C)
        rstd = torch.rsqrt(p.square().mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, gate, weight, rstd)
        ctx.dtype = dtype
        y = p.mul_(rstd)
        return y if weight is None else y.mul_(weight.to(dtype))

    @staticmethod
    def backward(ctx, dy):
        x, gate, weight, rstd = ctx.saved_tensors
        g = gate.to(ctx.dtype)
        sig = torch.sigmoid(g)
        silu = g * sig
        n = x.to(ctx.dtype) * silu * rstd  # (..., C): the normalised product
        dn = dy.to(ctx.dtype) if weight is None else dy.to(ctx.dtype) * weight.to(ctx.dtype)
        d_weight = None if weight is None else (dy.to(ctx.dtype) * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        dp = (dn - n * (dn * n).mean(-1, keepdim=True)).mul_(rstd)  # through the 1/rms of the row
        d_x = (dp * silu).to(x.dtype)
        d_silu = sig * (1 + g * (1 - sig))  # d silu(g) / dg
        d_gate = (dp * x.to(ctx.dtype) * d_silu).to(gate.dtype)
        return d_x, d_gate, d_weight, None, None


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm with its weight and bias out of weight decay (decay would pull the scale to 0)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, elementwise_affine: bool = True, bias: bool = True):
        super().__init__(dim, eps, elementwise_affine=elementwise_affine, bias=bias)
        exclude_from_weight_decay(self.weight, self.bias)
