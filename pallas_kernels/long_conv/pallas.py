"""Portable Pallas kernels for the gated causal long convolution, FlashFFTConv's algorithm (Fu et al. 2023: the FFT
as matrix products on the tensor cores, gating and the filter product fused): one `pl.pallas_call` source for CPU
interpret mode, TPU and GPU (Triton), with a custom_vjp.

  y = og ⊙ conv(ig ⊙ u, k) + skip ⊙ u     (reference.py), conv by the N-point DFT, N = 2^n >= 2L (dft.py)

One pass, N <= BlockSizes.max_fused (the lengths H3 and Hyena train on): a program owns a block of C channels of
one batch row with its whole sequence on chip. It loads u (and the gates), forms ig ⊙ u, transforms it (the
first step on the N2/2 nonzero rows only, real), multiplies by the filter's spectrum K/N, transforms back (the first
Lp rows, real part), and writes og ⊙ c + skip ⊙ u: the signal crosses memory once. The filter's spectrum is taken
once per call (dft.spectrum: XLA matmuls on all channels, [2, N3, N2, D] float32) and each program reads its
channels' block of it; with the batch the innermost grid axis, TPU fetches that block once per channel block and
the GPU programs of one block read it from L2.

Backward, one pass: a program owns a channel block and `block_b` batch rows (a loop) and recomputes X = DFT(ig ⊙ u);
with dc = og ⊙ dy it takes DC = DFT(dc), dx = IDFT(conj(K)·DC) and, for d_og only, c = IDFT(X·K), then the
gradients of gates.py. The filter gradient dk[j] = Σ_b Σ_t dc[t]·x[t-j] = IDFT(Σ_b conj(X)·DC)/N: the spectrum is
summed over the program's rows on chip, transformed back once, and XLA adds the programs' [Lp, C] pieces.

Longer sequences take three passes (split.py: the outer factor N1 of N = N1·N2·N3 through HBM). Products have the
inputs' dtype as operands (16-bit at tensor-core rate; float32 as IEEE float32) and float32 accumulation; the
elementwise work is float32, and each output is rounded once.

Letters: B batch, L length (Lp padded), D channels (C per program), N = N1·N2·N3 and M = N2·N3 as in dft.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.target import Target
from pallas_kernels.long_conv import calls, dft, gates, split
from pallas_kernels.long_conv.calls import Call
from pallas_kernels.long_conv.dft import Complex, Factors, Tables

MAX_LENGTH = 65536  # the longest sequence the kernel tests cover (on the GPU)


def _power_of_2(x: int) -> bool:
  return x >= 1 and x & (x - 1) == 0


def _largest_dividing(channels: int, candidates: tuple[int, ...]) -> int:
  for c in candidates:
    if channels % c == 0:
      return c
  raise ValueError(f"{channels=} must be a multiple of {candidates[-1]}")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_d: int = 16  # channels per program (C); must divide D
  block_b: int = 4  # batch rows per backward program, at most (the filter gradient is summed over them on chip)
  max_fused: int = 4096  # the largest FFT size N done in one pass; beyond it, three passes (split.py)
  inner: int = 1024  # M = N2·N3, the on-chip transform of the three-pass path
  block_m: int = 16  # columns of the [N1, M] view per program of the outer passes
  min_factor: int = 16  # the smallest matmul dim a factor may give (Triton's tensor-core products take >= 16)
  num_warps: int = 4  # Triton only
  num_stages: int = 1  # Triton only

  @classmethod
  def for_shape(cls, *, length: int, channels: int, dtype, target: Target) -> "BlockSizes":
    """Defaults per target. Triton, from the H100's forward over block sizes (2026-12-07, bf16, 768 channels,
    benchmarks/scripts/long_conv_blocks_time.py): one pass (B64 L1024) ran fastest at 2-4 channels per program
    (3.52-3.56 ms; 16 channels, the old default, 7.88), three passes (B4 L16384) at 8 (5.87 ms; 16: 30.8), both
    with 8 warps: a complex float32 tile is 8·N·C bytes and wider ones spill. Float32 inputs take half as many
    channels: at 16 their backward asked Triton for 573 KB (L 2048) and 327 KB (L 65536) of shared memory, above
    the H100's 227 KB. TPU blocks span whole 128-lane multiples or all channels. Interpret mode (CPU) takes wide
    blocks: each grid step copies whole arrays."""
    if target.mosaic_tpu:
      block_d = 128 if channels % 128 == 0 else channels
      return cls(block_d=block_d, block_b=8, inner=2048, block_m=128, min_factor=8)
    if target.triton:
      factors = Factors.for_length(length, max_fused=cls.max_fused, inner=cls.inner, min_factor=cls.min_factor)
      widest = (4 if factors.fused else 8) // (2 if jnp.dtype(dtype).itemsize == 4 else 1)
      return cls(block_d=_largest_dividing(channels, (widest, 2)), num_warps=8)
    return cls(block_d=_largest_dividing(channels, (64, 32, 16, 8)), block_m=64)


def _pow2_divisor(total: int, most: int) -> int:
  """The largest power of two <= most that divides total."""
  return next(b for b in (1 << i for i in range(most.bit_length() - 1, -1, -1)) if total % b == 0)


def check_block_sizes(blocks: BlockSizes, *, channels: int, target: Target) -> None:
  """ValueError naming the knob when `blocks` cannot run this call."""
  if blocks.block_d < 1 or channels % blocks.block_d:
    raise ValueError(f"block_d={blocks.block_d} must divide channels={channels}")
  if not target.mosaic_tpu and not _power_of_2(blocks.block_d):
    raise ValueError(f"block_d={blocks.block_d} must be a power of two (Triton blocks)")
  if target.mosaic_tpu and blocks.block_d % 128 and blocks.block_d != channels:
    raise ValueError(f"block_d={blocks.block_d} must be a multiple of 128 or all {channels=} on TPU")
  for name in ("block_b", "max_fused", "inner", "block_m", "min_factor"):
    if not _power_of_2(getattr(blocks, name)):
      raise ValueError(f"{name}={getattr(blocks, name)} must be a power of two")


def _fused_transforms(r, call: Call):
  """The one-pass kernels' transforms of a [Lp, C] tile: forward to a spectrum [N3, N2, C], back to [Lp, C]."""
  f = call.factors
  half = f.n2 // 2
  f2_in, f2_out, tw, f3 = calls.inner_tables(r, rows_in=half, rows_out=half)

  def forward(x_LC: jax.Array) -> Complex:
    return dft.inner_forward(Complex(x_LC.reshape(half, f.n3, -1), None), f2_in, tw, f3, call.mm)

  def inverse(y: Complex) -> jax.Array:
    return dft.inner_inverse(y, f2_out, tw, f3, call.mm, real=True).re.reshape(f.padded_length, -1)

  return forward, inverse


