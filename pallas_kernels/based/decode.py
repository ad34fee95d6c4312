"""Portable BASED decode step: one token's state update and read-out in one pass over the state, one
`pl.pallas_call` source for CPU interpret mode, TPU (Mosaic) and GPU (Triton).

With phi_sym(x) = [1, c1·x, c2·w_u·x_i·x_j for pairs u = (i ≤ j)], c1 = F^-¼, c2 = 1/(√2·√F), w_u = 1 on the
diagonal and √2 off it (symmetric.py), as in reference.based_step:
  S0' = S0 + v,   S1' = S1 + c1·k vᵀ,   S2' = S2 + k2 vᵀ        (the value part, [1|F|U, D])
  z0' = z0 + 1,   z1' = z1 + c1·k,      z2' = z2 + k2            (the normaliser part, [1|F|U])
  y = (S0' + c1·q·S1' + q2·S2') / (z0' + c1·q·z1' + q2·z2' + eps)   (or the numerator),  x2_u = c2·w_u·x_i·x_j

Generating a token costs reading and writing S2 (U·D floats per head, U = F(F+1)/2: 136 rows at F = 16 where the
full order-2 block had 256) once, so the kernel is built to be memory-bound: the grid is (batch, head,
value-column block), each program streams its [U, Dc] slice of S2 in row chunks, adds the rank-one update and
accumulates the read-out in the same pass, and the S pieces are aliased input to output, so a donated state is
updated in place. The order-2 column of a chunk is built on chip by selecting x_i and x_j with 0/1 patterns
against the pair tables i_U, j_U (two int32 columns, U entries each, read by every program: the triangle has no
closed-form inverse without a square root). Triton tiles are powers of two and U is not (136 = 2·64 + 8), so rows
go in chunks of `block_rows` and the rest in static power-of-two pieces. With one query row, products are
broadcast-multiply-reduce, not matmuls (a 1-row dot is below Triton's 16×16 minimum, and the work is bandwidth
anyway). The normaliser pieces z are 1/D of the state: every value block recomputes them and writes them to fresh
(not aliased) outputs, so no program reads a z another one has already updated.

Letters: B batch, H heads, F feature dim, U = F(F+1)/2 order-2 pairs, D value dim, Dc value columns per program; a
program streams `block_rows` state rows per inner step. Triton and interpret mode take F padded to a power of two
and D either cut into power-of-two column blocks (a multiple of 16: 112 = 7 blocks of 16) or else padded to one (q,
k, v, S0, S1 and z1 padded with zeros, which adds nothing; S2 and z2 never need it). Padding copies the state in
and out around the kernel, so it costs what the kernel saves.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.based.reference import BasedState, TaylorScaled
from pallas_kernels.based.symmetric import num_pairs, order2_pairs
from pallas_kernels.common.target import Target


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_d: int = 64  # value columns per program
  block_rows: int = 64  # rows of S2 per inner step, a power of two (bounds the registers a Triton program holds)
  num_warps: int = 4  # Triton only
  num_stages: int = 2  # Triton only

  @classmethod
  def for_shape(cls, *, batch: int, heads: int, feature_dim: int, value_dim: int,
                backend: str) -> "BlockSizes":
    """GPU: [64, 64] register tiles (the fastest of a sweep on an H100 at B·H in 128..1024, F=16, D in 64..128,
    about 1.7-2 TB/s, timed on the full F² layout); elsewhere whole tiles (the largest power of two of rows)."""
    del batch, heads  # B·H·D/Dc programs are enough to fill a GPU at any batch where decode speed matters
    u = num_pairs(feature_dim)
    if backend == "gpu":
      return cls(block_d=_power_of_2_dividing(value_dim, 64), block_rows=64, num_warps=4)
    if backend == "tpu":
      return cls(block_d=512 if value_dim % 512 == 0 else value_dim, block_rows=_floor_power_of_2(u))
    return cls(block_d=_power_of_2_dividing(value_dim, value_dim), block_rows=_floor_power_of_2(u))


def _floor_power_of_2(n: int) -> int:
  return 1 << (n.bit_length() - 1)


def _power_of_2_dividing(n: int, at_most: int) -> int:
  """The largest power of two <= at_most that divides n (a Triton tile width that cuts n without padding)."""
  return min(n & -n, _floor_power_of_2(at_most))


def _triton_value_dim(d: int) -> int:
  """D as the Triton kernel sees it: unchanged when 16-wide (or wider power-of-two) column blocks cut it, else the
  next power of two. Padding copies the whole state in and out every step, so a D like 112 (the 1.3B preset's) is
  cut into 16-wide blocks instead of being padded to 128."""
  return d if d % 16 == 0 else pl.next_power_of_2(d)


def row_pieces(total: int, rows: int) -> tuple[int, tuple[tuple[int, int], ...]]:
  """(full chunks of `rows`, then (start, size) of the rest in descending powers of two): how a program walks
  `total` state rows with power-of-two tiles only."""
  chunks = total // rows
  start, rest = chunks * rows, []
  for bit in reversed(range(rows.bit_length())):
    size = 1 << bit
    if (total - chunks * rows) & size:
      rest.append((start, size))
      start += size
  return chunks, tuple(rest)


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


def _order2_column(x_row, i_col, j_col, c2: float):
  """The symmetric order-2 features of pairs (i_col, j_col) [rows, 1] as a column: c2·w·x_i·x_j, w = √2 off the
  diagonal."""
  rows, f = i_col.shape[0], x_row.shape[-1]
  lane = lax.broadcasted_iota(jnp.int32, (rows, f), 1)
  x_i = jnp.sum(jnp.where(lane == i_col, x_row, 0.0), axis=1, keepdims=True)
  x_j = jnp.sum(jnp.where(lane == j_col, x_row, 0.0), axis=1, keepdims=True)
  scale = jnp.where(i_col == j_col, c2, c2 * 2.0 ** 0.5)
  return x_i * x_j * scale


def _step_kernel(q_ref, k_ref, v_ref, s0_ref, s1_ref, s2_ref, z0_ref, z1_ref, z2_ref, i_ref, j_ref,
                 y_ref, s0_out, s1_out, s2_out, z0_out, z1_out, z2_out, *, spec: _Spec):
  """q_ref/k_ref [1, F]; v_ref, s0 [1, Dc]; s1 [F, Dc]; s2 [U, Dc]; z0 [1, 1]; z1 [F, 1]; z2 [U, 1]; the pair
  tables i_ref, j_ref [U, 1]."""
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

  def update(start, rows: int, carry):
    num, den = carry
    chunk = pl.ds(start, rows)
    i_col, j_col = i_ref[chunk, :], j_ref[chunk, :]
    q2 = _order2_column(q_row, i_col, j_col, spec.c2)
    k2 = _order2_column(k_row, i_col, j_col, spec.c2)
    s2 = s2_ref[chunk, :] + k2 * v
    z2 = z2_ref[chunk, :] + k2
    s2_out[chunk, :] = s2
    z2_out[chunk, :] = z2
    return (num + jnp.sum(q2 * s2, axis=0, keepdims=True), den + jnp.sum(q2 * z2, axis=0, keepdims=True))

  chunks, rest = row_pieces(s2_ref.shape[0], spec.block_rows)
  carry = lax.fori_loop(0, chunks, lambda i, c: update(i * spec.block_rows, spec.block_rows, c), (num, den))
  for start, rows in rest:  # U is rarely a multiple of block_rows: the tail in static power-of-two pieces
    carry = update(start, rows, carry)
  num, den = carry
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
  u = num_pairs(f)
  # Triton tiles are powers of two; Mosaic takes any size as a full-dim block.
  f_pad, d_pad = (f, d) if target.mosaic_tpu else (pl.next_power_of_2(f), _triton_value_dim(d))
  blocks = block_sizes or BlockSizes.for_shape(
      batch=batch, heads=heads, feature_dim=f, value_dim=d_pad,
      backend=target.backend if not target.interpret else "cpu")
  block_d = min(blocks.block_d, d_pad)
  if d_pad % block_d or blocks.block_rows < 1 or blocks.block_rows & (blocks.block_rows - 1):
    raise ValueError(f"block_sizes {blocks}: block_d must divide value_dim={d_pad} and block_rows must be a power "
                     f"of two")
  rows = min(blocks.block_rows, _floor_power_of_2(u))

  # Views of the state as 2-D tiles per (batch, head): all reshapes of contiguous axes, so free (no copy)
  # unless F or D needs padding (S2 and z2 are indexed by pair, so F padding never reaches them).
  s0, s1, s2, z0, z1, z2 = (x.astype(jnp.float32) for x in state)
  s0 = _padded(s0, 2, d_pad)[:, :, None, :]
  s1 = _padded(_padded(s1, 2, f_pad), 3, d_pad)
  s2 = _padded(s2, 3, d_pad)
  z0 = z0[:, :, None, None]
  z1 = _padded(z1, 2, f_pad)[:, :, :, None]
  z2 = z2[:, :, :, None]
  q = _padded(q_BHF, 2, f_pad)[:, :, None, :]
  k = _padded(k_BHF, 2, f_pad)[:, :, None, :]
  v = _padded(v_BHD, 2, d_pad)[:, :, None, :]
  i_U, j_U, _ = order2_pairs(f)
  i_col, j_col = jnp.asarray(i_U[:, None]), jnp.asarray(j_U[:, None])

  def tile(height: int, width: int, by_column_block: bool):
    index = (lambda b, h, j: (b, h, 0, j)) if by_column_block else (lambda b, h, j: (b, h, 0, 0))
    return pl.BlockSpec((None, None, height, width), index)

  vector_spec = tile(1, f_pad, False)
  state_specs = [tile(1, block_d, True), tile(f_pad, block_d, True), tile(u, block_d, True),
                 tile(1, 1, False), tile(f_pad, 1, False), tile(u, 1, False)]
  table_spec = pl.BlockSpec((u, 1), lambda b, h, j: (0, 0))
  state_tiles = (s0, s1, s2, z0, z1, z2)
  spec = _Spec(feature_dim=f, normalize=normalize, eps=float(eps), block_rows=rows)
  y, *new_tiles = target.pallas_call(
      functools.partial(_step_kernel, spec=spec), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
      grid=(batch, heads, d_pad // block_d),
      in_specs=[vector_spec, vector_spec, tile(1, block_d, True), *state_specs, table_spec, table_spec],
      out_specs=[tile(1, block_d, True), *state_specs],
      out_shape=[jax.ShapeDtypeStruct(v.shape, v_BHD.dtype),
                 *(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in state_tiles)],
      # S0/S1/S2 (inputs 3-5) are updated in place; each program reads and writes only its own column block.
      input_output_aliases={3: 1, 4: 2, 5: 3},
      name="based_decode_step")(q, k, v, *state_tiles, i_col, j_col)

  s0, s1, s2, z0, z1, z2 = new_tiles
  new_state = type(state)(
      s0_BHD=s0[:, :, 0, :d], s1_BHFD=s1[:, :, :f, :d], s2_BHUD=s2[..., :d],
      z0_BH=z0[:, :, 0, 0], z1_BHF=z1[:, :, :f, 0], z2_BHU=z2[:, :, :, 0])
  return y[:, :, 0, :d], new_state
