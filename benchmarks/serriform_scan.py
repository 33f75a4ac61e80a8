"""Benchmark: SerriformNet's parallel scan against the step loop it replaces (docs/architectures.md).

The original ran h_t = alpha * h_{t-1} + beta * x_t as a Python loop over time; `linear_scan`
(platform/models/layers/scan.py) solves it with chunked matmuls. Both run in the same process on the
same inputs; the table gives milliseconds per call (median), the speed-up of the scan over the loop, and
their largest relative difference. Run from the repository root:

    python -m benchmarks.serriform_scan --device cpu --dtype float32 [--backward]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from lctrain.models.layers.scan import linear_scan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def step_loop(u: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
    """The original's form: one small kernel per time step, in the scan's compute dtype."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, a = u.to(dtype), log_a.to(dtype).exp()
    h, states = torch.zeros_like(u[:, 0]), []
    for t in range(u.shape[1]):
        h = a * h + u[:, t]
        states.append(h)
    return torch.stack(states, dim=1)  # (B, T, N)


def timed(fn, *inputs: torch.Tensor, device: torch.device, repeats: int, backward: bool) -> tuple[float, torch.Tensor]:
    """Median milliseconds of `repeats` calls of fn(*inputs) after one warm-up, and the last output."""

    def call():
        out = fn(*inputs)
        if backward:
            out.float().square().mean().backward()
        return out

    call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), out.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the inputs")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512, 1024], help="recurrent channels m")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    mode = "forward + backward" if args.backward else "forward"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device {device}{threads}, dtype {args.dtype}, batch {args.batch}, chunk {args.chunk_size}, {mode}")
    print(f"{'T':>6} {'width':>6} {'loop ms':>10} {'scan ms':>10} {'speed-up':>9} {'max rel diff':>13}")
    for length in args.lengths:
        for width in args.widths:
            u = torch.randn(args.batch, length, width, device=device, dtype=dtype, requires_grad=args.backward)
            log_a = F.logsigmoid(torch.randn(width, device=device) * 3).requires_grad_(args.backward)
            timing = dict(device=device, repeats=args.repeats, backward=args.backward)
            loop_ms, loop_out = timed(step_loop, u, log_a, **timing)
            scan_ms, scan_out = timed(functools.partial(linear_scan, chunk_size=args.chunk_size), u, log_a, **timing)
            diff = ((scan_out - loop_out).abs().max() / loop_out.abs().max()).item()
            print(f"{length:>6} {width:>6} {loop_ms:>10.2f} {scan_ms:>10.2f} {loop_ms / scan_ms:>8.1f}x {diff:>13.1e}")


if __name__ == "__main__":
    main()
