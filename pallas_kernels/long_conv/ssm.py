"""The SSMs of the H3 layer, as long-conv filters and as recurrent steps: S4D (diagonal) and the shift SSM.

Letters: B batch, L length, D channels, N state size (complex modes for S4D, taps for the shift SSM).

S4D (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space Models"): per channel d
a diagonal continuous-time system x' = A x + B u, y = 2·Re(C x) with A, B, C complex [N] (the 2·Re stands for
the conjugate half of the state, so N complex modes are a real state of size 2N), step Δ = exp(log_dt).
Discretised with

  ZOH:      Ā = exp(ΔA),                     B̄ = (Ā - 1)/A · B
  bilinear: Ā = (1 + ΔA/2)/(1 - ΔA/2),       B̄ = Δ/(1 - ΔA/2) · B

it is the causal convolution with k[l] = 2·Re(Σ_n C_n B̄_n Ā_n^l) (eq. 5 of the paper, a Vandermonde product),
and the recurrence x_t = Ā x_{t-1} + B̄ u_t, y_t = 2·Re(C x_t) computes the same outputs one step at a time.
A is stored as (log(-Re A), Im A) so the real part stays negative (a stable system) under any update.

H3's shift SSM (Fu et al. 2023, "Hungry Hungry Hippos"): A is the N×N shift matrix and B = e_1, so the state is
the last N inputs, newest first, and the learned C are N taps: k[l] = taps[l] for l < N and 0 after.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.common import validation
from pallas_kernels.long_conv.reference import compute_dtype

DISCRETIZATIONS = ("zoh", "bilinear")


class S4DParams(NamedTuple):
  """S4D parameters of D channels with N complex modes each (a pytree, so jax.grad sees every field)."""
  log_dt_D: jax.Array  # log step size Δ
  log_neg_real_DN: jax.Array  # log(-Re A): keeps Re A < 0
  imag_DN: jax.Array  # Im A
  B_re_DN: jax.Array
  B_im_DN: jax.Array
  C_re_DN: jax.Array
  C_im_DN: jax.Array


def _s4d_params(key: jax.Array, imag_N: jax.Array, channels: int, dt_min: float, dt_max: float) -> S4DParams:
  validation.check_positive("channels", channels)
  validation.check_positive("dt_min", dt_min)
  if not dt_min < dt_max:
    raise ValueError(f"dt_min must be below dt_max, got {dt_min=}, {dt_max=}")
  state_size = imag_N.shape[0]
  dt_key, c_key = jax.random.split(key)
  log_dt_D = jax.random.uniform(dt_key, (channels,), jnp.float32, math.log(dt_min), math.log(dt_max))
  # Unit-variance complex normal (each part has variance 1/2), as torch.randn(..., dtype=cfloat) in S4D.
  C_DN = jax.random.normal(c_key, (channels, state_size), jnp.complex64)
  shape = (channels, state_size)
  return S4DParams(
      log_dt_D=log_dt_D,
      log_neg_real_DN=jnp.full(shape, math.log(0.5), jnp.float32),
      imag_DN=jnp.broadcast_to(imag_N.astype(jnp.float32), shape),
      B_re_DN=jnp.ones(shape, jnp.float32),
      B_im_DN=jnp.zeros(shape, jnp.float32),
      C_re_DN=jnp.real(C_DN),
      C_im_DN=jnp.imag(C_DN))


def s4d_lin_init(key: jax.Array, channels: int, state_size: int, dt_min: float = 1e-3,
                 dt_max: float = 1e-1) -> S4DParams:
  """S4D-Lin: A_n = -1/2 + iπn, B = 1, C ~ complex normal, Δ log-uniform in [dt_min, dt_max]."""
  validation.check_positive("state_size", state_size)
  return _s4d_params(key, math.pi * jnp.arange(state_size), channels, dt_min, dt_max)


def s4d_inv_init(key: jax.Array, channels: int, state_size: int, dt_min: float = 1e-3,
                 dt_max: float = 1e-1) -> S4DParams:
  """S4D-Inv: A_n = -1/2 + i·(M/π)·(M/(2n+1) - 1) with M = 2·state_size, B = 1, C ~ complex normal."""
  validation.check_positive("state_size", state_size)
  # The paper's N counts the real state, both halves of each conjugate pair; here that is 2·state_size, so
  # this matches S4D-Inv of the S4 code for the same number of complex modes.
  full = 2 * state_size
  imag_N = full / math.pi * (full / (2 * jnp.arange(state_size) + 1) - 1)
  return _s4d_params(key, imag_N, channels, dt_min, dt_max)


def _check_s4d_params(params: S4DParams) -> None:
  validation.check_rank("params.log_dt_D", params.log_dt_D, 1, "channels")
  channels = params.log_dt_D.shape[0]
  expected = (channels, params.imag_DN.shape[-1])
  for name in ("log_neg_real_DN", "imag_DN", "B_re_DN", "B_im_DN", "C_re_DN", "C_im_DN"):
    validation.check_shape(f"params.{name}", getattr(params, name), expected, "channels, state_size")


def _complex(re: jax.Array, im: jax.Array, dtype: jnp.dtype) -> jax.Array:
  return jax.lax.complex(re.astype(dtype), im.astype(dtype))


def _continuous_system(params: S4DParams) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(Δ [D, 1], A, B, C [D, N]) in complex64 (complex128 for float64 params)."""
  _check_s4d_params(params)
  dtype = compute_dtype(*params)
  dt_D1 = jnp.exp(params.log_dt_D.astype(dtype))[:, None]
  A_DN = _complex(-jnp.exp(params.log_neg_real_DN.astype(dtype)), params.imag_DN, dtype)
  B_DN = _complex(params.B_re_DN, params.B_im_DN, dtype)
  C_DN = _complex(params.C_re_DN, params.C_im_DN, dtype)
  return dt_D1, A_DN, B_DN, C_DN


