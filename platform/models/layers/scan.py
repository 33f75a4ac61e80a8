"""A diagonal linear recurrence h_t = a * h_{t-1} + u_t, computed in parallel over time.

SerriformNet's sparse recurrence (docs/architectures.md) needs it; any family with a
per-channel, time-invariant decay can use it. Within a chunk of C steps the recurrence is a
lower-triangular Toeplitz matrix L[t, s] = a^(t-s), applied as one batched matmul, and every entry
lies in [0, 1]: nothing is divided by a small power of `a`, which is what makes the cumulative-product
form h_t = a^t * cumsum(a^-s * u_s) overflow on long sequences. The states entering successive chunks
obey the same recurrence with decay a^C, so the same function solves them one level up: log_C(T)
levels, O(T * C) work, no Python loop over time.

On a GPU the same recurrence also has fused Triton kernels (scan_triton.py); `scan` picks between the
two by a model's `scan_kernel` setting, and `use_triton_kernel` makes that choice for other callers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import log_once

log = logging.getLogger(__name__)

SCAN_KERNELS = ("auto", "torch", "triton")
"""Values of a model's `scan_kernel`: "auto" (the Triton kernels on CUDA when Triton is importable, else
PyTorch), "torch" (always PyTorch), "triton" (the kernels or an error)."""


def check_scan_kernel(kernel: str) -> None:
    """A one-line error for a `scan_kernel` value that is not one of SCAN_KERNELS."""
    if kernel not in SCAN_KERNELS:
        raise ValueError(f"model.scan_kernel='{kernel}' is unknown; choose one of: {', '.join(SCAN_KERNELS)}")


def use_triton_kernel(kernel: str, x: Tensor, op: str = "recurrence", pairs: Pairs | None = None) -> bool:
    """Whether `op` on `x` with the setting `kernel` runs its Triton kernels; logs each choice once.

    "auto" takes them only for CUDA tensors, and only once `kernels_agree` has checked them on that device
    (with `pairs`, the op's own check; the recurrence's by default), so a CPU run is the PyTorch path whatever
    the environment, and a GPU whose Triton cannot compile or miscomputes them falls back to PyTorch with a
    warning instead of failing or training wrong. "triton" also accepts Triton's CPU interpreter
    (TRITON_INTERPRET=1), which is how the kernels are tested.
    """
    check_scan_kernel(kernel)
    use = False
    if kernel == "triton" or (kernel == "auto" and x.is_cuda):
        from . import scan_triton  # imported only here: a CPU run never loads Triton

        use = scan_triton.kernel_available(x)
        if kernel == "triton" and not use:
            found = "not installed" if scan_triton.triton is None else f"a {x.device.type} tensor"
            raise ValueError(
                f"model.scan_kernel='triton' needs Triton and a CUDA device ({found}); use 'auto' or 'torch'"
            )
        if kernel == "auto" and use:
            use = kernels_agree(x.device, op, pairs or recurrence_pairs)
    log_once(f"{op} kernel: {'triton' if use else 'torch'} on {x.device.type} (scan_kernel='{kernel}')")
    return use


def settle_kernel_checks(model: nn.Module, device: torch.device) -> None:
    """Run now, eagerly, the once-per-device check of every Triton op that `model` selects with
    scan_kernel 'auto', so that a compiled graph, which cannot run a check while it traces (and so would
    take the PyTorch path), finds the verdicts and uses the kernels on `device`. A module names its ops
    in `kernel_checks()`: (its scan_kernel setting, the op, the op's check)."""
    probe = torch.empty(0, device=device)
    for module in model.modules():
        if hasattr(module, "kernel_checks"):
            for kernel, op, pairs in module.kernel_checks():
                if kernel == "auto":
                    use_triton_kernel(kernel, probe, op, pairs)


Pairs = Callable[[torch.device], list[tuple[Tensor, Tensor]]]
"""An op's check: on a device, run a small random case through its kernels and through its reference path
(PyTorch's), and return (kernel's, reference's on CPU) pairs of outputs and gradients that must agree."""

_VERDICTS: dict[str, bool] = {}  # "op on device" -> whether that op's kernels passed kernels_agree there


def kernels_agree(
    device: torch.device,
    op: str = "recurrence",
    pairs: Pairs | None = None,
    *,
    kernels: str = "the Triton kernels",
    reference: str = "PyTorch",
    tolerance: float = 1e-4,
) -> bool:
    """Once per op and device: do the op's `kernels` compile and give the `reference` path's values and
    gradients (the small random case of `pairs`, to `tolerance`, relative and absolute) here? While
    torch.compile traces, a device not checked yet takes the reference path."""
    key = f"{op} on {device}"
    if key in _VERDICTS:
        return _VERDICTS[key]
    if torch.compiler.is_compiling():
        return False
    try:
        # a plain context whatever the caller's: a first call may come under inference mode, autocast or
        # activation checkpointing (whose saved-tensor hooks must not see the check's own graph)
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(device.type, enabled=False),
            torch.autograd.graph.saved_tensors_hooks(_keep, _keep),
        ):
            found = (pairs or recurrence_pairs)(device)
        agree = all(torch.allclose(a.detach().cpu(), b, rtol=tolerance, atol=tolerance) for a, b in found)
        reason = f"they differ from the {reference} path"
    except Exception as e:  # a Triton or driver version that cannot compile them: the PyTorch path still can
        agree, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not agree:
        log.warning(
            "%s kernel: %s failed their check on %s (%s); using the %s path", op, kernels, device, reason, reference
        )
    _VERDICTS[key] = agree
    return agree


def _keep(t: Tensor) -> Tensor:
    return t


