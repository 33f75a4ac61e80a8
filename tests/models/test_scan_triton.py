"""The fused Triton recurrence (layers/scan_triton.py) and the `scan_kernel` setting that selects it.

The kernels are checked on CPU under Triton's interpreter, in a separate process: Triton reads
TRITON_INTERPRET once, when first imported, and in a shared pytest process another module (Inductor,
for torch.compile) may import it first without the variable. scan_triton_cases.py holds those checks;
the test below runs it with the variable set. The GPU tests at the end compare the compiled kernels with
the PyTorch path at training shapes.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lctrain.models.layers.scan import linear_scan, scan
from lctrain.models.seqcond_config import SeqCondConfig
from lctrain.models.serriform import SerriformConfig

REPO = Path(__file__).resolve().parents[2]


def test_kernels_under_the_interpreter_match_the_references():
    """Runs scan_triton_cases.py (float64 loop, linear_scan, the condenser's sums, decoding) on CPU."""
    pytest.importorskip("triton", reason="Triton is not installed (requirements-dev.txt installs it on Linux)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/models/scan_triton_cases.py"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


def test_triton_without_the_kernels_is_a_one_line_error_naming_the_setting(monkeypatch):
    from lctrain.models.layers import scan_triton

    monkeypatch.setattr(scan_triton, "INTERPRETED", False)  # a CPU tensor outside the interpreter
    u = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match=r"model\.scan_kernel='triton' needs Triton and a CUDA device") as error:
        scan(u, torch.zeros(4), kernel="triton")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("config", [SerriformConfig, SeqCondConfig])
def test_an_unknown_scan_kernel_is_rejected_by_the_config(config):
    with pytest.raises(ValueError, match=r"model\.scan_kernel='cuda' is unknown; choose one of: auto, torch, triton"):
        config(scan_kernel="cuda")


def test_auto_on_cpu_is_the_pytorch_path_exactly():
    g = torch.Generator().manual_seed(0)
    u, log_a, h0 = torch.randn(2, 40, 6, generator=g), -torch.rand(6, generator=g), torch.randn(2, 6, generator=g)
    assert torch.equal(scan(u, log_a, h0, chunk_size=16), linear_scan(u, log_a, h0, chunk_size=16))
    from tests.models.test_seqcond import ids, seqcond

    auto, torch_path = seqcond(scan_kernel="auto"), seqcond(scan_kernel="torch")
    assert torch.equal(auto(ids(2, 40)).logits, torch_path(ids(2, 40)).logits)


def test_the_module_imports_and_reports_no_kernels_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; import platform, torch\n"
        "from lctrain.models.layers import scan_triton\n"
        "assert scan_triton.triton is None and not scan_triton.kernel_available(torch.zeros(1))\n"
        "from lctrain.models import condenser_triton\n"
        "try:\n"
        "    condenser_triton.condense_and_read_fused(*[None] * 9)\n"
        "except ImportError as e:\n"
        "    assert 'needs Triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "from lctrain.models.layers.scan import scan\n"
        "try:\n"
        "    scan(torch.zeros(1, 2, 3), torch.zeros(3), kernel='triton')\n"
        "except ValueError as e:\n"
        "    assert 'not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}  # even under the interpreter
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


# --- on a GPU: the compiled kernels at training shapes ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, T, C", [(8, 2048, 128), (4, 4096, 520), (3, 1000, 77)])
def test_cuda_kernel_matches_linear_scan_at_training_shapes(B, T, C, dtype):
    """States and gradients of both paths from the same inputs; bf16 inputs still accumulate in fp32."""
    from lctrain.models.layers.scan_triton import decayed_scan

    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(B, T, C, device="cuda", generator=g).to(dtype).requires_grad_()
    log_a = torch.nn.functional.logsigmoid(torch.randn(C, device="cuda", generator=g) * 3).requires_grad_()
    h0 = torch.randn(B, C, device="cuda", generator=g).requires_grad_()
    grad_out = torch.randn(B, T, C, device="cuda", generator=g)
    results = []
    for fn in (decayed_scan, linear_scan):
        out = fn(u, log_a, h0)
        results.append((out, *torch.autograd.grad(out, (u, log_a, h0), grad_out)))
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]  # bf16: grad_u rounded to bf16 on both paths
    for name, got, want in zip(("h", "u", "log_a", "h0"), *results):
        assert got.dtype == want.dtype, name
        error = (got.float() - want.float()).abs().max().item()
        assert error <= tolerance * want.float().abs().max().item(), (name, error)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["serriform", "seqcond"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_models_on_the_kernel_match_pytorch_in_training_and_decoding(arch, dtype):
    """A whole model with scan_kernel "triton" against "torch": logits, parameter gradients, and decoding
    token by token after a prefill equal to the forward."""
    from tests.models.test_seqcond import ids, seqcond, step_by_step
    from tests.models.test_serriform import tiny_model

    models = {}
    for kernel in ("triton", "torch"):
        model = tiny_model(scan_kernel=kernel) if arch == "serriform" else seqcond(scan_kernel=kernel)
        models[kernel] = model.to("cuda", dtype)
    x = ids(2, 300).cuda()
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    logits, grads = {}, {}
    for kernel, model in models.items():
        torch.manual_seed(0)  # the same router noise in both
        out = model.train()(x).logits.float()
        grads[kernel] = torch.autograd.grad(out.square().mean(), list(model.parameters()), allow_unused=True)
        logits[kernel] = out.detach()
        model.eval()
    scale = logits["torch"].abs().max().item()
    assert (logits["triton"] - logits["torch"]).abs().max().item() <= tolerance * scale
    for got, want in zip(grads["triton"], grads["torch"]):
        if want is not None:
            error = (got.float() - want.float()).abs().max().item()
            assert error <= tolerance * max(want.float().abs().max().item(), 1e-6)
    with torch.no_grad():
        full = models["triton"](x[:, :40]).logits.float()
        stepped = step_by_step(models["triton"], x[:, :40], prefill=17).float()
    assert (stepped - full).abs().max().item() <= tolerance * full.abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, T, width", [(4, 2048, 512), (2, 3000, 256)])
def test_cuda_fused_condenser_matches_pytorch_at_training_shapes(B, T, width, dtype):
    """One condenser layer (heads of the size configs: 8 memory heads, 4 frequencies; one anchor head) from a
    state: output, state and every gradient by the fused kernel against the PyTorch path, both on the GPU."""
    from lctrain.models.condenser import SequenceCondenser

    config = SeqCondConfig(d_model=width, seqcond_heads=8, num_anchor_heads=1)
    torch.manual_seed(0)
    layers = {
        kernel: SequenceCondenser(dataclasses.replace(config, scan_kernel=kernel)) for kernel in ("triton", "torch")
    }
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(B, T, width, device="cuda", dtype=dtype)
    grad = torch.randn(B, T, width, device="cuda", dtype=dtype)
    with torch.no_grad():
        _, state = layers["torch"].to("cuda", dtype)(x[:, :100])
    results = {}
    for kernel, layer in layers.items():
        layer.to("cuda", dtype)
        inputs = x.clone().requires_grad_()
        y, new = layer(inputs, state)
        y.backward(grad)
        results[kernel] = [y, new.re, new.im, new.den, inputs.grad, *(p.grad for p in layer.parameters())]
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for i, (got, want) in enumerate(zip(results["triton"], results["torch"])):
        error = (got.float() - want.float()).abs().max().item()
        assert error <= tolerance * max(want.float().abs().max().item(), 1e-6), (i, error)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["serriform", "seqcond"])
def test_cuda_compiled_model_on_the_kernels_matches_eager(arch):
    """torch.compile traces the kernels' autograd.Functions: same logits and gradients as eager."""
    from tests.models.test_seqcond import ids, seqcond
    from tests.models.test_serriform import tiny_model, tokens

    if arch == "serriform":
        model, x = tiny_model(scan_kernel="triton", use_moe=False), tokens(2, 200)
    else:
        model, x = seqcond(scan_kernel="triton"), ids(2, 200)
    model, x = model.cuda().train(), x.cuda()
    results = []
    for fn in (model, torch.compile(model)):
        logits = fn(x).logits
        results.append((logits.detach(), *torch.autograd.grad(logits.square().mean(), list(model.parameters()))))
    for got, want in zip(*results):
        assert (got - want).abs().max().item() <= 1e-4 * max(want.abs().max().item(), 1e-6)
