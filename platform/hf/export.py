"""Writing a checkpoint as a Hugging Face model directory (`lctrain export --format hf`).

The directory holds what `from_pretrained` reads: `config.json` (the family's config, hf/configuration.py),
the weights in safetensors (`save_pretrained`, sharded with an index above `max_shard_size`),
`generation_config.json`, the tokenizer files, and two small Python files that `trust_remote_code=True`
imports in a process that never imported lctrain (they import it: lctrain must be installed there).

The write is atomic: everything goes into a hidden sibling directory, renamed to `out` only once complete,
so an interrupted export leaves no half directory, and a replaced export is swapped out only after the new
one is whole.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from ..data.tokenizer import Tokenizer, load_tokenizer
from ..models.spec import ModelSpec
from .configuration import CONFIGS
from .modeling import MODELS, LctrainForCausalLM
from .reading import read_hf_config
from .tokenizer import save_tokenizer

# What `trust_remote_code=True` imports from the directory: the classes, from the installed package.
REMOTE_CONFIGURATION = '''"""Configs of the lctrain model families; needs the lctrain package installed."""

from lctrain.hf.configuration import LSWTHFConfig, SeqCondHFConfig, SerriformHFConfig

__all__ = ["LSWTHFConfig", "SeqCondHFConfig", "SerriformHFConfig"]
'''
REMOTE_MODELING = '''"""Models of the lctrain families; needs the lctrain package installed."""

from lctrain.hf.modeling import LSWTForCausalLM, SeqCondForCausalLM, SerriformForCausalLM

__all__ = ["LSWTForCausalLM", "SeqCondForCausalLM", "SerriformForCausalLM"]
'''


def auto_map(arch: str) -> dict[str, str]:
    """config.json's `auto_map`: the classes `trust_remote_code=True` loads from the directory's files."""
    config, model = CONFIGS[arch], MODELS[arch]
    return {
        "AutoConfig": f"configuration_lctrain.{config.__name__}",
        "AutoModelForCausalLM": f"modeling_lctrain.{model.__name__}",
    }


def hf_model(checkpoint: dict[str, Any]) -> tuple[LctrainForCausalLM, Tokenizer]:
    """The Hugging Face model of a consolidated checkpoint, holding its weights (not copied: assigned)."""
    spec = ModelSpec.from_checkpoint(checkpoint)
    tokenizer = load_tokenizer(checkpoint.get("tokenizer") or {"kind": "bytes"})
    config = CONFIGS[spec.arch].from_spec(
        spec,
        eos_token_id=tokenizer.eot_id,
        pad_token_id=tokenizer.eot_id,
        auto_map=auto_map(spec.arch),
        architectures=[MODELS[spec.arch].__name__],
    )
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    with torch.device("meta"):  # nothing allocated: the checkpoint's tensors are assigned below
        model = MODELS[spec.arch](config)
    try:
        model.model.load_state_dict(weights, assign=True)
    except RuntimeError as e:
        raise ValueError(
            f"the checkpoint's weights do not fit the {spec.arch} model it names ({str(e).splitlines()[1:2]})"
        ) from None
    return model.eval(), tokenizer


def write_hf(checkpoint: dict[str, Any], out: str | Path, *, max_shard_size: str | int = "5GB") -> Path:
    """Write `checkpoint` (consolidated: see cluster/consolidate.py) as a Hugging Face directory at `out`,
    which must not exist yet, or must be an earlier export (replaced only once the new one is complete)."""
    from transformers import GenerationConfig

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = hf_model(checkpoint)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by an export that was killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        GenerationConfig(eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.eot_id).save_pretrained(str(tmp))
        save_tokenizer(tokenizer, tmp)
        (tmp / "configuration_lctrain.py").write_text(REMOTE_CONFIGURATION)
        (tmp / "modeling_lctrain.py").write_text(REMOTE_MODELING)
        readable_by_all(tmp)
        replace_directory(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def readable_by_all(directory: Path) -> None:
    """Give every file the mode a plain `open` would (safetensors writes the weights owner-only, 0600),
    so an export shared with others is readable like the rest of its files."""
    umask = os.umask(0)
    os.umask(umask)
    for file in directory.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)


def replace_directory(new: Path, out: Path) -> None:
    """Move the complete directory `new` to `out`. An existing `out` is moved aside first and deleted last, so
    `out` is never a partial directory: it is the old export until the new one takes its place (absent only
    for the instant between two renames), and the old one comes back if the second rename fails."""
    if not out.exists():
        os.rename(new, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_hf_out(out: str, overwrite: bool) -> None:
    """Refuse an `--out` that export must not write: an existing path without `--overwrite true`, and
    anything but an earlier export even with it (so `--out .` never deletes a folder of other files)."""
    path = Path(out)
    if any(parent.is_file() for parent in path.parents):
        raise ValueError(f"--out {out}: {next(p for p in path.parents if p.is_file())} is a file, not a directory")
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite true to replace it, or name another directory")
    if not path.is_dir() or path.is_symlink():
        raise ValueError(f"--out {out} is not a directory; name a directory for the Hugging Face files")
    try:
        read_hf_config(path)
    except (FileNotFoundError, ValueError):
        raise ValueError(
            f"--out {out} exists and is not a Hugging Face export of lctrain; export replaces only its own "
            "directories: name a new one"
        ) from None
