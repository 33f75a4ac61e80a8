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

from lctrain.models.condenser import kernel_pairs  # noqa: E402
from lctrain.models.condenser_triton import condense_and_read_fused  # noqa: E402
from lctrain.models.layers.scan import linear_scan, scan  # noqa: E402
from lctrain.models.layers.scan_triton import decayed_scan, kernel_available  # noqa: E402
from tests.models.test_seqcond import ids, seqcond, step_by_step  # noqa: E402
from tests.models.test_serriform import tiny_model, tokens  # noqa: E402
from tests.reference.seqcond import condensed_readout_loop  # noqa: E402
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


def condenser_problem(B, T, K, Kq, H, M, with_initial, seed=0):
    """The fused condenser's inputs in float64: random keys, weights from 1e-4 to 5000 as the clip allows,
    frequencies in (0.001, 3], one anchor head (log decay 0) among decaying ones, and optionally a state."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, low=-1.0, high=1.0):
        return (low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    log_decay = torch.cat([-torch.rand(K - 1, generator=g, dtype=torch.float64) * 0.8, torch.zeros(1)])
    inputs = dict(
        keys=rand(B, T, K, H, low=-2, high=2),
        weights=torch.exp(rand(B, T, K, low=-9.2, high=8.5)).detach().requires_grad_(),
        theta=rand(K, H, M, low=0.001, high=3),
        phase_scale=rand(K, low=0.5, high=2),
        integration=torch.softmax(rand(K, H, M), -1).detach().requires_grad_(),
        log_decay=log_decay.requires_grad_(),
        queries=rand(B, T, Kq, H, M, 2),
        initial_re=rand(B, K, H, M) if with_initial else None,
        initial_im=rand(B, K, H, M) if with_initial else None,
    )
    return inputs


def fused_and_loop(inputs, seed=1):
    """Both computations' outputs, and the gradients of one random linear function of all three outputs."""
    results = []
    for fn in (condense_and_read_fused, condensed_readout_loop):
        outputs = fn(**inputs)
        g = torch.Generator().manual_seed(seed)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outputs)
        leaves = [v for v in inputs.values() if v is not None]
        results.append((outputs, torch.autograd.grad(loss, leaves)))
    return results


@pytest.mark.parametrize(
    "T, K, Kq, H, M, with_initial",
    [(1, 2, 2, 2, 2, True), (13, 3, 3, 3, 2, True), (9, 4, 2, 2, 3, False), (6, 2, 1, 1, 1, True)],
    ids=["one-step", "tiles-and-channel-blocks", "shared-queries", "one-channel"],
)
def test_fused_condenser_and_its_gradients_match_the_float64_step_loop(T, K, Kq, H, M, with_initial):
    """The readout, the last state and the gradients of every input (keys, weights, frequencies, phase
    scale, integration weights, decays, queries, state) equal autograd through the complex128 loop to 1e-12
    of their scale; time crosses 4-step tiles and channels cross blocks in the interpreter's tile sizes."""
    inputs = condenser_problem(2, T, K, Kq, H, M, with_initial)
    (got, got_grads), (want, want_grads) = fused_and_loop(inputs)
    assert got[0].shape == (2, T, K, 2, H) and got[0].dtype == torch.float64
    names = [name for name, v in inputs.items() if v is not None]
    for name, g, w in zip(["readout", "last Re S", "last Im S"] + names, got + got_grads, want + want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12 * max(w.abs().max().item(), 1.0), msg=name)


def test_fused_condenser_at_the_gpu_tile_sizes(monkeypatch):
    """One problem with the GPU's tiles (16 steps by 64 channels), crossing a tile in time, against the loop."""
    from lctrain.models import condenser_triton

    for name, value in condenser_triton.GPU_TILES.items():
        monkeypatch.setattr(condenser_triton, name, value)
    (got, got_grads), (want, want_grads) = fused_and_loop(condenser_problem(1, 21, 2, 1, 20, 4, True, seed=4))
    for g, w in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12 * max(w.abs().max().item(), 1.0))


def test_fused_condenser_keeps_the_dtype_contract():
    """fp32 keys and bf16 queries: outputs in fp32, each gradient in its input's dtype, values as in fp64."""
    inputs = condenser_problem(2, 10, 2, 2, 2, 2, True, seed=2)
    low = {k: None if v is None else v.detach().float().requires_grad_() for k, v in inputs.items()}
    low["queries"] = inputs["queries"].detach().bfloat16().requires_grad_()
    outputs = condense_and_read_fused(**low)
    assert [o.dtype for o in outputs] == [torch.float32] * 3
    grads = torch.autograd.grad(outputs[0].sum(), [v for v in low.values() if v is not None])
    assert [g.dtype for g in grads] == [v.dtype for v in low.values() if v is not None]
    reference = condensed_readout_loop(**{k: None if v is None else v.detach().double() for k, v in low.items()})
    torch.testing.assert_close(outputs[0].double(), reference[0], rtol=0, atol=1e-5 * reference[0].abs().max().item())


