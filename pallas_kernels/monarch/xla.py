"""The fast XLA form of `monarch_linear`, auto's choice where no kernel applies: the same two block-diagonal
products and permutation as reference.monarch_multiply (letters there), with the operands in the input's dtype
(16-bit inputs multiply at tensor-core rate) and float32 accumulation, where the oracle computes in float32 at the
highest precision. The intermediate h is rounded to the input's dtype between the factors, as two linear layers
in that dtype would; a fused kernel (issue 19) keeps it on chip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.monarch.reference import permute_intermediate


def monarch_multiply(x_N: jax.Array, w1_KQP: jax.Array, w2_LSR: jax.Array) -> jax.Array:
  """y = (blockdiag(w2) · Perm · blockdiag(w1)) x on the last axis; dtype of x."""
  k, _, p = w1_KQP.shape
  l, s, _ = w2_LSR.shape
  batch, dtype = x_N.shape[:-1], x_N.dtype
  x_KP = x_N.reshape(*batch, k, p)
  h_KQ = jnp.einsum("...kp,kqp->...kq", x_KP, w1_KQP.astype(dtype), preferred_element_type=jnp.float32)
  u_LR = permute_intermediate(h_KQ.astype(dtype), l)
  y_LS = jnp.einsum("...lr,lsr->...ls", u_LR, w2_LSR.astype(dtype), preferred_element_type=jnp.float32)
  return y_LS.reshape(*batch, l * s).astype(dtype)
