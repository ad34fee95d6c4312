"""The bridge from `TrainConfig.model` to a jaxlm model: how to build it and what the loop needs to know.

train/ sees a model only through `ModelSpec`: a zero-argument constructor (called under `nnx.eval_shape` and
inside the sharded init), its vocabulary, the dtype to cast parameters to for compute (None when the model casts
itself), and its training FLOPs per token for MFU.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from flax import nnx

from train.config import ConfigError, TrainConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  model_fn: Callable[[], nnx.Module]
  vocab_size: int
  cast_dtype: Any = None  # params cast to this inside the step; None = the model handles its compute dtype
  flops_fn: Callable[[int], float] | None = None  # seq_len -> training FLOPs per token

  def flops_per_token(self, seq_len: int, num_params: int) -> float:
    return self.flops_fn(seq_len) if self.flops_fn else 6.0 * num_params


def model_fields(config: TrainConfig) -> dict[str, Any]:
  """The ModelConfig fields a run builds its model from: `compute_dtype` and `remat` fill the model's dtype and
  remat unless the model section sets them (also what a run directory's model.yaml holds)."""
  return {"dtype": config.compute_dtype, "remat": config.remat, **config.model}


def build_model(config: TrainConfig) -> ModelSpec:
  """The jaxlm LM that `config.model` describes; `compute_dtype` and `remat` fill the model's dtype and
  per-layer remat policy unless the model section sets them itself."""
  from jaxlm.models.config import ModelConfig
  from jaxlm.models.flops import flops_per_token
  from jaxlm.models.lm import LM

  if not config.model:
    raise ConfigError("model: required (ModelConfig fields, or a path to a model YAML)")
  model_dict = model_fields(config)
  try:
    model_config = ModelConfig.from_dict(model_dict)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model.{e}" if str(e).split(":")[0] in model_dict else f"model: {e}") from None
  seed = config.seed
  return ModelSpec(model_fn=lambda: LM(model_config, rngs=nnx.Rngs(seed)), vocab_size=model_config.vocab_size,
                   flops_fn=functools.partial(flops_per_token, model_config))
