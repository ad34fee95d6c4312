"""Portable FlashAttention (Dao et al. 2022; FA-2 loop order): one `pl.pallas_call` source for CPU interpret
mode, TPU (Mosaic) and GPU (Triton).

Forward: each program owns a block of queries of one head and loops over the key blocks it can see (blocks that
the causal/window masks hide entirely are skipped by the loop bounds), keeping the running max m, the running
sum l and the unnormalised output in float32 (online softmax); it writes O and lse = m + log l.
Backward (recomputation, no T×S matrix in memory): dQ programs loop over key blocks; dK/dV programs own a key
block of one kv head and loop over the query heads of its GQA group and the query blocks that see it, so repeated
K/V are never materialised. delta = rowsum(dO ⊙ O) comes from XLA.
Packed documents (segment ids): each pass also reads, per owned block, the [lo, hi) blocks that hold its
documents (documents.py, computed in the wrapper) and loops over their intersection with the causal/window range,
so tiles of other documents are never loaded or computed.

Letters: B batch, T query length, S key length, H query heads, K kv heads, G = H / K, D head dim.
The kernels see 2-D [rows, D] refs cut by pallas_kernels/common/layout.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.attention import documents
from pallas_kernels.attention.masking import LOG2E, MaskSpec
from pallas_kernels.common.layout import Layout, round_up
from pallas_kernels.common.matmul import dot, dot_nt, dot_tn, exact_precision
from pallas_kernels.common.target import Target


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q: int = 64
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int = 4  # Triton only
  num_stages: int = 2  # Triton only

  @classmethod
  def for_shape(cls, *, q_len: int, kv_len: int, head_dim: int, itemsize: int, backend: str) -> "BlockSizes":
    """Defaults per backend: TPU wants 128 rows; Triton wants powers of two and tiles that fit the 227 KiB of
    shared memory, so the row size in bytes (head dim x itemsize) sets the tile: float32 inputs take the tiles of
    a bf16 head dim twice as large (measured on the H100: float32 D64 with 128-row dK/dV tiles asks 258 KiB)."""
    if backend == "tpu":
      return cls(128, 128, 128, 128, 128, 128)
    if backend == "gpu":
      row_bytes = pl.next_power_of_2(head_dim) * itemsize
      fwd_q = 128 if q_len >= 128 else 64
      if row_bytes <= 128:  # bf16 D64
        return cls(block_q=fwd_q, block_k=128, block_q_dq=64, block_k_dq=128, block_q_dkv=128, block_k_dkv=128,
                   num_warps=4, num_stages=3)
      if row_bytes <= 512:  # bf16 D128/D256, float32 D64/D128
        return cls(block_q=fwd_q, block_k=64, block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64,
                   num_warps=8, num_stages=2)
      return cls(32, 32, 32, 32, 32, 32, num_warps=4, num_stages=2)  # float32 D256
    # Interpret mode copies whole arrays per grid step: few large blocks are fastest on CPU.
    block = min(128, max(16, pl.next_power_of_2(max(q_len, kv_len))))
    return cls(block, block, block, block, block, block)


def _scores(q, k, q_pos, k_pos, q_seg, k_seg, mask: MaskSpec):
  """Masked logits in base 2 (scale·log2 e folded in) and, with a soft-cap, tanh(logits/cap) for the backward."""
  s = dot_nt(q, k, exact_precision(q.dtype)) * mask.scale
  capped = None
  if mask.softcap is not None:
    capped = jnp.tanh(s / mask.softcap)
    s = mask.softcap * capped
  visible = mask.visible(q_pos, k_pos)
  if q_seg is not None:
    visible = visible & (q_seg == k_seg)
  return jnp.where(visible, s * LOG2E, -jnp.inf), capped


def _q_segments(seg_ref, start, size):
  """A column [size, 1] of query segment ids (from a [T, 1] tile)."""
  return None if seg_ref is None else seg_ref[pl.ds(start, size), :]


def _k_segments(seg_ref, start, size):
  """A row [1, size] of key segment ids (from a [1, S] tile)."""
  return None if seg_ref is None else seg_ref[:, pl.ds(start, size)]


def _q_positions(mask: MaskSpec, q_start, rows: int):
  return mask.q_offset + q_start + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)


def _k_positions(k_start, cols: int):
  return k_start + lax.broadcasted_iota(jnp.int32, (1, cols), 1)


def _within_documents(lo, hi, range_ref):
  """[lo, hi) narrowed to the blocks that hold this block's documents (a [1, 2] tile of documents.py's ranges)."""
  if range_ref is None:
    return lo, hi
  lo = jnp.maximum(lo, range_ref[0, 0])
  return lo, jnp.maximum(lo, jnp.minimum(hi, range_ref[0, 1]))


def _fwd_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, range_ref, o_ref, lse_ref, *, mask: MaskSpec,
                block_k: int):
  block_q = q_ref.shape[0]
  q_start = pl.program_id(2) * block_q
  q = q_ref[...]
  q_pos = _q_positions(mask, q_start, block_q)
  q_seg = _q_segments(q_seg_ref, 0, block_q)
  lo, hi = _within_documents(*mask.kv_block_range(q_start, block_q, block_k), range_ref)

  def body(j, carry):
    m, l, acc = carry  # running max and sum are [block_q, 1] columns
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    s, _ = _scores(q, k, q_pos, _k_positions(k_start, block_k), q_seg,
                   _k_segments(k_seg_ref, k_start, block_k), mask)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet stay at zero
    p = jnp.exp2(s - m_safe)
    alpha = jnp.exp2(m - m_safe)
    pv = dot(p.astype(v.dtype), v, exact_precision(v.dtype))
    return m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), alpha * acc + pv

  d = q_ref.shape[-1]
  init = (jnp.full((block_q, 1), -jnp.inf, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros((block_q, d), jnp.float32))
  m, l, acc = lax.fori_loop(lo, hi, body, init)
  empty = l == 0.0  # fully masked rows: output 0, lse -inf
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) / LOG2E)


def _probabilities(s, lse):
  """exp(logits - lse) from base-2 logits; rows with lse = -inf have only masked (-inf) logits, so give 0."""
  return jnp.exp2(s - jnp.where(lse == -jnp.inf, 0.0, lse * LOG2E))


def _dscores(p, dp, delta, capped, mask: MaskSpec):
  """dL/d(raw q·k) from dL/dP, through softmax, the soft-cap and the scale."""
  ds = p * (dp - delta)
  if capped is not None:
    ds = ds * (1.0 - capped * capped)
  return ds * mask.scale


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, range_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               mask: MaskSpec, block_k: int):
  block_q = q_ref.shape[0]
  q_start = pl.program_id(2) * block_q
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  precision = exact_precision(q.dtype)
  q_pos = _q_positions(mask, q_start, block_q)
  q_seg = _q_segments(q_seg_ref, 0, block_q)
  lo, hi = _within_documents(*mask.kv_block_range(q_start, block_q, block_k), range_ref)

  def body(j, dq):
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    s, capped = _scores(q, k, q_pos, _k_positions(k_start, block_k), q_seg,
                        _k_segments(k_seg_ref, k_start, block_k), mask)
    p = _probabilities(s, lse)
    ds = _dscores(p, dot_nt(do, v, precision), delta, capped, mask)
    return dq + dot(ds.astype(k.dtype), k, precision)

  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, range_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                *, mask: MaskSpec, block_q: int, group: int, layout: Layout):
  """q_ref/do_ref: the kv head's G query heads, all rows; lse_ref/delta_ref: [G, T, 1]; k/v/dk/dv: [block_k, D]."""
  block_k = k_ref.shape[0]
  k_start = pl.program_id(2) * block_k
  k, v = k_ref[...], v_ref[...]
  precision = exact_precision(k.dtype)
  k_pos = _k_positions(k_start, block_k)
  k_seg = _k_segments(k_seg_ref, 0, block_k)
  lo, hi = _within_documents(*mask.q_block_range(k_start, block_k, block_q), range_ref)
  num_q_blocks = hi - lo

  def body(i, carry):
    dk, dv = carry
    g, j = lax.div(i, num_q_blocks), lo + lax.rem(i, num_q_blocks)  # non-negative: no floor-division fix-ups
    q_start = j * block_q
    rows = pl.ds(q_start, block_q)
    q = layout.head_rows(q_ref, g, rows)
    do = layout.head_rows(do_ref, g, rows)
    s, capped = _scores(q, k, _q_positions(mask, q_start, block_q), k_pos,
                        _q_segments(q_seg_ref, q_start, block_q), k_seg, mask)
    p = _probabilities(s, lse_ref[g, rows, :])
    dv = dv + dot_tn(p.astype(do.dtype), do, precision)
    ds = _dscores(p, dot_nt(do, v, precision), delta_ref[g, rows, :], capped, mask)
    return dk + dot_tn(ds.astype(q.dtype), q, precision), dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group * num_q_blocks, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)



