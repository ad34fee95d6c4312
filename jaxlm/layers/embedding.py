"""Token embedding, learned absolute positions (GPT-2), and the LM head, tied or not.

  h_t = W_emb[token_t] (+ W_pos[position_t])        logits_t = h_t W_embᵀ (tied) or h_t W_head (untied)

Logits are float32 whatever the compute dtype: the softmax over a 50k vocabulary in bf16 loses the tail.
Letters: B batch, T length, E model width, V vocabulary; max_position rows of learned positions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class Embedding(nnx.Module):
  """W_emb [V, E]; `attend` is the tied LM head."""

  def __init__(self, vocab_size: int, dim: int, *, init_std: float = 0.02, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.with_partitioning(nnx.initializers.normal(init_std), ("vocab", "embed"))
    self.embedding = nnx.Param(init(rngs.params(), (vocab_size, dim), param_dtype))

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTE: jax.Array) -> jax.Array:
    return jnp.einsum("...e,ve->...v", x_BTE.astype(self.dtype), self.embedding[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)


class PositionEmbedding(nnx.Module):
  """W_pos [max_position, E], added to the token embedding at absolute positions (GPT-2); no use beyond
  max_position positions."""

  def __init__(self, max_position: int, dim: int, *, init_std: float = 0.02, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.with_partitioning(nnx.initializers.normal(init_std), (None, "embed"))
    self.embedding = nnx.Param(init(rngs.params(), (max_position, dim), param_dtype))

  def __call__(self, positions_BT: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], positions_BT, axis=0, mode="clip").astype(self.dtype)


class LMHead(nnx.Module):
  """W_head [E, V] for untied embeddings."""

  def __init__(self, dim: int, vocab_size: int, *, init_std: float = 0.02, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.with_partitioning(nnx.initializers.normal(init_std), ("embed", "vocab"))
    self.kernel = nnx.Param(init(rngs.params(), (dim, vocab_size), param_dtype))

  def __call__(self, x_BTE: jax.Array) -> jax.Array:
    return jnp.einsum("...e,ev->...v", x_BTE.astype(self.dtype), self.kernel[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)
