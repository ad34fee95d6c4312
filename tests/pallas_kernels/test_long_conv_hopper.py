"""The Hopper long_conv forward (pallas_kernels/long_conv/hopper.py). On CPU: its schedule, replayed in numpy with
the kernel's tables, products, order and 16-bit roundings (hopper.channel_conv over hopper.tables and
hopper.filter_spectrum), equals the reference with every gate and skip option; so does the kernel body run by
Mosaic GPU's interpreter; it lowers for CUDA with its backward; it refuses what it does not cover. On an H100 (marked gpu): the kernel against the reference through the
api by name, output and gradients.

Letters: B batch, L length, D channels.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import mosaic
from pallas_kernels.long_conv import api, hopper, reference
from pallas_kernels.long_conv.dft import Complex
from tests.pallas_kernels import mosaic_interpreter
from tests.tolerances import assert_close, normal, relative_error, tolerance

OPTIONS = ("skip", "in_gate", "out_gate")


def _inputs(rng, batch, length, channels, dtype, options):
  u = normal(rng, (batch, length, channels), dtype)
  decay = np.exp(-np.arange(length) / (0.3 * length))[:, None]  # outputs O(1) at any length, as the layers'
  k = jnp.asarray(normal(rng, (length, channels), jnp.float32) * decay / np.sqrt(0.3 * length))
  extra = dict(skip=normal(rng, (channels,), jnp.float32), in_gate=normal(rng, u.shape, dtype),
               out_gate=normal(rng, u.shape, dtype))
  return u, k, {name: extra[name] for name in options}


def _rounded(x, dtype) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32).astype(dtype).astype(jnp.float32), np.float64)


def _replay(u, k, gates, dtype):
  """The kernel's forward in float64 numpy, channel by channel, with its roundings to `dtype`."""
  batch, length, channels = u.shape
  plan = hopper.plan_for(length, dtype, hopper.BlockSizes())
  t = hopper.tables(plan)
  f2, f2_out, f3 = (_rounded(table, dtype) for table in (t.f2, t.f2_out, t.f3))
  tw = Complex(*np.asarray(t.tw, np.float64))
  kf = np.asarray(hopper.filter_spectrum(k, plan), np.float64)
  pad = lambda x: np.pad(np.asarray(x, np.float64), ((0, 0), (0, plan.padded_length - length), (0, 0)))
  u_p = pad(u)
  x_p = u_p if "in_gate" not in gates else pad(gates["in_gate"]) * u_p
  mm = lambda pairs: sum(np.asarray(a, np.float64) @ np.asarray(b, np.float64) for a, b in pairs)
  to_lhs = lambda v: _rounded(v, dtype)
  y = np.zeros_like(u_p)
  for b in range(batch):
    for d in range(channels):
      x = _rounded(hopper.channel_matrix(x_p[b, :, d], plan), dtype)
      conv = hopper.channel_conv(x, Complex(kf[0, d], kf[1, d]), tw, Complex(*f2), Complex(*f2_out), list(f3), mm,
                                 to_lhs, lambda v: v.map(to_lhs))
      assert np.all(conv[hopper.ROWS_IN:] == 0)  # the inverse's zero rows: nothing past Lp
      y[b, :, d] = conv[:hopper.ROWS_IN].reshape(-1)
  if "out_gate" in gates:
    y = y * pad(gates["out_gate"])
  if "skip" in gates:
    y = y + np.asarray(gates["skip"], np.float64) * u_p
  return y[:, :length]


REPLAY_CASES = {  # name: (B, L, D, dtype, options)
    "bf16_all_L1000": (1, 1000, 8, jnp.bfloat16, OPTIONS),  # N 2048: N3 32
    "f16_plain_L2048": (1, 2048, 8, jnp.float16, ()),  # N 4096: N3 64, no pad
    "bf16_in_gate_L100": (2, 100, 8, jnp.bfloat16, ("in_gate",)),  # N 1024 (the floor): N3 16
    "bf16_out_gate_skip_L513": (1, 513, 16, jnp.bfloat16, ("out_gate", "skip")),
}


@pytest.mark.parametrize("case", REPLAY_CASES)
def test_the_schedule_replayed_equals_the_reference(rng, case):
  batch, length, channels, dtype, options = REPLAY_CASES[case]
  u, k, gates = _inputs(rng, batch, length, channels, dtype, options)
  got = _replay(u, k, gates, dtype)
  want = reference.gated_long_conv(u, k, **{f"{n}_D" if n == "skip" else f"{n}_BLD": g for n, g in gates.items()})
  assert_close(got, want, dtype=dtype, reduction_len=length, scale=2.0)
  assert relative_error(got, want) <= tolerance(dtype), relative_error(got, want)


@mosaic_interpreter.on_cpu
@pytest.mark.parametrize("case", REPLAY_CASES)
def test_the_kernel_in_the_interpreter_equals_the_reference(rng, case):
  """The kernel body itself (TMA copies, barriers, the channel loop, its wgmmas), run on CPU by Mosaic GPU's
  interpreter (tests/pallas_kernels/mosaic_interpreter.py), against the reference."""
  batch, length, channels, dtype, options = REPLAY_CASES[case]
  u, k, gates = _inputs(rng, batch, length, channels, dtype, options)
  with mosaic_interpreter.interpreted():
    got = hopper.gated_long_conv(u, k, gates.get("skip"), gates.get("in_gate"), gates.get("out_gate"))
  want = reference.gated_long_conv(u, k, **{f"{n}_D" if n == "skip" else f"{n}_BLD": g for n, g in gates.items()})
  assert_close(got, want, dtype=dtype, reduction_len=length, scale=2.0)
  assert relative_error(got, want) <= tolerance(dtype), relative_error(got, want)


