"""The fused Monarch forward for Hopper (sm90) in Mosaic GPU: TMA, wgmma and warp specialisation, the schedule of
pallas.py's fused kernel with the intermediate in shared memory instead of registers. The backward is the XLA
form's (xla.backward, with the intermediate recomputed by XLA), so training runs this forward and 16-bit XLA
products backward.

Letters as in reference.py and block_pairs.py: T tokens, K input blocks of P inputs, L output blocks of S outputs,
C channels per (output block, input block) pair, R = K·C intermediates per output block; Rc 64-wide chunks of them.

Schedule. A CTA owns 128 tokens (two consumer warpgroups of 64) and one output block l; a producer warpgroup
TMA-loads the streamed tiles through two shared-memory rings (mosaic.produce_ring):

  stage 1, ring 1   for each 64-wide chunk r of the intermediate u_l [128, R]: the x tiles [128, 64] of the input
                    blocks it reads and the matching first-factor slabs [64, 64]; each consumer accumulates its
                    64 rows of u_l[:, r] in a [64, 64] float32 wgmma accumulator over the P inputs, rounds it to
                    the operand dtype (as two linear layers would) and keeps it in shared memory.
  stage 2, ring 2   for each block_y-wide chunk of y_l: the second-factor slabs [64, block_y] of every chunk r;
                    each consumer accumulates y_l's chunk from its resident u_l (A operand, shared memory) and
                    writes it out through a staging tile (TMA).

A consumer keeps one wgmma in flight: it issues step i's product, waits for step i-1's and frees that slot, so
the producer's next load overlaps the product (`_accumulate`).

The permutation is folded into which slabs a CTA reads (block_pairs.py), so u never leaves the chip. Chunks of the
intermediate are 64 wide (one 128-byte swizzle row of 16-bit values, wgmma's K step): with C >= 64 a chunk holds
64 channels of one input block; with C < 64 it holds 64/C input blocks side by side, each slab zero outside its
block's C columns, so that stage 2 never multiplies padding (stage 1, the cheaper factor, pays for it instead).

Shared memory (16-bit values): the intermediate 2·64·Rc·64·2 bytes (128 KiB at R 512), the rings
num_stages·(128·64 + 64·64 + 64·block_y)·2 bytes and the output staging 2·64·block_y·2 bytes: R 512 with block_y 64
and 2 stages takes 208 KiB of the 227 a block may use. Wider intermediates do not fit (`supports`).
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
from pallas_kernels.monarch import block_pairs, xla

CHUNK = 64  # intermediate columns per chunk and inputs per first-factor step: one 128-byte row of 16-bit values
CTA_TOKENS = mosaic.CTA_ROWS  # 128: two consumers of 64


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_y: int = 64  # output columns per second-factor chunk (the wgmma N)
  num_stages: int = 2  # depth of each ring

  @classmethod
  def for_shape(cls, w1_KQP, w2_LSR) -> "BlockSizes":
    """The widest output chunk whose shared memory fits (fewer, larger second-factor products); untuned."""
    for block_y in (256, 128, 64):
      blocks = cls(block_y=block_y)
      if shared_bytes(_plan(w1_KQP.shape, w2_LSR.shape, jnp.bfloat16, blocks)) <= mosaic.SMEM_USABLE:
        return blocks
    return cls()

  def check(self) -> None:
    if self.block_y not in (64, 128, 256):
      raise ValueError(f"block_y={self.block_y} must be 64, 128 or 256 (whole swizzle rows, wgmma N <= 256)")
    if self.num_stages < 2:
      raise ValueError(f"num_stages={self.num_stages} must be at least 2 for loads to overlap compute")


class _Plan(NamedTuple):
  """One call's static shapes."""
  k: int  # input blocks
  l: int  # output blocks
  c_pad: int  # channels per pair, padded to a power of two below 64 or a multiple of 64
  group: int  # input blocks per intermediate chunk (64 / c_pad, or 1)
  chunks: int  # Rc: 64-wide chunks of the intermediate
  p_steps: int  # P / 64 (padded)
  y_steps: int  # S / block_y (padded)
  blocks: BlockSizes
  dtype: Any

  @property
  def first_steps(self) -> int:
    return self.chunks * self.group * self.p_steps

  @property
  def second_steps(self) -> int:
    return self.y_steps * self.chunks


