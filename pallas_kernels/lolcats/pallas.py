"""Portable chunked LoLCATs kernels (forward and backward): one `pl.pallas_call` source for CPU interpret mode,
TPU (Mosaic) and GPU (Triton). The math is reference.lolcats_quadratic's with the factors folded into f.

The chunk is the window (C = w), so for query chunk j the keys fall into three groups:
  chunk j      window, causal (s <= t)                       softmax term exp(s - m)
  chunk j - 1  window where s > t - w, linear where s <= t - w  softmax term or f·g, masked by position
  chunks < j-1 linear                                         a running state Σ g vᵀ, Σ g  [X, D], [1, X]
m is the row max over the first two groups (the whole window, computed exactly, not online, because y depends
on it). Each program owns one (batch, query head) and walks its chunks in order inside the program, carrying the
state in float32 (never across grid steps, which a GPU runs in parallel). Matmul operands are the inputs' dtype
(bf16/f16 at tensor-core rate, the float32 state and probabilities rounded to it), accumulation float32.

Backward, with dn = dy / den and dd = -Σ_d dy·y / den (the cotangents of the numerator and the normaliser):
  window  dp = dn vᵀ + dd,  ds = p ⊙ dp + [s = m] dm / #[s = m],  dm = -Σ_window p ⊙ dp
  linear  da = dn vᵀ + dd,  df += da g,  dg += daᵀ f,  dv += aᵀ dn;  through the state df += dn Sᵀ + dd z
Two kernels: `dq` walks query chunks forward (it needs the state S before each chunk, recomputed) and also
writes dm / #[s = m]; `dkv` walks key chunks backward carrying Σ_{later queries} fᵀ dn and fᵀ dd (the state's
cotangent), reading the query chunks c (diagonal block) and c + 1 (the block that reaches back).

GQA: k and v have K heads; query head h reads kv head h // (H/K) through its index map, and writes its own dk, dv
partials [B, T, H, D] that XLA sums over each group.

Letters: B batch, T length (padded to whole chunks), H heads, K kv heads, D head dim (padded to a power of two
>= 16 off TPU, zeros add nothing), X feature width (padded likewise), C chunk = window.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.layout import round_up
from pallas_kernels.common.matmul import exact_precision, mm, mm_nt, mm_tn
from pallas_kernels.common.target import Target

# Masked scores: finite so that exp(mask - m) is 0 and never inf - inf (as jax's flash attention does).
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  num_warps: int = 4  # Triton only
  num_stages: int = 1  # Triton only

  @classmethod
  def for_shape(cls, *, head_dim: int, feature_width: int, target: Target) -> "BlockSizes":
    """One program per (batch, head) holding its [X, D] float32 state; 8 warps once it outgrows 4 warps' registers
    (not yet timed on a GPU)."""
    del target
    return cls(num_warps=8 if head_dim * feature_width > 64 * 64 else 4)


@dataclasses.dataclass(frozen=True)
class _Spec:
  chunk: int  # C = the window
  scale: float  # 1/√D of the real head dim
  operand_dtype: object = jnp.float32
  precision: object = None



def _rowsum(x):
  return jnp.sum(x, axis=1, keepdims=True)


def _colsum(x):
  return jnp.sum(x, axis=0, keepdims=True)


def _masks(c: int, reaches_back):
  """[C, C] masks of query row i against key column: the diagonal block's causal window, and the previous
  block's window part (column > i) and linear part (column <= i); the latter two only when that block exists."""
  row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return col <= row, (col > row) & reaches_back, (col <= row) & reaches_back


def _scores(spec: _Spec, q, k, mask):
  """Scaled scores q kᵀ/√D of one [C, C] block, masked."""
  return jnp.where(mask, mm_nt(spec, q, k) * spec.scale, _MASK_VALUE)


def _probs(s, m, mask):
  """exp(s - m) where mask, else 0."""
  return jnp.where(mask, jnp.exp(s - m), 0.0)


