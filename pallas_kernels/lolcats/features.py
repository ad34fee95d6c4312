"""Feature maps of LoLCATs' linear term, per head, applied to RoPE'd queries and keys.

  hedgehog  phi(x) = [softmax(x W̃), softmax(-x W̃)]      W̃ [H, D, F] learnable, X = 2F
            (Zhang et al. 2024, "The Hedgehog & the Porcupine"; LoLCATs' `softmax_dim` map, untied per head)
  taylor    phi(x) = taylor(x W̃) = [1, y / F^¼, vec(y ⊗ y) / (√2·√F)],  y = x W̃    X = 1 + F + F²
            (BASED's second-order Taylor map of exp, pallas_kernels/based/reference.py, after a learnable
            projection to F dims so that X stays small)

Both are positive (hedgehog) or have phi(q)·phi(k) = 1 + s + s²/2 >= 1/2 (taylor), so the linear term never
cancels the window term's mass. Computed in float32; returned in x's dtype.

Letters: B batch, T length, H heads, D head dim, F projected width, X feature width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.based.reference import taylor_features

FEATURE_MAPS = ("hedgehog", "taylor")


def feature_width(feature_map: str, feature_dim: int) -> int:
  """X, the width of phi(x) for a projection to `feature_dim` = F."""
  if feature_map == "hedgehog":
    return 2 * feature_dim
  if feature_map == "taylor":
    return 1 + feature_dim + feature_dim * feature_dim
  raise ValueError(f"feature_map={feature_map!r} not in {FEATURE_MAPS}")


def hedgehog_features(x_BTHD: jax.Array, w_HDF: jax.Array) -> jax.Array:
  """[softmax(x W̃), softmax(-x W̃)] per head along the last axis: [..., H, 2F] (any leading axes)."""
  y = jnp.einsum("...hd,hdf->...hf", x_BTHD.astype(jnp.float32), w_HDF.astype(jnp.float32))
  return jnp.concatenate([jax.nn.softmax(y, axis=-1), jax.nn.softmax(-y, axis=-1)], axis=-1).astype(x_BTHD.dtype)


def projected_taylor_features(x_BTHD: jax.Array, w_HDF: jax.Array) -> jax.Array:
  """taylor(x W̃) per head: [..., H, 1 + F + F²]."""
  y = jnp.einsum("...hd,hdf->...hf", x_BTHD.astype(jnp.float32), w_HDF.astype(jnp.float32))
  return taylor_features(y).astype(x_BTHD.dtype)


def features(feature_map: str, x_BTHD: jax.Array, w_HDF: jax.Array) -> jax.Array:
  """phi(x) of the named map."""
  if feature_map == "hedgehog":
    return hedgehog_features(x_BTHD, w_HDF)
  if feature_map == "taylor":
    return projected_taylor_features(x_BTHD, w_HDF)
  raise ValueError(f"feature_map={feature_map!r} not in {FEATURE_MAPS}")
