"""Prepare data: `python -m platform.prepare --config configs/data/<name>.yaml [--output data/x] [--task.length 2048]`.

Turns local text, jsonl or parquet files, the built-in corpus or a synthetic task into token shards that
`python -m platform.fit` reads (`data.data_dir`). `--help` lists every option.
"""

import logging
import sys


def main(args: list[str] | None = None) -> int:
    from lctrain.data.prepare import prepare_cli
    from lctrain.entry import run_entry_point

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_entry_point(prepare_cli, args)


if __name__ == "__main__":
    sys.exit(main())
