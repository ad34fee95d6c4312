"""Rotary position embedding (RoFormer, Su et al. 2021), full or partial, in the half-split (GPT-NeoX) layout.

The first R dims of each head are rotated, the rest pass through (partial rotary: R < D). With x1 = x[:R/2],
x2 = x[R/2:R] and θ_i = base^(-2i/R):

  rope(x, p) = [x1 cos(pθ) - x2 sin(pθ),  x2 cos(pθ) + x1 sin(pθ),  x[R:]]

so q·k after rotation depends on the positions only through their difference. This is Hugging Face Llama's
`rotate_half` layout, so imported Llama/Mistral/Qwen2 weights need no permutation.

Long-context scaling (`RopeScaling`) rescales the frequencies θ_i once, as Hugging Face's rope_type does:
  linear:  θ_i / factor   (position interpolation)
  llama3:  Llama 3.1's: with wavelength λ_i = 2π/θ_i and the pretraining length L, θ_i is kept where
           λ_i < L/high_freq_factor, divided by `factor` where λ_i > L/low_freq_factor, and in between
           interpolated: (1 - s) θ_i/factor + s θ_i with s = (L/λ_i - low_freq_factor) / (high - low).
Letters: B batch, T length, H heads, D head dim, R rotary dims.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

ROPE_SCALINGS = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How RoPE's frequencies are rescaled for long contexts (module docstring)."""
  type: str  # linear | llama3
  factor: float  # context extension factor (8 for Llama 3.1)
  low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_length / this are divided by factor
  high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_length / this are kept
  original_max_length: int = 8192  # llama3: the pretraining context length

  def __post_init__(self):
    if self.type not in ROPE_SCALINGS:
      raise ValueError(f"rope_scaling.type={self.type!r} not in {ROPE_SCALINGS}")
    if not self.factor > 0:
      raise ValueError(f"rope_scaling.factor={self.factor!r} must be positive")
    if self.type == "llama3":
      if not 0 < self.low_freq_factor < self.high_freq_factor:
        raise ValueError(f"rope_scaling: need 0 < low_freq_factor={self.low_freq_factor!r} < "
                         f"high_freq_factor={self.high_freq_factor!r}")
      if not isinstance(self.original_max_length, int) or self.original_max_length < 1:
        raise ValueError(f"rope_scaling.original_max_length={self.original_max_length!r} must be a positive integer")

  @classmethod
  def from_value(cls, value: Any) -> "RopeScaling | None":
    """None, a RopeScaling, or a mapping of its fields (a config file's); ValueError naming an unknown key."""
    if value is None or isinstance(value, RopeScaling):
      return value
    if not isinstance(value, Mapping):
      raise ValueError(f"rope_scaling must be a mapping like {{type: llama3, factor: 8}}, got {value!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in value:
      if key not in fields:
        raise ValueError(f"rope_scaling.{key}: unknown key; known keys: {sorted(fields)}")
    return cls(**dict(value))


def inverse_frequencies(rotary_dim: int, base: float, scaling: RopeScaling | None = None) -> jax.Array:
  """θ_i = base^(-2i/R) as float32 [R/2], rescaled by `scaling` (module docstring)."""
  inv_freq = base ** (-jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
  if scaling is None:
    return inv_freq
  if scaling.type == "linear":
    return inv_freq / scaling.factor
  wavelength = 2 * math.pi / inv_freq
  low_wavelength = scaling.original_max_length / scaling.low_freq_factor
  high_wavelength = scaling.original_max_length / scaling.high_freq_factor
  smooth = ((scaling.original_max_length / wavelength - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  return jnp.where(wavelength < high_wavelength, inv_freq,
                   jnp.where(wavelength > low_wavelength, inv_freq / scaling.factor, interpolated))


def check_rotary_dim(rotary_dim: int, head_dim: int) -> None:
  if rotary_dim < 0 or rotary_dim > head_dim or rotary_dim % 2:
    raise ValueError(f"rotary_dim={rotary_dim} must be even and in [0, head_dim={head_dim}]")


def rotary_angles(positions: jax.Array, rotary_dim: int, base: float, scaling: RopeScaling | None = None
                  ) -> jax.Array:
  """pθ_i as float32 [..., R/2] for integer positions [...]."""
  return positions.astype(jnp.float32)[..., None] * inverse_frequencies(rotary_dim, base, scaling)


def apply_rotary(x_BTHD: jax.Array, positions_BT: jax.Array, *, rotary_dim: int, base: float = 10000.0,
                 scaling: RopeScaling | None = None) -> jax.Array:
  """x rotated by its positions (broadcast over heads) on the first `rotary_dim` dims; dtype of x.

  Also takes a single step: x [B, H, D] with positions [B].
  """
  if rotary_dim == 0:
    return x_BTHD
  check_rotary_dim(rotary_dim, x_BTHD.shape[-1])
  angles = rotary_angles(positions_BT, rotary_dim, base, scaling)[..., None, :]  # broadcast over the heads axis
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x = x_BTHD.astype(jnp.float32)
  half = rotary_dim // 2
  x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return rotated.astype(x_BTHD.dtype)


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
  """Position of each token within its packed document: t minus the index where its segment starts."""
  t = jnp.arange(segment_ids_BT.shape[-1], dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones_like(segment_ids_BT[..., :1], dtype=bool),
                            segment_ids_BT[..., 1:] != segment_ids_BT[..., :-1]], axis=-1)
  start_index = jax.lax.cummax(jnp.where(starts, t, 0), axis=segment_ids_BT.ndim - 1)
  return t - start_index


def default_positions(batch: int, length: int, segment_ids_BT: jax.Array | None = None) -> jax.Array:
  """0..T-1 per row, restarting at each new segment when packed."""
  if segment_ids_BT is not None:
    return segment_positions(segment_ids_BT)
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
