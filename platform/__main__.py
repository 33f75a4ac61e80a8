"""The `lctrain` command: `lctrain <fit|prepare|generate|export|evaluate> [options]`, the same as `python -m
platform.<command>` in a checkout (and `python -m lctrain <command>` where the package is installed)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "fit": "train a model (LightningCLI: --config, dotted overrides, --ckpt_path last|auto)",
    "prepare": "tokenize text files, the built-in corpus or a synthetic task into shards",
    "generate": "stream a continuation of a prompt from a checkpoint",
    "export": "write one checkpoint file from a run, a file or a sharded checkpoint",
    "evaluate": "perplexity by context length, loss by position, passkey/MQAR grids; or a run's validation",
}


def usage() -> str:
    rows = "\n".join(f"  {name:<9} {what}" for name, what in COMMANDS.items())
    return f"usage: lctrain <command> [options]   (lctrain <command> --help for its options)\n\ncommands:\n{rows}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    entry = importlib.import_module(f"{__package__ or 'lctrain'}.{command}")
    # sys.argv stays [<script>, command, ...]: Lightning's launcher re-runs exactly that for the other ranks
    return entry.main(args)


if __name__ == "__main__":
    sys.exit(main())
