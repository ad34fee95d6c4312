"""Public Monarch functions: `monarch_linear` (validated, dispatched over implementations), its initialiser, and
conversions to and from dense matrices. The math and the letters (N, M, K, P, Q, L, R, S) are in reference.py.

Implementations: "hopper" (hopper.py: the fused forward in Mosaic GPU with XLA's backward, 16-bit on sm90; by name
only until it has run on an H100), "pallas" (pallas.py: both factors and the permutation fused in one kernel; by
name only until it beats the XLA form on a GPU), "xla" (xla.py: 16-bit operands, float32 accumulation; auto's
choice) and "reference" (the float32 oracle). `block_sizes=` tunes the kernel that runs (hopper.BlockSizes,
pallas.BlockSizes).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import validation
from pallas_kernels.common.dispatch import AUTO, Dispatcher, Implementation
from pallas_kernels.monarch import hopper, pallas, reference, xla

# auto takes the XLA form (16-bit operands, float32 accumulation) everywhere: the float32 oracle ran the
# GPT-2-Monarch MLPs five times slower than dense ones on the H100 (issue 19); by name the oracle still runs.
DISPATCHER = Dispatcher("monarch", (
    # By name only: lowered for CUDA on CPU (tests/pallas_kernels/test_monarch_hopper.py), never run yet.
    Implementation("hopper", hopper.monarch_multiply, supports=hopper.supports, in_auto=False, per_shard=True,
                   block_sizes=hopper.BlockSizes),
    # By name only (fail-closed): the fused kernel is tested in interpret mode and lowered for Triton and TPU on
    # CPU, never run on a GPU. Once tests/pallas_kernels/test_monarch_kernel.py's gpu tests pass on the H100 and
    # `python -m benchmarks monarch` shows it ahead of "xla" there, auto should take it on GPU: in_auto=True,
    # auto_backends=("gpu",) (and "tpu" once run there).
    Implementation("pallas", pallas.monarch_multiply, supports=pallas.supports, in_auto=False, per_shard=True,
                   block_sizes=pallas.BlockSizes),
    Implementation("xla", xla.monarch_multiply),
    Implementation("reference", reference.monarch_multiply),
))


def check_factors(w1: jax.Array, w2: jax.Array) -> None:
  """Both factors are float [blocks, block_out, block_in] arrays and w2's blocks read all of w1's outputs."""
  validation.check_dtype("w1", w1)
  validation.check_dtype("w2", w2)
  validation.check_rank("w1", w1, 3, "nblocks, block_out, block_in")
  validation.check_rank("w2", w2, 3, "nblocks, block_out, block_in")
  k, q, _ = w1.shape
  l, _, r = w2.shape
  if min(w1.shape) < 1 or min(w2.shape) < 1:
    raise ValueError(f"w1 and w2 must have no empty axis, got w1 shape {w1.shape}, w2 shape {w2.shape}")
  if l * r != k * q:
    raise ValueError(f"w2 blocks must read the {k}·{q} = {k * q} outputs of w1 (w1 shape {w1.shape}): "
                     f"w2.shape[0]·w2.shape[2] = {l}·{r} = {l * r}, w2 shape {w2.shape}")


def monarch_linear(x: jax.Array, w1: jax.Array, w2: jax.Array, *, implementation: str = AUTO,
                   block_sizes: hopper.BlockSizes | pallas.BlockSizes | None = None) -> jax.Array:
  """y[..., M] = Monarch(w1, w2) x[..., N]: block-diagonal w1, the reshape-transpose permutation, block-diagonal
  w2 (see reference.py); output in the dtype of x. block_sizes must be the running implementation's (name it),
  None its defaults for the shape."""
  validation.check_dtype("x", x)
  check_factors(w1, w2)
  k, q, p = w1.shape
  l, s, r = w2.shape
  if x.ndim < 1 or x.shape[-1] != k * p:
    raise ValueError(f"x.shape[-1] (in_features) must be nblocks·block_in = {k}·{p} = {k * p} for w1 shape "
                     f"{w1.shape}, got x shape {x.shape}")
  options = dict(batch_shape=tuple(x.shape[:-1]), in_features=k * p, out_features=l * s, nblocks=k,
                 out_nblocks=l, block_in=p, block_mid=q, block_mid_in=r, block_out=s,
                 dtype=jnp.dtype(x.dtype), weight_dtype=jnp.dtype(w1.dtype))
  # Tokens are independent and the factors whole: under a mesh the kernel runs per shard, x's leading axis over
  # the data axes (the factors' letters avoid B, H and K, the ones sharding.py splits).
  x_layout = "B" + "T" * (x.ndim - 2) + "N" if x.ndim >= 2 else "N"
  return DISPATCHER.run(implementation, options, positional=("x", "w1", "w2"), arrays=dict(x=x, w1=w1, w2=w2),
                        layouts=dict(x=x_layout, w1="LQP", w2="LSR"), out_layouts=x_layout, static={},
                        block_sizes=block_sizes)


def check_features(in_features: int, out_features: int, nblocks: int) -> None:
  validation.check_positive("nblocks", nblocks)
  validation.check_positive("in_features", in_features)
  validation.check_positive("out_features", out_features)
  for name, value in (("in_features", in_features), ("out_features", out_features)):
    if value % nblocks:
      raise ValueError(f"{name}={value} must be divisible by {nblocks=}")


def monarch_init(key: jax.Array, in_features: int, out_features: int, nblocks: int,
                 dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """(w1, w2) shaped as fly's MonarchLinear, each block uniform in ±1/√fan_in like a Linear layer's weight.

  The intermediate width is min(in_features, out_features): w1 [nblocks, width/nblocks, in/nblocks] and
  w2 [nblocks, out/nblocks, width/nblocks], so neither factor holds more parameters than a square block layer.
  """
  check_features(in_features, out_features, nblocks)
  block_in, block_out = in_features // nblocks, out_features // nblocks
  block_mid = min(block_in, block_out)
  shapes = ((nblocks, block_mid, block_in), (nblocks, block_out, block_mid))
  keys = jax.random.split(key, len(shapes))
  # kaiming_uniform(a=√5), torch's Linear default, reduces to a bound of 1/√fan_in; fan_in is the block's input.
  return tuple(jax.random.uniform(k, shape, dtype, -1.0 / math.sqrt(shape[-1]), 1.0 / math.sqrt(shape[-1]))
               for k, shape in zip(keys, shapes))


def monarch_to_dense(w1: jax.Array, w2: jax.Array) -> jax.Array:
  """The [out_features, in_features] matrix D with monarch_linear(x, w1, w2) = x @ D.T; dtype of w1."""
  check_factors(w1, w2)
  return reference.monarch_to_dense(w1, w2)


def dense_to_monarch(dense: jax.Array, nblocks: int, rank: int = 1) -> tuple[jax.Array, jax.Array]:
  """The Monarch factors (w1, w2) closest to `dense` in Frobenius norm, each of the nblocks² sub-blocks of
  rank <= `rank` (reference.dense_to_monarch gives the shapes)."""
  validation.check_dtype("dense", dense)
  validation.check_rank("dense", dense, 2, "out_features, in_features")
  out_features, in_features = dense.shape
  check_features(in_features, out_features, nblocks)
  validation.check_positive("rank", rank)
  max_rank = min(in_features, out_features) // nblocks
  if rank > max_rank:
    raise ValueError(f"{rank=} exceeds the sub-block size: at most min{dense.shape} / {nblocks=} = {max_rank}")
  return reference.dense_to_monarch(dense, nblocks, rank)
