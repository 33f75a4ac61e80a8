"""Loss curves of SophiaG (with its Hessian refresh) against AdamW on the same data and steps.

Each optimizer trains the debug LSWT from the same seed on the built-in corpus through the real
`platform.fit` command line (configs/tiny.yaml with the optimizer replaced), and the script prints
the training loss (mean over a window of steps) and the final validation loss as a markdown table.
Run from the repository root:

    python -m benchmarks.sophia_vs_adamw [--steps 300] [--optimizer NAME=CLASS:lr=...,k=v ...]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from lctrain.training.cli import fit

DEFAULT_OPTIMIZERS = [
    "AdamW lr 3e-3=torch.optim.AdamW:lr=3e-3,weight_decay=0.1",
    "SophiaG lr 1e-3=lctrain.training.sophia.SophiaG:lr=1e-3,rho=0.04,weight_decay=0.1",
    "SophiaG lr 3e-4=lctrain.training.sophia.SophiaG:lr=3e-4,rho=0.04,weight_decay=0.1",
]


def optimizer_args(spec: str) -> tuple[str, list[str]]:
    """'label=class.path:k=v,k=v' -> (label, CLI arguments)."""
    label, rest = spec.split("=", 1)
    class_path, _, kwargs = rest.partition(":")
    args = ["--model.optimizer.class_path", class_path]
    for pair in filter(None, kwargs.split(",")):
        key, value = pair.split("=")
        args += [f"--model.optimizer.init_args.{key}", value]
    return label, args


def losses(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=20, help="training losses are averaged over this many steps")
    parser.add_argument("--optimizer", action="append", help="LABEL=CLASS:k=v,... (repeatable)")
    parser.add_argument("--data_dir", default="data/builtin-bytes")
    args = parser.parse_args(argv)
    specs = args.optimizer or DEFAULT_OPTIMIZERS
    checkpoints = sorted({args.window, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps})

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            label, extra = optimizer_args(spec)
            run = Path(tmp) / label.replace(" ", "_")
            fit(
                ["--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(run),
                 "--data.data_dir", args.data_dir, "--trainer.max_steps", str(args.steps),
                 "--trainer.val_check_interval", str(args.steps), "--trainer.log_every_n_steps", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--checkpoint.every_n_train_steps", str(args.steps), *extra]
            )  # fmt: skip
            train, val = losses(run, "train/loss"), losses(run, "val/loss")
            means = []
            for step in checkpoints:
                window = [train[s] for s in range(step - args.window, step) if s in train]
                means.append(sum(window) / len(window))
            rows.append((label, means, val[max(val)]))

    print(f"debug LSWT on the built-in corpus, {args.steps} steps of 16 x 256 bytes, same seed and batches;")
    print(f"training loss = mean over the {args.window} steps before each step shown")
    print()
    print("| optimizer | " + " | ".join(f"step {s}" for s in checkpoints) + " | val loss |")
    print("|---|" + "---:|" * (len(checkpoints) + 1))
    for label, means, val in rows:
        print(f"| {label} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {val:.3f} |")


if __name__ == "__main__":
    main()
