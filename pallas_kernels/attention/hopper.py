"""FlashAttention forward for Hopper (sm90) in Mosaic GPU: TMA, wgmma and warp specialisation (FA3, Shah et al.
2024), with reference.py's masks, GQA/MQA, soft-cap and segment ids; its custom_vjp backward is
hopper_backward.py's (separate dQ and dK/dV kernels in the same style). The tiles take head dims 64 and 128; the
wrapper zero-pads other head dims up to 128 to the next of them (head_dim.py says why that is exact).

Letters: B batch, T query length, S key length, H query heads, K kv heads, D head dim.

Schedule. A CTA owns 2·block_q query rows of one (batch, head) and reads the key blocks [lo, hi) they can see
(causal/window bounds and, with segment ids, the blocks that hold its documents, from documents.py; the other
blocks are never loaded). It runs three warpgroups:

  producer  (wg 2)     TMA-loads K_j and V_j of the shared kv head (GQA: never repeated) into slot
                       (j - lo) % num_stages of a shared-memory ring; each load completes the slot's `k_ready` /
                       `v_ready` barrier, and a slot is refilled only after its `k_free` / `v_free` barrier
                       completes (one arrival per consumer).
  consumers (wg 0, 1)  each TMA-load block_q rows of Q once and keep them in shared memory for the whole loop; O
                       lives in a float32 wgmma accumulator, the running max m and sum l in registers.

Per key block j a consumer issues S_j = Q·K_jᵀ together with O += P_{j-1}·V_{j-1}, waits for S_j alone, frees
K_j's slot, and runs the softmax of block j while the tensor cores still work on P_{j-1}·V_{j-1} (intra-warpgroup
overlap); then it waits for that product, frees V_{j-1}'s slot and rescales O. The two consumers also take turns
issuing their wgmmas: a token passed through the `turn` barriers (warpgroup 1 hands warpgroup 0 the first turn;
nobody awaits the hand-over after the last issue, so it is skipped), so one warpgroup's softmax runs while the
other's matmuls occupy the tensor cores (inter-warpgroup ping-pong). No barrier wait happens inside a turn, so
the token always moves on. After its loop the producer awaits the last releases, so every barrier phase is
observed.

Both consumers walk the CTA's whole key range, so that they take equally many turns and free every slot; a block
that hides everything from one warpgroup's rows (at most one at either end) costs it one block of work and
masks to zero. A CTA whose rows see no key at all still reads one block, fully masked. Blocks that every row of
the CTA sees whole run without the element mask; the first block and the boundary ones (causal diagonal, window
edges, key padding and, with segment ids, every block not inside the CTA's one document) apply it.

Persistent form (BlockSizes.persistent_ctas > 0, opt-in: checked in the interpreter, not yet timed on a GPU): at
most that many CTAs, each walking query tiles c, c + ctas, ... in the order longest first; the producer keeps one
K/V ring across its tiles (a tile's slots continue the count; only the last tile drains), so the next tile's first
key blocks load while the consumers finish the current one, and each tile's turn protocol starts afresh (the
hand-overs balance within a tile). Q still loads at each tile's start, through the tile O left behind.

Softmax: base-2 logits with scale·log2(e) folded into one multiply-add, p = exp2(c·s - m) (float32, approximate
exp2); a row that has seen only hidden keys keeps m = -inf and is shifted by 0, so it ends with O = 0, l = 0 and
lse = -inf. O is written in the input dtype through Q's shared-memory tile, lse = m·ln 2 + ln l in float32.

Block sizes: wgmma M is 64 per warpgroup, so block_q = 64 and a CTA owns 128 rows. block_k = 128 keeps S (64
registers per thread), O (D/2) and two 16-bit P tiles under the 232 registers a consumer gets (the producer keeps
40).
Shared memory holds Q (128·D) and the ring (2·num_stages·block_k·D) in 16 bits: D=128 with 2 stages is 160 KiB,
D=64 with 3 stages 112 KiB, of the 227 KiB a block may use. Tiles that wgmma reads use 128-byte swizzling with
(8, 64) tiling; Kᵀ is a transposed view of K's tile, not a copy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import documents
from pallas_kernels.attention import head_dim as head_dims
from pallas_kernels.attention import hopper_backward
from pallas_kernels.attention.masking import LOG2E, MaskSpec
from pallas_kernels.common import mosaic
from pallas_kernels.common.dispatch import first_reason, require
from pallas_kernels.common.layout import cdiv, round_up

_HEAD_DIMS = (64, 128)  # what the tiles take (128-byte swizzled rows); smaller head dims are zero-padded to one
# Head dims above 128 would pad to 192 or 256, which the backward cannot hold: at D=256 its owned tiles and ring
# need (4·64 + 2·2·64)·256·2 bytes = 256 KiB of shared memory (227 KiB usable), and its float32 dK, dV
# accumulators 2·64·256/128 = 256 registers a thread (a consumer has 232). The portable kernel takes them.
MAX_HEAD_DIM = max(_HEAD_DIMS)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q: int = 64  # query rows per consumer warpgroup (the wgmma M); a CTA holds 2·block_q
  block_k: int = 128  # keys per pipeline stage
  num_stages: int = 2  # depth of the K/V shared-memory ring
  # With segment ids, stream only the key blocks that hold each CTA's documents, and run the blocks inside a CTA's
  # one document without the element mask (documents.py; forward and both backward kernels). On the H100
  # (2026-12-07, B4 S8192 H16 KV4 D128 causal, forward / forward+backward): no segment ids 1.85 / 8.83 ms, 8 packed
  # documents 0.49 / 1.64, one document 1.97 / 8.92. Unsorted ids get every block, masked.
  skip_other_documents: bool = True
  # > 0: a persistent forward of at most this many CTAs (e.g. the SM count, 132 on an H100), each walking query
  # tiles longest-first with one K/V ring across them, so that the next tile's keys load while the consumers finish
  # the current one (short documents pay a fixed 7-10 µs per CTA otherwise: docs/benchmarks.md). 0: a CTA per
  # tile. Opt-in: checked in the interpreter, not yet timed on a GPU.
  persistent_ctas: int = 0
  # The backward kernels' knobs (hopper_backward.py), so that one BlockSizes tunes the op both ways.
  backward: hopper_backward.BlockSizes = dataclasses.field(default_factory=hopper_backward.BlockSizes)

  @classmethod
  def for_shape(cls, *, head_dim: int) -> "BlockSizes":
    """D=64 tiles are half the bytes, so a third stage fits and hides more TMA latency."""
    return cls(num_stages=3 if head_dim <= 64 else 2, backward=hopper_backward.BlockSizes.for_shape(
        head_dim=head_dim))

  def smem_bytes(self, head_dim: int, itemsize: int) -> int:
    tiles = mosaic.CONSUMERS * self.block_q + 2 * self.num_stages * self.block_k
    return tiles * head_dim * itemsize + mosaic.CONSUMERS * self.block_q * 4  # + the lse staging rows

  def check(self, head_dim: int, itemsize: int) -> None:
    if self.persistent_ctas < 0:
      raise ValueError(f"persistent_ctas={self.persistent_ctas} must be >= 0 (0: one CTA per query tile)")
    if self.block_q % 64 or self.block_k % 64 or self.block_k > 256:
      raise ValueError(f"{self.block_q=} and {self.block_k=} must be multiples of 64 (wgmma M, swizzle tile), "
                       f"block_k at most 256 (wgmma N)")
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
  q_blocks: int  # CTAs along the query axis
  kv_blocks: int  # key blocks in the padded key length
  segmented: bool  # segment ids mask every block
  batch: int = 1

  @property
  def rows(self) -> int:
    return mosaic.CONSUMERS * self.blocks.block_q

  @property
  def tiles(self) -> int:
    """Query tiles (2·block_q rows of one batch row and head): the CTAs of the non-persistent grid."""
    return self.batch * self.heads * self.q_blocks


def _key_blocks(plan: _Plan, q_start, doc_range=None):
  """(lo, full_lo, full_hi, hi): the CTA reads key blocks [lo, hi) and blocks [full_lo, full_hi) need no mask;
  doc_range: the (lo, hi) key blocks that hold the CTA's documents and the (lo, hi) inside its one document
  (documents.py; empty if it holds several), or None.

  [lo, hi) is never empty: a CTA whose rows see nothing still masks one block, so its rows come out 0 / -inf
  through the normal path. full_lo > lo: the first block always applies the mask (see _consumer)."""
  mask, bk, rows = plan.mask, plan.blocks.block_k, plan.rows
  lo, hi = mask.kv_block_range(q_start, rows, bk)
  if doc_range is not None:
    lo = jnp.maximum(lo, doc_range[0])
    hi = jnp.maximum(lo, jnp.minimum(hi, doc_range[1]))
  lo = jnp.minimum(lo, plan.kv_blocks - 1)
  hi = jnp.maximum(hi, lo + 1)
  p_first = mask.q_offset + q_start  # position of the CTA's first row
  full_lo = lo + 1
  if mask.window is not None:  # every row sees k >= p_last - window + 1
    full_lo = jnp.maximum(full_lo, cdiv(jnp.maximum(p_first + rows - mask.window, 0), bk))
  full_hi = jnp.int32(mask.kv_len // bk)  # blocks without key padding
  if mask.right is not None:  # every row sees k <= p_first + right
    full_hi = jnp.minimum(full_hi, lax.div(jnp.maximum(p_first + mask.right + 1, 0), bk))
  if plan.segmented:  # only blocks inside the CTA's one document see every key
    full_lo, full_hi = ((full_lo, full_lo) if doc_range is None else
                        (jnp.maximum(full_lo, doc_range[2]), jnp.minimum(full_hi, doc_range[3])))
  full_lo = jnp.minimum(full_lo, hi)
  full_hi = jnp.clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def _scores(plan: _Plan, s, row_start, k_start, masked: bool, q_ids=None, k_ids=None):
  """One [block_q, block_k] tile of q·k with the soft-cap applied (kept in units of q·k, so that the softmax scales
  every tile the same way) and, if masked, -inf at hidden keys. q_ids/k_ids: the rows' and keys' segment ids."""
  mask = plan.mask
  if mask.softcap is not None:  # scale·s' = softcap·tanh(scale·s / softcap)
    s = (mask.softcap / mask.scale) * jnp.tanh(s * (mask.scale / mask.softcap))
  if not masked:
    return s
  q_pos = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA) + (mask.q_offset + row_start)
  k_pos = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA) + k_start
  visible = mask.visible(q_pos, k_pos)
  if q_ids is not None:
    visible = visible & (mosaic.rows(q_ids, s.shape) == mosaic.cols(k_ids, s.shape))
  return jnp.where(visible, s, -jnp.inf)


def _softmax_step(s, c: float, m, l, masked: bool):
  """Online softmax over one tile of scores s with base-2 logits c·s (c = scale·log2 e > 0, so the row max
  commutes with it and p = exp2(c·s - m) is one multiply-add): returns (p, m', l', alpha); O must be rescaled
  by alpha before P·V is added."""
  m_new = jnp.maximum(m, jnp.max(s, axis=1) * c)
  # A row that has seen only hidden keys keeps m = -inf; shift it by 0 so that exp2(-inf - shift) is 0, not NaN.
  # Unmasked tiles are finite everywhere, so m' is finite there.
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
  p = jnp.exp2(s * c - mosaic.rows(shift, s.shape))
  alpha = jnp.exp2(m - shift)
  return p, m_new, l * alpha + jnp.sum(p, axis=1), alpha


class _Shared(NamedTuple):
  """Shared memory and barriers of one CTA (see the module docstring for who fills and frees what)."""
  q: Any  # [2, block_q, D]: each consumer's Q tile, reused for its O tile on the way out
  k: Any  # [num_stages, block_k, D]
  v: Any  # [num_stages, block_k, D]
  lse: Any  # [2, block_q] float32: each consumer's lse rows on the way out
  q_ready: Any  # [2]: Q tile landed (TMA)
  k_ready: Any  # [num_stages]: K slot landed (TMA)
  v_ready: Any  # [num_stages]
  k_free: Any  # [num_stages], 2 arrivals: both consumers have read S = Q·Kᵀ from the slot
  v_free: Any  # [num_stages], 2 arrivals: both consumers' P·V from the slot is done
  turn: Any  # [2]: consumer w may issue wgmmas once turn[w] completes; it then arrives on turn[1 - w]


def _shared_types(plan: _Plan) -> _Shared:
  bq, bk, stages, d = plan.blocks.block_q, plan.blocks.block_k, plan.blocks.num_stages, plan.head_dim
  tiles = mosaic.swizzled(128)
  return _Shared(
      q=plgpu.SMEM((mosaic.CONSUMERS, bq, d), plan.dtype, transforms=tiles),
      k=plgpu.SMEM((stages, bk, d), plan.dtype, transforms=tiles),
      v=plgpu.SMEM((stages, bk, d), plan.dtype, transforms=tiles),
      lse=plgpu.SMEM((mosaic.CONSUMERS, bq), jnp.float32),
      q_ready=plgpu.Barrier(num_barriers=mosaic.CONSUMERS),
      k_ready=plgpu.Barrier(num_barriers=stages),
      v_ready=plgpu.Barrier(num_barriers=stages),
      k_free=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=stages),
      v_free=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=stages),
      turn=plgpu.Barrier(num_arrivals=1, num_barriers=mosaic.CONSUMERS))


class _Cta(NamedTuple):
  """Where one CTA works: its batch and query head, its first query row, the key blocks it reads, [lo, hi), and
  those it reads unmasked, [full_lo, full_hi)."""
  batch: Any
  head: Any
  q_start: Any
  lo: Any
  full_lo: Any
  full_hi: Any
  hi: Any
  stages: int
  base: Any = 0  # ring steps before this tile (a persistent CTA's earlier tiles)

  def slot(self, j):
    """The ring slot of key block j."""
    return lax.rem(self.base + j - self.lo, self.stages)


def _producer(plan: _Plan, cta: _Cta, k_ref, v_ref, sh: _Shared, drain: bool = True):
  """Streams K_j and V_j for j in [lo, hi) through the ring; K's slot frees before V's, so each has its barrier.
  drain=False: a persistent CTA's tile before its last (the ring goes on)."""
  bk = plan.blocks.block_k
  kv_head = lax.div(cta.head, plan.heads // plan.kv_heads)  # GQA: read the shared head in place
  keys = lambda ref: lambda j: ref.at[cta.batch, pl.ds(j * bk, bk), kv_head]
  mosaic.produce_ring(cta.lo, cta.hi, cta.stages, [(sh.k_free, [mosaic.Stream(keys(k_ref), sh.k, sh.k_ready)]),
                                                  (sh.v_free, [mosaic.Stream(keys(v_ref), sh.v, sh.v_ready)])],
                      offset=cta.base, drain=drain)


def _consumer(plan: _Plan, cta: _Cta, wg, q_ref, seg_refs, o_ref, lse_ref, sh: _Shared):
  """The online softmax over key blocks [lo, hi) for this warpgroup's block_q rows; writes O and lse."""
  bq, bk, slot = plan.blocks.block_q, plan.blocks.block_k, cta.slot
  batch, head, lo, hi = cta.batch, cta.head, cta.lo, cta.hi
  row_start = cta.q_start + wg * bq
  q_tile = sh.q.at[wg]
  plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row_start, bq), head], q_tile, sh.q_ready.at[wg])
  my_turn, their_turn = sh.turn.at[wg], sh.turn.at[1 - wg]
  pl.when(wg == 1)(lambda: plgpu.barrier_arrive(their_turn))  # warpgroup 0 issues first

  def issue(wgmmas, last: bool = False):
    """Issues wgmmas in this warpgroup's turn and hands the turn over (except warpgroup 1's last: nobody would
    await that phase)."""
    plgpu.barrier_wait(my_turn)
    wgmmas()
    if last:
      pl.when(wg == 0)(lambda: plgpu.barrier_arrive(their_turn))
    else:
      plgpu.barrier_arrive(their_turn)

  q_ids = k_ids_ref = None
  if seg_refs:
    q_ids = plgpu.load(seg_refs[0].at[batch, pl.ds(row_start, bq)], (), layout=plgpu.Layout.WGMMA.reduce(1),
                       optimized=False)
    k_ids_ref = seg_refs[1].at[batch]

  def key_ids(j):
    """Block j's key segment ids, read from global memory ahead of the wgmmas that hide the latency."""
    if k_ids_ref is None:
      return None
    return plgpu.load(k_ids_ref.at[pl.ds(j * bk, bk)], (), layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)

  def scores(j, o_acc, pv):
    """S_j = Q·K_jᵀ, issued with O += P·V_{j-1} (pv = P, or None for the first block); waits for S_j only, so
    that the softmax of block j overlaps P·V_{j-1}."""
    plgpu.barrier_wait(sh.k_ready.at[slot(j)])
    if pv is not None:
      plgpu.barrier_wait(sh.v_ready.at[slot(j - 1)])

    def with_s(s_acc):
      def wgmmas():
        plgpu.wgmma(s_acc, q_tile, plgpu.transpose_ref(sh.k.at[slot(j)], (1, 0)))
        if pv is not None:
          plgpu.wgmma(o_acc, pv, sh.v.at[slot(j - 1)])
      issue(wgmmas)
      return plgpu.wgmma_accumulator_load(s_acc, wait_n=0 if pv is None else 1)

    s = pl.run_scoped(with_s, plgpu.ACC((bq, bk), jnp.float32))
    plgpu.barrier_arrive(sh.k_free.at[slot(j)])
    return s

  def finish_pv(o_acc, j):
    """Waits for O += P_j·V_j and frees V_j's slot."""
    o = plgpu.wgmma_accumulator_load(o_acc, wait_n=0)
    plgpu.barrier_arrive(sh.v_free.at[slot(j)])
    return o

  def store_o(o_acc, o, p):
    """O into its accumulator, and P (the next wgmma's register operand) as 16-bit: PTX wants every register a
    wgmma reads written before a wgmma.fence, and the store emits one, so the barrier pins P ahead of it."""
    p, o = lax.optimization_barrier((p.astype(plan.dtype), o))
    o_acc[...] = o
    return p

  def run(o_acc):
    plgpu.barrier_wait(sh.q_ready.at[wg])
    k_ids = key_ids(lo)
    # The first block: S only, always masked.
    s = _scores(plan, scores(lo, o_acc, None), row_start, lo * bk, True, q_ids, k_ids)
    m0 = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l0 = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    p, m, l, _ = _softmax_step(s, plan.mask.exp2_scale, m0, l0, masked=True)

    def step(j, carry, *, masked: bool):
      m, l, p_prev = carry
      k_ids = key_ids(j) if masked else None
      s = _scores(plan, scores(j, o_acc, p_prev), row_start, j * bk, masked, q_ids, k_ids)
      p, m, l, alpha = _softmax_step(s, plan.mask.exp2_scale, m, l, masked)
      o = finish_pv(o_acc, j - 1)
      return m, l, store_o(o_acc, o * mosaic.rows(alpha, o.shape), p)

    carry = (m, l, p.astype(plan.dtype))
    carry = lax.fori_loop(lo + 1, cta.full_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(cta.full_lo, cta.full_hi, functools.partial(step, masked=False), carry)
    m, l, p = lax.fori_loop(cta.full_hi, hi, functools.partial(step, masked=True), carry)
    # The last block: P·V only (fenced again: with a single block, P comes straight from the first block).
    p = store_o(o_acc, o_acc[...], p)
    plgpu.barrier_wait(sh.v_ready.at[slot(hi - 1)])
    issue(lambda: plgpu.wgmma(o_acc, p, sh.v.at[slot(hi - 1)]), last=True)
    return finish_pv(o_acc, hi - 1), m, l

  o, m, l = pl.run_scoped(run, plgpu.ACC((bq, plan.head_dim), jnp.float32))
  empty = l == 0.0  # rows that see no key: out 0, lse -inf
  l_safe = jnp.where(empty, 1.0, l)
  q_tile[...] = (o * mosaic.rows(1.0 / l_safe, o.shape)).astype(plan.dtype)  # Q is dead: stage O in its tile
  sh.lse.at[wg][...] = jnp.where(empty, -jnp.inf, m / LOG2E + jnp.log(l_safe))
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_tile, o_ref.at[batch, pl.ds(row_start, bq), head])
  plgpu.copy_smem_to_gmem(sh.lse.at[wg], lse_ref.at[batch, head, pl.ds(row_start, bq)])
  plgpu.wait_smem_to_gmem(0)


