"""Loss terms computed by the training module from a model's output."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this many logits (64 MiB in fp32) a batch's head runs in one piece: the memory at stake is small, and
# one pass costs less than several (a byte-level vocabulary's 16 x 256 tokens: 1M logits).
SMALL_LOGITS = 2**24


class HeadLosses(NamedTuple):
    """The output head's cross-entropy over a flattened batch of N target tokens."""

    loss: Tensor  # scalar sum_i w_i * nll_i with the caller's weights w: the one differentiable output
    nll: Tensor  # (N,) per-token NLL, detached (fp32, or fp64 for fp64 logits); 0 where the target is ignored
    top1: Tensor | None  # (N,) bool: a counted target that is the argmax; None unless asked for
    topk: Tensor | None  # (N,) bool: a counted target among the top-k logits; None unless asked for


def token_weights(
    targets: Tensor, ignore_index: int = -100, answer_mask: Tensor | None = None, answer_weight: float = 1.0
) -> Tensor:
    """(N,) fp64 weights w such that sum_i w_i * nll_i is the trained cross-entropy: 1 / (number of counted
    targets) on each counted one; with answer marks, proportional to answer_weight on answer tokens and 1 on
    the others, summing to 1 (as `answer_weighted_ce`). targets (and answer_mask) (B, T) or (N,)."""
    weights = (targets != ignore_index).reshape(-1).to(torch.float64)  # (N,)
    if answer_mask is not None and answer_weight != 1.0:
        weights = torch.where(answer_mask.reshape(-1), answer_weight, 1.0).to(torch.float64) * weights
    return weights / weights.sum().clamp(min=1e-12)


def head_losses(
    head: Callable[[Tensor], Tensor],
    hidden: Tensor,
    targets: Tensor,
    weights: Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = 1024,
    top_k: int | None = None,
    min_logits: int | None = None,
) -> HeadLosses:
    """sum_i w_i * NLL_i of `head(hidden)` (and the top-1/top-k hits), `chunk_size` tokens at a time.

    The logits are a batch's largest tensor: B*T*V floats (8 x 1024 tokens over 100k ids: 3.3 GB in fp32,
    and as much again for their gradient). Here a chunk's logits exist only while that chunk is computed,
    and its backward runs at once: the loss is a sum with weights known in advance, so the gradients of a
    chunk's share with respect to its hidden states and the head's weights are final up to the one scalar
    that arrives in backward. Backward then only scales what forward kept (a gradient the size of the
    hidden states and one the size of the head). The head runs once forward and once backward, as without
    chunks. chunk_size None or 0, or a batch of at most `min_logits` logits (default SMALL_LOGITS), applies
    the head to all tokens at once, with plain autograd.
    hidden (B, T, D) or (N, D); targets (B, T) or (N,) with `ignore_index` where nothing is predicted;
    weights (N,) (`token_weights`).
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, D), (N,)
    probe = head(hidden[:1].detach()) if chunk_size else None  # (1, V): the vocabulary, and the head's graph
    small = min_logits if min_logits is not None else SMALL_LOGITS
    if not chunk_size or len(targets) * probe.shape[-1] <= small:
        nll, top1, topk = _chunk_losses(head(hidden), targets, ignore_index, top_k)
        return HeadLosses((nll * weights.to(nll.dtype)).sum(), nll.detach(), top1, topk)
    leaves = _head_leaves(probe)
    if not (leaves or (torch.is_grad_enabled() and hidden.requires_grad)):  # nothing to differentiate
        with torch.no_grad():
            parts = [_chunk_losses(head(h), t, ignore_index, top_k) for h, t in _chunks(hidden, targets, chunk_size)]
        nll, top1, topk = _join(parts)
        return HeadLosses((nll * weights.to(nll.dtype)).sum(), nll, top1, topk)
    loss, nll, top1, topk = _ChunkedHeadLoss.apply(
        head, targets, weights, ignore_index, chunk_size, top_k, hidden, *leaves
    )  # fmt: skip
    return HeadLosses(loss, nll, top1 if top_k else None, topk if top_k else None)


def _chunks(hidden: Tensor, targets: Tensor, size: int):
    return zip(hidden.split(size), targets.split(size))


def _join(parts):
    nll, top1, topk = zip(*parts)
    hits = [None if h[0] is None else torch.cat(h) for h in (top1, topk)]
    return torch.cat(nll), *hits


def _chunk_losses(logits: Tensor, targets: Tensor, ignore_index: int, top_k: int | None):
    """nll (n,) of logits (n, V) in fp32 or wider, and with top_k the top-1 and top-k hits (n,) bool."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")  # (n,)
    if top_k is None:
        return nll, None, None
    return nll, *_hits(logits, targets, ignore_index, top_k)


