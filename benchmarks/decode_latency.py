"""Decoding latency: milliseconds per token when stepping one token at a time after a prefilled context.

    python -m benchmarks.decode_latency [--model LABEL=ARCH:SIZE[:K=V,...]]... [--contexts 256 512 ...]
        [--device cpu|cuda] [--dtype fp32|bf16] [--steps 16] [--rounds 3] [--threads N]

For each context length the prompt is run once (prefill, not timed), then single-token calls continue
from the returned state: `--rounds` timings of `--steps` tokens, the models taking turns and the fastest
round counting. Prints ms/token with the ratio to the first (baseline) model, and each model's latency
relative to its shortest context: flat for a state of constant size (a condenser-only SeqCond,
SerriformNet's conv tails and recurrent vectors), growing with the context for attention's KV state.
Defaults take about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from benchmarks.common import (
    DTYPES,
    LSWT_MODEL,
    SEQCOND_SHAPE,
    SERRIFORM_MODEL,
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

WARMUP = 4  # untimed steps after the prefill
DEFAULT_MODELS = [
    LSWT_MODEL,
    f"seqcond=seqcond:debug:{SEQCOND_SHAPE},seqcond_ratio=3",  # 3 condensers + 1 attention block
    f"condenser-only=seqcond:debug:{SEQCOND_SHAPE},seqcond_ratio=4",  # ratio >= n_layers: no attention block
    SERRIFORM_MODEL,
]


class Decoder:
    """One model's sequence: prefilled with `context` random tokens, then advanced `steps` tokens per call."""

    def __init__(self, model: torch.nn.Module, context: int, device: str):
        self.model, self.vocab, self.device = model, model.config.vocab_size, device
        self.state = model(torch.randint(0, self.vocab, (1, context), device=device)).state
        self.advance(WARMUP)

    def advance(self, steps: int) -> None:
        tokens = torch.randint(0, self.vocab, (steps, 1, 1), device=self.device)
        for token in tokens:
            self.state = self.model(token, state=self.state).state


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, DEFAULT_MODELS)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--steps", type=int, default=16, help="single-token steps per timing")
    parser.add_argument("--rounds", type=int, default=3, help="timings per model and context (the fastest counts)")
    args = parser.parse_args(argv)
    specs = setup(args, DEFAULT_MODELS)
    models = [spec.build(args.device, DTYPES[args.dtype]).eval() for spec in specs]

    latency = {}  # (label, context) -> ms per token
    for context in args.contexts:
        decoders = [Decoder(model, context, args.device) for model in models]
        # Models take turns, and each keeps its fastest round: a busy machine slows all of them alike.
        for _ in range(args.rounds):
            for spec, decoder in zip(specs, decoders):
                ms = 1000 * seconds(partial(decoder.advance, args.steps), args.device, 1) / args.steps
                latency[spec.label, context] = min(ms, latency.get((spec.label, context), float("inf")))
        del decoders
    counts = [count_parameters(model) for model in models]

    print(f"## Decode latency on {describe_device(args.device, args.dtype)}, batch 1\n")
    print(parameter_table(specs, counts) + "\n")
    labels, columns = [spec.label for spec in specs], ["model"] + [f"context {n}" for n in args.contexts]
    print("ms per token (ratio to the baseline)\n")
    print(markdown_table(columns, ratio_rows(labels, args.contexts, latency, ".2f")) + "\n")
    print(f"latency relative to context {args.contexts[0]}\n")
    print(markdown_table(columns, growth_rows(labels, args.contexts, latency)))


if __name__ == "__main__":
    main()