def _tile(plan: _Plan, q_block, batch, head, seg_refs, base=0) -> _Cta:
  """Where the CTA that owns query tile (batch, head, q_block) works."""
  q_start = q_block * plan.rows
  doc_range = tuple(seg_refs[2][batch, q_block, i] for i in range(4)) if len(seg_refs) == 3 else None
  return _Cta(batch, head, q_start, *_key_blocks(plan, q_start, doc_range), stages=plan.blocks.num_stages,
              base=base)


def _kernel(*refs, plan: _Plan):
  """refs: q, k, v, (q_ids, k_ids, document ranges [B, q_blocks, 4] if segmented), o, lse, _Shared."""
  q_ref, k_ref, v_ref, *seg_refs = refs[:-3]
  o_ref, lse_ref, shared = refs[-3:]
  # Causal CTAs with later queries read more keys: launch them first so that short ones fill the tail.
  q_block = plan.q_blocks - 1 - lax.axis_index("q_blocks")
  cta = _tile(plan, q_block, lax.axis_index("batch"), lax.axis_index("heads"), seg_refs)
  mosaic.warp_specialized(lambda: _producer(plan, cta, k_ref, v_ref, shared),
                          lambda wg: _consumer(plan, cta, wg, q_ref, seg_refs, o_ref, lse_ref, shared))


