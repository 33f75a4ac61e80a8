"""The gated units that keep only their inputs for backward equal their plain expressions: the gated linear
unit after its input projection (SwiGLU with a silu gate, SeqCond's readout with a sigmoid gate) and SeqCond's
gated RMSNorm."""

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


def gated_rms_norm_loop(x, gate, weight, eps):
    """w * p / sqrt(mean(p^2) + eps) with p = x * silu(gate), one row at a time (float64)."""
    out = torch.zeros_like(x)
    for idx in itertools.product(*(range(n) for n in x.shape[:-1])):
        p = [x[idx][c].item() * GATE_LOOPS["silu"](gate[idx][c].item()) for c in range(x.shape[-1])]
        rms = math.sqrt(sum(v * v for v in p) / len(p) + eps)
        for c, v in enumerate(p):
            out[idx + (c,)] = v / rms * weight[c].item()
    return out


def test_gated_rms_norm_and_its_gradients_equal_the_plain_expression_and_the_loop():
    """SeqCond's norm(o * silu(gate)): the forward against a float64 loop, the gradients against autograd
    through the plain expression (float64), and only its inputs kept for backward."""
    from lctrain.models.layers.norm import RMSNorm, gated_rms_norm

    torch.manual_seed(0)
    norm = RMSNorm(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        got = gated_rms_norm(x, gate, norm)
    assert sorted(saved) == sorted([(2, 3, 6), (2, 3, 6), (6,), (2, 3, 1)])  # x, gate, weight, 1/rms
    torch.testing.assert_close(
        got, gated_rms_norm_loop(x.detach(), gate.detach(), norm.weight, norm.eps), rtol=0, atol=1e-12
    )
    want = norm(x * torch.nn.functional.silu(gate))
    weights = torch.randn_like(got)
    inputs = [x, gate, norm.weight]
    for a, b in zip(
        torch.autograd.grad((got * weights).sum(), inputs), torch.autograd.grad((want * weights).sum(), inputs)
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_gated_rms_norm_with_a_bf16_gate_gives_gradients_in_each_inputs_dtype():
    from lctrain.models.layers.norm import RMSNorm, gated_rms_norm

    torch.manual_seed(0)
    norm = RMSNorm(16)
    x = torch.randn(2, 5, 16, requires_grad=True)
    gate = torch.randn(2, 5, 16).to(torch.bfloat16).requires_grad_()
    y = gated_rms_norm(x, gate, norm)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert (x.grad.dtype, gate.grad.dtype, norm.weight.grad.dtype) == (torch.float32, torch.bfloat16, torch.float32)
    gate_ref = gate.detach().float().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    reference = RMSNorm(16)
    reference(x_ref * torch.nn.functional.silu(gate_ref)).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gate.grad.float(), gate_ref.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
