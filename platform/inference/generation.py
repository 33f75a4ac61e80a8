"""The `generate` command: stream a continuation of a prompt from a checkpoint."""

from __future__ import annotations

import sys

import torch

from ..models.layers.self_extend import SelfExtendConfig
from ..models.sampling import generate
from .loading import load_model


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