def _persistent_kernel(*refs, plan: _Plan, ctas: int):
  """The same work as _kernel from `ctas` CTAs: CTA c takes tiles c, c + ctas, ... in the order longest first
  (later query blocks first, then heads and batch rows), so the tail is short tiles. Its producer runs one K/V ring
  over all of its tiles (a tile's slots continue the count, only the last tile drains), so a tile's first key
  blocks load while the consumers still work on the one before; the consumers take the tiles in the same order."""
  q_ref, k_ref, v_ref, *seg_refs = refs[:-3]
  o_ref, lse_ref, shared = refs[-3:]
  c = lax.axis_index("cta")
  rows_per_block = plan.heads * plan.batch
  count = lax.div(plan.tiles - c + ctas - 1, ctas)  # this CTA's tiles

  def tile(i, base):
    t = c + i * ctas
    rest = lax.rem(t, rows_per_block)
    return _tile(plan, plan.q_blocks - 1 - lax.div(t, rows_per_block), lax.rem(rest, plan.batch),
                 lax.div(rest, plan.batch), seg_refs, base)

  def walk(work):
    """work(cta) for each of this CTA's tiles, in order; returns the ring steps they took."""
    def one(i, base):
      cta = tile(i, base)
      work(cta)
      return base + cta.hi - cta.lo
    return lax.fori_loop(0, count, one, jnp.int32(0))

  def produce():
    steps = walk(lambda cta: _producer(plan, cta, k_ref, v_ref, shared, drain=False))
    mosaic.drain_ring(steps, plan.blocks.num_stages, [shared.k_free, shared.v_free])

  def consume(wg):
    walk(lambda cta: _consumer(plan, cta, wg, q_ref, seg_refs, o_ref, lse_ref, shared))

  mosaic.warp_specialized(produce, consume)


