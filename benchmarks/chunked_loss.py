"""Peak memory and throughput of a training step with the chunked output head and cross-entropy, against
the same step over the full logits (the ratios are chunked / full, per model, measured in one process).

A step is what the training module does on a step it does not log: forward, the cross-entropy over every
target, backward and an AdamW step. "full" applies the head to the whole batch (B*T*V fp32 logits, kept
alive until the step ends, plus their gradient); "chunked" runs `--chunk` tokens at a time
(losses.head_losses), each chunk's gradient taken as it goes. With --checkpointing every block is
recomputed in backward (the module's activation_checkpointing), so the logits are most of what remains.

Memory on CPU is torch's own allocator accounting: the profiler records every allocation with the running
total of allocated bytes, so the peak is exact for tensors and unaffected by what the C allocator keeps
cached or by other processes (an RSS high-water mark sees neither torch's frees nor only this step). On
CUDA it is `max_memory_allocated`. "peak" counts everything allocated (weights, gradients and AdamW's
two moments included); "step's own" is the peak above those, what the step itself allocates. Throughput is
tokens per second of process CPU time (CUDA: wall-clock), the two modes alternating round by round.
Run from the repository root:

    python -m benchmarks.chunked_loss [--batch 2] [--seq 1024] [--rounds 3] [--checkpointing] [--no-full]
        [--model seqcond=seqcond:small]...
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from benchmarks.common import DTYPES, add_common_arguments, describe_device, markdown_table, seconds, setup, step_peak
from lctrain.cluster.strategies import checkpoint_blocks
from lctrain.training.losses import head_losses, token_weights

DEFAULT_MODELS = ["seqcond=seqcond:small", "lswt=lswt:tiny:vocab_size=50272"]


def train_step(model, optimizer, ids, targets, chunk_size: int | None) -> None:
    weights = token_weights(targets)
    if chunk_size:
        out = model(ids, return_hidden=True, return_logits=False)
        losses = head_losses(model.output_head, out.hidden, targets, weights, chunk_size=chunk_size)
    else:
        out = model(ids)  # (B, T, V) logits, alive until the step ends as in the training module
        losses = head_losses(lambda x: x, out.logits, targets, weights, chunk_size=None)
    losses.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as during training


def resident_bytes(model, optimizer) -> int:
    """Weights, gradients and the optimizer's state: allocated before a step begins and after it ends."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, DEFAULT_MODELS)
    parser.add_argument("--batch", type=int, default=2, help="rows per step (the goal's shape is 8)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per row")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per chunk (model.loss_chunk_size)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed steps per mode; 0: memory only")
    parser.add_argument("--checkpointing", action="store_true", help="recompute every block in backward")
    parser.add_argument(
        "--no-full", action="store_true", help="chunked only (a batch whose full logits do not fit); no ratios"
    )
    args = parser.parse_args()
    specs = setup(args, DEFAULT_MODELS)
    modes = {} if args.no_full else {"full": None}
    modes[f"chunked {args.chunk}"] = args.chunk
    checkpointing = "on" if args.checkpointing else "off"
    print(f"{describe_device(args.device, args.dtype)}; batch {args.batch} x {args.seq} tokens; "
          f"activation checkpointing {checkpointing}\n")  # fmt: skip
    rows = []
    for spec in specs:
        model = spec.build(args.device, DTYPES[args.dtype])
        if args.checkpointing:
            checkpoint_blocks(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        ids, targets = torch.randint(0, vocab, (2, args.batch, args.seq), generator=g).to(args.device)
        steps = {name: partial(train_step, model, optimizer, ids, targets, chunk) for name, chunk in modes.items()}
        for step in steps.values():  # warm-up: AdamW's moments and the gradients get allocated
            step()
        resident = resident_bytes(model, optimizer)
        above = {name: step_peak(step, args.device) for name, step in steps.items()}
        peaks = ", ".join(f"{name} {(resident + b) / 2**30:.2f} GiB" for name, b in above.items())
        print(f"{spec.label}: peak {peaks}", flush=True)  # kept if the timing rounds are cut short
        times = dict.fromkeys(modes, 0.0)
        for _ in range(args.rounds):
            for name, step in steps.items():
                times[name] += seconds(step, args.device, 1)
        tokens = args.rounds * ids.numel()
        for name in modes:
            peak, rate = resident + above[name], (tokens / times[name] if args.rounds else None)
            rate_cell = "-" if rate is None else f"{rate:,.0f}"
            cells = [f"{peak / 2**30:.2f} GiB", f"{above[name] / 2**30:.2f} GiB", rate_cell]
            if not args.no_full:  # each as a ratio to the full-logits step
                full_rate = tokens / times["full"] if args.rounds else None
                full = [resident + above["full"], above["full"], full_rate]
                values = [peak, above[name], rate]
                cells = [c if f is None else f"{c} ({v / f:.2f}x)" for c, v, f in zip(cells, values, full)]
            rows.append([spec.label, f"{vocab:,}", name, *cells])
        del model, optimizer, steps
    headers = ["model", "vocab", "loss", "peak", "step's own peak", "tokens/s"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
