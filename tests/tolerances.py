"""The shared test base: tolerances scaled by dtype and reduction length, comparisons, random inputs.

Kernel tests reuse it: atol = rtol = c · eps(dtype) · sqrt(reduction_len), as tokamax does, so a bf16 kernel that
sums 4096 products gets a looser bound than a float32 one summing 16.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np

# Safety factor over eps·sqrt(N): rounding of inputs, exp/log, and float32 accumulation order.
_FACTOR = {np.dtype(np.float64): 100.0, np.dtype(np.float32): 30.0,
           np.dtype(jnp.bfloat16): 4.0, np.dtype(np.float16): 8.0}


def tolerance(dtype, reduction_len: int = 1) -> float:
  dtype = np.dtype(dtype)
  return _FACTOR[dtype] * float(jnp.finfo(dtype).eps) * math.sqrt(max(reduction_len, 1))


def assert_close(actual, expected, *, dtype, reduction_len: int = 1, name: str = "output",
                 scale: float = 1.0) -> None:
  """|actual - expected| <= tol · (1 + |expected|) elementwise, no NaN; the message gives the worst element."""
  actual = np.asarray(actual).astype(np.float64)
  expected = np.asarray(expected).astype(np.float64)
  assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
  assert not np.isnan(actual).any(), f"{name}: NaN in output"
  tol = scale * tolerance(dtype, reduction_len)
  err = np.abs(actual - expected) - tol * (1.0 + np.abs(expected))
  worst = np.unravel_index(np.argmax(err), err.shape) if err.size else ()
  assert err.size == 0 or err[worst] <= 0, (
      f"{name} ({np.dtype(dtype).name}, N={reduction_len}): at {worst} got {actual[worst]!r}, expected "
      f"{expected[worst]!r}, tol {tol:.2e}; max abs err {np.max(np.abs(actual - expected)):.3e}")


def relative_error(actual, expected) -> float:
  """‖actual − expected‖ / ‖expected‖ in float64."""
  actual = np.asarray(actual).astype(np.float64)
  expected = np.asarray(expected).astype(np.float64)
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def normal(rng: np.random.Generator, shape, dtype=jnp.float32, scale: float = 1.0) -> jax.Array:
  """Fresh standard-normal draws, never zeros, cast to `dtype` (the float64 copy is `np.asarray(x, float64)`)."""
  return jnp.asarray(scale * rng.standard_normal(shape), dtype=dtype)


def float64():
  """Context in which jax computes in float64 (for gradient checks)."""
  return jax.enable_x64(True) if hasattr(jax, "enable_x64") else contextlib.nullcontext()