def _padded_channels(c: int) -> int:
  """C padded so that 64-wide chunks hold whole input blocks (C < 64) or whole chunks of one (C >= 64)."""
  return 1 << (c - 1).bit_length() if c < CHUNK else _round_up(c, CHUNK)


def shared_bytes(plan: _Plan) -> int:
  b = plan.blocks
  ring = b.num_stages * (CTA_TOKENS * CHUNK + CHUNK * CHUNK + CHUNK * b.block_y)
  u = mosaic.CONSUMERS * plan.chunks * mosaic.WG_ROWS * CHUNK
  out = mosaic.CONSUMERS * mosaic.WG_ROWS * b.block_y
  return 2 * (ring + u + out)


def _plan(w1_shape, w2_shape, dtype, blocks: BlockSizes) -> _Plan:
  """The static plan for factors of shapes w1 [K, Q, P] and w2 [L, S, R]."""
  k, q, p = w1_shape
  l, s, _ = w2_shape
  c_pad = _padded_channels(q // l)
  group = max(1, CHUNK // c_pad)
  chunks = -(-k * c_pad // CHUNK)
  return _Plan(k=k, l=l, c_pad=c_pad, group=group, chunks=chunks, p_steps=-(-p // CHUNK),
               y_steps=-(-s // blocks.block_y), blocks=blocks, dtype=jnp.dtype(dtype))


def _coverage(w1_shape, w2_shape, dtype, blocks: BlockSizes) -> str | None:
  """Why the kernel cannot run factors of these shapes on inputs of `dtype` with `blocks`, or None."""
  (nblocks, block_mid, _), out_nblocks = w1_shape, w2_shape[0]
  if block_mid % out_nblocks:
    return f"block_mid={block_mid} is not a multiple of out_nblocks={out_nblocks}"
  plan = _plan(w1_shape, w2_shape, dtype, blocks)
  return first_reason(
      require(mosaic.is_16bit(dtype), f"x dtype {jnp.dtype(dtype)} is not bfloat16 or float16"),
      require(shared_bytes(plan) <= mosaic.SMEM_USABLE,
              f"the intermediate ({nblocks} blocks x {plan.c_pad} channels per output block) with {blocks} needs "
              f"{shared_bytes(plan)} bytes of shared memory, more than {mosaic.SMEM_USABLE}"))


def supports(*, backend: str, dtype=None, nblocks: int, out_nblocks: int, block_mid: int, block_in: int,
             block_out: int, **_) -> str | None:
  """None when the Hopper forward covers the call (with its narrowest output chunk), else why not."""
  w2_shape = (out_nblocks, block_out, nblocks * block_mid // out_nblocks)
  return first_reason(
      require(backend == "gpu", f"Mosaic GPU kernels run on GPU, not {backend=}"),
      _coverage((nblocks, block_mid, block_in), w2_shape, dtype or jnp.float32, BlockSizes()),
      require(backend != "gpu" or mosaic.is_sm90(), "needs an sm90 (Hopper) GPU"))


def _first_slabs(a_LKPC: jax.Array, plan: _Plan) -> jax.Array:
  """[L, Rc, G, P, 64]: slab (r, g) holds input block k = r·G + g's first-factor columns at its place in
  intermediate chunk r (u column n = k·C + c), zero elsewhere; blocks past K are all zero."""
  l, _, p, c = a_LKPC.shape
  r = jnp.arange(plan.chunks)[:, None, None]
  g = jnp.arange(plan.group)[None, :, None]
  col = r * CHUNK + jnp.arange(CHUNK)[None, None, :]  # [Rc, 1, 64] global intermediate column
  k_slab = (r * CHUNK) // c + g  # [Rc, G, 1] the input block slab (r, g) reads
  k_col, channel = col // c, col % c
  keep = (k_col == k_slab) & (k_slab < plan.k)  # [Rc, G, 64]
  gathered = a_LKPC[:, jnp.minimum(k_slab, plan.k - 1), :, jnp.broadcast_to(channel, keep.shape)]
  # Advanced indices in the middle move to the front: gathered is [Rc, G, 64, L, P].
  slabs = jnp.where(keep[..., None, None], gathered, 0)
  return slabs.transpose(3, 0, 1, 4, 2)


def _second_slabs(b_LKCS: jax.Array, plan: _Plan) -> jax.Array:
  """[L, Rc, 64, S]: the second factor's rows in intermediate order (row n = k·C + c), zero-padded to Rc·64."""
  l, k, c, s = b_LKCS.shape
  rows = b_LKCS.reshape(l, k * c, s)
  return jnp.pad(rows, ((0, 0), (0, plan.chunks * CHUNK - k * c), (0, 0))).reshape(l, plan.chunks, CHUNK, s)


class _Shared(NamedTuple):
  x: Any  # [stages, 128, 64]: the CTA's tokens, 64 inputs of one block
  a: Any  # [stages, 64, 64]: a first-factor slab's 64 rows of inputs
  b: Any  # [stages, 64, block_y]: a second-factor slab's chunk of outputs
  u: Any  # [2, Rc, 64, 64]: each consumer's rows of the intermediate, chunk by chunk
  out: Any  # [2, 64, block_y]: each consumer's output staging
  x_ready: Any  # [stages]
  a_ready: Any
  b_ready: Any
  first_free: Any  # [stages], 2 arrivals: both consumers' stage-1 product from the slot is done
  second_free: Any


def _shared_types(plan: _Plan) -> _Shared:
  stages, by = plan.blocks.num_stages, plan.blocks.block_y
  tiles = mosaic.swizzled(128)
  return _Shared(
      x=plgpu.SMEM((stages, CTA_TOKENS, CHUNK), plan.dtype, transforms=tiles),
      a=plgpu.SMEM((stages, CHUNK, CHUNK), plan.dtype, transforms=tiles),
      b=plgpu.SMEM((stages, CHUNK, by), plan.dtype, transforms=tiles),
      u=plgpu.SMEM((mosaic.CONSUMERS, plan.chunks, mosaic.WG_ROWS, CHUNK), plan.dtype, transforms=tiles),
      out=plgpu.SMEM((mosaic.CONSUMERS, mosaic.WG_ROWS, by), plan.dtype, transforms=tiles),
      x_ready=plgpu.Barrier(num_barriers=stages),
      a_ready=plgpu.Barrier(num_barriers=stages),
      b_ready=plgpu.Barrier(num_barriers=stages),
      first_free=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=stages),
      second_free=plgpu.Barrier(num_arrivals=mosaic.CONSUMERS, num_barriers=stages))


def _first_step(plan: _Plan, j):
  """Stage-1 step j -> (chunk r, slab g, input step pc, input block k): r-major, then g, then pc."""
  pc = lax.rem(j, plan.p_steps)
  rg = lax.div(j, plan.p_steps)
  r, g = lax.div(rg, plan.group), lax.rem(rg, plan.group)
  k = jnp.minimum(lax.div(r * CHUNK, plan.c_pad) + g, plan.k - 1)  # past K the slab is zero: any block will do
  return r, g, pc, k


def _producer(plan: _Plan, tile, block, x_ref, a_ref, b_ref, sh: _Shared):
  stages, by = plan.blocks.num_stages, plan.blocks.block_y
  t0 = tile * CTA_TOKENS

  def x_source(j):
    _, _, pc, k = _first_step(plan, j)
    return x_ref.at[pl.ds(t0, CTA_TOKENS), k, pl.ds(pc * CHUNK, CHUNK)]

  def a_source(j):
    r, g, pc, _ = _first_step(plan, j)
    return a_ref.at[block, r, g, pl.ds(pc * CHUNK, CHUNK)]

  def b_source(j):
    yc, r = lax.div(j, plan.chunks), lax.rem(j, plan.chunks)
    return b_ref.at[block, r, pl.ds(0, CHUNK), pl.ds(yc * by, by)]

  mosaic.produce_ring(0, plan.first_steps, stages, [
      (sh.first_free, [mosaic.Stream(x_source, sh.x, sh.x_ready), mosaic.Stream(a_source, sh.a, sh.a_ready)])])
  mosaic.produce_ring(0, plan.second_steps, stages, [(sh.second_free, [mosaic.Stream(b_source, sh.b, sh.b_ready)])])


def _accumulate(acc, count: int, first, stages: int, ready, free, operands):
  """acc += Σ_{i < count} A_i @ B_i over ring steps first .. first+count-1: each step waits for its slot's `ready`
  barriers, issues its wgmma and then frees the previous step's slot once that product is done, so the next load
  overlaps this product. Returns the accumulator's value. operands(i, slot) -> (A, B)."""
  def step(i, carry):
    slot = lax.rem(first + i, stages)
    for barrier in ready:
      plgpu.barrier_wait(barrier.at[slot])
    plgpu.wgmma(acc, *operands(i, slot))
    plgpu.wgmma_wait(1)  # the previous step's product is done: its slot may be refilled
    pl.when(i > 0)(lambda: plgpu.barrier_arrive(free.at[lax.rem(first + i - 1, stages)]))
    return carry
  lax.fori_loop(0, count, step, None)
  plgpu.wgmma_wait(0)
  plgpu.barrier_arrive(free.at[lax.rem(first + count - 1, stages)])
  return acc[...]


def _consumer(plan: _Plan, tile, block, wg, y_ref, sh: _Shared):
  stages, by = plan.blocks.num_stages, plan.blocks.block_y
  rows = pl.ds(wg * mosaic.WG_ROWS, mosaic.WG_ROWS)
  per_chunk = plan.group * plan.p_steps

  # Stage 1: u[:, r] = Σ_g Σ_pc x_k(r, g)[:, pc] @ slab(r, g)[pc], chunk by chunk, kept in shared memory.
  for r in range(plan.chunks):
    chunk = lambda acc, r=r: _accumulate(acc, per_chunk, r * per_chunk, stages, (sh.x_ready, sh.a_ready),
                                         sh.first_free, lambda i, slot: (sh.x.at[slot, rows], sh.a.at[slot]))
    sh.u.at[wg, r][...] = pl.run_scoped(chunk, plgpu.ACC((mosaic.WG_ROWS, CHUNK), jnp.float32)).astype(plan.dtype)
  plgpu.commit_smem()  # u is read by wgmma next: its stores must be visible to the async proxy

  # Stage 2: y_l[:, yc] = Σ_r u[:, r] @ b[l, r][:, yc], written out chunk by chunk.
  def out_chunk(yc, carry):
    products = lambda acc: _accumulate(acc, plan.chunks, yc * plan.chunks, stages, (sh.b_ready,), sh.second_free,
                                       lambda r, slot: (sh.u.at[wg, r], sh.b.at[slot]))
    y = pl.run_scoped(products, plgpu.ACC((mosaic.WG_ROWS, by), jnp.float32))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's copy has read the staging
    sh.out.at[wg][...] = y.astype(plan.dtype)
    plgpu.commit_smem()
    start = tile * CTA_TOKENS + wg * mosaic.WG_ROWS
    plgpu.copy_smem_to_gmem(sh.out.at[wg], y_ref.at[pl.ds(start, mosaic.WG_ROWS), block, pl.ds(yc * by, by)])
    return carry

  lax.fori_loop(0, plan.y_steps, out_chunk, None)
  plgpu.wait_smem_to_gmem(0)


def _kernel(x_ref, a_ref, b_ref, y_ref, shared, *, plan: _Plan):
  tile, block = lax.axis_index("tiles"), lax.axis_index("blocks")
  mosaic.warp_specialized(lambda: _producer(plan, tile, block, x_ref, a_ref, b_ref, shared),
                          lambda wg: _consumer(plan, tile, block, wg, y_ref, shared))


def _forward(x_N: jax.Array, w1_KQP: jax.Array, w2_LSR: jax.Array, blocks: BlockSizes) -> jax.Array:
  k, q, p = w1_KQP.shape
  l, s, _ = w2_LSR.shape
  dtype = x_N.dtype
  plan = _plan(w1_KQP.shape, w2_LSR.shape, dtype, blocks)
  batch = x_N.shape[:-1]
  tokens = math.prod(batch)
  t_pad, p_pad, s_pad = _round_up(max(tokens, 1), CTA_TOKENS), plan.p_steps * CHUNK, plan.y_steps * blocks.block_y
  x_TKP = jnp.pad(x_N.reshape(tokens, k, p), ((0, t_pad - tokens), (0, 0), (0, p_pad - p)))
  a_LKPC, b_LKCS = block_pairs.forward_pairs(w1_KQP.astype(dtype), w2_LSR.astype(dtype), c_pad=plan.c_pad,
                                             p_pad=p_pad, s_pad=s_pad)
  y_TLS = mosaic.launch(
      functools.partial(_kernel, plan=plan), x_TKP, _first_slabs(a_LKPC, plan), _second_slabs(b_LKCS, plan),
      name="monarch_hopper_fwd", out_type=jax.ShapeDtypeStruct((t_pad, l, s_pad), dtype),
      scratch=_shared_types(plan), grid=dict(tiles=t_pad // CTA_TOKENS, blocks=l))
  return y_TLS[:tokens, :, :s].reshape(*batch, l * s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _multiply(x_N, w1_KQP, w2_LSR, blocks: BlockSizes):
  return _forward(x_N, w1_KQP, w2_LSR, blocks)


def _multiply_fwd(x_N, w1_KQP, w2_LSR, blocks):
  return _forward(x_N, w1_KQP, w2_LSR, blocks), (x_N, w1_KQP, w2_LSR)


def _multiply_bwd(blocks, residuals, dy_M):
  del blocks
  x_N, w1_KQP, w2_LSR = residuals
  u_LR = xla.intermediate(x_N, w1_KQP, w2_LSR.shape[0])  # recomputed: the kernel keeps it on chip
  return xla.backward((x_N, w1_KQP, w2_LSR, u_LR), dy_M)


_multiply.defvjp(_multiply_fwd, _multiply_bwd)


def monarch_multiply(x_N: jax.Array, w1_KQP: jax.Array, w2_LSR: jax.Array, *,
                     block_sizes: BlockSizes | None = None) -> jax.Array:
  """y = (blockdiag(w2) · Perm · blockdiag(w1)) x on the last axis, the forward fused on a Hopper GPU; dtype of x
  (16-bit); differentiable (xla.backward)."""
  blocks = block_sizes or BlockSizes.for_shape(w1_KQP, w2_LSR)
  blocks.check()
  reason = _coverage(w1_KQP.shape, w2_LSR.shape, x_N.dtype, blocks)
  if reason is not None:
    raise ValueError(f"monarch hopper kernel: {reason} (w1 shape {w1_KQP.shape}, w2 shape {w2_LSR.shape})")
  return _multiply(x_N, w1_KQP, w2_LSR, blocks)
