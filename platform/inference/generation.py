"""The `generate` command: stream a continuation of a prompt from a checkpoint, or from a local Hugging Face
model directory (Llama, Mistral, Qwen2, the platform's exports), optionally with SelfExtend."""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from ..models.layers.self_extend import SelfExtendConfig
from ..models.sampling import generate
from .loading import load_model


def generate_cli(args: list[str] | None = None) -> None:
    from jsonargparse import CLI

    CLI(generate_text, args=args, as_positional=False, exit_on_error=False)


def generate_text(
    checkpoint: str | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 1234,
    device: str = "cpu",
    stop_at_end_of_text: bool = True,
    self_extend: SelfExtendConfig | None = None,
    hf_model: str | None = None,
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
        hf_model: Instead of --checkpoint, a local Hugging Face model directory (config.json, weights and
            tokenizer files): a Llama, Mistral or Qwen2 model, or one the platform exported. Nothing is
            downloaded; sampling runs through the model's `generate()`.
    """
    if (checkpoint is None) == (hf_model is None):
        raise ValueError("give one model: --checkpoint (a run or checkpoint file) or --hf_model (a directory)")
    if prompt is None:
        raise ValueError("--prompt is missing; give the text to continue")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    device = checked_device(device)
    if hf_model is not None:
        settings = (max_new_tokens, temperature, top_k, top_p, seed, device, stop_at_end_of_text)
        return generate_text_hf(hf_model, prompt, *settings, self_extend=self_extend)
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


def generate_text_hf(
    directory: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    device: str,
    stop_at_end_of_text: bool,
    *,
    self_extend: SelfExtendConfig | None = None,
) -> str:
    """`generate_text` for a local Hugging Face directory: its model and tokenizer, SelfExtend when asked
    (lctrain.self_extend), and the model's own `generate()` (greedy at temperature 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import hf  # noqa: F401  (registers the platform's families with the Auto classes)
    from .. import self_extend as self_extend_patch

    if not prompt:
        raise ValueError("--prompt is empty; give at least one character")
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--hf_model {path}: no config.json there; pass a local Hugging Face model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ValueError(
            f"--hf_model {path} does not load as a causal language model and tokenizer ({reason})"
        ) from None
    if self_extend is not None:
        self_extend_patch.apply(model, **dataclasses.asdict(self_extend))
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # (1, T)
    stop = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.generation_config.eos_token_id
    config = copy.deepcopy(model.generation_config)
    config.update(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        eos_token_id=stop if stop_at_end_of_text else None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop,
    )
    if temperature > 0:  # top_k 0 and top_p 1 sample among all tokens
        config.update(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p)
    else:
        config.update(temperature=None, top_k=None, top_p=None)
    torch.manual_seed(seed)
    stream = TextStream(tokenizer, stop if stop_at_end_of_text else None)
    sys.stdout.write(prompt)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=stream)
    return stream.finish()


class TextStream:
    """Receives `generate()`'s tokens (the prompt first, then one at a time) and writes the text they add to
    stdout, holding back a character still incomplete, up to the end-of-text token. The new tokens are decoded
    after the prompt's, so a tokenizer that marks word starts (a leading space) decodes them as it would in
    the whole text."""

    def __init__(self, tokenizer: Any, stop_id: int | None) -> None:
        self.tokenizer, self.stop_id = tokenizer, stop_id
        self.prompt: list[int] | None = None
        self.ids: list[int] = []
        self.shown, self.stopped = "", False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt is None:
            self.prompt = value.reshape(-1).tolist()
            return
        for token in value.reshape(-1).tolist():
            self.stopped = self.stopped or token == self.stop_id
            if not self.stopped:
                self.ids.append(token)
        text = self.text().rstrip("\ufffd")
        sys.stdout.write(text[len(self.shown) :])
        sys.stdout.flush()
        self.shown = text

    def text(self) -> str:
        """The continuation: the text of prompt and new tokens past the prompt's own text."""
        prompt = self.prompt or []
        before, whole = self.decode(prompt), self.decode(prompt + self.ids)
        return whole[len(before) :] if whole.startswith(before) else self.decode(self.ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def end(self) -> None:
        """Called by `generate()` when it stops; `finish` writes the rest."""

    def finish(self) -> str:
        text = self.text()
        sys.stdout.write(text[len(self.shown) :] + "\n")
        return text


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that would fail, or silently mean something else, once the model is loaded."""
    if max_new_tokens < 0:
        raise ValueError(f"--max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"--temperature={temperature} must be >= 0 (0 picks the most likely token)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top_k={top_k} must be >= 1, or null to sample among all tokens")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top_p={top_p} must be in (0, 1], or null to sample among all tokens")


def checked_device(name: str) -> str:
    """`name` when torch knows it and this machine has it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device name; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name
