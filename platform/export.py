"""Export a checkpoint: `python -m platform.export --checkpoint <sharded dir | file | run dir> --out model.ckpt`.

Writes one file with the model weights, hyper-parameters and tokenizer, which `python -m platform.generate
--checkpoint model.ckpt` loads; sharded FSDP2/FSDP/DeepSpeed checkpoints are consolidated on CPU.
"""

import sys

from platform.training.cli import run_entry_point
from platform.training.consolidate import export_cli

if __name__ == "__main__":
    sys.exit(run_entry_point(export_cli))
