"""Chunked BASED backward for Hopper (sm90) in Mosaic GPU: the gradients of hopper_chunked's forward (selected by
hopper_chunked.BlockSizes(backward_kernel="hopper"); written and lowered on CPU, never run on a GPU yet).

Math, per step n of C tokens with the prefix state S_n [X, D], z_n [X] before it (hopper_chunked's feature layout:
X = 320 columns in 5 pieces of 64), a = 1 + s + s²/2 masked causally, s = q·kᵀ/√F:
  y = (A·V + phi(Q)·S_n) / (den + eps),  den = A·1 + phi(Q)·z_n.
XLA turns dy into dn = dy / (den + eps) and dd = -Σ_d dy·y / (den + eps) (unnormalised: dn = dy, dd = 0); then
  dA = dn·Vᵀ + dd,  ds = dA ⊙ (1 + s)/√F (masked),     dq_intra = ds·K,  dk_intra = dsᵀ·Q,  dv_intra = Aᵀ·dn,
  dphi(Q) = dn·S_nᵀ + dd·z_nᵀ                           -> dq_inter (through the feature map's Jacobian),
  G_n = d S_{n+1} (d_final plus phi(Q_m)ᵀ·dn_m of every later step m), gz_n likewise with dd:
  dv_inter = phi(K)·G_n,  dphi(K) = V·G_nᵀ + 1·gz_nᵀ     -> dk_inter,
and what G and gz reach before step 0 is the initial state's gradient.

Feature Jacobian. A piece p < 4 is c2·(x·E_p) ⊙ (x·E_b) (hopper_chunked.expansion_matrices), so
  d<phi_p(x), dphi>/dx = (c2·dphi ⊙ x·E_b)·E_pᵀ + (c2·dphi ⊙ x·E_p)·E_bᵀ,
and the order-0/1 piece (c1·x·E_4 and a constant) gives (c1·dphi)·E_4ᵀ: each a 16-bit register operand against
a transposed expansion matrix [64, F] in shared memory, summed in the float32 dq/dk accumulator. The elementwise
parts are the public functions below (score_weights, score_grad, feature_piece, feature_piece_grad); the kernels
and the CPU schedule replay in tests/pallas_kernels/test_based_hopper_chunked_bwd.py both call them.

Two kernels, each a CTA per (batch, head, value block of Dc = 64 columns), hopper_chunked's warp specialisation
(a TMA producer, wg 2, and two consumers that own the state pieces OWNED[w] in float32 wgmma accumulators):
  dq   forward order: recomputes S_n, z_n from the initial state (the forward's update step), consumer w
       computes dq of its 64 query rows from the step's keys (key halves h <= w) and the 16-bit state copy.
  dkv  reverse order: carries G and gz (the dq kernel's S and z roles), consumer w computes dk, dv of its 64 key
       rows from the step's queries (query halves h >= w), then adds phi(Q)ᵀ·dn and phi(Q)ᵀ·dd to its pieces.
Intra-step products run per half (64 x 64 tiles): the causal structure leaves consumer 1 of dq and consumer 0 of
dkv one unmasked half more, and the [64, 64] float32 tiles keep the state accumulators in registers.
dq and dk leave each value block as float32 partials [B, H, D/Dc, T, F] that XLA sums; dd's terms (in dA and
through z, gz) count in value block 0 only. gz accumulates phi(Q)ᵀ·dd through a wgmma against dd split into 16-bit high and low
columns (hopper_chunked's trick for z), so it keeps about float32 accuracy.

Not done: the sequence split (one CTA walks the whole sequence; small batch·heads leave SMs idle), the register
budget of consumer 0 (three pieces of G in registers plus the dk/dv tiles) is unmeasured, no timing.

Letters: B batch, T length (padded to whole steps), H heads, F = 16, D value dim, Dc = 64, C = 128 tokens per step,
X = 320 expanded features.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.based import hopper_chunked
# The forward's layout (step, value block, state pieces, which consumer owns which): one definition for both.
from pallas_kernels.based.hopper_chunked import (BLOCK_D, EXPAND_B, FEATURES, ORDER01, OWNED, PIECE, PIECES, STEP,
                                                 Z_COLS)
from pallas_kernels.based.reference import taylor_scales
from pallas_kernels.common import mosaic
from pallas_kernels.common.layout import round_up

_HALF = mosaic.WG_ROWS  # rows per consumer and per intra-step tile
_SCALE = 1.0 / math.sqrt(FEATURES)
_C1, _C2 = taylor_scales(FEATURES)


# ------------------------------------------------------------------------ per-step math (kernels and replay)


def score_weights(s):
  """The intra-step weights 1 + s + s²/2 of scaled scores s = q·k/√F (unmasked)."""
  return 1.0 + s + 0.5 * s * s


def score_grad(s, da):
  """dL/d(q·k) from dL/da at scaled scores s (unmasked)."""
  return da * (1.0 + s) * _SCALE


def feature_piece(repeated, tiled, col, p: int):
  """Piece p of phi(x) [rows, 64] from repeated = x·E_p and tiled = x·E_b; col: the tile's column index."""
  if p != ORDER01:
    return _C2 * repeated * tiled
  return jnp.where(col == FEATURES, 1.0, _C1 * repeated)


