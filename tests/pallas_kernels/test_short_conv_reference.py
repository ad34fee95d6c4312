"""Short causal depthwise convolution: every reference form and the public api against a numpy float64 loop,
decode steps against the parallel form, state hand-off, causality and locality, gradients, validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels.short_conv import api, reference
from tests.tolerances import assert_close, float64, normal

IMPLEMENTATIONS = ["reference"]
FORMS = {"shifted": reference.short_conv, "lax": reference.short_conv_lax, "scan": reference.short_conv_scan}
B, D = 2, 5


def input_at_np(x, state, s):
  """x[:, s], reading negative times from the W-1 state rows (oldest first)."""
  return x[:, s] if s >= 0 else state[:, state.shape[1] + s]


def short_conv_np(x, w, bias=None, state=None):
  """(y, final_state) in float64 straight from the definition."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  state = None if state is None else np.asarray(state, np.float64)
  width = w.shape[0]
  if state is None:
    state = np.zeros((x.shape[0], width - 1, x.shape[2]))
  length = x.shape[1]
  y = np.zeros_like(x)
  for t in range(length):
    for j in range(width):
      y[:, t] += w[j] * input_at_np(x, state, t - (width - 1) + j)
    if bias is not None:
      y[:, t] += np.asarray(bias, np.float64)
  final = np.stack([input_at_np(x, state, length - (width - 1) + i) for i in range(width - 1)], axis=1)
  return y, final


def random_inputs(rng, length, width, *, with_bias=True, with_state=True, dtype=jnp.float32):
  x = normal(rng, (B, length, D), dtype)
  w = normal(rng, (width, D), dtype, scale=0.5)
  bias = normal(rng, (D,), dtype) if with_bias else None
  state = normal(rng, (B, width - 1, D), dtype) if with_state else None
  return x, w, bias, state


@pytest.mark.parametrize("with_bias,with_state", [(True, True), (False, False)])
@pytest.mark.parametrize("length", [1, 13])  # 1 < W-1 for W=3,4: the final state keeps initial-state rows
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("form", FORMS)
def test_forms_match_numpy(rng, form, width, length, with_bias, with_state):
  x, w, bias, state = random_inputs(rng, length, width, with_bias=with_bias, with_state=with_state)
  fn = jax.jit(functools.partial(FORMS[form], return_final_state=True))
  y, final = fn(x, w, bias, initial_state=state)
  y_np, final_np = short_conv_np(x, w, bias, state)
  assert y.dtype == x.dtype and final.dtype == x.dtype
  assert_close(y, y_np, dtype=jnp.float32, reduction_len=width + 1)
  np.testing.assert_array_equal(np.asarray(final, np.float64), final_np)  # the state is copied inputs
  assert_close(FORMS[form](x, w, bias, initial_state=state), y_np, dtype=jnp.float32, reduction_len=width + 1)


@pytest.mark.parametrize("width", [2, 4])
def test_steps_equal_parallel(rng, width):
  x, w, bias, state = random_inputs(rng, 7, width)
  y_parallel, final_parallel = reference.short_conv(x, w, bias, initial_state=state, return_final_state=True)
  step = jax.jit(reference.short_conv_step)
  ys = []
  for t in range(x.shape[1]):
    y_t, state = step(x[:, t], state, w, bias)
    ys.append(y_t)
  assert_close(jnp.stack(ys, axis=1), y_parallel, dtype=jnp.float32, reduction_len=width + 1)
  np.testing.assert_array_equal(state, final_parallel)


@pytest.mark.parametrize("split", [1, 5])
@pytest.mark.parametrize("width", [3, 4])
@pytest.mark.parametrize("form", FORMS)
def test_split_sequence_with_state_handoff(rng, form, width, split):
  x, w, bias, state = random_inputs(rng, 8, width)
  fn = functools.partial(FORMS[form], return_final_state=True)
  y_whole, final_whole = fn(x, w, bias, initial_state=state)
  y_first, handoff = fn(x[:, :split], w, bias, initial_state=state)
  y_second, final = fn(x[:, split:], w, bias, initial_state=handoff)
  assert_close(jnp.concatenate([y_first, y_second], axis=1), y_whole, dtype=jnp.float32,
               reduction_len=width + 1)
  np.testing.assert_array_equal(final, final_whole)


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("form", FORMS)
def test_causal_and_local(rng, form, width):
  x, w, bias, state = random_inputs(rng, 9, width)
  jac = np.asarray(jax.jacrev(lambda x: FORMS[form](x, w, bias, initial_state=state))(x))
  length = x.shape[1]
  for t in range(length):
    for s in range(length):
      block = jac[:, t, :, :, s, :].reshape(B * D, B * D)
      if 0 <= t - s < width:
        # Only the same row and channel: dy[b, t, d]/dx[b, s, d] = w[W-1-(t-s), d], nonzero for random w.
        expected = np.diag(np.tile(np.asarray(w[width - 1 - (t - s)]), B))
        np.testing.assert_array_equal(block, expected)
        assert np.all(np.diag(block) != 0)
      else:
        assert not block.any(), f"output {t} depends on input {s} (width {width})"


