"""Rotary position embedding (RoFormer, Su et al. 2021), full or partial, in the half-split (GPT-NeoX) layout.

The first R dims of each head are rotated, the rest pass through (partial rotary: R < D). With x1 = x[:R/2],
x2 = x[R/2:R] and θ_i = base^(-2i/R):

  rope(x, p) = [x1 cos(pθ) - x2 sin(pθ),  x2 cos(pθ) + x1 sin(pθ),  x[R:]]

so q·k after rotation depends on the positions only through their difference.
Letters: B batch, T length, H heads, D head dim, R rotary dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_rotary_dim(rotary_dim: int, head_dim: int) -> None:
  if rotary_dim < 0 or rotary_dim > head_dim or rotary_dim % 2:
    raise ValueError(f"rotary_dim={rotary_dim} must be even and in [0, head_dim={head_dim}]")


def rotary_angles(positions: jax.Array, rotary_dim: int, base: float) -> jax.Array:
  """pθ_i as float32 [..., R/2] for integer positions [...]."""
  inv_freq = base ** (-jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
  return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rotary(x_BTHD: jax.Array, positions_BT: jax.Array, *, rotary_dim: int, base: float = 10000.0
                 ) -> jax.Array:
  """x rotated by its positions (broadcast over heads) on the first `rotary_dim` dims; dtype of x.

  Also takes a single step: x [B, H, D] with positions [B].
  """
  if rotary_dim == 0:
    return x_BTHD
  check_rotary_dim(rotary_dim, x_BTHD.shape[-1])
  angles = rotary_angles(positions_BT, rotary_dim, base)[..., None, :]  # broadcast over the heads axis
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x = x_BTHD.astype(jnp.float32)
  half = rotary_dim // 2
  x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return rotated.astype(x_BTHD.dtype)


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
  """Position of each token within its packed document: t minus the index where its segment starts."""
  t = jnp.arange(segment_ids_BT.shape[-1], dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones_like(segment_ids_BT[..., :1], dtype=bool),
                            segment_ids_BT[..., 1:] != segment_ids_BT[..., :-1]], axis=-1)
  start_index = jax.lax.cummax(jnp.where(starts, t, 0), axis=segment_ids_BT.ndim - 1)
  return t - start_index


def default_positions(batch: int, length: int, segment_ids_BT: jax.Array | None = None) -> jax.Array:
  """0..T-1 per row, restarting at each new segment when packed."""
  if segment_ids_BT is not None:
    return segment_positions(segment_ids_BT)
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
