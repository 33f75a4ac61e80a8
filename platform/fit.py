"""Train: `python -m platform.fit --config configs/tiny.yaml [--trainer.max_steps=100] [--ckpt_path last]`.

`--help` lists every option; `--print_config` prints the resolved configuration.
"""

import sys

from platform.training.cli import fit, run_entry_point

if __name__ == "__main__":
    sys.exit(run_entry_point(fit))
