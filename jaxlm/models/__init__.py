"""Language models built from a `ModelConfig`: the LM, its config and YAML loading, presets, parameter counts and
training FLOPs per token."""

from jaxlm.models.config import ModelConfig, load_model_config
from jaxlm.models.flops import flops_per_token
from jaxlm.models.lm import LM, LMCache, abstract_model, count_params
from jaxlm.models.presets import load_preset, preset_names

__all__ = ["LM", "LMCache", "ModelConfig", "abstract_model", "count_params", "flops_per_token", "load_model_config",
           "load_preset", "preset_names"]
