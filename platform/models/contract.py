"""What the trainer relies on from every model and its state, written down as Protocols.

The cluster strategies shard and recompute `blocks`, warm starts and freezing touch `embed`, sharded builds
call `init_weights` after materialising a meta-device model, the expert-usage callback reads `moe_layers`,
and carried training state is detached, moved and reset row by row. The optimizer's parameter groups read
one per-parameter flag, set by the layer that owns the parameter with `exclude_from_weight_decay`.
"""

from __future__ import annotations

from typing import Protocol, Self, runtime_checkable

import torch
from torch import Tensor, nn

from .output import ModelOutput

NO_WEIGHT_DECAY = "_no_weight_decay"  # the flag training/optimizers.py reads (mamba's convention)


@runtime_checkable
class State(Protocol):
    """An immutable state: every method returns a new one (ModelState provides the first two)."""

    def detach(self) -> Self:
        """Cut the autograd graph, e.g. between training steps that carry state."""
        ...

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Self: ...

    def reset_rows(self, reset: Tensor) -> Self:
        """Rows where `reset` (B,) bool is True continue exactly as a fresh start; the others are untouched."""
        ...


@runtime_checkable
class LanguageModel(Protocol):
    """A causal LM over token ids: `forward` as in output.py, plus the parts the trainer reaches into."""

    embed: nn.Embedding  # input token embedding (tied models also read it as the output head)
    blocks: nn.ModuleList  # the repeated blocks: the unit FSDP shards and activation checkpointing recomputes

    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place; also run on a model materialised from the meta device."""
        ...

    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, layer) of every mixture-of-experts stage, each with `tokens_per_expert` and `reset_counters()`."""
        ...

    def output_head(self, hidden: Tensor) -> Tensor:
        """Final hidden states (..., D) -> logits (..., V), the last step of `forward`. The trainer applies it to
        a few tokens at a time (forward with return_hidden=True, return_logits=False), so the logits of a whole
        batch never exist at once."""
        ...

    def forward(
        self, input_ids: Tensor, state: State | None = None, *, return_hidden: bool = False, return_logits: bool = True
    ) -> ModelOutput: ...


def exclude_from_weight_decay(*params: nn.Parameter | None) -> None:
    """Flag parameters (None is skipped) to sit in the optimizer's group without weight decay. A flag lives on
    the Parameter object, which sharding replaces, so strategies read the flagged names before wrapping."""
    for p in params:
        if p is not None:
            setattr(p, NO_WEIGHT_DECAY, True)
