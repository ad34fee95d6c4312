"""Portable chunked BASED kernels: one `pl.pallas_call` source for CPU interpret mode, TPU and GPU (Triton).

Each program owns one (batch, head, value-column block) and walks the chunks of its sequence in order inside the
program (sequential by construction: the GPU runs programs in parallel, never chunks of one program). Per chunk of
C tokens:
  intra  y += mask(1 + s + s²/2) v,  s = q kᵀ/√F        (the exact quadratic form; C×C on chip)
  inter  y += phi(q)·S,  den += phi(q)·z                  (the prefix states before the chunk)
  update S += phi(k)ᵀ v,  z += Σ phi(k)                  (order 0/1/2 pieces, float32, never leave the chip)
The order-2 features vec(x⊗x) are built on chip in groups of Fg leading features (a broadcast product reshaped
to [C, Fg·F], 256 columns by default), so each order-2 product is one matmul with a deep contraction and the state
S2 is carried as F/Fg tiles [Fg·F, Dc]. Matmul operands are the inputs' dtype (bf16/f16 at tensor-core rate, the
float32 state rounded to it, as fla does), accumulation float32.
The kernels carry the full layout (F² order-2 rows, symmetric.BasedFullState); `based_chunked` takes and returns
the symmetric BasedState every api call uses, converted at the boundary in XLA (symmetric.on_full_layout).
With segment ids, the carried state belongs to one segment: it reaches only tokens of that segment, and at a chunk
end it is replaced by the sums of the chunk's last segment (plus the old state when that segment continues).

Letters: B batch, T length (padded to whole chunks), H heads, F feature dim (padded to a power of two >= 16;
padding features are zero and add nothing), Fg leading features per order-2 group, D value dim, Dc
value-column block, C chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.based import sequence_split
from pallas_kernels.based.reference import TaylorScaled
from pallas_kernels.based.symmetric import BasedFullState, on_full_layout
from pallas_kernels.common.layout import round_up
from pallas_kernels.common.matmul import exact_precision, mm, mm_nt, mm_tn
from pallas_kernels.common.target import Target


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_d: int = 64  # value columns per program
  order2_width: int = 256  # order-2 feature columns per matmul (Fg·F, Fg leading features per group)
  num_warps: int = 4  # Triton only
  num_stages: int = 1  # Triton only
  # Split the sequence into this many pieces run as separate programs (None: by target and shape, see
  # _sequence_pieces): each piece's state is summed by a states-only pass, then prefix-summed in XLA.
  sequence_pieces: int | None = None

  @classmethod
  def for_shape(cls, *, f_pad: int, d_pad: int, target: Target) -> "BlockSizes":
    """TPU tiles must span whole 128-lane multiples (or the full dim): one value block there. Triton: 64 value
    columns with 8 warps was the fastest of block_d in {32, 64} x warps in {4, 8} on the H100 (B8 T2048 H16 F16
    D64 bf16: forward 0.50 ms, forward+backward 1.72 ms; 32 columns with 4 warps 0.68 / 2.31 ms). Wider features
    get 16 columns: a program carries its [F², Dc] float32 state in registers (F = 32 with 64 columns spilled:
    14.8 ms where F = 16 takes 0.47 ms)."""
    if target.mosaic_tpu:
      return cls(block_d=d_pad)
    if not target.triton:
      return cls(block_d=min(64, d_pad))
    return cls(block_d=min(64 if f_pad <= 16 else 16, d_pad), num_warps=8)


@dataclasses.dataclass(frozen=True)
class _Spec(TaylorScaled):
  feature_dim: int  # the real F (sets the scales)
  normalize: bool
  eps: float
  chunk: int
  seq_len: int  # real tokens; the rest is padding
  has_segments: bool
  group: int  # Fg leading features per order-2 group (Fg·F feature columns per matmul)
  operand_dtype: object = jnp.float32  # matmul operands: the inputs' dtype (16-bit: tensor-core rate)
  precision: object = None  # matmul precision: IEEE float32 for float32 inputs, else the fast default

  @property
  def num_groups(self) -> int:  # groups with a real leading feature
    return -(-self.feature_dim // self.group)



class _State(NamedTuple):
  """The carried prefix state of one value block, float32. The order-2 part comes in groups (_order2_groups): s2[g]
  [Fg·F, Dc] and z2[g] [1, Fg·F], the rows of vec(x ⊗ x) whose leading feature is in group g."""
  seg: jax.Array  # [1, 1] the segment the state belongs to
  s0: jax.Array  # [1, Dc]
  s1: jax.Array  # [F, Dc]
  s2: tuple[jax.Array, ...]
  z0: jax.Array  # [1, 1]
  z1: jax.Array  # [1, F]
  z2: tuple[jax.Array, ...]


def _read_state(seg, s0_ref, s1_ref, s2_ref, z0_ref, z1_ref, z2_ref, spec: _Spec) -> _State:
  width = spec.group * s1_ref.shape[0]
  return _State(seg, s0_ref[...], s1_ref[...], tuple(s2_ref[pl.ds(g * width, width), :] for g in range(spec.num_groups)),
                z0_ref[...], z1_ref[...], tuple(z2_ref[:, pl.ds(g * width, width)] for g in range(spec.num_groups)))


def _write_state(state: _State, s0_ref, s1_ref, s2_ref, z0_ref, z1_ref, z2_ref):
  width = state.s2[0].shape[0]
  s0_ref[...], s1_ref[...], z0_ref[...], z1_ref[...] = state.s0, state.s1, state.z0, state.z1
  zero_s2, zero_z2 = jnp.zeros((width, s2_ref.shape[1]), jnp.float32), jnp.zeros((1, width), jnp.float32)
  for g in range(s2_ref.shape[0] // width):  # groups of padding features are zero; each row is written once
    s2, z2 = (state.s2[g], state.z2[g]) if g < len(state.s2) else (zero_s2, zero_z2)
    s2_ref[pl.ds(g * width, width), :] = s2
    z2_ref[:, pl.ds(g * width, width)] = z2


def _leading(x_ref, rows, group: int, spec: _Spec):
  """Columns group·Fg .. group·Fg + Fg - 1 of the chunk's rows of x, float32 [C, Fg] (a strided load)."""
  return x_ref[rows, pl.ds(group * spec.group, spec.group)].astype(jnp.float32)


