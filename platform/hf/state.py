"""One batch state from prompts of different lengths: how left-padded batches decode without seeing their pads.

The platform's models take no attention mask: padding is an ordinary token to them. A left-padded batch is
therefore prefilled row by row, each row without its pads, and the single-row states are joined as if every
row had been left-padded to the longest and its pads never seen:
- cached keys and values (KVState) are padded on the left and marked invalid there, so no query attends to
  them, and keys stored rotated at their positions turn to the positions they now have;
- fixed-size states (condenser sums, conv tails, recurrences) are independent per row and simply stacked;
- the shared position becomes the longest row's, and `stream_start` records where each row's tokens begin
  (SelfExtend groups positions from there; Serriform's rotary gate counts positions from there).
Each later one-token call then continues every row exactly as it would continue alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.layers.attention import KVState
from ..models.output import ModelState


def stack_rows(states: list[ModelState], lengths: list[int], device: torch.device) -> ModelState:
    """The batch state of single-row `states` whose rows have seen `lengths` tokens (their prompts)."""
    longest = max(lengths)
    start = torch.tensor([longest - n for n in lengths], dtype=torch.long, device=device)  # (B,): first real token
    return _stack(states, start)


def _stack(values: list[Any], start: Tensor) -> Any:
    first = values[0]
    if isinstance(first, KVState):
        return _left_pad(values, start)
    if isinstance(first, ModelState):
        fields = {f.name: _stack([getattr(v, f.name) for v in values], start) for f in dataclasses.fields(first)}
        if "stream_start" in fields:
            fields["stream_start"] = start if bool(start.any()) else None
        return type(first)(**fields)
    if isinstance(first, (list, tuple)):
        return type(first)(_stack([v[i] for v in values], start) for i in range(len(first)))
    if isinstance(first, Tensor):
        return torch.cat(values, dim=0)  # every state tensor is batch-first
    if isinstance(first, int):
        return max(values)  # the shared position: the longest row's
    if first is None:
        return None
    raise TypeError(f"cannot stack a state field of type {type(first).__name__}")


def _left_pad(states: list[KVState], start: Tensor) -> KVState:
    """Single-row KV states of lengths M_b as one (B, Hkv, M, Dh) state, M = max M_b, the pads invalid.

    Row b's tokens now sit start[b] positions later than they did alone, so keys stored rotated at their
    absolute positions turn by start[b] more (`KVState.shifted`); attention scores, which depend only on the
    distance between query and key, stay what they were for the row alone.
    """
    longest = max(s.length for s in states)
    keys, values, valid = [], [], []
    for s, shift in zip(states, start.tolist()):
        s = s.shifted(shift)
        pad = longest - s.length
        keys.append(F.pad(s.keys, (0, 0, pad, 0)))  # (1, Hkv, M, Dh): zeros before the row's keys
        values.append(F.pad(s.values, (0, 0, pad, 0)))
        own = s.valid if s.valid is not None else torch.ones(1, s.length, dtype=torch.bool, device=s.keys.device)
        valid.append(F.pad(own, (pad, 0), value=False))  # (1, M)
    valid_mask = torch.cat(valid, dim=0)  # (B, M)
    return dataclasses.replace(
        states[0],
        keys=torch.cat(keys),
        values=torch.cat(values),
        valid=None if bool(valid_mask.all()) else valid_mask,
        tail=None,  # a new buffer: nothing may append in place to the rows' own
    )


def select_rows(state: ModelState, index: Tensor) -> ModelState:
    """The state of the rows `index` (B',) in that order (beam search reorders its beams this way)."""
    return state.map_tensors(lambda t: t.index_select(0, index.to(t.device)))
