"""Monarch matrices (Dao et al. 2022, "Monarch: Expressive Structured Matrices"): the jnp oracles.

A Monarch map R^N -> R^M is two block-diagonal factors with a fixed reshape-transpose permutation between them
(fly's `blockdiag_butterfly_multiply` without its final output interleave):

  h[k, q] = Σ_p w1[k, q, p] · x[k·P + p]                     K blocks, each P inputs -> Q outputs
  u[l, r] = h_flat[r·L + l],  h_flat[k·Q + q] = h[k, q]       the permutation
  y[l·S + s] = Σ_r w2[l, s, r] · u[l, r]                      L blocks, each R inputs -> S outputs

The permutation views the K·Q intermediate values, in order, as an [R, L] matrix and transposes it to [L, R], so
block l of the second factor reads every L-th intermediate value starting at l (a stride-L gather). With
Q = c·L and R = c·K it links every (output block l, input block k) pair through exactly c intermediate channels,
so the dense matrix's [S, P] sub-block (l, k) has rank <= c:

  dense[l·S:(l+1)·S, k·P:(k+1)·P] = Σ_{j<c} w2[l, :, k·c + j] ⊗ w1[k, j·L + l, :]

and the best Frobenius fit of a dense matrix in that class is a rank-c truncated SVD of each sub-block
(Eckart–Young), which is what `dense_to_monarch` computes (c = 1 in the paper's square case, K = L = Q = R = √N).

Letters: N in features = K·P, M out features = L·S, K first-factor blocks, P its block input width, Q its block
output width, L second-factor blocks, R its block input width (L·R = K·Q), S its block output width, C the rank
of each sub-block, `...` any leading batch dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The oracle must not silently drop to TF32/bf16 passes on GPU.
_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
  """float32, or float64 when an input is float64 (gradient checks run in float64)."""
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def permute_intermediate(h_KQ: jax.Array, num_out_blocks: int) -> jax.Array:
  """u[..., l, r] = h_flat[..., r·L + l]: view the K·Q intermediates as [R, L] and transpose to [L, R]."""
  *batch, k, q = h_KQ.shape
  r = k * q // num_out_blocks
  h_RL = h_KQ.reshape(*batch, r, num_out_blocks)
  return jnp.swapaxes(h_RL, -1, -2)


def monarch_multiply(x_N: jax.Array, w1_KQP: jax.Array, w2_LSR: jax.Array) -> jax.Array:
  """y = (blockdiag(w2) · Perm · blockdiag(w1)) x on the last axis, as in the module docstring; dtype of x."""
  k, _, p = w1_KQP.shape
  l, s, _ = w2_LSR.shape
  batch = x_N.shape[:-1]
  dtype = compute_dtype(x_N, w1_KQP, w2_LSR)
  x_KP = x_N.astype(dtype).reshape(*batch, k, p)
  h_KQ = jnp.einsum("...kp,kqp->...kq", x_KP, w1_KQP.astype(dtype), precision=_HIGHEST)
  u_LR = permute_intermediate(h_KQ, l)
  y_LS = jnp.einsum("...lr,lsr->...ls", u_LR, w2_LSR.astype(dtype), precision=_HIGHEST)
  return y_LS.reshape(*batch, l * s).astype(x_N.dtype)


def monarch_to_dense(w1_KQP: jax.Array, w2_LSR: jax.Array) -> jax.Array:
  """The dense [M, N] matrix D with monarch_multiply(x, w1, w2) = D x, in the dtype of w1."""
  k, _, p = w1_KQP.shape
  # Column n of D is the image of the n-th basis vector; multiplying the identity gives them all at once.
  eye_NN = jnp.eye(k * p, dtype=compute_dtype(w1_KQP, w2_LSR))
  return monarch_multiply(eye_NN, w1_KQP, w2_LSR).T.astype(w1_KQP.dtype)


def monarch_dense_multiply(x_N: jax.Array, w1_KQP: jax.Array, w2_LSR: jax.Array) -> jax.Array:
  """y = D x with D = monarch_to_dense(w1, w2): the same map as `monarch_multiply` through the dense matrix."""
  dtype = compute_dtype(x_N, w1_KQP, w2_LSR)
  dense_MN = monarch_to_dense(w1_KQP.astype(dtype), w2_LSR.astype(dtype))
  y_M = jnp.einsum("...n,mn->...m", x_N.astype(dtype), dense_MN, precision=_HIGHEST)
  return y_M.astype(x_N.dtype)


def dense_blocks(dense_MN: jax.Array, nblocks: int) -> jax.Array:
  """blocks[l, k] = dense[l·S:(l+1)·S, k·P:(k+1)·P], shape [L, K, S, P] with K = L = nblocks."""
  m, n = dense_MN.shape
  return dense_MN.reshape(nblocks, m // nblocks, nblocks, n // nblocks).transpose(0, 2, 1, 3)


def dense_to_monarch(dense_MN: jax.Array, nblocks: int, rank: int = 1) -> tuple[jax.Array, jax.Array]:
  """(w1, w2) whose Monarch matrix is the closest (Frobenius) to `dense` among those with K = L = nblocks and
  Q = R = rank·nblocks: each [S, P] sub-block (l, k) is replaced by its rank-`rank` truncated SVD
  U_C diag(σ_C) V_C^T, split as w2[l, :, k·C + j] = U[:, j]·√σ_j and w1[k, j·L + l, :] = √σ_j·V[:, j].

  Shapes: w1 [nblocks, rank·nblocks, N/nblocks], w2 [nblocks, M/nblocks, rank·nblocks]; dtype of `dense`.
  """
  blocks_LKSP = dense_blocks(dense_MN.astype(compute_dtype(dense_MN)), nblocks)
  u_LKSC, sigma_LKC, vh_LKCP = jnp.linalg.svd(blocks_LKSP, full_matrices=False)
  # Split each singular value evenly between the factors so neither factor's scale dominates.
  root_LKC = jnp.sqrt(sigma_LKC[..., :rank])
  left_LKSC = u_LKSC[..., :rank] * root_LKC[..., None, :]
  right_LKCP = vh_LKCP[..., :rank, :] * root_LKC[..., :, None]
  l, k, s, _ = left_LKSC.shape
  p = right_LKCP.shape[-1]
  # w2[l, s, k·C + j] and w1[k, j·L + l, p]: the channel indices the permutation pairs with block (l, k).
  w2_LSR = left_LKSC.transpose(0, 2, 1, 3).reshape(l, s, k * rank)
  w1_KQP = right_LKCP.transpose(1, 2, 0, 3).reshape(k, rank * l, p)
  return w1_KQP.astype(dense_MN.dtype), w2_LSR.astype(dense_MN.dtype)


def monarch_project(dense_MN: jax.Array, nblocks: int, rank: int = 1) -> jax.Array:
  """The dense matrix of `dense_to_monarch(dense, nblocks, rank)`: the projection onto that Monarch class."""
  return monarch_to_dense(*dense_to_monarch(dense_MN, nblocks, rank))
