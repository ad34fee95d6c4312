"""long_conv oracles against independent numpy float64 loops: the causal conv (FFT and Toeplitz forms), the
gated form and its public api, the S4D and shift-SSM filters and their recurrences, the Hyena implicit filter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels import long_conv as lc
from pallas_kernels.long_conv import hyena, reference, ssm
from tests.tolerances import assert_close, float64, normal

IMPLEMENTATIONS = ["reference", "direct"]
CONV_FORMS = {"fft": reference.fft_causal_conv, "direct": reference.direct_causal_conv}
S4D_INITS = {"lin": ssm.s4d_lin_init, "inv": ssm.s4d_inv_init}


def f64(x):
  return np.asarray(x, np.float64)


def numpy_causal_conv(u_BLD, k_LD):
  u_BLD, k_LD = f64(u_BLD), f64(k_LD)
  y_BLD = np.zeros_like(u_BLD)
  for t in range(u_BLD.shape[1]):
    for s in range(t + 1):
      y_BLD[:, t] += k_LD[t - s] * u_BLD[:, s]
  return y_BLD


def numpy_s4d_kernel(params, length, discretization):
  """k[l, d] = 2 Re Σ_n C B̄ Ā^l, one term at a time in complex128."""
  p = {name: f64(x) for name, x in params._asdict().items()}
  channels, state_size = p["imag_DN"].shape
  k_LD = np.zeros((length, channels))
  for d in range(channels):
    dt = np.exp(p["log_dt_D"][d])
    for n in range(state_size):
      a = -np.exp(p["log_neg_real_DN"][d, n]) + 1j * p["imag_DN"][d, n]
      b = p["B_re_DN"][d, n] + 1j * p["B_im_DN"][d, n]
      c = p["C_re_DN"][d, n] + 1j * p["C_im_DN"][d, n]
      if discretization == "zoh":
        a_bar = np.exp(dt * a)
        b_bar = (a_bar - 1) / a * b
      else:
        a_bar = (1 + dt * a / 2) / (1 - dt * a / 2)
        b_bar = dt / (1 - dt * a / 2) * b
      for l in range(length):
        k_LD[l, d] += 2 * (c * b_bar * a_bar**l).real
  return k_LD


def numpy_hyena_filter(params, length, fast=0.3, slow=1.5, target=1e-2, shift=0.0):
  p = {name: f64(x) for name, x in params._asdict().items()}
  emb_dim, channels = p["w_in_EF"].shape[0], p["w_out_FD"].shape[1]
  bands = (emb_dim - 1) // 2
  k_LD = np.zeros((length, channels))
  for t in range(length):
    t_hat = t / (length - 1) if length > 1 else 0.0
    freqs = [1e-4 + j * (bands - 1 - 1e-4) / max(bands - 1, 1) for j in range(bands)]
    z = np.array([t_hat] + [np.cos(f * 2 * np.pi * t / length) for f in freqs]
                 + [-np.sin(f * 2 * np.pi * t / length) for f in freqs])
    h = np.sin(p["freq_F"] * (z @ p["w_in_EF"] + p["b_in_F"]))
    for w, b in zip(p["w_hidden_IFF"], p["b_hidden_IF"]):
      h = np.sin(p["freq_F"] * (h @ w + b))
    for d in range(channels):
      delta = np.log(target) / slow + d * (np.log(target) / fast - np.log(target) / slow) / max(channels - 1, 1)
      k_LD[t, d] = (h @ p["w_out_FD"][:, d]) * (np.exp(-t_hat * abs(delta)) + shift)
  return k_LD


def s4d_imag(init, state_size):
  """Im A_n of S4D-Lin (πn) and S4D-Inv ((M/π)(M/(2n+1) - 1), M = 2·state_size: the paper's real state size)."""
  n, full = np.arange(state_size), 2 * state_size
  return np.pi * n if init == "lin" else full / np.pi * (full / (2 * n + 1) - 1)


def random_s4d_params(rng, init, channels, state_size, dtype=jnp.float32):
  """Fresh draws around the `init` regime: Im A as the init sets it, every other field random (B too, not 1)."""
  shape = (channels, state_size)
  return ssm.S4DParams(
      log_dt_D=jnp.asarray(rng.uniform(np.log(1e-3), np.log(1e-1), channels), dtype),
      log_neg_real_DN=normal(rng, shape, dtype, scale=0.5) + np.log(0.5),
      imag_DN=jnp.asarray(np.broadcast_to(s4d_imag(init, state_size), shape) + 0.1 * rng.standard_normal(shape),
                          dtype),
      B_re_DN=normal(rng, shape, dtype), B_im_DN=normal(rng, shape, dtype),
      C_re_DN=normal(rng, shape, dtype), C_im_DN=normal(rng, shape, dtype))


def random_hyena_params(rng, channels, emb_dim, order, num_layers, dtype=jnp.float32):
  return hyena.HyenaFilterParams(
      w_in_EF=normal(rng, (emb_dim, order), dtype, scale=emb_dim**-0.5), b_in_F=normal(rng, (order,), dtype),
      w_hidden_IFF=normal(rng, (num_layers, order, order), dtype, scale=order**-0.5),
      b_hidden_IF=normal(rng, (num_layers, order), dtype),
      freq_F=normal(rng, (order,), dtype, scale=0.5) + 1.0,  # a frequency per unit, not the shared init w
      w_out_FD=normal(rng, (order, channels), dtype, scale=order**-0.5))


# ---- the causal convolution --------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 16, 33])
def test_conv_forms_match_numpy_and_each_other(rng, length):
  u, k = normal(rng, (2, length, 3)), normal(rng, (length, 3))
  expected = numpy_causal_conv(u, k)
  outputs = {name: jax.jit(fn)(u, k) for name, fn in CONV_FORMS.items()}
  for name, y in outputs.items():
    assert y.dtype == jnp.float32
    assert_close(y, expected, dtype=jnp.float32, reduction_len=length, name=name)
  assert_close(outputs["fft"], outputs["direct"], dtype=jnp.float32, reduction_len=length, name="fft vs direct")


@pytest.mark.parametrize("form", list(CONV_FORMS))
def test_conv_is_causal_and_depthwise(rng, form):
  length, channels = 12, 2
  u, k = normal(rng, (1, length, channels)), normal(rng, (length, channels))
  jac = np.asarray(jax.jacrev(lambda x: CONV_FORMS[form](x, k))(u))[0, :, :, 0]  # [t, d, s, e]
  future_TS = np.triu(np.ones((length, length), bool), k=1)
  future = np.abs(jac[:, :, :, :].transpose(0, 2, 1, 3)[future_TS])
  # The Toeplitz form multiplies exact zeros; the FFT form only cancels them, to float32 rounding.
  bound = 0.0 if form == "direct" else 1e-5 * np.abs(jac).max()
  assert future.max() <= bound, f"{form}: output depends on future inputs ({future.max():.3e})"
  cross_channel = np.abs(jac[:, 0, :, 1]).max() + np.abs(jac[:, 1, :, 0]).max()
  assert cross_channel <= bound, f"{form}: channels mix ({cross_channel:.3e})"
  for t in range(length):
    assert np.abs(jac[t, 0, : t + 1, 0]).max() > 0, f"{form}: output {t} ignores its past"
  assert_close(jac[:, 0, :, 0], np.tril(f64(k[:, 0])[np.abs(np.subtract.outer(np.arange(length),
                                                                             np.arange(length)))]),
               dtype=jnp.float32, name="jacobian is the Toeplitz matrix")


@pytest.mark.parametrize("form", list(CONV_FORMS))
def test_conv_gradients(rng, form):
  with float64():
    u, k = normal(rng, (2, 9, 2), jnp.float64), normal(rng, (9, 2), jnp.float64)
    check_grads(jax.jit(CONV_FORMS[form]), (u, k), order=1, modes=("rev",))


@pytest.mark.parametrize("gates", ["none", "in", "out", "both"])
@pytest.mark.parametrize("with_skip", [False, True])
def test_gated_long_conv_matches_numpy(rng, gates, with_skip):
  batch, length, channels = 2, 11, 3
  u, k = normal(rng, (batch, length, channels)), normal(rng, (length, channels))
  skip = normal(rng, (channels,)) if with_skip else None
  in_gate = normal(rng, u.shape) if gates in ("in", "both") else None
  out_gate = normal(rng, u.shape) if gates in ("out", "both") else None
  expected = numpy_causal_conv(f64(u) * (1 if in_gate is None else f64(in_gate)), k)
  expected = expected * (1 if out_gate is None else f64(out_gate)) + (0 if skip is None else f64(skip) * f64(u))
  for name, conv in CONV_FORMS.items():
    y = reference.gated_long_conv(u, k, skip, in_gate, out_gate, causal_conv=conv)
    assert_close(y, expected, dtype=jnp.float32, reduction_len=length, name=f"gated {name}")


def test_gated_long_conv_gradients(rng):
  with float64():
    u, k, skip = normal(rng, (1, 8, 2), jnp.float64), normal(rng, (8, 2), jnp.float64), normal(rng, (2,), jnp.float64)
    gate_in, gate_out = normal(rng, u.shape, jnp.float64), normal(rng, u.shape, jnp.float64)
    check_grads(jax.jit(reference.gated_long_conv), (u, k, skip, gate_in, gate_out), order=1, modes=("rev",))


# ---- the public api ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS + ["auto"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_api_matches_numpy(rng, implementation, dtype):
  batch, length, channels = 2, 32, 4
  u, in_gate, out_gate = (normal(rng, (batch, length, channels), dtype) for _ in range(3))
  k, skip = normal(rng, (length, channels), scale=length**-0.5), normal(rng, (channels,))
  expected = numpy_causal_conv(f64(in_gate) * f64(u), k) * f64(out_gate) + f64(skip) * f64(u)
  call = jax.jit(lambda *a: lc.long_conv(*a[:2], skip=a[2], in_gate=a[3], out_gate=a[4],
                                         implementation=implementation))
  y = call(u, k, skip, in_gate, out_gate)
  assert y.dtype == dtype and y.shape == u.shape
  assert_close(y, expected, dtype=dtype, reduction_len=length, name=implementation)
  plain = lc.long_conv(u, k, implementation=implementation)
  assert_close(plain, numpy_causal_conv(u, k), dtype=dtype, reduction_len=length, name=f"{implementation} plain")


def test_api_auto_takes_the_fft_reference():
  options = dict(batch=1, length=8, channels=2, dtype=jnp.float32, filter_dtype=jnp.float32, has_skip=False,
                 has_in_gate=False, has_out_gate=False)
  assert lc.api.DISPATCHER.select("auto", **options).name == "reference"


def test_api_unknown_implementation_raises(rng):
  u, k = normal(rng, (1, 4, 2)), normal(rng, (4, 2))
  with pytest.raises(ValueError, match="implementation"):
    lc.long_conv(u, k, implementation="no_such_kernel")


def _bad_api_calls(rng):
  u, k = normal(rng, (2, 6, 3)), normal(rng, (6, 3))
  return {
      "u rank": (r"^u must have rank 3", dict(u=u[0], k=k)),
      "u dtype": (r"^u has dtype int32", dict(u=u.astype(jnp.int32), k=k)),
      "k length": (r"^k must have shape \(6, 3\)", dict(u=u, k=k[:5])),
      "k channels": (r"^k must have shape \(6, 3\)", dict(u=u, k=k[:, :2])),
      "k rank": (r"^k must have rank 2", dict(u=u, k=k[None])),
      "k dtype": (r"^k has dtype", dict(u=u, k=k.astype(jnp.int32))),
      "skip shape": (r"^skip must have shape \(3,\)", dict(u=u, k=k, skip=normal(rng, (6, 3)))),
      "in_gate shape": (r"^in_gate must have shape", dict(u=u, k=k, in_gate=u[:, :5])),
      "out_gate dtype": (r"'out_gate': 'bfloat16'", dict(u=u, k=k, out_gate=u.astype(jnp.bfloat16))),
  }


@pytest.mark.parametrize("case", list(_bad_api_calls(np.random.default_rng(0))))
def test_api_validation(rng, case):
  match, kwargs = _bad_api_calls(rng)[case]
  with pytest.raises(ValueError, match=match):
    lc.long_conv(kwargs.pop("u"), kwargs.pop("k"), **kwargs)


# ---- S4D and the shift SSM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("init", list(S4D_INITS))
@pytest.mark.parametrize("discretization", ssm.DISCRETIZATIONS)
# The powers come in ⌈√L⌉ blocks: L of 1, a length inside a block, one past a square.
@pytest.mark.parametrize("length", [1, 24, 257])
def test_s4d_kernel_matches_numpy(rng, init, discretization, length):
  channels, state_size = 3, 4
  params = random_s4d_params(rng, init, channels, state_size)
  expected = numpy_s4d_kernel(params, length, discretization)
  k = jax.jit(ssm.s4d_kernel, static_argnums=(1, 2))(params, length, discretization)
  assert k.shape == (length, channels) and k.dtype == jnp.float32
  # Terms are as large as |C B̄| ~ |B̄| (not |k|, which cancels), so the tolerance scales with them.
  scale = 1 + np.abs(numpy_s4d_kernel(params, 1, discretization)).max()
  assert_close(k, expected, dtype=jnp.float32, reduction_len=state_size * length, scale=scale)


@pytest.mark.parametrize("init", list(S4D_INITS))
def test_s4d_init_values(init):
  channels, state_size, dt_min, dt_max = 64, 5, 2e-3, 5e-2
  params = S4D_INITS[init](jax.random.key(1), channels, state_size, dt_min=dt_min, dt_max=dt_max)
  imag = s4d_imag(init, state_size)
  np.testing.assert_allclose(-np.exp(f64(params.log_neg_real_DN)), -0.5, rtol=1e-6)
  np.testing.assert_allclose(f64(params.imag_DN), np.broadcast_to(imag, (channels, state_size)), rtol=1e-6)
  np.testing.assert_array_equal(f64(params.B_re_DN), 1.0)
  np.testing.assert_array_equal(f64(params.B_im_DN), 0.0)
  dt = np.exp(f64(params.log_dt_D))
  assert dt.min() >= dt_min * (1 - 1e-6) and dt.max() <= dt_max * (1 + 1e-6)
  assert dt.max() / dt.min() > 5, "dt should spread over the log-uniform range"
  c_power = np.mean(f64(params.C_re_DN) ** 2 + f64(params.C_im_DN) ** 2)
  assert 0.7 < c_power < 1.3, f"C should be unit-variance complex normal, got E|C|^2 = {c_power}"
  assert_close(ssm.s4d_kernel(params, 16), numpy_s4d_kernel(params, 16, "zoh"), dtype=jnp.float32,
               reduction_len=16 * state_size, name="kernel of the init")


@pytest.mark.parametrize("discretization", ssm.DISCRETIZATIONS)
def test_s4d_kernel_gradients(rng, discretization):
  with float64():
    params = random_s4d_params(rng, "inv", 2, 3, jnp.float64)
    check_grads(jax.jit(lambda p: ssm.s4d_kernel(p, 8, discretization)), (params,), order=1, modes=("rev",))


@pytest.mark.parametrize("discretization", ssm.DISCRETIZATIONS)
def test_diagonal_ssm_steps_reproduce_conv(rng, discretization):
  batch, length, channels, state_size = 2, 20, 3, 4
  params = random_s4d_params(rng, "lin", channels, state_size)
  u = normal(rng, (batch, length, channels))
  A_bar, B_bar, C = ssm.s4d_discretize(params, discretization)
  step = lambda state, u_BD: ssm.diagonal_ssm_step(state, u_BD, A_bar, B_bar, C)[::-1]
  state0 = jnp.zeros((batch, channels, state_size), jnp.complex64)
  final_state, y_LBD = jax.lax.scan(step, state0, jnp.swapaxes(u, 0, 1))
  assert final_state.dtype == jnp.complex64
  expected = reference.fft_causal_conv(u, ssm.s4d_kernel(params, length, discretization))
  scale = 1 + np.abs(numpy_s4d_kernel(params, 1, discretization)).max()
  assert_close(jnp.swapaxes(y_LBD, 0, 1), expected, dtype=jnp.float32, reduction_len=length * state_size,
               scale=scale)


@pytest.mark.parametrize("length", [3, 16])
def test_shift_ssm_kernel_and_steps(rng, length):
  batch, num_taps, channels = 2, 4, 3
  taps, u = normal(rng, (num_taps, channels)), normal(rng, (batch, length, channels))
  k = ssm.shift_ssm_kernel(taps, length)
  expected_k = np.zeros((length, channels))
  for l in range(min(length, num_taps)):
    expected_k[l] = f64(taps[l])
  np.testing.assert_array_equal(f64(k), expected_k)
  step = lambda state, u_BD: ssm.shift_ssm_step(state, u_BD, taps)[::-1]
  state0 = jnp.zeros((batch, num_taps, channels))
  final_state, y_LBD = jax.lax.scan(step, state0, jnp.swapaxes(u, 0, 1))
  assert_close(jnp.swapaxes(y_LBD, 0, 1), numpy_causal_conv(u, k), dtype=jnp.float32, reduction_len=num_taps)
  newest_first = f64(u)[:, ::-1][:, :num_taps]
  assert_close(final_state[:, : newest_first.shape[1]], newest_first, dtype=jnp.float32, name="state")


def test_ssm_validation(rng):
  params = random_s4d_params(rng, "lin", 2, 3)
  with pytest.raises(ValueError, match="discretization"):
    ssm.s4d_kernel(params, 8, "euler")
  with pytest.raises(ValueError, match="length"):
    ssm.s4d_kernel(params, 0)
  with pytest.raises(ValueError, match="params.C_re_DN"):
    ssm.s4d_kernel(params._replace(C_re_DN=params.C_re_DN[:, :2]), 8)
  with pytest.raises(ValueError, match="dt_min"):
    ssm.s4d_inv_init(jax.random.key(0), 2, 3, dt_min=0.1, dt_max=0.01)
  with pytest.raises(ValueError, match="state_size"):
    ssm.s4d_lin_init(jax.random.key(0), 2, 0)
  with pytest.raises(ValueError, match="taps_ND"):
    ssm.shift_ssm_kernel(normal(rng, (4,)), 8)


# ---- the Hyena implicit filter -----------------------------------------------------------------------------


@pytest.mark.parametrize("emb_dim,num_layers,shift", [(3, 2, 0.0), (5, 0, 0.0), (7, 1, 0.25)])
def test_hyena_filter_matches_numpy(rng, emb_dim, num_layers, shift):
  length, channels, order = 24, 3, 8
  params = random_hyena_params(rng, channels, emb_dim, order, num_layers)
  k = jax.jit(hyena.hyena_filter, static_argnums=1, static_argnames="shift")(params, length, shift=shift)
  assert k.shape == (length, channels) and k.dtype == jnp.float32
  assert_close(k, numpy_hyena_filter(params, length, shift=shift), dtype=jnp.float32, reduction_len=order)


def test_hyena_filter_decays_and_window(rng):
  length, channels = 64, 16
  params = hyena.hyena_filter_init(jax.random.key(int(rng.integers(2**31))), channels)
  k = np.asarray(jax.jit(hyena.hyena_filter, static_argnums=1)(params, length))
  assert np.isfinite(k).all()
  start, end = np.abs(k[: length // 8]).mean(), np.abs(k[-length // 8:]).mean()
  assert end < 0.05 * start, f"filter does not decay: mean |k| {start:.3e} at the start, {end:.3e} at the end"
  window = np.asarray(hyena.exponential_decay_window(length, channels, fast_decay_pct=0.3, slow_decay_pct=1.5,
                                                     target=1e-2))
  # At t̂ = 1 the slowest channel has fallen to target^(1/slow_pct), the fastest to target^(1/fast_pct).
  np.testing.assert_allclose(window[0], 1.0, rtol=1e-6)
  np.testing.assert_allclose(window[-1, [0, -1]], [1e-2 ** (1 / 1.5), 1e-2 ** (1 / 0.3)], rtol=1e-4)
  assert (np.diff(window, axis=0) < 0).all() and (np.diff(window, axis=1) <= 0).all()


def test_hyena_filter_init():
  channels, emb_dim, order, num_layers = 5, 5, 8, 3
  params = hyena.hyena_filter_init(jax.random.key(0), channels, emb_dim, order, num_layers, w=1.5)
  shapes = dict(w_in_EF=(emb_dim, order), b_in_F=(order,), w_hidden_IFF=(num_layers, order, order),
                b_hidden_IF=(num_layers, order), freq_F=(order,), w_out_FD=(order, channels))
  assert {name: x.shape for name, x in params._asdict().items()} == shapes
  np.testing.assert_array_equal(f64(params.freq_F), 1.5)
  for name, fan_in in (("w_in_EF", emb_dim), ("w_hidden_IFF", order), ("w_out_FD", order)):
    x = f64(getattr(params, name))
    assert np.abs(x).max() <= fan_in**-0.5 and x.std() > 0.3 * fan_in**-0.5, f"{name}: not U(±1/√fan_in)"


def test_hyena_filter_gradients(rng):
  with float64():
    params = random_hyena_params(rng, 2, 3, 4, 1, jnp.float64)
    check_grads(jax.jit(lambda p: hyena.hyena_filter(p, 10)), (params,), order=1, modes=("rev",))


def test_hyena_validation():
  with pytest.raises(ValueError, match="emb_dim"):
    hyena.hyena_positional_features(8, 4)
  with pytest.raises(ValueError, match="emb_dim"):
    hyena.hyena_filter_init(jax.random.key(0), 2, emb_dim=1)
  with pytest.raises(ValueError, match="length"):
    hyena.hyena_positional_features(0, 3)
  with pytest.raises(ValueError, match="target"):
    hyena.exponential_decay_window(8, 2, target=2.0)
