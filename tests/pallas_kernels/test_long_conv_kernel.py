"""The long_conv Pallas kernels against the references: outputs and the gradients wrt u, k, skip and both gates, on
fresh random inputs, with and without each gate and the skip, over lengths that are not powers of two; causality;
the dispatcher's choices. One test body runs every case; on CPU the kernels run in interpret mode (CI), on the GPU
machine through Triton (the `gpu` tests take the same checks at training shapes).

The oracle is reference.gated_long_conv (XLA's FFT, float32 inside); at short lengths the direct O(L²) form checks
both. Small cases force the three-pass path (split.py) with tiny factors (SPLIT); one case takes it at the
factors the defaults choose, as the GPU does.

Letters: B batch, L length, D channels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common.target import Target
from pallas_kernels.long_conv import api, dft, pallas
from tests.tolerances import assert_close, normal, relative_error, tolerance

# Three passes at small lengths: N = 1024 (L = 300) is N1 = 32 outer rows of an M = 32 point transform (8·4).
# Triton's products take no dimension below 16, so on the GPU the three-pass path starts at N = 8192 (GPU_CASES).
SPLIT = pallas.BlockSizes(block_d=8, block_b=2, max_fused=64, inner=32, block_m=8, min_factor=4)
NOT_ON_TRITON = pytest.mark.skipif(jax.default_backend() == "gpu", reason="factors below 16: interpret mode only")
OPTIONS = ("skip", "in_gate", "out_gate")

CASES = {
    # name: (B, L, D, dtype, options, block sizes)
    "f32_all": (2, 100, 16, jnp.float32, OPTIONS, None),
    "f32_plain_L257": (2, 257, 8, jnp.float32, (), None),
    "f32_in_gate_skip": (2, 130, 16, jnp.float32, ("skip", "in_gate"), None),
    "bf16_out_gate": (4, 200, 16, jnp.bfloat16, ("out_gate",), None),
    "bf16_all_L513": (2, 513, 24, jnp.bfloat16, OPTIONS, None),
    "f16_all": (2, 90, 8, jnp.float16, OPTIONS, None),
    "split_f32_all": (2, 300, 16, jnp.float32, OPTIONS, SPLIT),
    "split_bf16_in_gate": (2, 300, 8, jnp.bfloat16, ("in_gate",), SPLIT),
    "split_f32_out_gate": (4, 200, 8, jnp.float32, ("out_gate",), SPLIT),
    # Past max_fused with the default factors, as on the GPU: N = 16384 = 32 outer rows x (32·16) on chip.
    "split_defaults_L4100": (1, 4100, 8, jnp.float32, OPTIONS, None),
}


def _inputs(rng, batch, length, channels, dtype, options, *, filter_dtype=jnp.float32):
  u = normal(rng, (batch, length, channels), dtype)
  # A decaying filter, as the layers' are (S4D, Hyena's window), so that outputs stay O(1) at any length.
  decay = np.exp(-np.arange(length) / (0.3 * length))[:, None]
  k = jnp.asarray(normal(rng, (length, channels), jnp.float32) * decay / np.sqrt(0.3 * length), filter_dtype)
  extra = dict(skip=normal(rng, (channels,), jnp.float32),
               in_gate=normal(rng, (batch, length, channels), dtype),
               out_gate=normal(rng, (batch, length, channels), dtype))
  return u, k, {name: extra[name] for name in options}


def _values_and_grads(conv, u, k, gates, cotangent):
  """y and the gradients of <y, cotangent> wrt u, k and every optional input, in one jitted program."""
  def loss(u, k, gates):
    y = conv(u, k, **gates)
    return jnp.sum(y.astype(jnp.float32) * cotangent), y
  grads, y = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(u, k, gates)
  du, dk, d_gates = grads
  return y, {"du": du, "dk": dk, **{f"d_{name}": g for name, g in d_gates.items()}}


def _kernel(blocks):
  return lambda u, k, **gates: api.long_conv(u, k, implementation="pallas", block_sizes=blocks, **gates)


def _reference(u, k, **gates):
  return api.long_conv(u, k, implementation="reference", **gates)


def _assert_matches(got, want, dtype, length, what):
  """Elementwise within the dtype's and length's tolerance, and in norm within the dtype's rounding."""
  batch = got[1]["du"].shape[0]
  y, grads = got
  y_want, grads_want = want
  assert_close(y, y_want, dtype=dtype, reduction_len=length, name=f"y vs {what}", scale=2.0)
  assert relative_error(y, y_want) <= tolerance(dtype), f"y vs {what}: {relative_error(y, y_want):.2e}"
  assert grads.keys() == grads_want.keys()
  for name, g in grads.items():
    w = grads_want[name]
    assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype, g.shape, w.shape)
    # dk and d_skip sum over the batch (and, for d_skip, the sequence) too.
    assert_close(g, w, dtype=dtype, reduction_len=length * batch, name=f"{name} vs {what}", scale=4.0)
    assert relative_error(g, w) <= 2 * tolerance(dtype), f"{name} vs {what}: {relative_error(g, w):.2e}"


