"""FlashAttention backward for Hopper (sm90) in Mosaic GPU: the gradients of hopper.py's forward (same masks,
GQA/MQA, soft-cap, segment ids, lse cotangent) with TMA, wgmma and a producer warpgroup per CTA.

Letters: B batch, T query length, S key length, H query heads, K kv heads, G = H / K, D head dim.

Math (recomputation, FA-2 §3.2): with logits s = q·k (soft-capped: s' = c/σ·tanh(σ·s/c), c the cap, σ the scale),
P = exp(σ·s' - lse), dP = dO·Vᵀ, delta = rowsum(O ⊙ dO) - dlse (d lse / d logits = P, so the lse cotangent is
a shift of delta), dS = P ⊙ (dP - delta) ⊙ (1 - tanh²) and dQ = σ·dS·K, dK = σ·dSᵀ·Q, dV = Pᵀ·dO. delta and the
base-2 lse come from XLA; a row that sees no key (lse = -inf) and every padding row get lse = +inf, so that its P
is exactly 0 without a mask and its gradients vanish.

Two kernels, each with three warpgroups: a producer (wg 2) that TMA-loads the streamed tiles into a
`num_stages`-deep shared-memory ring (slot n % num_stages; it refills a slot once both consumers have freed it),
and two consumers (wg 0, 1) that each own 64 rows of the wgmma M dimension, loaded once:

  dK/dV  a CTA owns 2·64 keys of one (batch, kv head); each consumer keeps K, V of its 64 keys and the float32
         dK, dV accumulators, and walks (query head g of the GQA group, query block i) over every block that sees
         the CTA's keys, streaming Q_i, dO_i (the sum over the group happens in the accumulators, never in
         memory). Per step: Sᵀ = K·Q_iᵀ and dPᵀ = V·dO_iᵀ are issued together; Pᵀ is computed while dPᵀ runs,
         dV += Pᵀ·dO_i is issued while dSᵀ is computed, then dK += dSᵀ·Q_i.
  dQ     a CTA owns 2·64 query rows of one (batch, head); each consumer keeps Q, dO of its rows, their lse and
         delta, and a float32 dQ accumulator, and walks the key blocks its CTA sees, streaming K_j, V_j (of the
         shared kv head: never repeated). Per step: S = Q·K_jᵀ with dP = dO·V_jᵀ, P, dS, dQ += dS·K_j.

With segment ids, each CTA's streamed range is also narrowed to the blocks that hold its documents (documents.py's
ranges, [B, CTAs, 4], read as scalars), so tiles of other documents are never loaded.
Blocks that every (row, key) pair of a consumer's tile sees whole skip the element mask (per consumer: the two
warpgroups walk the same blocks but may mask different ones); the rest apply it (with segment ids, every block
not inside the CTA's one document).
The outputs are staged in the consumers' own (dead) input tiles and TMA-stored in the input dtype.

Block sizes: each consumer's tile is 64 rows (wgmma M); the streamed tiles are 64 long, which keeps the two
float32 score tiles (32 registers per thread each) beside the D-wide accumulators (dK and dV: 2·D/2 registers)
under the 232 registers a consumer gets. Shared memory: 4·64·D for the owned tiles plus 2·num_stages·64·D for the
ring, 16-bit (D = 128, 2 stages: 128 KiB).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import documents
from pallas_kernels.attention.masking import LOG2E, MaskSpec
from pallas_kernels.common import mosaic
from pallas_kernels.common.layout import cdiv, round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q_dkv: int = 64  # query rows per pipeline step of the dK/dV kernel (wgmma N of Sᵀ)
  block_k_dq: int = 64  # keys per pipeline step of the dQ kernel (wgmma N of S)
  num_stages: int = 2  # depth of the shared-memory ring in both kernels

  @classmethod
  def for_shape(cls, *, head_dim: int) -> "BlockSizes":
    """One setting for both head dims: on the H100 (B4 S4096 H16 D128 causal) 2 stages took 1.65 ms, 3 stages
    1.77 ms, 128-key dQ steps 1.67 ms, and 128-row dK/dV steps 2.41 ms (their score tiles spill registers)."""
    del head_dim
    return cls()

  def smem_bytes(self, head_dim: int, itemsize: int) -> int:
    step = max(self.block_q_dkv, self.block_k_dq)
    return (2 * mosaic.CONSUMERS * mosaic.WG_ROWS + 2 * self.num_stages * step) * head_dim * itemsize

  def check(self, head_dim: int, itemsize: int) -> None:
    for step in (self.block_q_dkv, self.block_k_dq):
      if step % 64 or step > 128:
        raise ValueError(f"{self.block_q_dkv=} and {self.block_k_dq=} must be 64 or 128 (swizzle tile, registers)")
    mosaic.check_ring(self, self.smem_bytes(head_dim, itemsize), f" with {head_dim=}")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static facts of one call."""
  mask: MaskSpec
  blocks: BlockSizes
  heads: int
  kv_heads: int
  head_dim: int
  dtype: jnp.dtype
  t_pad: int
  s_pad: int
  segmented: bool

  @property
  def group(self) -> int:
    return self.heads // self.kv_heads