@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static facts of one call: masks, blocks, layout, padded sizes, backend."""
  mask: MaskSpec
  blocks: BlockSizes
  target: Target
  heads: int
  kv_heads: int
  has_segments: bool

  @property
  def group(self) -> int:
    return self.heads // self.kv_heads

  @property
  def layout(self) -> Layout:
    return self.target.layout

  def call(self, kernel, **kwargs):
    return self.target.pallas_call(kernel, num_warps=self.blocks.num_warps, num_stages=self.blocks.num_stages,
                                   **kwargs)

  def segment_specs(self, q_rows: int, k_cols: int, q_index, k_index) -> list:
    """Query ids as [B, T, 1] columns and key ids as [B, 1, S] rows: tiles whose last two dims suit TPU and that
    compare without reshapes."""
    if not self.has_segments:
      return [None, None]
    return [pl.BlockSpec((None, q_rows, 1), lambda *g: (*q_index(*g), 0)),
            pl.BlockSpec((None, 1, k_cols), lambda *g: (k_index(*g)[0], 0, k_index(*g)[1]))]

  def range_spec(self, index):
    """The [1, 2] tile of document block ranges [B, blocks, 1, 2] of the program's block (batch, block)."""
    return pl.BlockSpec((None, None, 1, 2), lambda *g: (*index(*g), 0, 0)) if self.has_segments else None