@pytest.mark.parametrize("form", FORMS)
def test_gradients(rng, form):
  with float64():
    x, w, bias, state = random_inputs(rng, 6, 3, dtype=jnp.float64)
    fn = lambda x, w, bias, state: FORMS[form](x, w, bias, initial_state=state, return_final_state=True)
    check_grads(fn, (x, w, bias, state), order=1, modes=("rev",))


def test_step_gradients(rng):
  with float64():
    x, w, bias, state = random_inputs(rng, 1, 3, dtype=jnp.float64)
    check_grads(reference.short_conv_step, (x[:, 0], state, w, bias), order=1, modes=("rev",))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_api_matches_numpy(rng, implementation, width, dtype):
  x, w, bias, state = random_inputs(rng, 11, width, dtype=dtype)
  fn = jax.jit(functools.partial(api.short_conv, return_final_state=True, implementation=implementation))
  y, final = fn(x, w, bias, initial_state=state)
  y_np, final_np = short_conv_np(x, w, bias, state)
  assert y.dtype == dtype and final.dtype == dtype
  assert_close(y, y_np, dtype=dtype, reduction_len=width + 1)
  np.testing.assert_array_equal(np.asarray(final, np.float64), final_np)
  y_plain = api.short_conv(x, w, implementation=implementation)
  assert_close(y_plain, short_conv_np(x, w)[0], dtype=dtype, reduction_len=width)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_api_step_matches_numpy(rng, implementation, dtype):
  x, w, bias, state = random_inputs(rng, 1, 4, dtype=dtype)
  y, new_state = api.short_conv_step(x[:, 0], state, w, bias, implementation=implementation)
  y_np, state_np = short_conv_np(x, w, bias, state)
  assert y.dtype == dtype and new_state.dtype == dtype
  assert_close(y, y_np[:, 0], dtype=dtype, reduction_len=5)
  np.testing.assert_array_equal(np.asarray(new_state, np.float64), state_np)


def test_api_auto_and_unknown_implementation(rng):
  x, w, bias, state = random_inputs(rng, 5, 3)
  assert_close(api.short_conv(x, w, bias), short_conv_np(x, w, bias)[0], dtype=jnp.float32, reduction_len=4)
  with pytest.raises(ValueError, match="implementation"):
    api.short_conv(x, w, bias, implementation="no_such_kernel")
  with pytest.raises(ValueError, match="implementation"):
    api.short_conv_step(x[:, 0], state, w, bias, implementation="no_such_kernel")


@pytest.mark.parametrize("change,match", [
    (dict(w=(1, D)), "w"), (dict(w=(5, D)), "w"), (dict(w=(3, D + 1)), "w"), (dict(w=(3, D, 1)), "w"),
    (dict(bias=(D + 1,)), "bias"), (dict(x=(B, 4)), "x"), (dict(state=(B, 3, D)), "initial_state"),
    (dict(state=(B + 1, 2, D)), "initial_state")])
def test_api_rejects_bad_shapes(rng, change, match):
  shapes = dict(x=(B, 4, D), w=(3, D), bias=(D,), state=(B, 2, D)) | change
  arrays = {name: normal(rng, shape) for name, shape in shapes.items()}
  with pytest.raises(ValueError, match=match):
    api.short_conv(arrays["x"], arrays["w"], arrays["bias"], initial_state=arrays["state"])


@pytest.mark.parametrize("bad", ["x", "w", "bias", "initial_state"])
def test_api_rejects_bad_dtypes(rng, bad):
  arrays = dict(zip(["x", "w", "bias", "initial_state"], random_inputs(rng, 4, 3)))
  arrays[bad] = arrays[bad].astype(jnp.int32)
  with pytest.raises(ValueError, match=bad):
    api.short_conv(arrays["x"], arrays["w"], arrays["bias"], initial_state=arrays["initial_state"])
  arrays[bad] = arrays[bad].astype(jnp.bfloat16)  # a float state must still match x's dtype
  if bad == "initial_state":
    with pytest.raises(ValueError, match=bad):
      api.short_conv(arrays["x"], arrays["w"], arrays["bias"], initial_state=arrays["initial_state"])


@pytest.mark.parametrize("change,match", [
    (dict(x=(B, 1, D)), "x"), (dict(state=(B, 3, D)), "state"), (dict(state=(B, 2, D + 1)), "state"),
    (dict(w=(6, D)), "w")])
def test_api_step_rejects_bad_shapes(rng, change, match):
  shapes = dict(x=(B, D), w=(3, D), state=(B, 2, D)) | change
  arrays = {name: normal(rng, shape) for name, shape in shapes.items()}
  with pytest.raises(ValueError, match=match):
    api.short_conv_step(arrays["x"], arrays["state"], arrays["w"])