def _loss(u, k, skip, in_gate, out_gate):
  return jnp.sum(hopper.gated_long_conv(u, k, skip, in_gate, out_gate).astype(jnp.float32))


@pytest.mark.parametrize("length,options", [(2048, OPTIONS), (300, ("out_gate",)), (64, ())])
def test_lowers_for_cuda_with_its_backward(length, options):
  batch, channels = 2, 16
  signal = jax.ShapeDtypeStruct((batch, length, channels), jnp.bfloat16)
  args = (signal, jax.ShapeDtypeStruct((length, channels), jnp.float32),
          jax.ShapeDtypeStruct((channels,), jnp.float32), signal, signal)

  def with_options(fn):
    return lambda u, k, skip, ig, og: fn(u, k, skip if "skip" in options else None,
                                         ig if "in_gate" in options else None, og if "out_gate" in options else None)

  forward = jax.export.export(jax.jit(with_options(hopper.gated_long_conv)), platforms=("cuda",))(*args)
  assert forward.mlir_module().count("stablehlo.custom_call @mosaic_gpu") == 1
  grad = jax.jit(jax.value_and_grad(with_options(_loss), argnums=(0, 1, 2, 3, 4)))
  text = jax.export.export(grad, platforms=("cuda",))(*args).mlir_module()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1  # the forward; the backward is XLA's FFT


def test_refuses_what_it_does_not_cover(rng):
  u, k, _ = _inputs(rng, 1, 64, 8, jnp.bfloat16, ())
  with pytest.raises(ValueError, match="u dtype float32"):
    hopper.gated_long_conv(u.astype(jnp.float32), k)
  with pytest.raises(ValueError, match="u length=2049"):
    hopper.gated_long_conv(jnp.zeros((1, 2049, 8), jnp.bfloat16), jnp.zeros((2049, 8)))
  with pytest.raises(ValueError, match="u channels=12"):
    hopper.gated_long_conv(jnp.zeros((1, 64, 12), jnp.bfloat16), jnp.zeros((64, 12)))
  with pytest.raises(ValueError, match="in_gate"):
    hopper.gated_long_conv(u, k, in_gate_BLD=u.astype(jnp.float16))
  with pytest.raises(ValueError, match="block_d=16"):
    hopper.gated_long_conv(u, k, block_sizes=hopper.BlockSizes(block_d=16))
  options = dict(backend="gpu", length=1024, channels=64, dtype=jnp.dtype(jnp.bfloat16))
  assert "length=4096" in hopper.supports(**dict(options, length=4096))
  assert "float32" in hopper.supports(**dict(options, dtype=jnp.dtype(jnp.float32)))
  assert "channels=20" in hopper.supports(**dict(options, channels=20))
  assert "not backend='cpu'" in hopper.supports(**dict(options, backend="cpu"))
  assert hopper.shared_bytes(hopper.plan_for(2048, jnp.bfloat16, hopper.BlockSizes())) <= mosaic.SMEM_USABLE
  with pytest.raises(ValueError, match="hopper"):
    api.long_conv(u, k, implementation="hopper")  # on CPU: not this backend
  assert api.DISPATCHER.select("auto", length=64, channels=8, dtype=u.dtype, batch=1).name != "hopper"


# Each length's factor (N3 16 / 32 / 64), each channel count's grid, both dtypes and every option, in 6 cases
# rather than their 72 combinations: a GPU call compiles each case for about a minute.
GPU_CASES = [(128, 64, OPTIONS, jnp.bfloat16), (128, 256, ("in_gate",), jnp.float16),
             (1000, 256, (), jnp.float16), (1000, 768, ("out_gate", "skip"), jnp.bfloat16),
             (2048, 768, OPTIONS, jnp.bfloat16), (2048, 64, OPTIONS, jnp.float16)]


@pytest.mark.gpu
@pytest.mark.skipif(not mosaic.is_sm90(), reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("length,channels,options,dtype", GPU_CASES,
                         ids=[f"L{c[0]}-D{c[1]}-{'-'.join(c[2]) or 'plain'}-{jnp.dtype(c[3]).name}" for c in GPU_CASES])
def test_gpu_kernel_matches_the_reference(rng, length, channels, options, dtype):
  batch = 3
  u, k, gates = _inputs(rng, batch, length, channels, dtype, options)
  cotangent = normal(rng, u.shape, jnp.float32)
  kernel = functools.partial(api.long_conv, implementation="hopper")
  oracle = functools.partial(api.long_conv, implementation="reference")

  def values_and_grads(conv):
    def loss(u, k, gates):
      y = conv(u, k, **gates)
      return jnp.sum(y.astype(jnp.float32) * cotangent), y
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(u, k, gates)

  (du, dk, d_gates), y = values_and_grads(kernel)
  (du_w, dk_w, d_gates_w), y_w = values_and_grads(oracle)
  assert_close(y, y_w, dtype=dtype, reduction_len=length, name="y", scale=2.0)
  assert relative_error(y, y_w) <= tolerance(dtype), relative_error(y, y_w)
  # The backward is the reference's own: only the residuals' path differs.
  for name, got, want in [("du", du, du_w), ("dk", dk, dk_w)] + [(n, d_gates[n], d_gates_w[n]) for n in gates]:
    assert_close(got, want, dtype=dtype, reduction_len=length * batch, name=name, scale=4.0)
