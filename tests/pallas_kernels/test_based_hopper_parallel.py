"""The Hopper (Mosaic GPU) parallel BASED kernels: forward and backward lower for sm90 on this CPU-only machine
(jax.export traces and lowers the kernels to Mosaic GPU MLIR, which checks shapes, layouts, wgmma operands and
swizzles), the support check refuses what they do not cover, the kernels' bodies run in Mosaic GPU's interpreter
on CPU, and there and on an sm90 GPU the output and dq, dk, dv match the float32 quadratic reference.

Letters: B batch, T length, H heads, F feature dim, D value dim.
"""

from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.based import hopper_parallel as hopper
from pallas_kernels.based import reference as ref
from pallas_kernels.common import mosaic
from tests.pallas_kernels import mosaic_interpreter
from tests.pallas_kernels.test_based_kernel import _inputs
from tests.tolerances import assert_close, normal

# Shapes and options that must lower; defaults B=2, T=256, H=2, F=16, D=64, bfloat16, normalised.
LOWERING = {
    "f16_d64": dict(),
    "f8_d128_odd_length": dict(F=8, D=128, T=200),
    "f24_d64_segments": dict(F=24, T=333, segments=True),
    "f32_d128_f16_unnormalized": dict(F=32, D=128, T=130, dtype=jnp.float16, normalize=False),
    "block_k_64": dict(T=300, block_sizes=hopper.BlockSizes(block_k=64, block_q_dkv=128, num_stages=2)),
}


def _shapes(B=2, T=256, H=2, F=16, D=64, dtype=jnp.bfloat16, segments=False, **options):
  qk, v = jax.ShapeDtypeStruct((B, T, H, F), dtype), jax.ShapeDtypeStruct((B, T, H, D), dtype)
  ids = (jax.ShapeDtypeStruct((B, T), jnp.int32),) if segments else ()
  return (qk, qk, v, *ids), options


def _forward(options):
  def forward(q, k, v, *ids):
    return hopper.based_parallel_hopper(q, k, v, segment_ids=ids[0] if ids else None, **options)
  return forward


