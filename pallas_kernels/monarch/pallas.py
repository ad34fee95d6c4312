"""The fused Monarch kernel: both block-diagonal products and the permutation between them in one `pallas_call`
(interpret mode on CPU, Mosaic on TPU, Triton on GPU), with a custom_vjp.

Forward, one kernel: a program owns (a tile of block_t tokens, output block l). Through the factor pairs of
block_pairs.py it computes, for every input block k, the C intermediates u[:, l, k·C:(k+1)·C] = x_k @ a[l, k]
(products over chunks of the block's P inputs), keeps them on chip, rounded to the operand dtype as two linear
layers would, and writes y_l = Σ_k u_k @ b[l, k] chunk by chunk of its S outputs. Output block l reads slice l of
every first-factor block and no other program computes it: each first-factor product is done once, and the
intermediate never reaches memory.

Backward: the input gradient is the transposed map, the same kernel on the transposed pairs (a program owns
(token tile, input block k)); its intermediate is the intermediate's gradient, dh. The weight gradients are
contractions over tokens, da[l, k] = Σ_t x_k[t]ᵀ dh..., db[l, k] = Σ_t u_k[t]ᵀ dy_l[t], which need the
intermediate of every token: so the training forward also writes u (one array the size of the intermediate, in
the operand dtype) and the input-gradient kernel writes dh, and a token-contraction kernel sums them in float32,
`token_splits` programs per weight tile along the tokens (XLA adds their partial sums).

Products take the inputs' dtype as operands (16-bit at tensor-core rate, float32 as IEEE float32) with float32
accumulation. Triton's loads and products need power-of-two tiles of at least 16: C is padded to one (the zero
channels add nothing) and chunk widths are powers of two dividing P and S (padded to a multiple of 16).

Letters: T tokens (Tp padded), O output blocks and I input blocks of a pair product (L and K forward, K and L
for the input gradient), X a pair's input width, C its channels, Y its output width, G token splits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.matmul import dot, dot_tn, exact_precision
from pallas_kernels.common.target import Target
from pallas_kernels.monarch import block_pairs

MAX_NBLOCKS = 16  # the blocks of a factor are unrolled in the kernel; the tests cover 2 to 16
MIN_DIM = 16  # Triton's tensor-core products take dims >= 16


def _power_of_2(x: int) -> bool:
  return x >= 1 and x & (x - 1) == 0


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pow2_divisor(total: int, most: int) -> int:
  """The largest power of two <= most that divides total."""
  return next(b for b in (1 << i for i in range(most.bit_length() - 1, -1, -1)) if total % b == 0)


def _largest_divisor(total: int, most: int) -> int:
  return next(d for d in range(min(total, most), 0, -1) if total % d == 0)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_t: int = 32  # tokens per program of the fused kernels
  block_x: int = 64  # input columns per first-factor product (a chunk of one block's inputs), at most
  block_y: int = 64  # output columns per second-factor product (a chunk of one block's outputs), at most
  block_w: int = 64  # rows and columns of a weight-gradient tile, at most
  block_wt: int = 64  # tokens per step of the weight-gradient loop, at most
  token_splits: int = 8  # weight-gradient programs per tile along the tokens, at most (XLA sums their partials)
  num_warps: int = 4  # Triton only
  num_stages: int = 2  # Triton only

  @classmethod
  def for_shape(cls, *, mid_width: int, target: Target) -> "BlockSizes":
    """Untuned defaults (no GPU timing yet). `mid_width` is a program's on-chip intermediate per token (I·C):
    Triton keeps it in registers, so block_t shrinks as it grows (about 32 KiB of 16-bit values). TPU tiles span
    128 lanes. Interpret mode (CPU) takes wide blocks: each grid step costs a loop iteration."""
    if target.mosaic_tpu:
      return cls(block_t=128, block_x=128, block_y=128, block_w=128, block_wt=128)
    if target.triton:
      block_t = max(MIN_DIM, min(128, 1 << max(0, (16384 // max(mid_width, 1)).bit_length() - 1)))
      return cls(block_t=block_t, num_warps=8 if mid_width >= 512 else 4)
    return cls(block_t=128, block_x=128, block_y=128, block_w=128, block_wt=128, token_splits=2)


def check_block_sizes(blocks: BlockSizes) -> None:
  """ValueError naming the knob when `blocks` cannot run."""
  for name in ("block_t", "block_x", "block_y", "block_w", "block_wt"):
    value = getattr(blocks, name)
    if not _power_of_2(value) or value < MIN_DIM:
      raise ValueError(f"{name}={value} must be a power of two >= {MIN_DIM} (Triton tiles)")
  if blocks.token_splits < 1:
    raise ValueError(f"token_splits={blocks.token_splits} must be positive")


@dataclasses.dataclass(frozen=True)
class Call:
  """One call's static configuration (hashable: custom_vjp's non-differentiable argument)."""
  blocks: BlockSizes
  operand_dtype: Any  # the products' operands: the input's dtype (float32 for float32 inputs)
  target: Target
  debug: bool = False  # pallas_call prints the kernels' jaxprs

  def mm(self, a: jax.Array, b: jax.Array) -> jax.Array:
    return dot(a.astype(self.operand_dtype), b.astype(self.operand_dtype), exact_precision(self.operand_dtype))

  def mm_tn(self, a: jax.Array, b: jax.Array) -> jax.Array:
    return dot_tn(a.astype(self.operand_dtype), b.astype(self.operand_dtype), exact_precision(self.operand_dtype))


def _pair_product_kernel(x_ref, a_ref, b_ref, *out_refs, call: Call, x_chunk: int, y_chunk: int):
  """out[:, o] = Σ_i (x_i @ a[o, i]) @ b[o, i] for one (token tile, output block o); the intermediates x_i @ a[o, i]
  stay in registers (and go to the optional second output, for the weight gradients)."""
  out_ref, mid_ref = out_refs if len(out_refs) == 2 else (out_refs[0], None)
  inputs, width_x, channels = a_ref.shape
  width_y = b_ref.shape[-1]
  rows = x_ref.shape[0]

  pieces = []
  for i in range(inputs):  # unrolled (at most MAX_NBLOCKS): each piece is a separate on-chip value
    def first(step, acc, i=i):
      start = pl.multiple_of(step * x_chunk, x_chunk)
      return acc + call.mm(x_ref[:, pl.ds(i * width_x + start, x_chunk)], a_ref[i, pl.ds(start, x_chunk), :])

    acc = lax.fori_loop(0, width_x // x_chunk, first, jnp.zeros((rows, channels), jnp.float32))
    piece = acc.astype(call.operand_dtype)
    if mid_ref is not None:
      mid_ref[:, i * channels:(i + 1) * channels] = piece.astype(mid_ref.dtype)
    pieces.append(piece)

  def second(step, carry):
    start = pl.multiple_of(step * y_chunk, y_chunk)
    acc = jnp.zeros((rows, y_chunk), jnp.float32)
    for i, piece in enumerate(pieces):
      acc = acc + call.mm(piece, b_ref[i, :, pl.ds(start, y_chunk)])
    out_ref[:, pl.ds(start, y_chunk)] = acc.astype(out_ref.dtype)
    return carry

  lax.fori_loop(0, width_y // y_chunk, second, 0)


def _pair_product(call: Call, x_TIX: jax.Array, a_OIXC: jax.Array, b_OICY: jax.Array, *, with_mid: bool):
  """y [Tp, O·Y] (and the intermediate [Tp, O·I·C] when with_mid) by the fused kernel; x [Tp, I·X]."""
  blocks = call.blocks
  outputs, inputs, width_x, channels = a_OIXC.shape
  width_y = b_OICY.shape[-1]
  tokens = x_TIX.shape[0]
  rows = blocks.block_t
  grid = (tokens // rows, outputs)  # output blocks innermost: the programs reading one x tile run together
  in_specs = [pl.BlockSpec((rows, inputs * width_x), lambda t, o: (t, 0)),
              pl.BlockSpec((None, inputs, width_x, channels), lambda t, o: (o, 0, 0, 0)),
              pl.BlockSpec((None, inputs, channels, width_y), lambda t, o: (o, 0, 0, 0))]
  out_shape = [jax.ShapeDtypeStruct((tokens, outputs * width_y), call.operand_dtype)]
  out_specs = [pl.BlockSpec((rows, width_y), lambda t, o: (t, o))]
  if with_mid:
    out_shape.append(jax.ShapeDtypeStruct((tokens, outputs * inputs * channels), call.operand_dtype))
    out_specs.append(pl.BlockSpec((rows, inputs * channels), lambda t, o: (t, o)))
  kernel = functools.partial(_pair_product_kernel, call=call, x_chunk=_pow2_divisor(width_x, blocks.block_x),
                             y_chunk=_pow2_divisor(width_y, blocks.block_y))
  results = call.target.pallas_call(
      kernel, num_warps=blocks.num_warps, num_stages=blocks.num_stages, grid=grid, in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, name="monarch_pairs", debug=call.debug)(x_TIX, a_OIXC, b_OICY)
  return tuple(results) if with_mid else results[0]


def _token_contraction_kernel(a_ref, b_ref, out_ref, *, call: Call, step: int):
  def body(s, acc):
    start = pl.multiple_of(s * step, step)
    return acc + call.mm_tn(a_ref[pl.ds(start, step), :], b_ref[pl.ds(start, step), :])

  out_ref[...] = lax.fori_loop(0, a_ref.shape[0] // step, body, jnp.zeros(out_ref.shape, jnp.float32))


def _token_contraction(call: Call, a_TOA: jax.Array, b_TOB: jax.Array, blocks_o: int) -> jax.Array:
  """out[o] = Σ_t a[t, o]ᵀ b[t, o] in float32, [O, A, B], for a [Tp, O·A] and b [Tp, O·B]."""
  blocks = call.blocks
  tokens = a_TOA.shape[0]
  width_a, width_b = a_TOA.shape[1] // blocks_o, b_TOB.shape[1] // blocks_o
  tile_a, tile_b = _pow2_divisor(width_a, blocks.block_w), _pow2_divisor(width_b, blocks.block_w)
  step = _pow2_divisor(tokens, blocks.block_wt)
  splits = _largest_divisor(tokens // step, blocks.token_splits)
  rows = tokens // splits
  tiles_a, tiles_b = width_a // tile_a, width_b // tile_b
  partial = call.target.pallas_call(
      functools.partial(_token_contraction_kernel, call=call, step=step),
      num_warps=blocks.num_warps, num_stages=blocks.num_stages,
      grid=(blocks_o, tiles_a, tiles_b, splits),
      in_specs=[pl.BlockSpec((rows, tile_a), lambda o, i, j, g: (g, o * tiles_a + i)),
                pl.BlockSpec((rows, tile_b), lambda o, i, j, g: (g, o * tiles_b + j))],
      out_specs=pl.BlockSpec((None, None, tile_a, tile_b), lambda o, i, j, g: (g, o, i, j)),
      out_shape=jax.ShapeDtypeStruct((splits, blocks_o, width_a, width_b), jnp.float32),
      name="monarch_weight_grad", debug=call.debug)(a_TOA, b_TOB)
  return partial.sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pairs(call: Call, x_TIX, a_OIXC, b_OICY):
  return _pair_product(call, x_TIX, a_OIXC, b_OICY, with_mid=False)


def _pairs_fwd(call: Call, x_TIX, a_OIXC, b_OICY):
  y, mid = _pair_product(call, x_TIX, a_OIXC, b_OICY, with_mid=True)
  return y, (x_TIX, a_OIXC, b_OICY, mid)


def _pairs_bwd(call: Call, residuals, dy_TOY):
  x_TIX, a_OIXC, b_OICY, mid_TOIC = residuals
  outputs, inputs, _, channels = a_OIXC.shape
  dy_TOY = dy_TOY.astype(call.operand_dtype)
  # dx is the transposed map; its intermediate dmid[t, i, o·C + c] is the gradient of mid[t, o, i·C + c].
  dx_TIX, dmid_TIOC = _pair_product(call, dy_TOY, *block_pairs.transposed_pairs(a_OIXC, b_OICY), with_mid=True)
  db = _token_contraction(call, mid_TOIC, dy_TOY, outputs)  # [O, I·C, Y]
  da = _token_contraction(call, dmid_TIOC, x_TIX, inputs)  # [I, O·C, X]
  db_OICY = db.reshape(b_OICY.shape)
  da_OIXC = da.reshape(inputs, outputs, channels, -1).transpose(1, 0, 3, 2)
  return dx_TIX.astype(x_TIX.dtype), da_OIXC.astype(a_OIXC.dtype), db_OICY.astype(b_OICY.dtype)


_pairs.defvjp(_pairs_fwd, _pairs_bwd)


def padded_widths(k: int, l: int, c: int, p: int, s: int, target: Target) -> tuple[int, int, int]:
  """(C, P, S) as the kernels take them. Triton (and interpret mode, standing in for it): C a power of two >= 16,
  P and S multiples of 16 (chunked by powers of two). Mosaic TPU: every block's minor dim a multiple of 128, so
  P and S are, and so are the K·C and L·C intermediates of a program (export-checked only, untuned)."""
  if target.mosaic_tpu:
    lanes = 128 // math.gcd(128, k, l)
    return _round_up(c, lanes), _round_up(p, 128), _round_up(s, 128)
  return target.padded_dim(c), _round_up(p, MIN_DIM), _round_up(s, MIN_DIM)


def supports(*, nblocks: int, out_nblocks: int, block_mid: int, **_) -> str | None:
  """Why the kernel cannot take a call with these options, or None: what its tests cover."""
  if block_mid % out_nblocks:
    return (f"block_mid={block_mid} is not a multiple of {out_nblocks=}: the kernel pairs each output block with "
            f"whole channels of every input block")
  if max(nblocks, out_nblocks) > MAX_NBLOCKS:
    return f"nblocks={max(nblocks, out_nblocks)} > {MAX_NBLOCKS}"
  return None


def monarch_multiply(x_N: jax.Array, w1_KQP: jax.Array, w2_LSR: jax.Array, *, block_sizes: BlockSizes | None = None,
                     interpret: bool | None = None, debug: bool = False) -> jax.Array:
  """y = (blockdiag(w2) · Perm · blockdiag(w1)) x on the last axis by the fused kernel; dtype of x;
  differentiable. Needs Q a multiple of L (`supports`)."""
  k, q, p = w1_KQP.shape
  l, s, _ = w2_LSR.shape
  reason = supports(nblocks=k, out_nblocks=l, block_mid=q)
  if reason is not None:
    raise ValueError(f"monarch pallas kernel: {reason} (w1 shape {w1_KQP.shape}, w2 shape {w2_LSR.shape})")
  target = Target.current(interpret)
  operand = jnp.dtype(x_N.dtype if jnp.dtype(x_N.dtype).itemsize == 2 else jnp.float32)
  c_pad, p_pad, s_pad = padded_widths(k, l, q // l, p, s, target)
  blocks = block_sizes or BlockSizes.for_shape(mid_width=max(k, l) * c_pad, target=target)
  check_block_sizes(blocks)
  batch = x_N.shape[:-1]
  tokens = math.prod(batch)
  t_pad = _round_up(max(tokens, 1), blocks.block_t)
  x_TKP = jnp.pad(x_N.reshape(tokens, k, p).astype(operand), ((0, t_pad - tokens), (0, 0), (0, p_pad - p)))
  a_LKPC, b_LKCS = block_pairs.forward_pairs(w1_KQP.astype(operand), w2_LSR.astype(operand), c_pad=c_pad,
                                             p_pad=p_pad, s_pad=s_pad)
  y = _pairs(Call(blocks, operand, target, debug), x_TKP.reshape(t_pad, k * p_pad), a_LKPC, b_LKCS)
  return y.reshape(t_pad, l, s_pad)[:tokens, :, :s].reshape(*batch, l * s).astype(x_N.dtype)
