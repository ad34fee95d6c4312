"""The parallel (quadratic) BASED form for Hopper (sm90) in Mosaic GPU: forward and backward with TMA rings, warp
specialisation and wgmma, the schedule of attention/hopper.py with a polynomial in place of the softmax.

  y_t = Σ_{s≤t} a_ts v_s / (Σ_{s≤t} a_ts + eps),  a_ts = 1 + c·x + c²·x²/2,  x = q_t·k_s,  c = 1/√F

(causal, same segment; unnormalised: no denominator). There is no running maximum: the sums are plain, so O
accumulates in a wgmma accumulator that is never read back until the end. With g = da/dx = c + c²·x, the backward
is dn = dy / (den + eps), dd = -Σ_d dy·y / (den + eps) (normalised; else dn = dy, dd = 0, both from XLA), then
  da = dn·vᵀ + dd,  dx = da ⊙ g,  dq = dx·k,  dk = dxᵀ·q,  dv = aᵀ·dn.

Letters: B batch, T length (padded to whole CTAs), H heads, F feature dim (padded: Fp), D value dim.

Schedule. Each of the three kernels runs a producer warpgroup (wg 2) that TMA-loads the streamed blocks into a
ring of num_stages slots (a slot is refilled once both consumers arrive on its `free` barrier), and two consumer
warpgroups of 64 rows each (the wgmma M) that keep their own tiles in shared memory for the whole loop:

  forward  a CTA owns 128 query rows; it streams key blocks K_j, V_j for j < its causal end. Per block a consumer
           issues X_j = Q·K_jᵀ together with O += A_{j-1}·V_{j-1} (A in registers), waits for X_j only, frees
           K_j's slot and computes A_j and its row sums while the tensor cores still work on A_{j-1}·V_{j-1}.
           It writes y and den [B, H, T] (float32, kept for the backward).
  dk/dv    a CTA owns 128 keys; it streams query blocks Q_i, dN_i, dd_i for i at or after its first key. Per block
           Xᵀ = K·Q_iᵀ and dAᵀ = V·dN_iᵀ + dd, then dV += Aᵀ·dN_i and dK += dXᵀ·Q_i.
  dq       a CTA owns 128 query rows; it streams K_j, V_j like the forward. Per block X = Q·K_jᵀ and
           dA = dN·V_jᵀ + dd, then dQ += dX·K_j.

Variants measured slower on the H100 (B8 T2048 H16 F16 D64): FA3's ping-pong turns between the forward's
consumers (0.194 vs 0.168 ms: the elementwise work per block is small), backward kernels that left dV, dK or dQ
in flight into the next block, and a backward that read dy and scaled by 1 / (den + eps) in the kernels instead
of taking dn from XLA.

Both consumers walk the CTA's whole range (so that each frees every slot); blocks on the causal diagonal, and
every block with segment ids, are masked element by element, the others are not. Padded keys sit after every
real query, so causality hides them; padded queries get dn = dd = 0, so they add nothing to dk, dv.

Tiles: F is zero-padded to Fp = 16 or 32 (one or two bf16 wgmma k-steps; zero features leave q·k unchanged, c
keeps the true F). Rows of Fp·2 = 32 or 64 bytes take that swizzle with (8, Fp) tiling; D-wide tiles take the
128-byte swizzle with (8, 64) tiling. wgmma needs lhs and rhs of one product to share a swizzle, which holds:
Q·Kᵀ, K·Qᵀ pair Fp tiles, dN·Vᵀ, V·dNᵀ pair D tiles, and the products with a register lhs take any rhs.
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

from pallas_kernels.common import mosaic
from pallas_kernels.common.dispatch import first_reason, require
from pallas_kernels.common.layout import round_up

_FEATURE_DIMS = (8, 16, 24, 32)
_VALUE_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_k: int = 128  # keys per ring stage in the forward and dq kernels (the wgmma N of X)
  block_q_dkv: int = 64  # queries per ring stage in the dk/dv kernel (64 keeps Xᵀ, dAᵀ, dV in registers)
  # Depth of the shared-memory rings: at B8 T2048 H16 D64 on the H100, 2 took 0.19 / 0.74 ms (forward /
  # +backward), 3 took 0.22 / 0.80.
  num_stages: int = 2

  def smem_bytes(self, padded_features: int, value_dim: int) -> int:
    """The largest of the three kernels' shared memory (16-bit tiles, float32 row vectors)."""
    width = padded_features + value_dim
    own = mosaic.CONSUMERS * mosaic.WG_ROWS * width * 2  # the consumers' tiles: Q and y or dN, or K and V
    streamed = max(self.block_k * width * 2, self.block_q_dkv * (width * 2 + 8))
    return own + self.num_stages * streamed + mosaic.CONSUMERS * mosaic.WG_ROWS * 8

  def check(self, padded_features: int, value_dim: int) -> None:
    if self.block_k not in (64, 128) or self.block_q_dkv not in (64, 128):
      raise ValueError(f"{self.block_k=} and {self.block_q_dkv=} must be 64 or 128")
    mosaic.check_ring(self, self.smem_bytes(padded_features, value_dim), f" with {value_dim=}")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static facts of one call."""
  blocks: BlockSizes
  heads: int
  feature_dim: int  # the true F: c = 1/√F
  padded_features: int  # Fp
  value_dim: int
  dtype: Any
  t_pad: int
  segmented: bool
  normalize: bool
  eps: float

  @property
  def c(self) -> float:
    return 1.0 / math.sqrt(self.feature_dim)

  @property
  def cta_blocks(self) -> int:
    return self.t_pad // mosaic.CTA_ROWS

  def smem(self, shape, width: int):
    """A 16-bit tile `width` elements wide: rows of 32/64 bytes take that swizzle, wider ones 128."""
    return plgpu.SMEM((*shape, width), self.dtype, transforms=mosaic.swizzled(min(128, width * 2)))


def _visible(shape, row_start, col_start, queries_on_rows: bool, row_ids=None, col_ids=None):
  """The causal (and same-segment) mask of a wgmma tile whose rows are queries (or keys)."""
  rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + row_start
  cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + col_start
  visible = cols <= rows if queries_on_rows else rows <= cols
  if row_ids is not None:
    visible = visible & (mosaic.rows(row_ids, shape) == mosaic.cols(col_ids, shape))
  return visible


def _ids_loader(ids_ref, batch, size: int, axis: int):
  """Segment ids of `size` tokens from start, laid out along the tile's rows (axis 0) or columns (axis 1);
  None without segments (read straight from global memory: a few hundred bytes per block)."""
  if ids_ref is None:
    return lambda start: None
  layout = plgpu.Layout.WGMMA.reduce(1 - axis)
  return lambda start: plgpu.load(ids_ref.at[batch, pl.ds(start, size)], (), layout=layout, optimized=False)


def _query_cta(plan: _Plan):
  """(batch, head, q_start, full_hi, hi) of a CTA that owns query rows [q_start, q_start + 128) and reads key
  blocks [0, hi) (see _causal_blocks). Causal CTAs with later queries read more keys: they launch first, so that
  short ones fill the tail."""
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  q_start = (plan.cta_blocks - 1 - lax.axis_index("q_blocks")) * mosaic.CTA_ROWS
  return (batch, head, q_start, *_causal_blocks(plan, q_start, plan.blocks.block_k))


def _causal_blocks(plan: _Plan, q_start, block: int):
  """(full_hi, hi): a CTA with query rows [q_start, q_start + 128) reads key blocks [0, hi); blocks [1, full_hi)
  every row sees whole (block 0 is always masked, so that it can start the loop)."""
  hi = lax.div(q_start + mosaic.CTA_ROWS + block - 1, block)
  full_hi = jnp.int32(0) if plan.segmented else lax.div(q_start + 1, block)
  return jnp.clip(full_hi, 1, hi), hi


def _launch(plan: _Plan, kernel, name: str, out_type, scratch, grid_name: str, *args):
  """Launches kernel(*refs, plan=plan) over (heads, CTAs along T, batch), the CTA axis named `grid_name`."""
  return mosaic.launch(functools.partial(kernel, plan=plan), *args, name=name, out_type=out_type, scratch=scratch,
                       grid={"heads": plan.heads, grid_name: plan.cta_blocks, "batch": args[0].shape[0]})


# ------------------------------------------------------------------------------------------------------- forward


class _FwdShared(NamedTuple):
  q: Any  # [2, 64, Fp]: each consumer's Q tile
  k: Any  # [stages, block_k, Fp]
  v: Any  # [stages, block_k, D]
  y: Any  # [2, 64, D]: each consumer's output on the way out
  den: Any  # [2, 64] float32
  q_ready: Any  # [2]
  k_ready: Any  # [stages]
  v_ready: Any
  k_free: Any  # [stages], 2 arrivals: both consumers have read X = Q·Kᵀ from the slot
  v_free: Any  # [stages], 2 arrivals: both consumers' A·V from the slot is done


def _fwd_shared(plan: _Plan) -> _FwdShared:
  bk, stages, fp, d = plan.blocks.block_k, plan.blocks.num_stages, plan.padded_features, plan.value_dim
  own = (mosaic.CONSUMERS, mosaic.WG_ROWS)  # one tile per consumer
  return _FwdShared(
      q=plan.smem(own, fp), k=plan.smem((stages, bk), fp), v=plan.smem((stages, bk), d),
      y=plan.smem(own, d), den=plgpu.SMEM(own, jnp.float32),
      q_ready=plgpu.Barrier(num_barriers=mosaic.CONSUMERS), k_ready=plgpu.Barrier(num_barriers=stages),
      v_ready=plgpu.Barrier(num_barriers=stages),
      k_free=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=stages),
      v_free=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=stages))


def _fwd_kernel(*refs, plan: _Plan):
  """refs: q, k, v, (ids), y, den, _FwdShared."""
  q_ref, k_ref, v_ref, *ids = refs[:-3]
  y_ref, den_ref, sh = refs[-3:]
  ids_ref = ids[0] if ids else None
  bk, stages, c = plan.blocks.block_k, plan.blocks.num_stages, plan.c
  batch, head, q_start, full_hi, hi = _query_cta(plan)
  slot = lambda j: lax.rem(j, stages)

  def produce():
    keys = lambda ref: lambda j: ref.at[batch, pl.ds(j * bk, bk), head]
    mosaic.produce_ring(0, hi, stages, [(sh.k_free, [mosaic.Stream(keys(k_ref), sh.k, sh.k_ready)]),
                                        (sh.v_free, [mosaic.Stream(keys(v_ref), sh.v, sh.v_ready)])])

  def consume(wg):
    row_start = q_start + wg * mosaic.WG_ROWS
    q_tile = sh.q.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row_start, mosaic.WG_ROWS), head], q_tile, sh.q_ready.at[wg])
    q_ids = _ids_loader(ids_ref, batch, mosaic.WG_ROWS, 0)(row_start)
    key_ids = _ids_loader(ids_ref, batch, bk, 1)

    def scores(j, o_acc, a_prev):
      """X_j = Q·K_jᵀ, issued with O += A_{j-1}·V_{j-1} (a_prev = A_{j-1}, or None for the first block); waits
      for X_j only."""
      plgpu.barrier_wait(sh.k_ready.at[slot(j)])
      if a_prev is not None:
        plgpu.barrier_wait(sh.v_ready.at[slot(j - 1)])

      def with_x(x_acc):
        plgpu.wgmma(x_acc, q_tile, plgpu.transpose_ref(sh.k.at[slot(j)], (1, 0)))
        if a_prev is not None:
          plgpu.wgmma(o_acc, a_prev, sh.v.at[slot(j - 1)])
        return plgpu.wgmma_accumulator_load(x_acc, wait_n=0 if a_prev is None else 1)

      x = pl.run_scoped(with_x, plgpu.ACC((mosaic.WG_ROWS, bk), jnp.float32))
      plgpu.barrier_arrive(sh.k_free.at[slot(j)])
      return x

    def weights(j, x, masked: bool):
      """A_j (16-bit, pinned ahead of the next wgmma's fence) and its row sums in float32."""
      a = 1.0 + x * (c + (0.5 * c * c) * x)
      if masked:
        a = jnp.where(_visible(x.shape, row_start, j * bk, True, q_ids, key_ids(j * bk)), a, 0.0)
      return lax.optimization_barrier(a.astype(plan.dtype)), jnp.sum(a, axis=1)

    def run(o_acc):
      plgpu.barrier_wait(sh.q_ready.at[wg])
      a, den = weights(0, scores(0, o_acc, None), masked=True)

      def step(j, carry, *, masked: bool):
        den, a_prev = carry
        a, part = weights(j, scores(j, o_acc, a_prev), masked)
        plgpu.wgmma_wait(0)  # A_{j-1}·V_{j-1} is done: free its slot
        plgpu.barrier_arrive(sh.v_free.at[slot(j - 1)])
        return den + part, a

      carry = lax.fori_loop(1, full_hi, functools.partial(step, masked=False), (den, a))
      den, a = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)
      plgpu.barrier_wait(sh.v_ready.at[slot(hi - 1)])
      plgpu.wgmma(o_acc, a, sh.v.at[slot(hi - 1)])
      o = plgpu.wgmma_accumulator_load(o_acc, wait_n=0)
      plgpu.barrier_arrive(sh.v_free.at[slot(hi - 1)])
      return o, den

    o, den = pl.run_scoped(run, plgpu.ACC((mosaic.WG_ROWS, plan.value_dim), jnp.float32))
    if plan.normalize:
      o = o * mosaic.rows(1.0 / (den + plan.eps), o.shape)
    y_tile = sh.y.at[wg]
    y_tile[...] = o.astype(plan.dtype)
    sh.den.at[wg][...] = den
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_tile, y_ref.at[batch, pl.ds(row_start, mosaic.WG_ROWS), head])
    plgpu.copy_smem_to_gmem(sh.den.at[wg], den_ref.at[batch, head, pl.ds(row_start, mosaic.WG_ROWS)])
    plgpu.wait_smem_to_gmem(0)

  mosaic.warp_specialized(produce, consume)


