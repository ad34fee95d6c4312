"""Mixer registry: name -> (config dataclass, module class, which ops' implementations fill the config).

Every mixer is built one way, `Mixer(config, *, dtype, param_dtype, rngs)`: its config is a frozen dataclass that
holds everything the layer needs (the model width `d_model`, its own options, the `implementation=` name of each
op it calls) and validates itself when made. A model config names mixers ("attention", "based", ...) and gives
per-name options; `mixer_config` turns the options into that config, adding what the model decides for every
layer (the width, the longest sequence, the implementation of each op) unless the options set it. Unknown or
invalid options raise a ValueError naming `mixer_options.<name>.<key>`, before anything is built or compiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxlm.layers.attention import Attention, AttentionConfig, SlidingWindowConfig
from jaxlm.layers.base_conv import BaseConv, BaseConvConfig
from jaxlm.layers.based import Based, BasedConfig
from jaxlm.layers.h3 import H3, H3Config
from jaxlm.layers.hyena import Hyena, HyenaConfig
from jaxlm.layers.lolcats import Lolcats, LolcatsConfig

# Ops whose implementation a model config may choose (pallas_kernels/<op>/api.py).
OPS = ("attention", "attention_decode", "based", "based_decode", "long_conv", "short_conv", "monarch", "lolcats",
       "lolcats_decode")


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  config_cls: type  # a frozen dataclass with a `d_model` field, validated in __post_init__
  module_cls: type  # built as module_cls(config, *, dtype, param_dtype, rngs)
  implementation_fields: Mapping[str, str]  # config field -> op whose implementation name fills it


_ATTENTION_OPS = {"implementation": "attention", "decode_implementation": "attention_decode",
                  "monarch_implementation": "monarch"}

MIXERS: dict[str, MixerSpec] = {
    "attention": MixerSpec(AttentionConfig, Attention, _ATTENTION_OPS),
    "sliding_window": MixerSpec(SlidingWindowConfig, Attention, _ATTENTION_OPS),
    "based": MixerSpec(BasedConfig, Based, {"implementation": "based", "decode_implementation": "based_decode"}),
    "base_conv": MixerSpec(BaseConvConfig, BaseConv, {"implementation": "short_conv"}),
    "h3": MixerSpec(H3Config, H3, {"implementation": "long_conv", "short_conv_implementation": "short_conv"}),
    "hyena": MixerSpec(HyenaConfig, Hyena, {"implementation": "long_conv", "short_conv_implementation": "short_conv"}),
    "lolcats": MixerSpec(LolcatsConfig, Lolcats, {"implementation": "lolcats",
                                                  "decode_implementation": "lolcats_decode"}),
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
    if key not in fields or key == "d_model":
      hint = " (set d_model at the top level)" if key == "d_model" else f"; fields: {sorted(fields - {'d_model'})}"
      raise ValueError(f"{where}.{key}: unknown option for mixer {name!r}{hint}")
  filled: dict[str, Any] = {"d_model": d_model}
  if "max_length" in fields:
    filled["max_length"] = max_length
  for field, op in spec.implementation_fields.items():
    filled[field] = implementation.get(op, "auto")
  filled.update(options)
  try:
    return spec.config_cls(**filled)
  except TypeError as e:  # a required field without a default (e.g. BASED's num_heads)
    raise ValueError(f"{where}: {e}") from None
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
