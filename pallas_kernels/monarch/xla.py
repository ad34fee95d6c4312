"""The fast XLA form of `monarch_linear`, auto's choice where no kernel applies: the same two block-diagonal
products and permutation as reference.monarch_multiply (letters there), with the operands in the input's dtype
(16-bit inputs multiply at tensor-core rate) and float32 accumulation, where the oracle computes in float32 at the
highest precision. The intermediate u is rounded to the input's dtype between the factors, as two linear layers
in that dtype would; a fused kernel (issue 19) keeps it on chip.

The backward is written out (custom_vjp) rather than left to autodiff: transposing a dot with
preferred_element_type=float32 hands the next dot a float32 cotangent, so all four backward products would run
with float32 operands (TF32 or slower on a GPU, twice the bytes). Here the cotangents are rounded to the input's
dtype like u, as the backward of two linear layers in that dtype would, and every product keeps 16-bit operands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.monarch.reference import permute_intermediate


def _dot(spec: str, a: jax.Array, b: jax.Array, dtype, result=None) -> jax.Array:
  """einsum with operands in `dtype`, its result asked for in `result` (default `dtype`; 16-bit products
  accumulate in float32 either way: cuBLAS's and XLA CPU's compute type for them), rounded to `dtype`."""
  out = jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=result or dtype)
  return out.astype(dtype)


def _unpermute(u_LR: jax.Array, num_in_blocks: int) -> jax.Array:
  """The inverse of permute_intermediate: h[..., k, q] from u[..., l, r]."""
  *batch, _, r = u_LR.shape
  return jnp.swapaxes(u_LR, -1, -2).reshape(*batch, num_in_blocks, -1)


def intermediate(x_N: jax.Array, w1_KQP: jax.Array, num_out_blocks: int, result=None) -> jax.Array:
  """u [..., L, R]: the first factor's products, permuted and rounded to x's dtype (what the backward reads);
  `result`: the dtype its products are asked for in (_forward says which)."""
  k, _, p = w1_KQP.shape
  x_KP = x_N.reshape(*x_N.shape[:-1], k, p)
  return permute_intermediate(_dot("...kp,kqp->...kq", x_KP, w1_KQP, x_N.dtype, result), num_out_blocks)


def _forward(x_N, w1_KQP, w2_LSR, result):
  l, s, _ = w2_LSR.shape
  u_LR = intermediate(x_N, w1_KQP, l, result)
  y_LS = _dot("...lr,lsr->...ls", u_LR, w2_LSR, x_N.dtype, result)
  return y_LS.reshape(*x_N.shape[:-1], l * s), u_LR


# Which dtype the forward's products are asked for in, measured both ways on the H100 (16k tokens, 2048->8192->2048
# MLP, bf16): alone, float32 results ran nb8 in 0.73-0.77 ms and bf16 results in 1.03 (dense 1.6 in all runs);
# under the gradient, bf16 results ran forward+backward in 2.76 / 2.52 ms (nb4 / nb8, 2026-12-07, twelfth
# session) and float32 results in 3.20 / 2.95 (fourteenth session), dense 4.0-4.2. So each path takes its faster
# form; the values differ only in how the float32 accumulator is rounded to x's dtype. The backward's products ask
# for `dtype`: XLA's CPU dot has no 16-bit x 16-bit = float32 form for two of them.
@jax.custom_vjp
def monarch_multiply(x_N: jax.Array, w1_KQP: jax.Array, w2_LSR: jax.Array) -> jax.Array:
  """y = (blockdiag(w2) · Perm · blockdiag(w1)) x on the last axis; dtype of x."""
  return _forward(x_N, w1_KQP, w2_LSR, jnp.float32)[0]


def _monarch_fwd(x_N, w1_KQP, w2_LSR):
  y_N, u_LR = _forward(x_N, w1_KQP, w2_LSR, None)
  return y_N, (x_N, w1_KQP, w2_LSR, u_LR)


def backward(residuals: tuple[jax.Array, ...], dy_M: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dx, dw1, dw2) from the residuals (x, w1, w2, u = intermediate(x, w1, L)) and the output's cotangent."""
  x_N, w1_KQP, w2_LSR, u_LR = residuals
  k, _, p = w1_KQP.shape
  l, s, _ = w2_LSR.shape
  batch, dtype = x_N.shape[:-1], x_N.dtype
  dy_LS = dy_M.reshape(*batch, l, s)
  # Weight gradients sum over the tokens (every leading axis, flattened into one: XLA's CPU dot takes one
  # contracting axis for 16-bit operands with a float32 result), accumulated in float32 for the weights' dtype.
  weight_grad = lambda spec, a, b, out: jnp.einsum(spec, a.reshape(-1, *a.shape[-2:]).astype(dtype),
                                                   b.reshape(-1, *b.shape[-2:]),
                                                   preferred_element_type=jnp.float32).astype(out.dtype)
  dw2_LSR = weight_grad("tls,tlr->lsr", dy_LS, u_LR, w2_LSR)
  dh_KQ = _unpermute(_dot("...ls,lsr->...lr", dy_LS, w2_LSR, dtype), k)
  dw1_KQP = weight_grad("tkq,tkp->kqp", dh_KQ, x_N.reshape(*batch, k, p), w1_KQP)
  dx_KP = _dot("...kq,kqp->...kp", dh_KQ, w1_KQP, dtype)
  return dx_KP.reshape(x_N.shape), dw1_KQP, dw2_LSR


monarch_multiply.defvjp(_monarch_fwd, backward)