def _fwd_kernel(q_ref, k_ref, v_ref, fq_ref, fk_ref, y_ref, m_ref, den_ref, *, spec: _Spec):
  c = spec.chunk

  def body(j, carry):
    kv, k_sum = carry  # the linear state of chunks < j - 1
    rows, back = pl.ds(j * c, c), pl.ds(jnp.maximum(j - 1, 0) * c, c)
    diag, back_window, back_linear = _masks(c, j > 0)
    q, f = q_ref[rows, :], fq_ref[rows, :]
    v_diag, v_back, g_back = v_ref[rows, :], v_ref[back, :], fk_ref[back, :]
    s_diag, s_back = _scores(spec, q, k_ref[rows, :], diag), _scores(spec, q, k_ref[back, :], back_window)
    m = jnp.maximum(jnp.max(s_diag, axis=1, keepdims=True), jnp.max(s_back, axis=1, keepdims=True))
    p_diag, p_back = _probs(s_diag, m, diag), _probs(s_back, m, back_window)
    a_back = p_back + jnp.where(back_linear, mm_nt(spec, f, g_back), 0.0)
    num = mm(spec, p_diag, v_diag) + mm(spec, a_back, v_back) + mm(spec, f, kv)
    den = (_rowsum(p_diag) + _rowsum(a_back)
           + _rowsum(f.astype(jnp.float32) * k_sum))
    y_ref[rows, :] = (num / den).astype(y_ref.dtype)
    m_ref[rows, :] = m
    den_ref[rows, :] = den
    # Chunk j - 1 leaves the window of every query from chunk j + 1 on.
    joins = (j > 0).astype(jnp.float32)
    return kv + joins * mm_tn(spec, g_back, v_back), k_sum + joins * _colsum(g_back.astype(jnp.float32))

  init = (jnp.zeros((fq_ref.shape[1], v_ref.shape[1]), jnp.float32), jnp.zeros((1, fq_ref.shape[1]), jnp.float32))
  lax.fori_loop(0, q_ref.shape[0] // c, body, init)


def _dq_kernel(q_ref, k_ref, v_ref, fq_ref, fk_ref, m_ref, dn_ref, dd_ref, dq_ref, df_ref, dm_ref, *,
               spec: _Spec):
  """Query chunks in forward order, the linear state recomputed: dq, df (query features) and dm / #ties."""
  c = spec.chunk

  def body(j, carry):
    kv, k_sum = carry
    rows, back = pl.ds(j * c, c), pl.ds(jnp.maximum(j - 1, 0) * c, c)
    diag, back_window, back_linear = _masks(c, j > 0)
    q, m = q_ref[rows, :], m_ref[rows, :]
    k_diag, k_back = k_ref[rows, :], k_ref[back, :]
    v_diag, v_back, g_back = v_ref[rows, :], v_ref[back, :], fk_ref[back, :]
    dn, dd = dn_ref[rows, :], dd_ref[rows, :]
    s_diag, s_back = _scores(spec, q, k_diag, diag), _scores(spec, q, k_back, back_window)
    p_diag, p_back = _probs(s_diag, m, diag), _probs(s_back, m, back_window)
    dp_diag = mm_nt(spec, dn, v_diag) + dd
    dp_back = mm_nt(spec, dn, v_back) + dd
    dm = -(_rowsum(p_diag * dp_diag) + _rowsum(p_back * dp_back))
    ties = (_rowsum(jnp.where(diag & (s_diag == m), 1.0, 0.0))
            + _rowsum(jnp.where(back_window & (s_back == m), 1.0, 0.0)))
    dm_share = dm / ties
    # The arg-max share of dm goes to the tied maxima equally, as jnp.max's gradient does.
    ds_diag = p_diag * dp_diag + jnp.where(diag & (s_diag == m), dm_share, 0.0)
    ds_back = p_back * dp_back + jnp.where(back_window & (s_back == m), dm_share, 0.0)
    dq_ref[rows, :] = (mm(spec, ds_diag, k_diag) + mm(spec, ds_back, k_back)) * spec.scale
    da_back = jnp.where(back_linear, dp_back, 0.0)
    df_ref[rows, :] = mm(spec, da_back, g_back) + mm_nt(spec, dn, kv) + dd * k_sum
    dm_ref[rows, :] = dm_share
    joins = (j > 0).astype(jnp.float32)
    return kv + joins * mm_tn(spec, g_back, v_back), k_sum + joins * _colsum(g_back.astype(jnp.float32))

  init = (jnp.zeros((fq_ref.shape[1], v_ref.shape[1]), jnp.float32), jnp.zeros((1, fq_ref.shape[1]), jnp.float32))
  lax.fori_loop(0, q_ref.shape[0] // c, body, init)


def _dkv_kernel(q_ref, k_ref, v_ref, fq_ref, fk_ref, m_ref, dn_ref, dd_ref, dm_ref, dk_ref, dv_ref, dg_ref, *,
                spec: _Spec):
  """Key chunks in reverse order: dk, dv, dg (key features) of this query head's view of them, carrying the
  state's cotangent Σ fᵀ dn, Σ fᵀ dd over the query chunks that read chunk c through the state (>= c + 2)."""
  c = spec.chunk
  num_chunks = q_ref.shape[0] // c

  def body(step, carry):
    d_kv, d_k_sum = carry
    chunk = num_chunks - 1 - step
    has_next = chunk + 1 < num_chunks
    rows, nxt = pl.ds(chunk * c, c), pl.ds(jnp.minimum(chunk + 1, num_chunks - 1) * c, c)
    k, v, g = k_ref[rows, :], v_ref[rows, :], fk_ref[rows, :]
    # Queries of this chunk: the diagonal block (keys of this chunk as their causal window part).
    diag, _, _ = _masks(c, False)
    q, m, dn, dd = q_ref[rows, :], m_ref[rows, :], dn_ref[rows, :], dd_ref[rows, :]
    s_diag = _scores(spec, q, k, diag)
    p_diag = _probs(s_diag, m, diag)
    ds_diag = p_diag * (mm_nt(spec, dn, v) + dd) + jnp.where(diag & (s_diag == m), dm_ref[rows, :], 0.0)
    dk = mm_tn(spec, ds_diag, q)
    dv = mm_tn(spec, p_diag, dn)
    # Queries of the next chunk: these keys are the block that reaches back (window and linear parts).
    _, back_window, back_linear = _masks(c, has_next)
    q_n, f_n, m_n, dn_n, dd_n = q_ref[nxt, :], fq_ref[nxt, :], m_ref[nxt, :], dn_ref[nxt, :], dd_ref[nxt, :]
    s_back = _scores(spec, q_n, k, back_window)
    p_back = _probs(s_back, m_n, back_window)
    dp_back = mm_nt(spec, dn_n, v) + dd_n
    ds_back = p_back * dp_back + jnp.where(back_window & (s_back == m_n), dm_ref[nxt, :], 0.0)
    a_back = p_back + jnp.where(back_linear, mm_nt(spec, f_n, g), 0.0)
    dk = dk + mm_tn(spec, ds_back, q_n)
    dv = dv + mm_tn(spec, a_back, dn_n) + mm(spec, g, d_kv)
    dg = mm_tn(spec, jnp.where(back_linear, dp_back, 0.0), f_n) + mm_nt(spec, v, d_kv) + d_k_sum
    dk_ref[rows, :] = dk * spec.scale
    dv_ref[rows, :] = dv
    dg_ref[rows, :] = dg
    # From the next step on (key chunk c - 1), query chunk c + 1 reads through the state too.
    joins = has_next.astype(jnp.float32)
    f_n32 = f_n.astype(jnp.float32)
    return d_kv + joins * mm_tn(spec, f_n, dn_n), d_k_sum + joins * _colsum(f_n32 * dd_n)

  init = (jnp.zeros((fq_ref.shape[1], v_ref.shape[1]), jnp.float32), jnp.zeros((1, fq_ref.shape[1]), jnp.float32))
  lax.fori_loop(0, num_chunks, body, init)


def _dims(layout, q, v, fq):
  if layout.heads_major:
    batch, heads, t_pad, d = q.shape
  else:
    batch, t_pad, heads, d = q.shape
  return batch, heads, t_pad, d, v.shape[-1], fq.shape[-1]


def _specs(layout, t_pad: int, groups: int, widths: tuple[int, ...], kv: tuple[bool, ...]):
  """[T_pad, width] tiles of one head per program: the query head's own, or its kv head's where kv."""
  own = lambda b, h: (b, h, 0)
  # lax.div, not //: floor division lowers through sign, whose Mosaic rule asks for the TPU generation (unknown
  # when exporting from a CPU); h and groups are non-negative, so truncation is the same.
  shared = lambda b, h: (b, lax.div(h, groups), 0)
  return [layout.tile(t_pad, w, None, shared if is_kv else own) for w, is_kv in zip(widths, kv)]


def _row_spec(t_pad: int):
  """A per-row float32 [T_pad, 1] column of one (batch, head): m, den, dd, dm; stored [B, H, T_pad, 1]."""
  return pl.BlockSpec((None, None, t_pad, 1), lambda b, h: (b, h, 0, 0))


def _forward(spec: _Spec, blocks: BlockSizes, target: Target, q, k, v, fq, fk):
  layout = target.layout
  batch, heads, t_pad, d, dv, x = _dims(layout, q, v, fq)
  groups = heads // (k.shape[1] if layout.heads_major else k.shape[2])
  rows = jax.ShapeDtypeStruct((batch, heads, t_pad, 1), jnp.float32)
  y_shape = (batch, heads, t_pad, dv) if layout.heads_major else (batch, t_pad, heads, dv)
  return target.pallas_call(
      functools.partial(_fwd_kernel, spec=spec), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
      grid=(batch, heads),
      in_specs=_specs(layout, t_pad, groups, (d, d, dv, x, x), (False, True, True, False, False)),
      out_specs=[*_specs(layout, t_pad, groups, (dv,), (False,)), _row_spec(t_pad), _row_spec(t_pad)],
      out_shape=[jax.ShapeDtypeStruct(y_shape, v.dtype), rows, rows],
      name="lolcats_chunked_fwd")(q, k, v, fq, fk)


def _backward(spec: _Spec, blocks: BlockSizes, target: Target, q, k, v, fq, fk, m, dn, dd):
  layout = target.layout
  batch, heads, t_pad, d, dv, x = _dims(layout, q, v, fq)
  kv_heads = k.shape[1] if layout.heads_major else k.shape[2]
  groups = heads // kv_heads
  inputs = _specs(layout, t_pad, groups, (d, d, dv, x, x), (False, True, True, False, False))
  partial = lambda width: jax.ShapeDtypeStruct(
      (batch, heads, t_pad, width) if layout.heads_major else (batch, t_pad, heads, width), jnp.float32)
  call = functools.partial(target.pallas_call, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
                           grid=(batch, heads))
  own = lambda *widths: _specs(layout, t_pad, groups, widths, (False,) * len(widths))
  dq, df, dm = call(
      functools.partial(_dq_kernel, spec=spec),
      in_specs=[*inputs, _row_spec(t_pad), *own(dv), _row_spec(t_pad)],
      out_specs=[*own(d, x), _row_spec(t_pad)],
      out_shape=[partial(d), partial(x), jax.ShapeDtypeStruct((batch, heads, t_pad, 1), jnp.float32)],
      name="lolcats_chunked_dq")(q, k, v, fq, fk, m, dn, dd)
  dk, dv_heads, dg = call(
      functools.partial(_dkv_kernel, spec=spec),
      in_specs=[*inputs, _row_spec(t_pad), *own(dv), _row_spec(t_pad), _row_spec(t_pad)],
      out_specs=own(d, dv, x), out_shape=[partial(d), partial(dv), partial(x)],
      name="lolcats_chunked_dkv")(q, k, v, fq, fk, m, dn, dd, dm)

  def by_kv_head(x_heads):  # sum each group's query-head partials into its kv head
    axis = 1 if layout.heads_major else 2
    shape = list(x_heads.shape)
    shape[axis:axis + 1] = [kv_heads, groups]
    return x_heads.reshape(shape).sum(axis + 1)

  return (dq.astype(q.dtype), by_kv_head(dk).astype(k.dtype), by_kv_head(dv_heads).astype(v.dtype),
          df.astype(fq.dtype), dg.astype(fk.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _lolcats(spec, blocks, target, q, k, v, fq, fk):
  return _forward(spec, blocks, target, q, k, v, fq, fk)[0]


def _lolcats_fwd(spec, blocks, target, q, k, v, fq, fk):
  y, m, den = _forward(spec, blocks, target, q, k, v, fq, fk)
  return y, (q, k, v, fq, fk, y, m, den)


def _lolcats_bwd(spec, blocks, target, residuals, dy):
  q, k, v, fq, fk, y, m, den = residuals
  # y = num / den: dn = dy / den, d(den) = -Σ_d dy·y / den; den is [B, H, T, 1], y in the kernels' layout.
  inv = 1.0 / den
  inv_y = inv if target.layout.heads_major else jnp.swapaxes(inv, 1, 2)
  dy = dy.astype(jnp.float32)
  dn = dy * inv_y
  dd = -jnp.sum(dy * y.astype(jnp.float32), axis=-1, keepdims=True) * inv_y
  dd = dd if target.layout.heads_major else jnp.swapaxes(dd, 1, 2)
  return _backward(spec, blocks, target, q, k, v, fq, fk, m, dn, dd)


_lolcats.defvjp(_lolcats_fwd, _lolcats_bwd)


def lolcats_chunked(q_BTHD, k_BTKD, v_BTKD, fq_BTHX, fk_BTHX, *, window: int = 64,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """reference.lolcats_quadratic without factors (fold b/a into fq), chunk = window; api.py validates."""
  target = Target.current(interpret)
  _, length, _, d = q_BTHD.shape
  t_pad = round_up(length, window)
  d_pad, x_pad = target.padded_dim(d), target.padded_dim(fq_BTHX.shape[-1])
  dv = v_BTKD.shape[-1]
  dv_pad = target.padded_dim(dv)
  blocks = block_sizes or BlockSizes.for_shape(head_dim=d_pad, feature_width=x_pad, target=target)

  def arrange(x, width):  # zero rows to whole chunks, zero columns to the tile width
    x = jnp.pad(x, ((0, 0), (0, t_pad - length), (0, 0), (0, width - x.shape[-1])))
    return target.layout.arrange(x)

  spec = _Spec(chunk=window, scale=1.0 / math.sqrt(d), operand_dtype=q_BTHD.dtype,
               precision=exact_precision(q_BTHD.dtype))
  y = _lolcats(spec, blocks, target, arrange(q_BTHD, d_pad), arrange(k_BTKD, d_pad), arrange(v_BTKD, dv_pad),
               arrange(fq_BTHX, x_pad), arrange(fk_BTHX, x_pad))
  return target.layout.restore(y)[:, :length, :, :dv]