def feature_piece_grad(dphi, repeated, tiled, p: int):
  """(u, w) with d<phi_p(x), dphi>/dx = u·E_pᵀ + w·E_bᵀ; w is None for the order-0/1 piece (E_4ᵀ has no row for
  the constant column, so u needs no mask)."""
  if p == ORDER01:
    return _C1 * dphi, None
  return _C2 * dphi * tiled, _C2 * dphi * repeated


def transposed_expansions(dtype) -> np.ndarray:
  """[5 + 1, 64, F]: E_0ᵀ .. E_4ᵀ, E_bᵀ (the B operands that map a piece's cotangent back to x)."""
  return np.swapaxes(hopper_chunked.expansion_matrices(np.float32), 1, 2).astype(dtype)


def dd_columns(dd, dtype):
  """dd [..., T] float32 as [..., T, 16] 16-bit: column 0 its rounding, column 1 the rest, zeros (a wgmma B
  operand that sums phi(Q)ᵀ·dd to about float32 accuracy)."""
  high = dd.astype(dtype)
  low = (dd - high.astype(jnp.float32)).astype(dtype)
  zeros = jnp.zeros((*dd.shape, Z_COLS - 2), dtype)
  return jnp.concatenate([high[..., None], low[..., None], zeros], axis=-1)


def output_cotangents(y_BTHD, den_BTH, dy_BTHD, *, normalize: bool, eps: float):
  """(dn [B, T, H, D], dd [B, T, H]) float32: the cotangents of the numerator and the normaliser of y."""
  dy = dy_BTHD.astype(jnp.float32)
  if not normalize:
    return dy, jnp.zeros(den_BTH.shape, jnp.float32)
  inv_BTH = 1.0 / (den_BTH + eps)
  return dy * inv_BTH[..., None], -jnp.sum(dy * y_BTHD.astype(jnp.float32), axis=-1) * inv_BTH


# ---------------------------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class _Plan:
  dtype: Any
  heads: int
  num_steps: int
  value_blocks: int
  stages: int


def _rows(h: int):
  return pl.ds(h * _HALF, _HALF)


def _product(a, b, n: int):
  """a·b into a fresh [64, n] float32 accumulator, waited for and loaded (wgmma layout)."""
  def run(acc):
    plgpu.wgmma(acc, a, b)
    return plgpu.wgmma_accumulator_load(acc)
  return pl.run_scoped(run, plgpu.ACC((_HALF, n), jnp.float32))


def _t(ref):
  return plgpu.transpose_ref(ref, (1, 0))


