"""Channel MLPs applied after each mixer:

  SwiGLU  (Shazeer 2020):        W_down (silu(W_gate x) ⊙ W_up x)
  GELU    (GPT-2):               W_2 gelu(W_1 x + b_1) + b_2
  Monarch (Dao et al. 2022):     the GELU MLP with both maps Monarch matrices (nblocks blocks each)

Letters: B batch, T length, E model width, I hidden width.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.linear import Implementation, build_linear

MLPS = ("swiglu", "gelu", "monarch", "none")


def default_hidden(kind: str, d_model: int) -> int:
  """4·E for GELU MLPs; 8/3·E rounded up to a multiple of 128 for SwiGLU (equal parameters, as in Llama)."""
  if kind == "swiglu":
    return -(-(8 * d_model // 3) // 128) * 128
  return 4 * d_model


class SwiGLU(nnx.Module):

  def __init__(self, d_model: int, hidden: int, *, use_bias: bool = False, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = build_linear(d_model, hidden, axes=("embed", "mlp"), **kw)
    self.up = build_linear(d_model, hidden, axes=("embed", "mlp"), **kw)
    self.down = build_linear(hidden, d_model, axes=("mlp", "embed"), **kw)
    self.dtype = dtype

  def __call__(self, x_BTE: jax.Array) -> jax.Array:
    x = x_BTE.astype(self.dtype)
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class GeluMLP(nnx.Module):
  """GELU (tanh approximation, as GPT-2) between two dense or Monarch maps."""

  def __init__(self, d_model: int, hidden: int, *, use_bias: bool = True, linear: str = "dense", nblocks: int = 4,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, implementation: Implementation = "auto",
               rngs: nnx.Rngs):
    kw = dict(kind=linear, use_bias=use_bias, nblocks=nblocks, dtype=dtype, param_dtype=param_dtype,
              implementation=implementation, rngs=rngs)
    self.fc1 = build_linear(d_model, hidden, axes=("embed", "mlp"), **kw)
    self.fc2 = build_linear(hidden, d_model, axes=("mlp", "embed"), **kw)
    self.dtype = dtype

  def __call__(self, x_BTE: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x_BTE.astype(self.dtype)), approximate=True))


def build_mlp(kind: str, d_model: int, hidden: int | None = None, *, use_bias: bool = False, nblocks: int = 4,
              dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, implementation: Implementation = "auto",
              rngs: nnx.Rngs) -> nnx.Module | None:
  """The MLP named `kind` (None for "none")."""
  if kind not in MLPS:
    raise ValueError(f"mlp={kind!r} not in {MLPS}")
  if kind == "none":
    return None
  hidden = hidden or default_hidden(kind, d_model)
  if kind == "swiglu":
    return SwiGLU(d_model, hidden, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  return GeluMLP(d_model, hidden, use_bias=use_bias, linear="monarch" if kind == "monarch" else "dense",
                 nblocks=nblocks, dtype=dtype, param_dtype=param_dtype, implementation=implementation, rngs=rngs)
