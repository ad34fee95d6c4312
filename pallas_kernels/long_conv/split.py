"""The three-pass long convolution, for FFT sizes past BlockSizes.max_fused (long sequences): N = N1·M with the
M = N2·N3 point transform on chip and the outer factor N1 in passes of its own (dft.py has the algebra).

The padded signal [B, Lp, D] is viewed (a free reshape) as [B, N1/2, M, D]: element (r, m) is time r·M + m.

  outer forward   programs of (channel block, batch row, Mt columns): x = ig ⊙ u on [N1/2, Mt, C], F_N1 along r
                  (N1/2 nonzero rows), the twiddles ω_N^{k_r·m}: A [B, 2, N1, M, D] float32 in HBM.
  inner           programs of (channel block, row k_r, batch row): A[k_r] [M, C] through the on-chip M-point
                  transform, times the filter spectrum's row k_r, back: Z [B, 2, N1, M, D].
  outer inverse   programs as the outer forward: the conjugate twiddles, conj(F_N1) for the first N1/2 rows, the
                  real part: the convolution c on [N1/2, Mt, C], then the epilogue of gates.py (y, or gradients).

Backward: the outer forward of x = ig ⊙ u and of dc = og ⊙ dy; one inner pass that takes X and DC for a row k_r,
writes IDFT(conj(K)·DC) (and IDFT(X·K) where there is an out gate) and sums DC·conj(X) over `block_b` batch rows
(the filter gradient's spectrum, [G, 2, N1, N3, N2, D], summed by XLA and transformed back by dft.inverse_real);
then one outer inverse of both, with the gradient epilogue (du, d_ig, d_skip from dx; d_og = dy ⊙ c).

The signal crosses HBM more often than in one pass (each complex float32 intermediate is 8x a bf16 signal): this
is the path for transforms that do not fit on chip, as in FlashFFTConv.

Letters: B batch, D channels (C per program), N = N1·M and M = N2·N3 as in dft.py, Mt columns of M per outer
program, G = B / block_b batch groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.long_conv import calls, dft, gates
from pallas_kernels.long_conv.calls import Call
from pallas_kernels.long_conv.dft import Complex, Tables


def _outer_tables(r, rows: int, *, first: bool):
  """F_N1[:, :rows] (forward, first step) or F_N1[:rows] (inverse, last step), and the twiddle block."""
  f1 = r["f1"]
  cut = (slice(None), pl.ds(0, rows)) if first else (pl.ds(0, rows), slice(None))
  return Complex(f1[(0, *cut)], f1[(1, *cut)]), Complex(r["tw1"][0], r["tw1"][1])


def _outer_fwd_kernel(*refs, call: Call, names):
  r = calls.named_refs(names, refs)
  rows = r["signal"].shape[0]
  f1_in, tw = _outer_tables(r, rows, first=True)
  x = gates.gated(calls.load(r, "signal"), calls.load(r, "gate"))
  a = dft.first_step(Complex(x, None), f1_in, tw, call.mm)
  r["a"][0], r["a"][1] = a.re, a.im


def _inner_transforms(r, call: Call):
  f = call.factors
  f2_all, _, tw, f3 = calls.inner_tables(r)

  def forward(ref, *index) -> Complex:
    load = lambda part: ref[(*index, part)].reshape(f.n2, f.n3, -1)
    return dft.inner_forward(Complex(load(0), load(1)), f2_all, tw, f3, call.mm)

  def inverse(y: Complex) -> Complex:
    z = dft.inner_inverse(y, f2_all, tw, f3, call.mm, real=False)
    return z.map(lambda v: v.reshape(f.inner, -1))

  return forward, inverse


def _store(ref, z: Complex, *index):
  ref[(*index, 0)] = z.re
  ref[(*index, 1)] = z.im


def _inner_kernel(*refs, call: Call, names):
  r = calls.named_refs(names, refs)
  forward, inverse = _inner_transforms(r, call)
  kf = calls.spectrum_ref(r["kf"])
  _store(r["z"], inverse(dft.multiply(forward(r["a"]), kf)))


def _inner_bwd_kernel(*refs, call: Call, names):
  r = calls.named_refs(names, refs)
  f = call.factors
  forward, inverse = _inner_transforms(r, call)
  kf = calls.spectrum_ref(r["kf"])

  def body(i, dk: Complex) -> Complex:
    x_spectrum, dc_spectrum = forward(r["ax"], i), forward(r["adc"], i)
    if "zc" in r:
      _store(r["zc"], inverse(dft.multiply(x_spectrum, kf)), i)
    _store(r["zdx"], inverse(dft.multiply_conj(dc_spectrum, kf)), i)
    return dft.accumulate(dk, dft.multiply_conj(dc_spectrum, x_spectrum))

  zeros = jnp.zeros((f.n3, f.n2, r["ax"].shape[-1]), jnp.float32)
  dk = lax.fori_loop(0, r["ax"].shape[0], body, Complex(zeros, zeros))
  r["dk"][0], r["dk"][1] = dk.re, dk.im


def _outer_inv_kernel(*refs, call: Call, names, mode: str):
  r = calls.named_refs(names, refs)
  f1_out, tw = _outer_tables(r, call.factors.n1 // 2, first=False)

  def conv(name: str) -> jax.Array:  # [N1/2, Mt, C]
    return dft.last_step(calls.spectrum_ref(r[name]), f1_out, tw, call.mm, real=True).re

  skip = calls.load(r, "skip")
  skip = None if skip is None else skip.reshape(1, 1, -1)
  u, dy = calls.load(r, "u"), calls.load(r, "dy")
  if mode == "output":
    r["y"][...] = gates.output(conv("z"), u, calls.load(r, "out_gate"), skip).astype(r["y"].dtype)
    return
  if "zc" in r:
    r["d_out_gate"][...] = (dy * conv("zc")).astype(r["d_out_gate"].dtype)
  du, d_in_gate = gates.input_grads(conv("zdx"), u, calls.load(r, "in_gate"), dy, skip)
  r["du"][...] = du.astype(r["du"].dtype)
  if d_in_gate is not None:
    r["d_in_gate"][...] = d_in_gate.astype(r["d_in_gate"].dtype)
  if skip is not None:
    r["d_skip"][...] = gates.skip_grad(dy, u)


class _Grid:
  """Block specs of one call's passes."""

  def __init__(self, call: Call, batch: int, channels: int):
    f, blocks = call.factors, call.blocks
    self.call, self.f, self.c, self.mt = call, f, blocks.block_d, blocks.block_m
    self.batch, self.channels = batch, channels
    self.outer_grid = (channels // self.c, batch, f.inner // self.mt)
    half, c, mt = f.n1 // 2, self.c, self.mt
    self.signal = pl.BlockSpec((None, half, mt, c), lambda d, b, j: (b, 0, j, d))
    self.spectrum = pl.BlockSpec((None, 2, f.n1, mt, c), lambda d, b, j: (b, 0, 0, j, d))
    self.tw1 = pl.BlockSpec((2, f.n1, mt), lambda d, b, j: (0, 0, j))
    self.skip = pl.BlockSpec((1, c), lambda d, b, j: (0, d))

  def outer_tables(self, t: Tables):
    return [("f1", t.f1, calls.whole(t.f1)), ("tw1", t.tw1, self.tw1)]

  def spectrum_shape(self):
    return jax.ShapeDtypeStruct((self.batch, 2, self.f.n1, self.f.inner, self.channels), jnp.float32)

  def kf(self, kf: Complex, index):
    f = self.f
    return ("kf", jnp.stack([kf.re, kf.im]), pl.BlockSpec((2, None, f.n3, f.n2, self.c), index))


def _outer_forward(g: _Grid, signal, gate, t: Tables):
  inputs = [("signal", signal, g.signal), ("gate", gate, g.signal), *g.outer_tables(t)]
  return g.call.run(_outer_fwd_kernel, g.outer_grid, inputs, [("a", g.spectrum_shape(), g.spectrum)],
                    "long_conv_outer_fwd")["a"]


def _outer_inverse(g: _Grid, spectra: dict, t: Tables, mode: str, *, dtype, u=None, in_gate=None,
                   out_gate=None, dy=None, skip=None):
  """The outer inverse of each spectrum in `spectra` (z; or zdx and zc) and the epilogue of `mode`: "output" (y),
  or "grads" (du, d_in_gate and d_out_gate where the gates exist, d_skip's partial sums). Signals the epilogue
  does not need are left out (None)."""
  inputs = [*((name, z, g.spectrum) for name, z in spectra.items()), *g.outer_tables(t), ("u", u, g.signal),
            ("in_gate", in_gate, g.signal), ("out_gate", out_gate, g.signal), ("dy", dy, g.signal),
            ("skip", skip, g.skip)]
  shape = jax.ShapeDtypeStruct((g.batch, g.f.n1 // 2, g.f.inner, g.channels), dtype)
  if mode == "output":
    outputs = [("y", shape, g.signal)]
  else:
    outputs = [("du", shape, g.signal)]
    if in_gate is not None:
      outputs.append(("d_in_gate", shape, g.signal))
    if "zc" in spectra:
      outputs.append(("d_out_gate", shape, g.signal))
    if skip is not None:
      partial = jax.ShapeDtypeStruct((g.batch, g.f.inner // g.mt, 1, g.channels), jnp.float32)
      outputs.append(("d_skip", partial, pl.BlockSpec((None, None, 1, g.c), lambda d, b, j: (b, j, 0, d))))
  return g.call.run(_outer_inv_kernel, g.outer_grid, inputs, outputs, f"long_conv_outer_inv_{mode}", mode=mode)


def forward(call: Call, u, kf: Complex, skip, in_gate, out_gate, t: Tables):
  """y [B, Lp, D] of the padded inputs; kf is the filter spectrum K/N [N1, N3, N2, D]."""
  batch, lp, channels = u.shape
  g = _Grid(call, batch, channels)
  f = g.f
  view = lambda x: None if x is None else x.reshape(batch, f.n1 // 2, f.inner, channels)
  a = _outer_forward(g, view(u), view(in_gate), t)
  spectrum = pl.BlockSpec((None, 2, None, f.inner, g.c), lambda d, r, b: (b, 0, r, 0, d))
  inputs = [("a", a, spectrum), g.kf(kf, lambda d, r, b: (0, r, 0, 0, d)), *calls.inner_table_rows(t)]
  z = call.run(_inner_kernel, (channels // g.c, f.n1, batch), inputs, [("z", g.spectrum_shape(), spectrum)],
           "long_conv_inner")["z"]
  y = _outer_inverse(g, {"z": z}, t, "output", dtype=u.dtype, u=view(u) if skip is not None else None,
                     out_gate=view(out_gate), skip=skip)["y"]
  return y.reshape(batch, lp, channels)


def backward(call: Call, u, kf: Complex, skip, in_gate, out_gate, dy, t: Tables):
  """(du, the filter gradient's spectrum Σ_b DC·conj(X) [N1, N3, N2, D], d_skip, d_in_gate, d_out_gate)."""
  batch, lp, channels = u.shape
  g = _Grid(call, batch, channels)
  f, rows = g.f, call.blocks.block_b
  view = lambda x: None if x is None else x.reshape(batch, f.n1 // 2, f.inner, channels)
  restore = lambda x: None if x is None else x.reshape(batch, lp, channels)
  ax = _outer_forward(g, view(u), view(in_gate), t)
  adc = _outer_forward(g, view(dy), view(out_gate), t)
  groups = batch // rows
  tile = pl.BlockSpec((rows, 2, None, f.inner, g.c), lambda d, r, j: (j, 0, r, 0, d))
  inputs = [("ax", ax, tile), ("adc", adc, tile), g.kf(kf, lambda d, r, j: (0, r, 0, 0, d)), *calls.inner_table_rows(t)]
  outputs = [("zc", g.spectrum_shape(), tile)] if out_gate is not None else []
  dk_shape = jax.ShapeDtypeStruct((groups, 2, f.n1, f.n3, f.n2, channels), jnp.float32)
  outputs += [("zdx", g.spectrum_shape(), tile),
              ("dk", dk_shape, pl.BlockSpec((None, 2, None, f.n3, f.n2, g.c), lambda d, r, j: (j, 0, r, 0, 0, d)))]
  inner = call.run(_inner_bwd_kernel, (channels // g.c, f.n1, groups), inputs, outputs, "long_conv_inner_bwd")
  spectra = {"zdx": inner["zdx"], **({"zc": inner["zc"]} if out_gate is not None else {})}
  needs_u, needs_dy = in_gate is not None or skip is not None, out_gate is not None or skip is not None
  grads = _outer_inverse(g, spectra, t, "grads", dtype=u.dtype, u=view(u) if needs_u else None,
                         in_gate=view(in_gate), dy=view(dy) if needs_dy else None, skip=skip)
  dk = inner["dk"].sum(axis=0)
  d_skip = grads["d_skip"].sum(axis=(0, 1, 2)) if skip is not None else None
  return (restore(grads["du"]), Complex(dk[0], dk[1]), d_skip, restore(grads.get("d_in_gate")),
          restore(grads.get("d_out_gate")))
