"""The gated causal long convolution's forward for Hopper (sm90) in Mosaic GPU, FlashFFTConv's algorithm with the
DFT as wgmma products; the backward is the reference's (jax.vjp of reference.gated_long_conv, XLA's FFT), so the
op is differentiable and trains with this forward. Checked in Mosaic GPU's interpreter on CPU; its one GPU run
(2026-12-07, before the channel-major layout) did not compile, and this layout has not run on a GPU yet.

  y = og ⊙ conv(ig ⊙ u, k) + skip ⊙ u,  conv by the N-point DFT, N = 2^n >= 2L zero-padded (dft.py)

One pass, L <= 2048 (N <= 4096), N = N2·N3 with N2 = 64 (wgmma's M) and N3 = N/64 in {16, 32, 64} (short
sequences take N = 1024: a product needs K >= 16). Per channel, time n = a·N3 + b is the matrix x[a, b] (a < 32
nonzero: the zero pad) and frequency k = k_a + 64·k_b the matrix X[k_a, k_b]:

  X = ((F_64 @ x) ⊙ TW) @ F_N3,   TW[k_a, b] = ω_N^{k_a·b}                       (Cooley-Tukey, dft.py's form)
  c = Re(conj(F_64)[:32] @ (((X ⊙ K/N) @ conj(F_N3)) ⊙ conj(TW)))                  (the inverse, first Lp rows)

Both contractions are plain products of [64, *] matrices, so a channel never needs a transpose on chip: the left
products take the DFT matrix as the register operand A and the signal from shared memory as B; the right products
take the signal as the register operand A (the previous accumulator, rounded to 16 bits) and F_N3 from shared
memory as B. Complex products are real ones (`forward_first` .. `inverse_last`), twiddles and the filter's
spectrum elementwise in float32 (dft.multiply).

Schedule. XLA transposes u, ig and og to channel-major [B, D, Lp] (one extra HBM pass each, and one for y back):
the first GPU run (jax 0.11.2) refused the time-major design, whose per-channel columns were strided views of
shared memory (`We cannot apply swizzle to non-contiguous refs`, Mosaic GPU's layout inference). A CTA (one
warpgroup) owns one batch row and C = 8 channels. It TMA-loads u, ig and og [C, Lp] into one channel-major shared
buffer; per channel it moves the channel's rows (one element per thread and step) into contiguous [64, N3]
matrices, forms x = ig ⊙ u (rows a >= 32 zero) as operand B, runs the transform above, and writes og ⊙ c + skip ⊙ u
back over u's rows; one TMA store sends y out. The filter's spectrum K/N, [2, D, 64, N3] float32, is computed
once per call by XLA (dft.spectrum) and read from global memory (L2) per channel; F_64 and the twiddles come from
global memory into registers, F_N3 by TMA into shared memory. Untuned: one warpgroup, no overlap of loads with
products.

Eight channels per CTA because the whole spectrum of each stays on chip; shared memory (16-bit) is the channel-major
buffer 3·C·Lp·2 bytes (96 KiB at L 2048) + the channel's four matrices, x, V (re, im) [64, N3] and F_N3 (re, im,
-im) [N3, N3] (80 KiB at N3 64): 176 KiB (180,224 bytes) of the 232,448 a block may opt into (`shared_bytes`).

Letters: B batch, L length (Lp = N/2 padded), D channels (C per CTA), N = 64·N3 the FFT size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import mosaic
from pallas_kernels.common.dispatch import first_reason, require
from pallas_kernels.long_conv import dft, reference
from pallas_kernels.long_conv.dft import Complex, Factors

MAX_LENGTH = 2048  # one pass: N <= 4096
N2 = 64  # wgmma's M: the first factor, k_a
ROWS_IN = N2 // 2  # the nonzero rows a of the zero-padded input
MIN_FFT = 1024  # N3 >= 16: wgmma's K step for 16-bit operands
REGIONS = 3  # u (then y), in_gate, out_gate: the channel-major buffer


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_d: int = 8  # channels per CTA (C)

  @classmethod
  def for_shape(cls, *, length: int, channels: int, dtype=None) -> "BlockSizes":
    """The only block the kernel has: 8 channels (wider blocks would not fit the channel-major buffer at L 2048)."""
    del length, channels, dtype
    return cls()

  def check(self) -> None:
    if self.block_d != 8:
      raise ValueError(f"block_d={self.block_d} must be 8 (the one block size the kernel is tested at; 16 would not fit at L 2048)")


class Plan(NamedTuple):
  """One call's static shapes."""
  length: int  # L
  fft_size: int  # N = 64·N3
  n3: int  # the second factor, k_b (and the time offset b)
  dtype: Any  # the 16-bit operand and I/O dtype
  block_d: int  # C

  @property
  def padded_length(self) -> int:  # Lp = N/2 = 32·N3
    return self.fft_size // 2

  @property
  def factors(self) -> Factors:
    return Factors(self.length, self.fft_size, 1, N2, self.n3)


