"""Portable flash-decoding (Dao et al. 2023, "Flash-Decoding for long-context inference"): one query token per
row against a KV cache, one `pl.pallas_call` source for CPU interpret mode, TPU (Mosaic) and GPU (Triton).

The cache is cut into `num_splits` pieces along S, a grid axis, so that short batches still fill the GPU. A
program owns (batch row, kv head, split) and all G = H / K query heads of that kv head as the rows of its tile, so
each K/V block is read once per kv head (GQA/MQA). It walks the blocks of its split that hold visible keys (the
bounds come from the row's length, read from a [1, 1] tile: no scalar prefetch) with an online softmax in base 2
and writes its partial statistics
  m = max_s logits₂,   l = Σ_s 2^(logits₂ - m),   acc = Σ_s 2^(logits₂ - m) v_s      (logits₂ = logits·log₂e)
which XLA merges (log-sum-exp): M = max_n m_n, out = Σ_n 2^(m_n - M) acc_n / Σ_n 2^(m_n - M) l_n, 0 if no key.

Visibility is that of reference.attention_decode: the query sits at position p = lengths[b] - 1 and sees
positions s with s <= p and p - s < window. For the ring-buffer cache of `attention_decode_ring`, position s
lives in slot s mod S, so slot w holds the position whose age is a = (p - w) mod S, and is visible iff
a < min(window, lengths[b]); a block range that misses no visible slot is the hull of that circular interval.

On GPU only the visible blocks are read. On TPU the BlockSpec pipeline copies the whole split into VMEM before the
program runs (skipping saves compute, not bandwidth), and the wrapper moves the cache to [B, K, S, D] because
Mosaic wants the (rows, dim) tile last; a TPU-resident cache should be kept in that layout.

Letters: B batch, S cache slots (of the ring too), H query heads, K kv heads, G = H / K query heads per kv head,
D head dim, J splits (chunks of the cache); Gp, Dp: G and D padded for Triton (powers of two >= 16).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.attention.masking import LOG2E
from pallas_kernels.common.layout import round_up
from pallas_kernels.common.target import Target


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_k: int = 64  # cache slots per inner-loop step
  num_splits: int = 1  # pieces of the cache along S, each its own program
  num_warps: int = 4  # Triton only
  num_stages: int = 2  # Triton only

  @classmethod
  def for_shape(cls, *, batch: int, kv_heads: int, kv_len: int, head_dim: int, backend: str) -> "BlockSizes":
    """Enough programs to fill a GPU (~2 per SM of an H100) from few rows; few big blocks elsewhere. On an H100
    (bf16, full lengths) this reads the cache at ~2.0-2.4 TB/s, 10-25% ahead of XLA's fusion of the reference."""
    if backend == "gpu":
      block_k = 64 if head_dim > 64 else 128
      want = pl.next_power_of_2(max(1, -(-264 // (batch * kv_heads))))
      return cls(block_k=block_k, num_splits=max(1, min(want, kv_len // (2 * block_k))), num_warps=4,
                 num_stages=3)
    if backend == "tpu":
      # Splits do not add parallelism on TPU; they only bound the VMEM a split's K/V tiles take.
      block_k = 128 if kv_len >= 128 else -(-kv_len // 8) * 8
      return cls(block_k=block_k, num_splits=max(1, -(-kv_len // 2048)))
    # Interpret mode pays per grid step: few large blocks, two splits so the merge runs in CI's default path.
    block_k = min(128, max(16, pl.next_power_of_2(kv_len)))
    return cls(block_k=block_k, num_splits=2 if kv_len > block_k else 1)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static facts of one call: scores, which slots are visible, and how the cache is cut."""
  scale: float
  softcap: float | None
  window: int | None
  ring: bool  # slot w holds the newest position ≡ w (mod kv_len) instead of position w
  kv_len: int  # real slots (S, the ring's too); the rest is padding
  split_len: int
  block_k: int

  def slot_range(self, length):
    """[lo, hi): slots that can hold a visible key for a row of `length` tokens (a hull for a wrapped ring)."""
    length = jnp.maximum(length, 0)
    if not self.ring:
      lo = jnp.int32(0) if self.window is None else jnp.maximum(length - self.window, 0)
      return lo, jnp.minimum(length, self.kv_len)
    count, newest = self._ring_count(length), self._newest_slot(length)
    wraps = newest + 1 < count  # the visible ages run past slot 0 into the end of the ring
    lo = jnp.where(wraps, 0, newest + 1 - count)
    hi = jnp.where(count == 0, 0, jnp.where(wraps, self.kv_len, newest + 1))
    return lo, hi

  def _ring_count(self, length):
    """How many of the newest positions are visible: min(window, length, S)."""
    count = jnp.minimum(length, self.kv_len)
    return count if self.window is None else jnp.minimum(count, self.window)

  def _newest_slot(self, length):
    return lax.rem(jnp.maximum(length - 1, 0), self.kv_len)  # non-negative: truncation is the modulus

  def visible(self, length, slots):
    """Whether each slot of `slots` [1, block_k] holds a visible key for a row of `length` tokens."""
    length = jnp.maximum(length, 0)
    if not self.ring:
      visible = slots < jnp.minimum(length, self.kv_len)
      if self.window is not None:
        visible = visible & (slots >= length - self.window)
      return visible
    # age = (newest - w) mod S without a vector remainder (Mosaic has none): newest - w lies in (-S, S).
    age = self._newest_slot(length) - slots
    age = jnp.where(age < 0, age + self.kv_len, age)
    return (slots < self.kv_len) & (age < self._ring_count(length))


# Full float32 products for float32 inputs (Triton's default would round them to TF32): decode is bound by
# reading the cache, so the slower exact products cost nothing. bfloat16 inputs are unaffected.
_PRECISION = lax.Precision.HIGHEST


def _dot_nt(a, b):
  """a @ b.T with float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_PRECISION,
                         preferred_element_type=jnp.float32)


def _dot(a, b):
  return jnp.dot(a, b, precision=_PRECISION, preferred_element_type=jnp.float32)


def _decode_kernel(length_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, spec: _Spec):
  """length_ref [1, 1]; q_ref [Gp, Dp]; k_ref/v_ref: this split's [split_len, Dp]; outputs [Gp, Dp], [Gp, 1]."""
  bk, split_len = spec.block_k, spec.split_len
  split_start = pl.program_id(2) * split_len
  length = length_ref[0, 0]
  lo, hi = spec.slot_range(length)
  lo_block = lax.div(jnp.clip(lo - split_start, 0, split_len), bk)  # clipped at 0: truncation is floor
  hi_block = jnp.maximum(lo_block, lax.div(jnp.clip(hi - split_start, 0, split_len) + (bk - 1), bk))
  q = q_ref[...]

  def body(j, carry):
    m, l, acc = carry  # running max and sum are [Gp, 1] columns
    start = j * bk
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s = _dot_nt(q, k.astype(q.dtype)) * spec.scale
    if spec.softcap is not None:
      s = spec.softcap * jnp.tanh(s / spec.softcap)
    slots = split_start + start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    s = jnp.where(spec.visible(length, slots), s * LOG2E, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no visible key yet: shift by 0, so 2^-inf = 0
    p = jnp.exp2(s - m_safe)
    alpha = jnp.exp2(m - m_safe)
    return m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), alpha * acc + _dot(p.astype(v.dtype), v)

  rows, d = q_ref.shape
  init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, d), jnp.float32))
  m, l, acc = lax.fori_loop(lo_block, hi_block, body, init)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _merged(acc_BKJGD, m_BKJG1, l_BKJG1):
  """Log-sum-exp merge of the splits' partial results: [B, K, G, D], 0 for rows that saw no key."""
  m_max = jnp.max(m_BKJG1, axis=2, keepdims=True)
  m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
  weight = jnp.exp2(m_BKJG1 - m_max)  # 0 for splits that saw nothing (m = -inf)
  denom = jnp.sum(weight * l_BKJG1, axis=2)
  acc = jnp.sum(weight * acc_BKJGD, axis=2)
  return acc / jnp.where(denom == 0.0, 1.0, denom)


def _split_plan(kv_len: int, blocks: BlockSizes, target: Target) -> tuple[int, int, int]:
  """(block_k, split_len, num_splits) with split_len a multiple of block_k and no empty split."""
  block_k = blocks.block_k
  if target.mosaic_tpu and kv_len <= block_k:
    block_k = kv_len  # one block equal to the full (unpadded) dim suits Mosaic
  split_len = round_up(-(-kv_len // max(1, blocks.num_splits)), block_k)
  return block_k, split_len, -(-kv_len // split_len)


def _decode(q_BHD, k_BSKD, v_BSKD, lengths_B, *, scale, softcap, window, ring: bool,
            block_sizes: BlockSizes | None, interpret: bool | None):
  target = Target.current(interpret)
  layout = target.layout
  batch, heads, head_dim = q_BHD.shape
  kv_len, kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
  group = heads // kv_heads
  blocks = block_sizes or BlockSizes.for_shape(
      batch=batch, kv_heads=kv_heads, kv_len=kv_len, head_dim=head_dim,
      backend=target.backend if not target.interpret else "cpu")
  block_k, split_len, num_splits = _split_plan(kv_len, blocks, target)
  s_pad, g_pad, d_pad = num_splits * split_len, target.padded_dim(group), target.padded_dim(head_dim)

  # Padding copies the cache: it happens only when S is not a whole number of splits or D is not a Triton size.
  def prepare(x):
    if (s_pad, d_pad) != (kv_len, head_dim):
      x = jnp.pad(x, ((0, 0), (0, s_pad - kv_len), (0, 0), (0, d_pad - head_dim)))
    return layout.arrange(x)

  k, v = prepare(k_BSKD), prepare(v_BSKD)
  # Query head h = k·G + g belongs to kv head k: [B, K, G, D] puts a kv head's G queries in one tile.
  q = q_BHD.reshape(batch, kv_heads, group, head_dim)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, g_pad - group), (0, d_pad - head_dim)))
  lengths = lengths_B.astype(jnp.int32).reshape(batch, 1, 1)

  spec = _Spec(scale=1.0 / math.sqrt(head_dim) if scale is None else float(scale),
               softcap=None if softcap is None else float(softcap), window=window, ring=ring, kv_len=kv_len,
               split_len=split_len, block_k=block_k)
  row_stat = pl.BlockSpec((None, None, None, g_pad, 1), lambda b, h, n: (b, h, n, 0, 0))
  acc, m, l = target.pallas_call(
      functools.partial(_decode_kernel, spec=spec), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
      grid=(batch, kv_heads, num_splits),
      in_specs=[pl.BlockSpec((None, 1, 1), lambda b, h, n: (b, 0, 0)),
                pl.BlockSpec((None, None, g_pad, d_pad), lambda b, h, n: (b, h, 0, 0)),
                layout.tile(split_len, d_pad, None, lambda b, h, n: (b, h, n)),
                layout.tile(split_len, d_pad, None, lambda b, h, n: (b, h, n))],
      out_specs=[pl.BlockSpec((None, None, None, g_pad, d_pad), lambda b, h, n: (b, h, n, 0, 0)),
                 row_stat, row_stat],
      out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, num_splits, g_pad, d_pad), jnp.float32),
                 jax.ShapeDtypeStruct((batch, kv_heads, num_splits, g_pad, 1), jnp.float32),
                 jax.ShapeDtypeStruct((batch, kv_heads, num_splits, g_pad, 1), jnp.float32)],
      name="attention_decode_ring" if ring else "attention_decode")(lengths, q, k, v)
  out_BKGD = _merged(acc, m, l)[:, :, :group, :head_dim]
  return out_BKGD.reshape(batch, heads, head_dim).astype(q_BHD.dtype)


def attention_decode(q_BHD: jax.Array, k_cache_BSKD: jax.Array, v_cache_BSKD: jax.Array, lengths_B: jax.Array,
                     *, scale: float | None = None, softcap: float | None = None, window: int | None = None,
                     block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
  """out_BHD of reference.attention_decode: query at position lengths[b] - 1 over cache slots [0, lengths[b]),
  the last `window` of them when set, 0 for length 0; split over S and merged by log-sum-exp."""
  return _decode(q_BHD, k_cache_BSKD, v_cache_BSKD, lengths_B, scale=scale, softcap=softcap, window=window,
                 ring=False, block_sizes=block_sizes, interpret=interpret)


def attention_decode_ring(q_BHD: jax.Array, k_ring_BSKD: jax.Array, v_ring_BSKD: jax.Array, lengths_B: jax.Array,
                          *, window: int | None, scale: float | None = None, softcap: float | None = None,
                          block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
  """out_BHD for a ring-buffer cache of S slots holding position p at slot p mod S: the same as
  reference.attention_decode on the unrolled cache with this window (window <= S; None means S)."""
  ring_len = k_ring_BSKD.shape[1]
  if window is not None and not 0 < window <= ring_len:
    raise ValueError(f"window={window} must be in [1, ring length {ring_len}]: older positions were overwritten")
  return _decode(q_BHD, k_ring_BSKD, v_ring_BSKD, lengths_B, scale=scale, softcap=softcap, window=window,
                 ring=True, block_sizes=block_sizes, interpret=interpret)
