"""The platform's models in the Hugging Face format: export, `AutoModelForCausalLM`, `generate()`.

Importing this package registers the three families (`model_type` lswt, seqcond, serriform) with
`AutoConfig` and `AutoModelForCausalLM`, so `AutoModelForCausalLM.from_pretrained(DIR)` returns the family's
model; an exported directory also loads with `trust_remote_code=True` in a process that never imported
lctrain. `read_hf_model` reads an export back as the platform's own ModelSpec and state_dict.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import CONFIGS, LctrainConfig, LSWTHFConfig, SeqCondHFConfig, SerriformHFConfig
from .export import write_hf
from .modeling import (
    MODELS,
    LctrainForCausalLM,
    LSWTForCausalLM,
    SeqCondForCausalLM,
    SerriformForCausalLM,
)
from .reading import read_hf_config, read_hf_model

for _arch, _config in CONFIGS.items():
    AutoConfig.register(_arch, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, MODELS[_arch], exist_ok=True)

__all__ = [
    "CONFIGS",
    "MODELS",
    "LSWTForCausalLM",
    "LSWTHFConfig",
    "LctrainConfig",
    "LctrainForCausalLM",
    "SeqCondForCausalLM",
    "SeqCondHFConfig",
    "SerriformForCausalLM",
    "SerriformHFConfig",
    "read_hf_config",
    "read_hf_model",
    "write_hf",
]
