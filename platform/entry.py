"""How entry points (`lctrain fit`, `python -m platform.fit`, ...) report a user's error: one
`error: ...` line on stderr and exit code 2, without a traceback.

Kept apart from the training CLI so that light commands (prepare) do not import Lightning to start.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from jsonargparse import ArgumentError

PLATFORM_DIR = Path(__file__).resolve().parent
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, KeyError)


def raised_by_platform(exc: BaseException) -> bool:
    """True when the innermost frame of the traceback is the platform's own code: a deliberate,
    one-line error about the user's input rather than a bug somewhere below."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PLATFORM_DIR)


def one_line(message: str) -> str:
    """A parser's message, whose reason often follows on indented lines, as one line."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def run_entry_point(main, args: list[str] | None = None) -> int:
    """Run an entry point; user errors become one line on stderr and exit code 2."""
    try:
        main(args)
    except ArgumentError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if not raised_by_platform(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