def _forward(plan: _Plan, q, k, v, ids):
  """(y [B, T, H, D], den [B, H, T] float32) from padded q, k [B, T, H, Fp], v [B, T, H, D], ids [B, T]."""
  batch = q.shape[0]
  out_type = (jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((batch, plan.heads, plan.t_pad),
                                                                          jnp.float32))
  return _launch(plan, _fwd_kernel, "based_parallel_hopper_fwd", out_type,
                 _fwd_shared(plan), "q_blocks", q, k, v, *(() if ids is None else (ids,)))


# ------------------------------------------------------------------------------------------------------ backward


class _DkvShared(NamedTuple):
  k: Any  # [2, 64, Fp]: each consumer's K tile, reused for its dK on the way out
  v: Any  # [2, 64, D]: each consumer's V tile, reused for its dV
  q: Any  # [stages, block_q_dkv, Fp]
  dn: Any  # [stages, block_q_dkv, D]
  dd: Any  # [stages, block_q_dkv] float32
  k_ready: Any  # [2]: each consumer's K tile landed (one barrier per TMA copy: each copy arrives once)
  v_ready: Any  # [2]
  q_ready: Any  # [stages]
  dn_ready: Any
  dd_ready: Any
  free: Any  # [stages], 2 arrivals: both consumers are done with the slot's Q, dN and dd


