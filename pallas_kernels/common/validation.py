"""Input checks shared by every op's api.py. Each raises ValueError naming the argument and its values."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_rank(name: str, x: jax.Array, rank: int, layout: str = "") -> None:
  if x.ndim != rank:
    layout = f" ({layout})" if layout else ""
    raise ValueError(f"{name} must have rank {rank}{layout}, got shape {x.shape}")


def check_dtype(name: str, x: jax.Array, allowed: Iterable = FLOAT_DTYPES) -> None:
  allowed = tuple(jnp.dtype(d) for d in allowed)
  if jnp.dtype(x.dtype) not in allowed:
    raise ValueError(f"{name} has dtype {x.dtype}; expected one of {[str(d) for d in allowed]}")


def check_same_dtype(**arrays: jax.Array) -> None:
  dtypes = {name: str(x.dtype) for name, x in arrays.items()}
  if len(set(dtypes.values())) > 1:
    raise ValueError(f"dtypes must match: {dtypes}")


def check_dim(name: str, x: jax.Array, axis: int, expected: int, what: str) -> None:
  if x.shape[axis] != expected:
    raise ValueError(f"{name}.shape[{axis}] ({what}) must be {expected}, got shape {x.shape}")


def check_shape(name: str, x: jax.Array, expected: tuple[int, ...], layout: str = "") -> None:
  if tuple(x.shape) != tuple(expected):
    layout = f" ({layout})" if layout else ""
    raise ValueError(f"{name} must have shape {tuple(expected)}{layout}, got {tuple(x.shape)}")


def check_heads_divide(num_heads: int, num_kv_heads: int) -> None:
  if num_kv_heads < 1 or num_heads % num_kv_heads:
    raise ValueError(f"{num_heads=} must be a positive multiple of {num_kv_heads=}")


def check_positive(name: str, value: int | float | None, *, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if value is None or value <= 0:
    raise ValueError(f"{name} must be positive, got {value!r}")


def check_in(name: str, value, allowed: Iterable) -> None:
  allowed = tuple(allowed)
  if value not in allowed:
    raise ValueError(f"{name}={value!r} not in {allowed}")


def check_segment_ids(name: str, segment_ids: jax.Array, batch: int, length: int) -> None:
  """Packed-document ids: integer [batch, length]; when concrete, non-decreasing along the sequence."""
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {segment_ids.dtype}")
  check_shape(name, segment_ids, (batch, length), "batch, length")
  if isinstance(segment_ids, jax.core.Tracer):
    return  # values unknown under jit; the shape and dtype checks above still hold
  ids = np.asarray(segment_ids)
  if (np.diff(ids, axis=-1) < 0).any():
    row = int(np.argmax((np.diff(ids, axis=-1) < 0).any(axis=-1)))
    raise ValueError(f"{name} must be non-decreasing along the sequence (packed documents); row {row} is "
                     f"{ids[row].tolist()}")


def check_lengths(name: str, lengths: jax.Array, batch: int, max_length: int) -> None:
  """Per-row valid lengths: integer [batch] in [0, max_length] when concrete."""
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {lengths.dtype}")
  check_shape(name, lengths, (batch,), "batch")
  if isinstance(lengths, jax.core.Tracer):
    return
  values = np.asarray(lengths)
  if (values < 0).any() or (values > max_length).any():
    raise ValueError(f"{name} must lie in [0, {max_length}], got {values.tolist()}")
