"""Hyena's implicit long filter: a small MLP of positional features, windowed by an exponential decay.

Letters: L length, D channels, E positional-feature width (emb_dim), F MLP width (the Hyena code's `order`),
I inner MLP layers.

Following Poli et al. 2023 ("Hyena Hierarchy", sec. 3.3) and the HyenaFilter of its code:

  features z[t] = [t/(L-1), cos(f_j·ω_t), -sin(f_j·ω_t)]_{j<(E-1)/2},  ω_t = 2πt/L,  f = linspace(1e-4, J-1, J)
  h = W_out · Sin(W_I · … Sin(W_1 · Sin(W_in · z + b_in) + b_1) … + b_I)      Sin(x) = sin(freq ⊙ x)
  k[t, d] = h[t, d] · (exp(-t̂·|δ_d|) + shift),  t̂ = t/(L-1) ∈ [0, 1]

with decay rates δ_d = linspace(log(target)/slow_decay_pct, log(target)/fast_decay_pct, D): the window has fallen
to `target` at t̂ = slow_decay_pct for the first channel and at t̂ = fast_decay_pct for the last. As in the Hyena
code, one learnable `freq` is shared by every Sin of the MLP, and the output layer has no bias.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.common import validation


class HyenaFilterParams(NamedTuple):
  """Weights of the implicit-filter MLP (a pytree)."""
  w_in_EF: jax.Array
  b_in_F: jax.Array
  w_hidden_IFF: jax.Array  # the I inner Linear layers, stacked
  b_hidden_IF: jax.Array
  freq_F: jax.Array  # Sin frequency, shared by all activations
  w_out_FD: jax.Array  # no bias: the layer's skip term plays that role


def _check_emb_dim(emb_dim: int) -> None:
  if emb_dim < 3 or emb_dim % 2 == 0:
    raise ValueError(f"emb_dim must be odd and >= 3 (time plus sine/cosine pairs), got {emb_dim=}")


def hyena_positional_features(length: int, emb_dim: int) -> jax.Array:
  """z [L, E]: normalised time t/(L-1) in [0, 1], then cos and -sin of (E-1)/2 frequency bands of 2πt/L."""
  validation.check_positive("length", length)
  _check_emb_dim(emb_dim)
  bands = (emb_dim - 1) // 2
  t_L1 = jnp.linspace(0.0, 1.0, length, dtype=jnp.float32)[:, None]
  omega_L1 = 2 * math.pi * jnp.arange(length, dtype=jnp.float32)[:, None] / length
  # The lowest band starts at 1e-4 rather than 0, as in the Hyena code, so its sine feature is not all zeros.
  f_1J = jnp.linspace(1e-4, bands - 1, bands, dtype=jnp.float32)[None, :]
  return jnp.concatenate([t_L1, jnp.cos(f_1J * omega_L1), -jnp.sin(f_1J * omega_L1)], axis=-1)


def _linear_init(key: jax.Array, fan_in: int, shape: tuple[int, ...]) -> jax.Array:
  # torch.nn.Linear's default, which the Hyena filter is trained from: U(-1/√fan_in, 1/√fan_in).
  bound = 1 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def hyena_filter_init(key: jax.Array, channels: int, emb_dim: int = 3, order: int = 16, num_layers: int = 2,
                      w: float = 1.0) -> HyenaFilterParams:
  """MLP emb_dim → order (+ `num_layers` order → order layers) → channels, Sin activations with freq = w."""
  validation.check_positive("channels", channels)
  validation.check_positive("order", order)
  _check_emb_dim(emb_dim)
  if num_layers < 0:
    raise ValueError(f"num_layers must be >= 0, got {num_layers=}")
  keys = jax.random.split(key, 5)
  return HyenaFilterParams(
      w_in_EF=_linear_init(keys[0], emb_dim, (emb_dim, order)),
      b_in_F=_linear_init(keys[1], emb_dim, (order,)),
      w_hidden_IFF=_linear_init(keys[2], order, (num_layers, order, order)),
      b_hidden_IF=_linear_init(keys[3], order, (num_layers, order)),
      freq_F=jnp.full((order,), w, jnp.float32),
      w_out_FD=_linear_init(keys[4], order, (order, channels)))


def exponential_decay_window(length: int, channels: int, *, fast_decay_pct: float = 0.3,
                             slow_decay_pct: float = 1.5, target: float = 1e-2, shift: float = 0.0) -> jax.Array:
  """window [L, D] = exp(-t̂·|δ_d|) + shift, δ_d spread from log(target)/slow_pct to log(target)/fast_pct."""
  validation.check_positive("fast_decay_pct", fast_decay_pct)
  validation.check_positive("slow_decay_pct", slow_decay_pct)
  if not 0 < target < 1:
    raise ValueError(f"target must lie in (0, 1), got {target=}")
  deltas_D = jnp.linspace(math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct, channels,
                          dtype=jnp.float32)
  t_L1 = jnp.linspace(0.0, 1.0, length, dtype=jnp.float32)[:, None]
  return jnp.exp(-t_L1 * jnp.abs(deltas_D)[None]) + shift


def hyena_filter(params: HyenaFilterParams, length: int, *, fast_decay_pct: float = 0.3,
                 slow_decay_pct: float = 1.5, target: float = 1e-2, shift: float = 0.0) -> jax.Array:
  """k [L, D] = MLP(positional features) ⊙ (exp(-t̂·|δ_d|) + shift), computed in float32."""
  dtype = jnp.promote_types(params.w_out_FD.dtype, jnp.float32)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  emb_dim, channels = params.w_in_EF.shape[0], params.w_out_FD.shape[1]
  z_LE = hyena_positional_features(length, emb_dim).astype(dtype)
  highest = jax.lax.Precision.HIGHEST
  h_LF = jnp.sin(params.freq_F * (jnp.dot(z_LE, params.w_in_EF, precision=highest) + params.b_in_F))
  # A Python loop over the (few) layers, not over the sequence: each layer is one [L, F] x [F, F] product.
  for i in range(params.w_hidden_IFF.shape[0]):
    h_LF = jnp.sin(params.freq_F * (jnp.dot(h_LF, params.w_hidden_IFF[i], precision=highest)
                                    + params.b_hidden_IF[i]))
  h_LD = jnp.dot(h_LF, params.w_out_FD, precision=highest)
  window_LD = exponential_decay_window(length, channels, fast_decay_pct=fast_decay_pct,
                                       slow_decay_pct=slow_decay_pct, target=target, shift=shift)
  return h_LD * window_LD.astype(dtype)
