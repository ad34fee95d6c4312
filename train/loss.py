"""Fused cross-entropy: the LM head, the loss and its gradient computed together, `chunk` positions at a time.

Letters: B rows, T length, E model width, V vocabulary, C positions per chunk, J chunks.

For logits z = x·W (float32 accumulation) and a label y >= 0, the loss is logsumexp(z) - z_y and its gradient is
dz = softmax(z) - onehot(y), so dx = dz·Wᵀ and dW = xᵀ·dz. The forward computes dz per chunk while the chunk's
logits exist, and accumulates dx [B, T, E] and dW [E, V] (float32) from it; the function returns only sums over
tokens, so the cotangent of the loss is one scalar g and the backward is g·dx, g·dW: no logits are recomputed, and
at most [B, C, V] logits exist at once. Labels < 0 are ignored.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def chunk_loss_and_dlogits(x_BCE: jax.Array, w_EV: jax.Array, labels_BC: jax.Array
                           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per-token loss, correctness and label mask [B, C] float32 (train/step.py token_stats' arithmetic), and the
  loss's gradient with respect to the logits [B, C, V] float32 (zero at ignored positions)."""
  logits_BCV = jnp.einsum("bce,ev->bcv", x_BCE, w_EV, preferred_element_type=jnp.float32)
  mask_BC = labels_BC >= 0
  safe_BC = jnp.where(mask_BC, labels_BC, 0)
  # Subtracting the max keeps exp from overflowing; jax.nn.logsumexp (token_stats) does the same.
  max_BC = jnp.max(logits_BCV, axis=-1)
  exp_BCV = jnp.exp(logits_BCV - max_BC[..., None])
  sum_BC = exp_BCV.sum(-1)
  log_z_BC = jnp.log(sum_BC) + max_BC
  gold_BC = jnp.take_along_axis(logits_BCV, safe_BC[..., None], axis=-1)[..., 0]
  loss_BC = jnp.where(mask_BC, log_z_BC - gold_BC, 0.0)
  correct_BC = jnp.where(mask_BC, jnp.argmax(logits_BCV, axis=-1) == safe_BC, False)
  # softmax - onehot, written with an iota compare so XLA fuses it instead of materialising a onehot tensor
  is_gold_BCV = jax.lax.broadcasted_iota(jnp.int32, logits_BCV.shape, 2) == safe_BC[..., None]
  dlogits_BCV = exp_BCV / sum_BC[..., None] - is_gold_BCV
  dlogits_BCV = jnp.where(mask_BC[..., None], dlogits_BCV, 0.0)
  return loss_BC, correct_BC.astype(jnp.float32), mask_BC.astype(jnp.float32), dlogits_BCV


def split_chunks(x_BTE: jax.Array, labels_BT: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """x and labels as [J, B, C, ...]; the last chunk padded with zero features and ignored labels."""
  if chunk < 1:
    raise ValueError(f"{chunk=} must be positive")
  B, T, E = x_BTE.shape
  pad = -T % chunk
  x_BTE = jnp.pad(x_BTE, ((0, 0), (0, pad), (0, 0)))
  labels_BT = jnp.pad(labels_BT, ((0, 0), (0, pad)), constant_values=-1)
  J = (T + pad) // chunk
  return x_BTE.reshape(B, J, chunk, E).swapaxes(0, 1), labels_BT.reshape(B, J, chunk).swapaxes(0, 1)


def _scan(x_BTE: jax.Array, w_EV: jax.Array, labels_BT: jax.Array, chunk: int, with_grads: bool):
  """The sums (loss, correct, labelled) over all tokens and, if `with_grads`, d(loss sum)/dx and /dW."""
  B, T, E = x_BTE.shape
  x_JBCE, labels_JBC = split_chunks(x_BTE, labels_BT, chunk)

  def one_chunk(carry, pair):
    sums, dw_EV = carry
    x_BCE, labels_BC = pair
    loss_BC, correct_BC, mask_BC, dlogits_BCV = chunk_loss_and_dlogits(x_BCE, w_EV, labels_BC)
    sums = (sums[0] + loss_BC.sum(), sums[1] + correct_BC.sum(), sums[2] + mask_BC.sum())
    if not with_grads:
      return (sums, dw_EV), None
    # The gradient matmuls take inputs in the compute dtype, as the forward's x·W does; accumulation is float32.
    dlogits_BCV = dlogits_BCV.astype(w_EV.dtype)
    dx_BCE = jnp.einsum("bcv,ev->bce", dlogits_BCV, w_EV, preferred_element_type=jnp.float32).astype(x_BCE.dtype)
    dw_EV = dw_EV + jnp.einsum("bce,bcv->ev", x_BCE, dlogits_BCV, preferred_element_type=jnp.float32)
    return (sums, dw_EV), dx_BCE

  zero = jnp.zeros((), jnp.float32)
  dw_EV = jnp.zeros(w_EV.shape if with_grads else (), jnp.float32)
  (sums, dw_EV), dx_JBCE = jax.lax.scan(one_chunk, ((zero, zero, zero), dw_EV), (x_JBCE, labels_JBC))
  if not with_grads:
    return sums
  dx_BTE = dx_JBCE.swapaxes(0, 1).reshape(B, -1, E)[:, :T]
  return sums, dx_BTE, dw_EV.astype(w_EV.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_token_sums(x_BTE: jax.Array, w_EV: jax.Array, labels_BT: jax.Array, chunk: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(summed cross-entropy, correct tokens, labelled tokens) of logits x·W, float32 scalars, `chunk` positions at a
  time; differentiable in x and W (the counts have zero gradient) without recomputing logits in the backward."""
  return _scan(x_BTE, w_EV, labels_BT, chunk, with_grads=False)


def _fused_fwd(x_BTE, w_EV, labels_BT, chunk):
  sums, dx_BTE, dw_EV = _scan(x_BTE, w_EV, labels_BT, chunk, with_grads=True)
  return sums, (dx_BTE, dw_EV)


def _fused_bwd(chunk, residuals, cotangents):
  del chunk
  dx_BTE, dw_EV = residuals
  g = cotangents[0]  # one scalar: the outputs are sums, so every token's loss has the same cotangent
  return (g * dx_BTE).astype(dx_BTE.dtype), (g * dw_EV).astype(dw_EV.dtype), None


fused_token_sums.defvjp(_fused_fwd, _fused_bwd)