def _probabilities(plan: _Plan, s, lse2, visible):
  """(P, tanh or None) of one tile from raw scores s = q·k and the base-2 lse broadcast to the tile; visible is
  None (every pair visible) or a boolean tile."""
  mask = plan.mask
  tanh = None
  if mask.softcap is not None:
    tanh = jnp.tanh(s * (mask.scale / mask.softcap))
    s = (mask.softcap / mask.scale) * tanh
  p = jnp.exp2(s * mask.exp2_scale - lse2)
  if visible is not None:  # hidden scores may overflow exp2: select, never multiply
    p = jnp.where(visible, p, 0.0)
  return p, tanh


def _dscores(p, dp, delta, tanh):
  """dS / σ: through the softmax and, with a soft-cap, the tanh."""
  ds = p * (dp - delta)
  return ds if tanh is None else ds * (1.0 - tanh * tanh)


def _visible(plan: _Plan, q_pos, k_pos, q_ids, k_ids):
  visible = plan.mask.visible(q_pos, k_pos)
  return visible if q_ids is None else visible & (q_ids == k_ids)


def _iota(shape, dim: int, start):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA) + start


def _load_vector(ref, layout):
  """A float32/int32 vector straight from global memory into registers (small, read once per step)."""
  return plgpu.load(ref, (), layout=layout, optimized=False)


_ROW_VECTOR = plgpu.Layout.WGMMA.reduce(1)  # one value per tile row
_COL_VECTOR = plgpu.Layout.WGMMA.reduce(0)  # one value per tile column


def _tiles(plan: _Plan, rows: int, count: int):
  return plgpu.SMEM((count, rows, plan.head_dim), plan.dtype, transforms=mosaic.swizzled(128))


class _Shared(NamedTuple):
  """Shared memory and barriers of one CTA; `own_*` are the consumers' tiles, `ring_*` the streamed ones."""
  own_a: Any  # [2, 64, D]: K (dK/dV kernel) or Q (dQ kernel) of each consumer, reused for its output
  own_b: Any  # [2, 64, D]: V or dO
  ring_a: Any  # [num_stages, step, D]: Q_i or K_j
  ring_b: Any  # [num_stages, step, D]: dO_i or V_j
  own_a_ready: Any  # [2]
  own_b_ready: Any  # [2]
  ring_a_ready: Any  # [num_stages]
  ring_b_ready: Any  # [num_stages]
  free: Any  # [num_stages], 2 arrivals: both consumers are done with the slot


def _shared_types(plan: _Plan, step: int) -> _Shared:
  stages = plan.blocks.num_stages
  return _Shared(
      own_a=_tiles(plan, mosaic.WG_ROWS, mosaic.CONSUMERS), own_b=_tiles(plan, mosaic.WG_ROWS, mosaic.CONSUMERS),
      ring_a=_tiles(plan, step, stages), ring_b=_tiles(plan, step, stages),
      own_a_ready=plgpu.Barrier(num_barriers=mosaic.CONSUMERS), own_b_ready=plgpu.Barrier(num_barriers=mosaic.CONSUMERS),
      ring_a_ready=plgpu.Barrier(num_barriers=stages), ring_b_ready=plgpu.Barrier(num_barriers=stages),
      free=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=stages))


