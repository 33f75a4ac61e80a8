"""The registers' log-sum-exp merge through CUDA's fused SDPA kernels, and the check that selects it.

On CPU the CUDA ops cannot run, so the adapters are exercised against stand-ins written from the kernels'
documented behaviour (float64 math): the flash kernel's causal flag aligned bottom-right, the memory-efficient
kernel's top-left flag, additive mask and lse padded along T; and the real ops run on meta tensors, which
checks every argument against their schemas. The selection is tested by running the check
on CPU with the CPU kernel, once correct and once deliberately wrong. The GPU tests at the end compare the
real kernels with the widened query.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lctrain.models.layers import attention as attention_module
from lctrain.models.layers import scan as scan_module
from lctrain.models.layers.attention import CausalSelfAttention
from lctrain.models.layers.kernels import causal_mask

B, H, HKV, R, DH = 2, 4, 2, 3, 8


def joint_softmax(q_rot, k, v, q, reg_k, reg_v, valid):
    """Float64 reference: one softmax over [registers ‖ keys], registers scored by q, keys by q_rot,
    causal bottom-right, `valid` (B, S) hiding keys."""
    q_rot, k, v, q, reg_k, reg_v = (t.double() for t in (q_rot, k, v, q, reg_k, reg_v))
    T, S, Dh = q.shape[2], k.shape[2], q.shape[-1]
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (B, H, S, Dh)
    reg_k, reg_v = reg_k.repeat_interleave(repeat, dim=0), reg_v.repeat_interleave(repeat, dim=0)  # (H, R, Dh)
    visible = torch.ones(q.shape[0], 1, T, S, dtype=torch.bool)
    for i in range(T):
        visible[:, :, i, S - T + i + 1 :] = False
    if valid is not None:
        visible &= valid[:, None, None, :]
    token_scores = (q_rot @ k.transpose(-1, -2)).masked_fill(~visible, float("-inf"))  # (B, H, T, S)
    scores = torch.cat([q @ reg_k.transpose(-1, -2), token_scores], dim=-1) * Dh**-0.5  # (B, H, T, R + S)
    probs = scores.softmax(dim=-1)
    return probs[..., : reg_k.shape[1]] @ reg_v + probs[..., reg_k.shape[1] :] @ v


def problem(T, S, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, DH), (B, HKV, S, DH), (B, HKV, S, DH), (B, H, T, DH), (HKV, R, DH), (HKV, R, DH)]
    return [torch.randn(shape, generator=g, dtype=dtype) for shape in shapes]


def key_mask(S, hidden):
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, :hidden] = False  # row 0 began a new stream after its first `hidden` keys
    return valid


def value_and_grads(fn, inputs, valid):
    inputs = [t.clone().requires_grad_() for t in inputs]
    y = fn(*inputs, valid)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    return [y.detach(), *torch.autograd.grad(y, inputs, dy)]


# --- stand-ins for the CUDA ops: plain float64 math from what each kernel documents ------------------------


def lse_dtype(q):
    """fp32 as the kernels give it; fp64 for the fp64 checks here, so they are exact."""
    return torch.promote_types(q.dtype, torch.float32)


def _probs(q, k, scale, visible, lse=None):
    """softmax rows of q @ k^T * scale over the visible keys, or exp(scores - lse) given the lse."""
    scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    if lse is None:
        return scores.softmax(dim=-1), scores.logsumexp(dim=-1)
    return (scores - lse.double().unsqueeze(-1)).exp(), None


def _grads(dy, q, k, v, out, p, scale):
    """The attention backward from the probabilities p: D = rowsum(dy * out), dS = p (dy v^T - D)."""
    dy, q, k, v, out = (t.double() for t in (dy, q, k, v, out))
    d_scores = p * (dy @ v.transpose(-1, -2) - (dy * out).sum(-1, keepdim=True))
    return d_scores @ k * scale, d_scores.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ dy


def fake_flash(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):
    T, S = q.shape[2], k.shape[2]
    visible = causal_mask(T, S) if is_causal else torch.ones(T, S, dtype=torch.bool)  # bottom-right
    p, lse = _probs(q, k, scale, visible)
    seed, offset = torch.zeros(2, dtype=torch.int64), torch.zeros((), dtype=torch.int64)
    return (p @ v.double()).to(q.dtype), lse.to(lse_dtype(q)), None, None, T, S, seed, offset, torch.empty(0)


def fake_flash_backward(
    dy, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed, offset, *, scale
):
    assert cum_q is None and cum_k is None and (max_q, max_k) == (q.shape[2], k.shape[2]) and seed.shape == (2,)
    assert lse.dtype == lse_dtype(q) and lse.shape == q.shape[:3]
    visible = causal_mask(q.shape[2], k.shape[2]) if is_causal else torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    p, _ = _probs(q, k, scale, visible, lse)
    return tuple(g.to(q.dtype) for g in _grads(dy, q, k, v, out, p, scale))


def _efficient_visible(q, k, bias, is_causal):
    T, S = q.shape[2], k.shape[2]
    assert bias is None or (bias.shape == (B, H, T, S) and bias.dtype == q.dtype and bias.stride(2) % 16 == 0)
    visible = torch.ones(T, S, dtype=torch.bool)
    if is_causal:  # top-left: query i sees keys 0..i
        visible = torch.arange(S)[None, :] <= torch.arange(T)[:, None]
    if bias is not None:
        visible = visible & (bias == 0)
    return visible


def fake_efficient(q, k, v, bias, compute_log_sumexp, dropout_p, is_causal, *, scale):
    assert compute_log_sumexp
    p, lse = _probs(q, k, scale, _efficient_visible(q, k, bias, is_causal))
    T = q.shape[2]
    padded = torch.full(
        (*lse.shape[:2], -(-T // 32) * 32), float("nan"), dtype=lse_dtype(q)
    )  # padding must never be read as an lse
    padded[..., :T] = lse
    return (p @ v.double()).to(q.dtype), padded, torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)


def fake_efficient_backward(dy, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask, is_causal, *, scale):
    T = q.shape[2]
    assert (
        lse.shape == (B, H, -(-T // 32) * 32) and lse[..., T:].isnan().all() and list(grad_input_mask) == [1, 1, 1, 0]
    )
    p, _ = _probs(q, k, scale, _efficient_visible(q, k, bias, is_causal), lse[..., :T])
    return (*(g.to(q.dtype) for g in _grads(dy, q, k, v, out, p, scale)), None)


@pytest.fixture
def fake_cuda_ops(monkeypatch):
    """The four CUDA ops replaced by their stand-ins (on CPU tensors) for one test."""
    for name, fake in [
        ("_scaled_dot_product_flash_attention", fake_flash),
        ("_scaled_dot_product_flash_attention_backward", fake_flash_backward),
        ("_scaled_dot_product_efficient_attention", fake_efficient),
        ("_scaled_dot_product_efficient_attention_backward", fake_efficient_backward),
    ]:
        monkeypatch.setattr(torch.ops.aten, name, fake)


UNMASKED, MASKED = [(40, 0, False), (40, 24, False)], [(40, 24, True), (7, 5, True)]


@pytest.mark.parametrize(
    "kernel, T, M, masked",
    [("flash", *case) for case in UNMASKED] + [("efficient", *case) for case in UNMASKED + MASKED],
)
def test_the_merge_through_each_cuda_kernel_adapter_equals_the_joint_softmax(fake_cuda_ops, kernel, T, M, masked):
    """Output and gradients of q_rot, k, v, q and the registers, at T == S, after a cache (the flash adapter
    relies on its bottom-right causal flag, the efficient one on a mask) and with a key mask (efficient only:
    the flash kernel is never given one)."""
    inputs = problem(T, M + T)
    valid = key_mask(M + T, M) if masked else None  # a reset row: its own tokens stay visible
    got = value_and_grads(lambda *a: attention_module._fused_attention_with_registers(*a, kernel), inputs, valid)
    want = value_and_grads(joint_softmax, inputs, valid)
    for name, a, b in zip(["y", "q_rot", "k", "v", "q", "reg_k", "reg_v"], got, want, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-12, name


@pytest.mark.parametrize(
    "kernel, dtype, masked",
    [("flash", torch.bfloat16, False), ("efficient", torch.float32, True)],
    ids=["flash", "efficient"],
)
def test_the_adapters_call_the_real_cuda_ops_as_their_schemas_ask(kernel, dtype, masked):
    """The real ops on meta tensors (their shape functions, no arithmetic): every argument the adapters pass,
    forward and backward, is one the op's schema takes, and what comes back has the inputs' shapes."""
    B, Hkv, H, T, S, R, Dh = 2, 2, 4, 40, 64, 3, 64
    shapes = [(B, H, T, Dh), (B, Hkv, S, Dh), (B, Hkv, S, Dh), (B, H, T, Dh), (Hkv, R, Dh), (Hkv, R, Dh)]
    inputs = [torch.empty(shape, device="meta", dtype=dtype, requires_grad=True) for shape in shapes]
    valid = torch.ones(B, S, dtype=torch.bool, device="meta") if masked else None
    y = attention_module._fused_attention_with_registers(*inputs, valid, kernel)
    grads = torch.autograd.grad(y, inputs, torch.empty_like(y))
    assert y.shape == (B, H, T, Dh) and y.dtype == dtype
    assert [g.shape for g in grads] == [t.shape for t in inputs] and all(g.dtype == dtype for g in grads)


def test_the_flash_adapter_refuses_a_key_mask():
    with pytest.raises(ValueError, match="flash kernel takes no key mask"):
        attention_module._CudaFlashKernel.mask(key_mask(9, 3), B, H, 4, 9, torch.zeros(1))


def test_the_efficient_adapter_aligns_the_mask_rows_and_broadcasts_the_rest():
    mask, is_causal = attention_module._CudaEfficientKernel.mask(key_mask(21, 3), B, H, 5, 21, torch.zeros(1))
    assert not is_causal and mask.shape == (B, H, 5, 21) and mask.stride()[1:] == (0, 32, 1)
    expected = torch.zeros(B, 1, 5, 21).masked_fill(~(key_mask(21, 3)[:, None, None] & causal_mask(5, 21)), -torch.inf)
    assert torch.equal(mask, expected.expand(B, H, 5, 21))
    assert attention_module._CudaEfficientKernel.mask(None, B, H, 5, 5, torch.zeros(1)) == (None, True)


# --- selection: the check, its verdict and the fallback -------------------------------------------------------


def layer() -> CausalSelfAttention:
    torch.manual_seed(0)
    return CausalSelfAttention(32, H, HKV, rope_base=100.0, n_registers=R)


def run(model, checked=None):
    """Two calls (the second after a cache, row 0 reset), returning outputs and every gradient; with
    `checked`, CPU is treated as a device whose kernels must pass the check first (those kernels)."""
    x = torch.randn(B, 20, 32, generator=torch.Generator().manual_seed(1))
    y1, state = model(x[:, :12])
    y2, _ = model(x[:, 12:], state.reset_rows(torch.tensor([True, False])), 12)
    y = torch.cat([y1, y2], dim=1)
    return [y.detach(), *torch.autograd.grad(y.square().sum(), list(model.parameters()))]


@pytest.fixture
def checked_on_cpu(monkeypatch):
    """CPU as a checked device: the CPU kernel must pass the check before the merge uses it."""
    monkeypatch.setattr(scan_module, "_VERDICTS", {})
    monkeypatch.setattr(attention_module, "FUSED_REGISTER_DEVICES", ())
    monkeypatch.setattr(attention_module, "_checked_kernels", lambda q, valid: ["cpu"])


def reference_runs(monkeypatch):
    """The layer's results with the merge on CPU unchecked (fused) and with no kernel (widened)."""
    with monkeypatch.context() as m:
        m.setattr(attention_module, "FUSED_REGISTER_DEVICES", ("cpu",))
        fused = run(layer())
        m.setattr(attention_module, "FUSED_REGISTER_DEVICES", ())
        m.setattr(attention_module, "_checked_kernels", lambda q, valid: [])
        widened = run(layer())
    return fused, widened