def _iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _phi(x_rows, p: int, sh):
  """Piece p of phi for 64 rows x [64, F] in shared memory, float32, with its two expansions."""
  repeated = _product(x_rows, sh.expand.at[p], PIECE)
  tiled = _product(x_rows, sh.expand.at[EXPAND_B], PIECE)
  return feature_piece(repeated, tiled, _iota(repeated.shape, 1), p), repeated, tiled


def _jacobian_into(acc, dphi, repeated, tiled, p: int, sh, dtype):
  """acc += d<phi_p(x), dphi>/dx (two wgmmas against the transposed expansions)."""
  u, w = feature_piece_grad(dphi, repeated, tiled, p)
  plgpu.wgmma(acc, u.astype(dtype), sh.expand_t.at[p])
  if w is not None:
    plgpu.wgmma(acc, w.astype(dtype), sh.expand_t.at[EXPAND_B])


def _z_column(z_acc):
  """The z vector [64] of a [64, 16] accumulator: column 0 plus column 1 (the low part; zero where unused)."""
  col = _iota(z_acc.shape, 1)
  return jnp.sum(jnp.where(col < 2, z_acc, 0.0), axis=1)


class _Shared(NamedTuple):
  q: Any  # [stages, C, F]
  k: Any
  v: Any  # [stages, C, Dc]
  dn: Any
  dd: Any  # [stages, C] float32
  dd_cols: Any  # [stages, C, 16] (dkv only): dd_columns
  expand: Any  # [6, F, 64]
  expand_t: Any  # [6, 64, F]
  ones: Any  # [C, 16] (dq only): sums phi(K) over tokens into z, column 0 used
  union: Any  # phi of one piece per consumer [2, C, 64]; (dkv) float32 staging of G and gz after the loop
  state: Any  # [5, 64, Dc] 16-bit copy of S (dq) or G (dkv)
  z: Any  # [5, 64] float32 copy of z (dq) or gz (dkv)
  grad_f: Any  # [2, 64, F] float32 staging of dq or dk per consumer
  grad_v: Any  # [2, 64, Dc] staging of dv (dkv only)
  expand_ready: Any  # [2]: E, Eᵀ
  ready: Any  # tuple of [stages] barriers, one per stream
  free: Any  # [stages], 2 arrivals
  read: Any  # 2 arrivals: both consumers read this step's shared state copy
  written: Any  # 2 arrivals: both consumers published their pieces


def _shared_types(plan: _Plan, dkv: bool) -> _Shared:
  # Every tile the products pair (V and dn, dn and the state copy, phi and dn / V / ones / dd_cols) takes the
  # 32-byte swizzle of the 16-wide tiles: wgmma wants both shared operands of a product in one swizzle.
  narrow, wide = mosaic.swizzled(32), mosaic.swizzled(128)
  stages, dt = plan.stages, plan.dtype
  tile = lambda *shape: plgpu.SMEM(shape, dt, transforms=narrow)
  staging = (plgpu.SMEM((mosaic.CONSUMERS, PIECE, BLOCK_D), jnp.float32),
             plgpu.SMEM((mosaic.CONSUMERS, PIECE), jnp.float32))
  streams = 6 if dkv else 5
  return _Shared(
      q=tile(stages, STEP, FEATURES), k=tile(stages, STEP, FEATURES), v=tile(stages, STEP, BLOCK_D),
      dn=tile(stages, STEP, BLOCK_D), dd=plgpu.SMEM((stages, STEP), jnp.float32),
      dd_cols=tile(stages, STEP, Z_COLS) if dkv else None,
      expand=tile(PIECES + 1, FEATURES, PIECE), expand_t=tile(PIECES + 1, PIECE, FEATURES),
      ones=None if dkv else tile(STEP, Z_COLS),
      union=mosaic.ref_union(tile(mosaic.CONSUMERS, STEP, PIECE), staging) if dkv else tile(
          mosaic.CONSUMERS, STEP, PIECE),
      state=tile(PIECES, PIECE, BLOCK_D), z=plgpu.SMEM((PIECES, PIECE), jnp.float32),
      grad_f=plgpu.SMEM((mosaic.CONSUMERS, _HALF, FEATURES), jnp.float32),
      grad_v=plgpu.SMEM((mosaic.CONSUMERS, _HALF, BLOCK_D), dt, transforms=wide) if dkv else None,
      expand_ready=plgpu.Barrier(num_barriers=2),
      ready=tuple(plgpu.Barrier(num_barriers=stages) for _ in range(streams)),
      free=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=stages),
      read=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=1),
      written=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=1))