def test_seqcond_on_the_kernel_decodes_like_its_forward_and_like_pytorch():
    """Decaying and anchor heads (log decay 0) together; a prefill, then single tokens with the state."""
    small = dict(d_model=32, expand_factor=1.0, seqcond_heads=4, num_query_heads=2, num_anchor_heads=1)
    model = seqcond(torch.float64, scan_kernel="triton", **small)
    reference = seqcond(torch.float64, scan_kernel="torch", **small)
    x = ids(2, 18)  # more than one 16-step tile
    full = model(x).logits
    torch.testing.assert_close(full, reference(x).logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(step_by_step(model, x, prefill=15), full, rtol=0, atol=1e-10)


def test_training_gradients_through_seqcond_match_the_pytorch_path():
    """One loss, every parameter's gradient, from a carried state: the fused kernel's backward in a model."""
    small = dict(d_model=32, expand_factor=1.0, seqcond_heads=4, num_query_heads=2, num_anchor_heads=1)
    grads = []
    for kernel in ("triton", "torch"):
        model = seqcond(torch.float64, scan_kernel=kernel, **small).train()
        with torch.no_grad():
            state = model(ids(2, 5)).state
        loss = model(ids(2, 19), state=state).logits.square().mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * max(want.abs().max().item(), 1.0))


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

    for name, value in scan_triton.GPU_TILES.items():
        monkeypatch.setattr(scan_triton, name, value)
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
    assert scan_module.kernels_agree(torch.device("cpu")) and scan_module._VERDICTS == {"recurrence on cpu": True}
    monkeypatch.setattr(scan_module, "_VERDICTS", {})
    monkeypatch.setattr(scan_triton, "decayed_scan", lambda u, log_a, h0: decayed_scan(u, log_a, h0) * 1.01)
    with caplog.at_level("WARNING"):
        assert not scan_module.kernels_agree(torch.device("cpu"))
    assert "differ from the PyTorch path" in caplog.text
    monkeypatch.setattr(scan_module, "_VERDICTS", {})
    monkeypatch.setattr(scan_triton, "decayed_scan", lambda *args: 1 / 0)
    assert not scan_module.kernels_agree(torch.device("cpu")) and "ZeroDivisionError" in caplog.text


def test_auto_checks_the_fused_condenser_on_its_own(monkeypatch, caplog):
    """The condenser's check (kernel_pairs: outputs, state and every gradient of a small random condenser)
    passes on the interpreted kernel, fails on one whose real parts are 1% off, and is remembered apart
    from the recurrence's."""
    from lctrain.models import condenser_triton
    from lctrain.models.layers import scan as scan_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(scan_module, "_VERDICTS", {"recurrence on cpu": True})
    assert scan_module.kernels_agree(cpu, "condenser", kernel_pairs)
    assert scan_module._VERDICTS == {"recurrence on cpu": True, "condenser on cpu": True}
    monkeypatch.setattr(scan_module, "_VERDICTS", {"recurrence on cpu": True})
    real = condenser_triton.condense_and_read_fused

    def off(*args):
        readout, re, im = real(*args)
        return readout * torch.tensor([1.01, 1.0], dtype=readout.dtype)[:, None], re, im  # (2, 1): Re, Im

    monkeypatch.setattr(condenser_triton, "condense_and_read_fused", off)
    with caplog.at_level("WARNING"):
        assert not scan_module.kernels_agree(cpu, "condenser", kernel_pairs)
    assert "condenser kernel: the Triton kernels failed their check on cpu" in caplog.text


def test_a_step_allocates_the_same_with_the_kernel_launches_skipped(monkeypatch):
    """benchmarks/kernel_memory.py measures the fused paths' memory on CPU with the launches skipped; the
    allocator's peak of a training step is that of the (interpreted) kernels running, to within the
    interpreter's own few small allocations (1 KiB of 0.9 MiB here)."""
    from benchmarks import kernel_memory
    from lctrain.models import condenser_triton
    from lctrain.models.layers import scan_triton

    model = seqcond(scan_kernel="triton", n_layers=2, seqcond_ratio=2).train()  # a condenser, then attention
    x = ids(1, 10)
    kernel_memory.step(model, x)  # first-call allocations out of the way
    peaks = [kernel_memory.activation_peak(model, x, cuda=False)]
    for module in (condenser_triton, scan_triton):
        for name in ("_forward_kernel", "_backward_kernel"):
            monkeypatch.setattr(module, name, kernel_memory._SkippedLaunch())
    peaks.append(kernel_memory.activation_peak(model, x, cuda=False))
    assert peaks[1] > 0 and abs(peaks[0] - peaks[1]) <= 0.005 * peaks[0]