def _dkv_kernel(*refs, plan: _Plan):
  """refs: q, k, v, dn, dd, (ids), dk, dv, _DkvShared."""
  q_ref, k_ref, v_ref, dn_ref, dd_ref, *ids = refs[:-3]
  dk_ref, dv_ref, sh = refs[-3:]
  ids_ref = ids[0] if ids else None
  bq, stages, c = plan.blocks.block_q_dkv, plan.blocks.num_stages, plan.c
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  k_start = lax.axis_index("k_blocks") * mosaic.CTA_ROWS
  # Query blocks [lo, hi) see some of the CTA's keys; from full_lo on they see all of them.
  lo, hi = lax.div(k_start, bq), plan.t_pad // bq
  full_lo = hi if plan.segmented else jnp.minimum(lax.div(k_start + mosaic.CTA_ROWS - 1 + bq - 1, bq), hi)
  slot = lambda i: lax.rem(i - lo, stages)

  def produce():
    queries = lambda ref: lambda i: ref.at[batch, pl.ds(i * bq, bq), head]
    dd_rows = lambda i: dd_ref.at[batch, head, pl.ds(i * bq, bq)]
    mosaic.produce_ring(lo, hi, stages, [(sh.free, [mosaic.Stream(queries(q_ref), sh.q, sh.q_ready),
                                                    mosaic.Stream(queries(dn_ref), sh.dn, sh.dn_ready),
                                                    mosaic.Stream(dd_rows, sh.dd, sh.dd_ready)])])

  def consume(wg):
    key_start = k_start + wg * mosaic.WG_ROWS
    k_tile, v_tile = sh.k.at[wg], sh.v.at[wg]
    keys = (batch, pl.ds(key_start, mosaic.WG_ROWS), head)
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_tile, sh.k_ready.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_tile, sh.v_ready.at[wg])
    k_ids = _ids_loader(ids_ref, batch, mosaic.WG_ROWS, 0)(key_start)
    query_ids = _ids_loader(ids_ref, batch, bq, 1)

    def run(dk_acc, dv_acc):
      def step(i, carry, *, masked: bool):
        s = slot(i)
        for ready in (sh.q_ready, sh.dn_ready, sh.dd_ready):
          plgpu.barrier_wait(ready.at[s])

        def products(x_acc, dp_acc):  # Xᵀ = K·Q_iᵀ and dPᵀ = V·dN_iᵀ, one wait for both
          plgpu.wgmma(x_acc, k_tile, plgpu.transpose_ref(sh.q.at[s], (1, 0)))
          plgpu.wgmma(dp_acc, v_tile, plgpu.transpose_ref(sh.dn.at[s], (1, 0)))
          return plgpu.wgmma_accumulator_load(x_acc, wait_n=1), plgpu.wgmma_accumulator_load(dp_acc, wait_n=0)

        tile = plgpu.ACC((mosaic.WG_ROWS, bq), jnp.float32)
        x, dp = pl.run_scoped(products, tile, tile)
        dd = plgpu.load(sh.dd.at[s], (), layout=plgpu.Layout.WGMMA.reduce(0))
        a = 1.0 + x * (c + (0.5 * c * c) * x)
        dx = (dp + mosaic.cols(dd, dp.shape)) * (c + (c * c) * x)
        if masked:
          visible = _visible(x.shape, key_start, i * bq, False, k_ids, query_ids(i * bq))
          a, dx = jnp.where(visible, a, 0.0), jnp.where(visible, dx, 0.0)
        a, dx = lax.optimization_barrier((a.astype(plan.dtype), dx.astype(plan.dtype)))
        plgpu.wgmma(dv_acc, a, sh.dn.at[s])
        plgpu.wgmma(dk_acc, dx, sh.q.at[s])
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(sh.free.at[s])
        return carry

      plgpu.barrier_wait(sh.k_ready.at[wg])
      plgpu.barrier_wait(sh.v_ready.at[wg])
      lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), None)
      lax.fori_loop(full_lo, hi, functools.partial(step, masked=False), None)
      return plgpu.wgmma_accumulator_load(dk_acc), plgpu.wgmma_accumulator_load(dv_acc)

    dk, dv = pl.run_scoped(run, plgpu.ACC((mosaic.WG_ROWS, plan.padded_features), jnp.float32),
                           plgpu.ACC((mosaic.WG_ROWS, plan.value_dim), jnp.float32))
    k_tile[...] = dk.astype(plan.dtype)  # K and V are dead: stage dK and dV in their tiles
    v_tile[...] = dv.astype(plan.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[keys])
    plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[keys])
    plgpu.wait_smem_to_gmem(0)

  mosaic.warp_specialized(produce, consume)


