"""Loading a trained model from a checkpoint, and the `platform.generate` command."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from platform.data.tokenizer import Tokenizer, load_tokenizer
from platform.models.registry import build_model
from platform.models.sampling import generate
from platform.models.self_extend import SelfExtendConfig, as_self_extend_config


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its checkpoints/last.ckpt)."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoints" / "last.ckpt").exists():
        path = path / "checkpoints" / "last.ckpt"
    if path.is_dir() and (path / "meta.pt").is_file():
        raise FileNotFoundError(
            f"--checkpoint {path} is a sharded checkpoint; make one file with "
            f"`python -m platform.export --checkpoint {path} --out model.ckpt` and pass that"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"--checkpoint {path} is neither a checkpoint file nor a run directory with checkpoints/last.ckpt"
        )
    return path


def load_model(path: str | Path, *, device: str = "cpu", **overrides: Any) -> tuple[nn.Module, Tokenizer]:
    """Rebuild the model a checkpoint was trained with, load its weights, and its tokenizer.

    `overrides` replace model config fields with inference-only options, e.g. `self_extend`; a SelfExtend
    config without `pretrained_len` gets the trained context (the data's seq_len plus any XL cache), so
    it can warn when a prompt grows past what SelfExtend covers.
    """
    ckpt = torch.load(checkpoint_file(path), map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    config = {**(hp.get("model_config") or {}), **overrides}
    if hp.get("vocab_size") is not None:
        config["vocab_size"] = hp["vocab_size"]
    self_extend = as_self_extend_config(config.get("self_extend"))
    trained_len = (ckpt.get("datamodule_hyper_parameters") or {}).get("seq_len")
    if self_extend is not None and self_extend.pretrained_len is None and trained_len is not None:
        trained_len += config.get("cache_len", 0) or 0
        config["self_extend"] = dataclasses.replace(self_extend, pretrained_len=trained_len)
    model = build_model(hp["arch"], hp["size"], **config)
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights)
    tokenizer = load_tokenizer(ckpt.get("tokenizer") or {"kind": "bytes"})
    return model.to(device).eval(), tokenizer


def generate_cli(args: list[str] | None = None) -> None:
    from jsonargparse import CLI

    CLI(generate_text, args=args, as_positional=False)


def generate_text(
    checkpoint: str,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 1234,
    device: str = "cpu",
    stop_at_end_of_text: bool = True,
    self_extend: SelfExtendConfig | None = None,
) -> str:
    """Stream a continuation of `prompt` to stdout and return it.

    Args:
        checkpoint: A checkpoint file, or a run directory (uses its checkpoints/last.ckpt).
        prompt: Text to continue.
        max_new_tokens: Number of tokens to generate.
        temperature: Sampling temperature; 0 picks the most likely token (greedy).
        top_k: Sample only among the k most likely tokens (None: all).
        top_p: Sample only among the most likely tokens holding this probability mass (None: all).
        seed: Seed of the sampler: equal seeds give equal text.
        device: Where to run the model (cpu, cuda).
        stop_at_end_of_text: Stop when the model ends the document.
        self_extend: Extend the context of the model's RoPE attention without training (SelfExtend):
            e.g. --self_extend.group_size 4 --self_extend.window_size 64.
    """
    overrides = {} if self_extend is None else {"self_extend": self_extend}
    model, tokenizer = load_model(checkpoint, device=device, **overrides)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("--prompt is empty; give at least one character")
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt_ids = torch.tensor([ids], device=device)
    new_ids: list[int] = []
    shown = ""
    sys.stdout.write(prompt)
    for token in generate(
        model,
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        stop_token=tokenizer.eot_id if stop_at_end_of_text else None,
    ):
        if stop_at_end_of_text and token.item() == tokenizer.eot_id:
            break
        new_ids.append(token.item())
        text = tokenizer.decode(new_ids).rstrip("\ufffd")  # hold back a multi-byte character still incomplete
        sys.stdout.write(text[len(shown) :])
        sys.stdout.flush()
        shown = text
    text = tokenizer.decode(new_ids)
    sys.stdout.write(text[len(shown) :] + "\n")
    return text
