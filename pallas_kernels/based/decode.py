"""Portable BASED decode step: one token's state update and read-out in one pass over the state, one
`pl.pallas_call` source for CPU interpret mode, TPU (Mosaic) and GPU (Triton).

With phi(x) = [1, c1·x, c2·vec(x ⊗ x)], c1 = F^-¼, c2 = 1/(√2·√F), as in reference.based_step:
  S0' = S0 + v,   S1' = S1 + c1·k vᵀ,   S2' = S2 + c2·vec(k ⊗ k) vᵀ        (the value part, [1|F|F², D])
  z0' = z0 + 1,   z1' = z1 + c1·k,      z2' = z2 + c2·vec(k ⊗ k)            (the normaliser part, [1|F|F²])
  y = (S0' + c1·q·S1' + c2·vec(q ⊗ q)·S2') / (z0' + c1·q·z1' + c2·vec(q ⊗ q)·z2' + eps)   (or the numerator)

Generating a token costs reading and writing S2 (F²·D floats per head) once, so the kernel is built to be
memory-bound: the grid is (batch, head, value-column block), each program streams its [F², Dc] slice of S2 in
row chunks, adds the rank-one update and accumulates the read-out in the same pass, and the S pieces are aliased
input to output, so a donated state is updated in place. The order-2 columns vec(x ⊗ x) are built on chip by
selecting with 0/1 expansion patterns (row r of the chunk takes x[r // F]·x[r mod F], indices from iotas and a
float floor), with no reshape and no integer division. With one query row, products are broadcast-multiply-reduce,
not matmuls (a 1-row dot is below Triton's 16×16 minimum, and the work is bandwidth anyway). The normaliser
pieces z are F² floats per head, 1/D of the state: every value block recomputes them and writes them to fresh
(not aliased) outputs, so no program reads a z another one has already updated.

Letters: B batch, H heads, F feature dim (F² order-2 features), D value dim, Dc value columns per program; a
program streams `block_rows` state rows per inner step. Triton and interpret mode need F and D to be powers of
two; other sizes are padded with zeros (copying the state), which adds nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.based.reference import BasedState, TaylorScaled
from pallas_kernels.common.target import Target


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_d: int = 64  # value columns per program
  block_rows: int = 64  # rows of S2 per inner step (bounds the registers a Triton program holds)
  num_warps: int = 4  # Triton only
  num_stages: int = 2  # Triton only

  @classmethod
  def for_shape(cls, *, batch: int, heads: int, feature_dim: int, value_dim: int,
                backend: str) -> "BlockSizes":
    """GPU: [64, 64] register tiles (the fastest of a sweep on an H100 at B·H in 128..1024, F=16, D in 64..128,
    about 1.7-2 TB/s); elsewhere whole tiles."""
    del batch, heads  # B·H·D/Dc programs are enough to fill a GPU at any batch where decode speed matters
    x = feature_dim * feature_dim
    if backend == "gpu":
      return cls(block_d=min(64, value_dim), block_rows=min(64, x), num_warps=4)
    if backend == "tpu":
      return cls(block_d=512 if value_dim % 512 == 0 else value_dim, block_rows=x)
    return cls(block_d=value_dim, block_rows=x)


@dataclasses.dataclass(frozen=True)
class _Spec(TaylorScaled):
  feature_dim: int  # the real F (sets the scales); the tiles may be wider
  normalize: bool
  eps: float
  block_rows: int


def _column(x_row, f: int):
  """x as a column [F, 1] from a row [1, F] (selecting the diagonal of a broadcast, no transpose)."""
  r = lax.broadcasted_iota(jnp.int32, (f, f), 0)
  i = lax.broadcasted_iota(jnp.int32, (f, f), 1)
  return jnp.sum(jnp.where(r == i, x_row, 0.0), axis=1, keepdims=True)


def _order2_column(x_row, f: int, start, rows: int):
  """Rows start .. start + rows - 1 of vec(x ⊗ x) as a column [rows, 1]: row r is x[r // F]·x[r mod F]."""
  r = (start + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)).astype(jnp.float32)
  i = lax.broadcasted_iota(jnp.int32, (rows, f), 1).astype(jnp.float32)
  # r // F in float32 (exact: (r + ½)/F is at least ½/F from an integer), so no integer division on chip.
  outer = jnp.floor((r + 0.5) * (1.0 / f))
  inner = r - outer * f
  return (jnp.sum(jnp.where(i == outer, x_row, 0.0), axis=1, keepdims=True)
          * jnp.sum(jnp.where(i == inner, x_row, 0.0), axis=1, keepdims=True))


