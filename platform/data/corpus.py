"""Documents: the built-in corpus, and the train/validation split by document.

The built-in corpus is the standard library's `pydoc_data.topics` (~465k characters of English prose
about Python), present on every Python installation, so the default job never needs a download.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def builtin_documents() -> list[str]:
    """One document per pydoc topic, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def split_stream(documents: Iterable[str], val_fraction: float = 0.05) -> Iterator[tuple[str, str]]:
    """(split, document) for every document, in order. A whole document goes to validation whenever that
    keeps its share of the text seen so far at or below `val_fraction`: deterministic, spread over the
    corpus, and about `val_fraction` of the characters (counting documents would not do: their lengths
    vary by orders of magnitude). When none went to validation by the end, the last document does, so a
    corpus of a few files still has a validation split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    seen = val_chars = 0
    previous = None
    for doc in documents:
        if previous is not None:
            yield previous
        seen += len(doc)
        if val_chars + len(doc) <= val_fraction * seen:
            val_chars += len(doc)
            previous = ("val", doc)
        else:
            previous = ("train", doc)
    if previous is not None:
        yield ("val", previous[1]) if val_chars == 0 else previous


def split_documents(documents: list[str], val_fraction: float = 0.05) -> dict[str, list[str]]:
    """The split of `split_stream` as two lists."""
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for split, doc in split_stream(documents, val_fraction):
        splits[split].append(doc)
    return splits
