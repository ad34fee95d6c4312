"""Short causal depthwise convolution (the token mixer's local filter in BaseConv, H3 and Hyena): the jnp oracles.

Each channel d is filtered on its own by W taps, the last tap on the current token:

  y[b, t, d] = Σ_{j<W} w[j, d] · x[b, t - (W-1) + j, d] + bias[d]

Inputs at negative times come from `initial_state[b, i, d]` = x[b, i - (W-1), d] (the W-1 inputs before the
sequence, oldest first; zeros when absent), and the final state is the last W-1 inputs of the concatenation
[initial_state; x], so a sequence split in two with the state handed over gives the same outputs as one run.
Three forms: shifted sums (`short_conv`), a depthwise `lax.conv_general_dilated` (`short_conv_lax`), and a
`lax.scan` of the one-token decode step (`short_conv_scan` over `short_conv_step`).

Letters: B batch, T length, D channels, W kernel width, V = W-1 state rows, P = V+T padded length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The oracle must not silently drop to TF32/bf16 passes on GPU.
_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(*arrays: jax.Array | None) -> jnp.dtype:
  """float32, or float64 when an input is float64 (gradient checks run in float64)."""
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays if a is not None))


def padded_inputs(x_BTD: jax.Array, width: int, initial_state: jax.Array | None) -> jax.Array:
  """[initial_state; x] along time, shape [B, P, D], in the dtype of x (zeros when no state is given)."""
  b, _, d = x_BTD.shape
  if initial_state is None:
    initial_state = jnp.zeros((b, width - 1, d), x_BTD.dtype)
  return jnp.concatenate([initial_state.astype(x_BTD.dtype), x_BTD], axis=1)


def _bias_or_zero(bias_D: jax.Array | None, d: int, dtype) -> jax.Array:
  return jnp.zeros((d,), dtype) if bias_D is None else bias_D.astype(dtype)


def short_conv(x_BTD: jax.Array, w_WD: jax.Array, bias_D: jax.Array | None = None, *,
               initial_state: jax.Array | None = None, return_final_state: bool = False):
  """y[t] = Σ_j w[j]·x[t-(W-1)+j] + bias as W shifted, scaled copies of x; (y, final_state) on request."""
  width, d = w_WD.shape
  t = x_BTD.shape[1]
  dtype = compute_dtype(x_BTD, w_WD, bias_D, initial_state)
  xp_BPD = padded_inputs(x_BTD, width, initial_state)
  taps_WD = w_WD.astype(dtype)
  y_BTD = _bias_or_zero(bias_D, d, dtype) + sum(
      taps_WD[j] * xp_BPD[:, j:j + t].astype(dtype) for j in range(width))  # W <= 4 taps, not the sequence
  y_BTD = y_BTD.astype(x_BTD.dtype)
  if return_final_state:
    return y_BTD, xp_BPD[:, t:]
  return y_BTD


def short_conv_lax(x_BTD: jax.Array, w_WD: jax.Array, bias_D: jax.Array | None = None, *,
                   initial_state: jax.Array | None = None, return_final_state: bool = False):
  """The same map as `short_conv`, as a depthwise (feature_group_count=D) valid cross-correlation."""
  width, d = w_WD.shape
  t = x_BTD.shape[1]
  dtype = compute_dtype(x_BTD, w_WD, bias_D, initial_state)
  xp_BPD = padded_inputs(x_BTD, width, initial_state)
  # lax convolutions are cross-correlations, so tap j meets xp[t + j] = x[t - (W-1) + j] without flipping.
  y_BTD = jax.lax.conv_general_dilated(
      xp_BPD.astype(dtype), w_WD.astype(dtype)[:, None, :], window_strides=(1,), padding="VALID",
      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=d, precision=_HIGHEST)
  y_BTD = (y_BTD + _bias_or_zero(bias_D, d, dtype)).astype(x_BTD.dtype)
  if return_final_state:
    return y_BTD, xp_BPD[:, t:]
  return y_BTD


def short_conv_step(x_BD: jax.Array, state_BVD: jax.Array, w_WD: jax.Array,
                    bias_D: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One decode token: y = Σ_j w[j]·[state; x][j] + bias, and the new state [state; x][1:] (oldest dropped)."""
  d = w_WD.shape[1]
  dtype = compute_dtype(x_BD, w_WD, bias_D, state_BVD)
  window_BWD = jnp.concatenate([state_BVD, x_BD[:, None].astype(state_BVD.dtype)], axis=1)
  y_BD = jnp.einsum("bwd,wd->bd", window_BWD.astype(dtype), w_WD.astype(dtype), precision=_HIGHEST)
  y_BD = (y_BD + _bias_or_zero(bias_D, d, dtype)).astype(x_BD.dtype)
  return y_BD, window_BWD[:, 1:]


def short_conv_scan(x_BTD: jax.Array, w_WD: jax.Array, bias_D: jax.Array | None = None, *,
                    initial_state: jax.Array | None = None, return_final_state: bool = False):
  """The same map as `short_conv`, as a lax.scan of `short_conv_step` over the sequence."""
  width, d = w_WD.shape
  if initial_state is None:
    initial_state = jnp.zeros((x_BTD.shape[0], width - 1, d), x_BTD.dtype)

  def step(state_BVD, x_BD):
    y_BD, state_BVD = short_conv_step(x_BD, state_BVD, w_WD, bias_D)
    return state_BVD, y_BD

  final_state, y_TBD = jax.lax.scan(step, initial_state.astype(x_BTD.dtype), jnp.swapaxes(x_BTD, 0, 1))
  y_BTD = jnp.swapaxes(y_TBD, 0, 1)
  if return_final_state:
    return y_BTD, final_state
  return y_BTD
