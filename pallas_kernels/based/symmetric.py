"""BASED's state in the symmetric order-2 layout (`BasedState`, what every api call takes and returns), the full
layout the chunked kernels still use inside (`BasedFullState`), and exact converters between them.

The Taylor map's order-2 block c2·vec(x ⊗ x), c2 = 1/(√2·√F), has F² entries but only U = F(F+1)/2 distinct
products, x_i·x_j = x_j·x_i. Keeping each pair i ≤ j once, the off-diagonal ones scaled by √2,

  phi_sym(x) = [1, c1·x, c2·w_u·x_i·x_j  for u = (i, j), i ≤ j],   w_u = 1 if i = j else √2,   c1 = F^-¼

gives the same inner products, phi_sym(q)·phi_sym(k) = phi(q)·phi(k) = 1 + s + s²/2, s = q·k/√F:
  Σ_{i≤j} c2²·w_u²·q_i q_j k_i k_j = c2²·(Σ_i (q_i k_i)² + 2·Σ_{i<j} q_i q_j k_i k_j) = c2²·(q·k)².
So 1 + F + U features per head instead of 1 + F + F² (153 instead of 273 at F = 16): 44% fewer bytes in the state
S = Σ phi(k) vᵀ and normaliser z = Σ phi(k), which a decode step reads and writes whole (as the BASED paper counts
the state). Pairs are ordered as np.triu_indices(F): row-major over the upper triangle.

Converters (exact in real arithmetic; float32 rounds the √2 once):
  full -> symmetric   S_u = w_u·(S[i, j] + S[j, i]) / 2   (readouts phi_sym(q)·S_sym = phi(q)·S for any S)
  symmetric -> full   S[i, j] = S[j, i] = S_u / w_u        (a full state built from sums of k ⊗ k is symmetric)

The chunked kernels (pallas.py's portable one, hopper_chunked.py's Mosaic GPU forward) still carry the full
layout on chip; `on_full_layout` converts their initial and final states at the call boundary in XLA. Computing
natively on the symmetric layout inside them is the remaining step (fewer state FLOPs and on-chip bytes there).

Letters: B batch, H heads, F feature dim, D value head dim, U = F(F+1)/2 order-2 pairs i ≤ j.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def taylor_scales(feature_dim: int) -> tuple[float, float]:
  """(c1, c2) = (F^-¼, 1/(√2·√F)): phi(x) = [1, c1·x, c2·vec(x ⊗ x)]."""
  return feature_dim ** -0.25, 1.0 / (math.sqrt(2.0) * math.sqrt(feature_dim))


def num_pairs(feature_dim: int) -> int:
  """U = F(F+1)/2, the order-2 features of the symmetric layout."""
  return feature_dim * (feature_dim + 1) // 2


@functools.lru_cache(maxsize=None)
def order2_pairs(feature_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(i_U, j_U, w_U): the pair u = (i, j), i ≤ j, of each symmetric order-2 feature and its weight (1 on the
  diagonal, √2 off it), as static numpy arrays."""
  i_U, j_U = np.triu_indices(feature_dim)
  w_U = np.where(i_U == j_U, 1.0, math.sqrt(2.0))
  return i_U.astype(np.int32), j_U.astype(np.int32), w_U


def order2_features(x_F: jax.Array) -> jax.Array:
  """The order-2 block of phi_sym along the last axis: c2·w_u·x_i·x_j, shape (..., U)."""
  f = x_F.shape[-1]
  i_U, j_U, w_U = order2_pairs(f)
  scale_U = np.asarray(taylor_scales(f)[1] * w_U, np.float64)
  return x_F[..., i_U] * x_F[..., j_U] * jnp.asarray(scale_U, x_F.dtype)


def symmetric_taylor_features(x_F: jax.Array) -> jax.Array:
  """phi_sym(x) = [1, c1·x, order2_features(x)] along the last axis, shape (..., 1 + F + U), computed in float32
  (float64 when given float64) and returned in x's dtype."""
  f = x_F.shape[-1]
  x = x_F.astype(jnp.result_type(jnp.float32, x_F.dtype))
  ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
  return jnp.concatenate([ones, x * taylor_scales(f)[0], order2_features(x)], axis=-1).astype(x_F.dtype)


