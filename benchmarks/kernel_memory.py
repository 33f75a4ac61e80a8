"""Activation memory of a training step by sequence length: the families side by side, SeqCond and
SerriformNet on the PyTorch path and on the fused Triton kernels.

    python -m benchmarks.kernel_memory [--lengths 2048 4096 ...] [--batch-size 1] [--device cpu|cuda]
        [--model LABEL=ARCH:SIZE[:K=V,...]]...

A step is the forward pass, the cross-entropy and the backward pass; the figure is the most memory
allocated at once above what was allocated before it (weights and gradients, allocated by a first short
step, as during gradient accumulation). On CUDA it is `max_memory_allocated` with the kernels running. On
a CPU it is the allocator's own accounting (the profiler's memory events), with TRITON_INTERPRET=1 set by
this script so the kernels' Python side runs, but with the kernel launches themselves skipped and the
GPU's tile sizes in place: a step allocates the same tensors whatever values the kernels would write
(tests/models/scan_triton_cases.py checks it), and Triton's interpreter needs minutes per layer at these
lengths. Every model gets the same tokens.
"""

from __future__ import annotations

import argparse
import os
import sys

# Off CUDA, before torch or Triton is imported (Triton reads it once): the kernels' CPU interpreter.
if not any("cuda" in arg for arg in sys.argv[1:]):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DTYPES,
    LSWT_MODEL,
    SEQCOND_SHAPE,
    SERRIFORM_MODEL,
    add_common_arguments,
    describe_device,
    markdown_table,
    parameter_table,
    ratio_rows,
    setup,
    step_peak,
)
from benchmarks.train_throughput import per_scan_kernel  # noqa: E402
from lctrain.models import count_parameters  # noqa: E402

DEFAULT_MODELS = [LSWT_MODEL, f"seqcond=seqcond:debug:{SEQCOND_SHAPE},seqcond_ratio=3", SERRIFORM_MODEL]


class _SkippedLaunch:
    """Stands in for a Triton kernel: `kernel[grid](*args)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def skip_kernel_launches() -> None:
    """The kernels' GPU tile sizes, and their launches skipped: what a step allocates, without the
    interpreter's run time (see the module docstring)."""
    from lctrain.models import condenser_triton
    from lctrain.models.layers import scan_triton

    for module in (condenser_triton, scan_triton):
        for name, value in module.GPU_TILES.items():
            setattr(module, name, value)
        module._forward_kernel = module._backward_kernel = _SkippedLaunch()


def step(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    out = model(tokens[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss = loss + sum(out.aux_losses.values(), torch.zeros((), device=loss.device))
    loss.backward()


def activation_peak(model: torch.nn.Module, tokens: torch.Tensor, cuda: bool) -> int:
    """Bytes: the most allocated at once during one step, above the weights and gradients."""
    return step_peak(lambda: step(model, tokens), "cuda" if cuda else "cpu")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, DEFAULT_MODELS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    specs = per_scan_kernel(setup(args, DEFAULT_MODELS), ["torch", "triton"])
    cuda = args.device.startswith("cuda")
    if not cuda:
        skip_kernel_launches()
    models = [spec.build(args.device, DTYPES[args.dtype]).train() for spec in specs]
    for model in models:
        step(model, torch.zeros(1, 9, dtype=torch.long, device=args.device))  # first-call allocations, gradients
    peaks = {}  # (label, length) -> MiB
    for length in args.lengths:
        generator = torch.Generator().manual_seed(length)
        tokens = torch.randint(0, models[0].config.vocab_size, (args.batch_size, length + 1), generator=generator)
        for spec, model in zip(specs, models):
            peaks[spec.label, length] = activation_peak(model, tokens.to(args.device), cuda) / 2**20
            print(f"{spec.label} T={length}: {peaks[spec.label, length]:,.0f} MiB", file=sys.stderr, flush=True)

    how = "max_memory_allocated" if cuda else "allocator accounting, kernel launches skipped"
    print(f"## Activation memory of a training step on {describe_device(args.device, args.dtype)}, ({how})\n")
    print(f"batch {args.batch_size}; forward, cross-entropy and backward, above weights and gradients\n")
    print(parameter_table(specs, [count_parameters(model) for model in models]) + "\n")
    columns = ["MiB (ratio to the baseline)"] + [f"T={n}" for n in args.lengths]
    print(markdown_table(columns, ratio_rows([spec.label for spec in specs], args.lengths, peaks, ",.0f")))


if __name__ == "__main__":
    main()
