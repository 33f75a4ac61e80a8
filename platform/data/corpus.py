"""The built-in corpus: the standard library's `pydoc_data.topics` (~465k characters of English prose
about Python), present on every Python installation, so the default job never needs a download."""

from __future__ import annotations


def builtin_documents() -> list[str]:
    """One document per pydoc topic, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def split_documents(documents: list[str], val_fraction: float = 0.05) -> dict[str, list[str]]:
    """Whole documents go to validation whenever that keeps its share of the text seen so far at or below
    `val_fraction`: deterministic, spread over the corpus, and about `val_fraction` of the characters
    (counting documents would not do: their lengths vary by orders of magnitude)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    splits: dict[str, list[str]] = {"train": [], "val": []}
    seen = val_chars = 0
    for doc in documents:
        seen += len(doc)
        if val_chars + len(doc) <= val_fraction * seen:
            splits["val"].append(doc)
            val_chars += len(doc)
        else:
            splits["train"].append(doc)
    return splits