def _order2_groups(x_ref, rows, x, spec: _Spec):
  """The order-2 features c2·vec(x ⊗ x) of float32 rows x [C, F] in groups of Fg leading features: group g is
  c2·x[:, g·Fg:(g+1)·Fg] ⊗ x flattened to [C, Fg·F], the columns g·Fg·F .. (g+1)·Fg·F of vec(x ⊗ x). Built by a broadcast
  and a reshape on chip (no expansion matrix, nothing in memory); groups of padding features are skipped."""
  c, f = x.shape
  return [(spec.c2 * _leading(x_ref, rows, g, spec)[:, :, None] * x[:, None, :]).reshape(c, spec.group * f)
          for g in range(spec.num_groups)]


def _order2_grad(x_ref, rows, x, dphi2, spec: _Spec):
  """d/dx of Σ_g <group g of c2·vec(x ⊗ x), dphi2[g]> for float32 rows x [C, F], cotangent groups [C, Fg·F]."""
  c, f = x.shape
  grad = jnp.zeros(x.shape, jnp.float32)
  for g, cotangent in enumerate(dphi2):
    cot = cotangent.reshape(c, spec.group, f)
    lead = _leading(x_ref, rows, g, spec)
    grad = grad + jnp.sum(lead[:, :, None] * cot, axis=1)  # through the trailing factor x_b
    by_lead = jnp.sum(x[:, None, :] * cot, axis=2)  # [C, Fg]: through the leading factor x_{g·Fg+a}
    if spec.group == f:
      grad = grad + by_lead
    else:  # place it at columns g·Fg .. g·Fg + Fg - 1
      a = lax.broadcasted_iota(jnp.int32, (1, spec.group, f), 1)
      col = lax.broadcasted_iota(jnp.int32, (1, spec.group, f), 2)
      grad = grad + jnp.sum(by_lead[:, :, None] * (col == g * spec.group + a).astype(jnp.float32), axis=1)
  return spec.c2 * grad


def _intra_scores(q, k, spec: _Spec, seg_col, seg_row):
  """Masked 1 + s + s²/2 within a chunk [C, C] (causal, same segment), and s."""
  s = mm_nt(spec, q, k) * (1.0 / math.sqrt(spec.feature_dim))
  c = spec.chunk
  visible = lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)
  if seg_col is not None:
    visible = visible & (seg_col == seg_row)
  return jnp.where(visible, 1.0 + s + 0.5 * s * s, 0.0), s


def _advance_state(state: _State, k_ref, rows, kf, v, seg_col, seg_col_ref, start, spec: _Spec) -> _State:
  """The carried state after a chunk of float32 keys kf [C, F] and values v [C, Dc] starting at `start`: its
  valid tokens of the chunk's last segment added, the old state kept only if that segment continues it."""
  c = spec.chunk
  weight = (start + lax.broadcasted_iota(jnp.int32, (c, 1), 0) < spec.seq_len).astype(jnp.float32)
  keep, seg = 1.0, state.seg
  if spec.has_segments:
    seg = seg_col_ref[pl.ds(start + c - 1, 1), :]
    weight = weight * (seg_col == seg).astype(jnp.float32)
    keep = (state.seg == seg).astype(jnp.float32)
  k1 = kf * spec.c1 * weight
  k2 = [p * weight for p in _order2_groups(k_ref, rows, kf, spec)]
  vf = v.astype(jnp.float32)
  colsum = lambda x: jnp.sum(x, axis=0, keepdims=True)
  return _State(seg, keep * state.s0 + colsum(vf * weight), keep * state.s1 + mm_tn(spec, k1, v),
                tuple(keep * s2 + mm_tn(spec, p, v) for s2, p in zip(state.s2, k2)),
                keep * state.z0 + colsum(weight), keep * state.z1 + colsum(k1),
                tuple(keep * z2 + colsum(p) for z2, p in zip(state.z2, k2)))


def _first_segment(seg_col_ref, row: int, spec: _Spec):
  return seg_col_ref[pl.ds(row, 1), :] if spec.has_segments else jnp.zeros((1, 1), jnp.int32)


