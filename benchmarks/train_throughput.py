"""Training throughput: tokens/s of forward + backward + AdamW step (plain torch, no Lightning) per length.

    python -m benchmarks.train_throughput [--model LABEL=ARCH:SIZE[:K=V,...]]... [--lengths 512 1024 ...]
        [--device cpu|cuda] [--dtype fp32|bf16] [--batch-size 1] [--steps 3] [--threads N]
        [--scan-kernels torch triton]

Prints markdown tables: parameters, tokens/s with the ratio to the first (baseline) model, the per-token
time at each length relative to the shortest (near 1 for a model whose cost is linear in length) and, on
CUDA, the memory a step allocates. The models take turns at each length and the fastest of `--steps`
steps counts, so a busy machine slows every model alike. The defaults (about 3.8M parameters each, all
of width 256 with a 4096-token vocabulary: LSWT and SeqCond of 4 layers, SerriformNet of 5 blocks) take
a few minutes on 2 CPU cores; pass larger models with --device cuda. `--scan-kernels torch triton` runs
each SeqCond and SerriformNet model once per recurrence kernel (their `scan_kernel` setting), side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.common import (
    DTYPES,
    LSWT_MODEL,
    SEQCOND_SHAPE,
    SERRIFORM_MODEL,
    ModelSpec,
    add_common_arguments,
    describe_device,
    growth_rows,
    markdown_table,
    parameter_table,
    ratio_rows,
    seconds,
    setup,
)
from lctrain.models import count_parameters
from lctrain.models.layers.scan import SCAN_KERNELS

DEFAULT_MODELS = [LSWT_MODEL, f"seqcond=seqcond:debug:{SEQCOND_SHAPE},seqcond_ratio=3", SERRIFORM_MODEL]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    out = model(tokens[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss = loss + sum(out.aux_losses.values(), torch.zeros((), device=loss.device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def per_scan_kernel(specs: list[ModelSpec], kernels: list[str] | None) -> list[ModelSpec]:
    """Each SeqCond and SerriformNet spec once per kernel, labelled "label[kernel]"; others unchanged."""
    if not kernels:
        return specs
    out = []
    for spec in specs:
        if spec.arch not in ("seqcond", "serriform"):
            out.append(spec)
            continue
        for kernel in kernels:
            overrides = {**spec.overrides, "scan_kernel": kernel}
            out.append(dataclasses.replace(spec, label=f"{spec.label}[{kernel}]", overrides=overrides))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, DEFAULT_MODELS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and length (the fastest counts)")
    parser.add_argument(
        "--scan-kernels",
        nargs="+",
        choices=SCAN_KERNELS,
        help="run each SeqCond and SerriformNet model once per recurrence kernel, e.g. torch triton",
    )
    args = parser.parse_args(argv)
    specs = per_scan_kernel(setup(args, DEFAULT_MODELS), args.scan_kernels)
    dtype, cuda = DTYPES[args.dtype], args.device.startswith("cuda")

    models = [spec.build(args.device, dtype).train() for spec in specs]
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-4) for model in models]
    best, step_gib = {}, {}  # (label, length) -> fastest step in seconds, GiB allocated by a step
    for length in args.lengths:
        tokens = torch.randint(0, models[0].config.vocab_size, (args.batch_size, length + 1), device=args.device)
        for spec, model, optimizer in zip(specs, models, optimizers):
            resting = torch.cuda.memory_allocated() if cuda else 0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            train_step(model, optimizer, tokens)  # warm-up: allocations, kernel choices, optimizer state
            step_gib[spec.label, length] = (torch.cuda.max_memory_allocated() - resting) / 2**30 if cuda else 0.0
        # Models take turns, and each keeps its fastest step: a busy machine slows all of them alike.
        for _ in range(args.steps):
            for spec, model, optimizer in zip(specs, models, optimizers):
                step = seconds(partial(train_step, model, optimizer, tokens), args.device, 1)
                best[spec.label, length] = min(step, best.get((spec.label, length), float("inf")))
    per_second = {(label, n): args.batch_size * n / t for (label, n), t in best.items()}
    counts = [count_parameters(model) for model in models]

    print(f"## Training throughput on {describe_device(args.device, args.dtype)}, batch {args.batch_size}\n")
    print(parameter_table(specs, counts) + "\n")
    labels, columns = [spec.label for spec in specs], ["model"] + [f"T={n}" for n in args.lengths]
    print("tokens/s (ratio to the baseline)\n")
    print(markdown_table(columns, ratio_rows(labels, args.lengths, per_second, ",.0f")) + "\n")
    per_token = {key: 1 / value for key, value in per_second.items()}
    print(f"per-token time relative to T={args.lengths[0]}\n")
    print(markdown_table(columns, growth_rows(labels, args.lengths, per_token)))
    if cuda:
        print("\nGPU memory a training step allocates beyond weights, GiB (ratio to the baseline)\n")
        print(markdown_table(columns, ratio_rows(labels, args.lengths, step_gib, ".2f")))


if __name__ == "__main__":
    main()
