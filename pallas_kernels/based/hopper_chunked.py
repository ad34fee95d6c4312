"""Chunked BASED forward for Hopper (sm90) in Mosaic GPU: TMA, wgmma and warp specialisation; the backward is the
portable kernel's (pallas.based_chunked_backward, fed this kernel's output and normaliser).

The math is reference.based_chunked's: phi(x) = [1, c1·x, c2·vec(x ⊗ x)] (c1 = F^-¼, c2 = 1/(√2·√F)), and per
step of C tokens the exact causal form 1 + s + s²/2 (s = q·k/√F) inside the step plus phi(q)·S and phi(q)·z of
the prefix state before it.

Letters: B batch, T length (padded to whole steps), H heads, F = 16 feature dim, D value dim, Dc = 64 value
columns per CTA, C = 128 tokens per step, X = 320 expanded-feature columns (5 pieces of 64).

Features. The 1 + F + F² = 273 Taylor features are laid out as X = 320 columns in 5 pieces of 64: piece p < 4
holds c2·x_i·x_j for leading features i in [4p, 4p + 4) (column 16·(i - 4p) + j), piece 4 holds c1·x_j in
columns 0..15, the constant 1 in column 16 (order 0: its state row is Σ v, its normaliser the token count) and
zeros. A piece is built on chip in wgmma layouts from two tiny wgmmas with constant 0/1 expansion matrices held in
shared memory (exact: each output is one product by 1): x·E_p repeats x_i along a piece's columns and x·E_b
tiles x_j, so piece p = c2·(x·E_p)⊙(x·E_b) in float32, rounded once to 16 bits as a wgmma operand (fla's and the
portable kernel's precision: float32 state, 16-bit products).

Schedule. A CTA owns one (batch, head, value block of Dc columns) and walks its T/C steps in order. Three
warpgroups:

  producer  (wg 2)     TMA-loads q, k [C, F] and v [C, Dc] of step n into ring slot n % num_stages (one
                       barrier each), refilling a slot once both consumers freed it.
  consumers (wg 0, 1)  consumer w owns the step's query rows [64w, 64w + 64) and the state pieces OWNED[w] (its
                       rows of S [X, Dc], float32 wgmma accumulators kept in registers for the whole loop).

Per step, consumer w:
  1. intra    A = mask(1 + s + s²/2) of its 64 queries against all C keys (one [64, C] wgmma); y = A·V,
              den = Σ A (row sums).
  2. readout  y += phi(q)·S and den += phi(q)·z for the state before the step: each piece of phi(q) is a 16-bit
              register operand against the state's 16-bit copy in shared memory (all 5 pieces, both consumers'
              rows) and against z's copy, split into a 16-bit high part and the rest (two columns summed in
              float32: z keeps about float32 accuracy).
  3. output   y / (den + eps) (or y) through shared memory by TMA, den too (the backward needs it).
  4. update   phi(k) of all C keys for its own pieces into shared memory, then S_p += phi(k)_pᵀ·V and
              z_p += phi(k)_pᵀ·1 (A is the transposed shared view; z's accumulator is [64, 16], every column the
              same: a wgmma sums over tokens, because Mosaic's cross-warp reductions share one scratch buffer
              per CTA and the two consumers would race on it); frees the ring slot.
  5. publish  once both consumers finished step 2 (barrier `read`), write its pieces of S and z (16-bit) into
              the shared copies; the barrier `written` orders that before either consumer's next readout.

Sequence pieces (BlockSizes.sequence_pieces, by shape by default): with fewer CTAs than SMs (long sequences at
small batch·heads) the sequence is cut into n pieces run as separate CTAs, each from the initial state plus the
states of the pieces before it: a states-only pass (step 4 alone) gives each piece's own state, XLA prefix-sums
them.

Padding: T is padded to whole steps (of every piece) with zeros. A zero key adds nothing but the order-0 count
(its phi is the constant feature alone, its value zero), and only after the last real token, which no real
query follows; the wrapper sets the final count to the real one.

Shared memory (bf16): ring 2 x C x (2F + Dc) = 48 KiB, expansion 12 KiB, phi(k) C x X = 80 KiB (reused for the
final state's float32 staging), the state copy X x Dc = 40 KiB, z's copy 10 KiB, output staging 16 KiB: 215 KiB
of the 227 KiB a block may use, so one CTA per SM. Tiles of 16-element rows take the 32-byte swizzle, and so do
phi(k) and V, which meet them in one wgmma (its shared operands share a swizzle); the state copy and the output
take the 128-byte one.
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

from pallas_kernels.based import pallas as portable
from pallas_kernels.based import sequence_split
from pallas_kernels.based.reference import taylor_scales
# This kernel carries the full order-2 layout; api.py converts the symmetric BasedState at its boundary.
from pallas_kernels.based.symmetric import BasedFullState as BasedState
from pallas_kernels.common import mosaic
from pallas_kernels.common.dispatch import first_reason, require
from pallas_kernels.common.layout import round_up

FEATURES = 16  # F: the kernel's only feature dim (Based's)
STEP = mosaic.CTA_ROWS  # C: tokens per step, WG_ROWS = 64 query rows per consumer
BLOCK_D = 64  # Dc: value columns per CTA
PIECE = 64  # expanded features per piece
PIECES = 5  # 4 order-2 pieces and the order-0/1 piece
ORDER01 = 4  # index of the order-0/1 piece
EXPAND_B = PIECES  # index of E_b among the expansion matrices (E_0..E_4 come first)
OWNED = ((0, 1, ORDER01), (2, 3))  # state pieces of consumer 0 and 1
_VALUE_DIMS = (64, 128)


# A CTA walks its sequence in order; with fewer CTAs than SMs (long sequences at small batch·heads) the sequence
# is split into pieces of at least MIN_PIECE_STEPS steps (sequence_split.py), so that up to _SMS CTAs run side by side.
# On the H100 (H16 D64 bf16, forward) B2 T16384 took 1.73 ms in one piece and 0.97 ms in the 4 picked by shape,
# B1 T65536 6.51 ms and 1.78 ms in 8.
_SMS = 132  # H100 SXM
_MIN_CTAS = 128  # one wave on the H100's 132 SMs (one CTA per SM: shared memory)
MIN_PIECE_STEPS = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  num_stages: int = 2  # depth of the q/k/v ring (2 fits the shared-memory budget with phi(k) and the state)
  sequence_pieces: int | None = None  # None: by shape (sequence_pieces)
  backward: portable.BlockSizes | None = None  # the portable backward's (None: its defaults for the shape)
  # "portable": pallas.based_chunked_backward (Triton on GPU); "hopper": hopper_chunked_bwd's Mosaic GPU kernels,
  # by name only (lowered on CPU, never run on a GPU: auto keeps the default).
  backward_kernel: str = "portable"


def sequence_pieces(*, ctas: int, num_steps: int) -> int:
  """The most pieces (a power of two) that keep the CTAs within one wave and each piece MIN_PIECE_STEPS long."""
  return sequence_split.piece_count(programs=ctas, steps=num_steps, max_programs=_SMS, min_steps=MIN_PIECE_STEPS)


def _pieces_by_shape(*, batch: int, length: int, heads: int, value_dim: int) -> tuple[int, int]:
  """(CTAs of the unsplit call, the sequence pieces sequence_pieces picks for it)."""
  ctas = batch * heads * (value_dim // BLOCK_D)
  return ctas, sequence_pieces(ctas=ctas, num_steps=-(-length // STEP))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static facts of one call."""
  dtype: Any
  heads: int
  num_steps: int  # T_pad / C
  value_blocks: int  # D / Dc
  normalize: bool
  eps: float
  has_initial: bool
  stages: int
  states_only: bool = False  # the final state alone: no q, no outputs (a sequence piece's state for later pieces)

  @property
  def c1(self) -> float:
    return taylor_scales(FEATURES)[0]

  @property
  def c2(self) -> float:
    return taylor_scales(FEATURES)[1]