@pytest.mark.parametrize("case", [pytest.param(name, marks=NOT_ON_TRITON) if blocks is SPLIT else name
                                  for name, (*_, blocks) in CASES.items()])
def test_kernel_matches_reference(rng, case):
  batch, length, channels, dtype, options, blocks = CASES[case]
  u, k, gates = _inputs(rng, batch, length, channels, dtype, options)
  cotangent = normal(rng, u.shape, jnp.float32)
  got = _values_and_grads(_kernel(blocks), u, k, gates, cotangent)
  want = _values_and_grads(_reference, u, k, gates, cotangent)
  _assert_matches(got, want, dtype, length, "reference")
  if length <= 300 and dtype == jnp.float32:  # the O(L²) form, independent of any FFT
    direct = lambda u, k, **g: api.long_conv(u, k, implementation="direct", **g)
    _assert_matches(got, _values_and_grads(direct, u, k, gates, cotangent), dtype, length, "direct")


def test_bf16_filter_and_skip(rng):
  """Parameters may come in 16-bit too; their gradients keep their dtype."""
  u, k, gates = _inputs(rng, 2, 150, 8, jnp.bfloat16, OPTIONS, filter_dtype=jnp.bfloat16)
  gates["skip"] = gates["skip"].astype(jnp.bfloat16)
  cotangent = normal(rng, u.shape, jnp.float32)
  got = _values_and_grads(_kernel(None), u, k, gates, cotangent)
  _assert_matches(got, _values_and_grads(_reference, u, k, gates, cotangent), jnp.bfloat16, 150, "reference")


@pytest.mark.parametrize("blocks", [None, pytest.param(SPLIT, marks=NOT_ON_TRITON)], ids=["one_pass", "three_passes"])
def test_output_depends_on_no_later_input(rng, blocks):
  """y[t0] does not move with u, the gates or k at later positions (or lags): the gradient of y[t0] there is
  rounding noise. L = Lp = N/2, so that a circular convolution of Lp (a missing zero pad) would put O(1) weight on
  every later position."""
  length, t0 = 256, 101
  u, k, gates = _inputs(rng, 2, length, 8, jnp.float32, OPTIONS)
  cotangent = jnp.zeros(u.shape, jnp.float32).at[:, t0].set(normal(rng, (2, 8), jnp.float32))
  _, grads = _values_and_grads(_kernel(blocks), u, k, gates, cotangent)
  for name in ("du", "dk", "d_in_gate", "d_out_gate"):
    g = np.abs(np.asarray(grads[name], np.float64))
    past, future = (g[:t0 + 1], g[t0 + 1:]) if name == "dk" else (g[:, :t0 + 1], g[:, t0 + 1:])
    assert past.max() > 0.1, name  # the check below compares against a real signal
    assert future.max() <= tolerance(jnp.float32, length) * past.max(), (
        f"{name}: y[{t0}] moves with later positions by {future.max():.2e} (past {past.max():.2e})")