def _fwd_kernel(q_ref, k_ref, v_ref, seg_col_ref, seg_row_ref, s0_ref, s1_ref, s2_ref, z0_ref, z1_ref, z2_ref,
                o_ref, den_ref, fs0_ref, fs1_ref, fs2_ref, fz0_ref, fz1_ref, fz2_ref, *, spec: _Spec):
  c = spec.chunk

  def body(i, state: _State):
    start = i * c
    rows = pl.ds(start, c)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
    seg_col = seg_row = None
    if spec.has_segments:
      seg_col, seg_row = seg_col_ref[rows, :], seg_row_ref[:, rows]
    a, _ = _intra_scores(q, k, spec, seg_col, seg_row)
    q1 = qf * spec.c1
    inter_num = state.s0 + mm(spec, q1, state.s1)
    inter_den = state.z0 + jnp.sum(q1 * state.z1, axis=1, keepdims=True)
    for p, s2, z2 in zip(_order2_groups(q_ref, rows, qf, spec), state.s2, state.z2):
      inter_num = inter_num + mm(spec, p, s2)
      inter_den = inter_den + jnp.sum(p * z2, axis=1, keepdims=True)
    if spec.has_segments:
      reaches = (seg_col == state.seg).astype(jnp.float32)  # [C, 1]: tokens of the carried state's segment
      inter_num, inter_den = inter_num * reaches, inter_den * reaches
    num = mm(spec, a, v) + inter_num
    if spec.normalize:
      den = jnp.sum(a, axis=1, keepdims=True) + inter_den
      o_ref[rows, :] = (num / (den + spec.eps)).astype(o_ref.dtype)
      den_ref[rows, :] = den
    else:
      o_ref[rows, :] = num.astype(o_ref.dtype)
    return _advance_state(state, k_ref, rows, kf, v, seg_col, seg_col_ref, start, spec)

  init = _read_state(_first_segment(seg_col_ref, 0, spec), s0_ref, s1_ref, s2_ref, z0_ref, z1_ref, z2_ref, spec)
  final = lax.fori_loop(0, q_ref.shape[0] // c, body, init)
  _write_state(final, fs0_ref, fs1_ref, fs2_ref, fz0_ref, fz1_ref, fz2_ref)


def _states_kernel(k_ref, v_ref, seg_col_ref, s0_ref, s1_ref, s2_ref, z0_ref, z1_ref, z2_ref,
                   fs0_ref, fs1_ref, fs2_ref, fz0_ref, fz1_ref, fz2_ref, *, spec: _Spec):
  """The final state alone (the update step of _fwd_kernel): a sequence piece's contribution to later pieces."""
  c = spec.chunk

  def body(i, state: _State):
    start = i * c
    rows = pl.ds(start, c)
    k, v = k_ref[rows, :], v_ref[rows, :]
    seg_col = seg_col_ref[rows, :] if spec.has_segments else None
    return _advance_state(state, k_ref, rows, k.astype(jnp.float32), v, seg_col, seg_col_ref, start, spec)

  init = _read_state(_first_segment(seg_col_ref, 0, spec), s0_ref, s1_ref, s2_ref, z0_ref, z1_ref, z2_ref, spec)
  final = lax.fori_loop(0, k_ref.shape[0] // c, body, init)
  _write_state(final, fs0_ref, fs1_ref, fs2_ref, fz0_ref, fz1_ref, fz2_ref)


def _chunk_common(q_ref, k_ref, v_ref, seg_col_ref, seg_row_ref, dn_ref, dd_ref, rows, spec: _Spec, first_block):
  """What both backward kernels recompute per chunk: inputs, masked scores, and dL/ds of the intra part."""
  q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
  seg_col = seg_row = None
  if spec.has_segments:
    seg_col, seg_row = seg_col_ref[rows, :], seg_row_ref[:, rows]
  a, s = _intra_scores(q, k, spec, seg_col, seg_row)
  dn = dn_ref[rows, :]
  dd = dd_ref[rows, :] * first_block  # the normaliser's cotangent counts once, in value block 0
  da = mm_nt(spec, dn, v) + dd
  ds = jnp.where(a != 0.0, da * (1.0 + s), 0.0) * (1.0 / math.sqrt(spec.feature_dim))
  return q, k, v, seg_col, a, dn, dd, ds


def _dq_kernel(q_ref, k_ref, v_ref, seg_col_ref, seg_row_ref, s0_ref, s1_ref, s2_ref, z0_ref, z1_ref, z2_ref,
               dn_ref, dd_ref, dq_ref, *, spec: _Spec):
  """Forward order: dq = intra (ds k) + inter (through phi(q)·S and phi(q)·z with the states recomputed)."""
  c = spec.chunk
  first_block = (pl.program_id(2) == 0).astype(jnp.float32)

  def body(i, state: _State):
    start = i * c
    rows = pl.ds(start, c)
    q, k, v, seg_col, _, dn, dd, ds = _chunk_common(q_ref, k_ref, v_ref, seg_col_ref, seg_row_ref, dn_ref,
                                                    dd_ref, rows, spec, first_block)
    reaches = (seg_col == state.seg).astype(jnp.float32) if spec.has_segments else 1.0
    dphi1 = (mm_nt(spec, dn, state.s1) + dd * state.z1) * reaches
    dphi2 = [(mm_nt(spec, dn, s2) + dd * z2) * reaches for s2, z2 in zip(state.s2, state.z2)]
    qf = q.astype(jnp.float32)
    dq_ref[rows, :] = mm(spec, ds, k) + spec.c1 * dphi1 + _order2_grad(q_ref, rows, qf, dphi2, spec)
    return _advance_state(state, k_ref, rows, k.astype(jnp.float32), v, seg_col, seg_col_ref, start, spec)

  init = _read_state(_first_segment(seg_col_ref, 0, spec), s0_ref, s1_ref, s2_ref, z0_ref, z1_ref, z2_ref, spec)
  lax.fori_loop(0, q_ref.shape[0] // c, body, init)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_col_ref, seg_row_ref, g0_ref, g1_ref, g2_ref, gz0_ref, gz1_ref, gz2_ref,
                dn_ref, dd_ref, dk_ref, dv_ref, di0_ref, di1_ref, di2_ref, diz0_ref, diz1_ref, diz2_ref, *,
                spec: _Spec):
  """Reverse order, carrying g = Σ_{later queries of one segment} phi(q) dnᵀ and phi(q) dd (a _State of
  cotangents, started from the final state's cotangent, which acts like one more query of the last segment);
  what is left at the start is the initial state's cotangent."""
  c = spec.chunk
  first_block = (pl.program_id(2) == 0).astype(jnp.float32)
  num_chunks = q_ref.shape[0] // c
  colsum = lambda x: jnp.sum(x, axis=0, keepdims=True)

  def body(step, g: _State):
    start = (num_chunks - 1 - step) * c
    rows = pl.ds(start, c)
    q, k, v, seg_col, a, dn, dd, ds = _chunk_common(q_ref, k_ref, v_ref, seg_col_ref, seg_row_ref, dn_ref,
                                                    dd_ref, rows, spec, first_block)
    qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
    reaches = (seg_col == g.seg).astype(jnp.float32) if spec.has_segments else 1.0
    k1 = kf * spec.c1
    dv_inter = g.s0 + mm(spec, k1, g.s1)
    dphi2 = []
    for p, g2, gz2 in zip(_order2_groups(k_ref, rows, kf, spec), g.s2, g.z2):
      dv_inter = dv_inter + mm(spec, p, g2)
      dphi2.append(mm_nt(spec, v, g2) + gz2 * first_block)
    dphi1 = mm_nt(spec, v, g.s1) + g.z1 * first_block
    dv_ref[rows, :] = (mm_tn(spec, a, dn) + reaches * dv_inter).astype(dv_ref.dtype)
    dk_ref[rows, :] = mm_tn(spec, ds, q) + reaches * (spec.c1 * dphi1 + _order2_grad(k_ref, rows, kf, dphi2, spec))
    keep, weight, seg = 1.0, 1.0, g.seg
    if spec.has_segments:
      seg = seg_col_ref[pl.ds(start, 1), :]
      weight = (seg_col == seg).astype(jnp.float32)
      keep = (g.seg == seg).astype(jnp.float32)
    dd_all = dd_ref[rows, :] * weight  # the z cotangents are the same in every value block
    q1 = qf * spec.c1 * weight
    q2 = [p * weight for p in _order2_groups(q_ref, rows, qf, spec)]
    return _State(seg, keep * g.s0 + colsum(dn * weight), keep * g.s1 + mm_tn(spec, q1, dn),
                  tuple(keep * g2 + mm_tn(spec, p, dn) for g2, p in zip(g.s2, q2)),
                  keep * g.z0 + colsum(dd_all), keep * g.z1 + colsum(q1 * dd_all),
                  tuple(keep * gz2 + colsum(p * dd_all) for gz2, p in zip(g.z2, q2)))

  init = _read_state(_first_segment(seg_col_ref, q_ref.shape[0] - 1, spec), g0_ref, g1_ref, g2_ref, gz0_ref,
                     gz1_ref, gz2_ref, spec)
  final = lax.fori_loop(0, num_chunks, body, init)
  _write_state(final, di0_ref, di1_ref, di2_ref, diz0_ref, diz1_ref, diz2_ref)


def _pack_state(state, f_pad: int):
  """BasedFullState -> kernel tiles: s0 [B,H,1,D], s1 [B,H,F,D], s2 [B,H,F²,D], z0 [B,H,1,1], z1 [B,H,1,F],
  z2 [B,H,1,F²], float32, features zero-padded to f_pad."""
  s0, s1, s2, z0, z1, z2 = (x.astype(jnp.float32) for x in state)
  b, h, f, d = s1.shape
  pad = f_pad - f
  s1 = jnp.pad(s1, ((0, 0), (0, 0), (0, pad), (0, 0)))
  s2 = jnp.pad(s2, ((0, 0), (0, 0), (0, pad), (0, pad), (0, 0))).reshape(b, h, f_pad * f_pad, d)
  z1 = jnp.pad(z1, ((0, 0), (0, 0), (0, pad)))[:, :, None, :]
  z2 = jnp.pad(z2, ((0, 0), (0, 0), (0, pad), (0, pad))).reshape(b, h, 1, f_pad * f_pad)
  return s0[:, :, None, :], s1, s2, z0[:, :, None, None], z1, z2


def _unpack_state(tiles, f: int, state_type):
  s0, s1, s2, z0, z1, z2 = tiles
  b, h, f_pad, d = s1.shape
  s2 = s2.reshape(b, h, f_pad, f_pad, d)[:, :, :f, :f]
  z2 = z2.reshape(b, h, f_pad, f_pad)[:, :, :f, :f]
  return state_type(s0[:, :, 0], s1[:, :, :f], s2, z0[:, :, 0, 0], z1[:, :, 0, :f], z2)


def _state_specs(f_pad: int, block_d: int):
  """BlockSpecs of the packed state tiles for grid (batch, head, value block)."""
  cols = lambda rows, width, by_block: pl.BlockSpec(
      (None, None, rows, width), (lambda b, h, j: (b, h, 0, j)) if by_block else (lambda b, h, j: (b, h, 0, 0)))
  return [cols(1, block_d, True), cols(f_pad, block_d, True), cols(f_pad * f_pad, block_d, True),
          cols(1, 1, False), cols(1, f_pad, False), cols(1, f_pad * f_pad, False)]


def _state_shapes(batch: int, heads: int, f_pad: int, value_dim: int):
  shapes = [(1, value_dim), (f_pad, value_dim), (f_pad * f_pad, value_dim), (1, 1), (1, f_pad), (1, f_pad * f_pad)]
  return [jax.ShapeDtypeStruct((batch, heads, *s), jnp.float32) for s in shapes]


def _dims(layout, qk, v):
  """(batch, heads, padded length, padded feature dim, value dim) of kernel-layout q or k and v."""
  heads = qk.shape[1] if layout.heads_major else qk.shape[2]
  return qk.shape[0], heads, layout.seq_len(qk), qk.shape[-1], v.shape[-1]


def _forward(spec: _Spec, blocks: BlockSizes, target: Target, q, k, v, seg_col, seg_row, state_tiles):
  layout = target.layout
  batch, heads, t_pad, f_pad, d = _dims(layout, q, v)
  block_d = min(blocks.block_d, d)
  qk_tile = layout.tile(t_pad, f_pad, None, lambda b, h, j: (b, h, 0))
  v_tile = layout.tile(t_pad, block_d, None, lambda b, h, j: (b, h, 0, j))
  seg_specs = [None, None]
  if spec.has_segments:
    seg_specs = [pl.BlockSpec((None, t_pad, 1), lambda b, h, j: (b, 0, 0)),
                 pl.BlockSpec((None, 1, t_pad), lambda b, h, j: (b, 0, 0))]
  den_spec = pl.BlockSpec((None, None, t_pad, 1), lambda b, h, j: (b, h, 0, 0))
  kernel = functools.partial(_fwd_kernel, spec=spec)
  out = target.pallas_call(
      kernel, num_warps=blocks.num_warps, num_stages=blocks.num_stages, grid=(batch, heads, d // block_d),
      in_specs=[qk_tile, qk_tile, v_tile, *seg_specs, *_state_specs(f_pad, block_d)],
      out_specs=[v_tile, den_spec, *_state_specs(f_pad, block_d)],
      out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((batch, heads, t_pad, 1), jnp.float32),
                 *_state_shapes(batch, heads, f_pad, d)],
      name="based_chunked_fwd")(q, k, v, seg_col, seg_row, *state_tiles)
  return out[0], out[1], tuple(out[2:])


def _states_forward(spec: _Spec, blocks: BlockSizes, target: Target, k, v, state_tiles):
  layout = target.layout
  batch, heads, t_pad, f_pad, d = _dims(layout, k, v)
  block_d = min(blocks.block_d, d)
  out = target.pallas_call(
      functools.partial(_states_kernel, spec=spec), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
      grid=(batch, heads, d // block_d),
      in_specs=[layout.tile(t_pad, f_pad, None, lambda b, h, j: (b, h, 0)), _value_tile(layout, t_pad, block_d),
                None, *_state_specs(f_pad, block_d)],
      out_specs=_state_specs(f_pad, block_d), out_shape=_state_shapes(batch, heads, f_pad, d),
      name="based_chunked_states")(k, v, None, *state_tiles)
  return tuple(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _piece_states(spec, blocks, target, q, k, v, state_tiles):
  """The final state after k, v (no segments); q only feeds the backward kernel, which takes it (times zero)."""
  return _states_forward(spec, blocks, target, k, v, state_tiles)


def _piece_states_fwd(spec, blocks, target, q, k, v, state_tiles):
  return _states_forward(spec, blocks, target, k, v, state_tiles), (q, k, v, state_tiles)


def _piece_states_bwd(spec, blocks, target, residuals, final_cotangents):
  q, k, v, state_tiles = residuals
  batch, heads, t_pad, _, _ = _dims(target.layout, k, v)
  dn = jnp.zeros(v.shape, jnp.float32)  # no outputs: only the final state's cotangent flows back
  dd = jnp.zeros((batch, heads, t_pad, 1), jnp.float32)
  _, dk, dv, d_state = _backward(spec, blocks, target, q, k, v, None, None, state_tiles, final_cotangents, dn, dd,
                                 need_dq=False)
  return jnp.zeros_like(q), dk, dv, d_state


_piece_states.defvjp(_piece_states_fwd, _piece_states_bwd)


# A GPU runs B·H·(D/Dc) programs side by side, each walking its sequence in order; with fewer than this many
# (long sequences at small batch) the sequence is split into pieces of at least MIN_PIECE_CHUNKS chunks.
# Measured on the H100 (F16 D64 bf16): 128 programs (B8 T2048) run at 28.7 ns/token and splitting them further
# only adds the states pass (2 pieces: 37.6); B1 T65536 split into 16 pieces runs at 33.7 ns/token.
MIN_PROGRAMS = 128
MIN_PIECE_CHUNKS = 16


def _sequence_pieces(*, programs: int, seq_len: int, chunk: int, has_segments: bool, target: Target) -> int:
  """How many pieces to split the sequence into: a power of two dividing it into whole chunks (so no piece has
  padding), only on GPU (a TPU core runs programs one after another: splitting only adds the states pass) and
  without segment ids (whose resets the prefix sum of piece states does not model)."""
  if not target.triton or has_segments or seq_len % chunk:
    return 1
  # Doubling while fewer than MIN_PROGRAMS run: the last doubling may reach just under twice that.
  return sequence_split.piece_count(programs=programs, steps=seq_len // chunk, max_programs=2 * MIN_PROGRAMS - 1,
                                    min_steps=MIN_PIECE_CHUNKS, whole_steps=True)


@dataclasses.dataclass(frozen=True)
class _Call:
  """The static setup of one call, shared by the forward and the backward: the kernel spec and blocks, where they
  run, the padded sizes and the sequence split ([B·pieces, T_pad/pieces], see sequence_split.py)."""
  spec: _Spec
  blocks: BlockSizes
  target: Target
  batch: int
  heads: int
  seq_len: int  # real tokens
  feature_dim: int
  value_dim: int
  f_pad: int
  d_pad: int
  t_pad: int  # seq_len padded to whole chunks
  pieces: int

  def arrange(self, x_BTH, width: int, fill: float = 0):
    """[B, T, H, ·] -> the kernels' [B·pieces, T_pad/pieces, H, width] (heads-major on TPU), padded with `fill`."""
    x = jnp.pad(x_BTH, ((0, 0), (0, self.t_pad - self.seq_len), (0, 0), (0, width - x_BTH.shape[-1])),
                constant_values=fill)
    return self.target.layout.arrange(sequence_split.split(x, self.pieces))

  def restore(self, x, width: int):
    """The kernels' layout -> [B, T, H, width]."""
    x = self.target.layout.restore(x).reshape(self.batch, self.t_pad, self.heads, -1)
    return x[:, :self.seq_len, :, :width]

  def segments(self, segment_ids_BT):
    """(seg_col [B, T_pad, 1], seg_row [B, 1, T_pad]); padding continues the last segment, so the final state
    stays that of the last real token's segment."""
    seg = jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, self.t_pad - self.seq_len)), mode="edge")
    return seg[:, :, None], seg[:, None, :]

  def state_tiles(self, state: BasedFullState):
    """A BasedFullState [B, ...] as the kernels' float32 tiles, D padded to d_pad."""
    pad = self.d_pad - self.value_dim
    state = state._replace(s0_BHD=jnp.pad(state.s0_BHD, ((0, 0), (0, 0), (0, pad))),
                           s1_BHFD=jnp.pad(state.s1_BHFD, ((0, 0),) * 3 + ((0, pad),)),
                           s2_BHFFD=jnp.pad(state.s2_BHFFD, ((0, 0),) * 4 + ((0, pad),)))
    return _pack_state(state, self.f_pad)

  def state(self, tiles) -> BasedFullState:
    """The kernels' tiles [B, ...] as a BasedFullState, unpadded."""
    state = _unpack_state(tiles, self.feature_dim, BasedFullState)
    d = self.value_dim
    return state._replace(s0_BHD=state.s0_BHD[..., :d], s1_BHFD=state.s1_BHFD[..., :d],
                          s2_BHFFD=state.s2_BHFFD[..., :d])

  def piece_starts(self, q, k, v, state_tiles):
    """Each piece's starting state from the call's (state_tiles [B, ...]): itself without a split."""
    if self.pieces == 1:
      return state_tiles
    own_states = lambda zeros: _piece_states(self.spec, self.blocks, self.target, q, k, v, zeros)
    return sequence_split.piece_starts(state_tiles, self.pieces, own_states)


def _setup(q_BTHF, v_BTHD, *, normalize: bool, eps: float, chunk: int, has_segments: bool,
           block_sizes: BlockSizes | None, sequence_pieces: int | None, interpret: bool | None) -> _Call:
  target = Target.current(interpret)
  batch, seq_len, heads, f = q_BTHF.shape
  d = v_BTHD.shape[-1]
  f_pad, d_pad = max(16, pl.next_power_of_2(f)), target.padded_dim(d)
  blocks = block_sizes or BlockSizes.for_shape(f_pad=f_pad, d_pad=d_pad, target=target)
  value_blocks = d_pad // min(blocks.block_d, d_pad)
  pieces = sequence_pieces or blocks.sequence_pieces or _sequence_pieces(
      programs=batch * heads * value_blocks, seq_len=seq_len, chunk=chunk, has_segments=has_segments,
      target=target)
  if pieces > 1 and (has_segments or seq_len % (pieces * chunk)):
    raise ValueError(f"sequence_pieces={pieces} needs no segment_ids and a length that is a multiple of pieces x "
                     f"chunk = {pieces * chunk}, got length {seq_len}")
  spec = _Spec(feature_dim=f, normalize=normalize, eps=float(eps), chunk=chunk, seq_len=seq_len // pieces,
               has_segments=has_segments, group=max(1, min(f_pad, blocks.order2_width // f_pad)),
               operand_dtype=q_BTHF.dtype, precision=exact_precision(q_BTHF.dtype))
  return _Call(spec=spec, blocks=blocks, target=target, batch=batch, heads=heads, seq_len=seq_len, feature_dim=f,
               value_dim=d, f_pad=f_pad, d_pad=d_pad, t_pad=round_up(seq_len, chunk), pieces=pieces)


def based_chunked_full(q_BTHF, k_BTHF, v_BTHD, *, normalize: bool = True, eps: float = 1e-6, chunk: int = 64,
                       initial_state: BasedFullState | None = None, return_final_state: bool = False,
                       segment_ids=None, block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """The chunked form with the reference's semantics (pallas_kernels/based/reference.py) on the full-layout state
  the kernels carry; api.py validates."""
  call = _setup(q_BTHF, v_BTHD, normalize=normalize, eps=eps, chunk=chunk, has_segments=segment_ids is not None,
                block_sizes=block_sizes, sequence_pieces=None, interpret=interpret)
  q, k, v = call.arrange(q_BTHF, call.f_pad), call.arrange(k_BTHF, call.f_pad), call.arrange(v_BTHD, call.d_pad)
  seg_col = seg_row = None
  if segment_ids is not None:
    seg_col, seg_row = call.segments(segment_ids)
  state = initial_state if initial_state is not None else BasedFullState.zeros(
      call.batch, call.heads, call.feature_dim, call.value_dim)
  starts = call.piece_starts(q, k, v, call.state_tiles(state))
  y, final = _based(call.spec, call.blocks, call.target, q, k, v, seg_col, seg_row, starts)
  y = call.restore(y, call.value_dim)
  final = tuple(sequence_split.last_piece(x, call.pieces) for x in final)
  return (y, call.state(final)) if return_final_state else y


# The public kernel takes and returns the symmetric BasedState, converted at the boundary in XLA; the kernels above
# still carry the full F² order-2 block on chip (computing natively on the U = F(F+1)/2 rows is the remaining step).
based_chunked = on_full_layout(based_chunked_full)


def _value_tile(layout, t_pad: int, width: int):
  return layout.tile(t_pad, width, None, lambda b, h, j: (b, h, 0, j))


def _backward(spec: _Spec, blocks: BlockSizes, target: Target, q, k, v, seg_col, seg_row, state_tiles,
              final_cotangents, dn, dd, need_dq: bool = True):
  layout = target.layout
  batch, heads, t_pad, f_pad, d = _dims(layout, q, v)
  block_d = min(blocks.block_d, d)
  num_blocks = d // block_d
  qk_tile = layout.tile(t_pad, f_pad, None, lambda b, h, j: (b, h, 0))
  seg_specs = [None, None]
  if spec.has_segments:
    seg_specs = [pl.BlockSpec((None, t_pad, 1), lambda b, h, j: (b, 0, 0)),
                 pl.BlockSpec((None, 1, t_pad), lambda b, h, j: (b, 0, 0))]
  dd_spec = pl.BlockSpec((None, None, t_pad, 1), lambda b, h, j: (b, h, 0, 0))
  in_specs = [qk_tile, qk_tile, _value_tile(layout, t_pad, block_d), *seg_specs, *_state_specs(f_pad, block_d),
              _value_tile(layout, t_pad, block_d), dd_spec]
  # Each value block adds its share of dq/dk in its own column block; XLA sums them.
  partial_shape = (batch, heads, t_pad, num_blocks * f_pad) if layout.heads_major else (
      batch, t_pad, heads, num_blocks * f_pad)
  partial = jax.ShapeDtypeStruct(partial_shape, jnp.float32)
  call = functools.partial(target.pallas_call, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
                           grid=(batch, heads, num_blocks), in_specs=in_specs)
  dq = None
  if need_dq:
    dq = call(functools.partial(_dq_kernel, spec=spec), out_specs=_value_tile(layout, t_pad, f_pad),
              out_shape=partial, name="based_chunked_dq")(q, k, v, seg_col, seg_row, *state_tiles, dn, dd)
  dk, dv, *d_state = call(
      functools.partial(_dkv_kernel, spec=spec),
      out_specs=[_value_tile(layout, t_pad, f_pad), _value_tile(layout, t_pad, block_d),
                 *_state_specs(f_pad, block_d)],
      out_shape=[partial, jax.ShapeDtypeStruct(v.shape, v.dtype), *_state_shapes(batch, heads, f_pad, d)],
      name="based_chunked_dkv")(q, k, v, seg_col, seg_row, *final_cotangents, dn, dd)
  fold = lambda x: x.reshape(*x.shape[:-1], num_blocks, f_pad).sum(-2).astype(q.dtype)
  return (fold(dq) if need_dq else None), fold(dk), dv, tuple(d_state)


class _Residuals(NamedTuple):
  """What the backward reads, in the kernels' layout (padded, [B·pieces, ...]): the forward's inputs, the state
  each piece starts from, its output and normaliser."""
  q: jax.Array
  k: jax.Array
  v: jax.Array
  seg_col: jax.Array | None  # [B, T_pad, 1] segment ids (None without)
  seg_row: jax.Array | None  # [B, 1, T_pad]
  state_tiles: tuple  # each piece's starting state (_pack_state's tiles)
  y: jax.Array
  den: jax.Array  # [B·pieces, H, T_pad/pieces, 1] float32: y's normaliser (1 on padded rows where given from outside)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _based(spec, blocks, target, q, k, v, seg_col, seg_row, state_tiles):
  y, _, final = _forward(spec, blocks, target, q, k, v, seg_col, seg_row, state_tiles)
  return y, final


def _based_fwd(spec, blocks, target, q, k, v, seg_col, seg_row, state_tiles):
  y, den, final = _forward(spec, blocks, target, q, k, v, seg_col, seg_row, state_tiles)
  return (y, final), _Residuals(q, k, v, seg_col, seg_row, state_tiles, y, den)


def _based_bwd(spec, blocks, target, res: _Residuals, cotangents):
  dy, final_cotangents = cotangents
  layout = target.layout
  dy = dy.astype(jnp.float32)
  if spec.normalize:
    # y = n / (den + eps): dn = dy / (den + eps), d(den) = -Σ_d dy·y / (den + eps).
    inv = 1.0 / (res.den + spec.eps)  # [B, H, T, 1]
    inv_y = inv if layout.heads_major else jnp.swapaxes(inv, 1, 2)
    dn = dy * inv_y
    dd = -jnp.sum(dy * res.y.astype(jnp.float32), axis=-1, keepdims=True) * inv_y
    dd = dd if layout.heads_major else jnp.swapaxes(dd, 1, 2)
  else:
    dn, dd = dy, jnp.zeros_like(res.den)
  dq, dk, dv, d_state = _backward(spec, blocks, target, res.q, res.k, res.v, res.seg_col, res.seg_row,
                                  res.state_tiles, final_cotangents, dn, dd)
  return dq, dk, dv, None, None, d_state


_based.defvjp(_based_fwd, _based_bwd)


def based_chunked_backward(q_BTHF, k_BTHF, v_BTHD, y_BTHD, den_BTH, dy_BTHD, d_final: BasedFullState, *,
                           initial_state: BasedFullState, normalize: bool, eps: float, chunk: int,
                           sequence_pieces: int | None = None, block_sizes: BlockSizes | None = None):
  """(dq, dk, dv, d initial_state) of based_chunked without segment ids, for a forward run elsewhere (the Hopper
  kernel): its output y and normaliser den [B, T, H] stand in for the forward's residuals; the backward kernels
  and the sequence pieces (chosen as based_chunked chooses them, unless given) are this module's. States and their
  cotangents are in the full layout (BasedFullState), as the Hopper forward carries them."""
  call = _setup(q_BTHF, v_BTHD, normalize=normalize, eps=eps, chunk=chunk, has_segments=False,
                block_sizes=block_sizes, sequence_pieces=sequence_pieces, interpret=None)
  q, k, v = call.arrange(q_BTHF, call.f_pad), call.arrange(k_BTHF, call.f_pad), call.arrange(v_BTHD, call.d_pad)
  starts, starts_vjp = jax.vjp(call.piece_starts, q, k, v, call.state_tiles(initial_state))
  y, dy = call.arrange(y_BTHD, call.d_pad), call.arrange(dy_BTHD.astype(jnp.float32), call.d_pad)
  # Padded rows get den 1, so that their zero cotangents stay zero (not 0·inf); den's tiles are [B·pieces, H,
  # T_pad/pieces, 1].
  den = call.arrange(den_BTH[..., None], 1, fill=1.0)
  den = den if call.target.layout.heads_major else jnp.swapaxes(den, 1, 2)
  # The final state is the last piece's: the other pieces' final states get no cotangent.
  final = call.state_tiles(BasedFullState(*(x.astype(jnp.float32) for x in d_final)))
  final = tuple(jnp.zeros((call.batch, call.pieces, *x.shape[1:]), x.dtype).at[:, -1].set(x).reshape(
      call.batch * call.pieces, *x.shape[1:]) for x in final)
  residuals = _Residuals(q=q, k=k, v=v, seg_col=None, seg_row=None, state_tiles=starts, y=y, den=den)
  dq, dk, dv, _, _, d_starts = _based_bwd(call.spec, call.blocks, call.target, residuals, (dy, final))
  _, dk_starts, dv_starts, d_state = starts_vjp(d_starts)
  dk = (dk.astype(jnp.float32) + dk_starts.astype(jnp.float32)).astype(dk.dtype)
  dv = (dv.astype(jnp.float32) + dv_starts.astype(jnp.float32)).astype(dv.dtype)
  d_state = call.state(d_state)
  return call.restore(dq, call.feature_dim), call.restore(dk, call.feature_dim), call.restore(dv, call.value_dim), d_state
