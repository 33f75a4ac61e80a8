"""Decoding latency: milliseconds per token when stepping one token at a time after a prefilled context.

    python -m benchmarks.decode_latency [--model LABEL=ARCH:SIZE[:K=V,...]]... [--contexts 256 512 ...]
        [--device cpu|cuda] [--dtype fp32|bf16] [--steps 16]

For each context length the prompt is run once (prefill, not timed), then `--steps` single-token calls
continue from the returned state. Prints ms/token with the ratio to the first (baseline) model, and each
model's latency relative to its shortest context: flat for a state of constant size (a condenser-only
SeqCond), growing with the context for attention's KV state. Defaults take a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import torch

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
SEQCOND = f"{WIDTH},d_ff=768,num_kv_heads=4,seqcond_heads=8,num_query_heads=4,num_thetas=2,max_seq_len=8192"
DEFAULT_MODELS = [
    f"lswt=lswt:debug:{WIDTH},d_vocab=256,d_ff=512,rope_base=10000.0",
    f"seqcond=seqcond:debug:{SEQCOND},seqcond_ratio=3",  # 3 condensers + 1 attention block
    f"condenser-only=seqcond:debug:{SEQCOND},seqcond_ratio=4",  # ratio >= n_layers: no attention block
]


@torch.inference_mode()
def ms_per_token(model: torch.nn.Module, context: int, steps: int, device: str) -> float:
    vocab = model.config.vocab_size
    out = model(torch.randint(0, vocab, (1, context), device=device))
    tokens = torch.randint(0, vocab, (steps + 2, 1, 1), device=device)
    state = model(tokens[0], state=out.state).state  # warm-up step
    state = model(tokens[1], state=state).state

    def decode() -> None:
        nonlocal state
        for i in range(steps):
            state = model(tokens[i + 2], state=state).state

    return 1000 * seconds(decode, device, 1) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, DEFAULT_MODELS)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--steps", type=int, default=16, help="timed single-token steps per context")
    args = parser.parse_args(argv)
    specs = setup(args, DEFAULT_MODELS)
    dtype = DTYPES[args.dtype]

    counts, latency = [], {}  # (label, context) -> ms per token
    for spec in specs:
        model = spec.build(args.device, dtype).eval()
        counts.append(count_parameters(model))
        for context in args.contexts:
            latency[spec.label, context] = ms_per_token(model, context, args.steps, args.device)
        del model

    print(f"## Decode latency on {describe_device(args.device, args.dtype)}, batch 1, {args.steps} steps\n")
    print(parameter_table(specs, counts) + "\n")
    labels, columns = [spec.label for spec in specs], ["model"] + [f"context {n}" for n in args.contexts]
    print("ms per token (ratio to the baseline)\n")
    print(markdown_table(columns, ratio_rows(labels, args.contexts, latency, ".2f")) + "\n")
    print(f"latency relative to context {args.contexts[0]}\n")
    print(markdown_table(columns, growth_rows(labels, args.contexts, latency)))


if __name__ == "__main__":
    main()
