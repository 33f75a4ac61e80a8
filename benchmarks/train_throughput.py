"""Training throughput: tokens/s of forward + backward + AdamW step (plain torch, no Lightning) per length.

    python -m benchmarks.train_throughput [--model LABEL=ARCH:SIZE[:K=V,...]]... [--lengths 512 1024 ...]
        [--device cpu|cuda] [--dtype fp32|bf16] [--batch-size 1] [--steps 2]

Prints three markdown tables: parameters, tokens/s with the ratio to the first (baseline) model, and the
per-token time at each length relative to the shortest, which stays near 1 for a model whose cost is
linear in length. The defaults (about 3.8M parameters each, 4 layers of width 256, a 4096-token vocabulary)
take a few minutes on 2 CPU cores; pass larger sizes with --device cuda.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.common import (
    DTYPES,
    add_common_arguments,
    describe_device,
    growth_rows,
    markdown_table,
    parameter_table,
    ratio_rows,
    seconds,
    setup,
)
from platform.models import count_parameters

WIDTH = "vocab_size=4096,d_model=256,n_layers=4,n_heads=4"
DEFAULT_MODELS = [
    # LSWT's feed-forward is narrowed to 2 * d_model so that both models hold 3.8M parameters.
    f"lswt=lswt:debug:{WIDTH},d_vocab=256,d_ff=512,rope_base=10000.0",
    f"seqcond=seqcond:debug:{WIDTH},d_ff=768,num_kv_heads=4,seqcond_ratio=3,seqcond_heads=8,num_query_heads=4,"
    "num_thetas=2,max_seq_len=8192",
]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    out = model(tokens[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss = loss + sum(out.aux_losses.values(), torch.zeros((), device=loss.device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, DEFAULT_MODELS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per length, after one warm-up step")
    args = parser.parse_args(argv)
    specs = setup(args, DEFAULT_MODELS)
    dtype, cuda = DTYPES[args.dtype], args.device.startswith("cuda")

    counts, per_second, peak_gib = [], {}, {}  # (label, length) -> tokens/s, GiB
    for spec in specs:
        model = spec.build(args.device, dtype).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        counts.append(count_parameters(model))
        for length in args.lengths:
            tokens = torch.randint(0, model.config.vocab_size, (args.batch_size, length + 1), device=args.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            train_step(model, optimizer, tokens)  # warm-up: allocations, kernel choices, optimizer state
            elapsed = seconds(partial(train_step, model, optimizer, tokens), args.device, args.steps)
            per_second[spec.label, length] = args.batch_size * length * args.steps / elapsed
            peak_gib[spec.label, length] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        del model, optimizer

    print(f"## Training throughput on {describe_device(args.device, args.dtype)}, batch {args.batch_size}\n")
    print(parameter_table(specs, counts) + "\n")
    labels, columns = [spec.label for spec in specs], ["model"] + [f"T={n}" for n in args.lengths]
    print("tokens/s (ratio to the baseline)\n")
    print(markdown_table(columns, ratio_rows(labels, args.lengths, per_second, ",.0f")) + "\n")
    per_token = {key: 1 / value for key, value in per_second.items()}
    print(f"per-token time relative to T={args.lengths[0]}\n")
    print(markdown_table(columns, growth_rows(labels, args.lengths, per_token)))
    if cuda:
        print("\npeak GPU memory, GiB (ratio to the baseline)\n")
        print(markdown_table(columns, ratio_rows(labels, args.lengths, peak_gib, ".2f")))


if __name__ == "__main__":
    main()
