"""Hugging Face configs of the platform's families: `model_type` lswt, seqcond, serriform.

A config holds the family's named size and *every* field of its config dataclass (`model_config`), not only
the fields that differ from the size: an export must rebuild the same model even if a later version of the
platform changes what a named size means. `spec()` turns it back into the platform's ModelSpec, the one
object that builds a model everywhere else. A few standard names (`vocab_size`, `hidden_size`,
`num_hidden_layers`) are copied out for tools that read them; the platform never reads them back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from ..models.spec import ModelSpec
from .reading import spec_from_hf_config


class LctrainConfig(PretrainedConfig):
    """Base of the three family configs; `model_type` is the platform's architecture name."""

    model_type = ""

    def __init__(self, size: str = "debug", model_config: dict[str, Any] | None = None, **kwargs: Any):
        # The models tie their embeddings inside forward (LSWT, SeqCond) or not at all (Serriform): nothing for
        # transformers to tie.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
        self.size = size
        if model_config is None:  # built in code from a size name alone: that size as it is
            model_config = dataclasses.asdict(ModelSpec(self.model_type, size).config())
        self.model_config = dict(model_config)
        config = self.spec().config()
        self.vocab_size = config.vocab_size
        self.hidden_size = config.d_model
        self.num_hidden_layers = config.n_layers

    @classmethod
    def from_spec(cls, spec: ModelSpec, **kwargs: Any) -> LctrainConfig:
        """The config of a platform model (every field of its config, so the export stands alone)."""
        if spec.arch != cls.model_type:
            raise ValueError(f"a {spec.arch} model cannot take a {cls.model_type} config")
        return cls(size=spec.size, model_config=dataclasses.asdict(spec.config()), **kwargs)

    def spec(self) -> ModelSpec:
        """The platform's ModelSpec: the family, its named size and the fields that differ from it."""
        return spec_from_hf_config(
            {"model_type": self.model_type, "size": self.size, "model_config": self.model_config}
        )


# Each family's class keeps the base's __init__: transformers 5 gives a config subclass without its own
# __init__ a generated one that would skip it.
class LSWTHFConfig(LctrainConfig):
    model_type = "lswt"
    __init__ = LctrainConfig.__init__


class SeqCondHFConfig(LctrainConfig):
    model_type = "seqcond"
    __init__ = LctrainConfig.__init__


class SerriformHFConfig(LctrainConfig):
    model_type = "serriform"
    __init__ = LctrainConfig.__init__


CONFIGS: dict[str, type[LctrainConfig]] = {c.model_type: c for c in (LSWTHFConfig, SeqCondHFConfig, SerriformHFConfig)}