def _produce(sh: _Shared, stages: int, count, ref_a, ref_b, index):
  """Streams `count` steps of (ref_a, ref_b) tiles into the ring, step n at ref.at[index(n)]."""
  streams = [mosaic.Stream(lambda n: ref_a.at[index(n)], sh.ring_a, sh.ring_a_ready),
             mosaic.Stream(lambda n: ref_b.at[index(n)], sh.ring_b, sh.ring_b_ready)]
  mosaic.produce_ring(0, count, stages, [(sh.free, streams)])


def _load_own(sh: _Shared, wg, ref_a, ref_b):
  plgpu.copy_gmem_to_smem(ref_a, sh.own_a.at[wg], sh.own_a_ready.at[wg])
  plgpu.copy_gmem_to_smem(ref_b, sh.own_b.at[wg], sh.own_b_ready.at[wg])
  plgpu.barrier_wait(sh.own_a_ready.at[wg])
  plgpu.barrier_wait(sh.own_b_ready.at[wg])


def _await_slot(sh: _Shared, slot):
  plgpu.barrier_wait(sh.ring_a_ready.at[slot])
  plgpu.barrier_wait(sh.ring_b_ready.at[slot])


def _store_own(plan: _Plan, tiles_dst):
  """Writes float32 results through the consumer's own (dead) tiles: [(value, smem tile, global ref)]."""
  for value, tile, _ in tiles_dst:
    tile[...] = value.astype(plan.dtype)
  plgpu.commit_smem()
  for _, tile, dst in tiles_dst:
    plgpu.copy_smem_to_gmem(tile, dst)
  plgpu.wait_smem_to_gmem(0)


def _walk(sh: _Shared, stages: int, first_step, cta_range, ranges, body):
  """A consumer's pass over the CTA's blocks [cta_lo, cta_hi), ring steps first_step + (i - cta_lo): body(i, slot,
  masked=...) on its own blocks [lo, hi) (unmasked on [full_lo, full_hi)); elsewhere it only awaits and frees the
  slot, so that both consumers observe every barrier phase and free every slot."""
  cta_lo, cta_hi = cta_range
  lo, full_lo, full_hi, hi = ranges

  def visit(i, carry, masked: bool | None):
    slot = lax.rem(first_step + i - cta_lo, stages)
    if masked is None:
      _await_slot(sh, slot)
    else:
      body(i, slot, masked=masked)
    plgpu.barrier_arrive(sh.free.at[slot])
    return carry

  for start, stop, masked in ((cta_lo, lo, None), (lo, full_lo, True), (full_lo, full_hi, False),
                              (full_hi, hi, True), (hi, cta_hi, None)):
    lax.fori_loop(start, stop, functools.partial(visit, masked=masked), None)


def _ordered(cta, lo, full_lo, full_hi, hi, segmented: bool):
  """Clamps a consumer's ranges into cta_lo <= lo <= full_lo <= full_hi <= hi <= cta_hi; with segment ids, only
  blocks inside the CTA's one document (cta.interior) can go unmasked."""
  lo = jnp.clip(lo, cta.lo, cta.hi)
  hi = jnp.clip(hi, lo, cta.hi)
  if segmented:
    full_lo, full_hi = ((full_lo, full_lo) if cta.interior is None else
                        (jnp.maximum(full_lo, cta.interior[0]), jnp.minimum(full_hi, cta.interior[1])))
  full_lo = jnp.clip(full_lo, lo, hi)
  return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


class _Cta(NamedTuple):
  """Where one CTA works: batch, head (the kv head in the dK/dV kernel), its first row (key or query), the
  blocks [lo, hi) its producer streams and, with document ranges, the (lo, hi) inside its one document."""
  batch: Any
  head: Any
  start: Any
  lo: Any
  hi: Any
  interior: Any = None


