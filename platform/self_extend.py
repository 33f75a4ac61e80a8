"""SelfExtend on a trained model, without training: `apply(model, group_size=4, window_size=512)`, `remove(model)`.

SelfExtend (Jin et al. 2024) lets a RoPE model read past the context it was trained at: keys closer than W
keep their true distance, farther ones are seen from grouped positions whose distances grow G times slower
(models/layers/self_extend.py has the algorithm, and every model here calls into it).

Two kinds of model take it:
- Hugging Face `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM` (a local directory loaded with
  `from_pretrained`): each attention layer's `forward` is replaced by one that projects q, k, v with the
  layer's own weights, caches the keys *before* rotation (SelfExtend rotates them again at every length) and
  attends through `self_extend_attention`. The forward and `model.generate()` (prefill, then one token at a
  time from the cache) use it, with grouped-query heads and left-padded batches.
- The platform's own models, bare or inside the exported Hugging Face classes: their attention layers already
  implement SelfExtend (the config field `self_extend`), so `apply` switches it on in every layer.

A row's positions count from its first token: under left padding, from its first unmasked one (as `generate()`
numbers them), whatever `position_ids` say. A cache filled while SelfExtend is applied holds un-rotated keys and
belongs to it: start a new one after `remove`. While applied, a Mistral or Qwen2 sliding window is off (the
grouped positions exist to see the whole context); `remove` puts it back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import Tensor, arange, nn

from .models.layers.attention import CausalSelfAttention
from .models.layers.self_extend import SelfExtendConfig, self_extend_attention

log = logging.getLogger(__name__)

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
UNDO = "_self_extend_undo"  # the model attribute holding what `remove` runs


def apply(
    model: nn.Module,
    *,
    group_size: int,
    window_size: int,
    pretrained_len: int | None = None,
    implementation: str = "two_pass",
    block_size: int = 256,
) -> nn.Module:
    """Switch every attention layer of `model` to SelfExtend (in place; `model` is returned). Applying again
    replaces the earlier settings.

    Args:
        model: A Llama, Mistral or Qwen2 model of transformers, or a model of the platform (bare, or in its
            exported Hugging Face class).
        group_size: G, how many consecutive positions share one grouped position past the window.
        window_size: W, the neighbour window: keys fewer than W positions back keep their true distance.
        pretrained_len: The context the model was trained at; longer inputs than SelfExtend covers warn.
            Default: the model config's `max_position_embeddings`, when it has one.
        implementation: "two_pass" (memory linear in length) or "replacement" (the reference).
        block_size: Query and key block of the two-pass path.
    """
    remove(model)
    config = getattr(model, "config", None)
    if pretrained_len is None and isinstance(getattr(config, "max_position_embeddings", None), int):
        pretrained_len = config.max_position_embeddings
    settings = SelfExtendConfig(group_size, window_size, pretrained_len, implementation, block_size)
    platform_layers = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    if platform_layers:
        undo = _apply_to_platform_layers(platform_layers, settings)
    elif _hf_attention_layers(model):
        undo = _apply_to_hf_model(model, settings)
    else:
        raise ValueError(
            f"SelfExtend does not know the attention of {type(model).__name__}; it takes "
            f"{', '.join(HF_ARCHITECTURES)} and the platform's models (lswt, seqcond)"
        )
    setattr(model, UNDO, undo)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: the model attends as it did before (nothing happens when SelfExtend is not applied)."""
    for step in reversed(getattr(model, UNDO, [])):
        step()
    if hasattr(model, UNDO):
        delattr(model, UNDO)
    return model


def is_applied(model: nn.Module) -> bool:
    return hasattr(model, UNDO)


# --- the platform's models ----------------------------------------------------------------------------


def _apply_to_platform_layers(layers: list[CausalSelfAttention], settings: SelfExtendConfig) -> list[Callable]:
    """Set each layer's `self_extend` (read at every call), remembering the previous value."""
    for layer in layers:
        if layer.rope_scaling is not None:
            raise ValueError(
                "SelfExtend does not combine with the model's RoPE scaling (rope_ntk_scale, rope_dynamic): both "
                "change the rotary positions; export a model without it"
            )
    undo = []
    for layer in layers:
        undo.append(lambda layer=layer, previous=layer.self_extend: setattr(layer, "self_extend", previous))
        layer.self_extend = settings
    return undo


# --- Hugging Face Llama, Mistral, Qwen2 ------------------------------------------------------------------


def _hf_attention_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.mistral.modeling_mistral import MistralAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    return [m for m in model.modules() if isinstance(m, (LlamaAttention, MistralAttention, Qwen2Attention))]