def test_the_check_runs_in_a_plain_context_under_inference_mode_and_autocast(checked_on_cpu):
    """A first call from evaluation (inference mode, autocast) still checks with gradients in the dtype asked."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_module._register_kernel(torch.zeros(B, H, 5, DH), None) == "cpu"
    assert {f"register attention (cpu, float32, head dim {DH}) on cpu": True} == scan_module._VERDICTS


def test_a_first_call_inside_activation_checkpointing_checks_and_trains_as_without_it(monkeypatch, checked_on_cpu):
    """The check's own graph stays out of the non-reentrant checkpoint's saved tensors: the block recomputes
    the same tensors in backward, and the gradients are those of the fused path without checkpointing."""
    x = torch.randn(B, 12, 32, generator=torch.Generator().manual_seed(1))

    def grads(checkpointed):
        model = layer()

        def block(t):
            return model(t)[0]

        y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        return torch.autograd.grad(y.square().sum(), list(model.parameters()))

    got = grads(checkpointed=True)
    assert {f"register attention (cpu, float32, head dim {DH}) on cpu": True} == scan_module._VERDICTS
    monkeypatch.setattr(attention_module, "FUSED_REGISTER_DEVICES", ("cpu",))
    assert all(torch.equal(a, b) for a, b in zip(got, grads(checkpointed=False), strict=True))


def test_a_kernel_that_passes_its_check_is_used_and_remembered(monkeypatch, checked_on_cpu, caplog):
    fused, widened = reference_runs(monkeypatch)
    assert max((a - b).abs().max() for a, b in zip(fused, widened)) > 0  # the two paths are told apart
    with caplog.at_level(logging.WARNING):
        got = run(layer())
    assert all(torch.equal(a, b) for a, b in zip(got, fused, strict=True))
    assert {f"register attention (cpu, float32, head dim {32 // H}) on cpu": True} == scan_module._VERDICTS
    assert "failed their check" not in caplog.text


class _WrongKernel(attention_module._CpuFlashKernel):
    """The CPU kernel with its lse off by 0.3: the registers' share of every row comes out wrong."""

    @staticmethod
    def forward(q, k, v, mask, is_causal, scale):
        out, lse, saved = attention_module._CpuFlashKernel.forward(q, k, v, mask, is_causal, scale)
        return out, lse + 0.3, saved