# ---------------------------------------------------------------- dK / dV


def _dkv_query_blocks(plan: _Plan, cta: _Cta, k_first):
  """(lo, full_lo, full_hi, hi): query blocks [lo, hi) see some of keys k_first .. k_first + 63, and blocks
  [full_lo, full_hi) see all of them from every row (padding rows have P = 0 and need no mask)."""
  mask, bq = plan.mask, plan.blocks.block_q_dkv
  lo, hi = mask.q_block_range(k_first, mosaic.WG_ROWS, bq)
  k_last = k_first + mosaic.WG_ROWS - 1
  full_lo, full_hi = lo, hi
  if mask.right is not None:  # the block's first row p sees k_last iff k_last - p <= right
    full_lo = cdiv(jnp.maximum(k_last - mask.right - mask.q_offset, 0), bq)
  if mask.window is not None:  # its last row p sees k_first iff p - k_first < window
    full_hi = lax.div(jnp.maximum(k_first + mask.window - mask.q_offset, 0), bq)
  full_hi = jnp.where(k_last < mask.kv_len, full_hi, full_lo)  # key padding
  return _ordered(cta, lo, full_lo, full_hi, hi, plan.segmented)


def _dkv_consumer(plan: _Plan, cta: _Cta, wg, refs, sh: _Shared):
  """dK, dV of this warpgroup's 64 keys, summed over the query heads of the GQA group."""
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_refs, dk_ref, dv_ref = refs
  bq, stages, group = plan.blocks.block_q_dkv, plan.blocks.num_stages, plan.group
  k_first = cta.start + wg * mosaic.WG_ROWS
  own = (cta.batch, pl.ds(k_first, mosaic.WG_ROWS), cta.head)
  k_tile, v_tile = sh.own_a.at[wg], sh.own_b.at[wg]
  ranges = _dkv_query_blocks(plan, cta, k_first)
  shape = (mosaic.WG_ROWS, bq)  # transposed tiles: keys down, query rows across
  columns = lambda x: mosaic.cols(x, shape)
  k_ids = _load_vector(seg_refs[1].at[cta.batch, own[1]], _ROW_VECTOR) if seg_refs else None

  def step(i, slot, *, g, masked: bool, dk_acc, dv_acc):
    head, rows = cta.head * group + g, pl.ds(i * bq, bq)
    lse2 = columns(_load_vector(lse_ref.at[cta.batch, head, rows], _COL_VECTOR))
    delta = columns(_load_vector(delta_ref.at[cta.batch, head, rows], _COL_VECTOR))
    visible = None
    if masked:
      q_ids = columns(_load_vector(seg_refs[0].at[cta.batch, rows], _COL_VECTOR)) if seg_refs else None
      visible = _visible(plan, _iota(shape, 1, plan.mask.q_offset + i * bq), _iota(shape, 0, k_first), q_ids,
                         None if k_ids is None else mosaic.rows(k_ids, shape))
    q_slot, do_slot = sh.ring_a.at[slot], sh.ring_b.at[slot]
    _await_slot(sh, slot)

    def grads(st_acc, dpt_acc):
      plgpu.wgmma(st_acc, k_tile, plgpu.transpose_ref(q_slot, (1, 0)))
      plgpu.wgmma(dpt_acc, v_tile, plgpu.transpose_ref(do_slot, (1, 0)))
      pt, tanh = _probabilities(plan, plgpu.wgmma_accumulator_load(st_acc, wait_n=1), lse2, visible)
      plgpu.wgmma(dv_acc, pt.astype(plan.dtype), do_slot)  # runs while dSᵀ is computed
      dst = _dscores(pt, plgpu.wgmma_accumulator_load(dpt_acc, wait_n=1), delta, tanh)
      plgpu.wgmma(dk_acc, dst.astype(plan.dtype), q_slot)
      plgpu.wgmma_wait(0)  # the slot is read until here

    pl.run_scoped(grads, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))

  def run(dk_acc, dv_acc):
    _load_own(sh, wg, k_ref.at[own], v_ref.at[own])

    def per_head(g, carry):
      body = functools.partial(step, g=g, dk_acc=dk_acc, dv_acc=dv_acc)
      _walk(sh, stages, g * (cta.hi - cta.lo), (cta.lo, cta.hi), ranges, body)
      return carry

    lax.fori_loop(0, group, per_head, None)
    return plgpu.wgmma_accumulator_load(dk_acc), plgpu.wgmma_accumulator_load(dv_acc)

  acc = plgpu.ACC((mosaic.WG_ROWS, plan.head_dim), jnp.float32)
  dk, dv = pl.run_scoped(run, acc, acc)
  _store_own(plan, [(dk * plan.mask.scale, k_tile, dk_ref.at[own]), (dv, v_tile, dv_ref.at[own])])