class _DqShared(NamedTuple):
  q: Any  # [2, 64, Fp]: each consumer's Q tile, reused for its dQ on the way out
  dn: Any  # [2, 64, D]
  dd: Any  # [2, 64] float32
  k: Any  # [stages, block_k, Fp]
  v: Any  # [stages, block_k, D]
  q_ready: Any  # [2]: each consumer's tiles landed (one barrier per TMA copy)
  dn_ready: Any  # [2]
  dd_ready: Any  # [2]
  k_ready: Any  # [stages]
  v_ready: Any
  free: Any  # [stages], 2 arrivals: both consumers are done with the slot's K and V


def _dq_kernel(*refs, plan: _Plan):
  """refs: q, k, v, dn, dd, (ids), dq, _DqShared."""
  q_ref, k_ref, v_ref, dn_ref, dd_ref, *ids = refs[:-2]
  dq_ref, sh = refs[-2:]
  ids_ref = ids[0] if ids else None
  bk, stages, c = plan.blocks.block_k, plan.blocks.num_stages, plan.c
  batch, head, q_start, full_hi, hi = _query_cta(plan)
  slot = lambda j: lax.rem(j, stages)

  def produce():
    keys = lambda ref: lambda j: ref.at[batch, pl.ds(j * bk, bk), head]
    mosaic.produce_ring(0, hi, stages, [(sh.free, [mosaic.Stream(keys(k_ref), sh.k, sh.k_ready),
                                                   mosaic.Stream(keys(v_ref), sh.v, sh.v_ready)])])

  def consume(wg):
    row_start = q_start + wg * mosaic.WG_ROWS
    q_tile, dn_tile, dd_tile = sh.q.at[wg], sh.dn.at[wg], sh.dd.at[wg]
    rows = (batch, pl.ds(row_start, mosaic.WG_ROWS), head)
    plgpu.copy_gmem_to_smem(q_ref.at[rows], q_tile, sh.q_ready.at[wg])
    plgpu.copy_gmem_to_smem(dn_ref.at[rows], dn_tile, sh.dn_ready.at[wg])
    plgpu.copy_gmem_to_smem(dd_ref.at[batch, head, pl.ds(row_start, mosaic.WG_ROWS)], dd_tile, sh.dd_ready.at[wg])
    q_ids = _ids_loader(ids_ref, batch, mosaic.WG_ROWS, 0)(row_start)
    key_ids = _ids_loader(ids_ref, batch, bk, 1)

    def run(dq_acc):
      for ready in (sh.q_ready, sh.dn_ready, sh.dd_ready):
        plgpu.barrier_wait(ready.at[wg])
      dd = plgpu.load(dd_tile, (), layout=plgpu.Layout.WGMMA.reduce(1))

      def step(j, carry, *, masked: bool):
        s = slot(j)
        plgpu.barrier_wait(sh.k_ready.at[s])
        plgpu.barrier_wait(sh.v_ready.at[s])

        def products(x_acc, dp_acc):  # X = Q·K_jᵀ and dP = dN·V_jᵀ, one wait for both
          plgpu.wgmma(x_acc, q_tile, plgpu.transpose_ref(sh.k.at[s], (1, 0)))
          plgpu.wgmma(dp_acc, dn_tile, plgpu.transpose_ref(sh.v.at[s], (1, 0)))
          return plgpu.wgmma_accumulator_load(x_acc, wait_n=1), plgpu.wgmma_accumulator_load(dp_acc, wait_n=0)

        tile = plgpu.ACC((mosaic.WG_ROWS, bk), jnp.float32)
        x, dp = pl.run_scoped(products, tile, tile)
        dx = (dp + mosaic.rows(dd, dp.shape)) * (c + (c * c) * x)
        if masked:
          dx = jnp.where(_visible(x.shape, row_start, j * bk, True, q_ids, key_ids(j * bk)), dx, 0.0)
        dx = lax.optimization_barrier(dx.astype(plan.dtype))
        plgpu.wgmma(dq_acc, dx, sh.k.at[s])
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(sh.free.at[s])
        return carry

      step(0, None, masked=True)
      lax.fori_loop(1, full_hi, functools.partial(step, masked=False), None)
      lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), None)
      return plgpu.wgmma_accumulator_load(dq_acc, wait_n=0)

    dq = pl.run_scoped(run, plgpu.ACC((mosaic.WG_ROWS, plan.padded_features), jnp.float32))
    q_tile[...] = dq.astype(plan.dtype)  # Q is dead: stage dQ in its tile
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  mosaic.warp_specialized(produce, consume)


