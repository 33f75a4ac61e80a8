"""Prepare data: `python -m platform.prepare --config configs/data/<name>.yaml [--output data/x] [--task.length 2048]`.

Turns local text, jsonl or parquet files, the built-in corpus or a synthetic task into token shards that
`python -m platform.fit` reads (`data.data_dir`). `--help` lists every option.
"""

import logging
import sys

from platform.data.prepare import prepare_cli
from platform.entry import run_entry_point

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(run_entry_point(prepare_cli))
