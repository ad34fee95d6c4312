"""Portable parallel BASED kernels: the quadratic form tiled like FlashAttention, for short sequences.

y_t = Σ_{s≤t} a_ts v_s / (Σ_{s≤t} a_ts + eps),  a_ts = 1 + s + s²/2,  s = q_t·k_s / √F  (causal, same segment)

Each program owns a block of queries of one head and loops over the key blocks up to its diagonal, accumulating
a·v and Σa in float32 on chip: no T×T matrix and no feature expansion ever reaches memory. Unlike softmax there
is no running maximum: the scores are polynomials, so the sums are plain. The backward recomputes a:
  da = dn·vᵀ + dd,  ds = da ⊙ (1 + s) / √F,  dq = ds k,  dk = dsᵀ q,  dv = aᵀ dn,
with dn = dy / (den + eps) and dd = -Σ_d dy·y / (den + eps) (normalised) from XLA. Work grows as T², so api.py
uses it only for short sequences; it covers no initial or final state (the chunked kernel does).

Letters: B batch, T length (padded to whole blocks), H heads, F feature dim, D value dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.matmul import dot, dot_nt, dot_tn, exact_precision
from pallas_kernels.common.target import Target


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4  # Triton only
  num_stages: int = 2  # Triton only


@dataclasses.dataclass(frozen=True)
class _Spec:
  feature_dim: int
  normalize: bool
  eps: float
  seq_len: int
  has_segments: bool
  precision: object = None


def _scores(q, k, q_start, k_start, q_seg, k_seg, spec: _Spec):
  """(a, 1 + s) for a [rows, cols] tile, zero where masked (future keys, padding, other segments)."""
  s = dot_nt(q, k, spec.precision) * (1.0 / math.sqrt(spec.feature_dim))
  rows = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
  cols = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
  visible = (cols <= rows) & (cols < spec.seq_len)
  if q_seg is not None:
    visible = visible & (q_seg == k_seg)
  return jnp.where(visible, 1.0 + s + 0.5 * s * s, 0.0), jnp.where(visible, 1.0 + s, 0.0)


def _segments(q_seg_ref, k_seg_ref, q_start, q_rows, k_start, k_cols):
  if q_seg_ref is None:
    return None, None
  return q_seg_ref[pl.ds(q_start, q_rows), :], k_seg_ref[:, pl.ds(k_start, k_cols)]


def _fwd_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, o_ref, den_ref, *, spec: _Spec, block_k: int):
  block_q = o_ref.shape[0]
  q_start = pl.program_id(2) * block_q
  q = q_ref[pl.ds(q_start, block_q), :]

  def body(j, carry):
    acc, den = carry
    k_start = j * block_k
    k, v = k_ref[pl.ds(k_start, block_k), :], v_ref[pl.ds(k_start, block_k), :]
    a, _ = _scores(q, k, q_start, k_start, *_segments(q_seg_ref, k_seg_ref, q_start, block_q, k_start, block_k),
                   spec)
    return acc + dot(a.astype(v.dtype), v, spec.precision), den + jnp.sum(a, axis=1, keepdims=True)

  init = (jnp.zeros(o_ref.shape, jnp.float32), jnp.zeros((block_q, 1), jnp.float32))
  acc, den = lax.fori_loop(0, lax.div(q_start + block_q + block_k - 1, block_k), body, init)
  o_ref[...] = (acc / (den + spec.eps) if spec.normalize else acc).astype(o_ref.dtype)
  den_ref[...] = den


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, dn_ref, dd_ref, dq_ref, *, spec: _Spec, block_k: int):
  block_q = dq_ref.shape[0]
  q_start = pl.program_id(2) * block_q
  rows = pl.ds(q_start, block_q)
  q, dn, dd = q_ref[rows, :], dn_ref[rows, :], dd_ref[rows, :]

  def body(j, dq):
    k_start = j * block_k
    k, v = k_ref[pl.ds(k_start, block_k), :], v_ref[pl.ds(k_start, block_k), :]
    _, slope = _scores(q, k, q_start, k_start, *_segments(q_seg_ref, k_seg_ref, q_start, block_q, k_start,
                                                          block_k), spec)
    ds = (dot_nt(dn, v, spec.precision) + dd) * slope * (1.0 / math.sqrt(spec.feature_dim))
    return dq + dot(ds.astype(k.dtype), k, spec.precision)

  dq = lax.fori_loop(0, lax.div(q_start + block_q + block_k - 1, block_k), body,
                     jnp.zeros(dq_ref.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, dn_ref, dd_ref, dk_ref, dv_ref, *, spec: _Spec,
                block_q: int):
  block_k = dk_ref.shape[0]
  k_start = pl.program_id(2) * block_k
  cols = pl.ds(k_start, block_k)
  k, v = k_ref[cols, :], v_ref[cols, :]

  def body(i, carry):
    dk, dv = carry
    q_start = i * block_q
    rows = pl.ds(q_start, block_q)
    q, dn, dd = q_ref[rows, :], dn_ref[rows, :], dd_ref[rows, :]
    a, slope = _scores(q, k, q_start, k_start, *_segments(q_seg_ref, k_seg_ref, q_start, block_q, k_start,
                                                          block_k), spec)
    ds = (dot_nt(dn, v, spec.precision) + dd) * slope * (1.0 / math.sqrt(spec.feature_dim))
    return (dk + dot_tn(ds.astype(q.dtype), q, spec.precision),
            dv + dot_tn(a.astype(dn.dtype), dn, spec.precision))

  num_q_blocks = q_ref.shape[0] // block_q
  zeros = lambda ref: jnp.zeros(ref.shape, jnp.float32)
  dk, dv = lax.fori_loop(lax.div(k_start, block_q), num_q_blocks, body, (zeros(dk_ref), zeros(dv_ref)))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Plan:
  spec: _Spec
  blocks: BlockSizes
  target: Target

  def call(self, kernel, **kwargs):
    return self.target.pallas_call(kernel, num_warps=self.blocks.num_warps, num_stages=self.blocks.num_stages,
                                   **kwargs)

  def whole(self, t_pad: int, width: int) -> pl.BlockSpec:
    """The whole sequence of one head, for grid (batch, head, block)."""
    return self.target.layout.tile(t_pad, width, None, lambda b, h, i: (b, h, 0))


def _segment_specs(plan: _Plan, t_pad: int):
  if not plan.spec.has_segments:
    return [None, None]
  return [pl.BlockSpec((None, t_pad, 1), lambda b, h, i: (b, 0, 0)),
          pl.BlockSpec((None, 1, t_pad), lambda b, h, i: (b, 0, 0))]


def _forward(plan: _Plan, q, k, v, q_seg, k_seg):
  layout, bq = plan.target.layout, plan.blocks.block_q
  batch, heads = q.shape[0], (q.shape[1] if layout.heads_major else q.shape[2])
  t_pad, f, d = layout.seq_len(q), q.shape[-1], v.shape[-1]
  o_tile = layout.tile(bq, d, None, lambda b, h, i: (b, h, i))
  return plan.call(
      functools.partial(_fwd_kernel, spec=plan.spec, block_k=plan.blocks.block_k), grid=(batch, heads, t_pad // bq),
      in_specs=[plan.whole(t_pad, f), plan.whole(t_pad, f), plan.whole(t_pad, d), *_segment_specs(plan, t_pad)],
      out_specs=[o_tile, pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((batch, heads, t_pad, 1), jnp.float32)],
      name="based_parallel_fwd")(q, k, v, q_seg, k_seg)


def _backward(plan: _Plan, q, k, v, q_seg, k_seg, dn, dd):
  layout, bq, bk = plan.target.layout, plan.blocks.block_q, plan.blocks.block_k
  batch, heads = q.shape[0], (q.shape[1] if layout.heads_major else q.shape[2])
  t_pad, f, d = layout.seq_len(q), q.shape[-1], v.shape[-1]
  dd_spec = pl.BlockSpec((None, None, t_pad, 1), lambda b, h, i: (b, h, 0, 0))
  in_specs = [plan.whole(t_pad, f), plan.whole(t_pad, f), plan.whole(t_pad, d), *_segment_specs(plan, t_pad),
              plan.whole(t_pad, d), dd_spec]
  dq = plan.call(
      functools.partial(_dq_kernel, spec=plan.spec, block_k=bk), grid=(batch, heads, t_pad // bq),
      in_specs=in_specs, out_specs=layout.tile(bq, f, None, lambda b, h, i: (b, h, i)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), name="based_parallel_dq")(q, k, v, q_seg, k_seg, dn, dd)
  dk, dv = plan.call(
      functools.partial(_dkv_kernel, spec=plan.spec, block_q=bq), grid=(batch, heads, t_pad // bk),
      in_specs=in_specs,
      out_specs=[layout.tile(bk, f, None, lambda b, h, i: (b, h, i)), layout.tile(bk, d, None, lambda b, h, i: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name="based_parallel_dkv")(q, k, v, q_seg, k_seg, dn, dd)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _parallel(plan: _Plan, q, k, v, q_seg, k_seg):
  return _forward(plan, q, k, v, q_seg, k_seg)[0]


def _parallel_fwd(plan, q, k, v, q_seg, k_seg):
  y, den = _forward(plan, q, k, v, q_seg, k_seg)
  return y, (q, k, v, q_seg, k_seg, y, den)


def _parallel_bwd(plan, residuals, dy):
  q, k, v, q_seg, k_seg, y, den = residuals
  heads_major = plan.target.layout.heads_major
  dy = dy.astype(jnp.float32)
  if plan.spec.normalize:
    inv = 1.0 / (den + plan.spec.eps)  # [B, H, T, 1]
    inv_y = inv if heads_major else jnp.swapaxes(inv, 1, 2)
    dn = dy * inv_y
    dd = -jnp.sum(dy * y.astype(jnp.float32), axis=-1, keepdims=True) * inv_y
    dd = dd if heads_major else jnp.swapaxes(dd, 1, 2)
  else:
    dn, dd = dy, jnp.zeros_like(den)
  dq, dk, dv = _backward(plan, q, k, v, q_seg, k_seg, dn.astype(v.dtype), dd)
  return dq, dk, dv, None, None


_parallel.defvjp(_parallel_fwd, _parallel_bwd)


def based_parallel(q_BTHF, k_BTHF, v_BTHD, *, normalize: bool = True, eps: float = 1e-6, segment_ids=None,
                   initial_state=None, return_final_state: bool = False, chunk: int | None = None,
                   block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """The quadratic form with the reference's semantics, without state in or out (api.py routes those to the
  chunked kernel); `chunk` is accepted for a uniform signature and unused."""
  del chunk
  if initial_state is not None or return_final_state:
    raise ValueError("the parallel BASED kernel takes no initial_state and returns no final state")
  target = Target.current(interpret)
  layout = target.layout
  batch, seq_len, heads, f = q_BTHF.shape
  d = v_BTHD.shape[-1]
  # Interpret mode copies whole arrays per grid step: on CPU, one block for short sequences.
  block = 64 if not target.interpret else min(64, max(16, pl.next_power_of_2(seq_len)))
  blocks = block_sizes or BlockSizes(block, block)
  multiple = max(blocks.block_q, blocks.block_k)
  t_pad = -(-seq_len // multiple) * multiple
  f_pad, d_pad = max(16, pl.next_power_of_2(f)), target.padded_dim(d)

  def prepare(x, width):
    return layout.arrange(jnp.pad(x, ((0, 0), (0, t_pad - seq_len), (0, 0), (0, width - x.shape[-1]))))

  q_seg = k_seg = None
  if segment_ids is not None:
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - seq_len)), mode="edge")
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
  spec = _Spec(feature_dim=f, normalize=normalize, eps=float(eps), seq_len=seq_len,
               has_segments=segment_ids is not None, precision=exact_precision(q_BTHF.dtype))
  y = _parallel(_Plan(spec, blocks, target), prepare(q_BTHF, f_pad), prepare(k_BTHF, f_pad),
                prepare(v_BTHD, d_pad), q_seg, k_seg)
  return layout.restore(y)[:, :seq_len, :, :d]