def expansion_matrices(dtype) -> np.ndarray:
  """[5 + 1, F, 64] 0/1 matrices: x·E_p repeats x_i (i in [4p, 4p + 4)) along piece p's columns for p < 4,
  x·E_4 is x in columns 0..15, x·E_b (the last) tiles x_j across every group of 16 columns."""
  f, group = FEATURES, PIECE // FEATURES
  e = np.zeros((PIECES + 1, f, PIECE), np.float32)
  col = np.arange(PIECE)
  for p in range(PIECES - 1):
    e[p, p * group + col // f, col] = 1.0
  e[ORDER01, np.arange(f), np.arange(f)] = 1.0
  e[EXPAND_B, col % f, col] = 1.0
  return e.astype(dtype)


class _Shared(NamedTuple):
  q: Any  # [stages, C, F]
  k: Any  # [stages, C, F]
  v: Any  # [stages, C, Dc]
  expand: Any  # [5 + 1, F, 64]: E_0..E_4, E_b
  ones: Any  # [C, 16]: the B operand that sums phi(k) over the step's tokens into z
  union: Any  # phi(k) [5, C, 64] during the loop; float32 staging of the final S and z after it
  state: Any  # [5, 64, Dc] 16-bit copy of S, the readout's B operand
  z: Any  # [5, 64, 16] 16-bit copy of z: column 0 its high part, column 1 the rest (z_hi + z_lo ~ float32)
  out: Any  # [2, 64, Dc] output staging per consumer
  den: Any  # [2, 64] float32 normaliser staging per consumer
  expand_ready: Any
  q_ready: Any  # [stages]
  k_ready: Any
  v_ready: Any
  free: Any  # [stages], 2 arrivals: both consumers are done with the slot
  read: Any  # 2 arrivals: both consumers finished this step's readout of the shared state
  written: Any  # 2 arrivals: both consumers published their pieces of the state


Z_COLS = 16  # the narrowest wgmma N the 32-byte swizzle allows; z needs one column (two with its low part)


def _shared_types(plan: _Plan) -> _Shared:
  # 16-element rows (q, k, the expansion and ones tiles) take the 32-byte swizzle; wgmma wants one swizzle for
  # both shared operands, so phi(k), which meets the ones tile, and V, which meets phi(k), take it too.
  narrow, wide = mosaic.swizzled(32), mosaic.swizzled(128)
  stages, dt = plan.stages, plan.dtype
  return _Shared(
      q=plgpu.SMEM((stages, STEP, FEATURES), dt, transforms=narrow),
      k=plgpu.SMEM((stages, STEP, FEATURES), dt, transforms=narrow),
      v=plgpu.SMEM((stages, STEP, BLOCK_D), dt, transforms=narrow),
      expand=plgpu.SMEM((PIECES + 1, FEATURES, PIECE), dt, transforms=narrow),
      ones=plgpu.SMEM((STEP, Z_COLS), dt, transforms=narrow),
      union=mosaic.ref_union(plgpu.SMEM((PIECES, STEP, PIECE), dt, transforms=narrow),
                             (plgpu.SMEM((mosaic.CONSUMERS, PIECE, BLOCK_D), jnp.float32),
                              plgpu.SMEM((mosaic.CONSUMERS, PIECE, Z_COLS), jnp.float32))),
      state=plgpu.SMEM((PIECES, PIECE, BLOCK_D), dt, transforms=wide),
      z=plgpu.SMEM((PIECES, PIECE, Z_COLS), dt, transforms=narrow),
      out=plgpu.SMEM((mosaic.CONSUMERS, mosaic.WG_ROWS, BLOCK_D), dt, transforms=wide),
      den=plgpu.SMEM((mosaic.CONSUMERS, mosaic.WG_ROWS), jnp.float32),
      expand_ready=plgpu.Barrier(num_barriers=1),
      q_ready=plgpu.Barrier(num_barriers=stages),
      k_ready=plgpu.Barrier(num_barriers=stages),
      v_ready=plgpu.Barrier(num_barriers=stages),
      free=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=stages),
      read=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=1),
      written=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=1))