def _backward_kernels(plan: _Plan, q, k, v, ids, dn, dd):
  """(dq, dk, dv) in the padded layouts of q, k, v from dn [B, T, H, D] (16-bit) and dd [B, H, T] float32."""
  bk, bq, stages = plan.blocks.block_k, plan.blocks.block_q_dkv, plan.blocks.num_stages
  fp, d = plan.padded_features, plan.value_dim
  segments = () if ids is None else (ids,)
  barriers = lambda n: plgpu.Barrier(num_barriers=n)
  own = (mosaic.CONSUMERS, mosaic.WG_ROWS)  # one tile per consumer
  dkv_shared = _DkvShared(
      k=plan.smem(own, fp), v=plan.smem(own, d), q=plan.smem((stages, bq), fp),
      dn=plan.smem((stages, bq), d), dd=plgpu.SMEM((stages, bq), jnp.float32),
      k_ready=barriers(mosaic.CONSUMERS), v_ready=barriers(mosaic.CONSUMERS), q_ready=barriers(stages),
      dn_ready=barriers(stages), dd_ready=barriers(stages),
      free=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=stages))
  dk, dv = _launch(plan, _dkv_kernel, "based_parallel_hopper_dkv",
                   (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)), dkv_shared,
                   "k_blocks", q, k, v, dn, dd, *segments)
  dq_shared = _DqShared(
      q=plan.smem(own, fp), dn=plan.smem(own, d), dd=plgpu.SMEM(own, jnp.float32), k=plan.smem((stages, bk), fp),
      v=plan.smem((stages, bk), d), q_ready=barriers(mosaic.CONSUMERS), dn_ready=barriers(mosaic.CONSUMERS),
      dd_ready=barriers(mosaic.CONSUMERS), k_ready=barriers(stages), v_ready=barriers(stages),
      free=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=stages))
  dq = _launch(plan, _dq_kernel, "based_parallel_hopper_dq",
               jax.ShapeDtypeStruct(q.shape, q.dtype), dq_shared, "q_blocks", q, k, v, dn, dd, *segments)
  return dq, dk, dv


