"""Tokenizers the platform prepares data with and rebuilds from a shard index or a checkpoint.

Three kinds (docs/design.md): the byte-level tokenizer (built in, no files), a local `tokenizer.json` or
Hugging Face tokenizer directory, and a byte-level BPE trained on the input with `tokenizers`. The last
two are both a `tokenizers.Tokenizer`, and their spec embeds its JSON, so a checkpoint alone is enough
to rebuild them (`python -m platform.generate` works without the data directory).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

# Names under which tokenizers commonly register their end-of-text token, tried in this order.
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
BPE_EOT = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int  # separates documents in a token stream

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "eot_id": self.eot_id}


class JsonTokenizer:
    """A `tokenizers.Tokenizer` (what a `tokenizer.json` holds) with a named end-of-text token."""

    def __init__(self, tokenizer_json: str, eot_token: str | None = None, origin: str = ""):
        from tokenizers import Tokenizer as HFTokenizer

        self.json, self.origin = tokenizer_json, origin
        self.backend = HFTokenizer.from_str(tokenizer_json)
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        candidates = (eot_token,) if eot_token else EOT_CANDIDATES
        found = [(t, self.backend.token_to_id(t)) for t in candidates if self.backend.token_to_id(t) is not None]
        if not found:
            raise ValueError(
                f"tokenizer {origin or '(embedded)'} has no end-of-text token {' or '.join(candidates)}; "
                "name the one it uses with --eot_token"
            )
        self.eot_token, self.eot_id = found[0]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "json",
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "eot_token": self.eot_token,
            "origin": self.origin,
            "sha256": hashlib.sha256(self.json.encode()).hexdigest(),
            "json": self.json,
        }

    def __getstate__(self) -> dict[str, Any]:  # worker processes rebuild the backend from its JSON
        return {"json": self.json, "eot_token": self.eot_token, "origin": self.origin}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["json"], state["eot_token"], state["origin"])


def tokenizer_from_path(path: str | Path, eot_token: str | None = None) -> JsonTokenizer:
    """A `tokenizer.json` file, or a Hugging Face tokenizer directory (its `tokenizer.json`, else the fast
    tokenizer `transformers` builds from the directory's files, offline)."""
    path = Path(path)
    if path.is_file():
        return JsonTokenizer(path.read_text(), eot_token, origin=str(path))
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer '{path}' is neither 'bytes', 'bpe', a tokenizer.json file nor a tokenizer directory"
        )
    config = path / "tokenizer_config.json"
    if eot_token is None and config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        eot_token = eos.get("content") if isinstance(eos, dict) else eos
    if (path / "tokenizer.json").is_file():
        return JsonTokenizer((path / "tokenizer.json").read_text(), eot_token, origin=str(path))
    from transformers import AutoTokenizer

    try:
        fast = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer directory '{path}' cannot be loaded offline ({str(e).splitlines()[0]})") from e
    return JsonTokenizer(fast.backend_tokenizer.to_str(), eot_token or fast.eos_token, origin=str(path))


def train_bpe(texts: Iterable[str], vocab_size: int) -> JsonTokenizer:
    """A byte-level BPE (every byte is in the alphabet, so no text is out of vocabulary) with the
    end-of-text token at id 0. A small corpus may end with fewer merges than asked for."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"bpe_vocab_size={vocab_size} must be at least {len(alphabet) + 1} (256 bytes + end-of-text)")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BPE_EOT], initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return JsonTokenizer(backend.to_str(), BPE_EOT, origin=f"bpe trained on the input ({vocab_size} asked)")


def load_tokenizer(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer a shard index or a checkpoint describes."""
    kind = spec.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "json":
        return JsonTokenizer(spec["json"], spec["eot_token"], origin=spec.get("origin", ""))
    raise ValueError(f"unknown tokenizer kind {kind!r} in the shard index; known kinds: bytes, json")


def tokenizer_identity(spec: dict[str, Any]) -> str:
    """A short name that differs between different tokenizers: kind, vocab size and content hash."""
    digest = spec.get("sha256", "")[:12]
    return f"{spec.get('kind')} (vocab {spec.get('vocab_size')}{', sha256 ' + digest if digest else ''})"


def check_same_tokenizer(saved: dict[str, Any] | None, current: dict[str, Any] | None, what: str) -> None:
    """Refuse to continue training a model on ids of another tokenizer: its embeddings would mean other text."""
    if saved is None or current is None:
        return
    if tokenizer_identity(saved) != tokenizer_identity(current):
        raise ValueError(
            f"{what} was trained with tokenizer {tokenizer_identity(saved)}, but the data is tokenized with "
            f"{tokenizer_identity(current)}; resume on data prepared with the same tokenizer"
        )
