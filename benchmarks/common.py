"""What every benchmark shares: model specs from the command line, devices and dtypes, timing, tables.

A model is named `LABEL=ARCH:SIZE[:KEY=VALUE,...]` (label optional), e.g.
`seqcond=seqcond:debug:d_model=256,n_layers=4`; values are Python literals or plain strings. The first
model of a run is the baseline that ratios are taken against, measured in the same process.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import time
from collections.abc import Callable

import torch
from torch import nn

from lctrain.models import build_model

# The equal-size models the throughput and latency benchmarks compare by default (3.8M parameters each):
# LSWT's feed-forward narrowed to 2 * d_model, SeqCond at the same width (3 condensers + 1 attention
# block at seqcond_ratio 3), SerriformNet with 5 blocks (dilations 1, 2, 4, 1, 2; 1.4% below LSWT).
WIDTH = "vocab_size=4096,d_model=256,n_layers=4,n_heads=4"
LSWT_MODEL = f"lswt=lswt:debug:{WIDTH},d_vocab=256,d_ff=512,rope_base=10000.0"
SEQCOND_SHAPE = f"{WIDTH},d_ff=768,n_kv_heads=4,seqcond_heads=8,num_query_heads=4,num_thetas=2,max_seq_len=16384"
SERRIFORM_MODEL = "serriform=serriform:debug:vocab_size=4096,d_model=256,n_layers=5"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    label: str
    arch: str
    size: str
    overrides: dict

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        label, _, body = text.partition("=") if "=" in text.split(":", 1)[0] else ("", "", text)
        arch, _, rest = body.partition(":")
        size, _, items = rest.partition(":")
        size = size or "debug"
        overrides = {}
        for item in filter(None, items.split(",")):
            key, _, value = item.partition("=")
            try:
                overrides[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                overrides[key] = value
        return cls(label or f"{arch}:{size}", arch, size, overrides)

    def build(self, device: str, dtype: torch.dtype) -> nn.Module:
        torch.manual_seed(0)
        return build_model(self.arch, self.size, **self.overrides).to(device=device, dtype=dtype)


def add_common_arguments(parser: argparse.ArgumentParser, default_models: list[str]) -> None:
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="[LABEL=]ARCH:SIZE[:KEY=VALUE,...]",
        help=f"repeatable; the first is the baseline (default: {' '.join(default_models)})",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    # One thread by default: on a shared 2-core machine a second OpenMP thread often waits for a busy core
    # (elementwise ops were measured 10x slower with 2 threads than with 1 there).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 keeps torch's choice")


def setup(args: argparse.Namespace, default_models: list[str]) -> list[ModelSpec]:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; none is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    return [ModelSpec.parse(text) for text in (args.models or default_models)]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Seconds of `repeats` calls of fn: wall-clock after the GPU has finished earlier work, or on the CPU
    this process's CPU time, which other processes on a busy machine do not inflate (with one thread it
    is the compute time itself)."""
    if not device.startswith("cuda"):
        start = time.process_time()
        for _ in range(repeats):
            fn()
        return time.process_time() - start
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def parameter_table(specs: list[ModelSpec], counts: list[int]) -> str:
    rows = [[s.label, f"{s.arch}:{s.size}", f"{n / 1e6:.2f}M", f"{n / counts[0]:.2f}"] for s, n in zip(specs, counts)]
    return markdown_table(["model", "family:size", "parameters", "vs baseline"], rows)


def ratio_rows(labels: list[str], keys: list, values: dict, fmt: str) -> list[list[str]]:
    """One row per label: each value of `values[label, key]` and its ratio to the first label's."""
    base = labels[0]
    return [
        [label] + [f"{values[label, k]:{fmt}} ({values[label, k] / values[base, k]:.2f}x)" for k in keys]
        for label in labels
    ]


def growth_rows(labels: list[str], keys: list, values: dict) -> list[list[str]]:
    """One row per label: `values[label, key]` relative to its value at the first key."""
    return [[label] + [f"{values[label, k] / values[label, keys[0]]:.2f}" for k in keys] for label in labels]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def describe_device(device: str, dtype: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} ({dtype}, torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} thread(s), process CPU time ({dtype}, torch {torch.__version__})"


def step_peak(step: Callable[[], object], device: str) -> int:
    """Peak bytes allocated during `step()` above what was allocated when it began: on CUDA the caching
    allocator's peak, elsewhere torch's allocator accounting in the profiler (`peak_above_start`)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return peak_above_start(prof)


def peak_above_start(prof) -> int:
    """The most bytes allocated at once during a `torch.profiler.profile(profile_memory=True)` run, above
    what was allocated when it started: torch's own allocator accounting, on any device."""
    from torch._C._profiler import _EventType

    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            allocations.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
        stack.extend(event.children)
    allocations.sort()
    start = allocations[0][1] - allocations[0][2]  # the running total just before the first event
    return max(total for _, total, _ in allocations) - start
