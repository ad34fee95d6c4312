"""Short causal depthwise convolution (the token mixer's local filter in BaseConv, H3 and Hyena): the jnp oracles.

Each channel e is filtered on its own by W taps, the last tap on the current token:

  y[b, t, e] = Σ_{j<W} w[j, e] · x[b, t - (W-1) + j, e] + bias[e]

Inputs at negative times come from `initial_state[b, i, e]` = x[b, i - (W-1), e] (the W-1 inputs before the
sequence, oldest first; zeros when absent), and the final state is the last W-1 inputs of the concatenation
[initial_state; x], so a sequence split in two with the state handed over gives the same outputs as one run.
Three forms: shifted sums (`short_conv`), a depthwise `lax.conv_general_dilated` (`short_conv_lax`), and a
`lax.scan` of the one-token decode step (`short_conv_scan` over `short_conv_step`).

Letters: B batch, T length, E channels, W kernel width (taps); the state holds W-1 rows along W, and the inputs
with the state before them W-1+T rows along T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The oracle must not silently drop to TF32/bf16 passes on GPU.
_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(*arrays: jax.Array | None) -> jnp.dtype:
  """float32, or float64 when an input is float64 (gradient checks run in float64)."""
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays if a is not None))


def padded_inputs(x_BTE: jax.Array, width: int, initial_state: jax.Array | None) -> jax.Array:
  """[initial_state; x] along time, shape [B, W-1+T, E], in the dtype of x (zeros when no state is given)."""
  b, _, e = x_BTE.shape
  if initial_state is None:
    initial_state = jnp.zeros((b, width - 1, e), x_BTE.dtype)
  return jnp.concatenate([initial_state.astype(x_BTE.dtype), x_BTE], axis=1)


def _bias_or_zero(bias_E: jax.Array | None, e: int, dtype) -> jax.Array:
  return jnp.zeros((e,), dtype) if bias_E is None else bias_E.astype(dtype)


def short_conv(x_BTE: jax.Array, w_WE: jax.Array, bias_E: jax.Array | None = None, *,
               initial_state: jax.Array | None = None, return_final_state: bool = False):
  """y[t] = Σ_j w[j]·x[t-(W-1)+j] + bias as W shifted, scaled copies of x; (y, final_state) on request."""
  width, e = w_WE.shape
  t = x_BTE.shape[1]
  dtype = compute_dtype(x_BTE, w_WE, bias_E, initial_state)
  xp_BTE = padded_inputs(x_BTE, width, initial_state)
  taps_WE = w_WE.astype(dtype)
  y_BTE = _bias_or_zero(bias_E, e, dtype) + sum(
      taps_WE[j] * xp_BTE[:, j:j + t].astype(dtype) for j in range(width))  # W <= 4 taps, not the sequence
  y_BTE = y_BTE.astype(x_BTE.dtype)
  if return_final_state:
    return y_BTE, xp_BTE[:, t:]
  return y_BTE


def short_conv_lax(x_BTE: jax.Array, w_WE: jax.Array, bias_E: jax.Array | None = None, *,
                   initial_state: jax.Array | None = None, return_final_state: bool = False):
  """The same map as `short_conv`, as a depthwise (feature_group_count=E) valid cross-correlation."""
  width, e = w_WE.shape
  t = x_BTE.shape[1]
  dtype = compute_dtype(x_BTE, w_WE, bias_E, initial_state)
  xp_BTE = padded_inputs(x_BTE, width, initial_state)
  # lax convolutions are cross-correlations, so tap j meets xp[t + j] = x[t - (W-1) + j] without flipping.
  y_BTE = jax.lax.conv_general_dilated(
      xp_BTE.astype(dtype), w_WE.astype(dtype)[:, None, :], window_strides=(1,), padding="VALID",
      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=e, precision=_HIGHEST)
  y_BTE = (y_BTE + _bias_or_zero(bias_E, e, dtype)).astype(x_BTE.dtype)
  if return_final_state:
    return y_BTE, xp_BTE[:, t:]
  return y_BTE


def short_conv_step(x_BE: jax.Array, state_BWE: jax.Array, w_WE: jax.Array,
                    bias_E: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One decode token: y = Σ_j w[j]·[state; x][j] + bias, and the new state [state; x][1:] (oldest dropped).

  The W products are summed elementwise, not as an einsum: XLA makes "bwe,we->be" a dot batched over E (E
  products of [B, W]·[W], with the window transposed through memory for it), where the sum fuses into one pass
  with its neighbours. This step runs once per layer per generated token, so its kernel count is its cost."""
  e = w_WE.shape[1]
  dtype = compute_dtype(x_BE, w_WE, bias_E, state_BWE)
  window_BWE = jnp.concatenate([state_BWE, x_BE[:, None].astype(state_BWE.dtype)], axis=1)
  w_WE = w_WE.astype(dtype)
  y_BE = _bias_or_zero(bias_E, e, dtype) + sum(w_WE[j] * window_BWE[:, j].astype(dtype)
                                               for j in range(window_BWE.shape[1]))
  return y_BE.astype(x_BE.dtype), window_BWE[:, 1:]


def short_conv_scan(x_BTE: jax.Array, w_WE: jax.Array, bias_E: jax.Array | None = None, *,
                    initial_state: jax.Array | None = None, return_final_state: bool = False):
  """The same map as `short_conv`, as a lax.scan of `short_conv_step` over the sequence."""
  width, e = w_WE.shape
  if initial_state is None:
    initial_state = jnp.zeros((x_BTE.shape[0], width - 1, e), x_BTE.dtype)

  def step(state_BWE, x_BE):
    y_BE, state_BWE = short_conv_step(x_BE, state_BWE, w_WE, bias_E)
    return state_BWE, y_BE

  final_state, y_TBE = jax.lax.scan(step, initial_state.astype(x_BTE.dtype), jnp.swapaxes(x_BTE, 0, 1))
  y_BTE = jnp.swapaxes(y_TBE, 0, 1)
  if return_final_state:
    return y_BTE, final_state
  return y_BTE