class _Ranges(NamedTuple):
  """Document block ranges (documents.py) of each pass: key blocks per query block for the forward and dQ,
  query blocks per key block for dK/dV."""
  fwd: jax.Array
  dq: jax.Array
  dkv: jax.Array

  @classmethod
  def for_blocks(cls, ids_BT, ids_BS, blocks: BlockSizes, t_pad: int, s_pad: int) -> "_Ranges":
    keys = lambda bq, bk: documents.block_ranges(ids_BT, ids_BS, own_block=bq, other_block=bk,
                                                 num_own_blocks=t_pad // bq)
    return cls(fwd=keys(blocks.block_q, blocks.block_k), dq=keys(blocks.block_q_dq, blocks.block_k_dq),
               dkv=documents.block_ranges(ids_BS, ids_BT, own_block=blocks.block_k_dkv,
                                          other_block=blocks.block_q_dkv, num_own_blocks=s_pad // blocks.block_k_dkv))


def _forward(plan: _Plan, q, k, v, q_seg, k_seg, ranges: _Ranges | None):
  lay, bq, bk, g = plan.layout, plan.blocks.block_q, plan.blocks.block_k, plan.group
  batch, t_pad, s_pad, d = q.shape[0], lay.seq_len(q), lay.seq_len(k), q.shape[-1]
  grid = (batch, plan.heads, t_pad // bq)
  q_tile = lay.tile(bq, d, None, lambda b, h, i: (b, h, i))
  kv_tile = lay.tile(s_pad, d, None, lambda b, h, i: (b, lax.div(h, g), 0))
  kernel = functools.partial(_fwd_kernel, mask=plan.mask, block_k=bk)
  return plan.call(
      kernel, grid=grid,
      in_specs=[q_tile, kv_tile, kv_tile,
                *plan.segment_specs(bq, s_pad, lambda b, h, i: (b, i), lambda b, h, i: (b, 0)),
                plan.range_spec(lambda b, h, i: (b, i))],
      out_specs=[q_tile, pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, plan.heads, t_pad, 1), jnp.float32)],
      name="flash_attention_fwd")(q, k, v, q_seg, k_seg, None if ranges is None else ranges.fwd)


def _backward(plan: _Plan, q, k, v, q_seg, k_seg, ranges: _Ranges | None, do, lse, delta):
  lay, g = plan.layout, plan.group
  batch, t_pad, s_pad, d = q.shape[0], lay.seq_len(q), lay.seq_len(k), q.shape[-1]
  bq, bk = plan.blocks.block_q_dq, plan.blocks.block_k_dq
  q_tile = lay.tile(bq, d, None, lambda b, h, i: (b, h, i))
  kv_tile = lay.tile(s_pad, d, None, lambda b, h, i: (b, lax.div(h, g), 0))
  row_stat = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
  dq = plan.call(
      functools.partial(_dq_kernel, mask=plan.mask, block_k=bk), grid=(batch, plan.heads, t_pad // bq),
      in_specs=[q_tile, kv_tile, kv_tile,
                *plan.segment_specs(bq, s_pad, lambda b, h, i: (b, i), lambda b, h, i: (b, 0)),
                plan.range_spec(lambda b, h, i: (b, i)), q_tile, row_stat, row_stat],
      out_specs=q_tile, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name="flash_attention_dq")(q, k, v, q_seg, k_seg, None if ranges is None else ranges.dq, do, lse, delta)

  bq, bk = plan.blocks.block_q_dkv, plan.blocks.block_k_dkv
  group_tile = lay.tile(t_pad, d, g, lambda b, h, j: (b, h, 0))
  k_tile = lay.tile(bk, d, None, lambda b, h, j: (b, h, j))
  group_stat = pl.BlockSpec((None, g, t_pad, 1), lambda b, h, j: (b, h, 0, 0))
  dk, dv = plan.call(
      functools.partial(_dkv_kernel, mask=plan.mask, block_q=bq, group=g, layout=lay),
      grid=(batch, plan.kv_heads, s_pad // bk),
      in_specs=[group_tile, k_tile, k_tile,
                *plan.segment_specs(t_pad, bk, lambda b, h, j: (b, 0), lambda b, h, j: (b, j)),
                plan.range_spec(lambda b, h, j: (b, j)), group_tile, group_stat, group_stat],
      out_specs=[k_tile, k_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name="flash_attention_dkv")(q, k, v, q_seg, k_seg, None if ranges is None else ranges.dkv, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: _Plan, q, k, v, q_seg, k_seg, ranges):
  return _forward(plan, q, k, v, q_seg, k_seg, ranges)


def _attention_fwd(plan, q, k, v, q_seg, k_seg, ranges):
  o, lse = _forward(plan, q, k, v, q_seg, k_seg, ranges)
  return (o, lse), (q, k, v, q_seg, k_seg, ranges, o, lse)


def _backward_from_residuals(plan: _Plan, q, k, v, q_seg, k_seg, ranges, o, lse, do, dlse):
  """dq, dk, dv from the forward's o and lse (row statistics as [B, H, T, 1] columns) and the cotangents."""
  # d lse / d logits = P, so an lse cotangent enters exactly like a shift of delta.
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  if not plan.layout.heads_major:
    delta = jnp.swapaxes(delta, 1, 2)  # row statistics are [B, H, T, 1] columns in both layouts
  return _backward(plan, q, k, v, q_seg, k_seg, ranges, do, lse, delta[..., None] - dlse)


def _attention_bwd(plan, residuals, cotangents):
  q, k, v, q_seg, k_seg, ranges, o, lse = residuals
  dq, dk, dv = _backward_from_residuals(plan, q, k, v, q_seg, k_seg, ranges, o, lse, *cotangents)
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _setup(q_BTHD, k_BSKD, segment_ids, kv_segment_ids, *, causal, window, window_right, scale, softcap,
           block_sizes: BlockSizes | None, interpret: bool | None):
  """The plan of one call, a function that pads and arranges [B, rows, heads, D] arrays for the kernels, the
  padded segment ids and the document block ranges (None without segments)."""
  target = Target.current(interpret)
  batch, q_len, heads, head_dim = q_BTHD.shape
  kv_len, kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
  blocks = block_sizes or BlockSizes.for_shape(q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                                               itemsize=q_BTHD.dtype.itemsize,
                                               backend=target.backend if not target.interpret else "cpu")
  d_pad = target.padded_dim(head_dim)
  t_pad = round_up(q_len, max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv))
  s_pad = round_up(kv_len, max(blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv))

  def prepare(x, rows):
    x = jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, 0), (0, d_pad - x.shape[3])))
    return target.layout.arrange(x)

  q_seg = k_seg = ranges = None
  if segment_ids is not None:
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    q_seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - q_len)))[:, :, None]
    k_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, s_pad - kv_len)))[:, None, :]
    ranges = _Ranges.for_blocks(segment_ids, kv_segment_ids, blocks, t_pad, s_pad)
  mask = MaskSpec.for_call(q_len=q_len, kv_len=kv_len, head_dim=head_dim, causal=causal, window=window,
                           window_right=window_right, scale=scale, softcap=softcap)
  plan = _Plan(mask=mask, blocks=blocks, target=target, heads=heads, kv_heads=kv_heads,
               has_segments=q_seg is not None)
  return (plan, functools.partial(prepare, rows=t_pad), functools.partial(prepare, rows=s_pad), q_seg, k_seg,
          ranges)


def flash_attention(q_BTHD, k_BSKD, v_BSKD, *, causal=False, window=None, window_right=None, segment_ids=None,
                    kv_segment_ids=None, scale=None, softcap=None, return_lse=False,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """FlashAttention with the reference's semantics (pallas_kernels/attention/reference.py); inputs validated by
  api.py. Pads the sequence to whole blocks and, for Triton, the head dim to a power of two (>= 16)."""
  plan, q_rows, kv_rows, q_seg, k_seg, ranges = _setup(
      q_BTHD, k_BSKD, segment_ids, kv_segment_ids, causal=causal, window=window, window_right=window_right,
      scale=scale, softcap=softcap, block_sizes=block_sizes, interpret=interpret)
  o, lse = _attention(plan, q_rows(q_BTHD), kv_rows(k_BSKD), kv_rows(v_BSKD), q_seg, k_seg, ranges)
  q_len, head_dim = q_BTHD.shape[1], q_BTHD.shape[3]
  o = plan.layout.restore(o)[:, :q_len, :, :head_dim]
  return (o, lse[:, :, :q_len, 0]) if return_lse else o