def plan_for(length: int, dtype, blocks: BlockSizes) -> Plan:
  fft_size = max(1 << max(2 * length - 1, 1).bit_length(), MIN_FFT)
  return Plan(length, fft_size, fft_size // N2, jnp.dtype(dtype), blocks.block_d)


def shared_bytes(plan: Plan) -> int:
  signal = REGIONS * plan.padded_length * plan.block_d
  # The channel's matrices (x, u, og, y), x, V (re, im), F_N3 (re, im, -im).
  tiles = 7 * N2 * plan.n3 + 3 * plan.n3 * plan.n3
  return 2 * (signal + tiles)


# ----------------------------------------------------------------------------------- tables and the schedule
# Shared by the kernel and its replay (tests/pallas_kernels/test_long_conv_hopper.py): the same tables, the same
# products in the same order, the same roundings.

class Tables(NamedTuple):
  """The factor tables, numpy: f2 = F_64 and f2_out = F_64[:32] with zero rows below (register operands A, [2, 64,
  64]); tw = ω_N^{k_a·b} [2, 64, N3] float32; f3 = (re, im, -im) of F_N3 [3, N3, N3] (shared-memory operands B)."""
  f2: np.ndarray
  f2_out: np.ndarray
  tw: np.ndarray
  f3: np.ndarray


def tables(plan: Plan) -> Tables:
  f2 = dft.dft_matrix(N2)
  f2_out = np.where(np.arange(N2)[None, :, None] < ROWS_IN, f2, 0.0).astype(np.float32)
  f3 = dft.dft_matrix(plan.n3)
  return Tables(f2, f2_out, dft.twiddles(N2, plan.n3, plan.fft_size), np.stack([f3[0], f3[1], -f3[1]]))


def filter_spectrum(k_LD: jax.Array, plan: Plan) -> jax.Array:
  """K/N of the zero-padded filter as [2 (re, im), D, 64 (k_a), N3 (k_b)] float32 (frequency k_a + 64·k_b): each
  channel's block is one contiguous [64, N3] matrix, the layout of the kernel's accumulators."""
  f = plan.factors
  spectrum = dft.spectrum(k_LD, f, dft.tables(f))  # [N3, 64, D] in natural order: k = k_b·64 + k_a
  scale = 1.0 / plan.fft_size
  return jnp.stack([jnp.transpose(part, (2, 1, 0)) * scale for part in spectrum])


def channel_matrix(x_L: np.ndarray, plan: Plan) -> np.ndarray:
  """A channel's padded signal [Lp] as the kernel's [64, N3] matrix x[a, b] = x[a·N3 + b] (rows a >= 32 zero)."""
  rows = np.zeros((N2, plan.n3), x_L.dtype)
  rows[:ROWS_IN] = np.reshape(x_L, (ROWS_IN, plan.n3))
  return rows


MatMulSum = Callable[[Sequence[tuple[Any, Any]]], Any]  # Σ lhs @ rhs over the pairs, one float32 accumulator


def forward_first(x, f2: Complex, mm: MatMulSum) -> Complex:
  """F_64 @ x for the real signal x [64, N3]."""
  return Complex(mm([(f2.re, x)]), mm([(f2.im, x)]))


def forward_last(t: Complex, f3: Sequence[Any], mm: MatMulSum) -> Complex:
  """t @ F_N3, f3 = (re, im, -im)."""
  re, im, neg_im = f3
  return Complex(mm([(t.re, re), (t.im, neg_im)]), mm([(t.re, im), (t.im, re)]))


def inverse_first(z: Complex, f3: Sequence[Any], mm: MatMulSum) -> Complex:
  """z @ conj(F_N3)."""
  re, im, neg_im = f3
  return Complex(mm([(z.re, re), (z.im, im)]), mm([(z.im, re), (z.re, neg_im)]))


def inverse_last(v: Complex, f2_out: Complex, mm: MatMulSum):
  """Re(conj(F_64[:32]) @ v): rows a < 32 of the output (the rows below are zero)."""
  return mm([(f2_out.re, v.re), (f2_out.im, v.im)])


def channel_conv(x, kf: Complex, tw: Complex, f2: Complex, f2_out: Complex, f3: Sequence[Any], mm: MatMulSum,
                 to_lhs: Callable[[Any], Any], to_rhs: Callable[[Complex], Complex]):
  """One channel's conv(x) as [64, N3] (rows a < 32 hold time a·N3 + b): the kernel's products in its order.
  to_lhs rounds a float32 accumulator to a register operand, to_rhs stores one as shared-memory operands."""
  t = dft.multiply(forward_first(x, f2, mm), tw).map(to_lhs)
  z = dft.multiply(forward_last(t, f3, mm), kf).map(to_lhs)
  v = to_rhs(dft.multiply_conj(inverse_first(z, f3, mm), tw))
  return inverse_last(v, f2_out, mm)


# ----------------------------------------------------------------------------------------------------- kernel

class _Shared(NamedTuple):
  signal: Any  # [3, C, 32, N3] channel-major: u (y over it), in_gate, out_gate; each channel's rows a < 32
  channel: Any  # [4, 64, N3] one channel's matrices: x (rows a >= 32 zero), u, out_gate, y
  x: Any  # [64, N3] x again as operand B (tiled, swizzled)
  v: Any  # [2, 64, N3] the inverse's last operand B (re, im)
  f3: Any  # [3, N3, N3] F_N3 (re, im, -im)
  loaded: Any  # barriers: the signal's copies and F_N3's


def _shared_types(plan: Plan, copies: int) -> _Shared:
  n3, tiles = plan.n3, mosaic.swizzled(2 * plan.n3)
  return _Shared(
      signal=plgpu.SMEM((REGIONS, plan.block_d, ROWS_IN, n3), plan.dtype),
      channel=plgpu.SMEM((4, N2, n3), plan.dtype),
      x=plgpu.SMEM((N2, n3), plan.dtype, transforms=tiles),
      v=plgpu.SMEM((2, N2, n3), plan.dtype, transforms=tiles),
      f3=plgpu.SMEM((3, n3, n3), plan.dtype, transforms=tiles),
      loaded=plgpu.Barrier(num_barriers=copies))


_REGIONS = {"u": 0, "in_gate": 1, "out_gate": 2}  # y goes over u's rows once the channel has read them
_X, _U, _OG, _Y = range(4)  # the per-channel matrices


def _kernel(*refs, plan: Plan, names: tuple[str, ...]):
  r = dict(zip(names, refs[:-1], strict=True))
  sh: _Shared = refs[-1]
  d_block, batch = lax.axis_index("channels"), lax.axis_index("batch")
  c_total, n3 = plan.block_d, plan.n3
  d0 = d_block * c_total
  copies = [(r[n].at[batch, pl.ds(d0, c_total)], sh.signal.at[i]) for n, i in _REGIONS.items() if n in r]
  copies += [(r["f3"].at[i], sh.f3.at[i]) for i in range(3)]
  for i, (src, dst) in enumerate(copies):
    plgpu.copy_gmem_to_smem(src, dst, sh.loaded.at[i])

  wgmma = plgpu.Layout.WGMMA
  top = (ROWS_IN, n3)
  tiled = lambda ref: plgpu.load(ref, (), layout=wgmma, optimized=False)
  # Rows a < 32 of a channel, [32, N3], one element per thread and step: the WGMMA layout covers 64 rows only.
  rows = lambda ref: plgpu.load(ref, (), layout=plgpu.Layout.WG_STRIDED(top, vec_size=1), optimized=False)
  f2, f2_out = (Complex(tiled(r[n].at[0]), tiled(r[n].at[1])) for n in ("f2", "f2_out"))
  tw = Complex(tiled(r["tw"].at[0]), tiled(r["tw"].at[1]))
  f3 = [sh.f3.at[i] for i in range(3)]
  sh.channel.at[_X, pl.ds(ROWS_IN, ROWS_IN)][...] = jnp.zeros(top, plan.dtype)  # the zero pad, once
  for i in range(len(copies)):
    plgpu.barrier_wait(sh.loaded.at[i])

  def mm(pairs):
    def products(acc):
      for lhs, rhs in pairs:
        plgpu.wgmma(acc, lhs, rhs)
      plgpu.wgmma_wait(0)
      return acc[...]
    return pl.run_scoped(products, plgpu.ACC((N2, n3), jnp.float32))

  def to_rhs(v: Complex) -> Complex:
    sh.v.at[0][...] = v.re.astype(plan.dtype)
    sh.v.at[1][...] = v.im.astype(plan.dtype)
    plgpu.commit_smem()  # wgmma reads V next: the stores must reach the async proxy
    return Complex(sh.v.at[0], sh.v.at[1])

  def channel(c, carry):
    # The channel's rows -> its [64, N3] matrices (every shared view here is unit-stride: Mosaic GPU's layout
    # inference refuses strided ones), then to wgmma's layout.
    u = rows(sh.signal.at[_REGIONS["u"], c])
    x = u
    if "in_gate" in r:
      x = u.astype(jnp.float32) * rows(sh.signal.at[_REGIONS["in_gate"], c]).astype(jnp.float32)
    sh.channel.at[_X, pl.ds(0, ROWS_IN)][...] = x.astype(plan.dtype)
    sh.channel.at[_U, pl.ds(0, ROWS_IN)][...] = u
    if "out_gate" in r:
      sh.channel.at[_OG, pl.ds(0, ROWS_IN)][...] = rows(sh.signal.at[_REGIONS["out_gate"], c])
    sh.x[...] = tiled(sh.channel.at[_X])
    plgpu.commit_smem()
    d = d0 + c
    kf = Complex(tiled(r["kf"].at[0, d]), tiled(r["kf"].at[1, d]))
    y = channel_conv(sh.x, kf, tw, f2, f2_out, f3, mm, lambda v: v.astype(plan.dtype), to_rhs)
    if "out_gate" in r:
      y = y * tiled(sh.channel.at[_OG]).astype(jnp.float32)
    if "skip" in r:
      y = y + r["skip"][d] * tiled(sh.channel.at[_U]).astype(jnp.float32)
    sh.channel.at[_Y][...] = y.astype(plan.dtype)  # rows a >= 32 are the pad's: never sent
    sh.signal.at[_REGIONS["u"], c][...] = rows(sh.channel.at[_Y, pl.ds(0, ROWS_IN)])
    return carry

  lax.fori_loop(0, c_total, channel, None)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(sh.signal.at[_REGIONS["u"]], r["y"].at[batch, pl.ds(d0, c_total)])
  plgpu.wait_smem_to_gmem(0)


def _forward(plan: Plan, u, k, skip, in_gate, out_gate):
  """y [B, Lp, D] from the padded signals."""
  batch, lp, channels = u.shape
  t = tables(plan)
  # Channel-major [B, D, 32, N3] (XLA's transposes, one HBM pass each way): each channel's rows are one
  # contiguous [32, N3] box, so a CTA never moves a strided column on chip.
  by_channel = lambda x: None if x is None else jnp.swapaxes(x, 1, 2).reshape(batch, channels, ROWS_IN, plan.n3)
  inputs = [("u", by_channel(u)), ("in_gate", by_channel(in_gate)), ("out_gate", by_channel(out_gate)),
            ("skip", None if skip is None else skip.astype(jnp.float32)), ("kf", filter_spectrum(k, plan)),
            ("f2", jnp.asarray(t.f2, plan.dtype)), ("f2_out", jnp.asarray(t.f2_out, plan.dtype)),
            ("tw", jnp.asarray(t.tw)), ("f3", jnp.asarray(t.f3, plan.dtype))]
  inputs = [(n, a) for n, a in inputs if a is not None]
  names = tuple(n for n, _ in inputs) + ("y",)
  copies = sum(n in ("u", "in_gate", "out_gate") for n in names) + 3

  def body(*refs):
    _kernel(*refs, plan=plan, names=names)

  body.__name__ = "long_conv_hopper_fwd"
  y = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((batch, channels, ROWS_IN, plan.n3), u.dtype),
      scratch_types=[_shared_types(plan, copies)], grid=(channels // plan.block_d, batch),
      grid_names=("channels", "batch"), **mosaic.interpret_kwargs())(*[a for _, a in inputs])
  return jnp.swapaxes(y.reshape(batch, channels, lp), 1, 2)


# --------------------------------------------------------------------------------------------- custom_vjp, api

def _run(plan: Plan, u, k, skip, in_gate, out_gate):
  pad = lambda x: None if x is None else jnp.pad(x, ((0, 0), (0, plan.padded_length - plan.length), (0, 0)))
  return _forward(plan, pad(u), k, skip, pad(in_gate), pad(out_gate))[:, :plan.length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gated_conv(plan: Plan, u, k, skip, in_gate, out_gate):
  return _run(plan, u, k, skip, in_gate, out_gate)


def _gated_conv_fwd(plan: Plan, u, k, skip, in_gate, out_gate):
  return _run(plan, u, k, skip, in_gate, out_gate), (u, k, skip, in_gate, out_gate)


def _gated_conv_bwd(plan: Plan, residuals, dy):
  del plan
  _, pullback = jax.vjp(reference.gated_long_conv, *residuals)
  return pullback(dy)


_gated_conv.defvjp(_gated_conv_fwd, _gated_conv_bwd)


def coverage(*, length: int, channels: int, dtype, blocks: BlockSizes | None = None) -> str | None:
  """Why the kernel cannot take a call of this shape and dtype, or None."""
  plan = plan_for(length, dtype if mosaic.is_16bit(dtype) else jnp.bfloat16, blocks or BlockSizes())
  return first_reason(
      require(mosaic.is_16bit(dtype), f"dtype {jnp.dtype(dtype)} is not bfloat16 or float16"),
      require(1 <= length <= MAX_LENGTH, f"{length=} is outside 1..{MAX_LENGTH} (one pass, N <= 4096)"),
      require(channels % plan.block_d == 0, f"{channels=} is not a multiple of {plan.block_d}"),
      require(shared_bytes(plan) <= mosaic.SMEM_USABLE,
              f"{shared_bytes(plan)} bytes of shared memory, more than {mosaic.SMEM_USABLE}"))


def supports(*, backend: str, length: int, channels: int, dtype=None, **_) -> str | None:
  """None when the Hopper forward covers the call, else why not."""
  return first_reason(
      require(backend == "gpu", f"Mosaic GPU kernels run on GPU, not {backend=}"),
      coverage(length=length, channels=channels, dtype=dtype or jnp.float32),
      require(backend != "gpu" or mosaic.is_sm90(), "needs an sm90 (Hopper) GPU"))


def gated_long_conv(u_BLD: jax.Array, k_LD: jax.Array, skip_D: jax.Array | None = None,
                    in_gate_BLD: jax.Array | None = None, out_gate_BLD: jax.Array | None = None, *,
                    block_sizes: BlockSizes | None = None) -> jax.Array:
  """og ⊙ causal_conv(ig ⊙ u, k) + skip ⊙ u, the forward on a Hopper GPU (one pass, 16-bit, L <= 2048);
  differentiable: the backward is jax.vjp of reference.gated_long_conv."""
  blocks = block_sizes or BlockSizes()
  blocks.check()
  _, length, channels = u_BLD.shape
  if not mosaic.is_16bit(u_BLD.dtype):
    raise ValueError(f"u dtype {u_BLD.dtype} is not bfloat16 or float16 (the Hopper long_conv kernel)")
  if not 1 <= length <= MAX_LENGTH:
    raise ValueError(f"u length={length} is outside 1..{MAX_LENGTH} (the Hopper long_conv kernel is one pass)")
  if channels % blocks.block_d:
    raise ValueError(f"u channels={channels} is not a multiple of block_d={blocks.block_d}")
  for name, gate in (("in_gate", in_gate_BLD), ("out_gate", out_gate_BLD)):
    if gate is not None and (gate.shape != u_BLD.shape or gate.dtype != u_BLD.dtype):
      raise ValueError(f"{name} {gate.shape} {gate.dtype} must match u {u_BLD.shape} {u_BLD.dtype}")
  plan = plan_for(length, u_BLD.dtype, blocks)
  return _gated_conv(plan, u_BLD, k_LD, skip_D, in_gate_BLD, out_gate_BLD)