class Cta(NamedTuple):
  """Which (batch row, head, value block) a CTA owns; the backward's kernels (hopper_chunked_bwd) share it."""
  batch: Any
  head: Any
  block: Any  # value block

  @property
  def cols(self):
    return pl.ds(self.block * BLOCK_D, BLOCK_D)


def _producer(plan: _Plan, cta: Cta, q_ref, k_ref, v_ref, sh: _Shared):
  """Streams q, k, v of steps 0 .. num_steps-1 through the ring (k and v alone for the states-only pass)."""
  tokens = lambda ref, *cols: lambda n: ref.at[cta.batch, pl.ds(n * STEP, STEP), cta.head, *cols]
  streams = [] if plan.states_only else [mosaic.Stream(tokens(q_ref), sh.q, sh.q_ready)]
  streams += [mosaic.Stream(tokens(k_ref), sh.k, sh.k_ready), mosaic.Stream(tokens(v_ref, cta.cols), sh.v, sh.v_ready)]
  mosaic.produce_ring(0, plan.num_steps, plan.stages, [(sh.free, streams)])


def _expanded(x_ref, e_ref):
  """x·E for x [64, F] and E [F, 64] in shared memory: [64, 64] float32 in the wgmma layout."""
  def run(acc):
    plgpu.wgmma(acc, x_ref, e_ref)
    return plgpu.wgmma_accumulator_load(acc)
  return pl.run_scoped(run, plgpu.ACC((mosaic.WG_ROWS, PIECE), jnp.float32))


