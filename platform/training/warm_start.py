"""Warm-start embeddings from a local Hugging Face checkpoint directory (docs/architectures.md; seed 002).

The original copied facebook/opt-125m's input embedding (50272 x 768) into LSWT and tokenized with
OPT's tokenizer. Here any local causal-LM directory works: the embedding's parameter name is read off
the model class built on the meta device, and only that tensor is loaded from the weight files. A
vocabulary of another size is cut or extended (extra rows keep the model's init); another width is
projected onto its top principal directions, or zero-padded. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Required, TypedDict

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class WarmStart(TypedDict, total=False):
    path: Required[str]
    """A local Hugging Face causal-LM directory (config.json and weights), e.g. a copy of opt-125m."""
    freeze: bool
    """Keep the loaded embedding fixed, as the Dec-2023 runs did (default False)."""


def _local_directory(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.warm_start.path '{path}' is not a local Hugging Face model directory (no config.json); "
            "save one with `save_pretrained(path)` first"
        )
    return path


def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            shards = set(json.loads((path / index_name).read_text())["weight_map"].values())
            return [path / s for s in sorted(shards)]
    files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
    if not files:
        raise FileNotFoundError(f"model.warm_start.path '{path}' holds no model.safetensors or pytorch_model.bin")
    return files


def _embedding_name(path: Path) -> tuple[str, str]:
    """The input embedding's parameter name in the model class, and the class's base-model prefix."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weight = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is weight)
    return name, model.base_model_prefix


def read_input_embeddings(path: str | Path) -> Tensor:
    """The (V, d) input embedding matrix of the causal LM saved in the local directory `path`."""
    path = _local_directory(path)
    name, prefix = _embedding_name(path)
    # Saved names may lack the base-model prefix (e.g. OPT's "decoder.embed_tokens.weight").
    candidates = [name, name.removeprefix(f"{prefix}.")]
    for file in _weight_files(path):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for key in candidates:
                    if key in f.keys():  # noqa: SIM118 (safe_open has keys(), no __contains__)
                        return f.get_tensor(key)
        else:
            weights = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for key in candidates:
                if key in weights:
                    return weights[key].clone()
    raise KeyError(f"model.warm_start.path '{path}': no weight named {' or '.join(candidates)} in its weight files")


def fit_embeddings(source: Tensor, target: Tensor) -> Tensor:
    """`source` (Vs, ds) fitted to the shape of `target` (V, d), whose rows beyond Vs are kept.

    Width: ds > d keeps the source's top-d principal directions (rows times the first d right singular
    vectors: inner products are kept as far as rank d allows); ds < d pads with zero columns.
    """
    source = source.detach().to(torch.float32)
    V, d = target.shape
    if source.shape[1] > d:
        _, _, vh = torch.linalg.svd(source, full_matrices=False)  # vh (ds, ds)
        source = source @ vh[:d].T  # (Vs, d)
    elif source.shape[1] < d:
        source = torch.nn.functional.pad(source, (0, d - source.shape[1]))  # (Vs, d)
    fitted = target.detach().clone()
    rows = min(V, source.shape[0])
    fitted[:rows] = source[:rows].to(fitted.dtype)
    return fitted


def warm_start_embeddings(model: nn.Module, path: str, freeze: bool = False) -> None:
    """Copy the input embedding of the local checkpoint `path` into `model.embed` (and, being tied,
    the output embedding); `freeze` stops its training."""
    embed = getattr(model, "embed", None)
    if not isinstance(embed, nn.Embedding):
        raise ValueError(
            f"model.warm_start needs a model with an `embed` nn.Embedding; {type(model).__name__} has none"
        )
    if embed.weight.is_meta:
        raise ValueError("model.warm_start cannot load into a model on the meta device; materialise it first")
    source = read_input_embeddings(path)
    if source.shape != embed.weight.shape:
        log.warning(
            "warm start: %s embedding %s fitted to the model's %s (rows cut or kept, width projected or padded)",
            path,
            tuple(source.shape),
            tuple(embed.weight.shape),
        )
    with torch.no_grad():
        embed.weight.copy_(fit_embeddings(source, embed.weight))
    embed.weight.requires_grad_(not freeze)
