"""The fused Monarch kernel (pallas_kernels/monarch/pallas.py, interpret mode here) against the float64 dense matrix
blockdiag(w2) · Perm · blockdiag(w1) written out in numpy, and its three gradients (and those of auto's XLA form,
xla.py) against the oracle's; the public
api by name; lowering for TPU and Triton; the Monarch layers and MLP on it. GPU runs are marked `gpu`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.layers.linear import MonarchLinear
from jaxlm.layers.mlp import build_mlp
from pallas_kernels.monarch import api, pallas, reference, xla
from tests.pallas_kernels.test_kernel_lowering import _lowers
from tests.pallas_kernels.test_monarch_reference import dense_np
from tests.tolerances import assert_close, normal

# name -> (w1 shape [K, Q, P], w2 shape [L, S, R], tokens): L·R = K·Q and Q a multiple of L (the kernel's class).
SHAPES = {
    "nb4_wide_t37": ((4, 8, 8), (4, 16, 8), 37),            # N 32 -> M 64, odd tokens, C 2 padded to 16
    "nb2_narrow_t5": ((2, 6, 12), (2, 6, 6), 5),            # N 24 -> M 12 (fly's shapes: rank 3 per sub-block)
    "nb8_square_t19": ((8, 16, 16), (8, 16, 16), 19),       # chunked P and S, C 2
    "nb16_wide_t3": ((16, 16, 4), (16, 8, 16), 3),          # N 64 -> M 128, P 4 padded to 16
    "nb4_gpt2_like_t33": ((4, 48, 48), (4, 192, 48), 33),   # 192 -> 768 as the presets' 768 -> 3072, C 12
    "unequal_blocks_t9": ((2, 6, 16), (3, 32, 4), 9),       # L != K: 12 intermediates read as 3 blocks of 4
    "nb4_c32_t130": ((4, 128, 32), (4, 32, 128), 130),      # several token tiles; C 32 needs no padding
}
FORWARD_CASES = [("nb4_wide_t37", jnp.float32), ("nb2_narrow_t5", jnp.bfloat16), ("nb8_square_t19", jnp.float32),
                 ("nb16_wide_t3", jnp.bfloat16), ("nb4_gpt2_like_t33", jnp.bfloat16),
                 ("unequal_blocks_t9", jnp.float32), ("nb4_c32_t130", jnp.float16)]
GRADIENT_CASES = [("nb4_wide_t37", jnp.float32), ("nb16_wide_t3", jnp.float32), ("nb2_narrow_t5", jnp.bfloat16),
                  ("unequal_blocks_t9", jnp.float32), ("nb8_square_t19", jnp.bfloat16)]
# Small tiles so the test shapes take several chunks, token tiles and token splits.
SMALL = pallas.BlockSizes(block_t=16, block_x=16, block_y=16, block_w=16, block_wt=16, token_splits=3)


def _inputs(rng, name, dtype, batch=()):
  w1_shape, w2_shape, tokens = SHAPES[name]
  x = normal(rng, (*batch, tokens, w1_shape[0] * w1_shape[2]), dtype)
  return x, normal(rng, w1_shape, dtype), normal(rng, w2_shape, dtype)


def _reduction(w1, w2) -> int:
  return w1.shape[2] * w2.shape[2]


@pytest.mark.parametrize("name, dtype, blocks", [
    *((name, dtype, SMALL) for name, dtype in FORWARD_CASES),
    ("nb4_c32_t130", jnp.float32, None), ("nb4_gpt2_like_t33", jnp.bfloat16, None)])  # for_shape's blocks
def test_forward_matches_the_dense_matrix(rng, name, dtype, blocks):
  x, w1, w2 = _inputs(rng, name, dtype)
  y = jax.jit(functools.partial(pallas.monarch_multiply, block_sizes=blocks))(x, w1, w2)
  assert y.dtype == dtype and y.shape == (x.shape[0], w2.shape[0] * w2.shape[1])
  expected = np.asarray(x, np.float64) @ dense_np(w1, w2).T
  # 16-bit: the intermediate is rounded to the input dtype between the factors, as two linear layers would.
  assert_close(y, expected, dtype=dtype, reduction_len=_reduction(w1, w2), scale=1.0 if dtype == jnp.float32 else 2.0)


def _loss(fn, x, w1, w2, cotangent):
  return jnp.sum(fn(x, w1, w2).astype(jnp.float32) * cotangent)


# The kernel with small tiles, and auto's XLA form (its own custom_vjp with 16-bit operands).
GRADIENT_FORMS = {"pallas": functools.partial(pallas.monarch_multiply, block_sizes=SMALL),
                  "xla": xla.monarch_multiply}


@pytest.mark.parametrize("form", GRADIENT_FORMS)
@pytest.mark.parametrize("name, dtype", GRADIENT_CASES)
def test_gradients_match_the_oracle(rng, name, dtype, form):
  """dx, dw1, dw2 of sum(y · g) for a random g, against the float32 oracle on the same (rounded) inputs."""
  x, w1, w2 = _inputs(rng, name, dtype, batch=(2,))
  cotangent = normal(rng, (*x.shape[:-1], w2.shape[0] * w2.shape[1]))
  kernel = GRADIENT_FORMS[form]
  grads = jax.jit(jax.grad(functools.partial(_loss, kernel), argnums=(0, 1, 2)))(x, w1, w2, cotangent)
  upcast = [a.astype(jnp.float32) for a in (x, w1, w2)]
  expected = jax.grad(functools.partial(_loss, reference.monarch_multiply), argnums=(0, 1, 2))(*upcast, cotangent)
  tokens = x.size // x.shape[-1]
  reductions = {"dx": _reduction(w1, w2), "dw1": tokens * w2.shape[1], "dw2": tokens * w1.shape[2]}
  for (label, reduction), got, want, primal in zip(reductions.items(), grads, expected, (x, w1, w2)):
    assert got.dtype == primal.dtype and got.shape == primal.shape, label
    scale = 1.0 if dtype == jnp.float32 else 2.0
    assert_close(got, want, dtype=dtype, reduction_len=reduction, name=label, scale=scale)


@pytest.mark.parametrize("form", GRADIENT_FORMS)
def test_gradients_of_the_dense_matrix(rng, form):
  """y = x Dᵀ with D the numpy dense matrix: dx = g D, and the weight gradients move y along D's directional
  derivative (a float64 finite difference of the dense matrix), independently of the oracle."""
  x, w1, w2 = _inputs(rng, "nb4_c32_t130", jnp.float32)
  g = normal(rng, (x.shape[0], w2.shape[0] * w2.shape[1]))
  kernel = GRADIENT_FORMS[form]
  dx, dw1, dw2 = jax.jit(jax.grad(functools.partial(_loss, kernel), argnums=(0, 1, 2)))(x, w1, w2, g)
  x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
  assert_close(dx, g64 @ dense_np(w1, w2), dtype=jnp.float32, reduction_len=_reduction(w1, w2), name="dx")
  v1, v2 = np.asarray(normal(rng, w1.shape), np.float64), np.asarray(normal(rng, w2.shape), np.float64)
  eps = 1e-4
  w1_64, w2_64 = np.asarray(w1, np.float64), np.asarray(w2, np.float64)
  moved = dense_np(w1_64 + eps * v1, w2_64 + eps * v2) - dense_np(w1_64 - eps * v1, w2_64 - eps * v2)
  directional = np.sum(g64 * (x64 @ moved.T)) / (2 * eps)
  got = np.sum(np.asarray(dw1, np.float64) * v1) + np.sum(np.asarray(dw2, np.float64) * v2)
  np.testing.assert_allclose(got, directional, rtol=1e-4)


def test_api_runs_the_kernel_by_name_and_auto_stays_on_xla(rng):
  x, w1, w2 = _inputs(rng, "nb4_wide_t37", jnp.bfloat16, batch=(2,))
  assert api.DISPATCHER.select("auto", **_options(x, w1, w2)).name == "xla"
  assert api.DISPATCHER.select("pallas", **_options(x, w1, w2)).name == "pallas"
  y = jax.jit(functools.partial(api.monarch_linear, implementation="pallas", block_sizes=SMALL))(x, w1, w2)
  expected = np.asarray(x, np.float64) @ dense_np(w1, w2).T
  assert_close(y, expected, dtype=jnp.bfloat16, reduction_len=_reduction(w1, w2), scale=2.0)
  with pytest.raises(ValueError, match="BlockSizes"):
    api.monarch_linear(x, w1, w2, implementation="xla", block_sizes=SMALL)


def _options(x, w1, w2):
  k, q, p = w1.shape
  l, s, r = w2.shape
  return dict(batch_shape=x.shape[:-1], in_features=k * p, out_features=l * s, nblocks=k, out_nblocks=l,
              block_in=p, block_mid=q, block_mid_in=r, block_out=s, dtype=x.dtype, weight_dtype=w1.dtype)


def test_kernel_refuses_what_its_tests_do_not_cover(rng):
  w1, w2 = normal(rng, (4, 2, 3)), normal(rng, (8, 2, 1))  # Q 2 < L 8: channels do not split into pairs
  x = normal(rng, (3, 12))
  with pytest.raises(ValueError, match="block_mid=2"):
    api.monarch_linear(x, w1, w2, implementation="pallas")
  assert_close(api.monarch_linear(x, w1, w2), np.asarray(x, np.float64) @ dense_np(w1, w2).T, dtype=jnp.float32,
               reduction_len=3)  # auto still takes it (the XLA form)
  w1, w2 = normal(rng, (32, 32, 1)), normal(rng, (32, 1, 32))
  with pytest.raises(ValueError, match="nblocks=32"):
    api.monarch_linear(normal(rng, (2, 32)), w1, w2, implementation="pallas")


@pytest.mark.parametrize("field, value", [("block_t", 24), ("block_x", 8), ("token_splits", 0)])
def test_bad_block_sizes_name_the_knob(rng, field, value):
  x, w1, w2 = _inputs(rng, "nb4_wide_t37", jnp.float32)
  blocks = pallas.BlockSizes(**{field: value})
  with pytest.raises(ValueError, match=field):
    pallas.monarch_multiply(x, w1, w2, block_sizes=blocks)


# The GPT-2-Monarch presets' MLP maps (small: 768 <-> 3072, C 48; medium: 1024 -> 4096) and the benchmark's
# 2048 -> 8192 at nblocks 4 and 8, with an odd token count.
LOWERING = {"gpt2_small_up": (768, 3072, 4), "gpt2_small_down": (3072, 768, 4), "gpt2_medium_up": (1024, 4096, 4),
            "w2048_nb8": (2048, 8192, 8)}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", LOWERING)
def test_kernel_lowers_forward_and_backward(platform, name):
  n, m, nblocks = LOWERING[name]
  mid = min(n, m) // nblocks
  args = (jax.ShapeDtypeStruct((2, 1001, n), jnp.bfloat16),
          jax.ShapeDtypeStruct((nblocks, mid, n // nblocks), jnp.bfloat16),
          jax.ShapeDtypeStruct((nblocks, m // nblocks, mid), jnp.bfloat16))

  def fwd_bwd(x, w1, w2):
    y, vjp = jax.vjp(pallas.monarch_multiply, x, w1, w2)
    return y, vjp(jnp.ones_like(y))

  text = _lowers(fwd_bwd, args, platform)
  marker = "tpu_custom_call" if platform == "tpu" else "triton"
  # forward, dx, and the two weight-gradient contractions
  assert text.count(marker) >= 4, f"expected 4 kernels in the {platform} module"


def test_monarch_mlp_on_the_kernel_equals_the_reference(rng):
  """A Monarch GELU MLP (both maps, biases) with implementation={"monarch": "pallas"}: output and parameter
  gradients as with the float32 oracle."""
  with nnx.use_eager_sharding(False):  # logical axis names without a mesh: annotate, do not place
    kernel_mlp, reference_mlp = (build_mlp("monarch", 32, 128, use_bias=True, nblocks=4, rngs=nnx.Rngs(0),
                                           implementation={"monarch": name}) for name in ("pallas", "reference"))
  assert isinstance(kernel_mlp.fc1, MonarchLinear) and kernel_mlp.fc1.implementation == "pallas"
  x = normal(rng, (2, 7, 32))

  def loss(module, x):
    return jnp.sum(jnp.sin(module(x)))

  value_and_grad = nnx.jit(nnx.value_and_grad(loss))
  (value, grads), (want_value, want_grads) = (value_and_grad(m, x) for m in (kernel_mlp, reference_mlp))
  assert_close(value, want_value, dtype=jnp.float32, reduction_len=14 * 32 * 128)
  for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.state(grads)), nnx.to_flat_state(nnx.state(want_grads))):
    assert_close(got[...], want[...], dtype=jnp.float32, reduction_len=14 * 128, name=str(path))


# GPU: the kernel through Triton on the presets' shapes and the benchmark's, values and gradients. These are the
# runs that decide whether auto may take it (api.py).
GPU_SHAPES = {"gpt2_small_up": (768, 3072, 4), "gpt2_small_down": (3072, 768, 4),
              "gpt2_medium_down": (4096, 1024, 4), "w2048_nb4": (2048, 8192, 4), "w2048_nb8": (2048, 8192, 8),
              "w1024_nb16": (1024, 4096, 16), "w256_nb2_rect": (256, 512, 2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", GPU_SHAPES)
def test_gpu_kernel_matches_the_oracle(rng, name, dtype):
  n, m, nblocks = GPU_SHAPES[name]
  w1, w2 = (w.astype(dtype) for w in api.monarch_init(jax.random.key(0), n, m, nblocks))
  x = normal(rng, (3, 1111, n), dtype)
  cotangent = normal(rng, (3, 1111, m))
  kernel = jax.jit(functools.partial(api.monarch_linear, implementation="pallas"))
  upcast = [a.astype(jnp.float32) for a in (x, w1, w2)]
  mid = w1.shape[1]
  assert_close(kernel(x, w1, w2), reference.monarch_multiply(*upcast), dtype=dtype,
               reduction_len=w1.shape[2] * w2.shape[2], scale=2.0)
  kernel_loss = functools.partial(_loss, functools.partial(api.monarch_linear, implementation="pallas"))
  grads = jax.jit(jax.grad(kernel_loss, argnums=(0, 1, 2)))(x, w1, w2, cotangent)
  expected = jax.grad(functools.partial(_loss, reference.monarch_multiply), argnums=(0, 1, 2))(*upcast, cotangent)
  for label, got, want, reduction in zip(("dx", "dw1", "dw2"), grads, expected,
                                         (w1.shape[2] * w2.shape[2], 3333 * w2.shape[1], 3333 * mid)):
    assert_close(got, want, dtype=dtype, reduction_len=reduction, name=label, scale=2.0)
