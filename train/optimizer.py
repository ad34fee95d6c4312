"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask.
The peak learning rate is a value in the optimizer state (`scale_by_peak_lr`), not a constant of the compiled
step: runs that differ only in their learning rate (a sweep's) compile to one program, which the sweep's
compilation cache then serves (train/sweep/__main__.py).

Decay applies to matrices only: norms' scales, biases (1-D parameters) and SSM parameters
(`jaxlm.layers.ssm_param.SSMParam`, whose values are decay rates and step sizes of a state-space system, not
weights) are excluded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.layers.ssm_param import SSMParam
from train.config import OptimConfig

_NO_DECAY_NAMES = ("norm", "bias", "scale")


def unit_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to 1 over `warmup_steps`, then cosine to `min_lr_ratio` at `total_steps`: the learning rate
  over the peak, `config.lr`."""
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else 1.0, peak_value=1.0, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=config.min_lr_ratio)


def lr_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
  """The learning rate at a step: config.lr times the unit schedule."""
  unit = unit_schedule(config, total_steps)
  return lambda step: config.lr * unit(step)


class PeakLR(NamedTuple):
  lr: jax.Array  # float32 scalar


def scale_by_peak_lr(lr: float) -> optax.GradientTransformation:
  """Updates times the peak learning rate, which the state holds (set at init, checkpointed with the run)."""
  def init(params):
    del params
    return PeakLR(jnp.asarray(lr, jnp.float32))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * state.lr.astype(u.dtype), updates), state

  return optax.GradientTransformation(init, update)


def peak_lr(opt_state: Any) -> jax.Array:
  """The peak learning rate held by make_optimizer's state (its last transformation's)."""
  return opt_state[-1].lr


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
  """Clip (global norm) -> AdamW(unit schedule, betas, masked decay) -> times the peak learning rate. AdamW's
  update is -lr(t)·(adam + decay·param), so scaling the unit schedule's update by the peak is the same update."""
  parts = []
  if config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(optax.adamw(unit_schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=mask))
  parts.append(scale_by_peak_lr(config.lr))
  return optax.chain(*parts)