def recurrence_pairs(device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """`decayed_scan` on `device` against `linear_scan` on CPU: states and the gradients of u, log a and h0."""
    from .scan_triton import decayed_scan

    generator = torch.Generator().manual_seed(0)
    u, h0 = torch.randn(2, 77, 40, generator=generator), torch.randn(2, 40, generator=generator)
    log_a = -torch.rand(40, generator=generator)
    grads = torch.randn(2, 77, 40, generator=generator)
    ours = [t.to(device, copy=True).requires_grad_() for t in (u, log_a, h0)]
    theirs = [t.clone().requires_grad_() for t in (u, log_a, h0)]
    h_ours, h_theirs = decayed_scan(*ours), linear_scan(*theirs)
    h_ours.backward(grads.to(device))
    h_theirs.backward(grads)
    return [(h_ours, h_theirs)] + [(a.grad, b.grad) for a, b in zip(ours, theirs)]


def scan(u: Tensor, log_a: Tensor, h0: Tensor | None = None, *, kernel: str = "auto", chunk_size: int = 64) -> Tensor:
    """`linear_scan`, or the same function by the fused Triton kernels where `kernel` selects them (see
    use_triton_kernel); chunk_size only concerns the PyTorch path."""
    if use_triton_kernel(kernel, u):
        from .scan_triton import decayed_scan

        return decayed_scan(u, log_a, h0)
    return linear_scan(u, log_a, h0, chunk_size=chunk_size)


def linear_scan(u: Tensor, log_a: Tensor, h0: Tensor | None = None, *, chunk_size: int = 64) -> Tensor:
    """All states h (B, T, N) of h_t = exp(log_a) * h_{t-1} + u_t with h_{-1} = h0.

    u (B, T, N) inputs; log_a (N,) per-channel log decays, <= 0 (pass logsigmoid of a parameter to
    keep a in (0, 1) without ever forming log 0); h0 (B, N), zeros when None. Computed and returned in
    fp32, or fp64 for fp64 inputs. The last row h[:, -1] is the state to carry into the next call.
    """
    dtype = torch.promote_types(u.dtype, torch.float32)
    # channels first and time last, so that chunks are contiguous views and the per-channel matmuls
    # batch over a leading dimension (a batched matmul over a unit batch stride is ~100x slower on CPU)
    u_NBT = u.to(dtype).permute(2, 0, 1).contiguous()  # (N, B, T)
    h0_NB = u_NBT.new_zeros(u_NBT.shape[:2]) if h0 is None else h0.to(dtype).t()  # (N, B)
    h_NBT = _scan(u_NBT, log_a.to(dtype), h0_NB, chunk_size)
    return h_NBT.permute(1, 2, 0)  # (B, T, N)


def _scan(u_NBT: Tensor, log_a: Tensor, h0_NB: Tensor, chunk_size: int) -> Tensor:
    N, B, T = u_NBT.shape
    n_chunks = -(-T // chunk_size)
    if n_chunks <= 1:
        return _within_chunk(u_NBT, log_a) + _carry(log_a, T).unsqueeze(1) * h0_NB.unsqueeze(-1)  # (N, B, T)

    if T % chunk_size:  # zeros appended after the end cannot reach any earlier step; cut off again below
        u_NBT = F.pad(u_NBT, (0, n_chunks * chunk_size - T))
    u = u_NBT.view(N, B, n_chunks, chunk_size)  # (N, B, n, C)
    local = _within_chunk(u, log_a)  # (N, B, n, C): each chunk as if it started from zero
    # the state at the end of chunk j is a^C * (state at the end of chunk j-1) + local end of chunk j
    ends = _scan(local[..., -1], log_a * chunk_size, h0_NB, chunk_size)  # (N, B, n)
    starts = torch.cat([h0_NB.unsqueeze(-1), ends[..., :-1]], dim=-1)  # (N, B, n): state entering each chunk
    h = local + _carry(log_a, chunk_size).view(N, 1, 1, chunk_size) * starts.unsqueeze(-1)  # (N, B, n, C)
    return h.view(N, B, n_chunks * chunk_size)[..., :T]  # (N, B, T)


def _within_chunk(u: Tensor, log_a: Tensor) -> Tensor:
    """u (N, ..., C) -> zero-start states (N, ..., C), h_t = sum_{s <= t} a^(t-s) u_s: one matmul per channel."""
    N, C = u.shape[0], u.shape[-1]
    steps = torch.arange(C, device=u.device, dtype=u.dtype)
    lag = steps - steps.unsqueeze(1)  # (C, C): [s, t] = t - s
    decay = _powers(lag.clamp(min=0) * log_a.view(N, 1, 1)).triu()  # (N, C, C): a^(t-s) where s <= t, else 0
    # contiguous: the chunk ends handed up a level arrive strided, and a strided bmm leaves the BLAS fast path
    u_NLC = u.reshape(N, -1, C).contiguous()  # (N, L, C), L = every middle index
    return torch.bmm(u_NLC, decay).view(u.shape)  # (N, L, C) @ (N, C, C) -> (N, ..., C)


def _carry(log_a: Tensor, length: int) -> Tensor:
    """(N, length): a^(t+1), the weight of the state entering a chunk at its step t."""
    steps = torch.arange(1, length + 1, device=log_a.device, dtype=log_a.dtype)
    return _powers(log_a.unsqueeze(1) * steps)  # (N, C)


def _powers(exponent: Tensor) -> Tensor:
    """exp of exponents <= 0, with those below -60 (weights under 1e-26, far below the resolution of
    a sum that also holds a weight of 1) set to exactly 0: subnormal floats slow CPU matmuls badly."""
    return torch.where(exponent > -60, exponent, float("-inf")).exp()
