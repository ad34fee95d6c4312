"""Mixer registry: name -> (config dataclass, module class, how the model config fills the config).

A model config names mixers ("attention", "based", ...) and gives per-name options; `mixer_config` turns the
options into the mixer's own frozen config, adding what the model decides for every layer (the width, the
longest sequence, the `implementation=` of each op) unless the options set it. Unknown options raise a
ValueError naming the mixer and the key, before anything is built or compiled.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from flax import nnx

# Ops whose implementation a model config may choose (pallas_kernels/<op>/api.py).
OPS = ("attention", "attention_decode", "based", "based_decode", "long_conv", "short_conv", "monarch")


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  module: str  # where the classes live; imported on first use, so a model only loads the mixers it uses
  config_name: str
  class_name: str
  # config field -> op whose implementation name fills it (mixers that take their implementation in the config)
  implementation_fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
  takes_d_model: bool = True  # False: the module takes d_model as an argument (attention)

  @property
  def config_cls(self) -> type:
    return getattr(importlib.import_module(self.module), self.config_name)

  @property
  def module_cls(self) -> type:
    return getattr(importlib.import_module(self.module), self.class_name)


MIXERS: dict[str, MixerSpec] = {
    "attention": MixerSpec("jaxlm.layers.attention", "AttentionConfig", "Attention", takes_d_model=False),
    "sliding_window": MixerSpec("jaxlm.layers.attention", "SlidingWindowConfig", "Attention",
                                takes_d_model=False),
    "based": MixerSpec("jaxlm.layers.based", "BasedConfig", "Based",
                       {"implementation": "based", "decode_implementation": "based_decode"}),
    "base_conv": MixerSpec("jaxlm.layers.base_conv", "BaseConvConfig", "BaseConv", {"implementation": "short_conv"}),
    "h3": MixerSpec("jaxlm.layers.h3", "H3Config", "H3", {"implementation": "long_conv"}),
    "hyena": MixerSpec("jaxlm.layers.hyena", "HyenaConfig", "Hyena",
                       {"implementation": "long_conv", "short_conv_implementation": "short_conv"}),
}


def mixer_config(name: str, options: Mapping[str, Any], *, d_model: int, max_length: int,
                 implementation: Mapping[str, str]) -> Any:
  """The config dataclass of mixer `name` from its options; ValueError naming `mixer_options.<name>.<key>`."""
  if name not in MIXERS:
    raise ValueError(f"unknown mixer {name!r}; choose from {sorted(MIXERS)}")
  spec = MIXERS[name]
  fields = {f.name for f in dataclasses.fields(spec.config_cls)}
  where = f"mixer_options.{name}"
  for key in options:
    if key not in fields or (key == "d_model" and spec.takes_d_model):
      hint = " (set d_model at the top level)" if key == "d_model" else f"; fields: {sorted(fields - {'d_model'})}"
      raise ValueError(f"{where}.{key}: unknown option for mixer {name!r}{hint}")
  filled: dict[str, Any] = {}
  if spec.takes_d_model:
    filled["d_model"] = d_model
  if "max_length" in fields:
    filled["max_length"] = max_length
  for field, op in spec.implementation_fields.items():
    filled[field] = implementation.get(op, "auto")
  filled.update(options)
  try:
    config = spec.config_cls(**filled)
    if hasattr(config, "validate"):
      config.validate(d_model)
  except TypeError as e:  # a required field without a default (e.g. BASED's num_heads)
    raise ValueError(f"{where}: {e}") from None
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  return config


def build_mixer(name: str, config: Any, d_model: int, *, dtype: Any, param_dtype: Any,
                implementation: Mapping[str, str], rngs: nnx.Rngs) -> nnx.Module:
  """The mixer module `name` for its config; attention also takes the model width and op implementations."""
  spec = MIXERS[name]
  if spec.takes_d_model:  # width and implementations are already inside the config
    return spec.module_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  return spec.module_cls(d_model, config, dtype=dtype, param_dtype=param_dtype, implementation=implementation,
                         rngs=rngs)
