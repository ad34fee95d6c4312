"""Head dims a kernel's tiles do not take (70, 80, 96, 112, ...) run through it zero-padded to one it does.

Zero columns change nothing: q·k sums over D, so padded q and k add 0 to every logit (soft-cap and masks act on
the logits), and padded v columns only add output columns, which are 0 and sliced off; lse is unchanged. The one
thing that reads D is the default softmax scale, so it is fixed at 1/sqrt(original D) before padding. Gradients
need no rule of their own: jnp.pad's transpose drops the padded columns' cotangents, the slice's pads them with 0.

Letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim, P padded head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def padded_head_dim(head_dim: int, kernel_head_dims: Sequence[int]) -> int | None:
  """The smallest head dim in kernel_head_dims that holds head_dim, or None if none does."""
  fits = [d for d in kernel_head_dims if d >= head_dim]
  return min(fits) if fits else None


def _pad_last(x, size: int):
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def with_padded_head_dim(attention: Callable, q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, *,
                         padded_dim: int, scale: float | None = None, return_lse: bool = False, **options):
  """attention(q, k, v, scale=, return_lse=, **options) on inputs zero-padded to head dim `padded_dim`, with the
  softmax scale of the original head dim and the output sliced back: the same result as an unpadded call."""
  head_dim = q_BTHD.shape[-1]
  if padded_dim < head_dim:
    raise ValueError(f"{padded_dim=} must be at least the inputs' {head_dim=}")
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  if padded_dim == head_dim:
    return attention(q_BTHD, k_BSKD, v_BSKD, scale=scale, return_lse=return_lse, **options)
  q_BTHP, k_BSKP, v_BSKP = (_pad_last(x, padded_dim) for x in (q_BTHD, k_BSKD, v_BSKD))
  out = attention(q_BTHP, k_BSKP, v_BSKP, scale=scale, return_lse=return_lse, **options)
  if return_lse:
    o_BTHP, lse_BHT = out
    return o_BTHP[..., :head_dim], lse_BHT
  return out[..., :head_dim]
