"""SophiaG (Liu et al. 2023, "Sophia: a scalable stochastic second-order optimizer"), with its Hessian refresh.

The original LSWT trainer never refreshed Sophia's Hessian, which left it a sign-momentum method
(docs/architectures.md). Here the refresh is part of training: every `hessian_interval` optimizer
steps, LanguageModelModule calls `gauss_newton_bartlett` on the logits of that step's first
micro-batch and hands the estimate to `SophiaG.update_hessian`. The estimate reuses the step's
forward and takes its gradient with `torch.autograd.grad`, so the accumulated `.grad` of the real
step is never touched and DDP's gradient hooks do not fire (the estimate is all-reduced here instead).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer


class SophiaG(Optimizer):
    """m <- b1 m + (1 - b1) g;  p <- p (1 - lr wd) - lr sign(m) min(|m| / (rho h + eps), 1).

    h is an EMA (b2) of the Gauss-Newton-Bartlett estimate N * g_hat^2 (see `gauss_newton_bartlett`),
    refreshed from outside every `hessian_interval` steps; N is folded into the estimate, so `rho` is
    the paper's rho (the reference code multiplies h by the batch size in tokens in the step instead).
    Every coordinate moves by at most lr per step (plus weight decay): the clip.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
        hessian_interval: int = 10,
    ):
        """
        Args:
            params: Parameters or parameter groups.
            lr: Learning rate: the largest step of any coordinate.
            betas: EMA factors of the momentum and of the Hessian estimate.
            rho: Clipping threshold: a coordinate moves by lr once |m| >= rho * h.
            weight_decay: Decoupled weight decay (p <- p (1 - lr wd)).
            eps: Keeps the ratio finite where h is 0.
            hessian_interval: Optimizer steps between Hessian refreshes (k in the paper).
        """
        if lr < 0 or rho <= 0 or eps <= 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"SophiaG needs lr >= 0, rho > 0, eps > 0, weight_decay >= 0 and betas in [0, 1); got lr={lr}, "
                f"rho={rho}, eps={eps}, weight_decay={weight_decay}, betas={betas}"
            )
        if hessian_interval < 1:
            raise ValueError(f"SophiaG hessian_interval={hessian_interval} must be >= 1 (optimizer steps)")
        self.hessian_interval = hessian_interval
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps))

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self, estimates: list[Tensor | None]) -> None:
        """h <- b2 h + (1 - b2) estimate, for every parameter in group order; None skips one."""
        params = [p for group in self.param_groups for p in group["params"]]
        if len(estimates) != len(params):
            raise ValueError(f"update_hessian got {len(estimates)} estimates for {len(params)} parameters")
        i = 0
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if estimates[i] is not None:
                    self._state(p)["hessian"].mul_(beta2).add_(estimates[i].to(p.dtype), alpha=1 - beta2)
                i += 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1 = group["betas"][0]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                m, h = state["exp_avg"], state["hessian"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                ratio = (m.abs() / (group["rho"] * h + group["eps"])).clamp_(max=1.0)
                p.addcmul_(m.sign(), ratio, value=-group["lr"])
        return loss


def gauss_newton_bartlett(
    logits: Tensor, mask: Tensor, params: list[nn.Parameter], generator: torch.Generator | None = None
) -> list[Tensor | None]:
    """The Gauss-Newton-Bartlett estimate of the Hessian diagonal (Sophia, Algorithm 2), per parameter.

    Labels y_hat are sampled from the model's own softmax at the positions where `mask` (B, T) is True;
    with G the gradient of the summed cross-entropy against y_hat over all ranks and N the number of
    sampled tokens over all ranks, the estimate is N * (G / N)^2 = G^2 / N. `logits` (B, T, V) must
    still hold its graph (it is kept for the real backward); parameters that do not reach the logits
    get None.
    """
    with torch.no_grad():
        probs = logits.detach().float().flatten(0, 1).softmax(dim=-1)  # (B*T, V)
        labels = torch.multinomial(probs, 1, generator=generator).view(mask.shape)  # (B, T)
    labels = labels.masked_fill(~mask, -100)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    n_tokens = mask.sum().to(torch.float32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        present = [g for g in grads if g is not None]
        flat = torch.cat([g.reshape(-1).float() for g in present] + [n_tokens.reshape(1)])  # one all-reduce
        torch.distributed.all_reduce(flat)
        n_tokens, offset, reduced = flat[-1], 0, []
        for g in present:
            reduced.append(flat[offset : offset + g.numel()].view_as(g).to(g.dtype))
            offset += g.numel()
        it = iter(reduced)
        grads = [None if g is None else next(it) for g in grads]
    return [None if g is None else g.float().square() / n_tokens.clamp(min=1) for g in grads]