# ------------------------------------------------------------------------------------------------ custom_vjp, api


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _parallel(plan: _Plan, q, k, v, ids):
  return _forward(plan, q, k, v, ids)[0]


def _parallel_fwd(plan, q, k, v, ids):
  y, den = _forward(plan, q, k, v, ids)
  return y, (q, k, v, ids, y, den)


def _parallel_bwd(plan, residuals, dy_BTHD):
  q, k, v, ids, y_BTHD, den_BHT = residuals
  dy = dy_BTHD.astype(jnp.float32)
  if plan.normalize:
    inv_BHT = 1.0 / (den_BHT + plan.eps)
    dn = dy * jnp.swapaxes(inv_BHT, 1, 2)[..., None]
    dd_BHT = -jnp.einsum("bthd,bthd->bht", dy, y_BTHD.astype(jnp.float32)) * inv_BHT
  else:
    dn, dd_BHT = dy, jnp.zeros_like(den_BHT)
  dq, dk, dv = _backward_kernels(plan, q, k, v, ids, dn.astype(v.dtype), dd_BHT)
  return dq, dk, dv, None


_parallel.defvjp(_parallel_fwd, _parallel_bwd)


def based_parallel_hopper(q_BTHF, k_BTHF, v_BTHD, *, normalize: bool = True, eps: float = 1e-6, segment_ids=None,
                          initial_state=None, return_final_state: bool = False, chunk: int | None = None,
                          block_sizes: BlockSizes | None = None):
  """The quadratic form on sm90 with parallel.based_parallel's semantics (no state in or out; `chunk` is
  accepted for a uniform signature and unused)."""
  del chunk
  if initial_state is not None or return_final_state:
    raise ValueError("the parallel BASED kernel takes no initial_state and returns no final state")
  batch, length, heads, f = q_BTHF.shape
  d, dtype = v_BTHD.shape[-1], jnp.dtype(q_BTHF.dtype)
  if not mosaic.is_16bit(dtype) or f not in _FEATURE_DIMS or d not in _VALUE_DIMS:
    raise ValueError(f"the Hopper BASED kernel takes bfloat16/float16 with feature_dim in {_FEATURE_DIMS} and "
                     f"value_dim in {_VALUE_DIMS}, got {dtype}, {f=}, {d=}")
  fp = 16 if f <= 16 else 32
  blocks = block_sizes or BlockSizes()
  blocks.check(fp, d)
  t_pad = round_up(length, max(mosaic.CTA_ROWS, blocks.block_k, blocks.block_q_dkv))
  plan = _Plan(blocks=blocks, heads=heads, feature_dim=f, padded_features=fp, value_dim=d, dtype=dtype,
               t_pad=t_pad, segmented=segment_ids is not None, normalize=bool(normalize), eps=float(eps))

  def pad(x, width):
    return jnp.pad(x, ((0, 0), (0, t_pad - length), (0, 0), (0, width - x.shape[-1])))

  ids = None
  if segment_ids is not None:  # padded tokens join the last segment, after every real query
    ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - length)), mode="edge")
  y = _parallel(plan, pad(q_BTHF, fp), pad(k_BTHF, fp), pad(v_BTHD.astype(dtype), d), ids)
  return y[:, :length]


def supports(*, backend: str, dtype=None, feature_dim: int | None = None, value_dim: int | None = None,
             has_initial_state: bool = False, return_final_state: bool = False, **_) -> str | None:
  """None when the Hopper kernel covers the call (segment ids and unnormalised included), else why not."""
  return first_reason(
      require(backend == "gpu", f"Mosaic GPU kernels run on GPU, not {backend=}"),
      require(not has_initial_state and not return_final_state, "no state in or out (the chunked kernel has it)"),
      require(mosaic.is_16bit(dtype), f"{dtype=} is not bfloat16 or float16"),
      require(feature_dim in _FEATURE_DIMS, f"{feature_dim=} not in {_FEATURE_DIMS}"),
      require(value_dim in _VALUE_DIMS, f"{value_dim=} not in {_VALUE_DIMS}"),
      require(backend != "gpu" or mosaic.is_sm90(), "needs an sm90 (Hopper) GPU"),
  )