def _forward(plan: _Plan, q, k, v, q_ids, k_ids, ranges):
  """(o [B, T_pad, H, D], lse [B, H, T_pad]) from padded q [B, T_pad, H, D], k, v [B, S_pad, K, D], segment
  ids [B, T_pad], [B, S_pad] and the CTAs' document key-block ranges [B, q_blocks, 4] (or None)."""
  batch, t_pad = q.shape[:2]
  segments = () if q_ids is None else (q_ids, k_ids) + (() if ranges is None else (ranges,))
  ctas = min(plan.blocks.persistent_ctas, plan.tiles)
  if ctas:
    body, grid = functools.partial(_persistent_kernel, plan=plan, ctas=ctas), dict(cta=ctas)
  else:
    body, grid = functools.partial(_kernel, plan=plan), dict(heads=plan.heads, q_blocks=plan.q_blocks, batch=batch)
  return mosaic.launch(
      body, q, k, v, *segments, name="flash_attention_hopper_fwd",
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((batch, plan.heads, t_pad), jnp.float32)),
      scratch=_shared_types(plan), grid=grid)


@dataclasses.dataclass(frozen=True)
class _Options:
  """The static arguments of one call, shared by the forward and the backward."""
  causal: bool
  window: int | None
  window_right: int | None
  scale: float | None
  softcap: float | None
  block_sizes: BlockSizes

  def mask_args(self) -> dict:
    return dict(causal=self.causal, window=self.window, window_right=self.window_right, scale=self.scale,
                softcap=self.softcap)


