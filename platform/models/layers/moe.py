"""Mixture of experts: top-k routing over low-rank feed-forward experts (docs/architectures.md).

Shared by any family that wants a sparse feed-forward stage; SerriformNet uses it when `use_moe`.
Where many axes meet, variables carry their shape as a suffix (torchtitan's habit): T tokens (batch
and time flattened), D model width, R expert width, E experts, K experts per token, N = T * K routed
slots, n the slots of one expert.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import exclude_from_weight_decay
from .feed_forward import ACTIVATIONS


class Routing(NamedTuple):
    weights_TK: Tensor  # (T, K) renormalised over the K chosen experts: each row sums to 1
    experts_TK: Tensor  # (T, K) int64 indices of the chosen experts, most probable first
    probs_TE: Tensor  # (T, E) softmax over all experts (fp32 or wider), noise included in training


def load_balance_loss(probs_TE: Tensor, counts_E: Tensor) -> Tensor:
    """E * sum_e f_e * P_e (Switch Transformer eq. 4; GShard): f_e is the share of the routed slots
    that went to expert e (no gradient), P_e the mean router probability of e. Equals 1 when routing
    is uniform (f = P = 1/E) and grows as load concentrates on fewer experts."""
    n_experts = probs_TE.shape[-1]
    f_E = counts_E.to(probs_TE.dtype) / counts_E.sum()
    P_E = probs_TE.mean(dim=0)
    return n_experts * (f_E * P_E).sum()


def router_entropy_loss(probs_TE: Tensor) -> Tensor:
    """log E - H(P) with P the batch-mean routing distribution: how far the batch as a whole is from
    using every expert equally. 0 at uniform use, log E when every token prefers one expert, so a
    positive weight in the training loss raises the entropy of expert use (it does not make the
    per-token choice sharper or flatter)."""
    P_E = probs_TE.mean(dim=0)
    entropy = -torch.special.xlogy(P_E, P_E).sum()  # xlogy: 0 * log 0 = 0 for an unused expert
    return math.log(probs_TE.shape[-1]) - entropy


def _in_backward() -> bool:
    """True while autograd runs a backward pass, where activation checkpointing recomputes forwards
    (torch's own FSDP2 and ModuleTracker tell the backward pass apart the same way). Always False in a
    graph torch.compile traces: its recomputation lives in the compiled backward, which does not replay the
    forward's counter update."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """y = sum over the K chosen experts of w_e(x) * expert_e(x), each expert a low-rank FF D -> R -> D.

    Routing: logits = W_r x, plus N(0, router_noise^2) noise in training mode only; probabilities are
    the softmax over all E experts; the K most probable experts are chosen and their probabilities
    renormalised to sum to 1 (the same as a softmax over the K chosen logits). Dropless: no capacity
    limit. With K = 1 the weight is always 1, so the router learns only through the aux losses.

    `forward` returns the output and two unweighted aux losses, "moe_balance" (`load_balance_loss`)
    and "router_entropy" (`router_entropy_loss`), over every token of the call.

    Monitoring: `tokens_per_expert` (E,) float32 counts the routed slots each expert received (K per
    token). It advances only in training mode (eval, validation and generation never move it), and only
    in the forward pass: activation checkpointing re-runs forwards during backward (reentrant or not),
    and a re-run does not count again. It is not saved in checkpoints, counts this process's tokens only
    (sum across ranks for a global view), and `reset_counters()` zeroes it; a monitoring callback reads
    and resets it once per logging interval.
    """

    def __init__(
        self,
        d_model: int,
        rank: int,
        n_experts: int,
        top_k: int,
        *,
        router_noise: float = 0.0,
        activation: str = "gelu",
        out_std: float = 0.02,
    ):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation='{activation}' is unknown; choose one of: {', '.join(ACTIVATIONS)}")
        self.n_experts, self.top_k, self.router_noise = n_experts, top_k, router_noise
        self.activation, self.out_std = activation, out_std
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.down_weight = nn.Parameter(torch.empty(n_experts, d_model, rank))  # (E, D, R)
        self.down_bias = nn.Parameter(torch.empty(n_experts, rank))  # (E, R)
        self.up_weight = nn.Parameter(torch.empty(n_experts, rank, d_model))  # (E, R, D)
        self.up_bias = nn.Parameter(torch.empty(n_experts, d_model))  # (E, D)
        exclude_from_weight_decay(self.router.bias, self.down_bias, self.up_bias)  # one row per expert, still biases
        self.register_buffer("tokens_per_expert", torch.zeros(n_experts, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Router N(0, 0.02^2): near-uniform routing at the start. Experts as `LowRankFF`."""
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.normal_(self.down_weight, std=self.down_weight.shape[1] ** -0.5)
        nn.init.normal_(self.up_weight, std=self.out_std)
        nn.init.zeros_(self.down_bias)
        nn.init.zeros_(self.up_bias)
        self.reset_counters()

    def reset_counters(self) -> None:
        with torch.no_grad():
            self.tokens_per_expert.zero_()

    def route(self, x_TD: Tensor) -> Routing:
        logits_TE = self.router(x_TD)
        if self.training and self.router_noise > 0:
            logits_TE = logits_TE + self.router_noise * torch.randn_like(logits_TE)
        probs_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)).softmax(dim=-1)
        top_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        return Routing(top_TK / top_TK.sum(dim=-1, keepdim=True), experts_TK, probs_TE)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """x (..., D) -> y (..., D), {"moe_balance": scalar, "router_entropy": scalar}."""
        x_TD = x.reshape(-1, x.shape[-1])  # (T, D): batch and time flattened
        routing = self.route(x_TD)
        counts_E = F.one_hot(routing.experts_TK.flatten(), self.n_experts).sum(dim=0)  # (E,): a fixed shape
        if torch.compiler.is_compiling():  # group sizes depend on the routing, which a compiled graph cannot
            y_TD = self._run_every_expert(x_TD, routing)
        else:
            y_TD = self._run_experts(x_TD, routing, counts_E)
        if self.training and not _in_backward():
            with torch.no_grad():
                self.tokens_per_expert += counts_E
        aux = {
            "moe_balance": load_balance_loss(routing.probs_TE, counts_E),
            "router_entropy": router_entropy_loss(routing.probs_TE),
        }
        return y_TD.view_as(x), aux

    def _run_experts(self, x_TD: Tensor, routing: Routing, counts_E: Tensor) -> Tensor:
        """Group the routed slots by expert, run each expert once on its group, add back weighted."""
        experts_N = routing.experts_TK.flatten()  # (N,)
        order_N = experts_N.argsort(stable=True)  # slots sorted by expert
        token_N = order_N // self.top_k  # the token each sorted slot belongs to
        x_ND = x_TD[token_N]  # (N, D): expert 0's tokens first, then expert 1's, ...
        activation = ACTIVATIONS[self.activation]
        outputs = []
        for e, x_nD in enumerate(x_ND.split(counts_E.tolist())):  # a loop over experts, not tokens
            h_nR = activation(x_nD @ self.down_weight[e] + self.down_bias[e])  # (n, R)
            outputs.append(h_nR @ self.up_weight[e] + self.up_bias[e])  # (n, D)
        out_ND = torch.cat(outputs)  # (N, D)
        weighted_ND = out_ND * routing.weights_TK.flatten()[order_N].unsqueeze(-1).to(out_ND.dtype)
        # accumulate in the experts' dtype (under autocast it can differ from x's), return in x's
        y_TD = out_ND.new_zeros(x_TD.shape).index_add(0, token_N, weighted_ND)  # (T, D)
        return y_TD.to(x_TD.dtype)

    def _run_every_expert(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """The same sum as `_run_experts` with shapes that do not depend on the routing (for torch.compile):
        every expert runs on every token and a token's unrouted experts weigh 0, at n_experts / top_k times
        the experts' arithmetic."""
        weights_TE = torch.zeros_like(routing.probs_TE).scatter(1, routing.experts_TK, routing.weights_TK)  # (T, E)
        activation = ACTIVATIONS[self.activation]
        h_ETR = activation(torch.einsum("td,edr->etr", x_TD, self.down_weight) + self.down_bias[:, None])
        out_ETD = torch.einsum("etr,erd->etd", h_ETR, self.up_weight) + self.up_bias[:, None]  # (E, T, D)
        return torch.einsum("etd,te->td", out_ETD, weights_TE.to(out_ETD.dtype)).to(x_TD.dtype)

    def extra_repr(self) -> str:
        d_model, rank = self.down_weight.shape[1:]
        return f"d_model={d_model}, rank={rank}, n_experts={self.n_experts}, top_k={self.top_k}"
