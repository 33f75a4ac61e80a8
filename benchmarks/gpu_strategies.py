"""Step time and peak GPU memory of the strategies on one CUDA GPU, against DDP in bf16-mixed, with the
planner's estimate for the same layout.

Each case trains the same LSWT size on the built-in corpus for a few steps in a fresh process: DDP and
FSDP2 in bf16-mixed and bf16-true, FSDP2 with activation checkpointing, Lightning's FSDPStrategy, and
DeepSpeed ZeRO stages 1, 2 and 3 (configs/deepspeed/; skipped with a line when deepspeed is not installed).
It uses torch, Lightning and torchmetrics only (not the command line), so it runs on a bare GPU image.
Run from the repository root:

    python -m benchmarks.gpu_strategies [--size small] [--seq_len 1024] [--batch 8] [--steps 30]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time

CASES = [  # (strategy, precision, activation checkpointing); the first is the baseline
    ("ddp", "bf16-mixed", False),
    ("ddp", "bf16-true", False),
    ("fsdp2", "bf16-mixed", False),
    ("fsdp2", "bf16-true", False),
    ("fsdp2", "bf16-mixed", True),
    ("fsdp", "bf16-mixed", False),
    ("deepspeed-zero1", "bf16-mixed", False),  # configs/deepspeed/zero<stage>.json
    ("deepspeed-zero2", "bf16-mixed", False),
    ("deepspeed-zero3", "bf16-mixed", False),
]
CUDA_ONLY = ("fsdp", "deepspeed")  # Lightning's FSDPStrategy and DeepSpeed refuse a CPU
WARMUP = 10  # steps left out of the timing (compilation of kernels, allocator growth)


def run_case(args: argparse.Namespace) -> dict:
    """One case in this process: median step time (s), peak allocated memory (GiB), planner estimate (GiB)."""
    import lightning as L
    import torch

    from lctrain.cluster.planner import GiB, Layout, plan_memory
    from lctrain.cluster.strategies import Parallelism, build_strategy
    from lctrain.data.datamodule import TokenDataModule
    from lctrain.training.module import LanguageModelModule

    cuda = args.accelerator == "gpu"

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if cuda and trainer.global_step == WARMUP:
                torch.cuda.reset_peak_memory_stats()
            if cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
            if trainer.global_step > WARMUP:
                self.times.append(time.perf_counter() - self._start)

    torch.backends.cuda.matmul.allow_tf32 = True
    data = TokenDataModule(args.data_dir, seq_len=args.seq_len, batch_size=args.batch, source="builtin")
    data.prepare_data()
    module = LanguageModelModule(
        "lswt", args.size, vocab_size=data.vocab_size, activation_checkpointing=args.checkpointing, scheduler=None
    )
    strategy, _, zero = args.strategy.partition("-zero")  # "deepspeed-zero3" -> deepspeed, stage 3
    zero_config = {"deepspeed_config": f"configs/deepspeed/zero{zero}.json"} if zero else {}
    parallelism = Parallelism(strategy=strategy, activation_checkpointing=args.checkpointing, **zero_config)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, strategy=build_strategy(parallelism, module, args.batch),
        precision=args.precision, max_steps=WARMUP + args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    layout = Layout(
        strategy=strategy, zero_stage=int(zero or 0), precision=args.precision,
        activation_checkpointing=args.checkpointing, micro_batch=args.batch, seq_len=args.seq_len,
    )  # fmt: skip
    estimate = plan_memory("lswt", args.size, module.model_config, layout)
    return {
        "step_s": statistics.median(timer.times),
        "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else float("nan"),
        "estimate_gib": estimate.total / GiB,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data_dir", default=None, help="built-in corpus shards (built when missing)")
    parser.add_argument("--accelerator", default="gpu", help="cpu only checks that the script runs")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # strategy precision checkpointing
    args = parser.parse_args()
    if args.case:
        args.strategy, args.precision, args.checkpointing = args.case[0], args.case[1], args.case[2] == "True"
        print("RESULT " + json.dumps(run_case(args)))
        return

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="gpu-strategies-") + "/builtin-bytes"
    common = ["--size", args.size, "--seq_len", str(args.seq_len), "--batch", str(args.batch)]
    common += ["--steps", str(args.steps), "--data_dir", data_dir, "--accelerator", args.accelerator]
    print(f"LSWT {args.size}, micro-batch {args.batch} x {args.seq_len} tokens, median of {args.steps} steps")
    print(f"{'strategy':16s} {'precision':10s} {'ckpt':5s} {'step ms':>8s} {'x base':>7s} {'peak GiB':>9s} "
          f"{'x base':>7s} {'planned GiB':>12s} {'peak/plan':>9s}")  # fmt: skip
    base = None
    cases = CASES if args.accelerator == "gpu" else [c for c in CASES if c[0].split("-")[0] not in CUDA_ONLY]
    for strategy, precision, checkpointing in cases:
        if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            print(f"{strategy:16s} {precision:10s} {checkpointing!s:5s} skipped: deepspeed is not installed")
            continue
        command = [sys.executable, "-m", "benchmarks.gpu_strategies", *common, "--case", strategy, precision]
        out = subprocess.run([*command, str(checkpointing)], capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            print(f"{strategy:16s} {precision:10s} {checkpointing!s:5s} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(lines[-1][7:])
        base = base or r
        print(
            f"{strategy:16s} {precision:10s} {checkpointing!s:5s} {r['step_s'] * 1e3:8.1f} "
            f"{r['step_s'] / base['step_s']:7.2f} {r['peak_gib']:9.2f} {r['peak_gib'] / base['peak_gib']:7.2f} "
            f"{r['estimate_gib']:12.2f} {r['peak_gib'] / r['estimate_gib']:9.2f}"
        )
    if base:
        print(f"device: {base['device']}")


if __name__ == "__main__":
    main()
