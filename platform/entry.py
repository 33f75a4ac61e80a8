"""How entry points (`lctrain fit`, `python -m platform.fit`, ...) report a user's error: one
`error: ...` line on stderr and exit code 2, without a traceback.

Kept apart from the training CLI so that light commands (prepare) do not import Lightning to start.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import yaml
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


def config_files(args: list[str]) -> list[str]:
    """The files given with `--config`/`-c` (`--config f`, `--config=f`)."""
    files = []
    for i, arg in enumerate(args):
        key, has_value, value = arg.partition("=")
        if key in ("--config", "-c"):
            if not has_value and i + 1 < len(args):
                value = args[i + 1]
            if value and not value.lstrip().startswith("{"):  # `--config '{...}'` is inline YAML, not a file
                files.append(value)
    return files


def run_entry_point(main, args: list[str] | None = None) -> int:
    """Run an entry point; user errors become one line on stderr and exit code 2."""
    try:
        for path in config_files(sys.argv[1:] if args is None else args):
            read_config_file(path)  # a missing file or a YAML mistake is named with its file and line
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


def read_config_file(path: str) -> dict:
    """A `--config` file's contents, or a one-line error naming the file (and the line of a YAML mistake)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        content = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ValueError(f"--config {path}: invalid YAML at {where}: {getattr(e, 'problem', None) or e}") from None
    if content is not None and not isinstance(content, dict):
        raise ValueError(
            f"--config {path} holds a {type(content).__name__}, not a mapping of sections (trainer:, model:, ...)"
        )
    return content or {}
