"""Token embedding, learned absolute positions (GPT-2), and the LM head, tied or not.

  h_t = E[token_t] (+ P[position_t])        logits_t = h_t Eᵀ (tied) or h_t W (untied)

Logits are float32 whatever the compute dtype: the softmax over a 50k vocabulary in bf16 loses the tail.
Letters: B batch, T length, D model width, V vocabulary, L max positions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class Embedding(nnx.Module):
  """E [V, D]; `attend` is the tied LM head."""

  def __init__(self, vocab_size: int, dim: int, *, init_std: float = 0.02, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.with_partitioning(nnx.initializers.normal(init_std), ("vocab", "embed"))
    self.embedding = nnx.Param(init(rngs.params(), (vocab_size, dim), param_dtype))

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD: jax.Array) -> jax.Array:
    return jnp.einsum("...d,vd->...v", x_BTD.astype(self.dtype), self.embedding[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)


class PositionEmbedding(nnx.Module):
  """P [L, D], added to the token embedding at absolute positions (GPT-2); no use beyond L positions."""

  def __init__(self, max_position: int, dim: int, *, init_std: float = 0.02, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.with_partitioning(nnx.initializers.normal(init_std), (None, "embed"))
    self.embedding = nnx.Param(init(rngs.params(), (max_position, dim), param_dtype))

  def __call__(self, positions_BT: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], positions_BT, axis=0, mode="clip").astype(self.dtype)


class LMHead(nnx.Module):
  """W [D, V] for untied embeddings."""

  def __init__(self, dim: int, vocab_size: int, *, init_std: float = 0.02, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.with_partitioning(nnx.initializers.normal(init_std), ("embed", "vocab"))
    self.kernel = nnx.Param(init(rngs.params(), (dim, vocab_size), param_dtype))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return jnp.einsum("...d,dv->...v", x_BTD.astype(self.dtype), self.kernel[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)
