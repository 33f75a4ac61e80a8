"""Local text, jsonl and parquet files (paths, directories, globs) read as documents through `datasets`.

`datasets` reads each format with its packaged builder, offline (no hub is contacted), into an Arrow
cache that the caller places beside the output and removes afterwards. Files are grouped by format and
sorted within each group, so the document order is deterministic: text, then jsonl, then parquet.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

FORMATS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".parquet": "parquet"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".py", ".tex", ".html", ".csv", ".c", ".h", ".cpp", ".rs", ".go"}
TextUnit = Literal["file", "paragraph", "line"]


def file_format(path: Path) -> str:
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".jsonl.gz") else path.suffix
    return FORMATS.get(suffix.lower(), "text")


def find_files(inputs: list[str]) -> list[Path]:
    """Files named by `inputs`: a file, a directory (its known text, jsonl and parquet files, recursively,
    hidden ones skipped) or a glob (`**` recurses). Each input must match at least one file."""
    found: list[Path] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = [
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and (p.suffix.lower() in TEXT_SUFFIXES or file_format(p) != "text")
            ]
        else:
            matches = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file()]
        if not matches:
            raise FileNotFoundError(f"input '{spec}' matches no file; give files, directories or globs that exist")
        found += matches
    return sorted(set(found))


def read_documents(files: list[Path], *, text_field: str, text_unit: TextUnit, cache_dir: str) -> Iterator[str]:
    """Every non-blank document of `files`: a text file is one document per file, paragraph or line
    (`text_unit`); a jsonl or parquet row is one document, its `text_field`."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    for fmt in ("text", "json", "parquet"):
        group = [str(f) for f in files if file_format(f) == fmt]
        if not group:
            continue
        kwargs = {"sample_by": {"file": "document"}.get(text_unit, text_unit)} if fmt == "text" else {}
        try:
            dataset = datasets.load_dataset(fmt, data_files=group, split="train", cache_dir=cache_dir, **kwargs)
        except Exception as e:  # the builders raise many types for a malformed file; name it and stop
            raise ValueError(f"cannot read {fmt} files {group[0]}...: {str(e).splitlines()[0]}") from e
        field = "text" if fmt == "text" else text_field
        if field not in dataset.column_names:
            raise KeyError(
                f"{fmt} files {group[0]}... have no field '{field}' (they have: {', '.join(dataset.column_names)}); "
                "set --text_field"
            )
        for batch in dataset.select_columns([field]).iter(batch_size=1024):
            yield from (text for text in batch[field] if text and not text.isspace())