def _fused_fwd_kernel(*refs, call: Call, names: tuple[str, ...]):
  r = calls.named_refs(names, refs)
  forward, inverse = _fused_transforms(r, call)
  u = calls.load(r, "u")
  c = inverse(dft.multiply(forward(gates.gated(u, calls.load(r, "in_gate"))), calls.spectrum_ref(r["kf"])))
  r["y"][...] = gates.output(c, u, calls.load(r, "out_gate"), calls.load(r, "skip")).astype(r["y"].dtype)


def _fused_bwd_kernel(*refs, call: Call, names: tuple[str, ...]):
  r = calls.named_refs(names, refs)
  f = call.factors
  forward, inverse = _fused_transforms(r, call)
  kf = calls.spectrum_ref(r["kf"])
  skip = calls.load(r, "skip")
  channels = r["u"].shape[-1]

  def body(i, carry):
    dk, dskip = carry
    u, dy = calls.load(r, "u", i), calls.load(r, "dy", i)
    in_gate, out_gate = calls.load(r, "in_gate", i), calls.load(r, "out_gate", i)
    x_spectrum = forward(gates.gated(u, in_gate))
    dc_spectrum = forward(gates.gated(dy, out_gate))
    if out_gate is not None:
      r["d_out_gate"][i] = (dy * inverse(dft.multiply(x_spectrum, kf))).astype(r["d_out_gate"].dtype)
    dx = inverse(dft.multiply_conj(dc_spectrum, kf))
    du, d_in_gate = gates.input_grads(dx, u, in_gate, dy, skip)
    r["du"][i] = du.astype(r["du"].dtype)
    if d_in_gate is not None:
      r["d_in_gate"][i] = d_in_gate.astype(r["d_in_gate"].dtype)
    dk = dft.accumulate(dk, dft.multiply_conj(dc_spectrum, x_spectrum))
    if skip is not None:
      dskip = dskip + gates.skip_grad(dy, u)
    return dk, dskip

  zeros = jnp.zeros((f.n3, f.n2, channels), jnp.float32)
  dk, dskip = lax.fori_loop(0, r["u"].shape[0], body, (Complex(zeros, zeros), jnp.zeros((1, channels), jnp.float32)))
  r["dk"][...] = inverse(dk) * (1.0 / f.fft_size)
  if skip is not None:
    r["d_skip"][...] = dskip


