"""The Monarch factors rearranged as (output block, input block) pairs, the layout the fused kernel reads.

With Q = C·L (C intermediate channels per pair, letters as in reference.py), output block l of the second factor
reads intermediates r·L + l, and these are w1's rows j·L + l of every first-factor block k (r = k·C + j). So the
product is, per output block l,

  y[l·S + s] = Σ_k Σ_{j<C} b[l, k, j, s] · (Σ_p x[k·P + p] · a[l, k, p, j])
  a[l, k, p, j] = w1[k, j·L + l, p]        [L, K, P, C]  the first-factor rows block l needs, as x @ a
  b[l, k, j, s] = w2[l, s, k·C + j]        [L, K, C, S]  the second-factor columns, as u @ b

the permutation folded into which weights a program reads, so no intermediate is ever rearranged. Widths are
zero-padded where the kernel's products need it (C to a tile width, P and S to a multiple of 16): zero rows and
columns add nothing to the product, and the padding's gradient is sliced away by autodiff.

Letters: L output blocks, K input blocks, P, C, S as above (padded widths keep their letter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def channels(w1_KQP: jax.Array, w2_LSR: jax.Array) -> int:
  """C = Q / L: intermediate channels linking one (output block, input block) pair."""
  return w1_KQP.shape[1] // w2_LSR.shape[0]


def forward_pairs(w1_KQP: jax.Array, w2_LSR: jax.Array, *, c_pad: int, p_pad: int, s_pad: int
                  ) -> tuple[jax.Array, jax.Array]:
  """(a [L, K, P, C], b [L, K, C, S]) as in the module docstring, zero-padded to (p_pad, c_pad, s_pad)."""
  k, q, p = w1_KQP.shape
  l, s, _ = w2_LSR.shape
  c = channels(w1_KQP, w2_LSR)
  a_LKPC = w1_KQP.reshape(k, c, l, p).transpose(2, 0, 3, 1)
  b_LKCS = w2_LSR.reshape(l, s, k, c).transpose(0, 2, 3, 1)
  a_LKPC = jnp.pad(a_LKPC, ((0, 0), (0, 0), (0, p_pad - p), (0, c_pad - c)))
  b_LKCS = jnp.pad(b_LKCS, ((0, 0), (0, 0), (0, c_pad - c), (0, s_pad - s)))
  return a_LKPC, b_LKCS


def transposed_pairs(a_OIXC: jax.Array, b_OICY: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The pairs of the transposed map (the input gradient): dx[i] = Σ_o (dy[o] @ b[o, i]ᵀ) @ a[o, i]ᵀ, itself a
  pair product with the roles of the blocks swapped: (bᵀ [I, O, Y, C], aᵀ [I, O, C, X])."""
  return b_OICY.transpose(1, 0, 3, 2), a_OIXC.transpose(1, 0, 3, 2)