def _discretized(dt_D1: jax.Array, A_DN: jax.Array, B_DN: jax.Array,
                 discretization: str) -> tuple[jax.Array, jax.Array]:
  dtA_DN = dt_D1 * A_DN
  if discretization == "zoh":
    A_bar_DN = jnp.exp(dtA_DN)
    return A_bar_DN, (A_bar_DN - 1) / A_DN * B_DN
  denominator_DN = 1 - dtA_DN / 2
  return (1 + dtA_DN / 2) / denominator_DN, dt_D1 / denominator_DN * B_DN


def s4d_discretize(params: S4DParams, discretization: str = "zoh") -> tuple[jax.Array, jax.Array, jax.Array]:
  """(Ā, B̄, C), each complex [D, N]: ZOH or bilinear discretisation of the S4D system with step exp(log_dt)."""
  validation.check_in("discretization", discretization, DISCRETIZATIONS)
  dt_D1, A_DN, B_DN, C_DN = _continuous_system(params)
  return (*_discretized(dt_D1, A_DN, B_DN, discretization), C_DN)


def s4d_kernel(params: S4DParams, length: int, discretization: str = "zoh") -> jax.Array:
  """k[l, d] = 2·Re(Σ_n C_dn B̄_dn Ā_dn^l) for l < length, as a factored Vandermonde product; float32 [L, D].

  The full Vandermonde matrix Ā^l [L, D, N] is 537 MB of complex64 per layer at H3-355M's L 2048, D 1024, N 32, and
  autodiff keeps it for the backward pass. Writing l = a·S + b with S = ⌈√L⌉ splits it into Ā^(aS) and Ā^b, two
  [D, N, S] tables, and the sum over n into a batched matrix product per channel:
  k[aS + b, d] = 2·Re Σ_n (C B̄ Ā^(aS))_dna · (Ā^b)_dnb."""
  validation.check_in("discretization", discretization, DISCRETIZATIONS)
  validation.check_positive("length", length)
  dt_D1, A_DN, B_DN, C_DN = _continuous_system(params)
  A_bar_DN, B_bar_DN = _discretized(dt_D1, A_DN, B_DN, discretization)
  # Ā^l = exp(l·log Ā); for ZOH log Ā is ΔA itself, which saves a complex log.
  log_A_bar_DN = dt_D1 * A_DN if discretization == "zoh" else jnp.log(A_bar_DN)
  step = math.isqrt(length - 1) + 1  # S = ⌈√L⌉: S blocks of S powers cover every l < L
  b_S = jnp.arange(step, dtype=dt_D1.dtype)
  outer_DNS = (C_DN * B_bar_DN)[..., None] * jnp.exp(log_A_bar_DN[..., None] * (step * b_S))
  inner_DNS = jnp.exp(log_A_bar_DN[..., None] * b_S)
  k_DSS = 2 * jnp.einsum("dna,dnb->dab", outer_DNS, inner_DNS, precision=jax.lax.Precision.HIGHEST).real
  k_LD = k_DSS.reshape(k_DSS.shape[0], step * step)[:, :length].T
  return k_LD.astype(params.log_dt_D.dtype)


def diagonal_ssm_step(state_BDN: jax.Array, u_BD: jax.Array, A_bar_DN: jax.Array, B_bar_DN: jax.Array,
                      C_DN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One step of the discrete diagonal SSM: x' = Ā x + B̄ u, y = 2·Re(C·x'); returns (y_BD, x'_BDN)."""
  u = u_BD.astype(compute_dtype(u_BD))
  new_state_BDN = A_bar_DN * state_BDN + B_bar_DN * u[..., None]
  y_BD = 2 * jnp.sum(C_DN * new_state_BDN, axis=-1).real
  return y_BD.astype(u_BD.dtype), new_state_BDN.astype(state_BDN.dtype)


def shift_ssm_kernel(taps_ND: jax.Array, length: int) -> jax.Array:
  """k[l, d] = taps[l, d] for l < N, 0 for N <= l < length: the impulse response of the shift SSM."""
  validation.check_rank("taps_ND", taps_ND, 2, "taps, channels")
  validation.check_positive("length", length)
  num_taps = taps_ND.shape[0]
  if num_taps >= length:
    return taps_ND[:length]
  return jnp.pad(taps_ND, ((0, length - num_taps), (0, 0)))


def shift_ssm_step(state_BND: jax.Array, u_BD: jax.Array, taps_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One step of the shift SSM: x' = [u, x[:-1]] (last N inputs, newest first), y = Σ_n taps[n]·x'[n]."""
  dtype = compute_dtype(u_BD, taps_ND, state_BND)
  new_state_BND = jnp.concatenate([u_BD[:, None].astype(state_BND.dtype), state_BND[:, :-1]], axis=1)
  y_BD = jnp.einsum("bnd,nd->bd", new_state_BND.astype(dtype), taps_ND.astype(dtype),
                    precision=jax.lax.Precision.HIGHEST)
  return y_BD.astype(u_BD.dtype), new_state_BND