def _kf_row(call: Call, kf: Complex, index) -> tuple:
  f = call.factors
  return ("kf", jnp.stack([kf.re, kf.im]), pl.BlockSpec((2, f.n3, f.n2, call.blocks.block_d), index))


def _fused_forward(call: Call, u, kf: Complex, skip, in_gate, out_gate, t: Tables):
  c = call.blocks.block_d
  batch, lp, channels = u.shape
  row = pl.BlockSpec((None, lp, c), lambda d, b: (b, 0, d))
  inputs = [("u", u, row), ("in_gate", in_gate, row), ("out_gate", out_gate, row),
            ("skip", skip, pl.BlockSpec((1, c), lambda d, b: (0, d))), _kf_row(call, kf, lambda d, b: (0, 0, 0, d)),
            *calls.inner_table_rows(t)]
  outputs = [("y", jax.ShapeDtypeStruct(u.shape, u.dtype), row)]
  return call.run(_fused_fwd_kernel, (channels // c, batch), inputs, outputs, "long_conv_fwd")["y"]


def _fused_backward(call: Call, u, kf: Complex, skip, in_gate, out_gate, dy, t: Tables):
  c, rows = call.blocks.block_d, call.blocks.block_b
  batch, lp, channels = u.shape
  groups = batch // rows
  tile = pl.BlockSpec((rows, lp, c), lambda d, g: (g, 0, d))
  inputs = [("u", u, tile), ("in_gate", in_gate, tile), ("out_gate", out_gate, tile), ("dy", dy, tile),
            ("skip", skip, pl.BlockSpec((1, c), lambda d, g: (0, d))), _kf_row(call, kf, lambda d, g: (0, 0, 0, d)),
            *calls.inner_table_rows(t)]
  outputs = [("du", jax.ShapeDtypeStruct(u.shape, u.dtype), tile)]
  if in_gate is not None:
    outputs.append(("d_in_gate", jax.ShapeDtypeStruct(in_gate.shape, in_gate.dtype), tile))
  if out_gate is not None:
    outputs.append(("d_out_gate", jax.ShapeDtypeStruct(out_gate.shape, out_gate.dtype), tile))
  outputs.append(("dk", jax.ShapeDtypeStruct((groups, lp, channels), jnp.float32),
                  pl.BlockSpec((None, lp, c), lambda d, g: (g, 0, d))))
  if skip is not None:
    outputs.append(("d_skip", jax.ShapeDtypeStruct((groups, 1, channels), jnp.float32),
                    pl.BlockSpec((None, 1, c), lambda d, g: (g, 0, d))))
  out = call.run(_fused_bwd_kernel, (channels // c, groups), inputs, outputs, "long_conv_bwd")
  d_skip = out["d_skip"].sum(axis=(0, 1)) if skip is not None else None
  return out["du"], out["dk"].sum(axis=0), d_skip, out.get("d_in_gate"), out.get("d_out_gate")


def _spectrum(call: Call, k_LD: jax.Array, t: Tables) -> Complex:
  """K/N in the kernels' layout, once per call."""
  scale = 1.0 / call.factors.fft_size
  return dft.spectrum(k_LD, call.factors, t).map(lambda v: v * scale)


def _skip_row(skip_D):
  return None if skip_D is None else skip_D.astype(jnp.float32).reshape(1, -1)


def _forward(call: Call, u, k, skip, in_gate, out_gate):
  t = dft.tables(call.factors)
  conv = _fused_forward if call.factors.fused else split.forward
  return conv(call, u, _spectrum(call, k, t), _skip_row(skip), in_gate, out_gate, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated_conv(call: Call, u, k, skip, in_gate, out_gate):
  return _forward(call, u, k, skip, in_gate, out_gate)


def _gated_conv_fwd(call: Call, u, k, skip, in_gate, out_gate):
  return _forward(call, u, k, skip, in_gate, out_gate), (u, k, skip, in_gate, out_gate)


def _gated_conv_bwd(call: Call, residuals, dy):
  u, k, skip, in_gate, out_gate = residuals
  f = call.factors
  t = dft.tables(f)
  args = (call, u, _spectrum(call, k, t), _skip_row(skip), in_gate, out_gate, dy.astype(u.dtype), t)
  if f.fused:
    du, dk, d_skip, d_in_gate, d_out_gate = _fused_backward(*args)
  else:
    du, dk_spectrum, d_skip, d_in_gate, d_out_gate = split.backward(*args)
    dk = dft.inverse_real(dk_spectrum, f, t) * (1.0 / f.fft_size)
  d_skip = None if skip is None else d_skip.astype(skip.dtype)
  return du, dk[:k.shape[0]].astype(k.dtype), d_skip, d_in_gate, d_out_gate


_gated_conv.defvjp(_gated_conv_fwd, _gated_conv_bwd)


def supports(*, length: int, channels: int, **_) -> str | None:
  """Why the kernel cannot take a call with these options, or None: what its tests cover."""
  if length > MAX_LENGTH:
    return f"{length=} > {MAX_LENGTH}"
  if channels % 8:
    return f"{channels=} is not a multiple of 8"
  return None


def gated_long_conv(u_BLD: jax.Array, k_LD: jax.Array, skip_D: jax.Array | None = None,
                    in_gate_BLD: jax.Array | None = None, out_gate_BLD: jax.Array | None = None, *,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None,
                    debug: bool = False) -> jax.Array:
  """og ⊙ causal_conv(ig ⊙ u, k) + skip ⊙ u by these kernels (split.py past max_fused); differentiable."""
  target = Target.current(interpret)
  batch, length, channels = u_BLD.shape
  blocks = block_sizes or BlockSizes.for_shape(length=length, channels=channels, dtype=u_BLD.dtype, target=target)
  check_block_sizes(blocks, channels=channels, target=target)
  factors = Factors.for_length(length, max_fused=blocks.max_fused, inner=blocks.inner,
                               min_factor=blocks.min_factor)
  # Rows and columns per program as given, or fewer where the batch or the transform has fewer.
  blocks = dataclasses.replace(blocks, block_b=_pow2_divisor(batch, blocks.block_b),
                               block_m=min(blocks.block_m, factors.inner))
  operand = u_BLD.dtype if jnp.dtype(u_BLD.dtype).itemsize == 2 else jnp.float32
  call = Call(factors, jnp.dtype(operand), blocks, target, debug)
  pad = lambda x: None if x is None else jnp.pad(x, ((0, 0), (0, factors.padded_length - length), (0, 0)))
  y = _gated_conv(call, pad(u_BLD), k_LD, skip_D, pad(in_gate_BLD), pad(out_gate_BLD))
  return y[:, :length]
