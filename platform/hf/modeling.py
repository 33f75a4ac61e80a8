"""Hugging Face `PreTrainedModel`s around the platform's models: `LSWTForCausalLM`, `SeqCondForCausalLM`,
`SerriformForCausalLM`.

Each holds the platform's plain `nn.Module` as `.model`, built from the config's ModelSpec, so its weights are
saved as `model.<name in the platform's state_dict>` and its forward is the platform's forward. The family's
own state (ModelState: the KV cache, the condensers' sums, the conv tails and recurrences) is the cache that
`generate()` carries between calls: the prompt runs once, then only the newest token is fed with the state.

Padding: the platform's models take no attention mask. A left-padded batch (padding_side="left", what
`generate()` needs) is prefilled row by row without the pads and the row states joined (hf/state.py), so
each row decodes exactly as it would alone. Right padding needs nothing for a plain forward: a causal
model's real tokens never see the pads after them.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models.output import ModelState
from .configuration import LctrainConfig, LSWTHFConfig, SeqCondHFConfig, SerriformHFConfig
from .state import select_rows, stack_rows

# The output field (and keyword) under which `generate()` carries the cache: `cache` in transformers from 5.x,
# `past_key_values` before; the family's ModelState goes there.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class LctrainForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM of one of the platform's families; subclasses name the family through `config_class`."""

    config_class = LctrainConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []
    supports_gradient_checkpointing = False

    def __init__(self, config: LctrainConfig):
        super().__init__(config)
        self.model = config.spec().build()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The platform model initialises itself when built; transformers calls this for what a checkpoint
        does not hold, which in an export is only the MoE stages' usage counters (non-persistent buffers)."""
        if hasattr(module, "reset_counters"):
            module.reset_counters()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def get_output_embeddings(self) -> None:
        """None: the output head is the platform model's own (tied inside its forward, or untied); nothing
        for transformers to tie or resize."""
        return None

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """False: the cache is the family's ModelState, returned by the first forward (no DynamicCache)."""
        return False

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: ModelState | None = None,
        past_key_values: ModelState | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids (B, T) -> logits (B, T, V), and the state that continues the rows when `use_cache`.

        `attention_mask` (B, T) matters only without a state: left padding is prefilled row by row; right
        padding runs as it is (pads come after every real token). With a state, the state already knows
        each row's past, and the new tokens are all real.
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError(f"{type(self).__name__} takes input_ids (token ids), not inputs_embeds")
        state = cache if cache is not None else past_key_values
        if state is not None and not isinstance(state, ModelState):
            raise ValueError(
                f"{type(self).__name__} carries its own state as the cache; got a {type(state).__name__}: "
                "pass the `cache` a previous call returned, or none"
            )
        use_cache = True if use_cache is None else use_cache
        if state is None and padding_side(attention_mask) == "left":
            logits, new_state = self._left_padded_forward(input_ids, attention_mask)
        else:
            out = self.model(input_ids, state)
            logits, new_state = out.logits, out.state
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            # next-token loss: position t predicts labels[t + 1]; -100 marks positions left out
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: new_state if use_cache else None})
        return output if return_dict is not False else output.to_tuple()

    def _left_padded_forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ModelState]:
        """Each row without its left pads, then one state for the batch; the pads' logits are zero."""
        B, T = input_ids.shape
        lengths = attention_mask.sum(dim=1).tolist()
        self._check_left_padding_supported()
        logits, states = None, []
        for b, n in enumerate(lengths):
            out = self.model(input_ids[b : b + 1, T - n :])
            if logits is None:
                logits = out.logits.new_zeros(B, T, out.logits.shape[-1])  # (B, T, V)
            logits[b, T - n :] = out.logits[0]
            states.append(out.state)
        return logits, stack_rows(states, lengths, input_ids.device)

    def _check_left_padding_supported(self) -> None:
        """Families whose state cannot hide a row's pads say so here."""

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: ModelState | None = None,
        past_key_values: ModelState | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        next_sequence_length: int | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The whole prompt (and its mask) on the first call; afterwards only the tokens the state has not seen."""
        if inputs_embeds is not None:
            raise ValueError(f"{type(self).__name__}.generate takes input_ids, not inputs_embeds")
        state = cache if cache is not None else past_key_values
        if state is None:
            if padding_side(attention_mask) == "right":
                raise ValueError(
                    "generate() needs prompts padded on the left (tokenizer.padding_side = 'left'): "
                    "right-padded rows would continue after their pads"
                )
            return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
        new = next_sequence_length or 1
        return {"input_ids": input_ids[:, -new:], CACHE: state, "use_cache": use_cache}

    def _reorder_cache(self, state: ModelState, beam_idx: Tensor) -> ModelState:
        """Beam search: the state rows of the surviving beams."""
        return select_rows(state, beam_idx)


def padding_side(attention_mask: Tensor | None) -> str | None:
    """'left' or 'right': the side on which rows of `attention_mask` (B, T) are padded; None when no row is.
    Pads between real tokens, rows of pads only, and rows padded on different sides are refused."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    if bool(mask.all()):
        return None
    if not bool(mask.any(dim=1).all()):
        raise ValueError("attention_mask has a row with no tokens; give every row at least one real token")
    # a row's real tokens must be one run: pads, then tokens (left) or tokens, then pads (right)
    changes = (mask[:, 1:] != mask[:, :-1]).sum(dim=1)  # (B,)
    left = ~mask[:, 0] & mask[:, -1]
    right = mask[:, 0] & ~mask[:, -1]
    if not bool(((changes == 0) | ((changes == 1) & (left | right))).all()):
        raise ValueError("attention_mask has pads between real tokens; pad each row on one side only (left)")
    if bool(left.any()) and bool(right.any()):
        raise ValueError("attention_mask pads some rows on the left and others on the right; pad on the left")
    return "left" if bool(left.any()) else "right"


class LSWTForCausalLM(LctrainForCausalLM):
    config_class = LSWTHFConfig

    def _check_left_padding_supported(self) -> None:
        if self.model.config.rope_dynamic:
            raise ValueError(
                "LSWT with rope_dynamic cannot decode a left-padded batch: its RoPE scale follows the number of "
                "cached keys, which the pads change; generate one prompt at a time or prompts of equal length"
            )


class SeqCondForCausalLM(LctrainForCausalLM):
    config_class = SeqCondHFConfig


class SerriformForCausalLM(LctrainForCausalLM):
    config_class = SerriformHFConfig


MODELS: dict[str, type[LctrainForCausalLM]] = {
    m.config_class.model_type: m for m in (LSWTForCausalLM, SeqCondForCausalLM, SerriformForCausalLM)
}
