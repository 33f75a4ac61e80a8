"""Evaluate trained models on what their context buys: `python -m platform.evaluate --models+ runs/tiny
--data.data_dir data/builtin-bytes --output eval/tiny` (perplexity by length, loss by position, passkey and MQAR
grids, as tables and plots), or `--mode validate --checkpoint RUN` (the run's validation metrics)."""

import sys


def main(args: list[str] | None = None) -> int:
    from lctrain.entry import run_entry_point
    from lctrain.evaluation.cli import evaluate_cli

    return run_entry_point(evaluate_cli, args)


if __name__ == "__main__":
    sys.exit(main())