def _produce(plan: _Plan, cta: hopper_chunked.Cta, sh: _Shared, expand_ref, expand_t_ref, refs, reverse: bool):
  """E, Eᵀ once; then q, k, v, dn, dd (and dd_cols) of every step, in reverse order for the dkv kernel."""
  plgpu.copy_gmem_to_smem(expand_ref, sh.expand, sh.expand_ready.at[0])
  plgpu.copy_gmem_to_smem(expand_t_ref, sh.expand_t, sh.expand_ready.at[1])
  start = (lambda j: (plan.num_steps - 1 - j) * STEP) if reverse else (lambda j: j * STEP)
  b, h = cta.batch, cta.head
  q_ref, k_ref, v_ref, dn_ref, dd_ref, *dd_cols_ref = refs
  sources = [lambda j, r=r: r.at[b, pl.ds(start(j), STEP), h] for r in (q_ref, k_ref)]
  sources += [lambda j, r=r: r.at[b, pl.ds(start(j), STEP), h, cta.cols] for r in (v_ref, dn_ref)]
  sources += [lambda j: dd_ref.at[b, h, pl.ds(start(j), STEP)]]
  sources += [lambda j, r=r: r.at[b, h, pl.ds(start(j), STEP)] for r in dd_cols_ref]
  slots = (sh.q, sh.k, sh.v, sh.dn, sh.dd, sh.dd_cols)
  streams = [mosaic.Stream(src, slot, ready) for src, slot, ready in zip(sources, slots, sh.ready)]
  mosaic.produce_ring(0, plan.num_steps, plan.stages, [(sh.free, streams)])