def _within_documents(lo, hi, seg_refs, batch, block):
  """(lo, hi, interior): [lo, hi) narrowed to the CTA's document range and the (lo, hi) inside its one document
  (the third of seg_refs: [B, CTAs, 4], documents.kernel_ranges), if given."""
  if len(seg_refs) < 3:
    return lo, hi, None
  doc_lo, doc_hi, interior_lo, interior_hi = (seg_refs[2][batch, block, i] for i in range(4))
  lo = jnp.maximum(lo, doc_lo)
  return lo, jnp.maximum(lo, jnp.minimum(hi, doc_hi)), (interior_lo, interior_hi)


def _dkv_kernel(*refs, plan: _Plan):
  """refs: q, k, v, do, lse2, delta, (q_ids, k_ids, document query-block ranges if segmented), dk, dv, _Shared."""
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *seg_refs = refs[:-3]
  dk_ref, dv_ref, sh = refs[-3:]
  bq, group = plan.blocks.block_q_dkv, plan.group
  block, batch = lax.axis_index("k_blocks"), lax.axis_index("batch")
  start = block * mosaic.CTA_ROWS
  cta = _Cta(batch, lax.axis_index("heads"), start,
             *_within_documents(*plan.mask.q_block_range(start, mosaic.CTA_ROWS, bq), seg_refs, batch, block))
  n_blocks = cta.hi - cta.lo

  def rows(n):  # step n: query head g of the group, query block i
    g, i = lax.div(n, n_blocks), cta.lo + lax.rem(n, n_blocks)
    return cta.batch, pl.ds(i * bq, bq), cta.head * group + g

  mosaic.warp_specialized(
      lambda: _produce(sh, plan.blocks.num_stages, group * n_blocks, q_ref, do_ref, rows),
      lambda wg: _dkv_consumer(plan, cta, wg, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_refs, dk_ref,
                                               dv_ref), sh))


# ---------------------------------------------------------------- dQ