@torch.no_grad()
def _hits(logits: Tensor, targets: Tensor, ignore_index: int, top_k: int) -> tuple[Tensor, Tensor]:
    """(n,) bool each: a counted target that is the argmax of logits (n, V), and one among the top k."""
    valid = targets != ignore_index
    ranked = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices  # (n, k), best first
    hits = ranked == targets[:, None]  # (n, k)
    return hits[:, 0] & valid, hits.any(dim=-1) & valid


def _losses_and_logit_gradient(logits: Tensor, targets: Tensor, weights: Tensor, ignore_index: int, top_k: int | None):
    """`_chunk_losses` of logits (n, V), and the gradient of sum_i w_i * nll_i with respect to them, from one
    softmax: w_i (softmax_i - onehot(t_i)). Autograd through `F.cross_entropy` would keep the log-softmax and
    make two more (n, V) tensors in backward; here the gradient is formed in the fp32 copy (or one buffer)."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    z = logits.detach().to(compute)  # (n, V): a copy when the logits are narrower, else the logits themselves
    top1 = topk = None
    if top_k is not None:
        top1, topk = _hits(z, targets, ignore_index, top_k)
    valid = targets != ignore_index
    picked = targets.where(valid, 0)[:, None]  # (n, 1): a counted target, or any id where none is
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
    nll = (lse - z.gather(1, picked)).squeeze(1).where(valid, 0.0)  # (n,)
    grad = z if z.dtype != logits.dtype else torch.empty_like(z)
    torch.sub(z, lse, out=grad).exp_()  # (n, V): the softmax
    grad.scatter_add_(1, picked, grad.new_full(picked.shape, -1.0))
    grad.mul_((weights.to(compute) * valid)[:, None])
    return nll, top1, topk, grad.to(logits.dtype)


def _head_leaves(probe: Tensor) -> list[Tensor]:
    """The tensors requiring gradients that the head reads: its weights as autograd sees them (under a sharding
    strategy, the gathered copies), found by following the graph of `probe`, the head applied to one token."""
    leaves, stack, seen = [], [probe.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad: a leaf
            leaves.append(fn.variable)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


class _ChunkedHeadLoss(torch.autograd.Function):
    """Forward computes each chunk's loss and its gradients at once (see `head_losses`); backward scales them."""

    @staticmethod
    def forward(ctx, head, targets, weights, ignore_index, chunk_size, top_k, hidden, *leaves):
        want_hidden = ctx.needs_input_grad[6]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_leaves = [torch.zeros_like(leaf) for leaf in leaves]
        loss, parts, start = 0.0, [], 0
        for (h, t), w in zip(_chunks(hidden, targets, chunk_size), weights.split(chunk_size)):
            h = h.detach().requires_grad_(want_hidden)
            with torch.enable_grad():
                logits = head(h)  # (n, V)
            nll, top1, topk, grad_logits = _losses_and_logit_gradient(logits, t, w, ignore_index, top_k)
            chunk_loss = (nll * w.to(nll.dtype)).sum()
            grads = list(torch.autograd.grad(logits, [h] * want_hidden + list(leaves), grad_logits, allow_unused=True))
            del logits, grad_logits
            if want_hidden:
                grad_hidden[start : start + len(t)] = grads.pop(0)  # (n, D)
            for total, grad in zip(grad_leaves, grads):
                if grad is not None:
                    total += grad
            loss, start = loss + chunk_loss.detach(), start + len(t)
            parts.append((nll.detach(), top1, topk))
        ctx.want_hidden = want_hidden
        ctx.save_for_backward(*([grad_hidden] if want_hidden else []), *grad_leaves)
        nll, top1, topk = _join(parts)
        if top1 is None:  # autograd outputs are tensors: empty ones stand for "not asked for"
            top1 = topk = torch.zeros(0, dtype=torch.bool, device=hidden.device)
        ctx.mark_non_differentiable(nll, top1, topk)
        return loss, nll, top1, topk

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = [g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        grad_hidden = grads.pop(0) if ctx.want_hidden else None
        return None, None, None, None, None, None, grad_hidden, *grads


def token_nll(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed next-token negative log-likelihood (fp32, or fp64 for fp64 logits) and the number of
    targets it covers.

    logits (B, T, V), targets (B, T) holding `ignore_index` where nothing is predicted.
    """
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))  # (B*T, V)
    nll_sum = F.cross_entropy(logits, targets.flatten(), ignore_index=ignore_index, reduction="sum")
    return nll_sum, (targets != ignore_index).sum()


def answer_weighted_ce(
    logits: Tensor, targets: Tensor, answer_mask: Tensor, answer_weight: float, ignore_index: int = -100
) -> Tensor:
    """Cross-entropy with weight `answer_weight` on answer tokens and 1 on the others: sum(w·nll) / sum(w).

    A synthetic task's answer is a few tokens of a long row (a passkey: 3-5 of 256), so plain CE gives
    retrieval little weight next to the filler; up-weighting them lets a small model learn it in-window.
    logits (B, T, V), targets (B, T), answer_mask (B, T) bool on target positions.
    """
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))  # (B*T, V)
    nll = F.cross_entropy(logits, targets.flatten(), ignore_index=ignore_index, reduction="none")  # (B*T,)
    valid = (targets != ignore_index).flatten()
    weights = torch.where(answer_mask.flatten(), answer_weight, 1.0).to(nll.dtype) * valid  # (B*T,)
    return (nll * weights).sum() / weights.sum().clamp(min=1e-12)


def combine_losses(ce: Tensor, aux_losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """ce + sum of weight * aux loss. Every aux loss needs a weight: a silent default would hide a
    loss the model reports but training ignores."""
    missing = sorted(set(aux_losses) - set(weights))
    if missing:
        raise ValueError(
            f"the model returns aux loss '{missing[0]}' but model.aux_loss_weights has no weight for it; "
            f"set model.aux_loss_weights.{missing[0]} (0 logs it without training on it)"
        )
    total = ce
    for name, value in aux_losses.items():
        if weights[name]:
            total = total + weights[name] * value
    return total


def simctg_loss(hidden: Tensor, valid: Tensor, margin: float = 0.5) -> Tensor:
    """SimCTG's contrastive term (Su et al. 2022; docs/architectures.md), unweighted.

    With r_i = h_i / |h_i| the final hidden states of one sequence, every ordered pair i != j of valid
    tokens costs max(0, margin - 1 + r_i . r_j): identical directions cost `margin`, orthogonal ones
    nothing. The mean is over those pairs; pads (valid False) and the diagonal are excluded.
    hidden (B, T, D), valid (B, T) bool.
    """
    r = F.normalize(hidden.float(), dim=-1)
    similarity = r @ r.transpose(1, 2)  # (B, T, T)
    eye = torch.eye(hidden.shape[1], dtype=torch.bool, device=hidden.device)
    pairs = valid[:, :, None] & valid[:, None, :] & ~eye  # (B, T, T)
    cost = (margin - 1.0 + similarity).clamp(min=0.0)
    return (cost * pairs).sum() / pairs.sum().clamp(min=1)
