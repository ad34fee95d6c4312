"""Oracles compute their float32 products in full float32.

GPUs run float32 matmuls as TF32 by default (about 1e-3 relative error), which would make a reference less exact
than the kernels it judges; this wrapper traces the function with the highest matmul precision instead.
"""

from __future__ import annotations

import functools

import jax


def exact_matmuls(fn):
  """`fn` with every dot/einsum traced at float32 precision (put it under any jax.jit decorator)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)

  return wrapped
