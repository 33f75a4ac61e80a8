"""Peak memory and time of SelfExtend's replacement merge (the baseline) against its two-pass merge.

Each (length, implementation) cell runs in a fresh process so one cell's peak cannot hide another's:
on CPU the peak is the resident-set high-water mark above what the inputs already took (ru_maxrss),
on CUDA torch's peak allocated bytes. Plain causal SDPA (no SelfExtend) is listed for scale. Prints a
table with the two-pass/replacement ratios. Run from the repository root:

    python -m benchmarks.self_extend_memory [--device cuda] [--lengths 1024 2048 4096 8192]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from lctrain.models.layers.attention import attention
from lctrain.models.layers.rope import rotate
from lctrain.models.layers.self_extend import self_extend_attention

KINDS = ("replacement", "two_pass", "plain_sdpa")


def measure(args: argparse.Namespace) -> dict:
    """One cell, in this process: peak extra memory (MiB) and the median time of `repeats` calls (s)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shape = (1, args.heads, args.length, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))

    def call(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> torch.Tensor:
        if args.kind == "plain_sdpa":
            positions = torch.arange(q.shape[2], device=device)
            return attention(rotate(q, positions, 10000.0), rotate(k, positions, 10000.0), v, backend="sdpa")
        return self_extend_attention(
            q,
            k,
            v,
            group_size=args.group_size,
            window_size=args.window_size,
            implementation=args.kind,
            block_size=args.block_size,
            backend="sdpa",  # the torch paths, on either device (flash-attn is not installed here)
        )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # warm-up on a short input just past the window: lazy initialisation stays out of the measurement
    call(q[:, :, : args.window_size + 16], k[:, :, : args.window_size + 16], v[:, :, : args.window_size + 16])
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        sync()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        call()
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**10
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak, "seconds": sorted(times)[len(times) // 2]}


def run_cell(args: argparse.Namespace, length: int, kind: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.self_extend_memory", "--worker", "--length", str(length)]
    command += ["--kind", kind, "--device", args.device, "--dtype", args.dtype, "--heads", str(args.heads)]
    command += ["--head-dim", str(args.head_dim), "--group-size", str(args.group_size)]
    command += ["--window-size", str(args.window_size), "--block-size", str(args.block_size)]
    command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=2, help="B = 1; the replacement holds 2-3 (H, T, T) maps")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--window-size", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (0: torch's default); 1 keeps a shared machine's timings stable",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return

    print(
        f"device={args.device} dtype={args.dtype} B=1 H={args.heads} Dh={args.head_dim} G={args.group_size} "
        f"W={args.window_size} block={args.block_size} threads={args.threads or torch.get_num_threads()}; "
        f"peak = memory above the inputs; time = median of {args.repeats}; ratio = two_pass / replacement"
    )
    header = f"{'T':>6} | {'replacement':>20} | {'two_pass':>20} | ratio mem | ratio time | {'plain SDPA':>20}"
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        cells = {kind: run_cell(args, length, kind) for kind in KINDS}
        rep, two, plain = (cells[kind] for kind in KINDS)
        print(
            f"{length:>6} | {rep['peak_mib']:>8.1f} MiB {rep['seconds']:>7.3f} s | "
            f"{two['peak_mib']:>8.1f} MiB {two['seconds']:>7.3f} s | "
            f"{two['peak_mib'] / max(rep['peak_mib'], 1e-9):>9.3f} | {two['seconds'] / rep['seconds']:>10.3f} | "
            f"{plain['peak_mib']:>8.1f} MiB {plain['seconds']:>7.3f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