def _dq_key_blocks(plan: _Plan, cta: _Cta, row_first):
  """(lo, full_lo, full_hi, hi): key blocks [lo, hi) hold keys that rows row_first .. row_first + 63 see, and
  every row sees every key of blocks [full_lo, full_hi)."""
  mask, bk = plan.mask, plan.blocks.block_k_dq
  lo, hi = mask.kv_block_range(row_first, mosaic.WG_ROWS, bk)
  p_first = mask.q_offset + row_first
  full_lo, full_hi = lo, jnp.int32(mask.kv_len // bk)  # blocks without key padding
  if mask.window is not None:  # the last row sees the block's first key
    full_lo = cdiv(jnp.maximum(p_first + mosaic.WG_ROWS - mask.window, 0), bk)
  if mask.right is not None:  # the first row sees the block's last key
    full_hi = jnp.minimum(full_hi, lax.div(jnp.maximum(p_first + mask.right + 1, 0), bk))
  return _ordered(cta, lo, full_lo, full_hi, hi, plan.segmented)


def _dq_consumer(plan: _Plan, cta: _Cta, wg, refs, sh: _Shared):
  """dQ of this warpgroup's 64 query rows."""
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_refs, dq_ref = refs
  bk, stages = plan.blocks.block_k_dq, plan.blocks.num_stages
  row_first = cta.start + wg * mosaic.WG_ROWS
  own = (cta.batch, pl.ds(row_first, mosaic.WG_ROWS), cta.head)
  q_tile, do_tile = sh.own_a.at[wg], sh.own_b.at[wg]
  ranges = _dq_key_blocks(plan, cta, row_first)
  shape = (mosaic.WG_ROWS, bk)
  rows = lambda x: mosaic.rows(x, shape)
  stats = (cta.batch, cta.head, own[1])
  lse2, delta = _load_vector(lse_ref.at[stats], _ROW_VECTOR), _load_vector(delta_ref.at[stats], _ROW_VECTOR)
  q_ids = _load_vector(seg_refs[0].at[cta.batch, own[1]], _ROW_VECTOR) if seg_refs else None

  def step(j, slot, *, masked: bool, dq_acc):
    visible = None
    if masked:
      k_ids = None
      if seg_refs:
        k_ids = mosaic.cols(_load_vector(seg_refs[1].at[cta.batch, pl.ds(j * bk, bk)], _COL_VECTOR), shape)
      visible = _visible(plan, _iota(shape, 0, plan.mask.q_offset + row_first), _iota(shape, 1, j * bk),
                         None if q_ids is None else rows(q_ids), k_ids)
    k_slot, v_slot = sh.ring_a.at[slot], sh.ring_b.at[slot]
    _await_slot(sh, slot)

    def grads(s_acc, dp_acc):
      plgpu.wgmma(s_acc, q_tile, plgpu.transpose_ref(k_slot, (1, 0)))
      plgpu.wgmma(dp_acc, do_tile, plgpu.transpose_ref(v_slot, (1, 0)))
      p, tanh = _probabilities(plan, plgpu.wgmma_accumulator_load(s_acc, wait_n=1), rows(lse2), visible)
      ds = _dscores(p, plgpu.wgmma_accumulator_load(dp_acc, wait_n=0), rows(delta), tanh)
      plgpu.wgmma(dq_acc, ds.astype(plan.dtype), k_slot)
      plgpu.wgmma_wait(0)  # the slot is read until here

    pl.run_scoped(grads, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))

  def run(dq_acc):
    _load_own(sh, wg, q_ref.at[own], do_ref.at[own])
    _walk(sh, stages, 0, (cta.lo, cta.hi), ranges, functools.partial(step, dq_acc=dq_acc))
    return plgpu.wgmma_accumulator_load(dq_acc)

  dq = pl.run_scoped(run, plgpu.ACC((mosaic.WG_ROWS, plan.head_dim), jnp.float32))
  _store_own(plan, [(dq * plan.mask.scale, q_tile, dq_ref.at[own])])


def _dq_kernel(*refs, plan: _Plan):
  """refs: q, k, v, do, lse2, delta, (q_ids, k_ids, document key-block ranges if segmented), dq, _Shared."""
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *seg_refs = refs[:-2]
  dq_ref, sh = refs[-2:]
  bk, rows = plan.blocks.block_k_dq, mosaic.CTA_ROWS
  # Causal CTAs with later queries read more keys: launch them first so that short ones fill the tail.
  block, batch = plan.t_pad // rows - 1 - lax.axis_index("q_blocks"), lax.axis_index("batch")
  start = block * rows
  head = lax.axis_index("heads")
  cta = _Cta(batch, head, start, *_within_documents(*plan.mask.kv_block_range(start, rows, bk), seg_refs, batch,
                                                    block))
  kv_head = lax.div(head, plan.group)
  keys = lambda n: (cta.batch, pl.ds((cta.lo + n) * bk, bk), kv_head)

  mosaic.warp_specialized(
      lambda: _produce(sh, plan.blocks.num_stages, cta.hi - cta.lo, k_ref, v_ref, keys),
      lambda wg: _dq_consumer(plan, cta, wg, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_refs, dq_ref),
                              sh))


# ---------------------------------------------------------------- entry point