def _feature_piece(plan: _Plan, x_ref, p: int, tiled, sh: _Shared):
  """Piece p of phi(x) for 64 rows x [64, F] (tiled = x·E_b, shared by the order-2 pieces), float32 [64, 64]."""
  repeated = _expanded(x_ref, sh.expand.at[p])
  if p != ORDER01:
    return plan.c2 * repeated * tiled
  col = plgpu.broadcasted_iota(jnp.int32, repeated.shape, 1, layout=plgpu.Layout.WGMMA)
  return jnp.where(col == FEATURES, 1.0, plan.c1 * repeated)


def _split_z(z, dtype):
  """A [64, 16] float32 z tile (each row one feature's z, repeated) as 16 bits: column 0 the rounded z, column 1
  the rounding error, so that the readout's wgmma sums z to about float32 accuracy."""
  col = plgpu.broadcasted_iota(jnp.int32, z.shape, 1, layout=plgpu.Layout.WGMMA)
  high = z.astype(dtype)
  low = (z - high.astype(jnp.float32)).astype(dtype)
  zero = jnp.zeros_like(high)
  return jnp.where(col == 0, high, jnp.where(col == 1, low, zero))


def _consumer(plan: _Plan, cta: Cta, w: int, s_in_ref, z_in_ref, o_ref, den_ref, s_out_ref, z_out_ref,
              sh: _Shared):
  """Consumer w (static): its 64 query rows of every step and its state pieces OWNED[w]."""
  pieces = OWNED[w]
  phik, (s_staging, z_staging) = sh.union
  wgmma_layout = plgpu.Layout.WGMMA
  batch, head = cta.batch, cta.head

  def run(*accs):
    # S_p [64, Dc] and z_p [64, 16] (every column the same: phi(k)ᵀ·ones) of the owned pieces, float32.
    s_accs, z_accs = accs[:len(pieces)], accs[len(pieces):]
    if w == 0:
      sh.ones[...] = plgpu.layout_cast(jnp.ones((STEP, Z_COLS), plan.dtype), wgmma_layout)
    for p, s_acc, z_acc in zip(pieces, s_accs, z_accs):
      if plan.has_initial:
        s = plgpu.load(s_in_ref.at[batch, head, p, :, cta.cols], (), layout=wgmma_layout, optimized=False)
        z = plgpu.load(z_in_ref.at[batch, head, p], (), layout=wgmma_layout.reduce(1), optimized=False)
        z = mosaic.rows(z, (PIECE, Z_COLS))
        s_acc[...] = s
        z_acc[...] = z
      else:
        s = plgpu.layout_cast(jnp.zeros((PIECE, BLOCK_D), jnp.float32), wgmma_layout)
        z = plgpu.layout_cast(jnp.zeros((PIECE, Z_COLS), jnp.float32), wgmma_layout)
      sh.state.at[p][...] = s.astype(plan.dtype)
      sh.z.at[p][...] = _split_z(z, plan.dtype)
    plgpu.commit_smem()
    plgpu.barrier_wait(sh.expand_ready.at[0])
    mosaic.sync(sh.written.at[0])

    def step(n, carry):
      slot = lax.rem(n, plan.stages)
      v_tile = sh.v.at[slot]
      plgpu.barrier_wait(sh.k_ready.at[slot])
      plgpu.barrier_wait(sh.v_ready.at[slot])
      if not plan.states_only:
        plgpu.barrier_wait(sh.q_ready.at[slot])
        intra_and_readout(n, slot, v_tile)
      update(slot, v_tile)
      if not plan.states_only:
        publish()
      return carry

    def intra_and_readout(n, slot, v_tile):
      q_rows = sh.q.at[slot, pl.ds(w * mosaic.WG_ROWS, mosaic.WG_ROWS)]

      # 1. intra: scores of the 64 queries against the step's C keys.
      def scores(acc):
        plgpu.wgmma(acc, q_rows, plgpu.transpose_ref(sh.k.at[slot], (1, 0)))
        return plgpu.wgmma_accumulator_load(acc)
      s = pl.run_scoped(scores, plgpu.ACC((mosaic.WG_ROWS, STEP), jnp.float32)) * (1.0 / math.sqrt(FEATURES))
      row = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=wgmma_layout) + w * mosaic.WG_ROWS
      col = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=wgmma_layout)
      a = jnp.where(col <= row, 1.0 + s + 0.5 * s * s, 0.0)

      # 2. readout of the state before the step, piece by piece; the normaliser's through z's two columns.
      def readout(y_acc, den_acc):
        plgpu.wgmma(y_acc, a.astype(plan.dtype), v_tile)
        tiled = _expanded(q_rows, sh.expand.at[EXPAND_B])
        for p in range(PIECES):
          phi = _feature_piece(plan, q_rows, p, tiled, sh).astype(plan.dtype)
          plgpu.wgmma(y_acc, phi, sh.state.at[p])
          if plan.normalize:
            plgpu.wgmma(den_acc, phi, sh.z.at[p])
        y = plgpu.wgmma_accumulator_load(y_acc)
        if not plan.normalize:
          return y, None
        den_cols = den_acc[...]
        z_col = plgpu.broadcasted_iota(jnp.int32, den_cols.shape, 1, layout=wgmma_layout)
        return y, jnp.sum(a, axis=1) + jnp.sum(jnp.where(z_col < 2, den_cols, 0.0), axis=1)

      y, den = pl.run_scoped(readout, plgpu.ACC((mosaic.WG_ROWS, BLOCK_D), jnp.float32),
                             plgpu.ACC((mosaic.WG_ROWS, Z_COLS), jnp.float32))
      plgpu.barrier_arrive(sh.read.at[0])

      # 3. output (and den) through shared memory; the previous step's copies must have read their staging.
      start = n * STEP + w * mosaic.WG_ROWS
      if plan.normalize:
        y = y * mosaic.rows(1.0 / (den + plan.eps), y.shape)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      sh.out.at[w][...] = y.astype(plan.dtype)
      if plan.normalize:
        sh.den.at[w][...] = den
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(sh.out.at[w], o_ref.at[batch, pl.ds(start, mosaic.WG_ROWS), head, cta.cols])
      if plan.normalize:
        plgpu.copy_smem_to_gmem(sh.den.at[w], den_ref.at[batch, head, cta.block, pl.ds(start, mosaic.WG_ROWS)])

    def update(slot, v_tile):
      # 4. phi(k) of the C keys for the owned pieces, then S_p += phi(k)_pᵀ·V and z_p += phi(k)_pᵀ·1.
      for half in range(STEP // mosaic.WG_ROWS):
        rows = pl.ds(half * mosaic.WG_ROWS, mosaic.WG_ROWS)
        k_rows = sh.k.at[slot, rows]
        tiled = _expanded(k_rows, sh.expand.at[EXPAND_B])
        for p in pieces:
          phik.at[p, rows][...] = _feature_piece(plan, k_rows, p, tiled, sh).astype(plan.dtype)
      plgpu.commit_smem()
      for p, s_acc, z_acc in zip(pieces, s_accs, z_accs):
        phik_t = plgpu.transpose_ref(phik.at[p], (1, 0))
        plgpu.wgmma(s_acc, phik_t, v_tile)
        plgpu.wgmma(z_acc, phik_t, sh.ones)
      plgpu.wgmma_wait(0)
      plgpu.barrier_arrive(sh.free.at[slot])

    def publish():
      # 5. the new state into the shared copies, once both consumers have read the old ones.
      plgpu.barrier_wait(sh.read.at[0])
      for p, s_acc, z_acc in zip(pieces, s_accs, z_accs):
        sh.state.at[p][...] = s_acc[...].astype(plan.dtype)
        sh.z.at[p][...] = _split_z(z_acc[...], plan.dtype)
      plgpu.commit_smem()
      mosaic.sync(sh.written.at[0])

    lax.fori_loop(0, plan.num_steps, step, None)

    # The final state, float32, through staging that reuses phi(k)'s memory: both consumers must be past their
    # last update (the main pass's last `written` barrier orders that; the states-only pass syncs here).
    if plan.states_only:
      mosaic.sync(sh.written.at[0])
    for i, (p, s_acc, z_acc) in enumerate(zip(pieces, s_accs, z_accs)):
      if i:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      s_staging.at[w][...] = s_acc[...]
      z_staging.at[w][...] = z_acc[...]
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(s_staging.at[w], s_out_ref.at[batch, head, p, :, cta.cols])
      plgpu.copy_smem_to_gmem(z_staging.at[w], z_out_ref.at[batch, head, cta.block, p])
    plgpu.wait_smem_to_gmem(0)

  accs = [plgpu.ACC((PIECE, BLOCK_D), jnp.float32) for _ in pieces]
  accs += [plgpu.ACC((PIECE, Z_COLS), jnp.float32) for _ in pieces]
  pl.run_scoped(run, *accs)


def _kernel(q_ref, k_ref, v_ref, expand_ref, s_in_ref, z_in_ref, *refs, plan: _Plan):
  """refs: (o, den if not states_only), s_out, z_out, _Shared."""
  o_ref, den_ref = refs[:2] if not plan.states_only else (None, None)
  s_out_ref, z_out_ref, sh = refs[-3:]
  cta = Cta(lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("value_blocks"))

  def produce():
    plgpu.copy_gmem_to_smem(expand_ref, sh.expand, sh.expand_ready.at[0])
    _producer(plan, cta, q_ref, k_ref, v_ref, sh)

  # Static consumer indices: each consumer owns different state pieces (OWNED).
  mosaic.warp_specialized(produce, functools.partial(
      _consumer, plan, cta, s_in_ref=s_in_ref, z_in_ref=z_in_ref, o_ref=o_ref, den_ref=den_ref,
      s_out_ref=s_out_ref, z_out_ref=z_out_ref, sh=sh), static_consumers=True)


def _forward(plan: _Plan, q, k, v, s_in, z_in):
  """(y [B, T_pad, H, D], den [B, H, D/Dc, T_pad], s_final [B, H, 5, 64, D], z_final [B, H, D/Dc, 5, 64, 16])
  from padded q, k [B, T_pad, H, F], v [B, T_pad, H, D] and the packed initial state; (s_final, z_final) alone
  when plan.states_only."""
  batch, t_pad = q.shape[:2]
  d = v.shape[-1]
  expand = jnp.asarray(expansion_matrices(jnp.dtype(plan.dtype)))
  outputs = (jax.ShapeDtypeStruct(v.shape, v.dtype),
             jax.ShapeDtypeStruct((batch, plan.heads, plan.value_blocks, t_pad), jnp.float32))
  states = (jax.ShapeDtypeStruct((batch, plan.heads, PIECES, PIECE, d), jnp.float32),
            jax.ShapeDtypeStruct((batch, plan.heads, plan.value_blocks, PIECES, PIECE, Z_COLS), jnp.float32))
  # approx_math off: the kernel has always run with exact division (its GPU checks and timings are so).
  return mosaic.launch(
      functools.partial(_kernel, plan=plan), q, k, v, expand, s_in, z_in,
      name="based_chunked_hopper_states" if plan.states_only else "based_chunked_hopper_fwd",
      out_type=states if plan.states_only else outputs + states, scratch=_shared_types(plan),
      grid=dict(value_blocks=plan.value_blocks, heads=plan.heads, batch=batch), approx_math=False)


def _pack_state(state: BasedState):
  """BasedState -> (s [B, H, 5, 64, D], z [B, H, 5, 64]) in the kernel's feature order (module docstring)."""
  s0, s1, s2, z0, z1, z2 = state
  b, h, f, d = s1.shape
  spare = PIECE - f - 1
  s01 = jnp.concatenate([s1, s0[:, :, None], jnp.zeros((b, h, spare, d), s1.dtype)], axis=2)
  z01 = jnp.concatenate([z1, z0[:, :, None], jnp.zeros((b, h, spare), z1.dtype)], axis=2)
  s = jnp.concatenate([s2.reshape(b, h, f * f, d), s01], axis=2).reshape(b, h, PIECES, PIECE, d)
  z = jnp.concatenate([z2.reshape(b, h, f * f), z01], axis=2).reshape(b, h, PIECES, PIECE)
  return s.astype(jnp.float32), z.astype(jnp.float32)


def _unpack_state(s, z) -> BasedState:
  b, h, _, _, d = s.shape
  f = FEATURES
  s, z = s.reshape(b, h, PIECES * PIECE, d), z.reshape(b, h, PIECES * PIECE)
  order2 = f * f
  return BasedState(s0_BHD=s[:, :, order2 + f], s1_BHFD=s[:, :, order2:order2 + f],
                    s2_BHFFD=s[:, :, :order2].reshape(b, h, f, f, d), z0_BH=z[:, :, order2 + f],
                    z1_BHF=z[:, :, order2:order2 + f], z2_BHFF=z[:, :, :order2].reshape(b, h, f, f))


@dataclasses.dataclass(frozen=True)
class _Options:
  normalize: bool
  eps: float
  chunk: int  # the portable backward's chunk (the forward steps C tokens whatever it is)
  has_initial: bool
  block_sizes: BlockSizes


def _hopper_forward(options: _Options, q_BTHF, k_BTHF, v_BTHD, state: BasedState):
  """(y [B, T, H, D], den [B, T, H], final BasedState): pads T to whole steps (of every sequence piece), runs
  the kernel on pieces [B·pieces, T_pad/pieces] from their starting states, unpads."""
  batch, seq_len, heads, _ = q_BTHF.shape
  d = v_BTHD.shape[-1]
  value_blocks = d // BLOCK_D
  pieces = options.block_sizes.sequence_pieces or _pieces_by_shape(
      batch=batch, length=seq_len, heads=heads, value_dim=d)[1]
  t_pad = round_up(seq_len, pieces * STEP)
  piece_len = t_pad // pieces
  prepare = lambda x: sequence_split.split(jnp.pad(x, ((0, 0), (0, t_pad - seq_len), (0, 0), (0, 0))), pieces)
  q, k, v = prepare(q_BTHF), prepare(k_BTHF), prepare(v_BTHD)
  plan = _Plan(dtype=jnp.dtype(q_BTHF.dtype), heads=heads, num_steps=piece_len // STEP,
               value_blocks=value_blocks, normalize=options.normalize, eps=options.eps,
               has_initial=options.has_initial or pieces > 1, stages=options.block_sizes.num_stages)
  s_in, z_in = _pack_state(state)
  if pieces > 1:
    def own_states(zeros):
      own_s, own_z = _forward(dataclasses.replace(plan, has_initial=False, states_only=True), q, k, v, *zeros)
      return own_s, own_z[:, :, 0, ..., 0]

    s_in, z_in = sequence_split.piece_starts((s_in, z_in), pieces, own_states)
  y, den, s_out, z_out = _forward(plan, q, k, v, s_in, z_in)
  last = lambda x: sequence_split.last_piece(x, pieces)
  final = _unpack_state(last(s_out), last(z_out[:, :, 0, ..., 0]))
  final = final._replace(z0_BH=state.z0_BH + seq_len)  # zero padding keys count in the kernel's state
  y = y.reshape(batch, t_pad, heads, d)[:, :seq_len]
  den = den[:, :, 0].reshape(batch, pieces, heads, piece_len).transpose(0, 1, 3, 2).reshape(batch, t_pad, heads)
  return y, den[:, :seq_len], final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _based(options: _Options, q_BTHF, k_BTHF, v_BTHD, state: BasedState):
  y, _, final = _hopper_forward(options, q_BTHF, k_BTHF, v_BTHD, state)
  return y, final


def _based_fwd(options, q_BTHF, k_BTHF, v_BTHD, state):
  y, den, final = _hopper_forward(options, q_BTHF, k_BTHF, v_BTHD, state)
  return (y, final), (q_BTHF, k_BTHF, v_BTHD, state, y, den)


def _based_bwd(options, residuals, cotangents):
  q, k, v, state, y, den = residuals
  dy, d_final = cotangents
  if options.block_sizes.backward_kernel == "hopper":
    from pallas_kernels.based import hopper_chunked_bwd  # imported here: it imports this module
    s_in, z_in = _pack_state(state)
    d_s_final, d_z_final = _pack_state(d_final)  # packing is a selection: its transpose is _unpack_state
    dq, dk, dv, d_s, d_z = hopper_chunked_bwd.based_chunked_backward_hopper(
        q, k, v, y, den, dy, d_s_final, d_z_final, s_initial=s_in, z_initial=z_in, normalize=options.normalize,
        eps=options.eps, num_stages=options.block_sizes.num_stages)
    return dq, dk, dv, _unpack_state(d_s, d_z)
  dq, dk, dv, d_state = portable.based_chunked_backward(
      q, k, v, y, den, dy, d_final, initial_state=state, normalize=options.normalize, eps=options.eps,
      chunk=options.chunk, block_sizes=options.block_sizes.backward)
  return dq, dk, dv, d_state


_based.defvjp(_based_fwd, _based_bwd)


def based_chunked_hopper(q_BTHF, k_BTHF, v_BTHD, *, chunk: int = 64, normalize: bool = True, eps: float = 1e-6,
                         initial_state: BasedState | None = None, return_final_state: bool = False,
                         segment_ids=None, block_sizes: BlockSizes | None = None):
  """pallas.based_chunked's semantics on sm90 (api.py validates the inputs); F = 16, D in (64, 128), 16-bit
  inputs, no segment ids. Gradients come from the portable backward (BlockSizes(backward_kernel="hopper"):
  hopper_chunked_bwd's Mosaic GPU kernels)."""
  batch, _, heads, f = q_BTHF.shape
  d, dtype = v_BTHD.shape[-1], jnp.dtype(q_BTHF.dtype)
  if segment_ids is not None or f != FEATURES or d not in _VALUE_DIMS or not mosaic.is_16bit(dtype):
    raise ValueError(f"the Hopper chunked BASED kernel takes F={FEATURES}, D in {_VALUE_DIMS}, bfloat16/float16 "
                     f"and no segment ids; got F={f}, D={d}, {dtype}, segment_ids={segment_ids is not None}")
  if block_sizes is not None and block_sizes.backward_kernel not in ("portable", "hopper"):
    raise ValueError(f"{block_sizes.backward_kernel=} is not 'portable' or 'hopper'")
  options = _Options(normalize=bool(normalize), eps=float(eps), chunk=int(chunk),
                     has_initial=initial_state is not None, block_sizes=block_sizes or BlockSizes())
  state = initial_state if initial_state is not None else BasedState.zeros(batch, heads, f, d)
  y, final = _based(options, q_BTHF, k_BTHF, v_BTHD, BasedState(*(jnp.asarray(x, jnp.float32) for x in state)))
  return (y, final) if return_final_state else y


def supports(*, backend: str, dtype=None, feature_dim: int | None = None, value_dim: int | None = None,
             chunk: int = 64, has_segment_ids: bool = False, **_) -> str | None:
  """None when the Hopper chunked kernel covers the call, else why not (lengths: any, padded to whole steps;
  chunk only tiles the portable backward)."""
  return first_reason(
      require(backend == "gpu", f"Mosaic GPU kernels run on GPU, not {backend=}"),
      require(chunk in (16, 32, 64, 128), f"{chunk=} not in (16, 32, 64, 128) (the portable backward's tiles)"),
      require(mosaic.is_16bit(dtype), f"{dtype=} is not bfloat16 or float16"),
      require(feature_dim == FEATURES, f"{feature_dim=} is not {FEATURES}"),
      require(value_dim in _VALUE_DIMS, f"{value_dim=} not in {_VALUE_DIMS}"),
      require(not has_segment_ids, "segment ids are not supported (the portable kernel has them)"),
      require(backend != "gpu" or mosaic.is_sm90(), "needs an sm90 (Hopper) GPU"),
  )


def preferred(*, batch: int, length: int, heads: int, value_dim: int, **_) -> str | None:
  """Where auto should take it over the portable kernel (an api `auto_prefers` rule): a full wave of CTAs once
  the sequence is split. On the H100 (H16 D64 bf16, forward) it ran B8 T2048 0.44 ms against the portable
  kernel's 0.52, B4 T4096 0.54 vs 0.68, B2 T16384 0.97 vs 1.24, B1 T65536 1.78 vs 2.31; forward+backward ties
  (both take the portable backward)."""
  ctas, pieces = _pieces_by_shape(batch=batch, length=length, heads=heads, value_dim=value_dim)
  ctas *= pieces
  return require(ctas >= _MIN_CTAS, f"{ctas=} (after the sequence split) < {_MIN_CTAS}: less than a wave, untimed")