def _consumer(plan: _Plan, cta: hopper_chunked.Cta, w: int, s_in_ref, z_in_ref, out_refs, sh: _Shared, dkv: bool):
  """Consumer w (static) of either kernel: carries its pieces of S, z (dq) or G, gz (dkv) and walks the steps."""
  pieces = OWNED[w]
  wgmma_layout = plgpu.Layout.WGMMA
  b, h = cta.batch, cta.head
  first = (cta.block == 0).astype(jnp.float32)  # dd's terms count in value block 0 only

  def run(*accs):
    s_accs, z_accs = accs[:len(pieces)], accs[len(pieces):]
    if not dkv and w == 0:
      sh.ones[...] = plgpu.layout_cast(jnp.ones((STEP, Z_COLS), plan.dtype), wgmma_layout)
    for p, s_acc, z_acc in zip(pieces, s_accs, z_accs):
      s = plgpu.load(s_in_ref.at[b, h, p, :, cta.cols], (), layout=wgmma_layout, optimized=False)
      z = plgpu.load(z_in_ref.at[b, h, p], (), layout=wgmma_layout.reduce(1), optimized=False)
      s_acc[...] = s
      z_acc[...] = jnp.where(_iota((PIECE, Z_COLS), 1) == 0, mosaic.rows(z, (PIECE, Z_COLS)), 0.0)
      sh.state.at[p][...] = s.astype(plan.dtype)
      sh.z.at[p][...] = z
    plgpu.commit_smem()
    plgpu.barrier_wait(sh.expand_ready.at[0])
    plgpu.barrier_wait(sh.expand_ready.at[1])
    mosaic.sync(sh.written.at[0])
    phi_buffer = sh.union[0].at[w] if dkv else sh.union.at[w]

    def step(j, carry):
      slot = lax.rem(j, plan.stages)
      for ready in sh.ready:
        plgpu.barrier_wait(ready.at[slot])
      start = ((plan.num_steps - 1 - j) if dkv else j) * STEP + w * _HALF
      if dkv:
        dk, dv = _dkv_rows(plan, w, slot, sh, first)
      else:
        dq = _dq_rows(plan, w, slot, sh, first)
      plgpu.barrier_arrive(sh.read.at[0])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous step's staging is read
      sh.grad_f.at[w][...] = dk if dkv else dq
      if dkv:
        sh.grad_v.at[w][...] = dv.astype(plan.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(sh.grad_f.at[w], out_refs[0].at[b, h, cta.block, pl.ds(start, _HALF)])
      if dkv:
        plgpu.copy_smem_to_gmem(sh.grad_v.at[w], out_refs[1].at[b, pl.ds(start, _HALF), h, cta.cols])
      # The carried pieces: S += phi(K)ᵀ·V, z += phi(K)ᵀ·1 (dq); G += phi(Q)ᵀ·dn, gz += phi(Q)ᵀ·dd (dkv).
      x_tile, b_tile, z_tile = (sh.q, sh.dn, sh.dd_cols) if dkv else (sh.k, sh.v, None)
      for p, s_acc, z_acc in zip(pieces, s_accs, z_accs):
        for half in range(STEP // _HALF):
          phi, _, _ = _phi(x_tile.at[slot, _rows(half)], p, sh)
          phi_buffer.at[_rows(half)][...] = phi.astype(plan.dtype)
        plgpu.commit_smem()
        phi_t = _t(phi_buffer)
        plgpu.wgmma(s_acc, phi_t, b_tile.at[slot])
        plgpu.wgmma(z_acc, phi_t, z_tile.at[slot] if dkv else sh.ones)
        plgpu.wgmma_wait(0)  # the buffer takes the next piece
      plgpu.barrier_arrive(sh.free.at[slot])
      # Publish once both consumers have read the old copies.
      plgpu.barrier_wait(sh.read.at[0])
      for p, s_acc, z_acc in zip(pieces, s_accs, z_accs):
        sh.state.at[p][...] = s_acc[...].astype(plan.dtype)
        sh.z.at[p][...] = _z_column(z_acc[...]) if dkv else jnp.sum(
            jnp.where(_iota(z_acc.shape, 1) == 0, z_acc[...], 0.0), axis=1)
      plgpu.commit_smem()
      mosaic.sync(sh.written.at[0])
      return carry

    lax.fori_loop(0, plan.num_steps, step, None)
    if dkv:  # G and gz are the initial state's gradient; staging reuses phi's memory (past the last `written`)
      s_staging, z_staging = sh.union[1]
      for i, (p, s_acc, z_acc) in enumerate(zip(pieces, s_accs, z_accs)):
        if i:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        s_staging.at[w][...] = s_acc[...]
        z_staging.at[w][...] = _z_column(z_acc[...])
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s_staging.at[w], out_refs[2].at[b, h, p, :, cta.cols])
        plgpu.copy_smem_to_gmem(z_staging.at[w], out_refs[3].at[b, h, cta.block, p])
    plgpu.wait_smem_to_gmem(0)

  accs = [plgpu.ACC((PIECE, BLOCK_D), jnp.float32) for _ in pieces]
  accs += [plgpu.ACC((PIECE, Z_COLS), jnp.float32) for _ in pieces]
  pl.run_scoped(run, *accs)


def _dq_rows(plan: _Plan, w: int, slot, sh: _Shared, first):
  """dq [64, F] float32 of consumer w's query rows of the step (this value block's share)."""
  q_w, dn_w = sh.q.at[slot, _rows(w)], sh.dn.at[slot, _rows(w)]
  dd_w = plgpu.load(sh.dd.at[slot, _rows(w)], (), layout=plgpu.Layout.WGMMA.reduce(1)) * first
  tile = (_HALF, _HALF)

  def run(dq_acc):
    for h in range(w + 1):  # key halves these queries see; h == w is the diagonal
      k_h = sh.k.at[slot, _rows(h)]
      s = _product(q_w, _t(k_h), _HALF) * _SCALE
      da = _product(dn_w, _t(sh.v.at[slot, _rows(h)]), _HALF) + mosaic.rows(dd_w, tile)
      ds = score_grad(s, da)
      if h == w:
        ds = jnp.where(_iota(tile, 1) <= _iota(tile, 0), ds, 0.0)
      plgpu.wgmma(dq_acc, ds.astype(plan.dtype), k_h)
    for p in range(PIECES):
      z = plgpu.load(sh.z.at[p], (), layout=plgpu.Layout.WGMMA.reduce(0))
      dphi = _product(dn_w, _t(sh.state.at[p]), PIECE) + mosaic.rows(dd_w, tile) * mosaic.cols(z, tile)
      _, repeated, tiled = _phi(q_w, p, sh)
      _jacobian_into(dq_acc, dphi, repeated, tiled, p, sh, plan.dtype)
    return plgpu.wgmma_accumulator_load(dq_acc)

  return pl.run_scoped(run, plgpu.ACC((_HALF, FEATURES), jnp.float32))


def _dkv_rows(plan: _Plan, w: int, slot, sh: _Shared, first):
  """(dk [64, F] float32 share, dv [64, Dc] float32) of consumer w's key rows of the step."""
  k_w, v_w = sh.k.at[slot, _rows(w)], sh.v.at[slot, _rows(w)]
  tile = (_HALF, _HALF)

  def run(dk_acc, dv_acc):
    for h in range(w, STEP // _HALF):  # query halves that see these keys; h == w is the diagonal
      q_h, dn_h = sh.q.at[slot, _rows(h)], sh.dn.at[slot, _rows(h)]
      dd_h = plgpu.load(sh.dd.at[slot, _rows(h)], (), layout=plgpu.Layout.WGMMA.reduce(0)) * first
      s = _product(k_w, _t(q_h), _HALF) * _SCALE  # sᵀ: keys on rows
      da = _product(v_w, _t(dn_h), _HALF) + mosaic.cols(dd_h, tile)
      a, ds = score_weights(s), score_grad(s, da)
      if h == w:
        visible = _iota(tile, 0) <= _iota(tile, 1)
        a, ds = jnp.where(visible, a, 0.0), jnp.where(visible, ds, 0.0)
      plgpu.wgmma(dv_acc, a.astype(plan.dtype), dn_h)
      plgpu.wgmma(dk_acc, ds.astype(plan.dtype), q_h)
    for p in range(PIECES):
      phi, repeated, tiled = _phi(k_w, p, sh)
      plgpu.wgmma(dv_acc, phi.astype(plan.dtype), sh.state.at[p])
      gz = plgpu.load(sh.z.at[p], (), layout=plgpu.Layout.WGMMA.reduce(0)) * first
      dphi = _product(v_w, _t(sh.state.at[p]), PIECE) + mosaic.cols(gz, tile)
      _jacobian_into(dk_acc, dphi, repeated, tiled, p, sh, plan.dtype)
    return plgpu.wgmma_accumulator_load(dk_acc), plgpu.wgmma_accumulator_load(dv_acc)

  return pl.run_scoped(run, plgpu.ACC((_HALF, FEATURES), jnp.float32),
                       plgpu.ACC((_HALF, BLOCK_D), jnp.float32))


def _kernel(*refs, plan: _Plan, dkv: bool):
  """refs: q, k, v, dn, dd, (dd_cols), expand, expand_t, s_in, z_in, outputs (dq | dk, dv, ds_in, dz_in), shared."""
  streams = 6 if dkv else 5
  inputs, (expand_ref, expand_t_ref, s_in_ref, z_in_ref) = refs[:streams], refs[streams:streams + 4]
  out_refs, sh = refs[streams + 4:-1], refs[-1]
  cta = hopper_chunked.Cta(lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("value_blocks"))
  mosaic.warp_specialized(
      functools.partial(_produce, plan, cta, sh, expand_ref, expand_t_ref, inputs, dkv),
      functools.partial(_consumer, plan, cta, s_in_ref=s_in_ref, z_in_ref=z_in_ref, out_refs=out_refs, sh=sh,
                        dkv=dkv), static_consumers=True)


def based_chunked_backward_hopper(q_BTHF, k_BTHF, v_BTHD, y_BTHD, den_BTH, dy_BTHD, d_s_final, d_z_final, *,
                                  s_initial, z_initial, normalize: bool, eps: float, num_stages: int = 2):
  """(dq, dk, dv, d s_initial, d z_initial) of hopper_chunked's forward from its output y and normaliser den
  [B, T, H]; states and their cotangents in its packed layout (s [B, H, 5, 64, D], z [B, H, 5, 64], float32)."""
  batch, length, heads, _ = q_BTHF.shape
  d, dtype = v_BTHD.shape[-1], jnp.dtype(q_BTHF.dtype)
  t_pad = round_up(length, STEP)
  plan = _Plan(dtype=dtype, heads=heads, num_steps=t_pad // STEP, value_blocks=d // BLOCK_D, stages=num_stages)
  dn, dd_BTH = output_cotangents(y_BTHD, den_BTH, dy_BTHD, normalize=normalize, eps=eps)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, t_pad - length)) + ((0, 0),) * (x.ndim - 2))
  q, k, v, dn = pad(q_BTHF), pad(k_BTHF), pad(v_BTHD.astype(dtype)), pad(dn).astype(dtype)
  dd_BHT = jnp.swapaxes(pad(dd_BTH), 1, 2)  # padded queries: dn = dd = 0, they add nothing
  expand = jnp.asarray(hopper_chunked.expansion_matrices(dtype))
  expand_t = jnp.asarray(transposed_expansions(dtype))
  grid = dict(value_blocks=plan.value_blocks, heads=heads, batch=batch)
  partial = jax.ShapeDtypeStruct((batch, heads, plan.value_blocks, t_pad, FEATURES), jnp.float32)
  s_in = s_initial.astype(jnp.float32)
  z_in = z_initial.astype(jnp.float32)
  dq = mosaic.launch(functools.partial(_kernel, plan=plan, dkv=False), q, k, v, dn, dd_BHT, expand, expand_t, s_in,
                     z_in, name="based_chunked_hopper_dq", out_type=partial, scratch=_shared_types(plan, False),
                     grid=grid, approx_math=False)
  states = (jax.ShapeDtypeStruct(s_in.shape, jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, plan.value_blocks, PIECES, PIECE), jnp.float32))
  dk, dv, ds_in, dz_in = mosaic.launch(
      functools.partial(_kernel, plan=plan, dkv=True), q, k, v, dn, dd_BHT, dd_columns(dd_BHT, dtype), expand,
      expand_t, d_s_final.astype(jnp.float32), d_z_final.astype(jnp.float32), name="based_chunked_hopper_dkv",
      out_type=(partial, jax.ShapeDtypeStruct(v.shape, dtype), *states), scratch=_shared_types(plan, True),
      grid=grid, approx_math=False)
  fold = lambda x: jnp.swapaxes(jnp.sum(x, axis=2), 1, 2)[:, :length].astype(dtype)
  return fold(dq), fold(dk), dv[:, :length], ds_in, dz_in[:, :, 0]
