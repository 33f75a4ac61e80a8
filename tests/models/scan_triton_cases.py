"""The Triton recurrence kernels on CPU, under Triton's interpreter.

Triton reads TRITON_INTERPRET when it is first imported, and other test modules (torch.compile's
Inductor among them) may import it first in a shared pytest process; so this module is not collected
(its name does not start with test_) and test_scan_triton.py runs it in a fresh process with the
variable set.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by test_scan_triton.py with TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from lctrain.models.condenser import condense, decayed_prefix_sum  # noqa: E402
from lctrain.models.layers.scan import linear_scan, scan  # noqa: E402
from lctrain.models.layers.scan_triton import decayed_scan, kernel_available  # noqa: E402
from tests.models.test_seqcond import ids, seqcond, step_by_step  # noqa: E402
from tests.models.test_serriform import tiny_model, tokens  # noqa: E402
from tests.reference.serriform import recurrence_loop  # noqa: E402


def problem(B: int, T: int, C: int, dtype, with_h0: bool, seed: int = 0):
    """Inputs, log decays from 1e-4 to 1 (an anchor-like channel at exactly 0) and an optional state."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, C, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    log_a = torch.linspace(-9.0, 0.0, C, dtype=torch.float64)[torch.randperm(C, generator=g)].to(dtype)
    log_a.requires_grad_()
    h0 = torch.randn(B, C, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if with_h0 else None
    return u, log_a, h0


def value_and_grads(fn, u, log_a, h0, grad_out):
    """fn's output and the gradients of <output, grad_out> with respect to u, log_a and h0."""
    out = fn(u, log_a, h0)
    inputs = [x for x in (u, log_a, h0) if x is not None]
    return out, torch.autograd.grad(out, inputs, grad_out)


def test_interpreter_makes_the_kernels_available_on_cpu():
    assert kernel_available(torch.zeros(1))


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zero-start"])
@pytest.mark.parametrize("T, C", [(1, 5), (37, 40), (70, 33)])
def test_kernel_and_its_gradients_match_the_float64_step_loop(T, C, with_h0):
    """fp64 inputs: the kernel's states and its gradients in u, log_a and h0 equal autograd through the
    plain loop h_t = a h_{t-1} + u_t to 1e-12 (relative to their scale)."""
    u, log_a, h0 = problem(2, T, C, torch.float64, with_h0)
    grad_out = torch.randn(2, T, C, dtype=torch.float64)

    def loop(u, log_a, h0):
        return recurrence_loop(u, log_a.exp(), torch.ones_like(log_a), h0)

    got, got_grads = value_and_grads(decayed_scan, u, log_a, h0, grad_out)
    want, want_grads = value_and_grads(loop, u, log_a, h0, grad_out)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * want.abs().max().item())
    for name, g, w in zip(("u", "log_a", "h0"), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12 * w.abs().max().item(), msg=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_keeps_linear_scans_dtype_contract_and_values(dtype):
    """Lower-precision inputs: states in fp32 and gradients in each input's dtype, equal to linear_scan's."""
    u, log_a, h0 = problem(2, 45, 17, dtype, with_h0=True, seed=3)
    grad_out = torch.randn(2, 45, 17)
    got, got_grads = value_and_grads(decayed_scan, u, log_a, h0, grad_out)
    want, want_grads = value_and_grads(lambda *a: linear_scan(*a, chunk_size=16), u, log_a, h0, grad_out)
    assert got.dtype == torch.float32 and [g.dtype for g in got_grads] == [dtype] * 3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 gradients: one rounding of each
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=tolerance * w.float().abs().max().item())


def test_dispatcher_picks_the_kernel_for_triton_and_pytorch_for_auto_on_cpu():
    u, log_a, h0 = problem(2, 29, 9, torch.float32, with_h0=True)
    with torch.no_grad():
        assert torch.equal(scan(u, log_a, h0, kernel="triton"), decayed_scan(u, log_a, h0))
        assert torch.equal(scan(u, log_a, h0, kernel="auto", chunk_size=8), linear_scan(u, log_a, h0, chunk_size=8))


