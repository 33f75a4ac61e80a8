"""The platform's tokenizers as Hugging Face tokenizer files, so `AutoTokenizer.from_pretrained(DIR)` works.

A JSON tokenizer already is a `tokenizers.Tokenizer`: its JSON is written as it is. The byte tokenizer
becomes an equivalent one: a vocabulary of the 256 byte-level characters at the ids of their bytes (no
merges, so every byte stays one token) and the end-of-text token at 256, with byte-level pre-tokenizer
and decoder. The end-of-text token is also split as plain text when it appears literally in the input,
as the byte tokenizer encodes it (`split_special_tokens`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.tokenizer import BPE_EOT, ByteTokenizer, JsonTokenizer, Tokenizer


def byte_level_tokenizer():
    """A `tokenizers.Tokenizer` that maps text to the byte tokenizer's ids (UTF-8 bytes, end-of-text 256)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    # bytes_to_unicode: byte b is written as the printable character alphabet[b]; ids follow the bytes
    characters = byte_characters()
    vocab = {characters[b]: b for b in range(256)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(BPE_EOT, special=True, normalized=False)])
    if backend.token_to_id(BPE_EOT) != ByteTokenizer.eot_id:
        raise RuntimeError(f"byte-level tokenizer put {BPE_EOT} at {backend.token_to_id(BPE_EOT)}, not 256")
    return backend


def byte_characters() -> list[str]:
    """GPT-2's bytes_to_unicode table: the printable character that stands for each byte 0-255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for b in range(256):
        if b in printable:
            characters[b] = chr(b)
        else:
            characters[b] = chr(256 + extra)
            extra += 1
    return [characters[b] for b in range(256)]


def save_tokenizer(tokenizer: Tokenizer, out: str | Path, model_max_length: int | None = None) -> None:
    """Write `tokenizer` as Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json) into `out`."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, ByteTokenizer):
        backend, eot, split = byte_level_tokenizer(), BPE_EOT, True
    elif isinstance(tokenizer, JsonTokenizer):
        backend, eot, split = HFTokenizer.from_str(tokenizer.json), tokenizer.eot_token, False
    else:
        raise ValueError(f"cannot write a {type(tokenizer).__name__} as Hugging Face tokenizer files")
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eot,
        pad_token=eot,  # padding needs a token; pads are masked, so any id serves
        padding_side="left",  # what generate() needs for a batch of prompts of different lengths
        split_special_tokens=split,
        clean_up_tokenization_spaces=False,
        **extra,
    )
    fast.save_pretrained(str(out))
    # Named by the class every transformers version knows (5.x loads it as its TokenizersBackend).
    config_file = Path(out) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
