"""Train: `python -m platform.fit --config configs/tiny.yaml [--trainer.max_steps=100] [--ckpt_path last]`.

`--help` lists every option; `--print_config` prints the resolved configuration; `--dry_run` prints the
memory plan on a `--cluster.*` shape instead of training.
"""

import signal
import sys


def main(args: list[str] | None = None) -> int:
    # SIGUSR1 asks a running job to save and requeue (cluster/requeue.py). Until the Trainer has installed
    # that handler the signal's default action would kill the process, so it waits pending; this runs
    # before the seconds of imports below.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    from lctrain.training.cli import fit, run_entry_point

    return run_entry_point(fit, args)


if __name__ == "__main__":
    sys.exit(main())