def flash_attention_backward(q_BTHD, k_BSKD, v_BSKD, o_BTHD, lse_BHT, do_BTHD, dlse_BHT, *, causal=False,
                             window=None, window_right=None, segment_ids=None, kv_segment_ids=None, scale=None,
                             softcap=None, block_sizes: BlockSizes | None = None, skip_other_documents=True):
  """(dq, dk, dv) of hopper.flash_attention from its outputs o, lse and their cotangents do, dlse (None: zero);
  arrays unpadded, in the public layouts."""
  batch, q_len, heads, head_dim = q_BTHD.shape
  kv_len, kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
  blocks = block_sizes or BlockSizes.for_shape(head_dim=head_dim)
  blocks.check(head_dim, q_BTHD.dtype.itemsize)
  cta_rows = mosaic.CTA_ROWS
  t_pad = round_up(q_len, math.lcm(cta_rows, blocks.block_q_dkv))
  s_pad = round_up(kv_len, math.lcm(cta_rows, blocks.block_k_dq))
  mask = MaskSpec.for_call(q_len=q_len, kv_len=kv_len, head_dim=head_dim, causal=causal, window=window,
                           window_right=window_right, scale=scale, softcap=softcap)
  plan = _Plan(mask=mask, blocks=blocks, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
               dtype=jnp.dtype(q_BTHD.dtype), t_pad=t_pad, s_pad=s_pad, segmented=segment_ids is not None)

  def pad(x, n, axis=1, value=0.0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)

  delta_BHT = jnp.einsum("bthd,bthd->bht", o_BTHD.astype(jnp.float32), do_BTHD.astype(jnp.float32))
  if dlse_BHT is not None:  # d lse / d logits = P: the lse cotangent shifts delta
    delta_BHT = delta_BHT - dlse_BHT.astype(jnp.float32)
  # Rows that see no key (lse = -inf) and padding rows get +inf: P = exp2(s - inf) = 0 with no mask.
  lse2_BHT = jnp.where(lse_BHT == -jnp.inf, jnp.inf, lse_BHT.astype(jnp.float32) * LOG2E)
  args = (pad(q_BTHD, t_pad), pad(k_BSKD, s_pad), pad(v_BSKD, s_pad), pad(do_BTHD, t_pad),
          pad(lse2_BHT, t_pad, axis=2, value=jnp.inf), pad(delta_BHT, t_pad, axis=2))
  if segment_ids is not None:
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    args += (pad(segment_ids.astype(jnp.int32), t_pad), pad(kv_segment_ids.astype(jnp.int32), s_pad))
  dq_args = dkv_args = args
  if segment_ids is not None and skip_other_documents:
    # Per CTA of 128 rows: key blocks (dQ) and query blocks (dK/dV) that hold its documents, [B, CTAs, 4].
    ranges = lambda own, other, step, length: documents.kernel_ranges(
        own, other, own_block=cta_rows, other_block=step, num_own_blocks=length // cta_rows)
    dq_args = args + (ranges(segment_ids, kv_segment_ids, blocks.block_k_dq, t_pad),)
    dkv_args = args + (ranges(kv_segment_ids, segment_ids, blocks.block_q_dkv, s_pad),)

  dq = mosaic.launch(functools.partial(_dq_kernel, plan=plan), *dq_args, name="flash_attention_hopper_dq",
                     out_type=jax.ShapeDtypeStruct(args[0].shape, plan.dtype),
                     scratch=_shared_types(plan, blocks.block_k_dq),
                     grid=dict(heads=heads, q_blocks=t_pad // cta_rows, batch=batch))
  kv_type = jax.ShapeDtypeStruct(args[1].shape, plan.dtype)
  dk, dv = mosaic.launch(functools.partial(_dkv_kernel, plan=plan), *dkv_args, name="flash_attention_hopper_dkv",
                         out_type=(kv_type, kv_type), scratch=_shared_types(plan, blocks.block_q_dkv),
                         grid=dict(heads=kv_heads, k_blocks=s_pad // cta_rows, batch=batch))
  return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]
