"""LoLCATs kernels against the reference: outputs and gradients wrt q, k, v, both feature inputs and both
per-head factors, and causality, on fresh random inputs.

The same test body runs every kernel in KERNELS: the portable chunked Pallas kernel in interpret mode on CPU (CI)
and through Triton on the GPU machine (`-m gpu` adds nothing here: on a GPU the same tests run the kernel
through Triton). The oracle is the float32 quadratic reference on the same (upcast) inputs; the reference is
checked against numpy float64 in test_lolcats_reference.py.

Letters: B batch, T length, H heads, K kv heads, D head dim, X feature width.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lolcats import api, features
from pallas_kernels.lolcats import reference as ref
from tests.tolerances import assert_close, normal

KERNELS = ["pallas"]

# T is never a multiple of the window; D 24 and the Taylor map's X = 13 are padded to the kernel's tiles.
CASES = {
    "gqa_hedgehog_f32": dict(B=2, T=45, H=4, K=2, D=16, F=16, window=16),
    "mha_taylor_bf16": dict(B=1, T=40, H=2, K=2, D=24, F=3, window=16, feature_map="taylor", dtype=jnp.bfloat16),
    "mqa_shorter_than_window": dict(B=1, T=20, H=2, K=1, D=16, F=8, window=32),
}


def _inputs(rng, *, B, T, H, K, D, F, window, feature_map="hedgehog", dtype=jnp.float32):
  q, k, v = normal(rng, (B, T, H, D), dtype), normal(rng, (B, T, K, D), dtype), normal(rng, (B, T, K, D), dtype)
  w_q, w_k = normal(rng, (H, D, F), jnp.float32, 0.3), normal(rng, (H, D, F), jnp.float32, 0.3)
  fq = features.features(feature_map, q, w_q)
  fk = features.features(feature_map, jnp.repeat(k, H // K, axis=2), w_k)
  a = jax.nn.sigmoid(normal(rng, (H,), jnp.float32))
  return (q, k, v, fq, fk, a, 1.0 - a), window, dtype


@functools.partial(jax.jit, static_argnames=("attend", "window"))
def _grads(attend, window, args, cotangent_y):
  """y and the gradients of <y, c> wrt all seven inputs, as one program (the cotangent is an input, so a second
  call with another cotangent reuses the compiled program)."""
  def loss(q, k, v, fq, fk, a, b):
    y = attend(q, k, v, fq, fk, window=window, window_factor=a, linear_factor=b)
    return jnp.sum(y.astype(jnp.float32) * cotangent_y), y
  return jax.grad(loss, argnums=tuple(range(7)), has_aux=True)(*args)


def _kernel(implementation):
  return functools.partial(api.lolcats_attention, implementation=implementation)


_NAMES = ("dq", "dk", "dv", "dfq", "dfk", "d window_factor", "d linear_factor")


@pytest.mark.parametrize("implementation", KERNELS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(rng, case, implementation):
  args, window, dtype = _inputs(rng, **CASES[case])
  length = args[0].shape[1]
  cotangent = normal(rng, args[0].shape, jnp.float32)
  grads, y = _grads(_kernel(implementation), window, args, cotangent)
  upcast = tuple(x.astype(jnp.float32) for x in args)
  want_grads, want_y = _grads(ref.lolcats_quadratic, window, upcast, cotangent)
  assert y.dtype == dtype
  assert_close(y, want_y, dtype=dtype, reduction_len=length, name="y", scale=2.0)
  for name, g, w in zip(_NAMES, grads, want_grads):
    # The factors' gradients sum over B·T·H·D terms.
    n = length * (args[0].size // length if "factor" in name else 1)
    assert_close(g, w, dtype=dtype, reduction_len=n, name=name, scale=8.0)

  # Causality: with the cotangent zero after t0, every input after t0 gets exactly zero gradient.
  t0 = length // 2 + 3
  masked = cotangent.at[:, t0 + 1:].set(0.0)
  grads, _ = _grads(_kernel(implementation), window, args, masked)
  for name, g in zip(_NAMES[:5], grads[:5]):
    assert np.all(np.asarray(g[:, t0 + 1:]) == 0), f"{name} leaks from the future"
    if length > window or name not in ("dfq", "dfk"):  # no linear term while every key is in the window
      assert np.any(np.asarray(g[:, :t0 + 1]) != 0), f"{name} is zero"


# LoLCATs' own shapes (Llama 3 8B-like head: D 128, hedgehog F 64 -> X 128, window 64, GQA 4:1), long enough that
# the linear state carries over many chunks; Triton only (interpret mode would take minutes).
GPU_CASES = {
    "llama_head_bf16": dict(B=2, T=1000, H=8, K=2, D=128, F=64, window=64, dtype=jnp.bfloat16),
    "llama_head_f32": dict(B=1, T=515, H=4, K=1, D=128, F=64, window=64),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_kernel_matches_reference_gpu(rng, case):
  args, window, dtype = _inputs(rng, **GPU_CASES[case])
  length = args[0].shape[1]
  cotangent = normal(rng, args[0].shape, jnp.float32)
  grads, y = _grads(_kernel("pallas"), window, args, cotangent)
  want_grads, want_y = _grads(ref.lolcats_quadratic, window, tuple(x.astype(jnp.float32) for x in args), cotangent)
  assert_close(y, want_y, dtype=dtype, reduction_len=length, name="y", scale=2.0)
  for name, g, w in zip(_NAMES, grads, want_grads):
    n = length * (args[0].size // length if "factor" in name else 1)
    assert_close(g, w, dtype=dtype, reduction_len=n, name=name, scale=8.0)
