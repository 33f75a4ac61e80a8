"""The planner's activation estimate against the peak memory measured on CPU, with and without checkpointing.

The measurement is torch's own allocator accounting: the profiler records every CPU allocation and the
running total of allocated bytes, and the peak of that total during one forward and backward, minus the
total before it, is the activation peak. Gradients are allocated beforehand, as during gradient
accumulation, so the peak holds activations and transients only (the planner lists gradients on their
own line). Weights are a constant: what is allocated does not depend on their values. Prints one row per
(size, batch, tokens, checkpointing) with the estimate/measured ratio. Run from the repository root:

    python -m benchmarks.activation_memory [--sizes debug tiny] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import peak_above_start
from lctrain.cluster.planner import ACTIVATION_MODELS, PRECISION_BYTES
from lctrain.cluster.strategies import checkpoint_blocks
from lctrain.models.registry import build_model, config_for
from lctrain.training.losses import token_nll

CASES = {"debug": [(8, 256), (4, 1024)], "tiny": [(1, 128), (1, 256), (2, 512)]}


def measured_activation_peak(arch: str, size: str, batch: int, seq_len: int, checkpointing: bool) -> int:
    """Peak allocated bytes above weights and gradients during one training step's forward and backward."""
    with torch.device("meta"):
        model = build_model(arch, size)
    model.to_empty(device="cpu")
    for p in model.parameters():  # values do not change what is allocated; a constant skips a slow init
        p.detach().fill_(0.01)
        p.grad = torch.zeros_like(p)  # allocated before, as during gradient accumulation
    if checkpointing:
        checkpoint_blocks(model)
    vocab = model.config.vocab_size
    ids, targets = torch.randint(0, vocab, (2, batch, seq_len), generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(ids)  # the module keeps out.logits alive for its metrics until the step ends
        nll, n_tokens = token_nll(out.logits, targets)
        (nll / n_tokens).backward()
        del out, nll
    return peak_above_start(prof)


def estimated_activation_peak(arch: str, size: str, batch: int, seq_len: int, checkpointing: bool) -> int:
    b = PRECISION_BYTES["32-true"]
    estimate = ACTIVATION_MODELS[arch](config_for(arch, size), batch * seq_len, b["c"], b["r"], b["grad"])
    return estimate.with_checkpointing if checkpointing else estimate.without_checkpointing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'size':6s} {'B':>3s} {'T':>5s} {'ckpt':>5s} {'measured MiB':>13s} {'estimate MiB':>13s} {'ratio':>6s}")
    for size in args.sizes:
        for batch, seq_len in CASES[size]:
            for checkpointing in (False, True):
                measured = measured_activation_peak("lswt", size, batch, seq_len, checkpointing)
                estimate = estimated_activation_peak("lswt", size, batch, seq_len, checkpointing)
                print(
                    f"{size:6s} {batch:3d} {seq_len:5d} {str(checkpointing):>5s} {measured / 2**20:13.1f} "
                    f"{estimate / 2**20:13.1f} {estimate / measured:6.2f}"
                )


if __name__ == "__main__":
    main()