class BasedState(NamedTuple):
  """The prefix sums S and z split by Taylor order, the order-2 part in the symmetric layout (float32)."""

  s0_BHD: jax.Array  # Σ v
  s1_BHFD: jax.Array  # Σ (k / F^¼) vᵀ
  s2_BHUD: jax.Array  # Σ order2_features(k) vᵀ
  z0_BH: jax.Array  # Σ 1
  z1_BHF: jax.Array  # Σ k / F^¼
  z2_BHU: jax.Array  # Σ order2_features(k)

  @classmethod
  def zeros(cls, batch: int, heads: int, feature_dim: int, value_dim: int,
            dtype=jnp.float32) -> "BasedState":
    """The empty state: no token seen yet."""
    b, h, f, u, d = batch, heads, feature_dim, num_pairs(feature_dim), value_dim
    return cls(jnp.zeros((b, h, d), dtype), jnp.zeros((b, h, f, d), dtype), jnp.zeros((b, h, u, d), dtype),
               jnp.zeros((b, h), dtype), jnp.zeros((b, h, f), dtype), jnp.zeros((b, h, u), dtype))


class BasedFullState(NamedTuple):
  """The same sums with the full order-2 block c2·vec(k ⊗ k) (F² rows): the chunked kernels' internal layout."""

  s0_BHD: jax.Array
  s1_BHFD: jax.Array
  s2_BHFFD: jax.Array  # Σ (k ⊗ k) / (√2·√F) vᵀ
  z0_BH: jax.Array
  z1_BHF: jax.Array
  z2_BHFF: jax.Array  # Σ (k ⊗ k) / (√2·√F)

  @classmethod
  def zeros(cls, batch: int, heads: int, feature_dim: int, value_dim: int,
            dtype=jnp.float32) -> "BasedFullState":
    b, h, f, d = batch, heads, feature_dim, value_dim
    return cls(jnp.zeros((b, h, d), dtype), jnp.zeros((b, h, f, d), dtype), jnp.zeros((b, h, f, f, d), dtype),
               jnp.zeros((b, h), dtype), jnp.zeros((b, h, f), dtype), jnp.zeros((b, h, f, f), dtype))


def _pair_weights(f: int, dtype, trailing: int) -> jax.Array:
  """w_U shaped to broadcast over `trailing` axes after U."""
  return jnp.asarray(order2_pairs(f)[2], dtype).reshape(-1, *(1,) * trailing)


def full_to_symmetric(state: BasedFullState) -> BasedState:
  """The symmetric state with the same readouts: S_u = w_u·(S[i, j] + S[j, i]) / 2 (module docstring)."""
  f = state.s1_BHFD.shape[2]
  i_U, j_U, _ = order2_pairs(f)

  def fold(x, trailing: int):  # x [B, H, F, F, ...] -> [B, H, U, ...]
    return (x[:, :, i_U, j_U] + x[:, :, j_U, i_U]) * (_pair_weights(f, x.dtype, trailing) / 2)

  return BasedState(state.s0_BHD, state.s1_BHFD, fold(state.s2_BHFFD, 1), state.z0_BH, state.z1_BHF,
                    fold(state.z2_BHFF, 0))


def symmetric_to_full(state: BasedState) -> BasedFullState:
  """The full state with the same readouts: S[i, j] = S[j, i] = S_u / w_u (module docstring)."""
  f = state.s1_BHFD.shape[2]
  i_U, j_U, _ = order2_pairs(f)

  def spread(x, trailing: int):  # x [B, H, U, ...] -> [B, H, F, F, ...]
    x = x / _pair_weights(f, x.dtype, trailing)
    full = jnp.zeros((*x.shape[:2], f, f, *x.shape[3:]), x.dtype).at[:, :, i_U, j_U].set(x)
    return full.at[:, :, j_U, i_U].set(x)

  return BasedFullState(state.s0_BHD, state.s1_BHFD, spread(state.s2_BHUD, 1), state.z0_BH, state.z1_BHF,
                        spread(state.z2_BHU, 0))


def on_full_layout(kernel: Callable[..., Any]) -> Callable[..., Any]:
  """A chunked kernel that carries BasedFullState, called with and returning BasedState: the initial state is
  spread to the full layout and the final state folded back, in XLA (gradients flow through both)."""

  @functools.wraps(kernel)
  def call(q, k, v, *, initial_state: BasedState | None = None, return_final_state: bool = False, **kwargs):
    full = None if initial_state is None else symmetric_to_full(BasedState(*initial_state))
    out = kernel(q, k, v, initial_state=full, return_final_state=return_final_state, **kwargs)
    if not return_final_state:
      return out
    y, final = out
    return y, full_to_symmetric(BasedFullState(*final))

  return call
