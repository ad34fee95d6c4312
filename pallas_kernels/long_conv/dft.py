"""The DFT of a long convolution as matrix products (Cooley-Tukey in FlashFFTConv's Monarch form): the factor
tables and the steps that the Pallas kernels apply to a block of channels, also used (on all channels, in XLA) for
the filter's transform, computed once per call, and for the filter gradient's inverse transform.

The causal convolution of length L is the circular one of size N = 2^n >= 2L on zero-padded inputs (the wrapped
terms need lags >= L, where the padded filter is zero), of which the first Lp = N/2 outputs are kept.

On chip, M = N2·N3 points: time m = a·N3 + b, frequency k = k_b·N2 + k_a (natural order), ω_M = e^{-2πi/M}:

  X[k_a + N2·k_b] = Σ_b ω_N3^{b·k_b} · ω_M^{b·k_a} · Σ_a ω_N2^{a·k_a} · x[a·N3 + b]

  step 1  F_N2 along a: one [N2, N2] matmul from the left on x laid out [N2, N3·C]
  step 2  the twiddles ω_M^{k_a·b}, elementwise
  step 3  a transpose to [N3, N2·C], then F_N3 along b: one [N3, N3] matmul from the left; the result, [N3, N2, C],
          is X in natural order.
The inverse runs the steps backwards with conjugate factors (and leaves the 1/N to the caller).

For sequences too long for one program, N = N1·M: time n = r·M + m, frequency k = k_r + N1·k_m, and
X[k_r + N1·k_m] = DFT_M over m of (ω_N^{k_r·m} · Σ_r ω_N1^{r·k_r} x[r·M + m]): an outer pass (steps 1 and 2 with
F_N1 along r) feeds N1 independent M-point transforms, each on chip; the inverse ends with the conjugate outer pass.

Complex numbers are (re, im) pairs of real arrays: a complex matmul is 4 real ones, 2 where one side is real (the
padded input; the output, whose imaginary part is dropped). Zero padding also halves the first step: only the first
N2/2 (N1/2) input rows are nonzero, and only as many output rows are kept.

Letters: D channels (C a block of them in a kernel), N = N1·N2·N3 the FFT size (N1 = 1 when all of it is on chip),
M = N2·N3 the on-chip transform, Lp = N/2 the padded length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common.matmul import dot

MatMul = Callable[[jax.Array, jax.Array], jax.Array]  # a @ b, float32 out


class Complex(NamedTuple):
  """A complex array as its real and imaginary parts; im None: a real array."""
  re: jax.Array
  im: jax.Array | None

  def map(self, fn) -> "Complex":
    return Complex(fn(self.re), None if self.im is None else fn(self.im))


def exact_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b in IEEE float32, for the transforms computed outside the kernels."""
  return dot(a.astype(jnp.float32), b.astype(jnp.float32), jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class Factors:
  """N = n1·n2·n3: the FFT size of a length-`length` causal convolution and how it is split."""
  length: int  # L, the sequence length
  fft_size: int  # N
  n1: int  # the outer factor, in passes of its own (1: the whole transform on chip)
  n2: int  # the first on-chip factor (its step takes the zero-padded input when n1 = 1)
  n3: int  # the second on-chip factor

  @property
  def padded_length(self) -> int:  # Lp = N/2: inputs are padded to it, outputs cut from it
    return self.fft_size // 2

  @property
  def inner(self) -> int:  # M = n2·n3
    return self.n2 * self.n3

  @property
  def fused(self) -> bool:
    return self.n1 == 1

  @classmethod
  def for_length(cls, length: int, *, max_fused: int, inner: int, min_factor: int) -> "Factors":
    """N = 2^n >= 2L, all on chip up to max_fused points, else N1·M with M <= inner. No matmul dimension falls
    below min_factor (Triton's tensor-core products take 16): a zero-padded first step has N2/2 (N1/2) rows."""
    fft_size = max(_next_power_of_2(2 * length), 2 * min_factor * min_factor)
    inner = min(inner, fft_size // (2 * min_factor))
    if fft_size <= max_fused or inner < min_factor * min_factor:
      return cls(length, fft_size, 1, *_split(fft_size, first_min=2 * min_factor))
    return cls(length, fft_size, fft_size // inner, *_split(inner, first_min=min_factor))


def _next_power_of_2(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


def _split(size: int, first_min: int) -> tuple[int, int]:
  """n2·n3 = size (a power of two), n2 the larger half of the exponent and at least first_min."""
  n2 = max(1 << (size.bit_length() // 2), first_min)
  return n2, size // n2


def dft_matrix(size: int) -> np.ndarray:
  """F[k, n] = ω_size^{k·n} as [2 (re, im), size, size]."""
  k = np.arange(size)
  return _roots_of(np.outer(k, k), size)


def twiddles(rows: int, cols: int, size: int) -> np.ndarray:
  """ω_size^{r·c} for r < rows, c < cols, as [2, rows, cols]."""
  return _roots_of(np.outer(np.arange(rows), np.arange(cols)), size)


def _roots_of(exponents: np.ndarray, size: int) -> np.ndarray:
  # Exact integer exponents reduced mod size, angles in float64: every table entry is rounded once.
  angle = -2 * np.pi * (exponents % size) / size
  return np.stack([np.cos(angle), np.sin(angle)]).astype(np.float32)


class Tables(NamedTuple):
  """One transform's factor tables, each [2 (re, im), ...] float32: F_N2, the twiddles ω_M^{k_a·b} [N2, N3], F_N3,
  and with an outer factor F_N1 and ω_N^{k_r·m} [N1, M] (else None)."""
  f2: jax.Array
  tw: jax.Array
  f3: jax.Array
  f1: jax.Array | None
  tw1: jax.Array | None


def tables(f: Factors) -> Tables:
  outer = (None, None) if f.fused else (jnp.asarray(dft_matrix(f.n1)),
                                        jnp.asarray(twiddles(f.n1, f.inner, f.fft_size)))
  return Tables(jnp.asarray(dft_matrix(f.n2)), jnp.asarray(twiddles(f.n2, f.n3, f.inner)),
                jnp.asarray(dft_matrix(f.n3)), *outer)


def as_complex(table: jax.Array) -> Complex:
  return Complex(table[0], table[1])


# The steps, on [rows, cols, C] tiles with the channels last. The matrices come sliced to the rows they need
# (Triton kernels slice refs, not values, so the callers slice).

def left_multiply(f: Complex, x: Complex, mm: MatMul) -> Complex:
  """f @ x."""
  re, im = mm(f.re, x.re), mm(f.im, x.re)
  if x.im is not None:
    re, im = re - mm(f.im, x.im), im + mm(f.re, x.im)
  return Complex(re, im)


def left_multiply_conj(f: Complex, x: Complex, mm: MatMul, *, real: bool = False) -> Complex:
  """conj(f) @ x; only its real part when `real`."""
  re = mm(f.re, x.re) + mm(f.im, x.im)
  return Complex(re, None if real else mm(f.re, x.im) - mm(f.im, x.re))


def multiply(a: Complex, b: Complex) -> Complex:
  """a·b elementwise (b complex)."""
  if a.im is None:
    return Complex(a.re * b.re, a.re * b.im)
  return Complex(a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re)


def multiply_conj(a: Complex, b: Complex) -> Complex:
  """a·conj(b) elementwise (both complex)."""
  return Complex(a.re * b.re + a.im * b.im, a.im * b.re - a.re * b.im)


def accumulate(total: Complex, a: Complex) -> Complex:
  return Complex(total.re + a.re, total.im + a.im)


def first_step(x: Complex, f: Complex, tw: Complex, mm: MatMul) -> Complex:
  """Steps 1 and 2: (f @ x) ⊙ tw for x [rows, cols, C], f = F[:, :rows] [size, rows], tw [size, cols]."""
  rows, cols, c = x.re.shape
  size = f.re.shape[0]
  a = left_multiply(f, x.map(lambda v: v.reshape(rows, cols * c)), mm)
  return multiply(a.map(lambda v: v.reshape(size, cols, c)), tw.map(lambda v: v[:, :, None]))


def last_step(z: Complex, f_out: Complex, tw: Complex, mm: MatMul, *, real: bool) -> Complex:
  """The inverse of first_step: conj(f_out) @ (z ⊙ conj(tw)) for z [size, cols, C], f_out = F[:rows] [rows,
  size]; only the real part when `real`."""
  size, cols, c = z.re.shape
  rows = f_out.re.shape[0]
  z = multiply_conj(z, tw.map(lambda v: v[:, :, None]))
  out = left_multiply_conj(f_out, z.map(lambda v: v.reshape(size, cols * c)), mm, real=real)
  return out.map(lambda v: v.reshape(rows, cols, c))


def inner_forward(x: Complex, f2_in: Complex, tw: Complex, f3: Complex, mm: MatMul) -> Complex:
  """X [N3, N2, C] in natural order from x [rows, N3, C] (time a·N3 + b; rows < N2: the rest zero), f2_in =
  F_N2[:, :rows]."""
  a = first_step(x, f2_in, tw, mm)
  n2, n3, c = a.re.shape
  a = a.map(lambda v: jnp.transpose(v, (1, 0, 2)).reshape(n3, n2 * c))
  return left_multiply(f3, a, mm).map(lambda v: v.reshape(n3, n2, c))


def inner_inverse(y: Complex, f2_out: Complex, tw: Complex, f3: Complex, mm: MatMul, *, real: bool) -> Complex:
  """Σ_k y[k]·ω_M^{-m·k} (no 1/M) for y [N3, N2, C] in natural order: [rows, N3, C] (time a·N3 + b, the first
  rows of a), f2_out = F_N2[:rows]; only the real part when `real`."""
  n3, n2, c = y.re.shape
  z = left_multiply_conj(f3, y.map(lambda v: v.reshape(n3, n2 * c)), mm)
  z = z.map(lambda v: jnp.transpose(v.reshape(n3, n2, c), (1, 0, 2)))
  return last_step(z, f2_out, tw, mm, real=real)


# Whole transforms on all channels, in XLA: the filter's spectrum and the filter gradient's inverse.

def _inner_tables(t: Tables, rows_in: int | None = None, rows_out: int | None = None):
  f2 = as_complex(t.f2)
  f2_in = f2 if rows_in is None else f2.map(lambda v: v[:, :rows_in])
  f2_out = f2 if rows_out is None else f2.map(lambda v: v[:rows_out])
  return f2_in, f2_out, as_complex(t.tw), as_complex(t.f3)


def spectrum(x_LD: jax.Array, f: Factors, t: Tables) -> Complex:
  """The N-point DFT of x zero-padded from L to N, in the kernels' layout: [N3, N2, D] (natural order) on chip,
  [N1, N3, N2, D] with an outer factor (row k_r holds frequencies k_r + N1·k_m, k_m in natural order)."""
  length, channels = x_LD.shape
  x = jnp.pad(x_LD.astype(jnp.float32), ((0, f.padded_length - length), (0, 0)))
  if f.fused:
    f2_in, _, tw, f3 = _inner_tables(t, rows_in=f.n2 // 2)
    return inner_forward(Complex(x.reshape(f.n2 // 2, f.n3, channels), None), f2_in, tw, f3, exact_matmul)
  f1 = as_complex(t.f1).map(lambda v: v[:, :f.n1 // 2])
  a = first_step(Complex(x.reshape(f.n1 // 2, f.inner, channels), None), f1, as_complex(t.tw1),
                 exact_matmul)
  f2_in, _, tw, f3 = _inner_tables(t)
  rows = a.map(lambda v: v.reshape(f.n1, f.n2, f.n3, channels))
  return jax.vmap(lambda re, im: inner_forward(Complex(re, im), f2_in, tw, f3, exact_matmul))(rows.re, rows.im)


def inverse_real(y: Complex, f: Factors, t: Tables) -> jax.Array:
  """Re Σ_k y[k]·ω_N^{-n·k} for n < Lp (no 1/N), y in spectrum()'s layout: [Lp, D] float32."""
  channels = y.re.shape[-1]
  if f.fused:
    _, f2_out, tw, f3 = _inner_tables(t, rows_out=f.n2 // 2)
    return inner_inverse(y, f2_out, tw, f3, exact_matmul, real=True).re.reshape(f.padded_length, channels)
  _, f2_out, tw, f3 = _inner_tables(t)
  z = jax.vmap(lambda re, im: inner_inverse(Complex(re, im), f2_out, tw, f3, exact_matmul, real=False))(y.re, y.im)
  z = z.map(lambda v: v.reshape(f.n1, f.inner, channels))
  f1_out = as_complex(t.f1).map(lambda v: v[:f.n1 // 2])
  out = last_step(z, f1_out, as_complex(t.tw1), exact_matmul, real=True)
  return out.re.reshape(f.padded_length, channels)