def _hopper_forward(options: _Options, q_BTHD, k_BSKD, v_BSKD, ids_BT, ids_BS):
  """(out [B, T, H, D], lse [B, H, T]): pads T to whole CTAs and S to whole key blocks, runs the kernel, unpads."""
  batch, q_len, heads, head_dim = q_BTHD.shape
  kv_len, kv_heads = k_BSKD.shape[1], k_BSKD.shape[2]
  blocks = options.block_sizes
  blocks.check(head_dim, q_BTHD.dtype.itemsize)
  mask = MaskSpec.for_call(q_len=q_len, kv_len=kv_len, head_dim=head_dim, **options.mask_args())
  rows = mosaic.CONSUMERS * blocks.block_q
  t_pad, s_pad = round_up(q_len, rows), round_up(kv_len, blocks.block_k)
  plan = _Plan(mask=mask, blocks=blocks, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
               dtype=jnp.dtype(q_BTHD.dtype), q_blocks=t_pad // rows, kv_blocks=s_pad // blocks.block_k,
               segmented=ids_BT is not None, batch=batch)
  pad = lambda x, n: x if x.shape[1] == n else jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  ranges = None
  if ids_BT is not None and blocks.skip_other_documents:
    ranges = documents.kernel_ranges(ids_BT, ids_BS, own_block=rows, other_block=blocks.block_k,
                                     num_own_blocks=plan.q_blocks)
  if ids_BT is not None:
    ids_BT, ids_BS = pad(ids_BT.astype(jnp.int32), t_pad), pad(ids_BS.astype(jnp.int32), s_pad)
  o, lse = _forward(plan, pad(q_BTHD, t_pad), pad(k_BSKD, s_pad), pad(v_BSKD, s_pad), ids_BT, ids_BS, ranges)
  return o[:, :q_len], lse[:, :, :q_len]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(options: _Options, q_BTHD, k_BSKD, v_BSKD, ids_BT, ids_BS):
  return _hopper_forward(options, q_BTHD, k_BSKD, v_BSKD, ids_BT, ids_BS)


