"""Tokenizers the platform knows how to rebuild from a shard index.

The byte-level tokenizer needs no files: ids 0-255 are bytes and 256 ends a document. It is what the
built-in corpus and the default job use.
"""

from __future__ import annotations

from typing import Any, Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int  # separates documents in a token stream

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def describe(self) -> dict[str, Any]:
        """What the shard index records, enough for `load_tokenizer` to rebuild it."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, plus an end-of-text id 256."""

    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "eot_id": self.eot_id}


def load_tokenizer(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer an index describes."""
    kind = spec.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer kind {kind!r} in the shard index; known kinds: bytes")