def _rope_base(config: Any) -> float:
    """The RoPE base of a config of plain rotary embeddings; other kinds are refused (SelfExtend would stack
    its grouped positions on a rescaled rotation it does not reproduce)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    rope_type = parameters.get("rope_type", "default")
    partial = parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if rope_type != "default" or partial != 1.0:
        raise ValueError(
            f"SelfExtend needs plain RoPE, but this {config.model_type} model uses rope_type={rope_type!r} "
            f"(partial_rotary_factor={partial}); SelfExtend replaces RoPE scaling, so load a model without it"
        )
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class _PaddingMask:
    """The 2D attention mask (B, S) of the model's current call, which the patched layers read: the mask the
    layers receive is built per attention implementation (4D, None, or with a sliding window), this one is
    what the caller gave."""

    def __init__(self) -> None:
        self.mask: Any = None

    def record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def forget(self, module: nn.Module, args: tuple, output: Any) -> None:
        """After the call: a layer called on its own later sees no padding."""
        self.mask = None

    def visible_keys(self, batch: int, n_keys: int) -> Tensor | None:
        """(B, S) bool, False for each row's left padding; None when no row has any."""
        mask = self.mask
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.shape != (batch, n_keys):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"SelfExtend takes a 2D attention_mask of shape (batch, keys) = {(batch, n_keys)} marking left "
                f"padding, got {shape}"
            )
        # Only a row's leading zeros hide keys: trailing ones (right padding) follow every real token, which
        # causal attention never lets it see.
        hidden = (mask == 0).int().cumprod(dim=-1).sum(dim=-1)  # (B,): the length of each row's padding
        if not bool(hidden.any()):
            return None
        return arange(n_keys, device=mask.device) >= hidden.unsqueeze(-1)  # (B, S)


def _apply_to_hf_model(model: nn.Module, settings: SelfExtendConfig) -> list[Callable]:
    layers = _hf_attention_layers(model)
    config = model.config
    rope_base = _rope_base(config)
    for layer in layers:
        if abs(layer.scaling - layer.head_dim**-0.5) > 1e-12:
            raise ValueError(
                f"SelfExtend scales scores by 1/sqrt(head_dim) but {type(layer).__name__} uses {layer.scaling}"
            )
    undo: list[Callable] = []
    padding = _PaddingMask()
    for hook in (
        model.base_model.register_forward_pre_hook(padding.record, with_kwargs=True),
        model.base_model.register_forward_hook(padding.forget),
    ):
        undo.append(hook.remove)
    for layer in layers:
        layer.forward = _self_extend_forward(layer, settings, rope_base, padding)
        undo.append(lambda layer=layer: delattr(layer, "forward"))  # back to the class's forward
    undo.extend(_full_context(config))
    return undo


def _full_context(config: Any) -> list[Callable]:
    """Turn a sliding window off in the config (the mask and the cache layers `generate()` builds read it)."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if window is None and not (layer_types and "sliding_attention" in layer_types):
        return []
    log.info("SelfExtend attends over the whole context: the sliding window (%s) is off while it is applied", window)
    config.sliding_window = None
    undo = [lambda: setattr(config, "sliding_window", window)]
    if layer_types is not None:
        config.layer_types = ["full_attention" if kind == "sliding_attention" else kind for kind in layer_types]
        undo.append(lambda: setattr(config, "layer_types", layer_types))
    return undo


def _self_extend_forward(
    layer: nn.Module, settings: SelfExtendConfig, rope_base: float, padding: _PaddingMask
) -> Callable:
    """The SelfExtend forward of one transformers attention layer (Llama, Mistral and Qwen2 share its weights'
    names and shapes); it takes what the decoder layer passes and ignores the mask built for the kernels."""

    def forward(hidden_states: Tensor, position_embeddings: Any = None, attention_mask: Any = None, **kwargs):
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        B, T, _ = hidden_states.shape
        Dh = layer.head_dim
        q = layer.q_proj(hidden_states).view(B, T, -1, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = layer.k_proj(hidden_states).view(B, T, -1, Dh).transpose(1, 2)  # (B, Hkv, T, Dh), not rotated
        v = layer.v_proj(hidden_states).view(B, T, -1, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        if cache is not None:
            k, v = cache.update(k, v, layer.layer_idx)  # (B, Hkv, S, Dh): the past and these T
            if k.shape[2] != cache.get_seq_length(layer.layer_idx):
                raise ValueError(
                    f"SelfExtend needs the keys of every past token, but the cache ({type(cache).__name__}) "
                    "holds a fixed or sliding window; use generate(..., cache_implementation='dynamic')"
                )
        y = self_extend_attention(
            q,
            k,
            v,
            group_size=settings.group_size,
            window_size=settings.window_size,
            rope_base=rope_base,
            key_padding_mask=padding.visible_keys(B, k.shape[2]),
            pretrained_len=settings.pretrained_len,
            implementation=settings.implementation,
            block_size=settings.block_size,
        )  # (B, H, T, Dh)
        return layer.o_proj(y.transpose(1, 2).reshape(B, T, -1)), None

    return forward