def test_factors_cover_lengths():
  """Every length gets N = 2^n >= 2L; one pass up to max_fused, three past it, no factor below min_factor."""
  for length in (1, 100, 128, 129, 1000, 1024, 4095, 16384, 65536):
    f = dft.Factors.for_length(length, max_fused=4096, inner=1024, min_factor=16)
    assert f.fft_size >= 2 * length and f.fft_size == f.n1 * f.n2 * f.n3 and f.padded_length >= length
    assert f.fused == (f.fft_size <= 4096)
    halves = (f.n2 // 2,) if f.fused else (f.n1 // 2, f.n2)
    assert min(*halves, f.n3) >= 16, f


def test_triton_defaults_follow_the_block_size_timings():
  """The GPU defaults: few channels per program (one pass 4, three passes 8, float32 half), 8 warps, valid for
  every channel count the kernel takes."""
  gpu = Target("gpu", interpret=False)
  pick = lambda length, dtype, channels=768: pallas.BlockSizes.for_shape(length=length, channels=channels,
                                                                         dtype=dtype, target=gpu)
  assert (pick(1024, jnp.bfloat16).block_d, pick(16384, jnp.bfloat16).block_d) == (4, 8)
  assert (pick(2048, jnp.float32).block_d, pick(65536, jnp.float32).block_d) == (2, 4)
  assert pick(1024, jnp.float16).num_warps == 8
  for channels in (8, 24, 40, 768):
    for length in (128, 2048, 2049, 65536):
      for dtype in (jnp.bfloat16, jnp.float32):
        pallas.check_block_sizes(pick(length, dtype, channels), channels=channels, target=gpu)


def test_auto_is_fail_closed():
  options = dict(batch=2, length=1024, channels=64, dtype=jnp.bfloat16, filter_dtype=jnp.float32, has_skip=True,
                 has_in_gate=True, has_out_gate=True)
  assert api.DISPATCHER.select("auto", **options).name == "reference"  # by name only until it passes on a GPU
  assert pallas.supports(**dict(options, channels=12)) is not None
  assert pallas.supports(**dict(options, length=pallas.MAX_LENGTH + 1)) is not None
  with pytest.raises(ValueError, match="block_d=16 must divide channels=24"):
    u = jnp.zeros((2, 64, 24), jnp.float32)
    api.long_conv(u, u[0], implementation="pallas", block_sizes=pallas.BlockSizes(block_d=16))


# The same checks at the shapes the layers train at, on the GPU (Triton): the defaults' one pass to N = 4096, three
# passes beyond (L 4096 and up), bf16 as the 355m presets run.
GPU_CASES = {
    "L1024_bf16_all": (4, 1024, 256, jnp.bfloat16, OPTIONS),
    "L2048_f32_all": (2, 2048, 64, jnp.float32, OPTIONS),
    "L1000_bf16_skip": (2, 1000, 128, jnp.bfloat16, ("skip",)),
    "L4096_bf16_all": (2, 4096, 64, jnp.bfloat16, OPTIONS),
    "L16384_bf16_in_gate": (2, 16384, 32, jnp.bfloat16, ("in_gate", "skip")),
    "L65536_f32_all": (1, 65536, 16, jnp.float32, OPTIONS),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_kernel_matches_reference_gpu(rng, case):
  batch, length, channels, dtype, options = GPU_CASES[case]
  u, k, gates = _inputs(rng, batch, length, channels, dtype, options)
  cotangent = normal(rng, u.shape, jnp.float32)
  got = _values_and_grads(_kernel(None), u, k, gates, cotangent)
  _assert_matches(got, _values_and_grads(_reference, u, k, gates, cotangent), dtype, length, "reference")


@pytest.mark.gpu
def test_output_depends_on_no_later_input_gpu(rng):
  length, t0 = 8192, 3001  # three passes
  u, k, gates = _inputs(rng, 1, length, 16, jnp.float32, OPTIONS)
  cotangent = jnp.zeros(u.shape, jnp.float32).at[:, t0].set(normal(rng, (1, 16), jnp.float32))
  _, grads = _values_and_grads(_kernel(None), u, k, gates, cotangent)
  g = np.abs(np.asarray(grads["du"], np.float64))
  assert g[:, t0 + 1:].max() <= tolerance(jnp.float32, length) * g[:, :t0 + 1].max()