@pytest.mark.parametrize("with_backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("name", LOWERING)
def test_lowers_to_mosaic_gpu(name, with_backward):
  args, options = _shapes(**LOWERING[name])
  forward = _forward(options)

  def forward_backward(q, k, v, *ids):
    loss = lambda q, k, v: jnp.sum(forward(q, k, v, *ids).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  fn = forward_backward if with_backward else forward
  text = jax.export.export(jax.jit(fn), platforms=("cuda",))(*args).mlir_module()
  # One Mosaic GPU custom call per kernel: the forward, plus the dk/dv and dq kernels.
  assert text.count("stablehlo.custom_call @mosaic_gpu") == (3 if with_backward else 1)


def test_refuses_state_and_unsupported_shapes(rng):
  (q, k, v, _), _, _ = _inputs(rng, T=8, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="initial_state"):
    hopper.based_parallel_hopper(q, k, v, return_final_state=True)
  with pytest.raises(ValueError, match="feature_dim"):
    hopper.based_parallel_hopper(q[..., :12], k[..., :12], v)
  with pytest.raises(ValueError, match="must be 64 or 128"):
    hopper.BlockSizes(block_k=96).check(16, 64)
  with pytest.raises(ValueError, match="shared memory"):
    hopper.BlockSizes(num_stages=6).check(32, 128)
  hopper.BlockSizes().check(32, 128)


def test_support_check_names_what_it_refuses():
  ok = dict(backend="gpu", dtype=jnp.bfloat16, feature_dim=16, value_dim=64, length=2048,
            has_initial_state=False, return_final_state=False, has_segment_ids=True, normalize=False, chunk=64)
  with mock.patch.object(mosaic, "is_sm90", lambda: True):
    assert hopper.supports(**ok) is None
    assert hopper.supports(**dict(ok, dtype=jnp.float16, feature_dim=24, value_dim=128)) is None
    assert "float32" in hopper.supports(**dict(ok, dtype=jnp.float32))
    assert "feature_dim=12" in hopper.supports(**dict(ok, feature_dim=12))
    assert "value_dim=32" in hopper.supports(**dict(ok, value_dim=32))
    assert "state" in hopper.supports(**dict(ok, has_initial_state=True))
    assert "state" in hopper.supports(**dict(ok, return_final_state=True))
    assert "backend='cpu'" in hopper.supports(**dict(ok, backend="cpu"))
  with mock.patch.object(mosaic, "is_sm90", lambda: False):
    assert "sm90" in hopper.supports(**ok)


_on_sm90 = pytest.mark.skipif(jax.default_backend() != "gpu" or not mosaic.is_sm90(),
                              reason="needs an sm90 (Hopper) GPU")

# Lengths cross block and CTA edges; B=2, H=2 from _inputs unless given.
CASES = {
    "f16_d64": dict(T=300, dtype=jnp.bfloat16),
    "f8_d128_unnormalized_f16": dict(F=8, D=128, T=200, normalize=False, dtype=jnp.float16),
    "f24_d64_segments": dict(F=24, T=333, segments=True, dtype=jnp.bfloat16),
    "f32_d128_long": dict(F=32, D=128, T=700, dtype=jnp.bfloat16),
    "short": dict(T=37, dtype=jnp.bfloat16),
}


def _check(rng, case, block_sizes=None):
  (q, k, v, _), options, dtype = _inputs(rng, **case)
  del options["chunk"]
  cotangent_y = normal(rng, v.shape, jnp.float32)
  kernel = lambda *a: hopper.based_parallel_hopper(*a, block_sizes=block_sizes, **options)
  quadratic = lambda *a: ref.based_quadratic(*a, **options)
  # Jitted: one compilation per case instead of one per op of the wrapper and its backward.
  value_and_grads = lambda fn: jax.jit(lambda *a: jax.value_and_grad(
      lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent_y), argnums=(0, 1, 2))(*a))
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  n = q.shape[1]
  assert_close(jax.jit(kernel)(q, k, v), quadratic(*upcast), dtype=dtype, reduction_len=n, name="y", scale=2.0)
  _, got = value_and_grads(kernel)(q, k, v)
  _, want = value_and_grads(quadratic)(*upcast)
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    assert_close(g, w, dtype=dtype, reduction_len=n, name=name, scale=8.0)


# One (batch, head) each, about 20-40 s in the interpreter (tests/pallas_kernels/mosaic_interpreter.py).
INTERPRETED = {
    "t150_segments_bf16": dict(B=1, H=1, T=150, segments=True, dtype=jnp.bfloat16),
    "f8_d128_unnormalized_f16_two_key_blocks": dict(B=1, H=1, F=8, D=128, T=130, normalize=False,
                                                    dtype=jnp.float16, block_sizes=hopper.BlockSizes(
                                                        block_k=64, block_q_dkv=128, num_stages=2)),
}


@mosaic_interpreter.on_cpu
@pytest.mark.parametrize("case", INTERPRETED)
def test_kernels_in_the_interpreter_match_reference(rng, case):
  case = dict(INTERPRETED[case])
  with mosaic_interpreter.interpreted():
    _check(rng, case, case.pop("block_sizes", None))


@pytest.mark.gpu
@_on_sm90
@pytest.mark.parametrize("case", list(CASES))
def test_hopper_parallel_matches_reference(rng, case):
  _check(rng, CASES[case])


@pytest.mark.gpu
@_on_sm90
def test_small_key_blocks_and_shallow_ring(rng):
  """block_k = 64 with two stages: more key blocks per CTA, so the rings wrap and the producers wait on frees."""
  blocks = hopper.BlockSizes(block_k=64, block_q_dkv=128, num_stages=2)
  _check(rng, dict(F=16, D=64, T=520, segments=True, dtype=jnp.bfloat16), blocks)
