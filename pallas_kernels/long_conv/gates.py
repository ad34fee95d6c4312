"""The elementwise ends of the gated long convolution, shared by the one-pass (pallas.py) and three-pass (split.py)
kernels: the gated input before the forward transform, and after the inverse transform the output or the
input-side gradients.

  forward   y = og ⊙ c + skip ⊙ u,  c = conv(ig ⊙ u, k)
  backward  with dc = og ⊙ dy and dx = conv^T(dc, k) (the correlation with k):
            du = ig ⊙ dx + skip ⊙ dy,  d_ig = u ⊙ dx,  d_og = dy ⊙ c,  d_skip = Σ_{b,t} dy ⊙ u

Float32 tiles with channels last ([rows, C] or [rows, cols, C]); a missing gate is ones, a missing skip zero;
skip comes as [1, C] (or [1, 1, C]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gated(x: jax.Array, gate: jax.Array | None) -> jax.Array:
  """x ⊙ gate (x itself without a gate)."""
  return x if gate is None else x * gate


def output(c: jax.Array, u: jax.Array, out_gate: jax.Array | None, skip: jax.Array | None) -> jax.Array:
  """og ⊙ c + skip ⊙ u."""
  y = gated(c, out_gate)
  return y if skip is None else y + skip * u


def input_grads(dx: jax.Array, u: jax.Array, in_gate: jax.Array | None, dy: jax.Array,
                skip: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """(du, d_ig): du = ig ⊙ dx + skip ⊙ dy, d_ig = u ⊙ dx (None without an input gate)."""
  du = gated(dx, in_gate)
  if skip is not None:
    du = du + skip * dy
  return du, (None if in_gate is None else u * dx)


def skip_grad(dy: jax.Array, u: jax.Array) -> jax.Array:
  """Σ dy ⊙ u over every axis but the channels: [1, C]. One axis at a time (Triton reduces one axis)."""
  total = dy * u
  while total.ndim > 2:
    total = jnp.sum(total, axis=0)
  return jnp.sum(total, axis=0, keepdims=True)