class _BrokenKernel(attention_module._CpuFlashKernel):
    @staticmethod
    def forward(q, k, v, mask, is_causal, scale):
        raise RuntimeError("no kernel image is available for execution on the device")


@pytest.mark.parametrize(
    "kernel, reason",
    [(_WrongKernel, "differ from the widened-query path"), (_BrokenKernel, "RuntimeError: no kernel image")],
)
def test_a_kernel_that_fails_its_check_falls_back_to_the_widened_query_with_one_warning(
    monkeypatch, checked_on_cpu, caplog, kernel, reason
):
    fused, widened = reference_runs(monkeypatch)
    monkeypatch.setitem(attention_module._TOKEN_KERNELS, "cpu", kernel)
    with caplog.at_level(logging.WARNING):
        first = run(layer())
        second = run(layer())  # the verdict is remembered: no second check, no second warning
    assert all(torch.equal(a, b) for a, b in zip(first, widened, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(second, widened, strict=True))
    warnings = [r.getMessage() for r in caplog.records if "failed their check" in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0], warnings
    assert warnings[0].startswith("register attention (cpu, float32, head dim 8) kernel: SDPA's fused kernels")
    assert scan_module._VERDICTS == {"register attention (cpu, float32, head dim 8) on cpu": False}


def test_a_failing_first_kernel_hands_over_to_the_next(monkeypatch, fake_cuda_ops, caplog):
    """flash fails its check, the memory-efficient kernel passes: the merge runs through the latter."""
    monkeypatch.setattr(scan_module, "_VERDICTS", {})
    monkeypatch.setattr(attention_module, "FUSED_REGISTER_DEVICES", ())
    monkeypatch.setattr(attention_module, "_checked_kernels", lambda q, valid: ["flash", "efficient"])
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", lambda *a, **k: 1 / 0)
    q = torch.zeros(B, H, 5, DH)
    with caplog.at_level(logging.WARNING):
        assert attention_module._register_kernel(q, None) == "efficient"
    assert {
        f"register attention (flash, float32, head dim {DH}) on cpu": False,
        f"register attention (efficient, float32, head dim {DH}) on cpu": True,
    } == scan_module._VERDICTS
    assert "ZeroDivisionError" in caplog.text


def test_no_check_runs_while_compiling_and_the_widened_query_is_used(monkeypatch):
    monkeypatch.setattr(scan_module, "_VERDICTS", {})
    monkeypatch.setattr(attention_module, "FUSED_REGISTER_DEVICES", ())
    monkeypatch.setattr(attention_module, "_checked_kernels", lambda q, valid: ["cpu"])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert attention_module._register_kernel(torch.zeros(B, H, 5, DH), None) is None
    assert scan_module._VERDICTS == {}


def test_cpu_never_checks_and_fp64_or_other_devices_have_no_checked_kernel():
    assert attention_module._register_kernel(torch.zeros(1, 1, 2, 8, dtype=torch.float64), None) == "cpu"
    assert attention_module._checked_kernels(torch.zeros(1, 1, 2, 8), None) == []


# --- on a GPU: the real kernels against the widened query ----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-mask"])
def test_cuda_kernels_pass_their_check_and_are_selected(monkeypatch, dtype, head_dim, masked):
    """_register_kernel on CUDA: the check (T == S, an XL cache, a key mask where the kernel takes one)
    passes and the best kernel is chosen: flash for 16-bit calls without a key mask, efficient otherwise."""
    monkeypatch.setattr(scan_module, "_VERDICTS", {})
    q = torch.zeros(2, 4, 8, head_dim, device="cuda", dtype=dtype)
    valid = torch.ones(2, 8, dtype=torch.bool, device="cuda") if masked else None
    expected = "flash" if dtype != torch.float32 and not masked else "efficient"
    assert attention_module._register_kernel(q, valid) == expected, scan_module._VERDICTS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reset", [False, True], ids=["xl", "xl-reset"])
def test_cuda_layer_on_the_fused_merge_matches_the_widened_query(monkeypatch, dtype, reset):
    """A layer at a training shape (Dh 64, GQA, 16 registers): a 256-token call, then 192 tokens after that
    cache (row 0 reset when `reset`), outputs and every gradient, fused merge against the widened query."""
    monkeypatch.setattr(scan_module, "_VERDICTS", {})
    torch.manual_seed(0)
    model = CausalSelfAttention(512, 8, 4, rope_base=10000.0, n_registers=16).to("cuda", dtype)
    x = torch.randn(2, 448, 512, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)

    def results():
        y1, state = model(x[:, :256])
        if reset:
            state = state.reset_rows(torch.tensor([True, False], device="cuda"))
        y2, _ = model(x[:, 256:], state, 256)
        y = torch.cat([y1, y2], dim=1).float()
        return [y.detach(), *torch.autograd.grad(y.square().mean(), list(model.parameters()))]

    fused = results()
    assert scan_module._VERDICTS and all(scan_module._VERDICTS.values()), scan_module._VERDICTS
    monkeypatch.setattr(attention_module, "_checked_kernels", lambda q, valid: [])
    widened = results()
    tolerance = {torch.float32: 2e-3, torch.bfloat16: 5e-2}[dtype]
    names = ["y", *(n for n, _ in model.named_parameters())]
    for name, a, b in zip(names, fused, widened, strict=True):
        error = (a.float() - b.float()).abs().max().item()
        assert error <= tolerance * b.float().abs().max().item(), (name, error)
