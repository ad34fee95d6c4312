"""The linear maps of every layer (mixers' projections, MLPs): dense (nnx.Linear) or Monarch (Dao et al. 2022),
built by `build_linear`, and the lookup of an op's `implementation=` setting.

A dense kernel starts fan-in truncated normal (flax's lecun_normal), its bias at zero. A Monarch layer replaces
the dense [in, out] matrix by two block-diagonal factors with a fixed permutation between them
(pallas_kernels/monarch/reference.py): with nblocks = 4 it holds about 1/4 to 1/2 of the dense parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.monarch import api as monarch_api

LINEARS = ("dense", "monarch")

Implementation = str | Mapping[str, str]


def op_implementation(implementation: Implementation, op: str) -> str:
  """The implementation name for `op`: a single name for every op, or a mapping op -> name (default "auto")."""
  if isinstance(implementation, str):
    return implementation
  return dict(implementation).get(op, "auto")


def dense_init() -> nnx.Initializer:
  # Fan-in scaling keeps activations O(1) at any width, so tiny test models and 1.3B presets share one rule.
  return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class MonarchLinear(nnx.Module):
  """y = Monarch(w1, w2) x + b, initialised as fly's MonarchLinear (each block like a torch Linear)."""

  def __init__(self, in_features: int, out_features: int, *, nblocks: int = 4, use_bias: bool = True,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, implementation: str = "auto",
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.implementation = implementation
    w1, w2 = monarch_api.monarch_init(rngs.params(), in_features, out_features, nblocks, dtype=param_dtype)
    # Blocks stay replicated: sharding the block axis would need a collective at the permutation.
    self.w1 = nnx.Param(w1, out_sharding=(None, None, None))
    self.w2 = nnx.Param(w2, out_sharding=(None, None, None))
    bound = 1.0 / math.sqrt(in_features)  # torch Linear's bias init, as fly keeps it
    self.bias = (nnx.Param(jax.random.uniform(rngs.params(), (out_features,), param_dtype, -bound, bound),
                           out_sharding=(None,)) if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = monarch_api.monarch_linear(x.astype(self.dtype), self.w1[...].astype(self.dtype),
                                   self.w2[...].astype(self.dtype), implementation=self.implementation)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def build_linear(in_features: int, out_features: int, *, kind: str = "dense", axes: tuple[str | None, str | None],
                 use_bias: bool = False, nblocks: int = 4, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, implementation: Implementation = "auto",
                 rngs: nnx.Rngs) -> nnx.Module:
  """A dense or Monarch linear map; `axes` are the logical sharding names of a dense kernel [in, out]."""
  if kind == "dense":
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.with_partitioning(dense_init(), axes),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros, (axes[1],)), rngs=rngs)
  if kind == "monarch":
    return MonarchLinear(in_features, out_features, nblocks=nblocks, use_bias=use_bias, dtype=dtype,
                         param_dtype=param_dtype, implementation=op_implementation(implementation, "monarch"),
                         rngs=rngs)
  raise ValueError(f"linear kind={kind!r} not in {LINEARS}")
