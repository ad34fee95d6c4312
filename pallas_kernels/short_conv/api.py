"""Public short causal depthwise convolution: the parallel form over a sequence and the one-token decode step,
validated and dispatched over implementations. The math and the letters are in reference.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import validation
from pallas_kernels.common.dispatch import AUTO, Dispatcher, Implementation
from pallas_kernels.short_conv import reference

# The widths the layers' short convs take (BaseConv, Hyena): kernels would unroll these taps into straight-line
# code and keep the W-1 state rows in registers.
WIDTHS = (2, 3, 4)
# The op itself takes any width up to MAX_WIDTH: H3's shift SSM is a causal conv with state_dim taps (64 in its
# presets), cheaper as W shifted copies than as a length-2L FFT; longer filters belong to long_conv.
MAX_WIDTH = 128

DISPATCHER = Dispatcher("short_conv", (Implementation("reference", reference.short_conv),))
STEP_DISPATCHER = Dispatcher("short_conv_step", (Implementation("reference", reference.short_conv_step),))


def check_filter(w: jax.Array, bias: jax.Array | None, channels: int) -> None:
  """w is a float [W, E] filter with 1 <= W <= MAX_WIDTH and bias, if given, a float [E] vector."""
  validation.check_dtype("w", w)
  validation.check_rank("w", w, 2, "width, channels")
  if not 1 <= w.shape[0] <= MAX_WIDTH:
    raise ValueError(f"w.shape[0] (kernel width W) must lie in [1, {MAX_WIDTH}] (longer filters: long_conv), "
                     f"got w shape {w.shape}")
  validation.check_dim("w", w, 1, channels, "channels")
  if bias is not None:
    validation.check_dtype("bias", bias)
    validation.check_shape("bias", bias, (channels,), "channels")


def check_state(name: str, state: jax.Array, x: jax.Array, width: int) -> None:
  """The state holds the W-1 previous inputs of each row, in the dtype of x (it is returned as the next one)."""
  validation.check_dtype(name, state)
  validation.check_shape(name, state, (x.shape[0], width - 1, x.shape[-1]), "batch, width - 1, channels")
  if state.dtype != x.dtype:
    raise ValueError(f"{name} has dtype {state.dtype} but x has dtype {x.dtype}; they must match")


def short_conv(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *,
               initial_state: jax.Array | None = None, return_final_state: bool = False,
               implementation: str = AUTO):
  """y[b, t, e] = Σ_j w[j, e]·x[b, t-(W-1)+j, e] + bias[e]; (y, final_state) when return_final_state."""
  validation.check_dtype("x", x)
  validation.check_rank("x", x, 3, "batch, length, channels")
  check_filter(w, bias, x.shape[-1])
  if initial_state is not None:
    check_state("initial_state", initial_state, x, w.shape[0])
  batch, length, channels = x.shape
  options = dict(batch=batch, length=length, channels=channels, width=w.shape[0], dtype=jnp.dtype(x.dtype),
                 weight_dtype=jnp.dtype(w.dtype), has_bias=bias is not None,
                 has_initial_state=initial_state is not None, return_final_state=bool(return_final_state))
  return DISPATCHER(implementation, options, x, w, bias, initial_state=initial_state,
                    return_final_state=bool(return_final_state))


def short_conv_step(x: jax.Array, state: jax.Array, w: jax.Array, bias: jax.Array | None = None, *,
                    implementation: str = AUTO) -> tuple[jax.Array, jax.Array]:
  """One decode token x [B, E] with the previous W-1 inputs `state` [B, W-1, E]: (y [B, E], new_state)."""
  validation.check_dtype("x", x)
  validation.check_rank("x", x, 2, "batch, channels")
  check_filter(w, bias, x.shape[-1])
  check_state("state", state, x, w.shape[0])
  batch, channels = x.shape
  options = dict(batch=batch, channels=channels, width=w.shape[0], dtype=jnp.dtype(x.dtype),
                 weight_dtype=jnp.dtype(w.dtype), has_bias=bias is not None)
  return STEP_DISPATCHER(implementation, options, x, state, w, bias)