@pytest.mark.parametrize("with_initial", [True, False], ids=["initial", "zero-start"])
def test_condenser_sums_by_the_kernel_equal_decayed_prefix_sum(with_initial):
    """Heads of D channels share a decay (the last an anchor head at 0); values and gradients agree in fp64."""
    g = torch.Generator().manual_seed(5)
    B, T, K, D = 2, 31, 3, 7
    values = torch.randn(B, T, K, D, generator=g, dtype=torch.float64, requires_grad=True)
    log_decay = torch.tensor([-0.7, -0.05, 0.0], dtype=torch.float64, requires_grad=True)
    initial = torch.randn(B, K, D, generator=g, dtype=torch.float64, requires_grad=True) if with_initial else None
    grad_out = torch.randn(B, T, K, D, dtype=torch.float64)
    got, got_grads = value_and_grads(lambda *a: condense(*a, 8, "triton"), values, log_decay, initial, grad_out)
    want, want_grads = value_and_grads(lambda *a: decayed_prefix_sum(*a, 8), values, log_decay, initial, grad_out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * want.abs().max().item())
    for g_, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g_, w, rtol=0, atol=1e-12 * w.abs().max().item())


def test_seqcond_on_the_kernel_decodes_like_its_forward_and_like_pytorch():
    """Decaying and anchor heads (log decay 0) together; a prefill, then single tokens with the state."""
    small = dict(d_model=32, expand_factor=1.0, seqcond_heads=4, num_query_heads=2, num_anchor_heads=1)
    model = seqcond(torch.float64, scan_kernel="triton", **small)
    reference = seqcond(torch.float64, scan_kernel="torch", **small)
    x = ids(2, 18)  # more than one 16-step tile
    full = model(x).logits
    torch.testing.assert_close(full, reference(x).logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(step_by_step(model, x, prefill=15), full, rtol=0, atol=1e-10)


def test_serriform_on_the_kernel_decodes_like_its_forward_and_like_pytorch():
    model = tiny_model(torch.float64, scan_kernel="triton")
    reference = tiny_model(torch.float64, scan_kernel="torch")
    x = tokens(2, 19)
    full = model(x).logits
    torch.testing.assert_close(full, reference(x).logits, rtol=0, atol=1e-10)
    out = model(x[:, :14])
    pieces = [out.logits]
    for t in range(14, x.shape[1]):
        out = model(x[:, t : t + 1], state=out.state)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-10)


def test_training_gradients_through_serriform_match_the_pytorch_path():
    """One loss, every parameter's gradient: the kernel's backward inside a whole model."""
    grads = []
    for kernel in ("triton", "torch"):
        model = tiny_model(torch.float64, scan_kernel=kernel, use_moe=False).train()
        loss = model(tokens(2, 23)).logits.square().mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * max(want.abs().max().item(), 1.0))


def test_the_gpu_tile_sizes_give_the_same_results(monkeypatch):
    """The interpreter runs small tiles; one problem with the GPU's (32 channels by 16 to 64 steps), crossing
    a tile boundary in time and in channels, against the float64 loop."""
    from lctrain.models.layers import scan_triton

    monkeypatch.setattr(scan_triton, "BLOCK_C", 32)
    monkeypatch.setattr(scan_triton, "MIN_BLOCK_T", 16)
    monkeypatch.setattr(scan_triton, "MAX_BLOCK_T", 64)
    u, log_a, h0 = problem(1, 70, 33, torch.float64, with_h0=True, seed=7)
    grad_out = torch.randn(1, 70, 33, dtype=torch.float64)

    def loop(u, log_a, h0):
        return recurrence_loop(u, log_a.exp(), torch.ones_like(log_a), h0)

    got, got_grads = value_and_grads(decayed_scan, u, log_a, h0, grad_out)
    want, want_grads = value_and_grads(loop, u, log_a, h0, grad_out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * want.abs().max().item())
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12 * w.abs().max().item())


def test_auto_checks_the_kernels_once_per_device_and_falls_back_when_they_fail(monkeypatch, caplog):
    """kernels_agree is what "auto" asks on a CUDA device; here it runs the interpreted kernels on CPU."""
    from lctrain.models.layers import scan as scan_module
    from lctrain.models.layers import scan_triton

    monkeypatch.setattr(scan_module, "_VERDICTS", {})
    assert scan_module.kernels_agree(torch.device("cpu")) and scan_module._VERDICTS == {"cpu": True}
    monkeypatch.setattr(scan_module, "_VERDICTS", {})
    monkeypatch.setattr(scan_triton, "decayed_scan", lambda u, log_a, h0: decayed_scan(u, log_a, h0) * 1.01)
    with caplog.at_level("WARNING"):
        assert not scan_module.kernels_agree(torch.device("cpu"))
    assert "differ from the PyTorch path" in caplog.text
    monkeypatch.setattr(scan_module, "_VERDICTS", {})
    monkeypatch.setattr(scan_triton, "decayed_scan", lambda *args: 1 / 0)
    assert not scan_module.kernels_agree(torch.device("cpu")) and "ZeroDivisionError" in caplog.text
