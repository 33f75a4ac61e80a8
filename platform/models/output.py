"""The contract every architecture follows: `forward(input_ids, state=None) -> ModelOutput`.

A model takes token ids and an optional state, and returns logits, a *new* state and its named,
unweighted auxiliary losses. Training, prefill and decoding all go through this one call, so a
full forward over T tokens equals a prefill of k tokens followed by T - k one-token calls that pass
the returned state along. contract.py declares it, with what else the trainer uses.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple, Self

import torch
from torch import Tensor


class ModelOutput(NamedTuple):
    logits: Tensor | None  # (B, T, V); None with return_logits=False (the caller applies `output_head` itself)
    state: Any  # the architecture's ModelState; pass it back in to continue the sequence
    aux_losses: dict[str, Tensor]  # unweighted, named; their weights are training settings
    hidden: Tensor | None = None  # (B, T, D) final hidden states, only with return_hidden=True


@dataclasses.dataclass(frozen=True)
class ModelState:
    """Base of every architecture's state: an immutable dataclass of tensors (or lists of them).

    Subclasses only declare fields; `detach`, `to` and `map_tensors` walk them generically, into
    lists, tuples, dicts and nested states. Integers and other plain values are left as they are.
    """

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Self:
        return dataclasses.replace(self, **{f.name: _map(getattr(self, f.name), fn) for f in dataclasses.fields(self)})

    def detach(self) -> Self:
        """Cut the autograd graph, e.g. between training steps that carry state."""
        return self.map_tensors(Tensor.detach)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Self:
        """Move tensors; `dtype` applies to floating-point tensors only (ids and positions keep theirs)."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        return self.map_tensors(move)


def zero_rows(t: Tensor, rows: Tensor) -> Tensor:
    """t (B, ...) with the rows where `rows` (B,) is True set to zero: the fresh start of a sum, tail or count."""
    rows = rows.to(t.device).view(-1, *[1] * (t.ndim - 1))  # (B, 1, ...)
    return torch.where(rows, torch.zeros_like(t), t)


def state_to_tree(value: Any) -> Any:
    """A state as nested dicts, lists, tensors and numbers, which a weights-only checkpoint load
    accepts; each state records its class so `state_from_tree` can rebuild it. Fields marked
    `metadata={"transient": True}` are left out (they must have defaults)."""
    if isinstance(value, ModelState):
        cls = type(value)
        fields = [f for f in dataclasses.fields(value) if not f.metadata.get("transient")]  # e.g. buffer bookkeeping
        tree = {f.name: state_to_tree(getattr(value, f.name)) for f in fields}
        return {"__state__": f"{cls.__module__}:{cls.__qualname__}", **tree}
    if isinstance(value, (list, tuple)):
        return [state_to_tree(v) for v in value]
    if isinstance(value, dict):
        return {k: state_to_tree(v) for k, v in value.items()}
    return value


def state_from_tree(tree: Any) -> Any:
    if isinstance(tree, list):
        return [state_from_tree(v) for v in tree]
    if isinstance(tree, dict) and "__state__" in tree:
        module_name, qualname = tree["__state__"].split(":")
        package = __package__.split(".")[0]  # "lctrain"
        if module_name.split(".")[0] == "platform":  # checkpoints written before the package was named lctrain
            module_name = package + module_name.removeprefix("platform")
        cls = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and issubclass(cls, ModelState)):
            raise TypeError(f"{tree['__state__']} is not a ModelState; refusing to rebuild it from a checkpoint")
        return cls(**{k: state_from_tree(v) for k, v in tree.items() if k != "__state__"})
    if isinstance(tree, dict):
        return {k: state_from_tree(v) for k, v in tree.items()}
    return tree


def _map(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, ModelState):
        return value.map_tensors(fn)
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value
