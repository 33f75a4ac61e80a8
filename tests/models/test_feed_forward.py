"""The gated linear unit after its input projection (one autograd step keeping only [u, g]) equals the plain
expression: SwiGLU (silu gate) and SeqCond's readout (sigmoid gate)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from lctrain.models.layers.feed_forward import SwiGLU, gated_linear

GATE_LOOPS = {"silu": lambda g: g / (1 + math.exp(-g)), "sigmoid": lambda g: 1 / (1 + math.exp(-g))}


def gated_linear_loop(z, weight, bias, gate):
    """W (u * gate(g)) + b for z = [u, g], one token, one unit and one output at a time (float64)."""
    F, D = weight.shape[1], weight.shape[0]
    out = torch.zeros(*z.shape[:-1], D, dtype=torch.float64)
    for idx in itertools.product(*(range(n) for n in z.shape[:-1])):
        hidden = [z[idx][f].item() * GATE_LOOPS[gate](z[idx][F + f].item()) for f in range(F)]
        for d in range(D):
            out[idx + (d,)] = sum(weight[d, f].item() * hidden[f] for f in range(F)) + (0 if bias is None else bias[d])
    return out


@pytest.mark.parametrize("gate", ["silu", "sigmoid"])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_linear_and_its_gradients_equal_the_float64_loop(gate, bias):
    torch.manual_seed(0)
    linear = nn.Linear(5, 6, bias=bias).double()
    z = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, 6, dtype=torch.float64)
    inputs = [z, *linear.parameters()]
    got = gated_linear(z, linear, gate)
    grads = torch.autograd.grad((got * weights).sum(), inputs)
    want = gated_linear_loop(z.detach(), linear.weight.detach(), None if not bias else linear.bias.detach(), gate)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # gradients by central differences of the loop, which autograd does not see through
    eps = 1e-6
    for i, (tensor, grad) in enumerate(zip(inputs, grads, strict=True)):
        numeric = torch.zeros_like(tensor)
        for idx in itertools.product(*(range(n) for n in tensor.shape)):
            values = []
            for step in (eps, -eps):
                shifted = [t.detach().clone() for t in inputs]
                shifted[i][idx] += step
                b = shifted[2] if bias else None
                values.append((gated_linear_loop(shifted[0], shifted[1], b, gate) * weights).sum())
            numeric[idx] = (values[0] - values[1]) / (2 * eps)
        torch.testing.assert_close(grad, numeric, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_equals_its_plain_expression_in_float64(bias):
    torch.manual_seed(0)
    layer = SwiGLU(6, 5, bias=bias).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.parameters()]
    got = layer(x)
    u, g = layer.up(x).chunk(2, dim=-1)
    want = layer.down(u * torch.nn.functional.silu(g))
    weights = torch.randn_like(got)
    for a, b in zip(
        torch.autograd.grad((got * weights).sum(), params), torch.autograd.grad((want * weights).sum(), params)
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_the_gated_linear_unit_keeps_only_its_input_and_weight():
    """What autograd saves for backward: z (2F per token) and W, not gate(g) or the product (F each)."""
    linear = nn.Linear(5, 3, bias=False)
    z = torch.randn(4, 7, 10, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        gated_linear(z, linear)
    assert sorted(saved) == sorted([(4, 7, 10), (3, 5)])
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        u, g = z.chunk(2, dim=-1)
        linear(u * torch.nn.functional.silu(g))
    assert sum(torch.Size(s).numel() for s in saved) > 2 * 4 * 7 * 10  # the plain expression keeps more


def test_under_autocast_the_gradients_reach_the_parameters_in_their_own_dtype():
    torch.manual_seed(0)
    layer = SwiGLU(8, 16, bias=True)
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    reference = SwiGLU(8, 16, bias=True)
    reference.load_state_dict(layer.state_dict())
    u, g = reference.up(x).chunk(2, dim=-1)
    reference.down(u * torch.nn.functional.silu(g)).sum().backward()
    for (name, p), q in zip(layer.named_parameters(), reference.parameters(), strict=True):
        assert p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, rtol=0.05, atol=0.05, msg=name)
