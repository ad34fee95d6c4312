"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019) and LayerNorm, statistics in float32.

  RMSNorm(x)   = x / sqrt(mean(x²) + eps) · scale
  LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) · scale + bias

Letters: B batch, T length, E model width.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

NORMS = ("rmsnorm", "layernorm")


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("embed",))(None, (dim,), param_dtype))

  def __call__(self, x_BTE: jax.Array) -> jax.Array:
    # The mean of squares of a bf16 residual loses bits in bf16; reduce in float32 and cast once on the way out.
    x = x_BTE.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float = 1e-5, use_bias: bool = True, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("embed",))(None, (dim,), param_dtype))
    self.bias = (nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("embed",))(None, (dim,), param_dtype))
                 if use_bias else None)

  def __call__(self, x_BTE: jax.Array) -> jax.Array:
    x = x_BTE.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def build_norm(kind: str, dim: int, *, eps: float = 1e-5, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32) -> RMSNorm | LayerNorm:
  """The norm named `kind` ("rmsnorm" or "layernorm")."""
  if kind == "rmsnorm":
    return RMSNorm(dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
  if kind == "layernorm":
    return LayerNorm(dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
  raise ValueError(f"norm={kind!r} not in {NORMS}")