def _attention_fwd(options, q_BTHD, k_BSKD, v_BSKD, ids_BT, ids_BS):
  o, lse = _hopper_forward(options, q_BTHD, k_BSKD, v_BSKD, ids_BT, ids_BS)
  return (o, lse), (q_BTHD, k_BSKD, v_BSKD, ids_BT, ids_BS, o, lse)


def _attention_bwd(options, residuals, cotangents):
  q, k, v, ids_BT, ids_BS, o, lse = residuals
  dq, dk, dv = hopper_backward.flash_attention_backward(q, k, v, o, lse, *cotangents, segment_ids=ids_BT,
                                                        kv_segment_ids=ids_BS, **options.mask_args(),
                                                        block_sizes=options.block_sizes.backward,
                                                        skip_other_documents=options.block_sizes.skip_other_documents)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q_BTHD, k_BSKD, v_BSKD, *, causal=False, window=None, window_right=None, segment_ids=None,
                    kv_segment_ids=None, scale=None, softcap=None, return_lse=False,
                    block_sizes: BlockSizes | None = None):
  """FlashAttention forward on sm90 with reference.py's semantics (api.py validates the rest of the inputs);
  gradients come from the Hopper backward kernels (hopper_backward.py), tuned by block_sizes.backward. Head dims
  up to 128 other than 64/128 run zero-padded to the next of those (head_dim.py), at the padded size's cost;
  block_sizes then tune the padded call."""
  dtype, head_dim = jnp.dtype(q_BTHD.dtype), q_BTHD.shape[-1]
  if not mosaic.is_16bit(dtype) or head_dim > MAX_HEAD_DIM:
    raise ValueError(f"the Hopper kernel takes bfloat16/float16 inputs with head dim at most {MAX_HEAD_DIM} "
                     f"(padded to one of {_HEAD_DIMS}), got {dtype} and {head_dim=}")
  kernel_dim = head_dims.padded_head_dim(head_dim, _HEAD_DIMS)
  if kernel_dim != head_dim:
    return head_dims.with_padded_head_dim(
        flash_attention, q_BTHD, k_BSKD, v_BSKD, padded_dim=kernel_dim, scale=scale, return_lse=return_lse,
        causal=causal, window=window, window_right=window_right, segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids, softcap=softcap, block_sizes=block_sizes)
  if segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = segment_ids
  options = _Options(causal=bool(causal), window=window, window_right=window_right,
                     scale=None if scale is None else float(scale),
                     softcap=None if softcap is None else float(softcap),
                     block_sizes=block_sizes or BlockSizes.for_shape(head_dim=head_dim))
  o, lse = _attention(options, q_BTHD, k_BSKD, v_BSKD, segment_ids, kv_segment_ids)
  return (o, lse) if return_lse else o


def supports(*, backend: str, head_dim: int | None = None, dtype=None, **_) -> str | None:
  """None when the Hopper kernel covers the call, else why not."""
  return first_reason(
      require(backend == "gpu", f"Mosaic GPU kernels run on GPU, not {backend=}"),
      require(mosaic.is_16bit(dtype), f"{dtype=} is not bfloat16 or float16"),
      require(head_dim is not None and head_dim <= MAX_HEAD_DIM,
              f"{head_dim=} > {MAX_HEAD_DIM}: the backward's tiles would not fit shared memory and registers"),
      require(backend != "gpu" or mosaic.is_sm90(), "needs an sm90 (Hopper) GPU"),
  )
