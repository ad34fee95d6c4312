"""Causal long convolutions, the mixing step of H3 and Hyena: jnp oracles.

Letters: B batch, L length, D channels, T and S the output and input positions of the Toeplitz form (L each).
Layout is channels-last: inputs u_BLD, one filter per channel k_LD.

Each channel is convolved with its own filter, causally and over the whole sequence:

  y[t, d] = Σ_{s <= t} k[t - s, d] · u[s, d]

and the gated form used by H3 and Hyena (gates default to ones, skip to none) is

  y = out_gate ⊙ conv(in_gate ⊙ u, k) + skip ⊙ u.

Two forms of conv: `fft_causal_conv` (O(L log L), what the layers run) and `direct_causal_conv` (the Toeplitz
matrix product, O(L²), exact zeros above the diagonal). Both compute in float32 (float64 under x64) and cast
back to u's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

CausalConv = Callable[[jax.Array, jax.Array], jax.Array]


def compute_dtype(*arrays: jax.Array | None) -> jnp.dtype:
  """float32, or float64 when an input is float64 (so gradient checks under x64 run in float64)."""
  dtypes = [x.dtype for x in arrays if x is not None]
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _fft_conv(u_BLD: jax.Array, k_LD: jax.Array) -> jax.Array:
  length = u_BLD.shape[1]
  # Zero padding to 2L makes the circular convolution of the FFT equal the linear one on the first L outputs:
  # the wrapped-around terms k[t - s + 2L] need lags >= L, where the padded filter is zero.
  fft_size = 2 * length
  u_f = jnp.fft.rfft(u_BLD, n=fft_size, axis=1)
  k_f = jnp.fft.rfft(k_LD, n=fft_size, axis=0)
  return jnp.fft.irfft(u_f * k_f[None], n=fft_size, axis=1)[:, :length]


def causal_toeplitz(k_LD: jax.Array) -> jax.Array:
  """T[t, s, d] = k[t - s, d] for s <= t, else 0: the conv as a lower-triangular matrix per channel."""
  length = k_LD.shape[0]
  lag_TS = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
  taken_TSD = k_LD[jnp.clip(lag_TS, 0, length - 1)]
  return jnp.where((lag_TS >= 0)[..., None], taken_TSD, jnp.zeros((), k_LD.dtype))


def _direct_conv(u_BLD: jax.Array, k_LD: jax.Array) -> jax.Array:
  return jnp.einsum("tsd,bsd->btd", causal_toeplitz(k_LD), u_BLD, precision=jax.lax.Precision.HIGHEST)


def fft_causal_conv(u_BLD: jax.Array, k_LD: jax.Array) -> jax.Array:
  """y[t, d] = Σ_{s<=t} k[t-s, d]·u[s, d], via rfft of size 2L (zero padded, so no wrap-around)."""
  dtype = compute_dtype(u_BLD, k_LD)
  return _fft_conv(u_BLD.astype(dtype), k_LD.astype(dtype)).astype(u_BLD.dtype)


def direct_causal_conv(u_BLD: jax.Array, k_LD: jax.Array) -> jax.Array:
  """y[t, d] = Σ_{s<=t} k[t-s, d]·u[s, d], as the product with the causal Toeplitz matrix (O(L²))."""
  dtype = compute_dtype(u_BLD, k_LD)
  return _direct_conv(u_BLD.astype(dtype), k_LD.astype(dtype)).astype(u_BLD.dtype)


def gated_long_conv(u_BLD: jax.Array, k_LD: jax.Array, skip_D: jax.Array | None = None,
                    in_gate_BLD: jax.Array | None = None, out_gate_BLD: jax.Array | None = None, *,
                    causal_conv: CausalConv = fft_causal_conv) -> jax.Array:
  """y = out_gate ⊙ conv(in_gate ⊙ u, k) + skip ⊙ u (missing gates are ones, a missing skip is zero)."""
  dtype = compute_dtype(u_BLD, k_LD, skip_D, in_gate_BLD, out_gate_BLD)
  u = u_BLD.astype(dtype)
  x = u if in_gate_BLD is None else in_gate_BLD.astype(dtype) * u
  # The conv runs on the upcast operands, so its own cast back is a no-op and the output is rounded only once.
  y = causal_conv(x, k_LD.astype(dtype))
  if out_gate_BLD is not None:
    y = out_gate_BLD.astype(dtype) * y
  if skip_D is not None:
    y = y + skip_D.astype(dtype) * u
  return y.astype(u_BLD.dtype)
