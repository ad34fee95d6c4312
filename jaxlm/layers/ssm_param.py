"""SSM parameter tagging: `SSMParam`, the variable type of the values that generate a sequence filter, and
`ssm_param`, which makes one.

An SSM's step sizes, poles, B, C and shift taps (H3), and the implicit-filter MLP of Hyena, set the time scale of
a convolution rather than weighing activations. They are tagged with their own `nnx.Param` subclass so that:
- they stay float32 whatever the compute dtype (a bf16 pole |Ā| close to 1 loses the decay it encodes);
- train/optimizer.py excludes them from weight decay by type (`isinstance(variable, SSMParam)`): shrinking these
  values changes the filter's time scale, not its size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SSMParam(nnx.Param):
  """A parameter that generates a sequence filter rather than a weight applied to activations (module docstring)."""


def ssm_param(value: jax.Array, axes: tuple[str | None, ...]) -> SSMParam:
  """An SSMParam (float32) holding `value`, annotated with logical axis names."""
  return SSMParam(nnx.with_partitioning(lambda: jnp.asarray(value, jnp.float32), axes)())
