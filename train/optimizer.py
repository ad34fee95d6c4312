"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask.

Decay applies to matrices only: norms' scales, biases (1-D parameters) and SSM parameters
(`jaxlm.layers.ssm_param.SSMParam`, whose values are decay rates and step sizes of a state-space system, not
weights) are excluded.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from jaxlm.layers.ssm_param import SSMParam
from train.config import OptimConfig

_NO_DECAY_NAMES = ("norm", "bias", "scale")


def lr_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr` over `warmup_steps`, then cosine to `lr * min_lr_ratio` at `total_steps`."""
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else config.lr, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=config.lr * config.min_lr_ratio)


def decay_mask(abstract_params: nnx.State) -> dict:
  """True where weight decay applies, as a pure dict shaped like the parameters."""
  def decays(path, variable) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
    if isinstance(variable, SSMParam) or len(variable.shape) < 2:
      return False
    return not any(tag in name for name in names for tag in _NO_DECAY_NAMES)
  mask = jax.tree.map_with_path(decays, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(mask)


def make_optimizer(config: OptimConfig, total_steps: int, mask: dict) -> optax.GradientTransformation:
  """Clip (global norm) -> AdamW(schedule, betas, masked decay)."""
  parts = []
  if config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(optax.adamw(lr_schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=mask))
  return optax.chain(*parts)