def _step_kernel(q_ref, k_ref, v_ref, s0_ref, s1_ref, s2_ref, z0_ref, z1_ref, z2_ref,
                 y_ref, s0_out, s1_out, s2_out, z0_out, z1_out, z2_out, *, spec: _Spec):
  """q_ref/k_ref [1, F]; v_ref, s0 [1, Dc]; s1 [F, Dc]; s2 [F², Dc]; z0 [1, 1]; z1 [F, 1]; z2 [F², 1]."""
  f = q_ref.shape[-1]
  q_row, k_row = q_ref[...].astype(jnp.float32), k_ref[...].astype(jnp.float32)
  v = v_ref[...].astype(jnp.float32)
  q1, k1 = _column(q_row, f) * spec.c1, _column(k_row, f) * spec.c1

  s0 = s0_ref[...] + v
  s1 = s1_ref[...] + k1 * v
  z0 = z0_ref[...] + 1.0
  z1 = z1_ref[...] + k1
  s0_out[...], s1_out[...], z0_out[...], z1_out[...] = s0, s1, z0, z1
  num = s0 + jnp.sum(q1 * s1, axis=0, keepdims=True)
  den = z0 + jnp.sum(q1 * z1, axis=0, keepdims=True)

  rows = spec.block_rows

  def body(i, carry):
    num, den = carry
    start = i * rows
    chunk = pl.ds(start, rows)
    q2 = _order2_column(q_row, f, start, rows) * spec.c2
    k2 = _order2_column(k_row, f, start, rows) * spec.c2
    s2 = s2_ref[chunk, :] + k2 * v
    z2 = z2_ref[chunk, :] + k2
    s2_out[chunk, :] = s2
    z2_out[chunk, :] = z2
    return (num + jnp.sum(q2 * s2, axis=0, keepdims=True), den + jnp.sum(q2 * z2, axis=0, keepdims=True))

  num, den = lax.fori_loop(0, s2_ref.shape[0] // rows, body, (num, den))
  y = num / (den + spec.eps) if spec.normalize else num
  y_ref[...] = y.astype(y_ref.dtype)


def _padded(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  return jnp.pad(x, [(0, size - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])


def based_decode_step(q_BHF: jax.Array, k_BHF: jax.Array, v_BHD: jax.Array, state: BasedState, *,
                      normalize: bool = True, eps: float = 1e-6, block_sizes: BlockSizes | None = None,
                      interpret: bool | None = None) -> tuple[jax.Array, BasedState]:
  """(y_BHD, new_state) of reference.based_step in one pass over the state; donate `state` to update in place."""
  target = Target.current(interpret)
  batch, heads, f = q_BHF.shape
  d = v_BHD.shape[-1]
  # Triton tiles are powers of two; Mosaic takes any size as a full-dim block.
  f_pad, d_pad = (f, d) if target.mosaic_tpu else (pl.next_power_of_2(f), pl.next_power_of_2(d))
  x_pad = f_pad * f_pad
  blocks = block_sizes or BlockSizes.for_shape(
      batch=batch, heads=heads, feature_dim=f_pad, value_dim=d_pad,
      backend=target.backend if not target.interpret else "cpu")
  block_d, rows = min(blocks.block_d, d_pad), min(blocks.block_rows, x_pad)
  if d_pad % block_d or x_pad % rows:
    raise ValueError(f"block_sizes {blocks} must divide value_dim={d_pad} and feature_dim²={x_pad}")

  # Views of the state as 2-D tiles per (batch, head): all reshapes of contiguous axes, so free (no copy)
  # unless F or D needs padding.
  s0, s1, s2, z0, z1, z2 = (x.astype(jnp.float32) for x in state)
  s0 = _padded(s0, 2, d_pad)[:, :, None, :]
  s1 = _padded(_padded(s1, 2, f_pad), 3, d_pad)
  s2 = _padded(_padded(_padded(s2, 2, f_pad), 3, f_pad), 4, d_pad).reshape(batch, heads, x_pad, d_pad)
  z0 = z0[:, :, None, None]
  z1 = _padded(z1, 2, f_pad)[:, :, :, None]
  z2 = _padded(_padded(z2, 2, f_pad), 3, f_pad).reshape(batch, heads, x_pad, 1)
  q = _padded(q_BHF, 2, f_pad)[:, :, None, :]
  k = _padded(k_BHF, 2, f_pad)[:, :, None, :]
  v = _padded(v_BHD, 2, d_pad)[:, :, None, :]

  def tile(height: int, width: int, by_column_block: bool):
    index = (lambda b, h, j: (b, h, 0, j)) if by_column_block else (lambda b, h, j: (b, h, 0, 0))
    return pl.BlockSpec((None, None, height, width), index)

  vector_spec = tile(1, f_pad, False)
  state_specs = [tile(1, block_d, True), tile(f_pad, block_d, True), tile(x_pad, block_d, True),
                 tile(1, 1, False), tile(f_pad, 1, False), tile(x_pad, 1, False)]
  state_tiles = (s0, s1, s2, z0, z1, z2)
  spec = _Spec(feature_dim=f, normalize=normalize, eps=float(eps), block_rows=rows)
  y, *new_tiles = target.pallas_call(
      functools.partial(_step_kernel, spec=spec), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
      grid=(batch, heads, d_pad // block_d),
      in_specs=[vector_spec, vector_spec, tile(1, block_d, True), *state_specs],
      out_specs=[tile(1, block_d, True), *state_specs],
      out_shape=[jax.ShapeDtypeStruct(v.shape, v_BHD.dtype),
                 *(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in state_tiles)],
      # S0/S1/S2 (inputs 3-5) are updated in place; each program reads and writes only its own column block.
      input_output_aliases={3: 1, 4: 2, 5: 3},
      name="based_decode_step")(q, k, v, *state_tiles)

  s0, s1, s2, z0, z1, z2 = new_tiles
  new_state = type(state)(
      s0_BHD=s0[:, :, 0, :d], s1_BHFD=s1[:, :, :f, :d],
      s2_BHFFD=s2.reshape(batch, heads, f_pad, f_pad, d_pad)[:, :, :f, :f, :d],
      z0_BH=z0[:, :, 0, 0], z1_BHF=z1[:, :, :f, 0], z2_BHFF=z2.reshape(batch, heads, f_pad, f_pad)[:, :, :f, :f])
  return y[:, :, 0, :d], new_state
