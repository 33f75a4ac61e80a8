"""Stream text from a trained model:
`python -m platform.generate --checkpoint runs/tiny --prompt "The " [--max_new_tokens 200 ...]`.

Tokens are printed as they are produced. The prompt is run once; each new token is one call with the
model's state (no prefix is re-run), so this works the same for every architecture.
"""

import sys


def main(args: list[str] | None = None) -> int:
    from lctrain.entry import run_entry_point
    from lctrain.inference.generation import generate_cli

    return run_entry_point(generate_cli, args)


if __name__ == "__main__":
    sys.exit(main())
